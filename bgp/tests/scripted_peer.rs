//! Runtime tests against a hand-scripted peer built from the crate's codec: route refresh,
//! RFC 7606 outcomes on a live session, 2-octet AS peers, passive peers.

use bytes::{Bytes, BytesMut};
use ipnet::IpNet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tortie_bgp::fsm::State;
use tortie_bgp::speaker::{PeerConfig, Speaker, SpeakerConfig};
use tortie_bgp::wire::{
    AsPath, AsPathSegment, Capability, DecodeContext, Message, Notification, Open, Origin,
    PathAttributes, RouteRefresh, SegmentType, Update, frame_length,
};

const PORT: u16 = 11180;
const AS: u32 = 64512;
const WAIT: Duration = Duration::from_secs(10);

fn ip(net: u8, host: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, net, host))
}

fn v4(net: u8, host: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, net, host)
}

struct ScriptedPeer {
    stream: TcpStream,
    buf: BytesMut,
    ctx: DecodeContext,
}

impl ScriptedPeer {
    async fn accept(listener: &TcpListener, ctx: DecodeContext) -> ScriptedPeer {
        let (stream, _) = tokio::time::timeout(WAIT, listener.accept())
            .await
            .unwrap()
            .unwrap();
        ScriptedPeer {
            stream,
            buf: BytesMut::new(),
            ctx,
        }
    }

    async fn send(&mut self, message: Message) {
        let mut out = BytesMut::new();
        message.encode(&mut out, &self.ctx);
        self.stream.write_all(&out).await.unwrap();
    }

    async fn recv(&mut self) -> Message {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(len) = frame_length(&self.buf).unwrap() {
                let mut frame: Bytes = self.buf.split_to(len).freeze();
                return Message::decode(&mut frame, &self.ctx).unwrap();
            }
            let n = tokio::time::timeout_at(deadline.into(), self.stream.read_buf(&mut self.buf))
                .await
                .expect("message within 10 s")
                .unwrap();
            assert!(n > 0, "tortie closed the connection");
        }
    }

    /// Receive until `want` matches, skipping KEEPALIVEs and other messages.
    async fn recv_until(&mut self, what: &str, mut want: impl FnMut(&Message) -> bool) -> Message {
        for _ in 0..1000 {
            let m = self.recv().await;
            if want(&m) {
                return m;
            }
        }
        panic!("no {what} in 1000 messages");
    }

    /// Read tortie's OPEN, answer with ours and a KEEPALIVE, wait for its KEEPALIVE.
    async fn handshake(&mut self, open: Open) -> Open {
        let Message::Open(theirs) = self.recv().await else {
            panic!("first message is not OPEN")
        };
        self.send(Message::Open(open)).await;
        self.send(Message::Keepalive).await;
        self.recv_until("KEEPALIVE", |m| *m == Message::Keepalive)
            .await;
        theirs
    }
}

fn open(asn: u32, id: Ipv4Addr, four_octet: bool) -> Open {
    let mut capabilities = vec![
        Capability::MultiProtocol { afi: 1, safi: 1 },
        Capability::RouteRefresh,
    ];
    if four_octet {
        capabilities.push(Capability::FourOctetAs(asn));
    }
    Open {
        asn,
        hold_time: 90,
        bgp_id: id,
        capabilities,
    }
}

async fn speaker(net: u8, local_as: u32) -> Speaker {
    Speaker::start(SpeakerConfig {
        listen: Some(SocketAddr::new(ip(net, 1), PORT)),
        connect_retry: Duration::from_millis(300),
        ..SpeakerConfig::new(v4(net, 1), local_as)
    })
    .await
    .unwrap()
}

fn peer_config(net: u8, remote_as: u32) -> PeerConfig {
    PeerConfig {
        port: PORT,
        source_address: Some(ip(net, 1)),
        ..PeerConfig::new(ip(net, 2), remote_as)
    }
}

