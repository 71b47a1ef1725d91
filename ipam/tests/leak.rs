//! Leak collection: grace period on an injected clock, all-or-nothing per handle, re-check before release.

mod common;

use std::collections::HashSet;
use std::time::{Duration, SystemTime};

use common::*;
use tortie_ipam::{
    AutoAssignRequest, Faults, IpamError, LeakCollector, LiveState, TunnelKind, workload_attributes,
};

const GRACE: Duration = Duration::from_secs(15 * 60);

fn pod_req(ns: &str, pod: &str, node: &str, n: usize) -> AutoAssignRequest {
    AutoAssignRequest {
        handle_id: format!("k8s-pod-network.{pod}"),
        attributes: workload_attributes(ns, pod, node, "t"),
        node: node.to_string(),
        num_v4: n,
        ..AutoAssignRequest::default()
    }
}

fn live(pods: &[(&str, &str, &[&str])], nodes: &[&str]) -> LiveState {
    LiveState {
        pods: pods
            .iter()
            .map(|(ns, p, ips)| {
                (
                    (ns.to_string(), p.to_string()),
                    ips.iter().map(|s| ip(s)).collect(),
                )
            })
            .collect(),
        nodes: nodes.iter().map(|s| s.to_string()).collect::<HashSet<_>>(),
    }
}

#[test]
fn gone_pod_is_released_only_after_the_grace_period() {
    let (store, ipam) = new_ipam(&[pool("p", "10.0.0.0/24", 26)], None);
    block_on(ipam.auto_assign(&pod_req("ns", "alive", "n1", 1))).unwrap();
    block_on(ipam.auto_assign(&pod_req("ns", "gone", "n1", 1))).unwrap();
    let state = live(&[("ns", "alive", &[])], &["n1"]);
    let mut gc = LeakCollector::default();
    let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);

    let r = block_on(gc.collect(&ipam, &state, t0)).unwrap();
    assert_eq!((r.candidates, r.released.len()), (1, 0));
    let r = block_on(gc.collect(&ipam, &state, t0 + GRACE - Duration::from_secs(1))).unwrap();
    assert!(r.released.is_empty(), "still within grace");
    let r = block_on(gc.collect(&ipam, &state, t0 + GRACE)).unwrap();
    assert_eq!(r.released_handles, vec!["k8s-pod-network.gone".to_string()]);
    check_quiescent(&store);
    let left = allocations(&store);
    assert_eq!(
        left.values().collect::<Vec<_>>(),
        vec!["k8s-pod-network.alive"]
    );
}

#[test]
fn pod_coming_back_resets_the_clock() {
    let (store, ipam) = new_ipam(&[pool("p", "10.0.0.0/24", 26)], None);
    block_on(ipam.auto_assign(&pod_req("ns", "flappy", "n1", 1))).unwrap();
    let mut gc = LeakCollector::new(GRACE);
    let t0 = SystemTime::UNIX_EPOCH;
    block_on(gc.collect(&ipam, &live(&[], &["n1"]), t0)).unwrap();
    // Seen alive again (informer caught up), then gone again: the grace restarts.
    block_on(gc.collect(
        &ipam,
        &live(&[("ns", "flappy", &[])], &["n1"]),
        t0 + GRACE / 2,
    ))
    .unwrap();
    let r = block_on(gc.collect(&ipam, &live(&[], &["n1"]), t0 + GRACE)).unwrap();
    assert!(r.released.is_empty());
    let r = block_on(gc.collect(&ipam, &live(&[], &["n1"]), t0 + GRACE * 2)).unwrap();
    assert_eq!(r.released.len(), 1);
    check_quiescent(&store);
}

#[test]
fn handle_is_released_all_or_nothing() {
    let (store, ipam) = new_ipam(&[pool("p", "10.0.0.0/24", 26)], None);
    let got = block_on(ipam.auto_assign(&pod_req("ns", "two", "n1", 2))).unwrap();
    // The pod reports only its first address: the second looks leaked, the first does not.
    let first = got.ipv4[0].to_string();
    let state = live(&[("ns", "two", &[first.as_str()])], &["n1"]);
    let mut gc = LeakCollector::new(Duration::ZERO);
    let t = SystemTime::UNIX_EPOCH;
    let r = block_on(gc.collect(&ipam, &state, t)).unwrap();
    assert_eq!(r.candidates, 1);
    assert!(
        r.released.is_empty(),
        "one live address keeps the whole handle"
    );
    assert_eq!(allocations(&store).len(), 2);
}

#[test]
fn recreated_pod_with_a_new_address_frees_the_old_one() {
    let (store, ipam) = new_ipam(&[pool("p", "10.0.0.0/24", 26)], None);
    let old = block_on(ipam.auto_assign(&pod_req("ns", "sts-0", "n1", 1))).unwrap();
    let mut new_req = pod_req("ns", "sts-0", "n1", 1);
    new_req.handle_id = "k8s-pod-network.sts-0-new".into();
    let new = block_on(ipam.auto_assign(&new_req)).unwrap();
    let new_ip = new.ipv4[0].to_string();
    let state = live(&[("ns", "sts-0", &[new_ip.as_str()])], &["n1"]);
    let mut gc = LeakCollector::new(Duration::ZERO);
    let r = block_on(gc.collect(&ipam, &state, SystemTime::UNIX_EPOCH)).unwrap();
    assert_eq!(r.released, old.ipv4);
    check_quiescent(&store);
    assert_eq!(
        allocations(&store).keys().copied().collect::<Vec<_>>(),
        new.ipv4
    );
}

