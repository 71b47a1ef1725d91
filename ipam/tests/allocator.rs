//! Allocator behaviour against the in-memory store, with the store invariants checked after every operation.

mod common;

use std::collections::BTreeMap;
use std::future::Future;
use std::net::IpAddr;

use common::*;
use tortie_ipam::{
    AffinityState, AllowedUse, AutoAssignRequest, BlockAffinity, Faults, IpPool, Ipam, IpamBlock,
    IpamError, IpamHandle, MemoryStore, RetryPolicy, TunnelKind, attr, new_block, pod_handle_id,
    workload_attributes,
};

/// Runs one operation to completion, then checks every invariant of the store.
fn run<T>(store: &MemoryStore, fut: impl Future<Output = T>) -> T {
    let out = block_on(fut);
    check_quiescent(store);
    out
}

fn req(handle: &str, node: &str, v4: usize, v6: usize) -> AutoAssignRequest {
    AutoAssignRequest {
        handle_id: handle.to_string(),
        attributes: workload_attributes("default", handle, node, "2026-11-28 04:00:00 +0000 UTC"),
        node: node.to_string(),
        num_v4: v4,
        num_v6: v6,
        ..AutoAssignRequest::default()
    }
}

#[test]
fn first_assign_claims_block_with_confirmed_affinity_and_handle() {
    let (store, ipam) = new_ipam(&[pool("p", "10.244.0.0/16", 26)], None);
    let got = run(
        &store,
        ipam.auto_assign(&req("k8s-pod-network.abc", "node-1", 1, 0)),
    )
    .unwrap();
    assert_eq!(got.ipv4.len(), 1);
    assert!(got.ipv6.is_empty());

    let blocks = store.snapshot::<IpamBlock>();
    assert_eq!(blocks.len(), 1);
    let block = &blocks[0];
    let cidr = net(&block.spec.cidr);
    assert_eq!(cidr.prefix_len(), 26);
    assert!(cidr.contains(&got.ipv4[0]));
    assert_eq!(
        block.metadata.name,
        cidr.to_string().replace(['.', '/'], "-")
    );
    assert_eq!(block.spec.affinity.as_deref(), Some("host:node-1"));
    assert_eq!(
        got.ipv4[0],
        cidr.network(),
        "first address comes from the front of the free list"
    );

    let affs = affinities_of(&store, "node-1");
    assert_eq!(affs.len(), 1);
    assert_eq!(affs[0].spec.state, AffinityState::Confirmed);
    assert_eq!(affs[0].spec.deleted, "false");
    assert_eq!(
        affs[0].metadata.name,
        format!("node-1-{}", block.metadata.name)
    );

    let handle = &store.snapshot::<IpamHandle>()[0];
    assert_eq!(handle.metadata.name, "k8s-pod-network.abc");
    assert_eq!(handle.spec.block.get(&block.spec.cidr), Some(&1));

    let attrs = block.spec.attribute_at(0).unwrap();
    assert_eq!(attrs.handle_id.as_deref(), Some("k8s-pod-network.abc"));
    let secondary = attrs.secondary.as_ref().unwrap();
    assert_eq!(
        secondary.get(attr::NODE).map(String::as_str),
        Some("node-1")
    );
    assert_eq!(
        secondary.get(attr::NAMESPACE).map(String::as_str),
        Some("default")
    );
}

#[test]
fn next_assign_reuses_affine_block_then_claims_another_when_full() {
    let (store, ipam) = new_ipam(&[pool("p", "10.0.0.0/24", 29)], None);
    let mut all = Vec::new();
    for i in 0..9 {
        let got = run(&store, ipam.auto_assign(&req(&format!("h{i}"), "n1", 1, 0))).unwrap();
        all.extend(got.ipv4);
    }
    let blocks = store.snapshot::<IpamBlock>();
    assert_eq!(
        blocks.len(),
        2,
        "8 addresses fill one /29, the 9th needs a second block"
    );
    assert!(blocks.iter().all(|b| b.spec.affine_node() == Some("n1")));
    all.sort();
    all.dedup();
    assert_eq!(all.len(), 9);
    assert_eq!(run(&store, ipam.host_blocks("n1")).unwrap().len(), 2);
}

#[test]
fn host_at_block_limit_borrows_when_not_strict() {
    let (store, ipam) = new_ipam(&[pool("p", "10.0.0.0/28", 30)], Some(config(false, 1)));
    // n2 owns a block with room.
    run(&store, ipam.auto_assign(&req("b0", "n2", 1, 0))).unwrap();
    // n1 fills its single block (4 addresses), then must borrow.
    for i in 0..4 {
        run(&store, ipam.auto_assign(&req(&format!("a{i}"), "n1", 1, 0))).unwrap();
    }
    let borrowed = run(&store, ipam.auto_assign(&req("a4", "n1", 1, 0))).unwrap();
    assert_eq!(
        affinities_of(&store, "n1").len(),
        1,
        "n1 stays within maxBlocksPerHost"
    );
    let n2_block = net(&affinities_of(&store, "n2")[0].spec.cidr);
    assert!(
        n2_block.contains(&borrowed.ipv4[0]),
        "borrowed from n2's block"
    );
}

#[test]
fn strict_affinity_never_borrows_and_leaves_nothing_behind() {
    let (store, ipam) = new_ipam(&[pool("p", "10.0.0.0/28", 30)], Some(config(true, 1)));
    run(&store, ipam.auto_assign(&req("b0", "n2", 1, 0))).unwrap();
    for i in 0..4 {
        run(&store, ipam.auto_assign(&req(&format!("a{i}"), "n1", 1, 0))).unwrap();
    }
    let err = run(&store, ipam.auto_assign(&req("a4", "n1", 1, 0))).unwrap_err();
    assert!(
        matches!(
            err,
            IpamError::Exhausted {
                requested: 1,
                found: 0,
                ..
            }
        ),
        "{err}"
    );
    assert!(run(&store, ipam.ips_by_handle("a4")).unwrap().is_empty());
    assert!(
        store
            .snapshot::<IpamHandle>()
            .iter()
            .all(|h| h.spec.handle_id != "a4")
    );
}

#[test]
fn full_pool_borrows_from_other_hosts_blocks() {
    // One /30 pool = one block; n2 takes it, n1 can only borrow.
    let (store, ipam) = new_ipam(&[pool("p", "10.0.0.0/30", 30)], None);
    run(&store, ipam.auto_assign(&req("b0", "n2", 1, 0))).unwrap();
    let got = run(&store, ipam.auto_assign(&req("a0", "n1", 2, 0))).unwrap();
    assert_eq!(got.ipv4.len(), 2);
    assert!(
        affinities_of(&store, "n1").is_empty(),
        "no affinity from borrowing"
    );
    let err = run(&store, ipam.auto_assign(&req("a1", "n1", 2, 0))).unwrap_err();
    assert!(
        matches!(err, IpamError::Exhausted { found: 1, .. }),
        "{err}"
    );
    assert!(
        run(&store, ipam.ips_by_handle("a1")).unwrap().is_empty(),
        "partial result undone"
    );
}

