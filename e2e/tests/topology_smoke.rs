//! The test bed's own smoke tests: segments, the router and pods are real.

use std::time::Duration;

use tortie_e2e::{Pod, TopologySpec, require_root, wait_until};

#[test]
fn nodes_on_different_segments_ping_through_the_router() {
    require_root();
    let topo = TopologySpec::new()
        .segment(["a1", "a2"])
        .segment(["b1"])
        .router()
        .build()
        .unwrap();
    let a1 = topo.node("a1");
    let a2 = topo.node("a2");
    let b1 = topo.node("b1");
    assert_ne!(a1.segment, b1.segment);
    wait_until(
        "a1 reaches a2 on its own segment",
        Duration::from_secs(5),
        || a1.ns.ping_once(&a2.addr.to_string(), 300),
    )
    .unwrap();
    wait_until(
        "a1 reaches b1 across the router",
        Duration::from_secs(5),
        || a1.ns.ping_once(&b1.addr.to_string(), 300),
    )
    .unwrap();
    // The cross-segment path really goes through the router: a1's route to b1 is via the gateway.
    let route = a1
        .ns
        .run(&["ip", "route", "get", &b1.addr.to_string()])
        .unwrap();
    let gw = a1.gateway.unwrap().to_string();
    assert!(
        route.contains(&format!("via {gw}")),
        "expected via {gw}, kernel says: {route}"
    );
    wait_until("IPv6 across the router", Duration::from_secs(5), || {
        a1.ns.ping_once(&b1.addr6.to_string(), 300)
    })
    .unwrap();
}

#[test]
fn segments_without_a_router_are_isolated() {
    require_root();
    let topo = TopologySpec::new()
        .segment(["a1"])
        .segment(["b1"])
        .build()
        .unwrap();
    let (a1, b1) = (topo.node("a1"), topo.node("b1"));
    // Give a1 a route to b1's subnet so the only missing piece is the router.
    a1.ns
        .run(&["ip", "route", "add", "10.77.1.0/24", "dev", "eth0"])
        .unwrap();
    assert!(
        !a1.ns.ping_once(&b1.addr.to_string(), 300),
        "segments must not be bridged together"
    );
}

#[test]
fn calico_style_pods_on_one_node_ping_once_host_routes_exist() {
    require_root();
    let topo = TopologySpec::new().segment(["n1"]).build().unwrap();
    let n1 = topo.node("n1");
    let p1 = Pod::attach_calico_style(n1, "p1", None, "10.200.0.1".parse().unwrap()).unwrap();
    let p2 = Pod::attach_calico_style(n1, "p2", None, "10.200.0.2".parse().unwrap()).unwrap();
    assert!(
        !p1.ns.ping_once("10.200.0.2", 200),
        "no host routes yet, so no path"
    );
    for p in [&p1, &p2] {
        let ip = p.ip.unwrap().to_string();
        n1.ns
            .run(&[
                "ip",
                "route",
                "add",
                &format!("{ip}/32"),
                "dev",
                &p.host_if,
                "scope",
                "link",
            ])
            .unwrap();
    }
    wait_until("pod to pod on one node", Duration::from_secs(5), || {
        p1.ns.ping_once("10.200.0.2", 300)
    })
    .unwrap();
}

#[test]
fn dropping_the_topology_removes_its_namespaces() {
    require_root();
    let names: Vec<String> = {
        let topo = TopologySpec::new().segment(["x"]).router().build().unwrap();
        vec![
            topo.fabric.name().to_owned(),
            topo.node("x").ns.name().to_owned(),
        ]
    };
    let left = tortie_e2e::netns::list_ours();
    for n in names {
        assert!(!left.contains(&n), "{n} survived the drop");
    }
}
