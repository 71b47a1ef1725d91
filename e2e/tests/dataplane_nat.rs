//! Kernel tests of natOutgoing: a Calico-style pod on a node whose segment also holds an
//! "outside" host with no route back to the pods. Masquerading is proven by traffic (a reply
//! that can only come back to the node's address) and by counters on the outside host; the
//! table is checked with `nft`, and a foreign table must come through byte-for-byte.

use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tortie_dataplane::nat::{NatChange, NatInputs, NatOutgoing, NatSet};
use tortie_e2e::{Netns, Node, Pod, Topology, TopologySpec, require_root, wait_until};

const POD_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 5);
const POOL: &str = "10.244.0.0/16";
const OTHER_POOL: &str = "10.245.0.0/16";
const OTHER_POOL_ADDR: &str = "10.245.0.1";

struct World {
    topo: Topology,
    pod: Pod,
}

impl World {
    /// `node` with the pod (and its host route, the routing layer's job in the product) and
    /// `outside` on the same segment, whose only way off the segment is a gateway that does
    /// not exist: it cannot answer a pod address, only the node's.
    fn new() -> World {
        let topo = TopologySpec::new()
            .segment(["node", "outside"])
            .build()
            .unwrap();
        let node = topo.node("node");
        let pod = Pod::attach_calico_style(node, "nat", None, POD_IP).unwrap();
        node.ns
            .run(&[
                "ip",
                "route",
                "add",
                &format!("{POD_IP}/32"),
                "dev",
                &pod.host_if,
            ])
            .unwrap();
        install_probe(&topo.node("outside").ns, node.addr).unwrap();
        World { topo, pod }
    }

    fn node(&self) -> &Node {
        self.topo.node("node")
    }

    fn outside(&self) -> &Node {
        self.topo.node("outside")
    }

    fn nat(&self) -> NatOutgoing {
        self.node().ns.enter(NatOutgoing::open).unwrap().unwrap()
    }

    fn pod_reaches(&self, addr: &str) -> Result<Duration> {
        wait_until(
            &format!("pod {POD_IP} reaches {addr}"),
            Duration::from_secs(5),
            || self.pod.ns.ping_once(addr, 300),
        )
    }
}

fn inputs(masquerade: &[&str], all_pools: &[&str]) -> NatInputs {
    NatInputs {
        masquerade: masquerade.iter().map(|s| s.parse().unwrap()).collect(),
        all_pools: all_pools.iter().map(|s| s.parse().unwrap()).collect(),
    }
}

/// Counters on the outside host's input path: IPv4 echo requests from the node's address,
/// and from pod addresses.
fn install_probe(ns: &Netns, node_addr: Ipv4Addr) -> Result<()> {
    install_probe_table(
        ns,
        "probe",
        &format!("ip saddr {node_addr}"),
        &format!("ip saddr {POOL}"),
        "icmp",
    )
}

fn install_probe_table(
    ns: &Netns,
    table: &str,
    from_node: &str,
    from_pods: &str,
    icmp: &str,
) -> Result<()> {
    ns.sh(&format!(
        "nft -f - <<'EOF'
table inet {table} {{
    chain input {{
        type filter hook input priority 0; policy accept;
        {from_node} {icmp} type echo-request counter
        {from_pods} {icmp} type echo-request counter
    }}
}}
EOF"
    ))?;
    Ok(())
}

/// (echo requests seen from the node's address, echo requests seen from pod addresses).
fn probe_counts(ns: &Netns) -> Result<(u64, u64)> {
    probe_table_counts(ns, "probe")
}

fn probe_table_counts(ns: &Netns, table: &str) -> Result<(u64, u64)> {
    let json = ns.run(&["nft", "-j", "list", "table", "inet", table])?;
    let v: serde_json::Value = serde_json::from_str(&json).context("nft -j output")?;
    let mut counts = Vec::new();
    for item in v["nftables"].as_array().into_iter().flatten() {
        let Some(exprs) = item["rule"]["expr"].as_array() else {
            continue;
        };
        for e in exprs {
            if let Some(p) = e["counter"]["packets"].as_u64() {
                counts.push(p);
            }
        }
    }
    match counts[..] {
        [from_node, from_pods] => Ok((from_node, from_pods)),
        _ => bail!("expected two counters in table {table}, got {counts:?}: {json}"),
    }
}