#[test]
fn disabled_pool_keeps_existing_allocations_but_assigns_nothing_new() {
    let (store, ipam) = new_ipam(&[pool("a", "10.1.0.0/24", 26)], None);
    let before = run(&store, ipam.auto_assign(&req("h0", "n1", 1, 0))).unwrap();
    let mut disabled = pool("a", "10.1.0.0/24", 26);
    disabled.spec.disabled = Some(true);
    store.put(&disabled);
    let err = run(&store, ipam.auto_assign(&req("h1", "n1", 1, 0))).unwrap_err();
    assert!(matches!(err, IpamError::NoPool { family: 4, .. }), "{err}");
    assert_eq!(run(&store, ipam.ips_by_handle("h0")).unwrap(), before.ipv4);
    let err = run(
        &store,
        ipam.assign_ip(ip("10.1.0.9"), "h2", &BTreeMap::new(), "n1"),
    )
    .unwrap_err();
    assert!(matches!(err, IpamError::NotInPool(_)), "{err}");

    store.put(&pool("b", "10.2.0.0/24", 26));
    let got = run(&store, ipam.auto_assign(&req("h1", "n1", 1, 0))).unwrap();
    assert!(net("10.2.0.0/24").contains(&got.ipv4[0]));
}

#[test]
fn node_selector_and_allowed_uses_pick_the_pool() {
    let mut zone_a = pool("zone-a", "10.1.0.0/24", 26);
    zone_a.spec.node_selector = Some("zone == 'a'".into());
    let mut tunnel_only = pool("tunnels", "10.9.0.0/24", 26);
    tunnel_only.spec.allowed_uses = Some(vec!["Tunnel".into()]);
    let (store, ipam) = new_ipam(&[zone_a, tunnel_only], None);

    let mut r = req("h0", "n1", 1, 0);
    r.node_labels = labels(&[("zone", "a")]);
    let got = run(&store, ipam.auto_assign(&r)).unwrap();
    assert!(net("10.1.0.0/24").contains(&got.ipv4[0]));

    let mut r = req("h1", "n2", 1, 0);
    r.node_labels = labels(&[("zone", "b")]);
    let err = run(&store, ipam.auto_assign(&r)).unwrap_err();
    assert!(
        matches!(
            err,
            IpamError::NoPool {
                use_: AllowedUse::Workload,
                ..
            }
        ),
        "a tunnel-only pool is not used for pods: {err}"
    );
}

#[test]
fn invalid_pools_are_skipped_while_good_ones_work() {
    let mut bad = pool("a-bad", "10.1.0.0/24", 26);
    bad.spec.ipip_mode = Some("Sometimes".into());
    let huge = pool("b-huge-block", "10.3.0.0/16", 40);
    let (store, ipam) = new_ipam(&[bad, huge, pool("c-good", "10.2.0.0/24", 26)], None);
    let set = run(&store, ipam.pools()).unwrap();
    let fields: Vec<_> = set
        .invalid
        .iter()
        .map(|e| (e.pool.as_str(), e.field))
        .collect();
    assert_eq!(
        fields,
        [("a-bad", "ipipMode"), ("b-huge-block", "blockSize")]
    );
    let got = run(&store, ipam.auto_assign(&req("h", "n1", 1, 0))).unwrap();
    assert!(net("10.2.0.0/24").contains(&got.ipv4[0]));
}

#[test]
fn dual_stack_assign_and_all_or_nothing_on_v6_shortfall() {
    let (store, ipam) = new_ipam(
        &[pool("v4", "10.0.0.0/24", 26), pool("v6", "fd00::/122", 122)],
        None,
    );
    let got = run(&store, ipam.auto_assign(&req("h0", "n1", 1, 1))).unwrap();
    assert!(got.ipv6[0].is_ipv6() && got.ipv4[0].is_ipv4());
    let v6_block = store
        .snapshot::<IpamBlock>()
        .into_iter()
        .find(|b| b.spec.cidr.contains(':'))
        .unwrap();
    assert_eq!(v6_block.metadata.name, "fd00---122");

    let err = run(&store, ipam.auto_assign(&req("h1", "n1", 1, 64))).unwrap_err();
    assert!(
        matches!(
            err,
            IpamError::Exhausted {
                family: 6,
                found: 63,
                ..
            }
        ),
        "{err}"
    );
    assert!(
        run(&store, ipam.ips_by_handle("h1")).unwrap().is_empty(),
        "v4 part released too"
    );
}

#[test]
fn assign_specific_ip_claims_its_block_and_rejects_duplicates() {
    let (store, ipam) = new_ipam(&[pool("p", "10.0.0.0/24", 26)], None);
    let attrs = workload_attributes("ns", "pod", "n1", "t");
    run(&store, ipam.assign_ip(ip("10.0.0.77"), "h1", &attrs, "n1")).unwrap();
    let block = &store.snapshot::<IpamBlock>()[0];
    assert_eq!(block.metadata.name, "10-0-0-64-26");
    assert_eq!(block.spec.affine_node(), Some("n1"));
    assert_eq!(
        run(&store, ipam.ips_by_handle("h1")).unwrap(),
        vec![ip("10.0.0.77")]
    );

    let err = run(&store, ipam.assign_ip(ip("10.0.0.77"), "h2", &attrs, "n2")).unwrap_err();
    match err {
        IpamError::AlreadyAssigned { holder, .. } => assert_eq!(holder.as_deref(), Some("h1")),
        other => panic!("expected AlreadyAssigned, got {other}"),
    }
    let err = run(
        &store,
        ipam.assign_ip(ip("192.168.1.1"), "h3", &attrs, "n1"),
    )
    .unwrap_err();
    assert!(matches!(err, IpamError::NotInPool(_)));
    // Auto-assign skips the taken address.
    let got = run(&store, ipam.auto_assign(&req("h4", "n1", 64, 0))).unwrap();
    assert!(!got.ipv4.contains(&ip("10.0.0.77")));
}

#[test]
fn release_by_handle_frees_every_address_and_is_idempotent() {
    let (store, ipam) = new_ipam(&[pool("p", "10.0.0.0/24", 29)], None);
    let got = run(&store, ipam.auto_assign(&req("multi", "n1", 10, 0))).unwrap();
    assert_eq!(got.ipv4.len(), 10, "spans two /29 blocks");
    run(&store, ipam.auto_assign(&req("other", "n1", 1, 0))).unwrap();
    let mut released = run(&store, ipam.release_by_handle("multi")).unwrap();
    released.sort();
    let mut expected = got.ipv4.clone();
    expected.sort();
    assert_eq!(released, expected);
    assert!(
        run(&store, ipam.release_by_handle("multi"))
            .unwrap()
            .is_empty()
    );
    assert_eq!(allocations(&store).len(), 1);
}

