//! Malformed UPDATEs from a real ExaBGP (4.2) to tortie, with the RFC 7606 outcome asserted
//! for each: treat-as-withdraw keeps the session up and removes the prefix (announced
//! correctly first, so the withdrawal is visible); a malformed MP_REACH_NLRI resets the
//! session with NOTIFICATION 3/9.
//!
//! ExaBGP's `attribute [ 0xCODE 0xFLAGS 0xDATA ]` replaces the attribute ExaBGP would
//! generate for that code, which is how the bad ORIGIN, ORIGIN length and AS_PATH segment
//! are sent. ExaBGP always fills in ORIGIN, AS_PATH and NEXT_HOP itself, so the
//! missing-mandatory case comes from a hand-written peer using tortie's own codec.

#[path = "bgp_interop_support.rs"]
mod support;

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use support::*;
use tortie_bgp::PeerConfig;
use tortie_bgp::wire::{
    Capability, DecodeContext, Message, Open, Origin, PathAttributes, Update, frame_length,
};
use tortie_e2e::Node;
use tortie_e2e::daemons::Exabgp;

struct Setup {
    tortie: TortieNode,
    exa: Exabgp,
    peer: IpAddr,
    /// ExaBGP's address, the next hop of its well-formed announcements.
    next_hop: String,
}

fn setup(tn: &Node, pn: &Node) -> Setup {
    let exa = Exabgp::start(
        &pn.ns,
        &format!(
            "neighbor {t} {{\n  router-id {p};\n  local-address {p};\n  local-as {CALICO_AS};\n  \
             peer-as {CALICO_AS};\n  family {{ ipv4 unicast; ipv6 unicast; }}\n  \
             api {{ processes [ ctl ]; }}\n}}\n",
            t = tn.addr,
            p = pn.addr
        ),
    )
    .unwrap();
    let tortie = TortieNode::start(tn, speaker_config(tn, CALICO_AS));
    tortie.add_peer(PeerConfig::new(v4(pn), CALICO_AS));
    tortie.wait_established(v4(pn), || exa.log());
    Setup {
        tortie,
        exa,
        peer: v4(pn),
        next_hop: pn.addr.to_string(),
    }
}

impl Setup {
    fn announce(&self, prefix: &str, rest: &str) {
        self.exa
            .send(&format!("announce route {prefix} {rest}"))
            .unwrap();
    }

    /// Announces `prefix` correctly and waits for it in tortie's Loc-RIB.
    fn announce_good(&self, prefix: &str) {
        self.announce(prefix, &format!("next-hop {}", self.next_hop));
        self.tortie.wait_route(prefix, self.peer);
    }

    /// Re-announces a known prefix with a malformed UPDATE and asserts treat-as-withdraw:
    /// the prefix leaves the Loc-RIB, the error is recorded, and the session stays up
    /// (a later correct announcement still arrives on the same session).
    fn assert_treat_as_withdraw(&self, prefix: &str, malformed: &str, error_names: &str) {
        self.announce_good(prefix);
        let uptime_before = self.tortie.status(self.peer).uptime;
        self.announce(prefix, malformed);
        self.tortie.wait_no_route(prefix, WAIT);
        let status = self.tortie.status(self.peer);
        let error = status.last_error.clone().unwrap_or_default();
        assert!(
            error.starts_with("treat-as-withdraw") && error.contains(error_names),
            "expected treat-as-withdraw naming {error_names:?}: {status:?}\n{}",
            self.exa.log()
        );
        assert!(self.tortie.established(self.peer), "{status:?}");
        assert!(
            status.uptime >= uptime_before,
            "the session restarted: {status:?}"
        );
        self.announce_good("10.239.0.0/24");
        assert!(self.tortie.status(self.peer).uptime >= uptime_before);
    }
}

#[test]
fn origin_with_bad_length_is_treated_as_withdraw() {
    let topo = pair_topology(&[]);
    let s = setup(topo.node("tortie"), topo.node("peer"));
    // ORIGIN with two octets of value.
    s.assert_treat_as_withdraw(
        "10.230.1.0/24",
        &format!("next-hop {} attribute [ 0x01 0x40 0x0000 ]", s.next_hop),
        "length",
    );
}

#[test]
fn origin_with_undefined_value_is_treated_as_withdraw() {
    let topo = pair_topology(&[]);
    let s = setup(topo.node("tortie"), topo.node("peer"));
    s.assert_treat_as_withdraw(
        "10.230.2.0/24",
        &format!("next-hop {} attribute [ 0x01 0x40 0x05 ]", s.next_hop),
        "ORIGIN",
    );
}

#[test]
fn as_path_with_undefined_segment_type_is_treated_as_withdraw() {
    let topo = pair_topology(&[]);
    let s = setup(topo.node("tortie"), topo.node("peer"));
    // Segment type 5 (undefined), one 4-octet ASN (65000).
    s.assert_treat_as_withdraw(
        "10.230.3.0/24",
        &format!(
            "next-hop {} attribute [ 0x02 0x40 0x05010000fde8 ]",
            s.next_hop
        ),
        "AS_PATH",
    );
}

#[test]
fn next_hop_zero_is_treated_as_withdraw() {
    let topo = pair_topology(&[]);
    let s = setup(topo.node("tortie"), topo.node("peer"));
    s.assert_treat_as_withdraw("10.230.4.0/24", "next-hop 0.0.0.0", "NEXT_HOP");
}

