//! Kernel tests: every route kind and every encapsulation mode, as `ip`/`bridge` show them,
//! with pod-to-pod pings proving the routes carry traffic.

#[path = "dataplane_support.rs"]
mod support;

use std::time::Duration;

use support::*;
use tortie_dataplane::{Config, RouteKind, vtep_mac_for};
use tortie_e2e::{TopologySpec, require_root, wait_until};

fn ping_ok(world: &World, from: usize, to: usize) {
    wait_until(
        &format!("pod {from} reaches pod {to}"),
        // Generous: the first packet waits for proxy ARP, and the machine may be loaded.
        Duration::from_secs(10),
        || world.pods[from].ns.ping_once(&pod_ip(to).to_string(), 300),
    )
    .unwrap();
}

#[test]
fn never_mode_installs_workload_blackhole_and_direct_routes_and_pods_ping() {
    require_root();
    let world = World::new(TopologySpec::new().segment(["a1", "a2"]).build().unwrap());
    let dps = world.start_all(NEVER);
    ping_ok(&world, 0, 1);
    ping_ok(&world, 1, 0);
    let c = dps[0].counters();
    assert_eq!(c.routes_by_kind[&RouteKind::Workload], 1, "{c:?}");
    assert_eq!(c.routes_by_kind[&RouteKind::Blackhole], 1, "{c:?}");
    assert_eq!(c.routes_by_kind[&RouteKind::Direct], 1, "{c:?}");
    assert!(c.failures_by_errno.is_empty(), "{c:?}");
    assert!(
        !link_exists(&world.node(0).ns, "vxlan.calico"),
        "Never needs no tunnel device"
    );
}

#[test]
fn ipv6_blocks_get_blackholes_and_direct_routes() {
    require_root();
    let world = World::new(TopologySpec::new().segment(["a1", "a2"]).build().unwrap());
    let dp = start(world.node(0), Config::default());
    dp.set_desired(world.inputs(0, NEVER, true)).unwrap();
    let want = [
        format!("blackhole {}", block6(0)),
        format!("{} via {} dev eth0", block6(1), world.node(1).addr6),
        format!("{} dev {}", pod_ip6(0), world.pods[0].host_if),
    ]
    .into_iter()
    .collect();
    wait_exact("IPv6 routes", Duration::from_secs(5), &want, || {
        routes(&world.node(0).ns, true)
    })
    .unwrap();
}