fn announce(prefix: &str, asns: &[u32], next_hop: Ipv4Addr) -> Update {
    Update {
        attributes: PathAttributes {
            origin: Some(Origin::Igp),
            as_path: AsPath {
                segments: if asns.is_empty() {
                    vec![]
                } else {
                    vec![AsPathSegment {
                        kind: SegmentType::AsSequence,
                        asns: asns.to_vec(),
                    }]
                },
            },
            next_hop: Some(next_hop),
            ..Default::default()
        },
        nlri: vec![prefix.parse().unwrap()],
        ..Default::default()
    }
}

async fn has_route(speaker: &Speaker, prefix: &str) -> bool {
    let p: IpNet = prefix.parse().unwrap();
    speaker
        .best_paths()
        .await
        .unwrap()
        .iter()
        .any(|(q, _)| *q == p)
}

async fn wait_route(speaker: &Speaker, prefix: &str, present: bool) {
    let deadline = Instant::now() + WAIT;
    while has_route(speaker, prefix).await != present {
        assert!(
            Instant::now() < deadline,
            "{prefix} never became {}",
            if present { "present" } else { "absent" }
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn update_of(m: &Message) -> Option<&Update> {
    match m {
        Message::Update(u) => Some(u),
        _ => None,
    }
}

#[tokio::test]
async fn route_refresh_resends_the_adj_rib_out() {
    let listener = TcpListener::bind(SocketAddr::new(ip(20, 2), PORT))
        .await
        .unwrap();
    let a = speaker(20, AS).await;
    a.originate("10.71.1.0/26".parse().unwrap()).unwrap();
    a.add_peer(peer_config(20, AS)).unwrap();
    let mut p = ScriptedPeer::accept(&listener, DecodeContext::default()).await;
    p.handshake(open(AS, v4(20, 2), true)).await;
    let announced =
        |m: &Message| update_of(m).is_some_and(|u| u.nlri == vec!["10.71.1.0/26".parse().unwrap()]);
    p.recv_until("initial announcement", announced).await;
    p.recv_until("IPv4 End-of-RIB", |m| {
        update_of(m).is_some_and(|u| u.end_of_rib_family().is_some())
    })
    .await;
    p.send(Message::RouteRefresh(RouteRefresh {
        afi: 1,
        subtype: 0,
        safi: 1,
    }))
    .await;
    let m = p.recv_until("re-announcement", announced).await;
    let u = update_of(&m).unwrap();
    assert_eq!(u.attributes.next_hop, Some(v4(20, 1)));
    assert_eq!(u.attributes.local_pref, Some(100));
}

#[tokio::test]
async fn malformed_origin_is_treated_as_withdraw_and_session_stays_up() {
    let listener = TcpListener::bind(SocketAddr::new(ip(21, 2), PORT))
        .await
        .unwrap();
    let a = speaker(21, AS).await;
    a.add_peer(peer_config(21, AS)).unwrap();
    let mut p = ScriptedPeer::accept(&listener, DecodeContext::default()).await;
    p.handshake(open(AS, v4(21, 2), true)).await;
    p.send(Message::Update(Box::new(announce(
        "10.72.1.0/24",
        &[],
        v4(21, 2),
    ))))
    .await;
    wait_route(&a, "10.72.1.0/24", true).await;

    // Same prefix, ORIGIN value 5: RFC 7606 treat-as-withdraw, no NOTIFICATION.
    let mut bad = BytesMut::new();
    Message::Update(Box::new(announce("10.72.1.0/24", &[], v4(21, 2)))).encode(&mut bad, &p.ctx);
    let origin_value = bad.windows(3).position(|w| w == [0x40, 1, 1]).unwrap() + 3;
    bad[origin_value] = 5;
    p.stream.write_all(&bad).await.unwrap();
    wait_route(&a, "10.72.1.0/24", false).await;
    let status = a.peer(ip(21, 2)).unwrap();
    assert_eq!(status.state, State::Established);
    assert!(
        status
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("treat-as-withdraw")),
        "{status:?}"
    );

    // A prefix length of 33 hides the rest of the NLRI: session reset with 3/10.
    let mut fatal = BytesMut::new();
    Message::Update(Box::new(announce("10.73.0.0/16", &[], v4(21, 2)))).encode(&mut fatal, &p.ctx);
    let len = fatal.len();
    fatal[len - 3] = 33;
    p.stream.write_all(&fatal).await.unwrap();
    let m = p
        .recv_until("NOTIFICATION", |m| matches!(m, Message::Notification(_)))
        .await;
    assert_eq!(m, Message::Notification(Notification::new(3, 10)));
}

#[tokio::test]
async fn two_octet_peer_gets_as_trans_and_as4_path_from_four_octet_speaker() {
    let local_as = 4_200_000_000;
    let listener = TcpListener::bind(SocketAddr::new(ip(22, 2), PORT))
        .await
        .unwrap();
    let a = speaker(22, local_as).await;
    a.originate("10.74.1.0/26".parse().unwrap()).unwrap();
    a.add_peer(peer_config(22, 65001)).unwrap();
    let two_octet = DecodeContext {
        four_octet_as: false,
        ..DecodeContext::default()
    };
    let mut p = ScriptedPeer::accept(&listener, two_octet).await;
    let theirs = p.handshake(open(65001, v4(22, 2), false)).await;
    assert_eq!(theirs.asn, local_as, "real AS from the capability");

    let m = p
        .recv_until("announcement", |m| {
            update_of(m).is_some_and(|u| !u.nlri.is_empty())
        })
        .await;
    let u = update_of(&m).unwrap();
    assert_eq!(
        u.attributes.as_path.segments[0].asns,
        vec![local_as],
        "AS4_PATH merged back by the 2-octet decoder"
    );
    assert_eq!(u.attributes.local_pref, None, "no LOCAL_PREF to eBGP");

    p.send(Message::Update(Box::new(announce(
        "10.75.1.0/24",
        &[65001, 65002],
        v4(22, 2),
    ))))
    .await;
    wait_route(&a, "10.75.1.0/24", true).await;
    let best = a
        .best_paths()
        .await
        .unwrap()
        .into_iter()
        .find(|(q, _)| *q == "10.75.1.0/24".parse::<IpNet>().unwrap())
        .unwrap()
        .1;
    assert_eq!(best.attrs.path.as_path.segments[0].asns, vec![65001, 65002]);
}

#[tokio::test]
async fn open_from_wrong_as_is_answered_with_notification_2_2() {
    let listener = TcpListener::bind(SocketAddr::new(ip(23, 2), PORT))
        .await
        .unwrap();
    let a = speaker(23, AS).await;
    a.add_peer(peer_config(23, 65001)).unwrap();
    let mut p = ScriptedPeer::accept(&listener, DecodeContext::default()).await;
    let Message::Open(_) = p.recv().await else {
        panic!("no OPEN")
    };
    p.send(Message::Open(open(65099, v4(23, 2), true))).await;
    let m = p
        .recv_until("NOTIFICATION", |m| matches!(m, Message::Notification(_)))
        .await;
    assert_eq!(m, Message::Notification(Notification::new(2, 2)));
    let status = a.peer(ip(23, 2)).unwrap();
    assert!(
        status
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("2/2")),
        "{status:?}"
    );
}

#[tokio::test]
async fn passive_peer_accepts_the_connection_and_never_dials() {
    let a = speaker(24, AS).await;
    a.add_peer(PeerConfig {
        passive: true,
        ..peer_config(24, AS)
    })
    .unwrap();
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(ip(24, 2), 0)).unwrap();
    let stream = socket
        .connect(SocketAddr::new(ip(24, 1), PORT))
        .await
        .unwrap();
    let mut p = ScriptedPeer {
        stream,
        buf: BytesMut::new(),
        ctx: DecodeContext::default(),
    };
    p.handshake(open(AS, v4(24, 2), true)).await;
    let deadline = Instant::now() + WAIT;
    while a.peer(ip(24, 2)).unwrap().state != State::Established {
        assert!(Instant::now() < deadline, "passive peer never established");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn simultaneous_connections_settle_on_one_stable_session() {
    let a = speaker(25, AS).await;
    let b = Speaker::start(SpeakerConfig {
        listen: Some(SocketAddr::new(ip(25, 2), PORT)),
        connect_retry: Duration::from_millis(300),
        ..SpeakerConfig::new(v4(25, 2), AS)
    })
    .await
    .unwrap();
    a.add_peer(peer_config(25, AS)).unwrap();
    b.add_peer(PeerConfig {
        port: PORT,
        source_address: Some(ip(25, 2)),
        ..PeerConfig::new(ip(25, 1), AS)
    })
    .unwrap();
    let deadline = Instant::now() + WAIT;
    loop {
        let up = a.peer(ip(25, 2)).unwrap().state == State::Established
            && b.peer(ip(25, 1)).unwrap().state == State::Established;
        if up {
            break;
        }
        assert!(Instant::now() < deadline, "never established");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Stable: the session that won survives; uptime keeps growing past a few retry periods.
    let first = a.peer(ip(25, 2)).unwrap().uptime.unwrap();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let later = a.peer(ip(25, 2)).unwrap();
    assert_eq!(later.state, State::Established);
    assert!(
        later.uptime.unwrap() > first + Duration::from_secs(1),
        "session flapped: {later:?}"
    );
}

#[tokio::test]
async fn request_refresh_sends_route_refresh_for_each_family() {
    let listener = TcpListener::bind(SocketAddr::new(ip(26, 2), PORT))
        .await
        .unwrap();
    let a = speaker(26, AS).await;
    a.add_peer(peer_config(26, AS)).unwrap();
    let mut p = ScriptedPeer::accept(&listener, DecodeContext::default()).await;
    p.handshake(open(AS, v4(26, 2), true)).await;
    let deadline = Instant::now() + WAIT;
    while a.peer(ip(26, 2)).unwrap().state != State::Established {
        assert!(Instant::now() < deadline, "never established");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    a.request_refresh(ip(26, 2)).unwrap();
    let m = p
        .recv_until("ROUTE-REFRESH", |m| matches!(m, Message::RouteRefresh(_)))
        .await;
    assert_eq!(
        m,
        Message::RouteRefresh(RouteRefresh {
            afi: 1,
            subtype: 0,
            safi: 1
        }),
        "only IPv4 was negotiated"
    );
}

#[tokio::test]
async fn restarting_speaker_announces_restart_and_forwarding_bits_then_end_of_rib() {
    use tortie_bgp::GracefulRestartConfig;
    use tortie_bgp::wire::Afi;
    let listener = TcpListener::bind(SocketAddr::new(ip(27, 2), PORT))
        .await
        .unwrap();
    let a = Speaker::start(SpeakerConfig {
        listen: Some(SocketAddr::new(ip(27, 1), PORT)),
        graceful_restart: Some(GracefulRestartConfig {
            restart_time: 90,
            restarting: true,
            forwarding_preserved: true,
            ..GracefulRestartConfig::default()
        }),
        ..SpeakerConfig::new(v4(27, 1), AS)
    })
    .await
    .unwrap();
    a.originate("10.76.1.0/26".parse().unwrap()).unwrap();
    a.add_peer(peer_config(27, AS)).unwrap();
    let mut p = ScriptedPeer::accept(&listener, DecodeContext::default()).await;
    let mut ours = open(AS, v4(27, 2), true);
    ours.capabilities
        .push(Capability::MultiProtocol { afi: 2, safi: 1 });
    let theirs = p.handshake(ours).await;
    let gr = theirs
        .graceful_restart()
        .expect("graceful restart capability");
    assert!(gr.restart_state, "R bit set while restarting");
    assert_eq!(gr.restart_time, 90);
    assert!(gr.families.iter().all(|f| f.forwarding_preserved), "{gr:?}");
    assert_eq!(gr.families.len(), 2);
    // The table comes first, then one End-of-RIB per negotiated family.
    let mut eors = Vec::new();
    let mut announced = false;
    while eors.len() < 2 {
        let m = p.recv().await;
        if let Some(u) = update_of(&m) {
            match u.end_of_rib_family() {
                Some(afi) => {
                    assert!(
                        announced || afi == Afi::Ipv6,
                        "IPv4 End-of-RIB before the IPv4 table"
                    );
                    eors.push(afi);
                }
                None => announced |= !u.nlri.is_empty(),
            }
        }
    }
    assert!(announced);
    eors.sort();
    assert_eq!(eors, vec![Afi::Ipv4, Afi::Ipv6]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_last_speaker_handle_closes_sessions_without_notification() {
    // Dropping the handle is tortie's crash: a peer doing graceful restart must see the
    // connection close, never a Cease (which would make it flush tortie's routes). The
    // RIB task's end used to race with the peer tasks' abort; many peers widen the window.
    const PEERS: u8 = 12;
    let mut listeners = Vec::new();
    for host in 2..2 + PEERS {
        listeners.push(
            TcpListener::bind(SocketAddr::new(ip(47, host), PORT))
                .await
                .unwrap(),
        );
    }
    for round in 0..5 {
        let a = Speaker::start(SpeakerConfig {
            listen: None,
            connect_retry: Duration::from_millis(300),
            ..SpeakerConfig::new(v4(47, 1), AS)
        })
        .await
        .unwrap();
        a.originate("10.72.1.0/26".parse().unwrap()).unwrap();
        let mut peers = Vec::new();
        for (i, listener) in listeners.iter().enumerate() {
            let host = 2 + i as u8;
            a.add_peer(PeerConfig {
                port: PORT,
                source_address: Some(ip(47, 1)),
                ..PeerConfig::new(ip(47, host), AS)
            })
            .unwrap();
            let mut p = ScriptedPeer::accept(listener, DecodeContext::default()).await;
            p.handshake(open(AS, v4(47, host), true)).await;
            p.recv_until("End-of-RIB", |m| {
                update_of(m).is_some_and(|u| u.end_of_rib_family().is_some())
            })
            .await;
            peers.push(p);
        }
        drop(a);
        for (i, p) in peers.iter_mut().enumerate() {
            let deadline = Instant::now() + WAIT;
            loop {
                if let Some(len) = frame_length(&p.buf).unwrap() {
                    let mut frame: Bytes = p.buf.split_to(len).freeze();
                    let m = Message::decode(&mut frame, &p.ctx).unwrap();
                    assert!(
                        !matches!(m, Message::Notification(_)),
                        "round {round} peer {i}: dropped speaker sent {m:?}"
                    );
                    continue;
                }
                let n = tokio::time::timeout_at(deadline.into(), p.stream.read_buf(&mut p.buf))
                    .await
                    .expect("connection closed within 10 s")
                    .unwrap_or(0);
                if n == 0 {
                    break;
                }
            }
        }
    }
}

#[tokio::test]
async fn next_hop_equal_to_our_own_address_is_treated_as_withdraw() {
    let listener = TcpListener::bind(SocketAddr::new(ip(48, 2), PORT))
        .await
        .unwrap();
    let a = speaker(48, AS).await;
    a.add_peer(peer_config(48, AS)).unwrap();
    let mut p = ScriptedPeer::accept(&listener, DecodeContext::default()).await;
    p.handshake(open(AS, v4(48, 2), true)).await;
    p.send(Message::Update(Box::new(announce(
        "10.74.1.0/24",
        &[],
        v4(48, 2),
    ))))
    .await;
    wait_route(&a, "10.74.1.0/24", true).await;

    // Same prefix pointing back at the receiver (127.0.48.1): RFC 4271 §6.3 semantically
    // incorrect NEXT_HOP, RFC 7606 treat-as-withdraw, session stays up.
    p.send(Message::Update(Box::new(announce(
        "10.74.1.0/24",
        &[],
        v4(48, 1),
    ))))
    .await;
    wait_route(&a, "10.74.1.0/24", false).await;
    let status = a.peer(ip(48, 2)).unwrap();
    assert_eq!(status.state, State::Established);
    assert!(
        status
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("treat-as-withdraw") && e.contains("NEXT_HOP")),
        "{status:?}"
    );
    p.send(Message::Update(Box::new(announce(
        "10.74.2.0/24",
        &[],
        v4(48, 2),
    ))))
    .await;
    wait_route(&a, "10.74.2.0/24", true).await;
}