#[test]
fn next_hop_equal_to_tortie_own_address_is_treated_as_withdraw() {
    let topo = pair_topology(&[]);
    let tn = topo.node("tortie");
    let s = setup(tn, topo.node("peer"));
    // RFC 4271 §6.3: a NEXT_HOP that is the receiver's own address is semantically wrong.
    s.assert_treat_as_withdraw(
        "10.230.5.0/24",
        &format!("next-hop {}", tn.addr),
        "NEXT_HOP",
    );
}

#[test]
fn malformed_mp_reach_resets_the_session_with_notification_3_9() {
    let topo = pair_topology(&[]);
    let s = setup(topo.node("tortie"), topo.node("peer"));
    s.announce_good("10.230.6.0/24");
    let sent_before = s.tortie.status(s.peer).messages_out;
    let before = Instant::now();
    // MP_REACH_NLRI (optional, non-transitive) cut short after the AFI: RFC 7606 §7.11 says
    // session reset.
    s.announce(
        "10.230.7.0/24",
        &format!("next-hop {} attribute [ 0x0e 0x80 0x0001 ]", s.next_hop),
    );
    wait_true(
        "tortie resets the session with NOTIFICATION 3/9",
        WAIT,
        || {
            s.tortie
                .status(s.peer)
                .last_error
                .is_some_and(|e| e.starts_with("sent NOTIFICATION 3/9"))
        },
        || format!("{:?}\n{}", s.tortie.status(s.peer), s.exa.log()),
    );
    let status = s.tortie.status(s.peer);
    assert!(status.messages_out > sent_before, "{status:?}");
    // The session that was up before the UPDATE is gone: down now, or a younger one
    // (ExaBGP reconnects at once).
    assert!(
        status.uptime.is_none_or(|up| up < before.elapsed()),
        "the session survived: {status:?}"
    );
    assert!(s.tortie.best("10.230.7.0/24").is_none());
}

/// A minimal hand-written BGP peer over a socket made in the peer node's namespace.
struct RawPeer {
    stream: TcpStream,
    buf: Vec<u8>,
    ctx: DecodeContext,
}

impl RawPeer {
    fn send(&mut self, message: Message) {
        // BytesMut, named by inference (the e2e crate does not depend on `bytes`).
        let mut out = Default::default();
        message.encode(&mut out, &self.ctx);
        self.stream.write_all(&out).unwrap();
    }

    fn recv(&mut self) -> Message {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(len) = frame_length(&self.buf).unwrap() {
                let mut frame: &[u8] = &self.buf[..len];
                let message = Message::decode(&mut frame, &self.ctx).unwrap();
                self.buf.drain(..len);
                return message;
            }
            assert!(Instant::now() < deadline, "no message from tortie");
            let mut chunk = [0u8; 4096];
            let n = self.stream.read(&mut chunk).unwrap();
            assert!(n > 0, "tortie closed the connection");
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

fn update(prefix: &str, origin: Option<Origin>, next_hop: std::net::Ipv4Addr) -> Message {
    Message::Update(Box::new(Update {
        attributes: PathAttributes {
            origin,
            next_hop: Some(next_hop),
            local_pref: Some(100),
            ..Default::default()
        },
        nlri: vec![prefix.parse().unwrap()],
        ..Default::default()
    }))
}

#[test]
fn update_missing_origin_is_treated_as_withdraw() {
    let topo = pair_topology(&[]);
    let (tn, pn) = (topo.node("tortie"), topo.node("peer"));
    let tortie = TortieNode::start(tn, speaker_config(tn, CALICO_AS));
    tortie.add_peer(PeerConfig {
        passive: true,
        ..PeerConfig::new(v4(pn), CALICO_AS)
    });
    let target = SocketAddr::new(v4(tn), 179);
    let stream = pn
        .ns
        .enter(|| TcpStream::connect_timeout(&target, Duration::from_secs(5)))
        .unwrap()
        .unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(1)))
        .unwrap();
    let mut peer = RawPeer {
        stream,
        buf: Vec::new(),
        ctx: DecodeContext::default(),
    };
    peer.send(Message::Open(Open {
        asn: CALICO_AS,
        hold_time: 90,
        bgp_id: pn.addr,
        capabilities: vec![
            Capability::MultiProtocol { afi: 1, safi: 1 },
            Capability::FourOctetAs(CALICO_AS),
        ],
    }));
    assert!(matches!(peer.recv(), Message::Open(_)));
    peer.send(Message::Keepalive);
    tortie.wait_established(v4(pn), String::new);

    peer.send(update("10.230.8.0/24", Some(Origin::Igp), pn.addr));
    tortie.wait_route("10.230.8.0/24", v4(pn));
    peer.send(update("10.230.8.0/24", None, pn.addr));
    tortie.wait_no_route("10.230.8.0/24", WAIT);
    let status = tortie.status(v4(pn));
    assert!(
        status
            .last_error
            .as_deref()
            .is_some_and(|e| e.starts_with("treat-as-withdraw")),
        "{status:?}"
    );
    assert!(tortie.established(v4(pn)), "{status:?}");
    peer.send(update("10.230.9.0/24", Some(Origin::Igp), pn.addr));
    tortie.wait_route("10.230.9.0/24", v4(pn));
}
