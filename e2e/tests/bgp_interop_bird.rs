//! tortie-bgp against a real BIRD 2 in the neighbouring namespace: prefixes both ways, route
//! refresh, hold timer expiry, graceful restart in both directions, TCP-MD5, and route
//! reflection (tortie as reflector between two BIRDs, and as client of a BIRD reflector).
//!
//! Sessions are iBGP in AS 64512 as Calico runs them; one IPv4 session carries both families
//! (tortie's IPv6 routes use `next_hop_v6`, BIRD's use `next hop address`).

#[path = "bgp_interop_support.rs"]
mod support;

use std::time::Duration;

use support::*;
use tortie_bgp::{PeerConfig, SessionState};
use tortie_e2e::daemons::Bird;
use tortie_e2e::{Node, wait_for};

/// A BIRD config: static blackhole routes to originate plus the given `protocol bgp` blocks.
/// Packet tracing goes to the log so tests can see ROUTE-REFRESH and NOTIFICATION traffic.
fn bird_conf(node: &Node, routes4: &[&str], routes6: &[&str], bgp: &str) -> String {
    let mut c = format!(
        "router id {};\nlog stderr all;\nprotocol device {{ scan time 1; }}\n",
        node.addr
    );
    c.push_str("protocol static s4 { ipv4;");
    for r in routes4 {
        c.push_str(&format!(" route {r} blackhole;"));
    }
    c.push_str(" }\nprotocol static s6 { ipv6;");
    for r in routes6 {
        c.push_str(&format!(" route {r} blackhole;"));
    }
    c.push_str(" }\n");
    c.push_str(bgp);
    c
}

/// A `protocol bgp` block towards `neighbor` (iBGP 64512), both families on one IPv4 session;
/// BIRD's own routes get its addresses as next hops.
fn bird_bgp(name: &str, me: &Node, neighbor: &Node, extra: &str) -> String {
    let next_hops = (
        "next hop self;".to_owned(),
        format!("next hop address {};", me.addr6),
    );
    bird_bgp_block(name, me, neighbor, extra, next_hops)
}

/// A reflector's `protocol bgp` block: next hops of reflected routes are left alone.
fn bird_reflector_bgp(name: &str, me: &Node, client: &Node) -> String {
    bird_bgp_block(
        name,
        me,
        client,
        "rr client;",
        (String::new(), String::new()),
    )
}

fn bird_bgp_block(
    name: &str,
    me: &Node,
    neighbor: &Node,
    extra: &str,
    (next_hop4, next_hop6): (String, String),
) -> String {
    format!(
        "protocol bgp {name} {{\n  local {l} as {CALICO_AS};\n  neighbor {n} as {CALICO_AS};\n  \
         direct;\n  connect retry time 1;\n  error wait time 1, 3;\n  debug {{ states, packets }};\n  \
         {extra}\n  ipv4 {{ import all; export all; {next_hop4} gateway direct; }};\n  \
         ipv6 {{ import all; export all; {next_hop6} gateway direct; }};\n}}\n",
        l = me.addr,
        n = neighbor.addr,
    )
}

fn bird_log(bird: &Bird) -> String {
    format!(
        "{}\n--- log tail ---\n{}",
        bird.birdc(&["show", "protocols", "all"])
            .unwrap_or_default(),
        bird.dir.tail("bird.log", 30)
    )
}

/// BIRD's routes for `prefix` (empty when it has none).
fn bird_route(bird: &Bird, prefix: &str) -> String {
    bird.birdc(&["show", "route", "all", prefix])
        .unwrap_or_default()
}

fn bird_has(bird: &Bird, prefix: &str) -> bool {
    bird_route(bird, prefix).contains(&format!("{prefix} "))
}

fn bird_has_from(bird: &Bird, prefix: &str, protocol: &str) -> bool {
    bird.birdc(&["show", "route", "protocol", protocol])
        .unwrap_or_default()
        .contains(&format!("{prefix} "))
}