#[test]
fn release_by_address_lowers_handle_count_and_deletes_empty_handle() {
    let (store, ipam) = new_ipam(&[pool("p", "10.0.0.0/24", 26)], None);
    let got = run(&store, ipam.auto_assign(&req("h", "n1", 2, 0))).unwrap();
    assert_eq!(
        run(&store, ipam.release_ips(&got.ipv4[..1])).unwrap(),
        got.ipv4[..1]
    );
    assert_eq!(
        store.snapshot::<IpamHandle>()[0]
            .spec
            .block
            .values()
            .sum::<i64>(),
        1
    );
    assert_eq!(
        run(&store, ipam.release_ips(&got.ipv4[..1])).unwrap(),
        Vec::<IpAddr>::new()
    );
    run(&store, ipam.release_ips(&got.ipv4[1..])).unwrap();
    assert!(store.snapshot::<IpamHandle>().is_empty());
    // Release appends to the free list: the next assignment does not reuse the address at once.
    let next = run(&store, ipam.auto_assign(&req("h2", "n1", 1, 0))).unwrap();
    assert!(!got.ipv4.contains(&next.ipv4[0]));
}

#[test]
fn emptied_block_releases_its_affinity_but_host_keeps_its_last_block() {
    let (store, ipam) = new_ipam(&[pool("p", "10.0.0.0/24", 30)], None);
    for i in 0..6 {
        run(&store, ipam.auto_assign(&req(&format!("h{i}"), "n1", 1, 0))).unwrap();
    }
    assert_eq!(affinities_of(&store, "n1").len(), 2);
    // h4 and h5 live in the second block; releasing both empties it.
    let second: Vec<IpAddr> = run(&store, ipam.ips_by_handle("h4"))
        .unwrap()
        .into_iter()
        .chain(run(&store, ipam.ips_by_handle("h5")).unwrap())
        .collect();
    run(&store, ipam.release_by_handle("h4")).unwrap();
    run(&store, ipam.release_by_handle("h5")).unwrap();
    let affs = affinities_of(&store, "n1");
    assert_eq!(affs.len(), 1, "emptied block's affinity released");
    assert!(!net(&affs[0].spec.cidr).contains(&second[0]));
    assert_eq!(
        store.snapshot::<IpamBlock>().len(),
        1,
        "emptied block deleted"
    );

    for i in 0..4 {
        run(&store, ipam.release_by_handle(&format!("h{i}"))).unwrap();
    }
    assert_eq!(
        affinities_of(&store, "n1").len(),
        1,
        "the host keeps its last block"
    );
    assert_eq!(store.snapshot::<IpamBlock>().len(), 1);
    assert!(allocations(&store).is_empty());
}

#[test]
fn release_node_frees_addresses_and_blocks_but_keeps_others_borrowed_addresses() {
    let mut ipip = pool("p", "10.0.0.0/29", 30);
    ipip.spec.ipip_mode = Some("Always".into());
    let (store, ipam) = new_ipam(&[ipip], None);
    let tunnel = run(
        &store,
        ipam.ensure_tunnel_address("n1", &labels(&[]), TunnelKind::Ipip),
    )
    .unwrap()
    .unwrap();
    run(&store, ipam.auto_assign(&req("pod-a", "n1", 1, 0))).unwrap();
    // n2 claims the other block, fills it, then borrows from n1's block.
    let n2 = run(&store, ipam.auto_assign(&req("pod-b", "n2", 6, 0))).unwrap();
    let n1_block = net(&affinities_of(&store, "n1")[0].spec.cidr);
    let borrowed: Vec<IpAddr> = n2
        .ipv4
        .iter()
        .copied()
        .filter(|a| n1_block.contains(a))
        .collect();
    assert_eq!(borrowed.len(), 2);

    let report = run(&store, ipam.release_node("n1")).unwrap();
    assert!(report.released.contains(&tunnel));
    assert_eq!(report.released.len(), 2, "tunnel + pod-a");
    assert_eq!(report.blocks_unaffined, vec![n1_block]);
    assert!(affinities_of(&store, "n1").is_empty());
    assert!(run(&store, ipam.host_blocks("n1")).unwrap().is_empty());
    let remaining = allocations(&store);
    assert_eq!(
        remaining.len(),
        6,
        "n2's addresses, including borrowed ones, stay"
    );
    let unaffined = store
        .snapshot::<IpamBlock>()
        .into_iter()
        .find(|b| net(&b.spec.cidr) == n1_block)
        .unwrap();
    assert_eq!(unaffined.spec.affinity, None);

    // Releasing the borrowed addresses deletes the now-unowned empty block.
    run(&store, ipam.release_by_handle("pod-b")).unwrap();
    assert!(
        store
            .snapshot::<IpamBlock>()
            .iter()
            .all(|b| net(&b.spec.cidr) != n1_block)
    );
}

#[test]
fn tunnel_addresses_use_calico_handles_and_are_stable() {
    let mut vx = pool("vx", "10.5.0.0/24", 26);
    vx.spec.vxlan_mode = Some("Always".into());
    let (store, ipam) = new_ipam(&[vx, pool("plain", "10.6.0.0/24", 26)], None);
    assert_eq!(TunnelKind::Ipip.handle_id("n1"), "ipip-tunnel-addr-n1");
    let none = run(
        &store,
        ipam.ensure_tunnel_address("n1", &labels(&[]), TunnelKind::Ipip),
    )
    .unwrap();
    assert_eq!(none, None, "no IPIP pool");
    let a = run(
        &store,
        ipam.ensure_tunnel_address("n1", &labels(&[]), TunnelKind::Vxlan),
    )
    .unwrap()
    .unwrap();
    assert!(net("10.5.0.0/24").contains(&a));
    let b = run(
        &store,
        ipam.ensure_tunnel_address("n1", &labels(&[]), TunnelKind::Vxlan),
    )
    .unwrap()
    .unwrap();
    assert_eq!(a, b, "existing tunnel address kept");
    assert_eq!(
        run(&store, ipam.ips_by_handle("vxlan-tunnel-addr-n1")).unwrap(),
        vec![a]
    );
    let block = &store.snapshot::<IpamBlock>()[0];
    let secondary = block
        .spec
        .attribute_at(0)
        .unwrap()
        .secondary
        .clone()
        .unwrap();
    assert_eq!(
        secondary.get(attr::TYPE).map(String::as_str),
        Some(attr::TYPE_VXLAN_TUNNEL)
    );

    // VXLAN switched off on the pool: the address goes.
    let mut off = store
        .snapshot::<IpPool>()
        .into_iter()
        .find(|p| p.metadata.name == "vx")
        .unwrap();
    off.spec.vxlan_mode = Some("Never".into());
    store.put(&off);
    let gone = run(
        &store,
        ipam.ensure_tunnel_address("n1", &labels(&[]), TunnelKind::Vxlan),
    )
    .unwrap();
    assert_eq!(gone, None);
    assert!(allocations(&store).is_empty());
}