fn table_text(ns: &Netns) -> Result<String> {
    ns.run(&["nft", "list", "table", "inet", "tortie-nat"])
}

fn table_exists(ns: &Netns) -> bool {
    ns.run(&["nft", "list", "tables"])
        .map(|t| t.contains("table inet tortie-nat"))
        .unwrap_or(false)
}

#[test]
fn masqueraded_pod_reaches_outside_host_that_has_no_route_back() {
    require_root();
    let world = World::new();
    let mut nat = world.nat();
    assert_eq!(
        nat.apply(&inputs(&[POOL], &[POOL])).unwrap(),
        NatChange::Created
    );
    let outside = world.outside().addr.to_string();
    world.pod_reaches(&outside).unwrap();
    let (from_node, from_pods) = probe_counts(&world.outside().ns).unwrap();
    assert!(
        from_node >= 1 && from_pods == 0,
        "outside host must see the node's address only: from node {from_node}, from pods {from_pods}"
    );
}

#[test]
fn nft_reads_the_table_as_calicos_rule_with_both_families() {
    require_root();
    let world = World::new();
    let mut nat = world.nat();
    nat.apply(&inputs(
        &[POOL, "fd44::/48"],
        &[OTHER_POOL, "fd45::/48", "10.96.0.0/12"],
    ))
    .unwrap();
    let text = table_text(&world.node().ns).unwrap();
    for want in [
        "type nat hook postrouting priority srcnat; policy accept;",
        "ip saddr @masq-pools-v4 ip daddr != @all-pools-v4 masquerade fully-random",
        "ip6 saddr @masq-pools-v6 ip6 daddr != @all-pools-v6 masquerade fully-random",
        "elements = { 10.244.0.0/16 }",
        // The two touching /16s are one merged range.
        "elements = { 10.96.0.0/12, 10.244.0.0/15 }",
        "elements = { fd44::/48 }",
        "elements = { fd44::/48,",
        "fd45::/48 }",
    ] {
        assert!(text.contains(want), "missing {want:?} in:\n{text}");
    }
}

#[test]
fn traffic_to_another_pool_keeps_the_pod_source() {
    require_root();
    let world = World::new();
    let (node, outside) = (world.node(), world.outside());
    // The outside host also serves a second pool and, like a peer node, routes pods back.
    outside
        .ns
        .run(&[
            "ip",
            "addr",
            "add",
            &format!("{OTHER_POOL_ADDR}/32"),
            "dev",
            "lo",
        ])
        .unwrap();
    outside
        .ns
        .run(&["ip", "route", "add", POOL, "via", &node.addr.to_string()])
        .unwrap();
    node.ns
        .run(&[
            "ip",
            "route",
            "add",
            OTHER_POOL,
            "via",
            &outside.addr.to_string(),
        ])
        .unwrap();
    let mut nat = world.nat();
    nat.apply(&inputs(&[POOL], &[POOL, OTHER_POOL])).unwrap();

    world.pod_reaches(OTHER_POOL_ADDR).unwrap();
    let (from_node, from_pods) = probe_counts(&outside.ns).unwrap();
    assert!(
        from_node == 0 && from_pods >= 1,
        "pool-to-pool traffic must keep its pod source: from node {from_node}, from pods {from_pods}"
    );

    world.pod_reaches(&outside.addr.to_string()).unwrap();
    let (from_node_after, from_pods_after) = probe_counts(&outside.ns).unwrap();
    assert!(
        from_node_after >= 1 && from_pods_after == from_pods,
        "traffic leaving the pools is masqueraded: from node {from_node_after}, from pods {from_pods_after} (was {from_pods})"
    );
}

#[test]
fn nat_outgoing_off_removes_the_table_and_outside_becomes_unreachable() {
    require_root();
    let world = World::new();
    let outside = world.outside().addr.to_string();
    let mut nat = world.nat();
    // Off from the start: nothing is created.
    assert_eq!(
        nat.apply(&inputs(&[], &[POOL])).unwrap(),
        NatChange::Unchanged
    );
    assert!(!table_exists(&world.node().ns));
    assert!(
        !world.pod.ns.ping_once(&outside, 500),
        "without masquerading the outside host cannot answer a pod"
    );

    nat.apply(&inputs(&[POOL], &[POOL])).unwrap();
    world.pod_reaches(&outside).unwrap();

    assert_eq!(
        nat.apply(&inputs(&[], &[POOL])).unwrap(),
        NatChange::Removed
    );
    assert!(
        !table_exists(&world.node().ns),
        "table left behind: {:?}",
        table_text(&world.node().ns)
    );
    for attempt in 0..2 {
        assert!(
            !world.pod.ns.ping_once(&outside, 500),
            "attempt {attempt}: ping succeeded with natOutgoing off"
        );
    }
    assert_eq!(nat.remove().unwrap(), NatChange::Unchanged);
}