fn bird_log_text(bird: &Bird) -> String {
    std::fs::read_to_string(bird.dir.file("bird.log")).unwrap_or_default()
}

#[test]
fn bird_exchanges_ipv4_and_ipv6_prefixes_and_withdrawals() {
    let topo = pair_topology(&[]);
    let (tn, pn) = (topo.node("tortie"), topo.node("peer"));
    let bird = Bird::start(
        &pn.ns,
        &bird_conf(
            pn,
            &["10.211.1.0/24", "10.211.2.0/24"],
            &["fd11:211:1::/64"],
            &bird_bgp("tortie", pn, tn, ""),
        ),
    )
    .unwrap();
    let tortie = TortieNode::start(tn, speaker_config(tn, CALICO_AS));
    tortie.originate("10.65.1.0/26");
    tortie.originate("fd65:1::/122");
    tortie.add_peer(peer_v4(tn, pn, CALICO_AS));
    tortie.wait_established(v4(pn), || bird_log(&bird));

    let r4 = tortie.wait_route("10.211.1.0/24", v4(pn));
    assert_eq!(ipv4(&r4.attrs.next_hop), Some(pn.addr));
    let r6 = tortie.wait_route("fd11:211:1::/64", v4(pn));
    assert_eq!(global_v6(&r6.attrs.next_hop), Some(pn.addr6));

    wait_true(
        "BIRD learns tortie's IPv4 and IPv6 prefixes",
        WAIT,
        || {
            bird_has_from(&bird, "10.65.1.0/26", "tortie")
                && bird_has_from(&bird, "fd65:1::/122", "tortie")
        },
        || bird_log(&bird),
    );
    let seen6 = bird_route(&bird, "fd65:1::/122");
    assert!(
        seen6.contains(&format!("BGP.next_hop: {}", tn.addr6)),
        "BIRD's view of tortie's IPv6 route: {seen6}"
    );
    let seen4 = bird_route(&bird, "10.65.1.0/26");
    assert!(
        seen4.contains(&format!("BGP.next_hop: {}", tn.addr)),
        "BIRD's view of tortie's IPv4 route: {seen4}"
    );

    // tortie withdraws one prefix per family; BIRD withdraws one of its own.
    tortie.withdraw("10.65.1.0/26");
    tortie.withdraw("fd65:1::/122");
    wait_true(
        "BIRD sees tortie's withdrawals",
        WAIT,
        || !bird_has(&bird, "10.65.1.0/26") && !bird_has(&bird, "fd65:1::/122"),
        || bird_log(&bird),
    );
    bird.configure(&bird_conf(
        pn,
        &["10.211.1.0/24"],
        &["fd11:211:1::/64"],
        &bird_bgp("tortie", pn, tn, ""),
    ))
    .unwrap();
    tortie.wait_no_route("10.211.2.0/24", WAIT);
    assert!(tortie.best("10.211.1.0/24").is_some());
    assert!(tortie.established(v4(pn)));
}