#[test]
fn ipv6_vxlan_tunnel_address_comes_from_an_ipv6_vxlan_pool_under_calicos_handle() {
    let mut vx4 = pool("vx4", "10.5.0.0/24", 26);
    vx4.spec.vxlan_mode = Some("Always".into());
    let mut vx6 = pool("vx6", "fd00:5::/120", 122);
    vx6.spec.vxlan_mode = Some("Always".into());
    let (store, ipam) = new_ipam(&[vx4, vx6], None);
    assert_eq!(
        TunnelKind::VxlanV6.handle_id("n1"),
        "vxlan-v6-tunnel-addr-n1"
    );
    let v6 = run(
        &store,
        ipam.ensure_tunnel_address("n1", &labels(&[]), TunnelKind::VxlanV6),
    )
    .unwrap()
    .unwrap();
    assert!(net("fd00:5::/120").contains(&v6), "{v6}");
    let v4 = run(
        &store,
        ipam.ensure_tunnel_address("n1", &labels(&[]), TunnelKind::Vxlan),
    )
    .unwrap()
    .unwrap();
    assert!(v4.is_ipv4());
    let held = allocations(&store);
    assert_eq!(
        held.get(&v6).map(String::as_str),
        Some("vxlan-v6-tunnel-addr-n1")
    );
    let block = store
        .snapshot::<IpamBlock>()
        .into_iter()
        .find(|b| b.spec.cidr.starts_with("fd00"))
        .unwrap();
    let secondary = block
        .spec
        .attribute_at(0)
        .unwrap()
        .secondary
        .clone()
        .unwrap();
    assert_eq!(
        secondary.get(attr::TYPE).map(String::as_str),
        Some(attr::TYPE_VXLAN_V6_TUNNEL)
    );
    // Released with the node, as the IPv4 ones.
    let report = run(&store, ipam.release_node("n1")).unwrap();
    assert!(report.released.contains(&v6) && report.released.contains(&v4));
}

#[test]
fn pod_handles_are_calico_compatible() {
    assert_eq!(pod_handle_id("0123abcd"), "k8s-pod-network.0123abcd");
}

#[test]
fn corrupt_block_is_never_written() {
    let (store, ipam) = new_ipam(&[pool("p", "10.0.0.0/24", 26)], None);
    let mut corrupt = new_block(net("10.0.0.0/26"), Some("n1"));
    corrupt.spec.unallocated.push(0); // ordinal 0 listed twice
    let corrupt = store.put(&corrupt);
    store.put(&BlockAffinity::new(
        "n1-10-0-0-0-26",
        tortie_ipam::BlockAffinitySpec {
            state: AffinityState::Confirmed,
            node: "n1".into(),
            cidr: "10.0.0.0/26".into(),
            deleted: "false".into(),
            extra: Default::default(),
        },
    ));
    let got = block_on(ipam.auto_assign(&req("h", "n1", 1, 0))).unwrap();
    assert!(
        !net("10.0.0.0/26").contains(&got.ipv4[0]),
        "a new block was claimed instead"
    );
    let after = store
        .snapshot::<IpamBlock>()
        .into_iter()
        .find(|b| b.metadata.name == "10-0-0-0-26")
        .unwrap();
    assert_eq!(after, corrupt, "corrupt block untouched");
}

#[test]
fn injected_conflicts_are_retried_and_state_stays_consistent() {
    let (store, ipam) = new_ipam(&[pool("p", "10.0.0.0/24", 28)], None);
    store.set_faults(Faults {
        conflict_one_in: 3,
        seed: 7,
        yield_before_each_op: false,
        ambiguous_one_in: 0,
    });
    let mut held = Vec::new();
    for i in 0..40 {
        let got = run(&store, ipam.auto_assign(&req(&format!("h{i}"), "n1", 1, 0))).unwrap();
        held.extend(got.ipv4);
        if i % 3 == 0 {
            run(&store, ipam.release_by_handle(&format!("h{}", i / 2))).unwrap();
        }
    }
    assert!(store.stats().injected_conflicts > 10, "{:?}", store.stats());
    held.sort();
    let live = allocations(&store);
    assert!(live.len() <= 40);
}

#[test]
fn endless_conflicts_end_in_a_bounded_error() {
    let store = std::sync::Arc::new(MemoryStore::new());
    store.put(&pool("p", "10.0.0.0/24", 26));
    let ipam = Ipam::with_retry(
        store.clone(),
        RetryPolicy {
            max_attempts: 5,
            ..RetryPolicy::default()
        },
    );
    block_on(ipam.auto_assign(&req("h", "n1", 1, 0))).unwrap();
    store.set_faults(Faults {
        conflict_one_in: 1,
        seed: 1,
        yield_before_each_op: false,
        ambiguous_one_in: 0,
    });
    let before = store.stats();
    let err = block_on(ipam.auto_assign(&req("h2", "n1", 1, 0))).unwrap_err();
    assert!(matches!(err, IpamError::TooManyConflicts { .. }), "{err}");
    let calls = store.stats().gets - before.gets;
    assert!(calls < 200, "retries are bounded, made {calls} reads");
    check_always(&store);
}

#[test]
fn concurrent_claims_of_the_only_block_leave_one_owner_and_no_pending_affinity() {
    let mut raced = 0;
    for seed in 0..200u64 {
        let (store, ipam) = new_ipam(&[pool("p", "10.0.0.0/26", 26)], Some(config(true, 5)));
        store.set_faults(Faults {
            conflict_one_in: 0,
            seed,
            yield_before_each_op: true,
            ambiguous_one_in: 0,
        });
        let tasks: Vec<Task<'_>> = ["n1", "n2", "n3"]
            .iter()
            .map(|node| {
                let ipam = &ipam;
                Box::pin(async move {
                    match ipam
                        .auto_assign(&req(&format!("h-{node}"), node, 1, 0))
                        .await
                    {
                        Ok(_) | Err(IpamError::Exhausted { .. }) => Ok(()),
                        Err(e) => Err(e.to_string()),
                    }
                }) as Task<'_>
            })
            .collect();
        let results = run_interleaved(tasks, seed, || check_always(&store));
        assert!(
            results.iter().all(Result::is_ok),
            "seed {seed}: {results:?}"
        );
        check_quiescent(&store);
        let affs = store.snapshot::<BlockAffinity>();
        assert_eq!(affs.len(), 1, "seed {seed}: exactly one owner: {affs:#?}");
        assert_eq!(affs[0].spec.state, AffinityState::Confirmed);
        let owner = affs[0].spec.node.clone();
        assert_eq!(
            allocations(&store).len(),
            1,
            "seed {seed}: strict affinity, only {owner} got one"
        );
        // The winner creates affinity, block and handle; more creates mean a loser got as far as
        // its pending affinity and had to undo it.
        if store.stats().creates > 3 {
            raced += 1;
        }
    }
    assert!(
        raced > 10,
        "the lost-race path ran in only {raced} of 200 interleavings"
    );
}

