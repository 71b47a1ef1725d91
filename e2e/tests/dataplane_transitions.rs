//! Kernel test: the encapsulation mode changes Never → IPIP Always → IPIP CrossSubnet →
//! VXLAN Always → VXLAN CrossSubnet → Never, each producing exactly the expected tables while
//! pods keep pinging every 10 ms across the switch.

#[path = "dataplane_support.rs"]
mod support;

use std::time::Duration;

use support::*;
use tortie_dataplane::EncapMode;
use tortie_e2e::{TopologySpec, require_root, wait_until};

/// Packets a pair may lose across one switch. Each node switches on its own: for the few
/// milliseconds between one node replacing its route and its peer creating its VXLAN device,
/// tunnelled packets have no receiver. The route replace itself is atomic (no gap).
const LOSS_BUDGET: u64 = 5;
/// How long each ping runs before and after a switch: a measurement window, not a wait.
const WINDOW: Duration = Duration::from_millis(300);

fn tunnels_across(mode: Mode) -> bool {
    mode.ipip != EncapMode::Never || mode.vxlan != EncapMode::Never
}

#[test]
fn mode_transitions_replace_routes_exactly_while_pods_keep_pinging() {
    require_root();
    let world = World::new(
        TopologySpec::new()
            .segment(["a1", "a2"])
            .segment(["b1"])
            .router()
            .build()
            .unwrap(),
    );
    let ipip = has_ipip(&world.node(0).ns);
    let dps = world.start_all(NEVER);
    wait_until("same-segment pods ping", Duration::from_secs(5), || {
        world.pods[0].ns.ping_once(&pod_ip(1).to_string(), 300)
    })
    .unwrap();

    let mut current = NEVER;
    let mut switches = 0;
    for next in [IPIP_ALWAYS, IPIP_CROSS, VXLAN_ALWAYS, VXLAN_CROSS, NEVER] {
        if next.ipip != EncapMode::Never && !ipip {
            eprintln!("{SKIP_NO_IPIP} (transition step {current:?} -> {next:?})");
            continue;
        }
        let same = ContinuousPing::start(&world.pods[0], pod_ip(1));
        let across = (tunnels_across(current) && tunnels_across(next))
            .then(|| ContinuousPing::start(&world.pods[0], pod_ip(2)));
        std::thread::sleep(WINDOW);
        for (i, dp) in dps.iter().enumerate() {
            dp.set_desired(world.inputs(i, next, false)).unwrap();
        }
        for i in 0..3 {
            wait_for_mode(&world, i, next).unwrap();
        }
        std::thread::sleep(WINDOW);
        let (sent, received) = same.stop();
        eprintln!(
            "switch {current:?} -> {next:?}: same-segment pods lost {} of {sent}",
            sent - received
        );
        assert!(sent > 20, "ping barely ran: {sent} sent");
        assert!(
            sent - received <= LOSS_BUDGET,
            "{current:?} -> {next:?}: same-segment pods lost {} of {sent} packets",
            sent - received
        );
        if let Some(ping) = across {
            let (sent, received) = ping.stop();
            eprintln!(
                "switch {current:?} -> {next:?}: cross-segment pods lost {} of {sent}",
                sent - received
            );
            assert!(
                sent - received <= LOSS_BUDGET,
                "{current:?} -> {next:?}: cross-segment pods lost {} of {sent} packets",
                sent - received
            );
        }
        // Cross-segment pods talk whenever the mode tunnels across.
        if tunnels_across(next) {
            wait_until("cross-segment pods ping", Duration::from_secs(5), || {
                world.pods[0].ns.ping_once(&pod_ip(2).to_string(), 300)
            })
            .unwrap();
        }
        for dp in &dps {
            let c = dp.counters();
            assert!(c.failures_by_errno.is_empty(), "kernel refused: {c:?}");
        }
        current = next;
        switches += 1;
    }
    assert!(switches >= 3, "VXLAN steps must always run");
    // Back in Never: no tunnel device is left behind.
    for i in 0..3 {
        let ns = &world.node(i).ns;
        wait_until("vxlan.calico removed", Duration::from_secs(5), || {
            !link_exists(ns, "vxlan.calico")
        })
        .unwrap();
    }
}