#[test]
fn bird_route_refresh_in_both_directions() {
    let topo = pair_topology(&[]);
    let (tn, pn) = (topo.node("tortie"), topo.node("peer"));
    // A long hold time keeps KEEPALIVEs out of the message counts compared below.
    let bird = Bird::start(
        &pn.ns,
        &bird_conf(
            pn,
            &["10.211.1.0/24"],
            &[],
            &bird_bgp("tortie", pn, tn, "hold time 240;"),
        ),
    )
    .unwrap();
    let tortie = TortieNode::start(tn, speaker_config(tn, CALICO_AS));
    tortie.originate("10.65.1.0/26");
    tortie.add_peer(PeerConfig {
        hold_time: 240,
        ..peer_v4(tn, pn, CALICO_AS)
    });
    tortie.wait_established(v4(pn), || bird_log(&bird));
    tortie.wait_route("10.211.1.0/24", v4(pn));
    wait_true(
        "BIRD learns 10.65.1.0/26",
        WAIT,
        || bird_has_from(&bird, "10.65.1.0/26", "tortie"),
        || bird_log(&bird),
    );

    // tortie asks: BIRD logs the ROUTE-REFRESH and re-sends its table.
    let before = tortie.status(v4(pn)).messages_in;
    let refreshes_before = count_in(&bird_log_text(&bird), "Got ROUTE-REFRESH");
    tortie.speaker().request_refresh(v4(pn)).unwrap();
    wait_true(
        "BIRD receives tortie's ROUTE-REFRESH",
        WAIT,
        || count_in(&bird_log_text(&bird), "Got ROUTE-REFRESH") > refreshes_before,
        || bird_log(&bird),
    );
    wait_true(
        "BIRD re-sends its routes to tortie",
        WAIT,
        || tortie.status(v4(pn)).messages_in > before,
        || format!("{:?}\n{}", tortie.status(v4(pn)), bird_log(&bird)),
    );
    assert!(tortie.best("10.211.1.0/24").is_some());

    // BIRD asks (`reload in`): tortie re-sends, BIRD's import counter grows.
    let out_before = tortie.status(v4(pn)).messages_out;
    let sent_before = count_in(&bird_log_text(&bird), "Sending ROUTE-REFRESH");
    bird.birdc(&["reload", "in", "tortie"]).unwrap();
    wait_true(
        "BIRD sends a ROUTE-REFRESH",
        WAIT,
        || count_in(&bird_log_text(&bird), "Sending ROUTE-REFRESH") > sent_before,
        || bird_log(&bird),
    );
    wait_true(
        "tortie re-sends its routes",
        WAIT,
        || tortie.status(v4(pn)).messages_out > out_before,
        || format!("{:?}\n{}", tortie.status(v4(pn)), bird_log(&bird)),
    );
    assert!(bird_has_from(&bird, "10.65.1.0/26", "tortie"));
    assert!(tortie.established(v4(pn)));
}

#[test]
fn frozen_bird_hits_hold_timer_tortie_sends_4_0_and_drops_its_routes() {
    let topo = pair_topology(&[]);
    let (tn, pn) = (topo.node("tortie"), topo.node("peer"));
    let bird = Bird::start(
        &pn.ns,
        &bird_conf(
            pn,
            &["10.211.1.0/24"],
            &[],
            &bird_bgp("tortie", pn, tn, "hold time 3; keepalive time 1;"),
        ),
    )
    .unwrap();
    // No graceful restart: a hold expiry must withdraw the peer's routes at once.
    let tortie = TortieNode::start(
        tn,
        tortie_bgp::SpeakerConfig {
            graceful_restart: None,
            ..speaker_config(tn, CALICO_AS)
        },
    );
    tortie.add_peer(PeerConfig {
        hold_time: 3,
        ..peer_v4(tn, pn, CALICO_AS)
    });
    tortie.wait_established(v4(pn), || bird_log(&bird));
    tortie.wait_route("10.211.1.0/24", v4(pn));

    bird.proc().signal(libc::SIGSTOP).unwrap();
    tortie.expect_hold_timer_expiry(v4(pn), "10.211.1.0/24");

    // Thawed, BIRD reads the NOTIFICATION tortie sent and says why the session ended.
    bird.proc().signal(libc::SIGCONT).unwrap();
    wait_true(
        "BIRD reports the Hold timer NOTIFICATION",
        WAIT,
        || {
            bird.protocol_info("tortie")
                .is_ok_and(|s| s.contains("Received: Hold timer expired"))
        },
        || bird_log(&bird),
    );
    // And the session recovers.
    tortie.wait_established(v4(pn), || bird_log(&bird));
    tortie.wait_route("10.211.1.0/24", v4(pn));
}