#[test]
fn tunnel_address_of_a_deleted_node_is_collected_and_unattributed_ones_are_not() {
    let mut ipip = pool("p", "10.0.0.0/24", 26);
    ipip.spec.ipip_mode = Some("Always".into());
    let (store, ipam) = new_ipam(&[ipip], None);
    block_on(ipam.ensure_tunnel_address("gone-node", &labels(&[]), TunnelKind::Ipip)).unwrap();
    block_on(ipam.ensure_tunnel_address("n1", &labels(&[]), TunnelKind::Ipip)).unwrap();
    block_on(ipam.assign_ip(ip("10.0.0.200"), "manual", &Default::default(), "n1")).unwrap();
    let mut gc = LeakCollector::new(Duration::ZERO);
    let r = block_on(gc.collect(&ipam, &live(&[], &["n1"]), SystemTime::UNIX_EPOCH)).unwrap();
    assert_eq!(
        r.released_handles,
        vec!["ipip-tunnel-addr-gone-node".to_string()]
    );
    let left: Vec<String> = allocations(&store).into_values().collect();
    assert!(
        left.contains(&"manual".to_string()),
        "no attributes: never judged"
    );
    assert!(left.contains(&"ipip-tunnel-addr-n1".to_string()));
    check_quiescent(&store);
}

/// The collector observes pod `old` gone; concurrently `old` is released normally and its address
/// handed to live pod `new`. Whatever the interleaving, `new` must keep its address.
#[test]
fn reassigned_address_is_never_collected_under_any_interleaving() {
    for seed in 0..300u64 {
        // One /30 block: the freed address is the only one left, so `new` gets exactly it.
        let (store, ipam) = new_ipam(&[pool("p", "10.0.0.0/30", 30)], None);
        for i in 0..3 {
            block_on(ipam.auto_assign(&pod_req("ns", &format!("filler{i}"), "n1", 1))).unwrap();
        }
        let old = block_on(ipam.auto_assign(&pod_req("ns", "old", "n1", 1))).unwrap();
        let mut gc = LeakCollector::new(Duration::ZERO);
        let mut state = live(&[], &["n1"]);
        for i in 0..3 {
            state
                .pods
                .insert(("ns".into(), format!("filler{i}")), vec![]);
        }
        state.pods.insert(("ns".into(), "new".into()), vec![]);
        store.set_faults(Faults {
            conflict_one_in: 0,
            seed,
            yield_before_each_op: true,
            ambiguous_one_in: 0,
        });
        let collector: Task<'_> = Box::pin(async {
            gc.collect(&ipam, &state, SystemTime::UNIX_EPOCH)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        });
        let churn: Task<'_> = Box::pin(async {
            ipam.release_by_handle("k8s-pod-network.old")
                .await
                .map_err(|e| e.to_string())?;
            match ipam.auto_assign(&pod_req("ns", "new", "n1", 1)).await {
                Ok(_) | Err(IpamError::Exhausted { .. }) => Ok(()),
                Err(e) => Err(e.to_string()),
            }
        });
        let results = run_interleaved(vec![collector, churn], seed, || check_always(&store));
        assert!(
            results.iter().all(Result::is_ok),
            "seed {seed}: {results:?}"
        );
        check_quiescent(&store);
        let new_ips = block_on(ipam.ips_by_handle("k8s-pod-network.new")).unwrap();
        assert_eq!(new_ips, old.ipv4, "seed {seed}: live pod lost its address");
    }
}

#[test]
fn deleted_node_ipam_is_released_after_grace_and_never_with_an_empty_node_list() {
    let (store, ipam) = new_ipam(&[pool("p", "10.0.0.0/24", 26)], None);
    block_on(ipam.auto_assign(&pod_req("ns", "on-n1", "n1", 1))).unwrap();
    block_on(ipam.auto_assign(&pod_req("ns", "on-n2", "n2", 1))).unwrap();
    let pods_alive = [("ns", "on-n1", &[][..]), ("ns", "on-n2", &[][..])];
    let mut gc = LeakCollector::new(GRACE);
    let t0 = SystemTime::UNIX_EPOCH;

    // An empty node list (unsynced informer) never collects nodes.
    let r = block_on(gc.collect(&ipam, &live(&pods_alive, &[]), t0 + GRACE * 10)).unwrap();
    assert!(r.released_nodes.is_empty());

    // n2's pod is still listed: its node's IPAM waits for it.
    let r = block_on(gc.collect(&ipam, &live(&pods_alive, &["n1"]), t0)).unwrap();
    assert!(r.released_nodes.is_empty());
    let r = block_on(gc.collect(&ipam, &live(&pods_alive, &["n1"]), t0 + GRACE * 2)).unwrap();
    assert!(
        r.released_nodes.is_empty(),
        "a live pod holds the node's IPAM"
    );

    let pods_alive = [("ns", "on-n1", &[][..])];
    let r = block_on(gc.collect(&ipam, &live(&pods_alive, &["n1"]), t0)).unwrap();
    assert!(r.released_nodes.is_empty(), "grace starts now");
    let r = block_on(gc.collect(&ipam, &live(&pods_alive, &["n1"]), t0 + GRACE)).unwrap();
    assert_eq!(r.released_nodes, vec!["n2".to_string()]);
    assert_eq!(r.released.len(), 1);
    assert!(affinities_of(&store, "n2").is_empty());
    assert_eq!(affinities_of(&store, "n1").len(), 1);
    check_quiescent(&store);
}
