//! tortie-bgp against a real FRR bgpd (with zebra) in the neighbouring namespace: prefixes
//! both ways, route refresh, hold timer expiry, graceful restart in both directions.
//!
//! Sessions are iBGP in AS 64512. Each family has its own session, as FRR sets them up by
//! default: IPv4 routes over the IPv4 session, IPv6 routes over a session between the
//! nodes' IPv6 addresses (tortie takes the next hop from the session address there).

#[path = "bgp_interop_support.rs"]
mod support;

use std::time::Duration;

use serde_json::Value;
use support::*;
use tortie_bgp::{PeerConfig, SessionState};
use tortie_e2e::daemons::Frr;
use tortie_e2e::{Node, wait_for};

/// bgpd config: `networks4`/`networks6` originated, an IPv4 neighbor (tortie's IPv4 address,
/// `extra` lines added to it) and an IPv6 neighbor (tortie's IPv6 address).
fn frr_conf(
    me: &Node,
    tortie: &Node,
    networks4: &[&str],
    networks6: &[&str],
    extra: &str,
) -> String {
    let (t4, t6) = (tortie.addr, tortie.addr6);
    let mut c = format!(
        "router bgp {CALICO_AS}\n bgp router-id {id}\n no bgp ebgp-requires-policy\n \
         no bgp default ipv4-unicast\n no bgp network import-check\n bgp graceful-restart\n \
         neighbor {t4} remote-as {CALICO_AS}\n neighbor {t4} timers connect 1\n \
         neighbor {t6} remote-as {CALICO_AS}\n neighbor {t6} timers connect 1\n",
        id = me.addr
    );
    for line in extra.lines() {
        c.push_str(&format!(" neighbor {t4} {line}\n"));
    }
    c.push_str(" address-family ipv4 unicast\n");
    for n in networks4 {
        c.push_str(&format!("  network {n}\n"));
    }
    c.push_str(&format!("  neighbor {t4} activate\n exit-address-family\n"));
    c.push_str(" address-family ipv6 unicast\n");
    for n in networks6 {
        c.push_str(&format!("  network {n}\n"));
    }
    c.push_str(&format!("  neighbor {t6} activate\n exit-address-family\n"));
    c
}

fn frr_debug(frr: &Frr) -> String {
    format!(
        "{}\n--- bgpd log ---\n{}",
        frr.vtysh(&["show bgp summary"]).unwrap_or_default(),
        frr.dir.tail("bgpd.log", 30)
    )
}

/// FRR's best-known route entries for `prefix` in `afi` ("ipv4"/"ipv6"), if any.
fn frr_route(frr: &Frr, afi: &str, prefix: &str) -> Option<Value> {
    let v = frr.json(&format!("show bgp {afi} unicast json")).ok()?;
    v.get("routes")?.get(prefix).cloned()
}

/// FRR's view of one neighbor (`show bgp neighbors <addr> json`).
fn frr_neighbor(frr: &Frr, addr: &str) -> Value {
    frr.json(&format!("show bgp neighbors {addr} json"))
        .ok()
        .and_then(|v| v.get(addr).cloned())
        .unwrap_or(Value::Null)
}

fn frr_stat(frr: &Frr, addr: &str, counter: &str) -> u64 {
    frr_neighbor(frr, addr)
        .pointer(&format!("/messageStats/{counter}"))
        .and_then(Value::as_u64)
        .unwrap_or(0)
}

fn frr_established(frr: &Frr, addr: &str) -> bool {
    frr_neighbor(frr, addr)
        .get("bgpState")
        .and_then(Value::as_str)
        == Some("Established")
}

fn frr_bgp(frr: &Frr, afi: &str, line: &str) -> String {
    frr.vtysh(&[
        "configure terminal",
        &format!("router bgp {CALICO_AS}"),
        &format!("address-family {afi} unicast"),
        line,
    ])
    .unwrap()
}