#[test]
fn bird_killed_and_restarted_its_routes_stay_in_tortie_until_end_of_rib() {
    let topo = pair_topology(&[]);
    let (tn, pn) = (topo.node("tortie"), topo.node("peer"));
    let conf = |routes: &[&str]| {
        bird_conf(
            pn,
            routes,
            &["fd11:211:1::/64"],
            &bird_bgp("tortie", pn, tn, "graceful restart on;"),
        )
    };
    let bird = Bird::start(&pn.ns, &conf(&["10.211.1.0/24", "10.211.2.0/24"])).unwrap();
    let tortie = TortieNode::start(tn, speaker_config(tn, CALICO_AS));
    tortie.add_peer(peer_v4(tn, pn, CALICO_AS));
    tortie.wait_established(v4(pn), || bird_log(&bird));
    tortie.wait_route("10.211.1.0/24", v4(pn));
    tortie.wait_route("10.211.2.0/24", v4(pn));
    tortie.wait_route("fd11:211:1::/64", v4(pn));

    // kill -9: the kernel closes the connection, no NOTIFICATION.
    drop(bird);
    wait_true(
        "tortie notices BIRD is gone",
        WAIT,
        || !tortie.established(v4(pn)),
        || format!("{:?}", tortie.status(v4(pn))),
    );
    // Helper role: the routes stay (stale) while BIRD is away; watch for three seconds
    // that none of them disappears.
    let dropped = wait_for(
        "a route dropped while BIRD is away",
        Duration::from_secs(3),
        || {
            let rib = tortie.loc_rib();
            Ok(["10.211.1.0/24", "10.211.2.0/24", "fd11:211:1::/64"]
                .iter()
                .find(|prefix| {
                    !rib.iter()
                        .any(|(p, b)| p == *prefix && b.from == Some(v4(pn)))
                })
                .map(|prefix| format!("{prefix} dropped: {rib:?}")))
        },
    );
    if let Ok(what) = dropped {
        panic!("{what}");
    }
    assert_ne!(tortie.status(v4(pn)).state, SessionState::Established);

    // BIRD comes back without 10.211.2.0/24. Started without `-R` it announces no preserved
    // forwarding state, so the stale routes go when the session is up (RFC 4724 §4.2) and
    // the re-announced ones come back; the withdrawn one stays gone.
    let bird = Bird::start(&pn.ns, &conf(&["10.211.1.0/24"])).unwrap();
    tortie.wait_established(v4(pn), || bird_log(&bird));
    tortie.wait_no_route("10.211.2.0/24", WAIT);
    tortie.wait_route("10.211.1.0/24", v4(pn));
    tortie.wait_route("fd11:211:1::/64", v4(pn));
    assert!(tortie.best("10.211.2.0/24").is_none());
}

#[test]
fn tortie_aborted_and_restarted_its_routes_stay_at_bird_until_end_of_rib() {
    let topo = pair_topology(&[]);
    let (tn, pn) = (topo.node("tortie"), topo.node("peer"));
    let bird = Bird::start(
        &pn.ns,
        &bird_conf(
            pn,
            &["10.211.1.0/24"],
            &[],
            &bird_bgp("tortie", pn, tn, "graceful restart on;"),
        ),
    )
    .unwrap();
    let tortie = TortieNode::start(tn, speaker_config(tn, CALICO_AS));
    for p in ["10.65.1.0/26", "10.65.2.0/26", "fd65:1::/122"] {
        tortie.originate(p);
    }
    tortie.add_peer(peer_v4(tn, pn, CALICO_AS));
    tortie.wait_established(v4(pn), || bird_log(&bird));
    wait_true(
        "BIRD learns tortie's prefixes",
        WAIT,
        || {
            ["10.65.1.0/26", "10.65.2.0/26", "fd65:1::/122"]
                .iter()
                .all(|p| bird_has_from(&bird, p, "tortie"))
        },
        || bird_log(&bird),
    );

    tortie.abort();
    wait_true(
        "BIRD notices tortie is gone",
        WAIT,
        || !bird.is_established("tortie"),
        || bird_log(&bird),
    );
    // BIRD's helper keeps tortie's routes while it is away.
    let info = bird.protocol_info("tortie").unwrap();
    assert!(
        info.contains("Neighbor graceful restart active"),
        "BIRD is not helping tortie restart:\n{info}"
    );
    for p in ["10.65.1.0/26", "10.65.2.0/26", "fd65:1::/122"] {
        assert!(
            bird_has_from(&bird, p, "tortie"),
            "BIRD dropped {p} while tortie restarted:\n{info}\n{}",
            bird_log(&bird)
        );
    }

    // tortie restarts without 10.65.2.0/26: its End-of-RIB makes BIRD drop that one.
    let tortie = TortieNode::start(
        tn,
        tortie_bgp::SpeakerConfig {
            graceful_restart: Some(tortie_bgp::GracefulRestartConfig {
                restart_time: 60,
                restarting: true,
                ..Default::default()
            }),
            ..speaker_config(tn, CALICO_AS)
        },
    );
    tortie.originate("10.65.1.0/26");
    tortie.originate("fd65:1::/122");
    tortie.add_peer(peer_v4(tn, pn, CALICO_AS));
    tortie.wait_established(v4(pn), || bird_log(&bird));
    wait_true(
        "BIRD drops the route tortie no longer has",
        WAIT,
        || !bird_has(&bird, "10.65.2.0/26"),
        || bird_log(&bird),
    );
    assert!(bird_has_from(&bird, "10.65.1.0/26", "tortie"));
    assert!(bird_has_from(&bird, "fd65:1::/122", "tortie"));
}

