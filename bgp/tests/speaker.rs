//! Runtime tests: real tortie speakers talking over 127.0.0.0/8 loopback addresses.
//!
//! Each test uses its own 127.0.N.0/24 so tests can run in parallel on one port.

use bytes::{Bytes, BytesMut};
use ipnet::IpNet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tortie_bgp::fsm::State;
use tortie_bgp::speaker::{GracefulRestartConfig, PeerConfig, Speaker, SpeakerConfig};
use tortie_bgp::wire::{Capability, DecodeContext, Message, NextHop, Open, frame_length};

const PORT: u16 = 11179;
const AS: u32 = 64512;

fn ip(net: u8, host: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, net, host))
}

fn v4(net: u8, host: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, net, host)
}

fn config(net: u8, host: u8) -> SpeakerConfig {
    SpeakerConfig {
        listen: Some(SocketAddr::new(ip(net, host), PORT)),
        connect_retry: Duration::from_millis(500),
        graceful_restart: Some(GracefulRestartConfig {
            restart_time: 30,
            ..GracefulRestartConfig::default()
        }),
        ..SpeakerConfig::new(v4(net, host), AS)
    }
}

fn peer(net: u8, local: u8, remote: u8) -> PeerConfig {
    PeerConfig {
        port: PORT,
        source_address: Some(ip(net, local)),
        ..PeerConfig::new(ip(net, remote), AS)
    }
}

fn prefix(s: &str) -> IpNet {
    s.parse().unwrap()
}

