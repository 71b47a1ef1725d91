//! Kernel tests: tampering restored within a second, monitor overruns resynced, restart
//! without flush, foreign routes and links untouched, calico-node routes adopted in place.

#[path = "dataplane_support.rs"]
mod support;

use std::time::Duration;

use support::*;
use tortie_dataplane::{Config, Dataplane, RemoteBlock};
use tortie_e2e::{TopologySpec, require_root, wait_until};

const RESTORE_WITHIN: Duration = Duration::from_secs(1);

fn two_nodes() -> World {
    World::new(TopologySpec::new().segment(["a1", "a2"]).build().unwrap())
}

fn started(world: &World, i: usize, mode: Mode, config: Config) -> Dataplane {
    let dp = start(world.node(i), config);
    dp.set_desired(world.inputs(i, mode, false)).unwrap();
    dp.mark_complete();
    wait_for_mode(world, i, mode)
        .unwrap_or_else(|e| panic!("{e:#}\ndataplane counters: {:?}", dp.counters()));
    dp
}

/// Runs `tamper` in node `i`'s namespace and asserts the table returns to `mode` within 1 s.
fn assert_restored(world: &World, i: usize, mode: Mode, tamper: &[&str]) {
    let ns = &world.node(i).ns;
    ns.run(tamper).unwrap();
    let want = world.expected_routes(i, mode);
    let took = wait_until(
        &format!("restoring after {tamper:?}"),
        Duration::from_secs(5),
        || routes(ns, false).is_ok_and(|r| r == want),
    )
    .unwrap();
    assert!(
        took <= RESTORE_WITHIN,
        "{tamper:?} took {took:?} to be undone (limit {RESTORE_WITHIN:?})"
    );
}

#[test]
fn deleted_or_changed_routes_are_restored_within_a_second() {
    require_root();
    let world = two_nodes();
    let dp = started(&world, 0, NEVER, Config::default());
    let peer_block = block(1);
    let pod = format!("{}/32", pod_ip(0));
    let proto = PROTO.to_string();
    assert_restored(
        &world,
        0,
        NEVER,
        &["ip", "route", "del", &peer_block, "proto", &proto],
    );
    assert_restored(&world, 0, NEVER, &["ip", "route", "del", &pod]);
    assert_restored(
        &world,
        0,
        NEVER,
        &["ip", "route", "del", "blackhole", &block(0)],
    );
    // Same protocol, other next hop: replaced back.
    assert_restored(
        &world,
        0,
        NEVER,
        &[
            "ip",
            "route",
            "replace",
            &peer_block,
            "via",
            "10.77.0.99",
            "dev",
            "eth0",
            "proto",
            &proto,
        ],
    );
    // Somebody else's protocol took the slot: tortie takes it back.
    assert_restored(
        &world,
        0,
        NEVER,
        &[
            "ip",
            "route",
            "replace",
            &peer_block,
            "via",
            "10.77.0.99",
            "dev",
            "eth0",
        ],
    );
    let c = dp.counters();
    assert!(c.failures_by_errno.is_empty(), "{c:?}");
    assert!(c.routes_restored >= 5, "five repairs counted: {c:?}");
}