#[test]
fn foreign_table_is_untouched_by_apply_change_and_remove() {
    require_root();
    let world = World::new();
    let ns = &world.node().ns;
    ns.sh("nft -f - <<'EOF'
table inet foreign {
    set blocked { type ipv4_addr; flags interval; elements = { 192.0.2.0/24 } }
    chain postrouting {
        type nat hook postrouting priority srcnat + 10; policy accept;
        ip daddr @blocked counter
    }
}
EOF")
        .unwrap();
    let before = ns
        .run(&["nft", "-j", "list", "table", "inet", "foreign"])
        .unwrap();
    let mut nat = world.nat();
    nat.apply(&inputs(&[POOL], &[POOL])).unwrap();
    nat.apply(&inputs(&[POOL], &[POOL, OTHER_POOL])).unwrap();
    assert_eq!(nat.remove().unwrap(), NatChange::Removed);
    let after = ns
        .run(&["nft", "-j", "list", "table", "inet", "foreign"])
        .unwrap();
    assert_eq!(before, after, "the foreign table changed");
}

#[test]
fn reapplying_the_same_inputs_writes_nothing() {
    require_root();
    let world = World::new();
    let mut nat = world.nat();
    let pools = inputs(&[POOL, "fd44::/48"], &[POOL, OTHER_POOL]);
    assert_eq!(nat.apply(&pools).unwrap(), NatChange::Created);
    let generation = nat.generation().unwrap();
    let sent = nat.messages_sent();
    for _ in 0..3 {
        assert_eq!(nat.apply(&pools).unwrap(), NatChange::Unchanged);
    }
    assert_eq!(nat.messages_sent(), sent, "a no-op apply sent messages");
    assert_eq!(
        nat.generation().unwrap(),
        generation,
        "a no-op apply committed a transaction"
    );

    // A changed pool list is one transaction refilling only the set that differs.
    assert_eq!(
        nat.apply(&inputs(&[POOL, "fd44::/48"], &[POOL])).unwrap(),
        NatChange::SetsReplaced(vec![NatSet::AllPoolsV4])
    );
    assert_eq!(nat.generation().unwrap(), generation.wrapping_add(1));
}

#[test]
fn tampered_table_is_rebuilt_and_flushed_set_refilled() {
    require_root();
    let world = World::new();
    let ns = &world.node().ns;
    let mut nat = world.nat();
    let pools = inputs(&[POOL], &[POOL]);
    nat.apply(&pools).unwrap();
    let outside = world.outside().addr.to_string();

    ns.run(&["nft", "flush", "set", "inet", "tortie-nat", "masq-pools-v4"])
        .unwrap();
    assert_eq!(
        nat.apply(&pools).unwrap(),
        NatChange::SetsReplaced(vec![NatSet::MasqueradeV4])
    );
    world.pod_reaches(&outside).unwrap();

    ns.run(&[
        "nft",
        "insert",
        "rule",
        "inet",
        "tortie-nat",
        "postrouting",
        "ip",
        "saddr",
        POOL,
        "accept",
    ])
    .unwrap();
    assert_eq!(nat.apply(&pools).unwrap(), NatChange::Rebuilt);
    let text = table_text(ns).unwrap();
    assert!(
        !text.contains(&format!("ip saddr {POOL} accept"))
            && text.matches("masquerade").count() == 2,
        "stray rule survived or masquerade rules missing:\n{text}"
    );

    ns.run(&[
        "nft",
        "delete",
        "chain",
        "inet",
        "tortie-nat",
        "postrouting",
    ])
    .unwrap();
    assert_eq!(nat.apply(&pools).unwrap(), NatChange::Rebuilt);
    assert_eq!(nat.apply(&pools).unwrap(), NatChange::Unchanged);
    world.pod_reaches(&outside).unwrap();
}

#[test]
fn hundreds_of_pools_span_several_messages_and_read_back_equal() {
    require_root();
    let world = World::new();
    let mut nat = world.nat();
    // 600 separate /24s: 1200 interval elements, more than one message and one dump datagram.
    let pools: Vec<String> = (0..600u32)
        .map(|i| format!("10.{}.{}.0/24", 100 + i / 100, (i % 100) * 2))
        .collect();
    let pools: Vec<&str> = pools.iter().map(String::as_str).collect();
    let many = inputs(&pools, &pools);
    assert_eq!(nat.apply(&many).unwrap(), NatChange::Created);
    let actual = nat.read_actual().unwrap();
    let table = actual.table.expect("table exists");
    assert!(table.structure_matches);
    assert_eq!(table.elements[&NatSet::MasqueradeV4].len(), 1200);
    let sent = nat.messages_sent();
    let started = std::time::Instant::now();
    assert_eq!(nat.apply(&many).unwrap(), NatChange::Unchanged);
    eprintln!(
        "no-op apply with 1200 elements per set took {:?}",
        started.elapsed()
    );
    assert_eq!(nat.messages_sent(), sent);
    let text = table_text(&world.node().ns).unwrap();
    assert!(
        text.contains("10.100.0.0/24") && text.contains("10.105.198.0/24"),
        "first or last pool missing"
    );
}

#[test]
fn kernel_refusal_names_the_set_and_errno_and_the_socket_stays_usable() {
    require_root();
    let world = World::new();
    let mut nat = world.nat();
    // Refilling a set of a table that does not exist: the kernel refuses the flush.
    let err = nat
        .execute(&tortie_dataplane::nat::Plan::ReplaceSets(vec![(
            NatSet::MasqueradeV4,
            vec![],
        )]))
        .unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("flush set inet tortie-nat masq-pools-v4")
            && text.contains(&format!("errno {}", libc::ENOENT)),
        "{text}"
    );
    assert!(!table_exists(&world.node().ns));
    assert_eq!(
        nat.apply(&inputs(&[POOL], &[POOL])).unwrap(),
        NatChange::Created
    );
}