/// Poll `check` every 20 ms until it holds or `limit` passes.
async fn wait_for(what: &str, limit: Duration, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + limit;
    loop {
        if check().await {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn wait_state(speaker: &Speaker, peer: IpAddr, state: State, limit: Duration) {
    wait_for(&format!("peer {peer} {state:?}"), limit, async || {
        speaker.peer(peer).is_some_and(|s| s.state == state)
    })
    .await;
}

async fn best_next_hop(speaker: &Speaker, p: &str) -> Option<NextHop> {
    let prefix = prefix(p);
    speaker
        .best_paths()
        .await
        .unwrap()
        .into_iter()
        .find(|(q, _)| *q == prefix)
        .map(|(_, b)| b.attrs.next_hop)
}

async fn wait_route(speaker: &Speaker, p: &str, present: bool, limit: Duration) {
    wait_for(
        &format!("{p} {}", if present { "present" } else { "absent" }),
        limit,
        async || best_next_hop(speaker, p).await.is_some() == present,
    )
    .await;
}

const UP: Duration = Duration::from_secs(10);

#[tokio::test]
async fn two_speakers_exchange_ipv4_and_ipv6_prefixes_and_withdraw() {
    let a = Speaker::start(config(1, 1)).await.unwrap();
    let b = Speaker::start(config(1, 2)).await.unwrap();
    let mut changes = b.subscribe();
    a.originate(prefix("10.65.0.0/26")).unwrap();
    a.originate(prefix("fd00:65::/122")).unwrap();
    b.originate(prefix("10.66.0.0/26")).unwrap();
    // An IPv4 session needs an explicit IPv6 next hop to carry IPv6 routes.
    a.add_peer(PeerConfig {
        next_hop_v6: Some("fd00::1:1".parse().unwrap()),
        ..peer(1, 1, 2)
    })
    .unwrap();
    b.add_peer(peer(1, 2, 1)).unwrap();
    wait_state(&a, ip(1, 2), State::Established, UP).await;
    wait_state(&b, ip(1, 1), State::Established, UP).await;

    wait_route(&b, "10.65.0.0/26", true, UP).await;
    wait_route(&b, "fd00:65::/122", true, UP).await;
    wait_route(&a, "10.66.0.0/26", true, UP).await;
    assert_eq!(
        best_next_hop(&b, "10.65.0.0/26").await,
        Some(NextHop::V4(v4(1, 1)))
    );
    assert_eq!(
        best_next_hop(&b, "fd00:65::/122").await,
        Some(NextHop::V6 {
            global: "fd00::1:1".parse().unwrap(),
            link_local: None
        })
    );
    assert_eq!(
        best_next_hop(&a, "10.66.0.0/26").await,
        Some(NextHop::V4(v4(1, 2)))
    );

    // The change stream saw the IPv4 route arrive from A.
    let deadline = Instant::now() + UP;
    loop {
        let change = tokio::time::timeout_at(deadline.into(), changes.recv())
            .await
            .unwrap()
            .unwrap();
        if change.prefix == prefix("10.65.0.0/26") {
            assert_eq!(change.best.unwrap().from, Some(ip(1, 1)));
            break;
        }
    }

    a.withdraw(prefix("10.65.0.0/26")).unwrap();
    wait_route(&b, "10.65.0.0/26", false, UP).await;
    assert!(
        best_next_hop(&b, "fd00:65::/122").await.is_some(),
        "IPv6 prefix unaffected"
    );

    let status = b.peer(ip(1, 1)).unwrap();
    assert_eq!(status.prefixes_received, 1, "{status:?}");
    assert_eq!(status.prefixes_accepted, 1);
    assert_eq!(status.prefixes_advertised, 1);
    assert!(status.uptime.is_some());
    assert!(
        status.messages_in >= 3 && status.messages_out >= 3,
        "{status:?}"
    );
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test]
async fn connection_from_unconfigured_address_is_refused_and_counted() {
    let a = Speaker::start(config(2, 1)).await.unwrap();
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(ip(2, 9), 0)).unwrap();
    let mut stream = socket
        .connect(SocketAddr::new(ip(2, 1), PORT))
        .await
        .unwrap();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(UP, stream.read(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(n, 0, "connection closed without a byte");
    wait_for("refused counter", UP, async || a.refused_connections() == 1).await;
}

/// A hand-driven peer: accepts tortie's connection, completes OPEN/KEEPALIVE, then goes silent.
#[tokio::test]
async fn hold_timer_expiry_sends_notification_4_0() {
    let listener = tokio::net::TcpListener::bind(SocketAddr::new(ip(3, 2), PORT))
        .await
        .unwrap();
    let a = Speaker::start(SpeakerConfig {
        listen: None,
        ..config(3, 1)
    })
    .await
    .unwrap();
    a.add_peer(PeerConfig {
        hold_time: 3,
        ..peer(3, 1, 2)
    })
    .unwrap();
    let (mut stream, _) = tokio::time::timeout(UP, listener.accept())
        .await
        .unwrap()
        .unwrap();
    let ctx = DecodeContext::default();
    let open = Open {
        asn: AS,
        hold_time: 3,
        bgp_id: v4(3, 2),
        capabilities: vec![
            Capability::FourOctetAs(AS),
            Capability::MultiProtocol { afi: 1, safi: 1 },
        ],
    };
    let mut out = BytesMut::new();
    Message::Open(open).encode(&mut out, &ctx);
    Message::Keepalive.encode(&mut out, &ctx);
    stream.write_all(&out).await.unwrap();

    let started = Instant::now();
    let mut buf = BytesMut::new();
    let notification = loop {
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read_buf(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "connection closed before a NOTIFICATION");
        let mut found = None;
        while let Some(len) = frame_length(&buf).unwrap() {
            let mut frame: Bytes = buf.split_to(len).freeze();
            if let Message::Notification(n) = Message::decode(&mut frame, &ctx).unwrap() {
                found = Some(n);
            }
        }
        if let Some(n) = found {
            break n;
        }
    };
    assert_eq!((notification.code, notification.subcode), (4, 0));
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(2) && waited < Duration::from_secs(6),
        "hold timer fired after {waited:?}"
    );
    let status = a.peer(ip(3, 2)).unwrap();
    assert!(
        status
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("4/0")),
        "{status:?}"
    );
}

fn md5_supported() -> bool {
    // Kernels without CONFIG_TCP_MD5SIG reject the option; skip rather than fail there.
    let socket = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let fd = std::os::fd::AsRawFd::as_raw_fd(&socket);
    let mut sig = [0u8; 216];
    sig[0] = libc::AF_INET as u8;
    sig[4..8].copy_from_slice(&[127, 0, 0, 1]);
    sig[130] = 3;
    sig[136..139].copy_from_slice(b"abc");
    // SAFETY: sig is a correctly sized struct tcp_md5sig image.
    unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_MD5SIG,
            sig.as_ptr().cast(),
            sig.len() as u32,
        ) == 0
    }
}

#[tokio::test]
async fn md5_matching_passwords_establish() {
    if !md5_supported() {
        eprintln!("kernel lacks TCP-MD5; skipping");
        return;
    }
    let a = Speaker::start(config(4, 1)).await.unwrap();
    let b = Speaker::start(config(4, 2)).await.unwrap();
    a.add_peer(PeerConfig {
        md5_password: Some("s3cret".into()),
        ..peer(4, 1, 2)
    })
    .unwrap();
    b.add_peer(PeerConfig {
        md5_password: Some("s3cret".into()),
        ..peer(4, 2, 1)
    })
    .unwrap();
    wait_state(&a, ip(4, 2), State::Established, UP).await;
    wait_state(&b, ip(4, 1), State::Established, UP).await;
}