#[test]
fn vxlan_device_neighbours_and_fdb_are_restored() {
    require_root();
    let world = two_nodes();
    let _dp = started(&world, 0, VXLAN_ALWAYS, Config::default());
    let _peer = started(&world, 1, VXLAN_ALWAYS, Config::default());
    let ns = &world.node(0).ns;
    let (neigh, fdb_want) = world.expected_vxlan_entries(0, VXLAN_ALWAYS);
    let tunnel = tunnel_ip(1).to_string();
    ns.run(&["ip", "neigh", "del", &tunnel, "dev", "vxlan.calico"])
        .unwrap();
    let took = wait_until("neighbour restored", Duration::from_secs(5), || {
        neighbours(ns, "vxlan.calico").is_ok_and(|n| n == neigh)
    })
    .unwrap();
    assert!(took <= RESTORE_WITHIN, "neighbour took {took:?}");
    let mac = mac_string(&tortie_dataplane::vtep_mac_for("a2", false));
    let dst = world.node(1).addr.to_string();
    ns.run(&[
        "bridge",
        "fdb",
        "del",
        &mac,
        "dev",
        "vxlan.calico",
        "dst",
        &dst,
    ])
    .unwrap();
    let took = wait_until("FDB entry restored", Duration::from_secs(5), || {
        fdb(ns, "vxlan.calico").is_ok_and(|f| f == fdb_want)
    })
    .unwrap();
    assert!(took <= RESTORE_WITHIN, "FDB entry took {took:?}");
    // Link down flushes the routes through it without telling anyone: resync brings both back.
    ns.run(&["ip", "link", "set", "vxlan.calico", "down"])
        .unwrap();
    let took = wait_until("vxlan.calico up again", Duration::from_secs(5), || {
        ns.run(&["ip", "-j", "link", "show", "vxlan.calico"])
            .is_ok_and(|o| o.contains("\"UP\""))
    })
    .unwrap();
    assert!(took <= RESTORE_WITHIN, "link up took {took:?}");
    wait_for_mode(&world, 0, VXLAN_ALWAYS).unwrap();
    wait_until("pods ping over VXLAN again", Duration::from_secs(5), || {
        world.pods[0].ns.ping_once(&pod_ip(1).to_string(), 300)
    })
    .unwrap();
    // Deleting the device takes its routes, neighbours and FDB entries along: all come back.
    ns.run(&["ip", "link", "del", "vxlan.calico"]).unwrap();
    let want = world.expected_routes(0, VXLAN_ALWAYS);
    let took = wait_until(
        "device and routes recreated",
        Duration::from_secs(5),
        || {
            routes(ns, false).is_ok_and(|r| r == want)
                && neighbours(ns, "vxlan.calico").is_ok_and(|n| n == neigh)
                && fdb(ns, "vxlan.calico").is_ok_and(|f| f == fdb_want)
        },
    )
    .unwrap();
    assert!(
        took <= RESTORE_WITHIN,
        "recreating vxlan.calico took {took:?}"
    );
    wait_until(
        "pods ping over the new device",
        Duration::from_secs(5),
        || world.pods[0].ns.ping_once(&pod_ip(1).to_string(), 300),
    )
    .unwrap();
}

#[test]
fn monitor_overrun_triggers_a_full_resync_and_restoration_still_works() {
    require_root();
    let world = two_nodes();
    let config = Config {
        // The smallest buffer the kernel allows: a burst of notifications must overrun it.
        monitor_rcvbuf: 1,
        ..Config::default()
    };
    let dp = started(&world, 0, NEVER, config);
    let before = dp.counters();
    let ns = &world.node(0).ns;
    let batch: String = (0..4000)
        .map(|k| {
            format!(
                "route add 10.{}.{}.0/24 via {} dev eth0 proto static\n",
                100 + k / 256,
                k % 256,
                world.node(1).addr
            )
        })
        .collect();
    let file = std::env::temp_dir().join(format!("tortie-flood-{}.batch", std::process::id()));
    std::fs::write(&file, batch).unwrap();
    ns.run(&["ip", "-batch", file.to_str().unwrap()]).unwrap();
    let _ = std::fs::remove_file(&file);
    wait_until("an overrun and a resync", Duration::from_secs(5), || {
        let c = dp.counters();
        c.monitor_overruns > before.monitor_overruns && c.resyncs > before.resyncs
    })
    .unwrap();
    // The foreign flood is untouched, and tortie still restores its own routes.
    let statics = ns.run(&["ip", "route", "show", "proto", "static"]).unwrap();
    assert_eq!(statics.lines().count(), 4000);
    let proto = PROTO.to_string();
    assert_restored(
        &world,
        0,
        NEVER,
        &["ip", "route", "del", &block(1), "proto", &proto],
    );
}