#[test]
fn calico_written_state_is_usable_and_preserved() {
    let store = std::sync::Arc::new(MemoryStore::new());
    let load = |name: &str| -> serde_json::Value {
        let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    };
    let pool: IpPool = serde_json::from_value(load("ippool-default-ipv4.json")).unwrap();
    let block: IpamBlock = serde_json::from_value(load("ipamblock-ipv4.json")).unwrap();
    let aff: BlockAffinity = serde_json::from_value(load("blockaffinity-confirmed.json")).unwrap();
    let handle: IpamHandle = serde_json::from_value(load("ipamhandle-pod.json")).unwrap();
    let tunnel: IpamHandle = serde_json::from_value(load("ipamhandle-tunnel.json")).unwrap();
    let coredns = IpamHandle::new(
        "k8s-pod-network.88b1e0aa42",
        tortie_ipam::IpamHandleSpec {
            handle_id: "k8s-pod-network.88b1e0aa42".into(),
            block: [("10.244.1.0/26".to_string(), 1)].into(),
            deleted: None,
            extra: Default::default(),
        },
    );
    for_each_put(&store, &pool, &block, &aff, &[handle, tunnel, coredns]);
    let ipam = Ipam::new(store.clone());
    check_quiescent(&store);

    let got = run(
        &store,
        ipam.auto_assign(&req("k8s-pod-network.new", "node-1", 1, 0)),
    )
    .unwrap();
    assert_eq!(
        got.ipv4,
        vec![ip("10.244.1.5")],
        "front of Calico's free list"
    );
    let released = run(&store, ipam.release_by_handle("k8s-pod-network.3f2a9c1d7e")).unwrap();
    assert_eq!(released, vec![ip("10.244.1.1"), ip("10.244.1.4")]);
    assert_eq!(
        run(
            &store,
            ipam.ensure_tunnel_address("node-1", &labels(&[]), TunnelKind::Ipip)
        )
        .unwrap(),
        Some(ip("10.244.1.0")),
        "Calico's tunnel address is recognised and kept"
    );

    let after = store
        .snapshot::<IpamBlock>()
        .into_iter()
        .find(|b| b.metadata.name == "10-244-1-0-26")
        .unwrap();
    assert_eq!(
        after.metadata.extra.get("uid"),
        block.metadata.extra.get("uid")
    );
    assert_eq!(after.metadata.annotations, block.metadata.annotations);
    assert_eq!(
        after.spec.unallocated[after.spec.unallocated.len() - 2..],
        [1, 4]
    );
}

fn for_each_put(
    store: &MemoryStore,
    pool: &IpPool,
    block: &IpamBlock,
    aff: &BlockAffinity,
    handles: &[IpamHandle],
) {
    store.put(pool);
    store.put(block);
    store.put(aff);
    for h in handles {
        store.put(h);
    }
}

#[test]
fn conflict_retries_back_off_with_bounded_jittered_delays() {
    let store = std::sync::Arc::new(MemoryStore::new());
    store.put(&pool("p", "10.0.0.0/24", 26));
    let policy = RetryPolicy {
        max_attempts: 16,
        base_delay: std::time::Duration::from_millis(2),
        max_delay: std::time::Duration::from_millis(50),
    };
    let ipam = Ipam::with_retry(store.clone(), policy);
    store.set_faults(Faults {
        conflict_one_in: 2,
        seed: 3,
        yield_before_each_op: false,
        ambiguous_one_in: 0,
    });
    for i in 0..20 {
        run(&store, ipam.auto_assign(&req(&format!("h{i}"), "n1", 1, 0))).unwrap();
    }
    let delays = store.backoff_delays();
    assert!(
        delays.len() > 10,
        "conflicts caused backoffs: {}",
        delays.len()
    );
    assert!(
        delays.iter().all(|d| *d <= policy.max_delay),
        "capped at max_delay"
    );
    let distinct: std::collections::BTreeSet<_> = delays.iter().collect();
    assert!(
        distinct.len() > delays.len() / 2,
        "jittered, not a fixed schedule"
    );
}

#[test]
fn assign_and_release_with_an_affine_block_costs_four_writes() {
    let (store, ipam) = new_ipam(&[pool("p", "10.0.0.0/24", 26)], None);
    run(&store, ipam.auto_assign(&req("resident", "n1", 1, 0))).unwrap();
    let before = store.stats();
    run(&store, ipam.auto_assign(&req("pod", "n1", 1, 0))).unwrap();
    let mid = store.stats();
    run(&store, ipam.release_by_handle("pod")).unwrap();
    let after = store.stats();
    // Assign: create handle, update block. Release: update block, delete handle.
    assert_eq!(mid.writes() - before.writes(), 2, "{before:?} -> {mid:?}");
    assert_eq!(after.writes() - mid.writes(), 2, "{mid:?} -> {after:?}");
    let reads = |s: tortie_ipam::StoreStats| s.gets + s.lists;
    assert!(
        reads(mid) - reads(before) <= 4,
        "assign reads: {}",
        reads(mid) - reads(before)
    );
    assert!(
        reads(after) - reads(mid) <= 3,
        "release reads: {}",
        reads(after) - reads(mid)
    );
}

#[test]
fn a_promised_release_rides_on_the_next_assignments_block_write() {
    let (store, ipam) = new_ipam(&[pool("p", "10.0.0.0/24", 26)], None);
    run(&store, ipam.assign_once(&req("resident", "n1", 1, 0))).unwrap();
    let gone = run(&store, ipam.assign_once(&req("gone", "n1", 1, 0))).unwrap();
    let before = store.stats();
    let next = block_on(ipam.assign_once(&AutoAssignRequest {
        release_with: vec!["gone".into(), "never-assigned".into()],
        ..req("next", "n1", 1, 0)
    }))
    .unwrap();
    let mid = store.stats();
    assert_eq!(next.released, vec!["gone".to_string()]);
    // One block write holds both the release and the assignment, beside the new handle.
    assert_eq!(mid.updates - before.updates, 1, "{before:?} -> {mid:?}");
    assert_eq!(mid.writes() - before.writes(), 2, "{before:?} -> {mid:?}");
    let held = allocations(&store);
    assert!(!held.contains_key(&gone.ipv4[0]), "{held:?}");
    assert_eq!(held.get(&next.ipv4[0]).map(String::as_str), Some("next"));
    // What is left of the release is the handle object: one delete.
    let freed = run(&store, ipam.forget_handle("gone")).unwrap();
    assert!(freed.is_empty(), "nothing left to free: {freed:?}");
    assert_eq!(store.stats().writes() - mid.writes(), 1);
    assert!(run(&store, ipam.ips_by_handle("gone")).unwrap().is_empty());
}

#[test]
fn a_promised_release_in_a_block_not_written_is_left_for_a_release_by_handle() {
    let (store, ipam) = new_ipam(
        &[pool("v4", "10.0.0.0/24", 26), pool("v6", "fd00::/120", 122)],
        None,
    );
    let gone = run(&store, ipam.assign_once(&req("gone", "n1", 1, 1))).unwrap();
    let next = block_on(ipam.assign_once(&AutoAssignRequest {
        release_with: vec!["gone".into()],
        ..req("next", "n1", 1, 0)
    }))
    .unwrap();
    assert!(
        next.released.is_empty(),
        "its IPv6 address is still held: {next:?}"
    );
    let held = allocations(&store);
    assert!(!held.contains_key(&gone.ipv4[0]));
    assert!(held.contains_key(&gone.ipv6[0]));
    let freed = run(&store, ipam.release_by_handle("gone")).unwrap();
    assert_eq!(freed, gone.ipv6);
}

