//! Property tests: K simulated hosts assigning and releasing concurrently on one store, with injected CAS conflicts and seeded interleavings.
//!
//! Every store call is a task switch point; after every single poll the checker verifies:
//! every block is consistent, every confirmed affinity has its block, every address a host holds
//! is allocated to that host's handle in the store (so no address is ever handed out twice), and
//! no host holds more than `maxBlocksPerHost` affinities per family (borrowing never creates them).
//! Some runs also inject writes that land but report failure (a timeout after commit).
//! At the end everything is released and nothing may remain allocated.

mod common;

use std::cell::RefCell;
use std::collections::{BTreeMap, VecDeque};
use std::net::IpAddr;

use common::*;
use proptest::prelude::*;
use tortie_ipam::{
    AutoAssignRequest, Faults, IpamError, IpamHandle, StoreError, workload_attributes,
};

#[derive(Debug, Clone)]
enum Op {
    Assign {
        v4: usize,
        v6: usize,
    },
    ReleaseOldestHandle,
    ReleaseOneAddress,
    /// Several pods at once, committed together (`assign_once_batch`), carrying the promised
    /// releases.
    AssignBatch {
        n: usize,
    },
    /// A CNI DEL answered before its write: the oldest handle's release rides on this task's
    /// next assignment (`release_with`), its handle object deleted afterwards.
    PromiseRelease,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (1usize..=3, 0usize..=1).prop_map(|(v4, v6)| Op::Assign { v4, v6 }),
        2 => Just(Op::ReleaseOldestHandle),
        1 => Just(Op::ReleaseOneAddress),
        1 => Just(Op::PromiseRelease),
        1 => (2usize..=4).prop_map(|n| Op::AssignBatch { n }),
    ]
}

#[derive(Debug, Clone)]
struct Scenario {
    hosts: Vec<Vec<Op>>,
    strict: bool,
    max_blocks: i64,
    conflict_one_in: u32,
    ambiguous_one_in: u32,
    seed: u64,
}

fn scenario() -> impl Strategy<Value = Scenario> {
    (
        prop::collection::vec(prop::collection::vec(op(), 1..18), 2..=4),
        any::<bool>(),
        1i64..=3,
        prop_oneof![Just(0u32), Just(3), Just(7)],
        prop_oneof![2 => Just(0u32), 1 => Just(13)],
        any::<u64>(),
    )
        .prop_map(
            |(hosts, strict, max_blocks, conflict_one_in, ambiguous_one_in, seed)| Scenario {
                hosts,
                strict,
                max_blocks,
                conflict_one_in,
                ambiguous_one_in,
                seed,
            },
        )
}

fn run_scenario(sc: &Scenario) {
    run_scenario_on(sc, false);
}