#[test]
fn restart_keeps_routes_until_complete_then_removes_only_stale_ones() {
    require_root();
    let world = two_nodes();
    let stale = "10.244.9.0/26";
    let mut inputs = world.inputs(0, NEVER, false);
    inputs.remote_blocks.push(RemoteBlock {
        cidr: stale.parse().unwrap(),
        node_ip: world.node(1).addr.into(),
    });
    let _peer = started(&world, 1, NEVER, Config::default());
    let first = start(world.node(0), Config::default());
    first.set_desired(inputs).unwrap();
    first.mark_complete();
    let ns = &world.node(0).ns;
    let mut with_stale = world.expected_routes(0, NEVER);
    with_stale.insert(format!("{stale} via {} dev eth0", world.node(1).addr));
    wait_exact(
        "first run's table",
        Duration::from_secs(5),
        &with_stale,
        || routes(ns, false),
    )
    .unwrap();

    // The first packet waits for (proxy) ARP; only the steady state is measured.
    wait_until(
        "pods ping before the restart",
        Duration::from_secs(5),
        || world.pods[0].ns.ping_once(&pod_ip(1).to_string(), 300),
    )
    .unwrap();
    let ping = ContinuousPing::start(&world.pods[0], pod_ip(1));
    std::thread::sleep(Duration::from_millis(200)); // measurement window before the restart
    drop(first);
    assert_eq!(
        routes(ns, false).unwrap(),
        with_stale,
        "stopping must not flush"
    );
    let second = start(world.node(0), Config::default());
    let generation = second.set_desired(world.inputs(0, NEVER, false)).unwrap();
    wait_until(
        "second run applied its inputs",
        Duration::from_secs(5),
        || second.counters().generation_applied >= generation,
    )
    .unwrap();
    assert_eq!(
        routes(ns, false).unwrap(),
        with_stale,
        "nothing may be deleted before mark_complete"
    );
    second.mark_complete();
    wait_exact(
        "only the stale route removed",
        Duration::from_secs(5),
        &world.expected_routes(0, NEVER),
        || routes(ns, false),
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(200)); // measurement window after it
    let (sent, received) = ping.stop();
    assert!(sent > 5, "ping barely ran: {sent}");
    assert_eq!(sent, received, "pod traffic lost across the restart");
    assert_eq!(second.counters().writes, 1, "only the one stale delete");
}

#[test]
fn foreign_routes_and_links_are_never_touched() {
    require_root();
    let world = two_nodes();
    let ns = &world.node(0).ns;
    let peer = world.node(1).addr.to_string();
    // A foreign route in the way of a desired one, one elsewhere, and one of BIRD's.
    ns.run(&[
        "ip",
        "route",
        "add",
        &block(1),
        "via",
        &peer,
        "dev",
        "eth0",
        "proto",
        "static",
    ])
    .unwrap();
    ns.run(&[
        "ip",
        "route",
        "add",
        "10.99.0.0/24",
        "via",
        &peer,
        "dev",
        "eth0",
        "proto",
        "static",
    ])
    .unwrap();
    ns.run(&[
        "ip",
        "route",
        "add",
        "blackhole",
        "10.244.60.0/26",
        "proto",
        "bird",
    ])
    .unwrap();
    ns.run(&[
        "ip", "link", "add", "vxother", "type", "vxlan", "id", "7", "dstport", "4790", "dev",
        "eth0",
    ])
    .unwrap();
    let foreign_before = ns.run(&["ip", "route", "show"]).unwrap();

    let dp = start(world.node(0), Config::default());
    dp.set_desired(world.inputs(0, VXLAN_ALWAYS, false))
        .unwrap();
    dp.mark_complete();
    wait_until(
        "the blocked route reported by name and errno",
        Duration::from_secs(5),
        || {
            dp.counters()
                .recent_errors
                .iter()
                .any(|e| e.contains(&block(1)) && e.contains("errno 17"))
        },
    )
    .unwrap();
    assert!(dp.counters().failures_by_errno.contains_key(&17));
    // Desired state that wants nothing: tortie removes its own things only.
    let mut nothing = world.inputs(0, NEVER, false);
    nothing.workloads.clear();
    nothing.owned_blocks.clear();
    nothing.remote_blocks.clear();
    let generation = dp.set_desired(nothing).unwrap();
    wait_until(
        "empty desired state applied",
        Duration::from_secs(5),
        || dp.counters().generation_applied >= generation,
    )
    .unwrap();
    wait_until("tortie's routes gone", Duration::from_secs(5), || {
        routes(ns, false).is_ok_and(|r| r.is_empty())
    })
    .unwrap();
    wait_until("vxlan.calico gone", Duration::from_secs(5), || {
        !link_exists(ns, "vxlan.calico")
    })
    .unwrap();
    let foreign_after = ns.run(&["ip", "route", "show"]).unwrap();
    assert_eq!(foreign_before, foreign_after, "foreign routes changed");
    assert!(link_exists(ns, "vxother"), "foreign vxlan link removed");
}

