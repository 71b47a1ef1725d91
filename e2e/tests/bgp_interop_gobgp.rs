//! tortie-bgp against a real GoBGP (gobgpd) in the neighbouring namespace: prefixes both
//! ways, route refresh requested by tortie, hold timer expiry, graceful restart in both directions, TCP-MD5.
//!
//! Sessions are iBGP in AS 64512, one per family (GoBGP's IPv4 neighbor carries
//! ipv4-unicast, its IPv6 neighbor ipv6-unicast); routes GoBGP originates from its RIB get
//! the session's local address as next hop.

#[path = "bgp_interop_support.rs"]
mod support;

use std::time::Duration;

use serde_json::Value;
use support::*;
use tortie_bgp::{PeerConfig, SessionState};
use tortie_e2e::daemons::Gobgp;
use tortie_e2e::{Node, wait_for};

const API_PORT: u16 = 50061;

/// gobgpd config with an IPv4 and an IPv6 neighbor (tortie's addresses); `v4_extra` is
/// TOML added to the IPv4 neighbor's `[neighbors.config]` table, `timers` its timer table.
fn gobgp_conf(me: &Node, tortie: &Node, v4_extra: &str, timers: &str) -> String {
    let neighbor = |addr: String, afi: &str, extra: &str, timers: &str| {
        format!(
            "[[neighbors]]\n  [neighbors.config]\n    neighbor-address = \"{addr}\"\n    \
             peer-as = {CALICO_AS}\n{extra}\n  [neighbors.timers.config]\n    connect-retry = 1\n{timers}\n  \
             [neighbors.graceful-restart.config]\n    enabled = true\n    restart-time = 60\n  \
             [[neighbors.afi-safis]]\n    [neighbors.afi-safis.config]\n      afi-safi-name = \"{afi}\"\n    \
             [neighbors.afi-safis.mp-graceful-restart.config]\n      enabled = true\n"
        )
    };
    format!(
        "[global.config]\n  as = {CALICO_AS}\n  router-id = \"{id}\"\n  \
         local-address-list = [\"{id}\", \"{id6}\"]\n{n4}{n6}",
        id = me.addr,
        id6 = me.addr6,
        n4 = neighbor(tortie.addr.to_string(), "ipv4-unicast", v4_extra, timers),
        n6 = neighbor(tortie.addr6.to_string(), "ipv6-unicast", "", ""),
    )
}

fn gobgp_debug(g: &Gobgp) -> String {
    format!(
        "{}\n--- gobgpd log ---\n{}",
        g.cli(&["neighbor"]).unwrap_or_default(),
        g.dir.tail("gobgpd.log", 20)
    )
}

/// GoBGP's paths for `prefix` in its global RIB, if any.
fn gobgp_route(g: &Gobgp, prefix: &str) -> Option<Value> {
    let rib = g.rib(prefix.contains(':')).ok()?;
    rib.get(prefix).cloned()
}

fn gobgp_counter(g: &Gobgp, addr: &str, path: &str) -> u64 {
    g.cli(&["-j", "neighbor", addr])
        .ok()
        .and_then(|s| serde_json::from_str::<Value>(&s).ok())
        .and_then(|v| v.pointer(path).and_then(Value::as_u64))
        .unwrap_or(0)
}

fn add(g: &Gobgp, prefix: &str) {
    if prefix.contains(':') {
        g.cli(&["global", "rib", "add", "-a", "ipv6", prefix])
            .unwrap();
    } else {
        g.cli(&["global", "rib", "add", prefix]).unwrap();
    }
}

fn start_gobgp(pn: &Node, conf: &str, restarting: bool, routes: &[&str]) -> Gobgp {
    let g = Gobgp::start(&pn.ns, conf, API_PORT, restarting).unwrap();
    for r in routes {
        add(&g, r);
    }
    g
}

fn two_sessions(tortie: &TortieNode, pn: &Node) {
    tortie.add_peer(PeerConfig::new(v4(pn), CALICO_AS));
    tortie.add_peer(PeerConfig::new(v6(pn), CALICO_AS));
}