#[test]
fn a_full_block_makes_room_from_promised_releases_before_claiming_another() {
    let (store, ipam) = new_ipam(&[pool("p", "10.0.0.0/24", 29)], None);
    for i in 0..8 {
        run(&store, ipam.assign_once(&req(&format!("h{i}"), "n1", 1, 0))).unwrap();
    }
    let next = block_on(ipam.assign_once(&AutoAssignRequest {
        release_with: vec!["h3".into()],
        ..req("next", "n1", 1, 0)
    }))
    .unwrap();
    assert_eq!(next.released, vec!["h3".to_string()]);
    assert_eq!(store.snapshot::<IpamBlock>().len(), 1, "no second block");
    run(&store, ipam.forget_handle("h3")).unwrap();
}

#[test]
fn forgetting_a_handle_still_held_in_a_block_releases_it_too() {
    // The safety net of a carried release whose report was wrong: the blocks' own records
    // are released whether or not the handle object is there.
    let (store, ipam) = new_ipam(&[pool("p", "10.0.0.0/24", 26)], None);
    run(&store, ipam.assign_once(&req("resident", "n1", 1, 0))).unwrap();
    let held = run(&store, ipam.assign_once(&req("held", "n1", 1, 0))).unwrap();
    let freed = run(&store, ipam.forget_handle("held")).unwrap();
    assert_eq!(freed, held.ipv4);
    // Again, with the handle object gone: nothing left, no error.
    assert!(run(&store, ipam.forget_handle("held")).unwrap().is_empty());
    assert_eq!(allocations(&store).len(), 1);
}

#[test]
fn releasing_many_handles_writes_each_block_once() {
    let (store, ipam) = new_ipam(&[pool("p", "10.0.0.0/24", 26)], None);
    run(&store, ipam.assign_once(&req("resident", "n1", 1, 0))).unwrap();
    let handles: Vec<String> = (0..6).map(|i| format!("pod-{i}")).collect();
    let mut ips = Vec::new();
    for h in &handles {
        ips.extend(
            run(&store, ipam.assign_once(&req(h, "n1", 1, 0)))
                .unwrap()
                .ipv4,
        );
    }
    let mut asked = handles.clone();
    asked.push("unknown".into());
    let before = store.stats();
    let mut freed = run(&store, ipam.release_handles(&asked)).unwrap();
    let after = store.stats();
    freed.sort();
    ips.sort();
    assert_eq!(freed, ips);
    assert_eq!(after.updates - before.updates, 1, "{before:?} -> {after:?}");
    assert_eq!(after.deletes - before.deletes, 6, "{before:?} -> {after:?}");
    assert_eq!(allocations(&store).len(), 1);
}

#[test]
fn a_burst_of_assignments_is_one_block_write() {
    let (store, ipam) = new_ipam(&[pool("p", "10.0.0.0/24", 26)], None);
    run(&store, ipam.assign_once(&req("resident", "n1", 1, 0))).unwrap();
    let gone = run(&store, ipam.assign_once(&req("gone", "n1", 1, 0))).unwrap();
    let reqs: Vec<AutoAssignRequest> = (0..10).map(|i| req(&format!("b{i}"), "n1", 1, 0)).collect();
    let before = store.stats();
    let out = block_on(ipam.assign_once_batch(&reqs, &["gone".to_string()]));
    let after = store.stats();
    assert_eq!(out.released, vec!["gone".to_string()]);
    assert_eq!(after.updates - before.updates, 1, "{before:?} -> {after:?}");
    assert_eq!(
        after.creates - before.creates,
        10,
        "{before:?} -> {after:?}"
    );
    let held = allocations(&store);
    assert!(!held.contains_key(&gone.ipv4[0]));
    let mut ips = Vec::new();
    for (r, result) in reqs.iter().zip(&out.results) {
        let a = result.as_ref().unwrap();
        assert_eq!(a.ipv4.len(), 1);
        assert_eq!(held.get(&a.ipv4[0]), Some(&r.handle_id));
        ips.push(a.ipv4[0]);
    }
    ips.sort();
    ips.dedup();
    assert_eq!(ips.len(), 10);
    run(&store, ipam.forget_handle("gone")).unwrap();
}

#[test]
fn a_burst_with_a_retried_add_returns_its_addresses_and_leaks_nothing() {
    let (store, ipam) = new_ipam(&[pool("p", "10.0.0.0/24", 26)], None);
    let first = run(&store, ipam.assign_once(&req("again", "n1", 1, 0))).unwrap();
    let reqs = vec![
        req("new-1", "n1", 1, 0),
        req("again", "n1", 1, 0),
        req("new-2", "n1", 1, 0),
        // Dual stack is served on its own (no IPv6 pool here: it fails alone).
        req("dual", "n1", 1, 1),
    ];
    let out = run(&store, ipam.assign_once_batch(&reqs, &[]));
    assert_eq!(out.results[1].as_ref().unwrap().ipv4, first.ipv4);
    assert!(out.results[0].is_ok() && out.results[2].is_ok());
    assert!(out.results[3].is_err(), "{:?}", out.results[3]);
    assert_eq!(allocations(&store).len(), 3);
}

#[test]
fn a_burst_never_releases_a_handle_it_assigns() {
    let (store, ipam) = new_ipam(
        &[pool("v4", "10.0.0.0/24", 26), pool("v6", "fd00::/120", 122)],
        None,
    );
    let before = run(&store, ipam.assign_once(&req("retried", "n1", 1, 1))).unwrap();
    let reqs = vec![
        req("a", "n1", 1, 0),
        req("b", "n1", 1, 0),
        req("retried", "n1", 1, 1),
    ];
    // Its release listed too (a DEL racing the retried ADD): the batch leaves it alone.
    let out = run(
        &store,
        ipam.assign_once_batch(&reqs, &["retried".to_string()]),
    );
    assert!(out.released.is_empty(), "{:?}", out.released);
    assert_eq!(out.results[2].as_ref().unwrap(), &before);
    let held = allocations(&store);
    assert_eq!(
        held.get(&before.ipv4[0]).map(String::as_str),
        Some("retried")
    );
}

#[test]
fn a_burst_larger_than_the_blocks_room_fills_it_then_the_next_block() {
    let (store, ipam) = new_ipam(&[pool("p", "10.0.0.0/24", 29)], None);
    run(&store, ipam.assign_once(&req("resident", "n1", 1, 0))).unwrap();
    let reqs: Vec<AutoAssignRequest> = (0..10).map(|i| req(&format!("b{i}"), "n1", 1, 0)).collect();
    let out = run(&store, ipam.assign_once_batch(&reqs, &[]));
    assert!(out.results.iter().all(Result::is_ok), "{:?}", out.results);
    assert_eq!(allocations(&store).len(), 11);
    let first_block = net(&store.snapshot::<IpamBlock>()[0].spec.cidr);
    // The first seven fill the node's block in one write; the eighth claims a second block
    // on its own, and the last two go there together.
    for r in &out.results[..7] {
        assert!(first_block.contains(&r.as_ref().unwrap().ipv4[0]));
    }
    for r in &out.results[7..] {
        assert!(!first_block.contains(&r.as_ref().unwrap().ipv4[0]));
    }
    assert_eq!(
        store.snapshot::<IpamBlock>().len(),
        2,
        "a second block claimed"
    );
}