#[test]
fn vxlan_always_builds_device_neighbours_fdb_and_onlink_routes() {
    require_root();
    let world = World::new(
        TopologySpec::new()
            .segment(["a1", "a2"])
            .segment(["b1"])
            .router()
            .build()
            .unwrap(),
    );
    let dps: Vec<_> = (0..3)
        .map(|i| {
            let dp = start(world.node(i), Config::default());
            dp.set_desired(world.inputs(i, VXLAN_ALWAYS, true)).unwrap();
            dp.mark_complete();
            dp
        })
        .collect();
    for i in 0..3 {
        wait_for_mode(&world, i, VXLAN_ALWAYS).unwrap();
    }
    let ns = &world.node(0).ns;
    let link: serde_json::Value = serde_json::from_str(
        &ns.run(&["ip", "-d", "-j", "link", "show", "vxlan.calico"])
            .unwrap(),
    )
    .unwrap();
    let link = &link[0];
    let data = &link["linkinfo"]["info_data"];
    assert_eq!(link["mtu"], 1450, "{link}");
    assert_eq!(data["id"], 4096, "{link}");
    assert_eq!(data["port"], 4789, "{link}");
    assert_eq!(data["local"], world.node(0).addr.to_string(), "{link}");
    assert_eq!(data["learning"], false, "{link}");
    assert_eq!(
        link["address"],
        mac_string(&vtep_mac_for("a1", false)),
        "{link}"
    );
    assert!(
        link["flags"].as_array().unwrap().iter().any(|f| f == "UP"),
        "{link}"
    );
    let addrs = ns
        .run(&["ip", "-4", "addr", "show", "dev", "vxlan.calico"])
        .unwrap();
    assert!(
        addrs.contains(&format!("{}/32", tunnel_ip(0))),
        "tunnel address missing: {addrs}"
    );

    // IPv6: its own device, routes via the peers' IPv6 VTEPs.
    let v6 = serde_json::from_str::<serde_json::Value>(
        &ns.run(&["ip", "-d", "-j", "link", "show", "vxlan-v6.calico"])
            .unwrap(),
    )
    .unwrap();
    assert_eq!(v6[0]["mtu"], 1430, "{v6}");
    assert_eq!(
        v6[0]["linkinfo"]["info_data"]["local6"],
        world.node(0).addr6.to_string(),
        "{v6}"
    );
    let want6 = [
        format!("blackhole {}", block6(0)),
        format!("{} dev {}", pod_ip6(0), world.pods[0].host_if),
        format!(
            "{} via {} dev vxlan-v6.calico onlink",
            block6(1),
            tunnel_ip6(1)
        ),
        format!(
            "{} via {} dev vxlan-v6.calico onlink",
            block6(2),
            tunnel_ip6(2)
        ),
    ]
    .into_iter()
    .collect();
    wait_exact("IPv6 VXLAN routes", Duration::from_secs(5), &want6, || {
        routes(ns, true)
    })
    .unwrap();

    ping_ok(&world, 0, 1);
    ping_ok(&world, 0, 2);
    ping_ok(&world, 2, 1);
    let c = dps[0].counters();
    assert_eq!(c.routes_by_kind[&RouteKind::Vxlan], 4, "{c:?}");
    assert!(c.failures_by_errno.is_empty(), "{c:?}");

    // The devices as read back match what was asked: a full resync rewrites nothing.
    let before = dps[0].counters();
    dps[0].resync_now();
    wait_until("a resync", Duration::from_secs(5), || {
        dps[0].counters().resyncs > before.resyncs
    })
    .unwrap();
    let after = dps[0].counters();
    assert_eq!(
        after.writes, before.writes,
        "resync rewrote something: {after:?}"
    );
}

#[test]
fn vxlan_crosssubnet_keeps_same_segment_peer_direct_and_tunnels_across() {
    require_root();
    let world = World::new(
        TopologySpec::new()
            .segment(["a1", "a2"])
            .segment(["b1"])
            .router()
            .build()
            .unwrap(),
    );
    let _dps: Vec<_> = (0..3)
        .map(|i| {
            let dp = start(world.node(i), Config::default());
            dp.set_desired(world.inputs(i, VXLAN_CROSS, false)).unwrap();
            dp.mark_complete();
            dp
        })
        .collect();
    for i in 0..3 {
        wait_for_mode(&world, i, VXLAN_CROSS).unwrap();
    }
    let a1 = world.node(0);
    assert!(
        routes(&a1.ns, false).unwrap().contains(&format!(
            "{} via {} dev eth0",
            block(1),
            world.node(1).addr
        )),
        "same-segment peer must stay direct"
    );
    ping_ok(&world, 0, 1);
    ping_ok(&world, 0, 2);
    ping_ok(&world, 1, 2);
}

#[test]
fn ipip_modes_route_through_tunl0() {
    require_root();
    let world = World::new(
        TopologySpec::new()
            .segment(["a1", "a2"])
            .segment(["b1"])
            .router()
            .build()
            .unwrap(),
    );
    if !has_ipip(&world.node(0).ns) {
        eprintln!("{SKIP_NO_IPIP}");
        return;
    }
    let dps: Vec<_> = (0..3)
        .map(|i| start(world.node(i), Config::default()))
        .collect();
    for mode in [IPIP_ALWAYS, IPIP_CROSS] {
        for (i, dp) in dps.iter().enumerate() {
            dp.set_desired(world.inputs(i, mode, false)).unwrap();
            dp.mark_complete();
        }
        for i in 0..3 {
            wait_for_mode(&world, i, mode).unwrap();
        }
        let ns = &world.node(0).ns;
        let link: serde_json::Value =
            serde_json::from_str(&ns.run(&["ip", "-j", "link", "show", "tunl0"]).unwrap()).unwrap();
        assert_eq!(link[0]["mtu"], 1480, "{link}");
        assert!(
            link[0]["flags"]
                .as_array()
                .unwrap()
                .iter()
                .any(|f| f == "UP"),
            "{link}"
        );
        let addrs = ns
            .run(&["ip", "-4", "addr", "show", "dev", "tunl0"])
            .unwrap();
        assert!(addrs.contains(&format!("{}/32", tunnel_ip(0))), "{addrs}");
        ping_ok(&world, 0, 1);
        ping_ok(&world, 0, 2);
    }
}