/// With `one_node`, every task acts for the same node concurrently (an agent that does not
/// serialize its CNI requests): safety must still hold, only the block limit may be overshot by
/// the claims in flight.
fn run_scenario_on(sc: &Scenario, one_node: bool) {
    // 8 IPv4 blocks of 8 and 8 IPv6 blocks of 32: small enough that hosts run out, borrow, and race.
    let (store, ipam) = new_ipam(
        &[pool("v4", "10.0.0.0/26", 29), pool("v6", "fd00::/120", 123)],
        Some(config(sc.strict, sc.max_blocks)),
    );
    store.set_faults(Faults {
        conflict_one_in: sc.conflict_one_in,
        seed: sc.seed,
        yield_before_each_op: true,
        ambiguous_one_in: sc.ambiguous_one_in,
    });
    let held: RefCell<BTreeMap<IpAddr, String>> = RefCell::new(BTreeMap::new());
    let attempted: RefCell<Vec<String>> = RefCell::new(Vec::new());
    let task_nodes: Vec<String> = (0..sc.hosts.len())
        .map(|i| format!("node-{}", if one_node { 0 } else { i }))
        .collect();
    let mut node_names = task_nodes.clone();
    node_names.dedup();
    let block_limit = if one_node {
        sc.max_blocks + sc.hosts.len() as i64 - 1
    } else {
        sc.max_blocks
    };

    let tasks: Vec<Task<'_>> = sc
        .hosts
        .iter()
        .zip(&task_nodes)
        .enumerate()
        .map(|(task, (ops, node))| {
            let (ipam, store, held, attempted) = (&ipam, &store, &held, &attempted);
            Box::pin(async move {
                let mut mine: VecDeque<(String, Vec<IpAddr>)> = VecDeque::new();
                let mut promised: Vec<String> = Vec::new();
                for (n, op) in ops.iter().enumerate() {
                    match op {
                        Op::Assign { v4, v6 } => {
                            let handle = format!("k8s-pod-network.{node}-t{task}-{n}");
                            attempted.borrow_mut().push(handle.clone());
                            let req = AutoAssignRequest {
                                handle_id: handle.clone(),
                                attributes: workload_attributes("ns", &handle, node, "t"),
                                node: node.clone(),
                                num_v4: *v4,
                                num_v6: *v6,
                                release_with: promised.clone(),
                                ..AutoAssignRequest::default()
                            };
                            // Both entry points: the CNI's (handle and block written at
                            // once) and Calico's plain auto-assign.
                            let result = if n % 2 == 0 {
                                ipam.assign_once(&req).await
                            } else {
                                ipam.auto_assign(&req).await
                            };
                            match result {
                                Ok(got) => {
                                    let ips: Vec<IpAddr> =
                                        got.ipv4.iter().chain(&got.ipv6).copied().collect();
                                    if ips.len() != v4 + v6 {
                                        return Err(format!(
                                            "{handle}: asked {v4}+{v6}, got {ips:?}"
                                        ));
                                    }
                                    // Checked in the same poll as the return: no other task ran.
                                    let actual = allocations(store);
                                    for ip in &ips {
                                        if actual.get(ip) != Some(&handle) {
                                            return Err(format!(
                                                "{ip} returned to {handle} but store says {:?}",
                                                actual.get(ip)
                                            ));
                                        }
                                        if let Some(prev) =
                                            held.borrow_mut().insert(*ip, handle.clone())
                                        {
                                            return Err(format!(
                                                "{ip} handed to {handle} while {prev} holds it"
                                            ));
                                        }
                                    }
                                    mine.push_back((handle, ips));
                                    for gone in &got.released {
                                        promised.retain(|h| h != gone);
                                        match ipam.forget_handle(gone).await {
                                            Ok(_) => {}
                                            Err(e) if tolerated(&e) => {}
                                            Err(e) => return Err(format!("forget {gone}: {e}")),
                                        }
                                    }
                                }
                                Err(e) if tolerated(&e) => {}
                                Err(e) => return Err(format!("{handle}: {e}")),
                            }
                        }
                        Op::ReleaseOldestHandle => {
                            if let Some((handle, ips)) = mine.pop_front() {
                                for ip in &ips {
                                    held.borrow_mut().remove(ip);
                                }
                                match ipam.release_by_handle(&handle).await {
                                    Ok(_) => {}
                                    Err(e) if tolerated(&e) => {}
                                    Err(e) => return Err(format!("release {handle}: {e}")),
                                }
                            }
                        }
                        Op::AssignBatch { n: count } => {
                            let reqs: Vec<AutoAssignRequest> = (0..*count)
                                .map(|k| {
                                    let handle = format!("k8s-pod-network.{node}-t{task}-{n}-{k}");
                                    attempted.borrow_mut().push(handle.clone());
                                    AutoAssignRequest {
                                        handle_id: handle.clone(),
                                        attributes: workload_attributes("ns", &handle, node, "t"),
                                        node: node.clone(),
                                        num_v4: 1,
                                        ..AutoAssignRequest::default()
                                    }
                                })
                                .collect();
                            let out = ipam.assign_once_batch(&reqs, &promised).await;
                            // Checked in the same poll as the return: no other task ran.
                            let actual = allocations(store);
                            for (req, result) in reqs.iter().zip(&out.results) {
                                match result {
                                    Ok(got) => {
                                        let ips: Vec<IpAddr> =
                                            got.ipv4.iter().chain(&got.ipv6).copied().collect();
                                        if ips.len() != 1 {
                                            return Err(format!("{}: got {ips:?}", req.handle_id));
                                        }
                                        for ip in &ips {
                                            if actual.get(ip) != Some(&req.handle_id) {
                                                return Err(format!(
                                                    "{ip} returned to {} but store says {:?}",
                                                    req.handle_id,
                                                    actual.get(ip)
                                                ));
                                            }
                                            if let Some(prev) =
                                                held.borrow_mut().insert(*ip, req.handle_id.clone())
                                            {
                                                return Err(format!(
                                                    "{ip} handed to {} while {prev} holds it",
                                                    req.handle_id
                                                ));
                                            }
                                        }
                                        mine.push_back((req.handle_id.clone(), ips));
                                    }
                                    Err(e) if tolerated(e) => {}
                                    Err(e) => return Err(format!("{}: {e}", req.handle_id)),
                                }
                            }
                            for gone in &out.released {
                                promised.retain(|h| h != gone);
                                match ipam.forget_handle(gone).await {
                                    Ok(_) => {}
                                    Err(e) if tolerated(&e) => {}
                                    Err(e) => return Err(format!("forget {gone}: {e}")),
                                }
                            }
                        }
                        Op::PromiseRelease => {
                            if let Some((handle, ips)) = mine.pop_front() {
                                for ip in &ips {
                                    held.borrow_mut().remove(ip);
                                }
                                promised.push(handle);
                            }
                        }
                        Op::ReleaseOneAddress => {
                            if let Some((_, ips)) = mine.back_mut()
                                && let Some(ip) = ips.pop()
                            {
                                held.borrow_mut().remove(&ip);
                                if ips.is_empty() {
                                    mine.pop_back();
                                }
                                match ipam.release_ips(&[ip]).await {
                                    Ok(_) => {}
                                    Err(e) if tolerated(&e) => {}
                                    Err(e) => return Err(format!("release {ip}: {e}")),
                                }
                            }
                        }
                    }
                }
                Ok(())
            }) as Task<'_>
        })
        .collect();

    let results = run_interleaved(tasks, sc.seed, || {
        check_always(&store);
        let actual = allocations(&store);
        for (ip, handle) in held.borrow().iter() {
            assert_eq!(
                actual.get(ip),
                Some(handle),
                "{ip} is held by {handle} but the store says otherwise"
            );
        }
        for node in &node_names {
            assert_within_block_limit(&store, node, block_limit);
        }
    });
    for r in results {
        r.unwrap();
    }

    // CNI DEL follows every ADD, failed or not: release every handle ever used. Then each host
    // serves one more pod, which finishes whatever an interrupted claim or release left behind.
    store.set_faults(Faults::default());
    for handle in attempted.borrow().iter() {
        block_on(ipam.release_by_handle(handle)).unwrap();
    }
    for node in &node_names {
        let handle = format!("k8s-pod-network.{node}-last");
        let req = AutoAssignRequest {
            handle_id: handle.clone(),
            attributes: workload_attributes("ns", &handle, node, "t"),
            node: node.clone(),
            num_v4: 1,
            num_v6: 1,
            ..AutoAssignRequest::default()
        };
        match block_on(ipam.auto_assign(&req)) {
            Ok(_) | Err(IpamError::Exhausted { .. }) => {}
            Err(e) => panic!("{handle}: {e}"),
        }
        block_on(ipam.release_by_handle(&handle)).unwrap();
    }
    check_quiescent(&store);
    assert!(
        allocations(&store).is_empty(),
        "leaked: {:?}",
        allocations(&store)
    );
    assert!(store.snapshot::<IpamHandle>().is_empty());
    for node in &node_names {
        assert_within_block_limit(&store, node, block_limit);
    }
}