fn affinity(node: &str, cidr: &str, state: AffinityState) -> BlockAffinity {
    BlockAffinity::new(
        tortie_ipam::affinity_name(node, &net(cidr)),
        tortie_ipam::BlockAffinitySpec {
            state,
            node: node.into(),
            cidr: cidr.into(),
            deleted: "false".into(),
            extra: Default::default(),
        },
    )
}

#[test]
fn interrupted_claims_are_finished_or_dropped_by_the_hosts_next_assignment() {
    let (store, ipam) = new_ipam(&[pool("p", "10.0.0.0/24", 26)], None);
    // A claim that got as far as the block, and one that only wrote its pending affinity.
    store.put(&new_block(net("10.0.0.64/26"), Some("n1")));
    store.put(&affinity("n1", "10.0.0.64/26", AffinityState::Pending));
    store.put(&affinity("n1", "10.0.0.128/26", AffinityState::Pending));
    assert!(
        run_unchecked(ipam.host_blocks("n1")).is_empty(),
        "pending is not advertised"
    );

    let got = run(&store, ipam.auto_assign(&req("h", "n1", 1, 0))).unwrap();
    assert!(
        net("10.0.0.64/26").contains(&got.ipv4[0]),
        "the finished claim is used"
    );
    let affs = affinities_of(&store, "n1");
    assert_eq!(affs.len(), 1, "{affs:#?}");
    assert_eq!(affs[0].spec.state, AffinityState::Confirmed);
    assert_eq!(
        run(&store, ipam.host_blocks("n1")).unwrap(),
        vec![net("10.0.0.64/26")]
    );
}

#[test]
fn blocks_and_handles_calico_marked_deleted_are_treated_as_going_away() {
    let (store, ipam) = new_ipam(&[pool("p", "10.0.0.0/25", 26)], Some(config(true, 5)));
    let mut dying = new_block(net("10.0.0.0/26"), Some("n1"));
    dying.spec.deleted = Some(true);
    store.put(&dying);
    // Calico releases an affinity by marking it first, then the block, then deleting both.
    store.put(&affinity(
        "n1",
        "10.0.0.0/26",
        AffinityState::PendingDeletion,
    ));
    let mut stale = IpamHandle::new(
        "h",
        tortie_ipam::IpamHandleSpec {
            handle_id: "h".into(),
            block: [("10.0.0.0/26".to_string(), 1)].into(),
            deleted: Some(true),
            extra: Default::default(),
        },
    );
    stale.metadata.labels = None;
    store.put(&stale);

    let got = run(&store, ipam.auto_assign(&req("h", "n1", 1, 0))).unwrap();
    assert!(
        net("10.0.0.0/25").contains(&got.ipv4[0]),
        "assigned from a fresh block"
    );
    assert_eq!(
        affinities_of(&store, "n1").len(),
        1,
        "the interrupted release was finished"
    );
    assert!(
        store
            .snapshot::<IpamBlock>()
            .iter()
            .all(|b| !b.spec.is_deleted()),
        "the interrupted deletion of the empty block was finished"
    );
    let handles = store.snapshot::<IpamHandle>();
    assert_eq!(handles.len(), 1);
    assert_eq!(
        handles[0].spec.deleted, None,
        "the marked handle was replaced"
    );
    assert_eq!(handles[0].spec.block.len(), 1);
    let block = store
        .snapshot::<IpamBlock>()
        .into_iter()
        .find(|b| net(&b.spec.cidr).contains(&got.ipv4[0]))
        .unwrap();
    assert!(!block.spec.is_deleted());
    assert!(handles[0].spec.block.contains_key(&block.spec.cidr));
}

fn run_unchecked<T>(fut: impl Future<Output = Result<T, IpamError>>) -> T {
    block_on(fut).unwrap()
}

#[test]
fn tunnel_address_survives_disabling_its_pool() {
    let mut ipip = pool("ipip", "10.7.0.0/24", 26);
    ipip.spec.ipip_mode = Some("Always".into());
    let (store, ipam) = new_ipam(&[ipip.clone()], None);
    let a = run(
        &store,
        ipam.ensure_tunnel_address("n1", &labels(&[]), TunnelKind::Ipip),
    )
    .unwrap()
    .unwrap();
    ipip.spec.disabled = Some(true);
    store.put(&ipip);
    let b = run(
        &store,
        ipam.ensure_tunnel_address("n1", &labels(&[]), TunnelKind::Ipip),
    )
    .unwrap();
    assert_eq!(b, Some(a));
    // A node without one gets none from the disabled pool.
    let c = run(
        &store,
        ipam.ensure_tunnel_address("n2", &labels(&[]), TunnelKind::Ipip),
    )
    .unwrap();
    assert_eq!(c, None);
}

#[test]
fn strict_affinity_refuses_a_specific_address_in_another_hosts_block() {
    let (store, ipam) = new_ipam(&[pool("p", "10.0.0.0/24", 26)], Some(config(true, 5)));
    let attrs = workload_attributes("ns", "pod", "n1", "t");
    run(&store, ipam.assign_ip(ip("10.0.0.5"), "h1", &attrs, "n1")).unwrap();
    let err = run(&store, ipam.assign_ip(ip("10.0.0.6"), "h2", &attrs, "n2")).unwrap_err();
    match err {
        IpamError::NotAffine { owner, node, .. } => {
            assert_eq!((owner.as_deref(), node.as_str()), (Some("n1"), "n2"));
        }
        other => panic!("expected NotAffine, got {other}"),
    }
    // Without strict affinity the same request succeeds.
    store.put(&config(false, 5));
    run(&store, ipam.assign_ip(ip("10.0.0.6"), "h2", &attrs, "n2")).unwrap();
}

/// A [`MemoryStore`] that counts calls per operation and kind, and can serve a stale (empty)
/// list of blocks, as a watch cache that has not caught up would.
struct Counting {
    inner: std::sync::Arc<MemoryStore>,
    calls: std::sync::Mutex<BTreeMap<String, u32>>,
    stale_block_list: bool,
    /// `take` deletes but does not say what it held, as the Kubernetes API for a custom
    /// resource.
    take_returns_nothing: bool,
}

impl Counting {
    fn new(inner: std::sync::Arc<MemoryStore>) -> Self {
        Self {
            inner,
            calls: Default::default(),
            stale_block_list: false,
            take_returns_nothing: false,
        }
    }
    fn count<K: tortie_ipam::Resource>(&self, op: &str) {
        *self
            .calls
            .lock()
            .unwrap()
            .entry(format!("{op} {}", K::KIND))
            .or_insert(0) += 1;
    }
    fn take_calls(&self) -> BTreeMap<String, u32> {
        std::mem::take(&mut self.calls.lock().unwrap())
    }
}

