//! Proves the QEMU runner (`make test-kernel`): IPIP between two node namespaces over tunl0.
//!
//! The host kernel has no ipip module, so here the test prints a `SKIP:` line and returns; in
//! the guest booted by `e2e/qemu/run-tests.sh` ipip is loaded and the test must really pass
//! (the runner fails on any `SKIP:` line).

use std::time::Duration;

use tortie_e2e::{Netns, TopologySpec, require_root, wait_until};

const SKIP_NO_IPIP: &str =
    "SKIP: no ipip module (tunl0 cannot be created) — runs in QEMU via make test-kernel";

/// True when `ns` has the ipip fallback device. The ipip module creates `tunl0` in every
/// namespace once loaded; adding an ipip link first lets a kernel that can autoload do so.
fn has_tunl0(ns: &Netns) -> bool {
    let present = |ns: &Netns| {
        ns.exec(&["ip", "link", "show", "tunl0"])
            .is_ok_and(|o| o.status.success())
    };
    if present(ns) {
        return true;
    }
    let probe = ns.exec(&[
        "ip",
        "link",
        "add",
        "name",
        "ipipprobe",
        "type",
        "ipip",
        "remote",
        "10.77.0.99",
    ]);
    if probe.is_ok_and(|o| o.status.success()) {
        let _ = ns.exec(&["ip", "link", "del", "ipipprobe"]);
    }
    present(ns)
}

/// Packets received on `dev` in `ns`, from `ip -s -j link show`.
fn rx_packets(ns: &Netns, dev: &str) -> u64 {
    let out = ns.run(&["ip", "-s", "-j", "link", "show", dev]).unwrap();
    let links: serde_json::Value = serde_json::from_str(&out).unwrap();
    links[0]["stats64"]["rx"]["packets"]
        .as_u64()
        .unwrap_or_else(|| panic!("no rx packet count for {dev} in: {out}"))
}

#[test]
fn ipip_tunnel_pings_across_namespaces() {
    require_root();
    let topo = TopologySpec::new().segment(["a", "b"]).build().unwrap();
    let (a, b) = (topo.node("a"), topo.node("b"));
    if !has_tunl0(&a.ns) {
        eprintln!("{SKIP_NO_IPIP}");
        return;
    }
    // Calico's IPIP layout: the node's tunnel address on tunl0, the peer's block routed
    // `via <peer node> dev tunl0 onlink`.
    let sides = [
        (a, "10.200.0.1", b, "10.200.1.0/26"),
        (b, "10.200.1.1", a, "10.200.0.0/26"),
    ];
    for (node, tunnel_addr, peer, peer_block) in sides {
        node.ns.run(&["ip", "link", "set", "tunl0", "up"]).unwrap();
        node.ns
            .run(&[
                "ip",
                "addr",
                "add",
                &format!("{tunnel_addr}/32"),
                "dev",
                "tunl0",
            ])
            .unwrap();
        node.ns
            .run(&[
                "ip",
                "route",
                "add",
                peer_block,
                "via",
                &peer.addr.to_string(),
                "dev",
                "tunl0",
                "onlink",
            ])
            .unwrap();
    }
    let route = a.ns.run(&["ip", "route", "get", "10.200.1.1"]).unwrap();
    assert!(
        route.contains("dev tunl0") && route.contains(&format!("via {}", b.addr)),
        "a's route to b's tunnel address should go through tunl0 via {}: {route}",
        b.addr
    );

    let before = rx_packets(&b.ns, "tunl0");
    wait_until(
        "a reaches b's tunnel address through IPIP",
        Duration::from_secs(10),
        || a.ns.ping_once("10.200.1.1", 500),
    )
    .unwrap();
    let after = rx_packets(&b.ns, "tunl0");
    assert!(
        after > before,
        "b's tunl0 received nothing (rx {before} -> {after}): the ping did not use IPIP"
    );
}