#[test]
fn ipv6_pod_is_masqueraded_to_the_node_address() {
    require_root();
    let world = World::new();
    let (node, outside) = (world.node(), world.outside());
    let pod6 = "fd44::5";
    // Calico's IPv6 wiring: /128 on the pod, default route via the host veth's link-local
    // address, and a /128 route on the host.
    let gateway = node
        .ns
        .run(&[
            "ip",
            "-6",
            "-o",
            "addr",
            "show",
            "dev",
            &world.pod.host_if,
            "scope",
            "link",
        ])
        .unwrap();
    let gateway = gateway
        .split_whitespace()
        .skip_while(|w| *w != "inet6")
        .nth(1)
        .and_then(|a| a.split('/').next())
        .unwrap_or_else(|| panic!("host veth has no link-local address: {gateway}"))
        .to_owned();
    world
        .pod
        .ns
        .run(&[
            "ip",
            "-6",
            "addr",
            "add",
            &format!("{pod6}/128"),
            "dev",
            "eth0",
            "nodad",
        ])
        .unwrap();
    world
        .pod
        .ns
        .run(&[
            "ip", "-6", "route", "add", "default", "via", &gateway, "dev", "eth0",
        ])
        .unwrap();
    node.ns
        .run(&[
            "ip",
            "-6",
            "route",
            "add",
            &format!("{pod6}/128"),
            "dev",
            &world.pod.host_if,
        ])
        .unwrap();
    install_probe_table(
        &outside.ns,
        "probe6",
        &format!("ip6 saddr {}", node.addr6),
        "ip6 saddr fd44::/48",
        "icmpv6",
    )
    .unwrap();
    let mut nat = world.nat();
    nat.apply(&inputs(&[POOL, "fd44::/48"], &[POOL, "fd44::/48"]))
        .unwrap();
    // The host veth's link-local address passes DAD first; hence the longer deadline.
    wait_until(
        &format!("pod {pod6} reaches {}", outside.addr6),
        Duration::from_secs(10),
        || world.pod.ns.ping_once(&outside.addr6.to_string(), 300),
    )
    .unwrap();
    let (from_node, from_pods) = probe_table_counts(&outside.ns, "probe6").unwrap();
    assert!(
        from_node >= 1 && from_pods == 0,
        "outside host must see the node's IPv6 address only: from node {from_node}, from pods {from_pods}"
    );
}