impl tortie_ipam::Store for Counting {
    async fn get<K: tortie_ipam::Resource>(
        &self,
        name: &str,
    ) -> Result<K, tortie_ipam::StoreError> {
        self.count::<K>("get");
        self.inner.get(name).await
    }
    async fn list<K: tortie_ipam::Resource>(&self) -> Result<Vec<K>, tortie_ipam::StoreError> {
        self.count::<K>("list");
        if self.stale_block_list && K::KIND == "IPAMBlock" {
            return Ok(Vec::new());
        }
        self.inner.list().await
    }
    async fn create<K: tortie_ipam::Resource>(
        &self,
        obj: &K,
    ) -> Result<K, tortie_ipam::StoreError> {
        self.count::<K>("create");
        self.inner.create(obj).await
    }
    async fn update<K: tortie_ipam::Resource>(
        &self,
        obj: &K,
    ) -> Result<K, tortie_ipam::StoreError> {
        self.count::<K>("update");
        self.inner.update(obj).await
    }
    async fn delete<K: tortie_ipam::Resource>(
        &self,
        name: &str,
        revision: &str,
    ) -> Result<(), tortie_ipam::StoreError> {
        self.count::<K>("delete");
        self.inner.delete::<K>(name, revision).await
    }
    async fn take<K: tortie_ipam::Resource>(
        &self,
        name: &str,
    ) -> Result<Option<K>, tortie_ipam::StoreError> {
        self.count::<K>("take");
        let taken = self.inner.take::<K>(name).await?;
        Ok(taken.filter(|_| !self.take_returns_nothing))
    }
}

fn calls(pairs: &[(&str, u32)]) -> BTreeMap<String, u32> {
    pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
}

#[test]
fn cni_add_and_del_with_an_affine_block_never_read_the_handle() {
    let (store, _) = new_ipam(&[pool("p", "10.0.0.0/24", 26)], None);
    let counting = std::sync::Arc::new(Counting {
        take_returns_nothing: true,
        ..Counting::new(store.clone())
    });
    let ipam = Ipam::new(counting.clone());
    run(&store, ipam.assign_once(&req("resident", "n1", 1, 0))).unwrap();
    counting.take_calls();

    let got = run(&store, ipam.assign_once(&req("pod", "n1", 1, 0))).unwrap();
    assert_eq!(got.ipv4.len(), 1);
    let assign = counting.take_calls();
    // The agent serves gets and lists of blocks, affinities, pools and config from its watch
    // caches; handles are not watched, so every handle call is a request to the API server.
    let handle_calls: BTreeMap<_, _> = assign
        .iter()
        .filter(|(k, _)| k.ends_with("IPAMHandle"))
        .collect();
    assert_eq!(handle_calls.len(), 1, "assign: {assign:?}");
    assert_eq!(
        assign.get("create IPAMHandle"),
        Some(&1),
        "assign: {assign:?}"
    );
    assert_eq!(
        assign.get("update IPAMBlock"),
        Some(&1),
        "assign: {assign:?}"
    );

    let released = run(&store, ipam.release_by_handle("pod")).unwrap();
    assert_eq!(released, got.ipv4);
    let release = counting.take_calls();
    assert_eq!(
        release,
        calls(&[
            ("list IPAMBlock", 1),
            ("get IPAMBlock", 1),
            ("update IPAMBlock", 1),
            ("take IPAMHandle", 1),
        ]),
    );
    assert!(!allocations(&store).values().any(|h| h == "pod"));
    assert!(
        store
            .snapshot::<IpamHandle>()
            .iter()
            .all(|h| h.metadata.name != "pod")
    );
}

#[test]
fn retried_cni_add_gets_the_addresses_it_already_has() {
    let (store, ipam) = new_ipam(
        &[pool("v4", "10.0.0.0/24", 26), pool("v6", "fd00::/122", 122)],
        None,
    );
    let first = run(&store, ipam.assign_once(&req("pod", "n1", 1, 1))).unwrap();
    assert_eq!((first.ipv4.len(), first.ipv6.len()), (1, 1));
    let again = run(&store, ipam.assign_once(&req("pod", "n1", 1, 1))).unwrap();
    assert_eq!(again, first);
    assert_eq!(allocations(&store).len(), 2, "nothing more was assigned");
    // `auto_assign` keeps Calico's meaning: more addresses under the same handle.
    let more = run(&store, ipam.auto_assign(&req("pod", "n1", 1, 0))).unwrap();
    assert_ne!(more.ipv4, first.ipv4);
    assert_eq!(allocations(&store).len(), 3);
}

#[test]
fn cni_add_on_a_handle_left_without_addresses_assigns_under_it() {
    let (store, ipam) = new_ipam(&[pool("p", "10.0.0.0/24", 26)], None);
    let got = run(&store, ipam.assign_once(&req("pod", "n1", 1, 0))).unwrap();
    // A release that freed the block but died before deleting the handle.
    let block = store.snapshot::<IpamBlock>().remove(0);
    let mut emptied = block.clone();
    emptied
        .spec
        .release_ordinals(&emptied.spec.ordinals_for_handle("pod"));
    store.put(&emptied);
    assert!(allocations(&store).is_empty());

    let again = block_on(ipam.assign_once(&req("pod", "n1", 1, 0))).unwrap();
    assert_eq!(again.ipv4.len(), 1);
    assert_eq!(
        allocations(&store).values().filter(|h| *h == "pod").count(),
        1
    );
    let _ = got;
}

#[test]
fn release_finds_addresses_whose_handle_is_already_gone() {
    let (store, ipam) = new_ipam(&[pool("p", "10.0.0.0/24", 26)], None);
    run(&store, ipam.assign_once(&req("resident", "n1", 1, 0))).unwrap();
    let got = run(&store, ipam.assign_once(&req("pod", "n1", 1, 0))).unwrap();
    // A release interrupted after the handle went: the block still holds the address.
    block_on(tortie_ipam::Store::take::<IpamHandle>(&*store, "pod")).unwrap();
    let released = run(&store, ipam.release_by_handle("pod")).unwrap();
    assert_eq!(released, got.ipv4);
    assert_eq!(allocations(&store).len(), 1);
}

#[test]
fn release_falls_back_to_the_handle_when_a_stale_block_list_shows_nothing() {
    let (store, _) = new_ipam(&[pool("p", "10.0.0.0/24", 26)], None);
    let stale = std::sync::Arc::new(Counting {
        stale_block_list: true,
        ..Counting::new(store.clone())
    });
    let fresh = Ipam::new(store.clone());
    run(&store, fresh.assign_once(&req("resident", "n1", 1, 0))).unwrap();
    let got = run(&store, fresh.assign_once(&req("pod", "n1", 1, 0))).unwrap();
    let released = run(&store, Ipam::new(stale).release_by_handle("pod")).unwrap();
    assert_eq!(released, got.ipv4);
    assert_eq!(allocations(&store).len(), 1);
    assert_eq!(
        store.snapshot::<IpamHandle>().len(),
        1,
        "only the resident's handle"
    );
}
