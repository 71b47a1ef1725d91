//! tortie agents on a real apiserver route a VXLAN pool across segments.

use std::time::Duration;

use tortie_e2e::cluster::{ClusterSpec, TestCluster};
use tortie_e2e::{TopologySpec, require_root, wait_for};

fn pool(vxlan: &str, ipip: &str) -> String {
    format!(
        "apiVersion: crd.projectcalico.org/v1\nkind: IPPool\nmetadata:\n  name: default-ipv4-ippool\nspec:\n  \
         cidr: 10.244.0.0/16\n  vxlanMode: {vxlan}\n  ipipMode: {ipip}\n  natOutgoing: false\n"
    )
}

fn annotation(c: &TestCluster, node: &str, key: &str) -> anyhow::Result<Option<String>> {
    let out = c.kubectl(&["get", "node", node, "-o", "json"])?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    Ok(v["metadata"]["annotations"][key]
        .as_str()
        .map(str::to_owned))
}

#[test]
fn vxlan_always_routes_tunnel_addresses_across_segments() {
    require_root();
    let spec = ClusterSpec {
        topology: TopologySpec::new().segment(["a1", "a2"]).segment(["b1"]),
        pool_yaml: Some(pool("Always", "Never")),
        ..Default::default()
    };
    let Some(c) =
        TestCluster::start("vxlan_always_routes_tunnel_addresses_across_segments", spec).unwrap()
    else {
        return;
    };
    c.wait_ready(Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e:#}\n{}", c.logs()));
    let mut tunnel = std::collections::BTreeMap::new();
    for n in ["a1", "a2", "b1"] {
        let addr = wait_for(
            &format!("{n}'s VXLAN tunnel address annotation"),
            Duration::from_secs(30),
            || annotation(&c, n, "projectcalico.org/IPv4VXLANTunnelAddr"),
        )
        .unwrap_or_else(|e| panic!("{e:#}\n{}", c.logs()));
        let addr4 = annotation(&c, n, "projectcalico.org/IPv4Address")
            .unwrap()
            .unwrap();
        assert_eq!(
            addr4,
            format!("{}/24", c.topo.node(n).addr),
            "IPv4Address annotation of {n}"
        );
        tunnel.insert(n, addr);
    }
    // Every node reaches every other node's tunnel address through vxlan.calico.
    for from in ["a1", "a2", "b1"] {
        for to in ["a1", "a2", "b1"] {
            if from == to {
                continue;
            }
            let dst = tunnel[to].clone();
            let ns = &c.topo.node(from).ns;
            wait_for(
                &format!("{from} pings {to}'s tunnel address {dst}"),
                Duration::from_secs(20),
                || Ok(ns.ping_once(&dst, 300).then_some(())),
            )
            .unwrap_or_else(|e| {
                panic!(
                    "{e:#}\nroutes on {from}: {}\n{}",
                    ns.run(&["ip", "route"]).unwrap_or_default(),
                    c.logs()
                )
            });
            let route = ns.run(&["ip", "route", "get", &dst]).unwrap();
            assert!(
                route.contains("dev vxlan.calico"),
                "{from} → {to} must go through vxlan.calico: {route}"
            );
        }
    }
    let routes = c.routes("a1").unwrap();
    assert!(
        routes.iter().any(|r| r["type"] == "blackhole"),
        "a1 owns a block and must blackhole it: {routes:?}"
    );
}

/// The route a node has to another node's block: "vxlan" or "direct", by its device.
fn path_to(c: &TestCluster, from: &str, dst: &str) -> anyhow::Result<&'static str> {
    let r = c.topo.node(from).ns.run(&["ip", "route", "get", dst])?;
    Ok(if r.contains("dev vxlan.calico") {
        "vxlan"
    } else if r.contains("dev eth0") {
        "direct"
    } else {
        "other"
    })
}

#[test]
fn kubectl_patch_to_crosssubnet_reroutes_every_node_live() {
    require_root();
    let spec = ClusterSpec {
        topology: TopologySpec::new().segment(["a1", "a2"]).segment(["b1"]),
        pool_yaml: Some(pool("Always", "Never")),
        ..Default::default()
    };
    let Some(c) = TestCluster::start(
        "kubectl_patch_to_crosssubnet_reroutes_every_node_live",
        spec,
    )
    .unwrap() else {
        return;
    };
    c.wait_ready(Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e:#}\n{}", c.logs()));
    let tunnel = |n: &str| {
        wait_for(
            &format!("{n}'s tunnel address"),
            Duration::from_secs(30),
            || annotation(&c, n, "projectcalico.org/IPv4VXLANTunnelAddr"),
        )
        .unwrap()
    };
    let (a2_tun, b1_tun) = (tunnel("a2"), tunnel("b1"));
    wait_for(
        "a1 routes to a2 over VXLAN",
        Duration::from_secs(20),
        || Ok((path_to(&c, "a1", &a2_tun)? == "vxlan").then_some(())),
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", c.logs()));

    let start = std::time::Instant::now();
    c.kubectl(&[
        "patch",
        "ippool",
        "default-ipv4-ippool",
        "--type=merge",
        "-p",
        r#"{"spec":{"vxlanMode":"CrossSubnet"}}"#,
    ])
    .unwrap();
    wait_for(
        "a1 → a2 direct (same segment) and a1 → b1 still VXLAN",
        Duration::from_secs(10),
        || {
            Ok(
                (path_to(&c, "a1", &a2_tun)? == "direct" && path_to(&c, "a1", &b1_tun)? == "vxlan")
                    .then_some(()),
            )
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", c.logs()));
    let converged = start.elapsed();
    eprintln!("FIGURE vxlan Always→CrossSubnet converged on a1 in {converged:?}");
    assert!(
        converged < Duration::from_secs(1),
        "live switch took {converged:?}, the goal is under 1 s"
    );
    wait_for(
        "b1 keeps VXLAN to a2 (other segment)",
        Duration::from_secs(5),
        || Ok((path_to(&c, "b1", &a2_tun)? == "vxlan").then_some(())),
    )
    .unwrap();
    for (from, to) in [("a1", &a2_tun), ("a1", &b1_tun), ("b1", &a2_tun)] {
        assert!(
            wait_for(
                &format!("{from} pings {to}"),
                Duration::from_secs(5),
                || Ok(c.topo.node(from).ns.ping_once(to, 300).then_some(()))
            )
            .is_ok(),
            "{from} lost {to} after the switch"
        );
    }
    // Back to Never: no tunnel at all; remote same-segment blocks direct, and the VXLAN device goes away.
    c.kubectl(&[
        "patch",
        "ippool",
        "default-ipv4-ippool",
        "--type=merge",
        "-p",
        r#"{"spec":{"vxlanMode":"Never"}}"#,
    ])
    .unwrap();
    wait_for(
        "vxlan.calico removed on a1 once no pool needs it",
        Duration::from_secs(10),
        || {
            let links = c.topo.node("a1").ns.run(&["ip", "-o", "link"])?;
            Ok((!links.contains("vxlan.calico")).then_some(()))
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", c.logs()));
}