#[test]
fn gobgp_exchanges_ipv4_and_ipv6_prefixes_and_withdrawals() {
    let topo = pair_topology(&[]);
    let (tn, pn) = (topo.node("tortie"), topo.node("peer"));
    let g = start_gobgp(
        pn,
        &gobgp_conf(pn, tn, "", ""),
        false,
        &["10.214.1.0/24", "10.214.2.0/24", "fd11:214:1::/64"],
    );
    let tortie = TortieNode::start(tn, speaker_config(tn, CALICO_AS));
    tortie.originate("10.65.1.0/26");
    tortie.originate("fd65:1::/122");
    two_sessions(&tortie, pn);
    tortie.wait_established(v4(pn), || gobgp_debug(&g));
    tortie.wait_established(v6(pn), || gobgp_debug(&g));

    let r4 = tortie.wait_route("10.214.1.0/24", v4(pn));
    assert_eq!(ipv4(&r4.attrs.next_hop), Some(pn.addr));
    let r6 = tortie.wait_route("fd11:214:1::/64", v6(pn));
    assert_eq!(global_v6(&r6.attrs.next_hop), Some(pn.addr6));

    for (prefix, next_hop) in [
        ("10.65.1.0/26", tn.addr.to_string()),
        ("fd65:1::/122", tn.addr6.to_string()),
    ] {
        let route = wait_for(&format!("GoBGP learns {prefix}"), WAIT, || {
            Ok(gobgp_route(&g, prefix))
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", gobgp_debug(&g)));
        assert!(
            route
                .to_string()
                .contains(&format!("\"nexthop\":\"{next_hop}\"")),
            "GoBGP's {prefix} lacks next hop {next_hop}: {route}"
        );
    }

    tortie.withdraw("10.65.1.0/26");
    tortie.withdraw("fd65:1::/122");
    wait_true(
        "GoBGP sees tortie's withdrawals",
        WAIT,
        || gobgp_route(&g, "10.65.1.0/26").is_none() && gobgp_route(&g, "fd65:1::/122").is_none(),
        || gobgp_debug(&g),
    );
    g.cli(&["global", "rib", "del", "10.214.2.0/24"]).unwrap();
    tortie.wait_no_route("10.214.2.0/24", WAIT);
    assert!(tortie.best("10.214.1.0/24").is_some());
    assert!(tortie.established(v4(pn)) && tortie.established(v6(pn)));
}

#[test]
fn gobgp_answers_tortie_route_refresh_with_its_routes() {
    let topo = pair_topology(&[]);
    let (tn, pn) = (topo.node("tortie"), topo.node("peer"));
    let g = start_gobgp(pn, &gobgp_conf(pn, tn, "", ""), false, &["10.214.1.0/24"]);
    let tortie = TortieNode::start(tn, speaker_config(tn, CALICO_AS));
    tortie.originate("10.65.1.0/26");
    tortie.add_peer(PeerConfig::new(v4(pn), CALICO_AS));
    tortie.wait_established(v4(pn), || gobgp_debug(&g));
    tortie.wait_route("10.214.1.0/24", v4(pn));
    wait_true(
        "GoBGP learns 10.65.1.0/26",
        WAIT,
        || gobgp_route(&g, "10.65.1.0/26").is_some(),
        || gobgp_debug(&g),
    );
    let t4 = tn.addr.to_string();
    let counter = |path: &str| gobgp_counter(&g, &t4, path);

    // tortie asks: GoBGP counts the ROUTE-REFRESH and sends UPDATEs again.
    let (rr_before, upd_before) = (
        counter("/state/messages/received/refresh"),
        counter("/state/messages/sent/update"),
    );
    tortie.speaker().request_refresh(v4(pn)).unwrap();
    wait_true(
        "GoBGP answers tortie's ROUTE-REFRESH with UPDATEs",
        WAIT,
        || {
            counter("/state/messages/received/refresh") > rr_before
                && counter("/state/messages/sent/update") > upd_before
        },
        || {
            format!(
                "{}\n{}",
                g.cli(&["-j", "neighbor", &t4]).unwrap_or_default(),
                gobgp_debug(&g)
            )
        },
    );

    // The other direction has no trigger here: GoBGP keeps every Adj-RIB-In, and its
    // `neighbor … softresetin` replays that locally instead of sending ROUTE-REFRESH.
    assert!(gobgp_route(&g, "10.65.1.0/26").is_some());
    assert!(tortie.established(v4(pn)));
}

#[test]
fn frozen_gobgp_hits_hold_timer_tortie_sends_4_0_and_drops_its_routes() {
    let topo = pair_topology(&[]);
    let (tn, pn) = (topo.node("tortie"), topo.node("peer"));
    let g = start_gobgp(
        pn,
        &gobgp_conf(
            pn,
            tn,
            "",
            "    hold-time = 3\n    keepalive-interval = 1\n",
        ),
        false,
        &["10.214.1.0/24"],
    );
    let tortie = TortieNode::start(
        tn,
        tortie_bgp::SpeakerConfig {
            graceful_restart: None,
            ..speaker_config(tn, CALICO_AS)
        },
    );
    tortie.add_peer(PeerConfig {
        hold_time: 3,
        ..PeerConfig::new(v4(pn), CALICO_AS)
    });
    tortie.wait_established(v4(pn), || gobgp_debug(&g));
    tortie.wait_route("10.214.1.0/24", v4(pn));

    g.proc().signal(libc::SIGSTOP).unwrap();
    tortie.expect_hold_timer_expiry(v4(pn), "10.214.1.0/24");

    g.proc().signal(libc::SIGCONT).unwrap();
    tortie.wait_established(v4(pn), || gobgp_debug(&g));
    tortie.wait_route("10.214.1.0/24", v4(pn));
}

#[test]
fn gobgp_killed_and_restarted_its_routes_stay_in_tortie_until_end_of_rib() {
    let topo = pair_topology(&[]);
    let (tn, pn) = (topo.node("tortie"), topo.node("peer"));
    let conf = gobgp_conf(pn, tn, "", "");
    let g = start_gobgp(
        pn,
        &conf,
        false,
        &["10.214.1.0/24", "10.214.2.0/24", "fd11:214:1::/64"],
    );
    let tortie = TortieNode::start(tn, speaker_config(tn, CALICO_AS));
    two_sessions(&tortie, pn);
    tortie.wait_established(v4(pn), || gobgp_debug(&g));
    tortie.wait_route("10.214.1.0/24", v4(pn));
    tortie.wait_route("10.214.2.0/24", v4(pn));
    tortie.wait_route("fd11:214:1::/64", v6(pn));

    drop(g); // SIGKILL
    wait_true(
        "tortie notices GoBGP is gone",
        WAIT,
        || !tortie.established(v4(pn)) && !tortie.established(v6(pn)),
        || format!("{:?}", tortie.speaker().peer_status()),
    );
    let kept = [
        ("10.214.1.0/24", v4(pn)),
        ("10.214.2.0/24", v4(pn)),
        ("fd11:214:1::/64", v6(pn)),
    ];
    let dropped = wait_for(
        "a route dropped while GoBGP is away",
        Duration::from_secs(3),
        || {
            let rib = tortie.loc_rib();
            Ok(kept
                .iter()
                .find(|(prefix, from)| {
                    !rib.iter()
                        .any(|(p, b)| p == prefix && b.from == Some(*from))
                })
                .map(|(prefix, _)| format!("{prefix} dropped: {rib:?}")))
        },
    );
    if let Ok(what) = dropped {
        panic!("{what}");
    }
    assert_ne!(tortie.status(v4(pn)).state, SessionState::Established);

    // Back (Restart State set) without 10.214.2.0/24.
    let g = start_gobgp(pn, &conf, true, &["10.214.1.0/24", "fd11:214:1::/64"]);
    tortie.wait_established(v4(pn), || gobgp_debug(&g));
    tortie.wait_no_route("10.214.2.0/24", WAIT);
    tortie.wait_route("10.214.1.0/24", v4(pn));
    tortie.wait_route("fd11:214:1::/64", v6(pn));
}

#[test]
fn tortie_aborted_and_restarted_its_routes_stay_at_gobgp_until_end_of_rib() {
    let topo = pair_topology(&[]);
    let (tn, pn) = (topo.node("tortie"), topo.node("peer"));
    let g = start_gobgp(pn, &gobgp_conf(pn, tn, "", ""), false, &["10.214.1.0/24"]);
    let tortie = TortieNode::start(tn, speaker_config(tn, CALICO_AS));
    let ours = ["10.65.1.0/26", "10.65.2.0/26", "fd65:1::/122"];
    for p in ours {
        tortie.originate(p);
    }
    two_sessions(&tortie, pn);
    tortie.wait_established(v4(pn), || gobgp_debug(&g));
    tortie.wait_established(v6(pn), || gobgp_debug(&g));
    wait_true(
        "GoBGP learns tortie's prefixes",
        WAIT,
        || ours.iter().all(|p| gobgp_route(&g, p).is_some()),
        || gobgp_debug(&g),
    );

    tortie.abort();
    let t4 = tn.addr.to_string();
    wait_true(
        "GoBGP notices tortie is gone",
        WAIT,
        || g.neighbor_state(&t4).is_ok_and(|s| s != "established"),
        || gobgp_debug(&g),
    );
    for p in ours {
        let route = gobgp_route(&g, p).unwrap_or_else(|| {
            panic!(
                "GoBGP dropped {p} while tortie restarted\n{}",
                gobgp_debug(&g)
            )
        });
        assert!(
            route.to_string().contains("\"stale\":true"),
            "{p} not stale at GoBGP: {route}"
        );
    }

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
    two_sessions(&tortie, pn);
    tortie.wait_established(v4(pn), || gobgp_debug(&g));
    wait_true(
        "GoBGP drops the route tortie no longer has, keeps the others fresh",
        WAIT,
        || {
            gobgp_route(&g, "10.65.2.0/26").is_none()
                && gobgp_route(&g, "10.65.1.0/26")
                    .is_some_and(|r| !r.to_string().contains("\"stale\":true"))
        },
        || format!("{:?}\n{}", gobgp_route(&g, "10.65.1.0/26"), gobgp_debug(&g)),
    );
    assert!(gobgp_route(&g, "fd65:1::/122").is_some());
}

#[test]
fn md5_password_matching_gobgp_establishes_and_mismatch_does_not() {
    let topo = pair_topology(&[]);
    let (tn, pn) = (topo.node("tortie"), topo.node("peer"));
    let g = start_gobgp(
        pn,
        &gobgp_conf(pn, tn, "    auth-password = \"gobgp-md5\"", ""),
        false,
        &["10.214.1.0/24"],
    );
    let tortie = TortieNode::start(tn, speaker_config(tn, CALICO_AS));
    tortie.add_peer(PeerConfig {
        md5_password: Some("not-the-same".into()),
        ..PeerConfig::new(v4(pn), CALICO_AS)
    });
    let outcome = wait_for(
        "a session despite mismatched MD5 keys",
        Duration::from_secs(6),
        || Ok(tortie.established(v4(pn)).then_some(())),
    );
    assert!(
        outcome.is_err(),
        "session up with mismatched keys: {:?}",
        tortie.status(v4(pn))
    );
    assert_eq!(tortie.status(v4(pn)).messages_in, 0);

    tortie.update_peer(PeerConfig {
        md5_password: Some("gobgp-md5".into()),
        ..PeerConfig::new(v4(pn), CALICO_AS)
    });
    tortie.wait_established(v4(pn), || gobgp_debug(&g));
    tortie.wait_route("10.214.1.0/24", v4(pn));
}