#[tokio::test]
async fn md5_mismatch_never_establishes() {
    if !md5_supported() {
        eprintln!("kernel lacks TCP-MD5; skipping");
        return;
    }
    let a = Speaker::start(config(5, 1)).await.unwrap();
    let b = Speaker::start(config(5, 2)).await.unwrap();
    a.add_peer(PeerConfig {
        md5_password: Some("one".into()),
        ..peer(5, 1, 2)
    })
    .unwrap();
    b.add_peer(PeerConfig {
        md5_password: Some("two".into()),
        ..peer(5, 2, 1)
    })
    .unwrap();
    // Segments with a wrong signature are dropped by the kernel: nothing may ever get past Active/Connect.
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        for (s, p) in [(&a, ip(5, 2)), (&b, ip(5, 1))] {
            let state = s.peer(p).unwrap().state;
            assert!(
                matches!(state, State::Idle | State::Connect | State::Active),
                "{p} reached {state:?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn route_reflector_passes_routes_between_two_clients() {
    let rr = Speaker::start(config(6, 1)).await.unwrap();
    let c1 = Speaker::start(config(6, 2)).await.unwrap();
    let c2 = Speaker::start(config(6, 3)).await.unwrap();
    rr.add_peer(PeerConfig {
        route_reflector_client: true,
        ..peer(6, 1, 2)
    })
    .unwrap();
    rr.add_peer(PeerConfig {
        route_reflector_client: true,
        ..peer(6, 1, 3)
    })
    .unwrap();
    c1.add_peer(peer(6, 2, 1)).unwrap();
    c2.add_peer(peer(6, 3, 1)).unwrap();
    c1.originate(prefix("10.67.1.0/26")).unwrap();
    wait_route(&c2, "10.67.1.0/26", true, UP).await;
    let (_, best) = c2
        .best_paths()
        .await
        .unwrap()
        .into_iter()
        .find(|(p, _)| *p == prefix("10.67.1.0/26"))
        .unwrap();
    assert_eq!(best.from, Some(ip(6, 1)), "learned via the reflector");
    assert_eq!(
        best.attrs.next_hop,
        NextHop::V4(v4(6, 2)),
        "next hop of the originating client"
    );
    assert_eq!(best.attrs.path.originator_id, Some(v4(6, 2)));
    assert_eq!(best.attrs.path.cluster_list, vec![v4(6, 1)]);
    // The originator does not get its own route back.
    assert_eq!(c1.peer(ip(6, 1)).unwrap().prefixes_received, 0);
}

#[tokio::test]
async fn graceful_restart_keeps_stale_routes_then_sweeps_after_end_of_rib() {
    let a = Speaker::start(config(7, 1)).await.unwrap();
    a.add_peer(peer(7, 1, 2)).unwrap();
    let b = Speaker::start(config(7, 2)).await.unwrap();
    b.originate(prefix("10.68.1.0/26")).unwrap();
    b.originate(prefix("10.68.2.0/26")).unwrap();
    b.add_peer(peer(7, 2, 1)).unwrap();
    wait_route(&a, "10.68.1.0/26", true, UP).await;
    wait_route(&a, "10.68.2.0/26", true, UP).await;

    // B crashes: its sockets close without a NOTIFICATION.
    drop(b);
    wait_for("A notices B is gone", UP, async || {
        a.peer(ip(7, 2))
            .is_some_and(|s| s.state != State::Established)
    })
    .await;
    assert!(
        best_next_hop(&a, "10.68.1.0/26").await.is_some(),
        "stale route kept"
    );
    assert!(
        best_next_hop(&a, "10.68.2.0/26").await.is_some(),
        "stale route kept"
    );

    // B comes back restarting, originating only one of the two prefixes before peering.
    let mut restarted = config(7, 2);
    if let Some(gr) = restarted.graceful_restart.as_mut() {
        gr.restarting = true;
    }
    let b = Speaker::start(restarted).await.unwrap();
    b.originate(prefix("10.68.1.0/26")).unwrap();
    b.add_peer(peer(7, 2, 1)).unwrap();
    wait_route(&a, "10.68.2.0/26", false, UP).await;
    assert!(
        best_next_hop(&a, "10.68.1.0/26").await.is_some(),
        "refreshed route survives the sweep"
    );
    wait_state(&a, ip(7, 2), State::Established, UP).await;
}

#[tokio::test]
async fn graceful_restart_helper_drops_stale_routes_when_restart_time_runs_out() {
    let a = Speaker::start(config(8, 1)).await.unwrap();
    a.add_peer(peer(8, 1, 2)).unwrap();
    let mut short = config(8, 2);
    if let Some(gr) = short.graceful_restart.as_mut() {
        gr.restart_time = 1;
    }
    let b = Speaker::start(short).await.unwrap();
    b.originate(prefix("10.69.1.0/26")).unwrap();
    b.add_peer(peer(8, 2, 1)).unwrap();
    wait_route(&a, "10.69.1.0/26", true, UP).await;
    drop(b);
    wait_for("A notices B is gone", UP, async || {
        a.peer(ip(8, 2))
            .is_some_and(|s| s.state != State::Established)
    })
    .await;
    let gone_at = Instant::now();
    wait_route(&a, "10.69.1.0/26", false, Duration::from_secs(5)).await;
    assert!(
        gone_at.elapsed() >= Duration::from_millis(500),
        "kept until the 1 s restart time ran out"
    );
}

#[tokio::test]
async fn removing_a_peer_sends_cease_and_withdraws_its_routes() {
    let a = Speaker::start(config(9, 1)).await.unwrap();
    let b = Speaker::start(config(9, 2)).await.unwrap();
    a.add_peer(peer(9, 1, 2)).unwrap();
    b.add_peer(peer(9, 2, 1)).unwrap();
    b.originate(prefix("10.70.1.0/26")).unwrap();
    wait_route(&a, "10.70.1.0/26", true, UP).await;
    b.remove_peer(ip(9, 1)).unwrap();
    // Cease is not graceful: A drops the routes at once instead of keeping them stale.
    wait_route(&a, "10.70.1.0/26", false, Duration::from_secs(3)).await;
    let status = a.peer(ip(9, 2)).unwrap();
    assert!(
        status
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("6/")),
        "{status:?}"
    );
}

#[tokio::test]
async fn ipv6_session_carries_ipv6_routes_with_the_session_address_as_next_hop() {
    let lo6: IpAddr = "::1".parse().unwrap();
    if std::net::TcpListener::bind((lo6, 0)).is_err() {
        eprintln!("no IPv6 loopback; skipping");
        return;
    }
    let speaker_on = |port: u16, id: Ipv4Addr| SpeakerConfig {
        listen: Some(SocketAddr::new(lo6, port)),
        connect_retry: Duration::from_millis(500),
        ..SpeakerConfig::new(id, AS)
    };
    let a = Speaker::start(speaker_on(11183, v4(10, 1))).await.unwrap();
    let b = Speaker::start(speaker_on(11184, v4(10, 2))).await.unwrap();
    // Both ends are ::1, so only one side dials (the other one's listener identifies it by address).
    a.add_peer(PeerConfig {
        port: 11184,
        md5_password: None,
        ..PeerConfig::new(lo6, AS)
    })
    .unwrap();
    b.add_peer(PeerConfig {
        passive: true,
        ..PeerConfig::new(lo6, AS)
    })
    .unwrap();
    a.originate(prefix("fd00:82::/122")).unwrap();
    a.originate(prefix("10.82.0.0/26")).unwrap();
    wait_route(&b, "fd00:82::/122", true, UP).await;
    assert_eq!(
        best_next_hop(&b, "fd00:82::/122").await,
        Some(NextHop::V6 {
            global: "::1".parse().unwrap(),
            link_local: None
        })
    );
    assert_eq!(
        best_next_hop(&b, "10.82.0.0/26").await,
        None,
        "no IPv4 next hop on an IPv6 session without next_hop_v4"
    );
}

#[tokio::test]
async fn shutdown_releases_the_listening_port_for_a_new_speaker() {
    // The agent restarts its speaker when the AS or router id changes: the new one must bind
    // the same address the moment the old one's shutdown returns.
    let first = Speaker::start(config(40, 1)).await.unwrap();
    first.shutdown().await;
    let second = Speaker::start(config(40, 1)).await;
    assert!(
        second.is_ok(),
        "rebinding after shutdown: {:?}",
        second.err()
    );
}