/// One IPv4 and one IPv6 session with the peer node.
fn two_sessions(tortie: &TortieNode, pn: &Node) {
    tortie.add_peer(PeerConfig::new(v4(pn), CALICO_AS));
    tortie.add_peer(PeerConfig::new(v6(pn), CALICO_AS));
}

#[test]
fn frr_exchanges_ipv4_and_ipv6_prefixes_and_withdrawals() {
    let topo = pair_topology(&[]);
    let (tn, pn) = (topo.node("tortie"), topo.node("peer"));
    let frr = Frr::start(
        &pn.ns,
        &frr_conf(
            pn,
            tn,
            &["10.213.1.0/24", "10.213.2.0/24"],
            &["fd11:213:1::/64"],
            "",
        ),
    )
    .unwrap();
    let tortie = TortieNode::start(tn, speaker_config(tn, CALICO_AS));
    tortie.originate("10.65.1.0/26");
    tortie.originate("fd65:1::/122");
    two_sessions(&tortie, pn);
    tortie.wait_established(v4(pn), || frr_debug(&frr));
    tortie.wait_established(v6(pn), || frr_debug(&frr));

    let r4 = tortie.wait_route("10.213.1.0/24", v4(pn));
    assert_eq!(ipv4(&r4.attrs.next_hop), Some(pn.addr));
    let r6 = tortie.wait_route("fd11:213:1::/64", v6(pn));
    assert_eq!(global_v6(&r6.attrs.next_hop), Some(pn.addr6));

    for (afi, prefix) in [("ipv4", "10.65.1.0/26"), ("ipv6", "fd65:1::/122")] {
        let route = wait_for(&format!("FRR learns {prefix}"), WAIT, || {
            Ok(frr_route(&frr, afi, prefix))
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", frr_debug(&frr)));
        let text = route.to_string();
        let want = if afi == "ipv4" {
            tn.addr.to_string()
        } else {
            tn.addr6.to_string()
        };
        assert!(
            text.contains(&want),
            "FRR's {prefix} has no next hop {want}: {text}"
        );
        assert!(
            text.contains("\"valid\":true"),
            "FRR's {prefix} not valid: {text}"
        );
    }

    tortie.withdraw("10.65.1.0/26");
    tortie.withdraw("fd65:1::/122");
    wait_true(
        "FRR sees tortie's withdrawals",
        WAIT,
        || {
            frr_route(&frr, "ipv4", "10.65.1.0/26").is_none()
                && frr_route(&frr, "ipv6", "fd65:1::/122").is_none()
        },
        || frr_debug(&frr),
    );
    frr_bgp(&frr, "ipv4", "no network 10.213.2.0/24");
    tortie.wait_no_route("10.213.2.0/24", WAIT);
    assert!(tortie.best("10.213.1.0/24").is_some());
    assert!(tortie.established(v4(pn)) && tortie.established(v6(pn)));
}

#[test]
fn frr_route_refresh_in_both_directions() {
    let topo = pair_topology(&[]);
    let (tn, pn) = (topo.node("tortie"), topo.node("peer"));
    let frr = Frr::start(&pn.ns, &frr_conf(pn, tn, &["10.213.1.0/24"], &[], "")).unwrap();
    let tortie = TortieNode::start(tn, speaker_config(tn, CALICO_AS));
    tortie.originate("10.65.1.0/26");
    tortie.add_peer(PeerConfig::new(v4(pn), CALICO_AS));
    tortie.wait_established(v4(pn), || frr_debug(&frr));
    tortie.wait_route("10.213.1.0/24", v4(pn));
    let t4 = tn.addr.to_string();
    wait_true(
        "FRR learns 10.65.1.0/26",
        WAIT,
        || frr_route(&frr, "ipv4", "10.65.1.0/26").is_some(),
        || frr_debug(&frr),
    );

    // tortie asks: FRR counts the ROUTE-REFRESH and sends its table again.
    let (rr_before, upd_before) = (
        frr_stat(&frr, &t4, "routeRefreshRecv"),
        frr_stat(&frr, &t4, "updatesSent"),
    );
    tortie.speaker().request_refresh(v4(pn)).unwrap();
    wait_true(
        "FRR answers tortie's ROUTE-REFRESH with UPDATEs",
        WAIT,
        || {
            frr_stat(&frr, &t4, "routeRefreshRecv") > rr_before
                && frr_stat(&frr, &t4, "updatesSent") > upd_before
        },
        || format!("{}\n{}", frr_neighbor(&frr, &t4), frr_debug(&frr)),
    );

    // FRR asks (`clear bgp * soft in`): tortie re-sends, FRR counts the UPDATEs.
    let (sent_before, recv_before) = (
        frr_stat(&frr, &t4, "routeRefreshSent"),
        frr_stat(&frr, &t4, "updatesRecv"),
    );
    let out_before = tortie.status(v4(pn)).messages_out;
    frr.vtysh(&["clear bgp * soft in"]).unwrap();
    wait_true(
        "tortie answers FRR's ROUTE-REFRESH with UPDATEs",
        WAIT,
        || {
            frr_stat(&frr, &t4, "routeRefreshSent") > sent_before
                && frr_stat(&frr, &t4, "updatesRecv") > recv_before
        },
        || format!("{}\n{}", frr_neighbor(&frr, &t4), frr_debug(&frr)),
    );
    assert!(tortie.status(v4(pn)).messages_out > out_before);
    assert!(frr_route(&frr, "ipv4", "10.65.1.0/26").is_some());
    assert!(tortie.established(v4(pn)));
}

#[test]
fn frozen_frr_hits_hold_timer_tortie_sends_4_0_and_drops_its_routes() {
    let topo = pair_topology(&[]);
    let (tn, pn) = (topo.node("tortie"), topo.node("peer"));
    let frr = Frr::start(
        &pn.ns,
        &frr_conf(pn, tn, &["10.213.1.0/24"], &[], "timers 1 3"),
    )
    .unwrap();
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
    tortie.wait_established(v4(pn), || frr_debug(&frr));
    tortie.wait_route("10.213.1.0/24", v4(pn));

    frr.bgpd().signal(libc::SIGSTOP).unwrap();
    tortie.expect_hold_timer_expiry(v4(pn), "10.213.1.0/24");

    frr.bgpd().signal(libc::SIGCONT).unwrap();
    let t4 = tn.addr.to_string();
    let reason = wait_for("FRR records tortie's Hold Timer NOTIFICATION", WAIT, || {
        let n = frr_neighbor(&frr, &t4).to_string();
        Ok(n.to_lowercase().contains("hold timer expired").then_some(n))
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", frr_neighbor(&frr, &t4)));
    assert!(
        reason.contains("4/0") || reason.to_lowercase().contains("received"),
        "{reason}"
    );
    tortie.wait_established(v4(pn), || frr_debug(&frr));
    tortie.wait_route("10.213.1.0/24", v4(pn));
}

#[test]
fn frr_killed_and_restarted_its_routes_stay_in_tortie_until_end_of_rib() {
    let topo = pair_topology(&[]);
    let (tn, pn) = (topo.node("tortie"), topo.node("peer"));
    let conf = |n4: &[&str]| frr_conf(pn, tn, n4, &["fd11:213:1::/64"], "");
    let frr = Frr::start(&pn.ns, &conf(&["10.213.1.0/24", "10.213.2.0/24"])).unwrap();
    let tortie = TortieNode::start(tn, speaker_config(tn, CALICO_AS));
    two_sessions(&tortie, pn);
    tortie.wait_established(v4(pn), || frr_debug(&frr));
    tortie.wait_route("10.213.1.0/24", v4(pn));
    tortie.wait_route("10.213.2.0/24", v4(pn));
    tortie.wait_route("fd11:213:1::/64", v6(pn));

    drop(frr); // SIGKILL to bgpd and zebra
    wait_true(
        "tortie notices FRR is gone",
        WAIT,
        || !tortie.established(v4(pn)) && !tortie.established(v6(pn)),
        || format!("{:?}", tortie.speaker().peer_status()),
    );
    let kept = [
        ("10.213.1.0/24", v4(pn)),
        ("10.213.2.0/24", v4(pn)),
        ("fd11:213:1::/64", v6(pn)),
    ];
    let dropped = wait_for(
        "a route dropped while FRR is away",
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

    let frr = Frr::start(&pn.ns, &conf(&["10.213.1.0/24"])).unwrap();
    tortie.wait_established(v4(pn), || frr_debug(&frr));
    tortie.wait_no_route("10.213.2.0/24", WAIT);
    tortie.wait_route("10.213.1.0/24", v4(pn));
    tortie.wait_route("fd11:213:1::/64", v6(pn));
}

#[test]
fn tortie_aborted_and_restarted_its_routes_stay_at_frr_until_end_of_rib() {
    let topo = pair_topology(&[]);
    let (tn, pn) = (topo.node("tortie"), topo.node("peer"));
    let frr = Frr::start(&pn.ns, &frr_conf(pn, tn, &["10.213.1.0/24"], &[], "")).unwrap();
    let tortie = TortieNode::start(tn, speaker_config(tn, CALICO_AS));
    let ours = [
        ("ipv4", "10.65.1.0/26"),
        ("ipv4", "10.65.2.0/26"),
        ("ipv6", "fd65:1::/122"),
    ];
    for (_, p) in ours {
        tortie.originate(p);
    }
    two_sessions(&tortie, pn);
    tortie.wait_established(v4(pn), || frr_debug(&frr));
    tortie.wait_established(v6(pn), || frr_debug(&frr));
    wait_true(
        "FRR learns tortie's prefixes",
        WAIT,
        || {
            ours.iter()
                .all(|(afi, p)| frr_route(&frr, afi, p).is_some())
        },
        || frr_debug(&frr),
    );

    tortie.abort();
    let t4 = tn.addr.to_string();
    wait_true(
        "FRR notices tortie is gone",
        WAIT,
        || !frr_established(&frr, &t4),
        || frr_debug(&frr),
    );
    for (afi, p) in ours {
        let route = frr_route(&frr, afi, p).unwrap_or_else(|| {
            panic!(
                "FRR dropped {p} while tortie restarted\n{}",
                frr_debug(&frr)
            )
        });
        assert!(
            route.to_string().contains("\"stale\":true"),
            "{p} not stale at FRR: {route}"
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
    tortie.wait_established(v4(pn), || frr_debug(&frr));
    wait_true(
        "FRR drops the route tortie no longer has, keeps the others fresh",
        WAIT,
        || {
            frr_route(&frr, "ipv4", "10.65.2.0/26").is_none()
                && frr_route(&frr, "ipv4", "10.65.1.0/26")
                    .is_some_and(|r| !r.to_string().contains("\"stale\":true"))
        },
        || frr_debug(&frr),
    );
    assert!(frr_route(&frr, "ipv6", "fd65:1::/122").is_some());
}

#[test]
fn md5_password_matching_frr_establishes_and_mismatch_does_not() {
    let topo = pair_topology(&[]);
    let (tn, pn) = (topo.node("tortie"), topo.node("peer"));
    let frr = Frr::start(
        &pn.ns,
        &frr_conf(pn, tn, &["10.213.1.0/24"], &[], "password frr-md5"),
    )
    .unwrap();
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
        md5_password: Some("frr-md5".into()),
        ..PeerConfig::new(v4(pn), CALICO_AS)
    });
    tortie.wait_established(v4(pn), || frr_debug(&frr));
    tortie.wait_route("10.213.1.0/24", v4(pn));
}