#[test]
fn workload_route_waits_for_its_interface_and_follows_it_across_recreation() {
    require_root();
    let world = World::new(TopologySpec::new().segment(["a1", "a2"]).build().unwrap());
    let node = world.node(0);
    let late_ip = "10.244.1.9".parse().unwrap();
    let mut inputs = world.inputs(0, NEVER, false);
    inputs.workloads.push(tortie_dataplane::Workload {
        ip: late_ip,
        host_if: "cali9".into(),
    });
    let dp = start(node, Config::default());
    dp.set_desired(inputs).unwrap();
    dp.mark_complete();
    wait_for_mode(&world, 0, NEVER).unwrap();
    wait_until(
        "one route waiting for cali9",
        Duration::from_secs(5),
        || dp.counters().routes_waiting == 1,
    )
    .unwrap();
    let route = "10.244.1.9 dev cali9 scope link".to_string();
    for round in 0..2 {
        let late = tortie_e2e::Pod::attach_calico_style(
            node,
            "late",
            Some("cali9"),
            "10.244.1.9".parse().unwrap(),
        )
        .unwrap();
        let took = wait_until(
            &format!("route through cali9 (round {round})"),
            Duration::from_secs(5),
            || routes(&node.ns, false).is_ok_and(|r| r.contains(&route)),
        )
        .unwrap();
        assert!(took <= Duration::from_secs(1), "took {took:?}");
        wait_until("pod reaches the late pod", Duration::from_secs(5), || {
            world.pods[0].ns.ping_once("10.244.1.9", 300)
        })
        .unwrap();
        drop(late); // deletes the namespace, and with it the veth and the kernel's route
        wait_until("route gone with cali9", Duration::from_secs(5), || {
            routes(&node.ns, false).is_ok_and(|r| !r.contains(&route))
        })
        .unwrap();
        wait_until("waiting again", Duration::from_secs(5), || {
            dp.counters().routes_waiting == 1
        })
        .unwrap();
    }
    assert!(
        dp.counters().failures_by_errno.is_empty(),
        "{:?}",
        dp.counters()
    );
}

#[test]
fn ipv6_pods_ping_directly_on_a_segment_and_over_vxlan_v6_across() {
    require_root();
    let world = World::new(
        TopologySpec::new()
            .segment(["a1", "a2"])
            .segment(["b1"])
            .router()
            .build()
            .unwrap(),
    );
    world.add_ipv6_to_pods();
    let _dps: Vec<_> = (0..3)
        .map(|i| {
            let dp = start(world.node(i), Config::default());
            dp.set_desired(world.inputs(i, VXLAN_CROSS, true)).unwrap();
            dp.mark_complete();
            dp
        })
        .collect();
    let a1 = &world.node(0).ns;
    let want6 = [
        format!("blackhole {}", block6(0)),
        format!("{} dev {}", pod_ip6(0), world.pods[0].host_if),
        format!("{} via {} dev eth0", block6(1), world.node(1).addr6),
        format!(
            "{} via {} dev vxlan-v6.calico onlink",
            block6(2),
            tunnel_ip6(2)
        ),
    ]
    .into_iter()
    .collect();
    wait_exact("a1's IPv6 routes", Duration::from_secs(10), &want6, || {
        routes(a1, true)
    })
    .unwrap();
    for to in [1, 2] {
        wait_until(
            &format!("pod 0 reaches pod {to} over IPv6"),
            Duration::from_secs(10),
            || world.pods[0].ns.ping_once(&pod_ip6(to), 300),
        )
        .unwrap();
    }
}