#[test]
fn calico_node_routes_are_adopted_in_place_without_losing_a_packet() {
    require_root();
    let world = two_nodes();
    let _peer = started(&world, 1, NEVER, Config::default());
    let ns = &world.node(0).ns;
    let peer = world.node(1).addr.to_string();
    // What calico-node leaves behind: BIRD's block route and blackhole, the CNI's pod route.
    ns.run(&[
        "ip",
        "route",
        "add",
        &block(1),
        "via",
        &peer,
        "dev",
        "eth0",
        "proto",
        "bird",
    ])
    .unwrap();
    ns.run(&[
        "ip",
        "route",
        "add",
        "blackhole",
        &block(0),
        "proto",
        "bird",
    ])
    .unwrap();
    ns.run(&[
        "ip",
        "route",
        "add",
        &pod_ip(0).to_string(),
        "dev",
        &world.pods[0].host_if,
        "scope",
        "link",
    ])
    .unwrap();
    wait_until(
        "pods ping over calico's routes",
        Duration::from_secs(5),
        || world.pods[0].ns.ping_once(&pod_ip(1).to_string(), 300),
    )
    .unwrap();
    let ping = ContinuousPing::start(&world.pods[0], pod_ip(1));
    let config = Config {
        adopt_calico_routes: true,
        ..Config::default()
    };
    let dp = started(&world, 0, NEVER, config);
    std::thread::sleep(Duration::from_millis(200)); // measurement window after the switch
    let (sent, received) = ping.stop();
    assert_eq!(sent, received, "adoption lost pod traffic");
    assert_eq!(
        ns.run(&["ip", "route", "show", "proto", "bird"]).unwrap(),
        "",
        "BIRD's routes must now be tortie's"
    );
    assert_eq!(dp.counters().routes_adopted, 3, "{:?}", dp.counters());
    assert!(dp.counters().failures_by_errno.is_empty());
}

#[test]
fn periodic_resync_runs_on_its_interval_without_writing() {
    require_root();
    let world = two_nodes();
    let config = Config {
        resync_interval: Duration::from_millis(100),
        ..Config::default()
    };
    let dp = started(&world, 0, NEVER, config);
    let before = dp.counters();
    wait_until("three periodic resyncs", Duration::from_secs(5), || {
        dp.counters().resyncs >= before.resyncs + 3
    })
    .unwrap();
    let after = dp.counters();
    assert_eq!(
        after.writes, before.writes,
        "a resync of a matching kernel writes nothing: {after:?}"
    );
    assert_eq!(
        routes(&world.node(0).ns, false).unwrap(),
        world.expected_routes(0, NEVER)
    );
}
