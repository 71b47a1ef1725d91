//! Interop smoke test with a real BIRD 2 on loopback addresses; skipped when `bird` is not
//! installed. (The full interop matrix lives in the e2e test bed.)

use ipnet::IpNet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tortie_bgp::fsm::State;
use tortie_bgp::{NextHop, PeerConfig, Speaker, SpeakerConfig};

const TORTIE_PORT: u16 = 11181;
const BIRD_PORT: u16 = 11191;
const WAIT: Duration = Duration::from_secs(20);

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .chain(["/usr/sbin", "/sbin"])
        .map(|dir| PathBuf::from(dir).join(program))
        .find(|p| p.is_file())
}

/// A BIRD process in the foreground, killed (by its own pid) when dropped.
struct Bird {
    child: Child,
    socket: PathBuf,
    birdc: PathBuf,
    dir: PathBuf,
}

impl Bird {
    fn start(bird: PathBuf, birdc: PathBuf) -> Bird {
        let dir = std::env::temp_dir().join(format!("tortie-bgp-bird-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("bird.conf");
        std::fs::write(
            &config,
            format!(
                r#"router id 127.0.31.2;
protocol device {{ }}
protocol static s4 {{ ipv4; route 10.91.1.0/24 blackhole; }}
protocol static s6 {{ ipv6; route fd00:91::/64 blackhole; }}
protocol bgp tortie {{
  local 127.0.31.2 port {BIRD_PORT} as 64512;
  neighbor 127.0.31.1 port {TORTIE_PORT} as 64512;
  graceful restart on;
  ipv4 {{ import all; export all; next hop self; }};
  ipv6 {{ import all; export all; next hop address fd00::31:2; }};
}}
"#
            ),
        )
        .unwrap();
        let socket = dir.join("bird.ctl");
        let child = Command::new(bird)
            .arg("-f")
            .arg("-c")
            .arg(&config)
            .arg("-s")
            .arg(&socket)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        Bird {
            child,
            socket,
            birdc,
            dir,
        }
    }

    fn routes(&self) -> String {
        let out = Command::new(&self.birdc)
            .arg("-s")
            .arg(&self.socket)
            .args(["show", "route", "protocol", "tortie"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Bird {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn until(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn best(speaker: &Speaker, prefix: &str) -> Option<NextHop> {
    let prefix: IpNet = prefix.parse().unwrap();
    speaker
        .best_paths()
        .await
        .unwrap()
        .into_iter()
        .find(|(p, _)| *p == prefix)
        .map(|(_, b)| b.attrs.next_hop)
}

#[tokio::test]
async fn bird_exchanges_ipv4_and_ipv6_routes_and_sees_withdrawal() {
    let (Some(bird), Some(birdc)) = (which("bird"), which("birdc")) else {
        eprintln!("bird not installed; skipping");
        return;
    };
    let bird = Bird::start(bird, birdc);
    let tortie_ip = IpAddr::V4(Ipv4Addr::new(127, 0, 31, 1));
    let bird_ip = IpAddr::V4(Ipv4Addr::new(127, 0, 31, 2));
    let speaker = Speaker::start(SpeakerConfig {
        listen: Some(SocketAddr::new(tortie_ip, TORTIE_PORT)),
        connect_retry: Duration::from_millis(500),
        ..SpeakerConfig::new(Ipv4Addr::new(127, 0, 31, 1), 64512)
    })
    .await
    .unwrap();
    speaker.originate("10.81.0.0/26".parse().unwrap()).unwrap();
    speaker.originate("fd00:81::/122".parse().unwrap()).unwrap();
    speaker
        .add_peer(PeerConfig {
            port: BIRD_PORT,
            source_address: Some(tortie_ip),
            next_hop_v6: Some("fd00::31:1".parse().unwrap()),
            ..PeerConfig::new(bird_ip, 64512)
        })
        .unwrap();
    until("session with BIRD", async || {
        speaker
            .peer(bird_ip)
            .is_some_and(|s| s.state == State::Established)
    })
    .await;
    until("BIRD's IPv4 route", async || {
        best(&speaker, "10.91.1.0/24").await.is_some()
    })
    .await;
    until("BIRD's IPv6 route", async || {
        best(&speaker, "fd00:91::/64").await.is_some()
    })
    .await;
    assert_eq!(
        best(&speaker, "10.91.1.0/24").await,
        Some(NextHop::V4(Ipv4Addr::new(127, 0, 31, 2)))
    );
    assert_eq!(
        best(&speaker, "fd00:91::/64").await,
        Some(NextHop::V6 {
            global: "fd00::31:2".parse().unwrap(),
            link_local: None
        })
    );
    until("tortie's routes in BIRD", async || {
        let routes = bird.routes();
        routes.contains("10.81.0.0/26") && routes.contains("fd00:81::/122")
    })
    .await;
    speaker.withdraw("10.81.0.0/26".parse().unwrap()).unwrap();
    until("withdrawal in BIRD", async || {
        !bird.routes().contains("10.81.0.0/26")
    })
    .await;
    assert!(bird.routes().contains("fd00:81::/122"));
    speaker.shutdown().await;
}