#[test]
fn md5_password_matching_bird_establishes() {
    let topo = pair_topology(&[]);
    let (tn, pn) = (topo.node("tortie"), topo.node("peer"));
    let bird = Bird::start(
        &pn.ns,
        &bird_conf(
            pn,
            &["10.211.1.0/24"],
            &[],
            &bird_bgp("tortie", pn, tn, "password \"s3cret-md5\";"),
        ),
    )
    .unwrap();
    let tortie = TortieNode::start(tn, speaker_config(tn, CALICO_AS));
    tortie.add_peer(PeerConfig {
        md5_password: Some("s3cret-md5".into()),
        ..peer_v4(tn, pn, CALICO_AS)
    });
    tortie.wait_established(v4(pn), || bird_log(&bird));
    tortie.wait_route("10.211.1.0/24", v4(pn));
    assert!(bird.is_established("tortie"));
}

#[test]
fn md5_password_mismatch_with_bird_never_establishes() {
    let topo = pair_topology(&[]);
    let (tn, pn) = (topo.node("tortie"), topo.node("peer"));
    let bird = Bird::start(
        &pn.ns,
        &bird_conf(
            pn,
            &["10.211.1.0/24"],
            &[],
            &bird_bgp("tortie", pn, tn, "password \"bird-side\";"),
        ),
    )
    .unwrap();
    let tortie = TortieNode::start(tn, speaker_config(tn, CALICO_AS));
    tortie.add_peer(PeerConfig {
        md5_password: Some("tortie-side".into()),
        ..peer_v4(tn, pn, CALICO_AS)
    });
    // Both sides retry every second; ten seconds is many attempts in each direction.
    let outcome = wait_for(
        "a session despite mismatched MD5 keys",
        Duration::from_secs(10),
        || Ok((tortie.established(v4(pn)) || bird.is_established("tortie")).then_some(())),
    );
    assert!(
        outcome.is_err(),
        "session came up with mismatched keys: {:?}",
        tortie.status(v4(pn))
    );
    assert_eq!(tortie.status(v4(pn)).messages_in, 0);
    assert!(tortie.best("10.211.1.0/24").is_none());

    // Same keys on both sides: up, so the failure above was the mismatch.
    bird.configure(&bird_conf(
        pn,
        &["10.211.1.0/24"],
        &[],
        &bird_bgp("tortie", pn, tn, "password \"tortie-side\";"),
    ))
    .unwrap();
    tortie.wait_established(v4(pn), || bird_log(&bird));
}

