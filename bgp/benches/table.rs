//! One peer sends a 100k-prefix table: time from Established until every prefix is in the
//! Loc-RIB, and RSS growth per stored route. The sender is a tortie speaker in a child
//! process (this binary re-executed), so only the receiver's memory is measured.
//! Reference: a BIRD 2 receiving the same feed in the same run. BIRD's Established instant
//! cannot be seen precisely from outside (birdc round trips take milliseconds), so the
//! comparison with BIRD is made from "go" (sender told to peer) to the full table, which
//! includes the TCP and OPEN exchange for both; the Established-based time is compared with
//! the target. Without BIRD installed the targets are printed instead.

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
const TARGET_ENV: &str = "TORTIE_BGP_TABLE_TARGET";
const BIRD_ADDR: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 3);
const BIRD_PORT: u16 = 21181;
/// Targets from the issue, printed as the reference (no BIRD runs in this bench).
const TARGET_SECONDS: f64 = 0.2;
const TARGET_BYTES_PER_ROUTE: f64 = 150.0;

fn rss_kib() -> u64 {
    rss_kib_of("self")
}

fn rss_kib_of(pid: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
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
        let target: SocketAddr = std::env::var(TARGET_ENV)
            .ok()
            .and_then(|t| t.parse().ok())
            .unwrap_or(SocketAddr::new(IpAddr::V4(RECEIVER), PORT));
        speaker
            .add_peer(PeerConfig {
                port: target.port(),
                source_address: Some(IpAddr::V4(SENDER)),
                ..PeerConfig::new(target.ip(), AS)
            })
            .expect("sender peer");
        let _ = std::io::stdin().read_line(&mut line);
    });
}

struct Sender {
    child: std::process::Child,
    stdin: std::process::ChildStdin,
}

/// Start the sender child, wait until its table is loaded.
fn spawn_sender(target: SocketAddr) -> Sender {
    let mut child = Command::new(std::env::current_exe().expect("own executable"))
        .env(SENDER_ENV, "1")
        .env(TARGET_ENV, target.to_string())
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
    let stdin = child.stdin.take().expect("child stdin");
    Sender { child, stdin }
}

impl Sender {
    fn go(&mut self) {
        self.stdin.write_all(b"GO\n").expect("signal sender");
        self.stdin.flush().expect("flush");
    }
}

impl Drop for Sender {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn which(program: &str) -> Option<std::path::PathBuf> {
    ["/usr/sbin", "/usr/bin", "/sbin", "/usr/local/sbin"]
        .iter()
        .map(|d| std::path::Path::new(d).join(program))
        .find(|p| p.is_file())
}

/// BIRD as the receiver: (seconds from "go" to all routes, bytes of RSS per route).
fn measure_bird() -> Option<(f64, f64)> {
    let (bird, birdc) = (which("bird")?, which("birdc")?);
    let dir = std::env::temp_dir().join(format!("tortie-bgp-table-bird-{}", std::process::id()));
    std::fs::create_dir_all(&dir).ok()?;
    let config = dir.join("bird.conf");
    std::fs::write(
        &config,
        format!(
            "router id {BIRD_ADDR};\nprotocol device {{ }}\nprotocol bgp feed {{\n  local {BIRD_ADDR} port {BIRD_PORT} as {AS};\n  neighbor {SENDER} as {AS};\n  passive on;\n  ipv4 {{ import all; export none; }};\n}}\n"
        ),
    )
    .ok()?;
    let socket = dir.join("bird.ctl");
    let mut daemon = Command::new(bird)
        .arg("-f")
        .arg("-c")
        .arg(&config)
        .arg("-s")
        .arg(&socket)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let pid = daemon.id().to_string();
    let birdc_out = |args: &[&str]| -> String {
        Command::new(&birdc)
            .arg("-s")
            .arg(&socket)
            .args(args)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    };
    let ready_deadline = Instant::now() + Duration::from_secs(10);
    while !birdc_out(&["show", "status"]).contains("Daemon is up") {
        if Instant::now() > ready_deadline {
            let _ = daemon.kill();
            let _ = daemon.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut sender = spawn_sender(SocketAddr::new(IpAddr::V4(BIRD_ADDR), BIRD_PORT));
    let rss_before = rss_kib_of(&pid);
    sender.go();
    let go = Instant::now();
    let deadline = go + Duration::from_secs(60);
    let result = loop {
        if Instant::now() > deadline {
            break None;
        }
        let count = birdc_out(&["show", "route", "count"]);
        if count.contains(&format!("{PREFIXES} of {PREFIXES} routes")) {
            let elapsed = go.elapsed().as_secs_f64();
            let rss_after = rss_kib_of(&pid);
            let per_route = (rss_after.saturating_sub(rss_before) * 1024) as f64 / PREFIXES as f64;
            break Some((elapsed, per_route));
        }
    };
    drop(sender);
    let _ = daemon.kill();
    let _ = daemon.wait();
    let _ = std::fs::remove_dir_all(&dir);
    result
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
        let mut sender = spawn_sender(SocketAddr::new(IpAddr::V4(RECEIVER), PORT));
        let rss_before = rss_kib();
        sender.go();
        let go = Instant::now();

        let deadline = Instant::now() + Duration::from_secs(60);
        let mut established_at = None;
        let (elapsed, from_go) = loop {
            let status = receiver.peer(sender_ip).expect("peer exists");
            if established_at.is_none() && status.state == State::Established {
                established_at = Some(Instant::now());
            }
            if let Some(at) = established_at
                && status.prefixes_accepted as usize == PREFIXES
            {
                break (at.elapsed(), go.elapsed());
            }
            if Instant::now() > deadline {
                panic!("after 60 s: {status:?}");
            }
            tokio::time::sleep(Duration::from_micros(500)).await;
        };
        let routes = receiver.best_paths().await.map(|b| b.len()).unwrap_or(0);
        assert_eq!(routes, PREFIXES, "Loc-RIB holds the whole table");
        let rss_after = rss_kib();
        drop(sender);
        let bytes_per_route = (rss_after.saturating_sub(rss_before) * 1024) as f64 / PREFIXES as f64;
        println!("table bench: {PREFIXES} prefixes, RSS {rss_before} KiB -> {rss_after} KiB");
        let (go_ref, memory_ref) = match measure_bird() {
            Some((seconds, bytes)) => (format!("bird:{seconds:.3}"), format!("bird:{bytes:.0}")),
            None => (
                format!("target:{TARGET_SECONDS}"),
                format!("target:{TARGET_BYTES_PER_ROUTE}"),
            ),
        };
        println!(
            "BENCH name=table_100k_established_to_loc_rib unit=s tortie={:.3} ref=target:{TARGET_SECONDS} better=lower",
            elapsed.as_secs_f64()
        );
        println!(
            "BENCH name=table_100k_go_to_loc_rib unit=s tortie={:.3} ref={go_ref} better=lower",
            from_go.as_secs_f64()
        );
        println!(
            "BENCH name=table_100k_rss_per_route unit=bytes tortie={bytes_per_route:.0} ref={memory_ref} better=lower"
        );
    });
}
