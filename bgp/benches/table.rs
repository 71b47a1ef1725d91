//! One peer sends a 100k-prefix table: time from Established until every prefix is in the
//! Loc-RIB, and RSS growth per stored route. The sender is a tortie speaker in a child
//! process (this binary re-executed), so only the receiver's memory is measured.

use ipnet::{IpNet, Ipv4Net};
use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tortie_bgp::fsm::State;
use tortie_bgp::speaker::{PeerConfig, Speaker, SpeakerConfig};

const PREFIXES: usize = 100_000;
const PORT: u16 = 21180;
const AS: u32 = 64512;
const RECEIVER: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 1);
const SENDER: Ipv4Addr = Ipv4Addr::new(127, 2, 0, 1);
const SENDER_ENV: &str = "TORTIE_BGP_TABLE_SENDER";
/// Targets from the issue, printed as the reference (no BIRD runs in this bench).
const TARGET_SECONDS: f64 = 0.2;
const TARGET_BYTES_PER_ROUTE: f64 = 150.0;

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

fn sender() {
    runtime().block_on(async {
        let speaker = Speaker::start(SpeakerConfig {
            listen: None,
            connect_retry: Duration::from_millis(200),
            ..SpeakerConfig::new(SENDER, AS)
        })
        .await
        .expect("sender starts");
        for i in 0..PREFIXES {
            let base = 0x0a00_0000u32 + ((i as u32) << 6);
            let prefix = Ipv4Net::new(Ipv4Addr::from(base), 26).expect("/26");
            speaker.originate(IpNet::V4(prefix)).expect("originate");
        }
        // Let the sender's RIB absorb the table before the session exists.
        while speaker.best_paths().await.map(|b| b.len()).unwrap_or(0) < PREFIXES {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        println!("READY");
        let mut line = String::new();
        let _ = std::io::stdin().read_line(&mut line);
        speaker
            .add_peer(PeerConfig {
                port: PORT,
                source_address: Some(IpAddr::V4(SENDER)),
                ..PeerConfig::new(IpAddr::V4(RECEIVER), AS)
            })
            .expect("sender peer");
        let _ = std::io::stdin().read_line(&mut line);
    });
}

fn main() {
    if std::env::var_os(SENDER_ENV).is_some() {
        sender();
        return;
    }
    runtime().block_on(async {
        let receiver = Speaker::start(SpeakerConfig {
            listen: Some(SocketAddr::new(IpAddr::V4(RECEIVER), PORT)),
            ..SpeakerConfig::new(RECEIVER, AS)
        })
        .await
        .expect("receiver starts");
        let sender_ip = IpAddr::V4(SENDER);
        receiver
            .add_peer(PeerConfig {
                passive: true,
                ..PeerConfig::new(sender_ip, AS)
            })
            .expect("add peer");
        let mut child = Command::new(std::env::current_exe().expect("own executable"))
            .env(SENDER_ENV, "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn sender");
        let mut stdout = BufReader::new(child.stdout.take().expect("child stdout"));
        let mut line = String::new();
        while !line.starts_with("READY") {
            line.clear();
            if stdout.read_line(&mut line).unwrap_or(0) == 0 {
                panic!("sender exited before READY");
            }
        }
        let rss_before = rss_kib();
        let mut stdin = child.stdin.take().expect("child stdin");
        stdin.write_all(b"GO\n").expect("signal sender");
        stdin.flush().expect("flush");

        let deadline = Instant::now() + Duration::from_secs(60);
        let mut established_at = None;
        let elapsed = loop {
            let status = receiver.peer(sender_ip).expect("peer exists");
            if established_at.is_none() && status.state == State::Established {
                established_at = Some(Instant::now());
            }
            if let Some(at) = established_at
                && status.prefixes_accepted as usize == PREFIXES
            {
                break at.elapsed();
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("after 60 s: {status:?}");
            }
            tokio::time::sleep(Duration::from_micros(500)).await;
        };
        let routes = receiver.best_paths().await.map(|b| b.len()).unwrap_or(0);
        assert_eq!(routes, PREFIXES, "Loc-RIB holds the whole table");
        let rss_after = rss_kib();
        drop(stdin);
        let _ = child.kill();
        let _ = child.wait();
        let bytes_per_route = (rss_after.saturating_sub(rss_before) * 1024) as f64 / PREFIXES as f64;
        println!("table bench: {PREFIXES} prefixes, RSS {rss_before} KiB -> {rss_after} KiB");
        println!(
            "BENCH name=table_100k_established_to_loc_rib unit=s tortie={:.3} ref=target:{TARGET_SECONDS} better=lower",
            elapsed.as_secs_f64()
        );
        println!(
            "BENCH name=table_100k_rss_per_route unit=bytes tortie={bytes_per_route:.0} ref=target:{TARGET_BYTES_PER_ROUTE} better=lower"
        );
    });
}
