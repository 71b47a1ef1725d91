//! Dual stack as Calico runs it: nodes with `IP6` autodetected, an IPv4 and an IPv6 pool, both
//! in VXLAN. Each node gets an IPv6 VTEP (Calico's `vxlan-v6-tunnel-addr-<node>` handle and
//! annotations), the CNI config asks for both families, and pods on nodes behind different
//! routers' segments reach each other over IPv4 and IPv6 through `vxlan.calico` and
//! `vxlan-v6.calico`.

use std::time::Duration;

use tortie_e2e::cluster::{ClusterSpec, TestCluster, TestPod, agent_env};
use tortie_e2e::{TopologySpec, require_root, wait_for};

const POOLS: &str = "apiVersion: crd.projectcalico.org/v1\nkind: IPPool\nmetadata:\n  name: v4\n\
                     spec:\n  cidr: 10.244.0.0/16\n  vxlanMode: Always\n  ipipMode: Never\n\
                     ---\n\
                     apiVersion: crd.projectcalico.org/v1\nkind: IPPool\nmetadata:\n  name: v6\n\
                     spec:\n  cidr: fd00:244::/112\n  blockSize: 122\n  vxlanMode: Always\n  ipipMode: Never\n";

fn address_of(pod: &TestPod, ipv6: bool) -> String {
    pod.result["ips"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|ip| ip["address"].as_str()?.split('/').next())
        .find(|a| a.contains(':') == ipv6)
        .unwrap_or_else(|| {
            panic!(
                "no IPv{} address in {}",
                if ipv6 { 6 } else { 4 },
                pod.result
            )
        })
        .to_owned()
}

#[test]
fn dual_stack_pods_reach_each_other_over_ipv4_and_ipv6_vxlan() {
    require_root();
    let spec = ClusterSpec {
        topology: TopologySpec::new().segment(["d1"]).segment(["d2"]),
        pool_yaml: Some(POOLS.to_owned()),
        agent_env: agent_env(&[
            ("IP6", "autodetect"),
            ("IP6_AUTODETECTION_METHOD", "interface=eth0"),
        ]),
        ..Default::default()
    };
    let Some(c) = TestCluster::start(
        "dual_stack_pods_reach_each_other_over_ipv4_and_ipv6_vxlan",
        spec,
    )
    .unwrap() else {
        return;
    };
    c.wait_ready(Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e:#}\n{}", c.logs()));

    // Each node's IPv6 VTEP, under Calico's handle and annotations.
    for node in ["d1", "d2"] {
        let ann = wait_for(
            &format!("{node}'s IPv6 VXLAN tunnel address annotated"),
            Duration::from_secs(20),
            || {
                let json = c.kubectl(&["get", "node", node, "-o", "json"])?;
                let v: serde_json::Value = serde_json::from_str(&json)?;
                let ann = &v["metadata"]["annotations"];
                Ok((ann["projectcalico.org/IPv6VXLANTunnelAddr"].is_string()
                    && ann["projectcalico.org/VXLANTunnelMACAddrV6"].is_string())
                .then(|| ann.clone()))
            },
        )
        .unwrap_or_else(|e| panic!("{e:#}\n{}", c.logs()));
        let tunnel = ann["projectcalico.org/IPv6VXLANTunnelAddr"]
            .as_str()
            .unwrap();
        assert!(tunnel.starts_with("fd00:244:"), "{node}: {tunnel}");
        let handles = c.kubectl(&["get", "ipamhandles", "-o", "name"]).unwrap();
        assert!(
            handles.contains(&format!("vxlan-v6-tunnel-addr-{node}")),
            "{handles}"
        );
    }

    // The CNI config asks for both families, so each pod gets both.
    let p1 = c
        .add_pod("d1", "ds-one")
        .unwrap_or_else(|e| panic!("{e:#}\n{}", c.logs()));
    let p2 = c
        .add_pod("d2", "ds-two")
        .unwrap_or_else(|e| panic!("{e:#}\n{}", c.logs()));
    let (p1_v6, p2_v4, p2_v6) = (
        address_of(&p1, true),
        address_of(&p2, false),
        address_of(&p2, true),
    );
    assert!(address_of(&p1, false).starts_with("10.244."));

    for (what, target) in [("IPv4", &p2_v4), ("IPv6", &p2_v6)] {
        wait_for(
            &format!("d1's pod reaches d2's pod over {what}"),
            Duration::from_secs(20),
            || Ok(p1.ns.ping_once(target, 300).then_some(())),
        )
        .unwrap_or_else(|e| panic!("{e:#}\n{}", c.logs()));
    }
    assert!(p2.ns.ping_once(&p1_v6, 1000), "IPv6 back from d2 to d1");

    // The IPv6 block of d2 is routed through d1's vxlan-v6.calico device.
    let routes = c
        .topo
        .node("d1")
        .ns
        .run(&["ip", "-6", "route", "show", "proto", "84"])
        .unwrap();
    assert!(
        routes
            .lines()
            .any(|l| l.starts_with("fd00:244:") && l.contains("dev vxlan-v6.calico")),
        "no IPv6 block route over vxlan-v6.calico on d1:\n{routes}"
    );
    c.del_pod(&p1).unwrap();
    c.del_pod(&p2).unwrap();
}