#[test]
fn refused_routes_amid_unacked_batches_are_reported_by_name_and_errno_and_the_rest_installed() {
    use std::collections::BTreeSet;
    use std::sync::Arc;
    use tortie_dataplane::{DesiredRoute, DesiredState, Reconciler, RouteTarget};

    require_root();
    let ns = tortie_e2e::Netns::create("dp-attrib").unwrap();
    ns.sh("ip link add veth0 type veth peer name veth1 && ip link set veth0 up && ip link set veth1 up && ip addr add 10.0.0.1/24 dev veth0")
        .unwrap();
    // 5000 routes span three sends of at most 2048 (each asking for one ACK, from its last
    // request); refusals at the start, in the middle, on both sides of a send boundary and last.
    const ROUTES: usize = 5000;
    let dst = |k: usize| format!("10.{}.{}.0/24", 128 + k / 256, k % 256);
    let foreign: BTreeSet<usize> = [0, 1500, 2048, 4999].into();
    let unreachable: BTreeSet<usize> = [17, 2047, 3001].into();
    for k in &foreign {
        ns.sh(&format!(
            "ip route add {} via 10.0.0.9 dev veth0 proto static",
            dst(*k)
        ))
        .unwrap();
    }
    let foreign_before = ns.run(&["ip", "route", "show", "proto", "static"]).unwrap();
    let target = |k: usize| RouteTarget::Gateway {
        // Outside veth0's subnet without onlink: the kernel refuses it (ENETUNREACH).
        via: if unreachable.contains(&k) {
            "192.0.2.1".parse().unwrap()
        } else {
            "10.0.0.2".parse().unwrap()
        },
        ifname: Arc::from("veth0"),
        onlink: false,
    };
    let mut desired = DesiredState::default();
    for k in 0..ROUTES {
        let route = DesiredRoute {
            target: target(k),
            kind: RouteKind::Direct,
        };
        desired.routes.insert(dst(k).parse().unwrap(), route);
    }

    let (report, counters) = ns
        .enter(|| {
            let mut r = Reconciler::new(Config::default()).unwrap();
            r.resync().unwrap();
            r.mark_complete();
            r.set_desired(desired);
            let report = r.reconcile().unwrap();
            (report, r.counters().clone())
        })
        .unwrap();

    let refused: BTreeSet<(&str, String, i32)> = report
        .failures
        .iter()
        .map(|f| (f.op, f.object.clone(), f.nack.errno))
        .collect();
    let mut want = BTreeSet::new();
    for k in &foreign {
        let object = format!("route {} via 10.0.0.2 dev veth0", dst(*k));
        want.insert(("add", object, libc::EEXIST));
    }
    for k in &unreachable {
        let object = format!("route {} via 192.0.2.1 dev veth0", dst(*k));
        want.insert(("add", object, libc::ENETUNREACH));
    }
    assert_eq!(refused, want);
    assert_eq!(report.failures.len(), want.len(), "a route reported twice");
    let wrong = foreign.len() + unreachable.len();
    assert_eq!(report.writes, ROUTES - wrong);
    assert_eq!(
        counters.failures_by_errno[&libc::EEXIST],
        foreign.len() as u64
    );
    assert_eq!(
        counters.failures_by_errno[&libc::ENETUNREACH],
        unreachable.len() as u64
    );

    // In the kernel: every other route, as tortie's, and the foreign ones untouched.
    let installed: BTreeSet<String> = ns
        .run(&["ip", "route", "show", "proto", &PROTO.to_string()])
        .unwrap()
        .lines()
        .map(|l| l.split_whitespace().next().unwrap_or_default().to_owned())
        .collect();
    let expected: BTreeSet<String> = (0..ROUTES)
        .filter(|k| !foreign.contains(k) && !unreachable.contains(k))
        .map(dst)
        .collect();
    assert_eq!(installed.len(), expected.len());
    assert_eq!(installed, expected);
    let foreign_after = ns.run(&["ip", "route", "show", "proto", "static"]).unwrap();
    assert_eq!(foreign_before, foreign_after, "foreign routes changed");
}