/// Case count, raised for a deep run with `TORTIE_PROPTEST_CASES=2000`.
fn cases_from_env(default: u32) -> u32 {
    std::env::var("TORTIE_PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Errors an operation may end with under injected faults: pool exhaustion, the CAS retry bound,
/// and writes whose outcome is unknown. None of them may break an invariant.
fn tolerated(e: &IpamError) -> bool {
    matches!(
        e,
        IpamError::Exhausted { .. }
            | IpamError::TooManyConflicts { .. }
            | IpamError::Store(StoreError::Other { .. })
    )
}

/// `maxBlocksPerHost` applies per address family, as in Calico.
fn assert_within_block_limit(store: &tortie_ipam::MemoryStore, node: &str, max: i64) {
    let affs = affinities_of(store, node);
    for v6 in [false, true] {
        let n = affs
            .iter()
            .filter(|a| a.spec.cidr.contains(':') == v6)
            .count() as i64;
        assert!(
            n <= max,
            "{node} holds {n} IPv{} blocks, max {max}",
            if v6 { 6 } else { 4 }
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases_from_env(96),
        max_shrink_iters: 2000,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn concurrent_hosts_never_share_an_address_and_leak_nothing(sc in scenario()) {
        run_scenario(&sc);
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases_from_env(48),
        max_shrink_iters: 2000,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn unserialized_requests_of_one_node_never_share_an_address(sc in scenario()) {
        run_scenario_on(&sc, true);
    }
}

#[test]
fn heavy_contention_scenario_with_every_host_racing_for_few_blocks() {
    // A fixed, larger case: 4 hosts × 30 assigns with frequent conflicts, non-strict.
    let ops: Vec<Op> = (0..30)
        .map(|i| match i % 5 {
            3 => Op::ReleaseOldestHandle,
            4 => Op::ReleaseOneAddress,
            _ => Op::Assign { v4: 2, v6: 1 },
        })
        .collect();
    for seed in 0..8 {
        run_scenario(&Scenario {
            hosts: vec![ops.clone(); 4],
            strict: seed % 2 == 0,
            max_blocks: 2,
            conflict_one_in: 4,
            ambiguous_one_in: if seed % 3 == 0 { 9 } else { 0 },
            seed,
        });
    }
}

/// Found by the property test once the CNI path wrote handle and block at once: a claim of a
/// block its host was emptying (and releasing) at the same moment re-created a confirmed
/// affinity after the release had deleted the block.
#[test]
fn claim_racing_the_release_of_the_same_block_never_confirms_a_deleted_block() {
    let sc = Scenario {
        hosts: vec![
            vec![Op::Assign { v4: 1, v6: 0 }, Op::ReleaseOldestHandle],
            vec![Op::Assign { v4: 1, v6: 0 }],
            vec![Op::Assign { v4: 1, v6: 0 }],
        ],
        strict: false,
        max_blocks: 1,
        conflict_one_in: 7,
        ambiguous_one_in: 0,
        seed: 351561988042380324,
    };
    run_scenario_on(&sc, true);
}

/// Found the same way: two releases of one emptied block, one having read it before a refill
/// and release, restored the affinity to confirmed after the other deleted the block.
#[test]
fn two_releases_of_one_block_never_leave_a_confirmed_affinity_without_its_block() {
    use Op::*;
    let a = || Assign { v4: 1, v6: 0 };
    let r = || ReleaseOldestHandle;
    let sc = Scenario {
        hosts: vec![
            vec![r(), r(), r(), r(), a(), r(), a()],
            vec![a(), r()],
            vec![a(), r()],
            vec![a(), a()],
        ],
        strict: false,
        max_blocks: 1,
        conflict_one_in: 7,
        ambiguous_one_in: 0,
        seed: 3699414806428933422,
    };
    run_scenario_on(&sc, true);
}
