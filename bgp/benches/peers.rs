//! 1000 simulated iBGP peers × 4 prefixes against one tortie speaker.
//!
//! The load generator is this same binary re-executed as a child process (so its memory is
//! not in the measured RSS); each simulated peer is a full `Speaker` of this crate with its
//! own 127.1.x.y address, originating 4 /26 prefixes and connecting to the speaker under test.
//! Measured: time from "go" until every peer is Established and the Loc-RIB holds every
//! prefix, and the RSS growth of the speaker under test divided by the number of peers.

use ipnet::{IpNet, Ipv4Net};
use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tortie_bgp::fsm::State;
use tortie_bgp::speaker::{PeerConfig, Speaker, SpeakerConfig};

const PEERS: usize = 1000;
const PREFIXES_PER_PEER: usize = 4;
const PORT: u16 = 21179;
const AS: u32 = 64512;
const CENTRAL: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 1);
const LOADGEN_ENV: &str = "TORTIE_BGP_LOADGEN";
/// Targets from the issue, printed as the reference (no other daemon runs in this bench).
const TARGET_SECONDS: f64 = 2.0;
const TARGET_KIB_PER_PEER: f64 = 50.0;

fn peer_addr(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(127, 1, (i / 250) as u8, (i % 250 + 1) as u8)
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// Child process: PEERS speakers, each with one active peer (the speaker under test).
fn loadgen() {
    runtime().block_on(async {
        let mut speakers = Vec::with_capacity(PEERS);
        for i in 0..PEERS {
            let addr = peer_addr(i);
            let speaker = Speaker::start(SpeakerConfig {
                listen: None,
                connect_retry: Duration::from_millis(300),
                ..SpeakerConfig::new(addr, AS)
            })
            .await
            .expect("loadgen speaker starts");
            for j in 0..PREFIXES_PER_PEER {
                let base = 0x0a00_0000u32 + (((i * PREFIXES_PER_PEER + j) as u32) << 6);
                let prefix = Ipv4Net::new(Ipv4Addr::from(base), 26).expect("/26");
                speaker.originate(IpNet::V4(prefix)).expect("originate");
            }
            speakers.push(speaker);
        }
        println!("READY");
        let mut line = String::new();
        let _ = std::io::stdin().read_line(&mut line);
        for (i, speaker) in speakers.iter().enumerate() {
            speaker
                .add_peer(PeerConfig {
                    port: PORT,
                    source_address: Some(IpAddr::V4(peer_addr(i))),
                    ..PeerConfig::new(IpAddr::V4(CENTRAL), AS)
                })
                .expect("loadgen peer");
        }
        // Stay up until the parent closes stdin.
        let _ = std::io::stdin().read_line(&mut line);
        drop(speakers);
    });
}

fn main() {
    if std::env::var_os(LOADGEN_ENV).is_some() {
        loadgen();
        return;
    }
    let rt = runtime();
    rt.block_on(async {
        let central = Speaker::start(SpeakerConfig {
            listen: Some(SocketAddr::new(IpAddr::V4(CENTRAL), PORT)),
            connect_retry: Duration::from_secs(1),
            ..SpeakerConfig::new(CENTRAL, AS)
        })
        .await
        .expect("speaker under test starts");
        let rss_before = rss_kib();
        for i in 0..PEERS {
            central
                .add_peer(PeerConfig {
                    passive: true,
                    ..PeerConfig::new(IpAddr::V4(peer_addr(i)), AS)
                })
                .expect("add peer");
        }

        let exe = std::env::current_exe().expect("own executable");
        let mut child = Command::new(exe)
            .env(LOADGEN_ENV, "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn load generator");
        let mut stdout = BufReader::new(child.stdout.take().expect("child stdout"));
        let mut line = String::new();
        while !line.starts_with("READY") {
            line.clear();
            if stdout.read_line(&mut line).unwrap_or(0) == 0 {
                panic!("load generator exited before READY");
            }
        }
        let mut stdin = child.stdin.take().expect("child stdin");
        let started = Instant::now();
        stdin.write_all(b"GO\n").expect("signal load generator");
        stdin.flush().expect("flush");

        let deadline = started + Duration::from_secs(60);
        let expected = PEERS * PREFIXES_PER_PEER;
        let elapsed = loop {
            let established = central
                .peer_status()
                .iter()
                .filter(|s| s.state == State::Established)
                .count();
            let routes = central.best_paths().await.map(|b| b.len()).unwrap_or(0);
            if established == PEERS && routes == expected {
                break started.elapsed();
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("after 60 s: {established}/{PEERS} established, {routes}/{expected} routes");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        let rss_after = rss_kib();
        drop(stdin);
        let _ = child.kill();
        let _ = child.wait();

        let kib_per_peer = rss_after.saturating_sub(rss_before) as f64 / PEERS as f64;
        println!(
            "peers bench: {PEERS} peers, {expected} prefixes, RSS {rss_before} KiB -> {rss_after} KiB"
        );
        println!(
            "BENCH name=peers_1000x4_converge unit=s tortie={:.3} ref=target:{TARGET_SECONDS} better=lower",
            elapsed.as_secs_f64()
        );
        println!(
            "BENCH name=peers_1000x4_memory_per_peer unit=KiB tortie={kib_per_peer:.1} ref=target:{TARGET_KIB_PER_PEER} better=lower"
        );
    });
}