#[test]
fn tortie_reflects_routes_between_two_bird_clients() {
    let topo = pair_topology(&["peer2"]);
    let (tn, b1n, b2n) = (topo.node("tortie"), topo.node("peer"), topo.node("peer2"));
    let b1 = Bird::start(
        &b1n.ns,
        &bird_conf(
            b1n,
            &["10.221.1.0/24"],
            &[],
            &bird_bgp("reflector", b1n, tn, ""),
        ),
    )
    .unwrap();
    let b2 = Bird::start(
        &b2n.ns,
        &bird_conf(
            b2n,
            &["10.221.2.0/24"],
            &[],
            &bird_bgp("reflector", b2n, tn, ""),
        ),
    )
    .unwrap();
    let tortie = TortieNode::start(tn, speaker_config(tn, CALICO_AS));
    for n in [b1n, b2n] {
        tortie.add_peer(PeerConfig {
            route_reflector_client: true,
            ..peer_v4(tn, n, CALICO_AS)
        });
    }
    tortie.wait_established(v4(b1n), || bird_log(&b1));
    tortie.wait_established(v4(b2n), || bird_log(&b2));

    for (bird, prefix, origin) in [(&b2, "10.221.1.0/24", b1n), (&b1, "10.221.2.0/24", b2n)] {
        let seen = wait_for(&format!("{prefix} reflected"), WAIT, || {
            let r = bird_route(bird, prefix);
            Ok(r.contains(&format!("{prefix} ")).then_some(r))
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", bird_log(bird)));
        assert!(
            seen.contains(&format!("BGP.originator_id: {}", origin.addr)),
            "no ORIGINATOR_ID {}: {seen}",
            origin.addr
        );
        assert!(
            seen.contains(&format!("BGP.cluster_list: {}", tn.addr)),
            "no CLUSTER_LIST {}: {seen}",
            tn.addr
        );
        // The originator's next hop is kept, not rewritten to the reflector.
        assert!(
            seen.contains(&format!("BGP.next_hop: {}", origin.addr)),
            "next hop rewritten: {seen}"
        );
    }
}

#[test]
fn tortie_as_client_of_a_bird_reflector() {
    let topo = pair_topology(&["peer2"]);
    let (tn, rrn, cn) = (topo.node("tortie"), topo.node("peer"), topo.node("peer2"));
    let rr_bgp = format!(
        "{}{}",
        bird_reflector_bgp("tortie", rrn, tn),
        bird_reflector_bgp("peer2", rrn, cn)
    );
    let rr = Bird::start(&rrn.ns, &bird_conf(rrn, &[], &[], &rr_bgp)).unwrap();
    let client = Bird::start(
        &cn.ns,
        &bird_conf(
            cn,
            &["10.222.2.0/24"],
            &[],
            &bird_bgp("reflector", cn, rrn, ""),
        ),
    )
    .unwrap();
    let tortie = TortieNode::start(tn, speaker_config(tn, CALICO_AS));
    tortie.originate("10.65.1.0/26");
    tortie.add_peer(peer_v4(tn, rrn, CALICO_AS));
    tortie.wait_established(v4(rrn), || bird_log(&rr));

    let via_rr = tortie.wait_route("10.222.2.0/24", v4(rrn));
    assert_eq!(via_rr.attrs.path.originator_id, Some(cn.addr));
    assert_eq!(via_rr.attrs.path.cluster_list, vec![rrn.addr]);
    assert_eq!(ipv4(&via_rr.attrs.next_hop), Some(cn.addr));

    let seen = wait_for("the other client learns tortie's prefix", WAIT, || {
        let r = bird_route(&client, "10.65.1.0/26");
        Ok(r.contains("10.65.1.0/26 ").then_some(r))
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", bird_log(&rr)));
    assert!(
        seen.contains(&format!("BGP.originator_id: {}", tn.addr)),
        "{seen}"
    );
    assert!(
        seen.contains(&format!("BGP.cluster_list: {}", rrn.addr)),
        "{seen}"
    );
}
