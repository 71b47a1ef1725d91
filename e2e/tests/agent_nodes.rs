//! Nodes leaving the cluster: `kubectl delete node` drops its BGP sessions and routes on
//! every other node, and the IPAM garbage collector releases its blocks and tunnel address.

use std::time::{Duration, Instant};

use tortie_e2e::cluster::{ClusterSpec, TestCluster, agent_env};
use tortie_e2e::{TopologySpec, require_root, wait_for};

#[test]
fn deleted_node_loses_peers_routes_and_ipam() {
    require_root();
    let spec = ClusterSpec {
        topology: TopologySpec::new().segment(["a1", "a2"]).segment(["b1"]),
        pool_yaml: Some(
            "apiVersion: crd.projectcalico.org/v1\nkind: IPPool\nmetadata:\n  name: p\nspec:\n  cidr: 10.244.0.0/16\n  \
             vxlanMode: Always\n"
                .to_owned(),
        ),
        // A short lease: the killed node may hold the collector's lease, and another agent must
        // take over well within the IPAM check's deadline.
        agent_env: agent_env(&[
            ("TORTIE_IPAM_GC_INTERVAL_SECS", "1"),
            ("TORTIE_IPAM_GC_GRACE_SECS", "1"),
            ("TORTIE_IPAM_GC_LEASE_SECS", "3"),
        ]),
        ..Default::default()
    };
    let Some(mut c) = TestCluster::start("deleted_node_loses_peers_routes_and_ipam", spec).unwrap()
    else {
        return;
    };
    c.wait_ready(Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e:#}\n{}", c.logs()));
    let b1_block = wait_for("b1 owns a block", Duration::from_secs(30), || {
        let out = c.kubectl(&["get", "ipamblocks", "-o", "json"])?;
        let v: serde_json::Value = serde_json::from_str(&out)?;
        Ok(v["items"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|b| b["spec"]["affinity"] == "host:b1")
            .and_then(|b| b["spec"]["cidr"].as_str().map(str::to_owned)))
    })
    .unwrap();
    wait_for("a1 routes b1's block", Duration::from_secs(20), || {
        Ok(c.topo
            .node("a1")
            .ns
            .run(&["ip", "route", "show", "proto", "84"])?
            .contains(&b1_block)
            .then_some(()))
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", c.logs()));

    // The machine goes away: its agent dies, then an operator deletes the Node.
    c.kill_agent("b1").unwrap();
    let start = Instant::now();
    c.kubectl(&["delete", "node", "b1"]).unwrap();
    for n in ["a1", "a2"] {
        wait_for(
            &format!("{n} drops b1's session and block route"),
            Duration::from_secs(20),
            || {
                let peers = c.status(n)?["peers"].clone();
                let has_peer = peers
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|p| p["address"] == "10.77.1.10");
                let routes = c
                    .topo
                    .node(n)
                    .ns
                    .run(&["ip", "route", "show", "proto", "84"])?;
                Ok((!has_peer && !routes.contains(&b1_block)).then_some(()))
            },
        )
        .unwrap_or_else(|e| panic!("{e:#}\n{}", c.logs()));
    }
    eprintln!(
        "FIGURE node deletion: peers and routes gone on every node after {:?}",
        start.elapsed()
    );
    wait_for(
        "b1's block, affinity and tunnel handle released",
        Duration::from_secs(30),
        || {
            let blocks = c.kubectl(&["get", "ipamblocks", "-o", "json"])?;
            let affinities = c.kubectl(&["get", "blockaffinities", "-o", "name"])?;
            let handles = c.kubectl(&["get", "ipamhandles", "-o", "name"])?;
            let b: serde_json::Value = serde_json::from_str(&blocks)?;
            let block_left = b["items"].as_array().into_iter().flatten().any(|x| {
                x["spec"]["affinity"] == "host:b1"
                    || x["spec"]["attributes"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .any(|a| a["secondary"]["node"] == "b1")
            });
            Ok((!block_left
                && !affinities.contains("b1-")
                && !handles.contains("vxlan-tunnel-addr-b1"))
            .then_some(()))
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", c.logs()));
    eprintln!(
        "FIGURE node deletion: IPAM released after {:?}",
        start.elapsed()
    );
}

#[test]
fn joining_node_gets_peers_routes_and_a_block() {
    require_root();
    let spec = ClusterSpec {
        topology: TopologySpec::new().segment(["a1", "a2"]).segment(["b1"]),
        pool_yaml: Some(
            "apiVersion: crd.projectcalico.org/v1\nkind: IPPool\nmetadata:\n  name: p\nspec:\n  cidr: 10.244.0.0/16\n  \
             vxlanMode: CrossSubnet\n"
                .to_owned(),
        ),
        deferred_nodes: vec!["b1".to_owned()],
        ..Default::default()
    };
    let Some(mut c) =
        TestCluster::start("joining_node_gets_peers_routes_and_a_block", spec).unwrap()
    else {
        return;
    };
    c.wait_ready(Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e:#}\n{}", c.logs()));
    let pa = c.add_pod("a1", "early").unwrap();
    let start = Instant::now();
    c.join("b1").unwrap();
    c.wait_ready(Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e:#}\n{}", c.logs()));
    let pb = c.add_pod("b1", "late").unwrap();
    wait_for(
        "the new node's pod reaches the old node's pod",
        Duration::from_secs(20),
        || Ok(pb.ns.ping_once(&pa.ip.to_string(), 200).then_some(())),
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", c.logs()));
    eprintln!(
        "FIGURE node join: new node's pod reaches the cluster {:?} after the Node appeared",
        start.elapsed()
    );
    for n in ["a1", "a2"] {
        wait_for(
            &format!("{n} peers with the new node"),
            Duration::from_secs(20),
            || {
                let peers = c.status(n)?["peers"].clone();
                Ok(peers
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|p| p["address"] == "10.77.1.10" && p["state"] == "Established")
                    .then_some(()))
            },
        )
        .unwrap_or_else(|e| panic!("{e:#}\n{}", c.logs()));
    }
    let blocks = c.status("b1").unwrap()["blocks"].clone();
    assert!(
        blocks.as_array().is_some_and(|b| !b.is_empty()),
        "the new node owns a block: {blocks}"
    );
    c.del_pod(&pa).unwrap();
    c.del_pod(&pb).unwrap();
}

/// calico-kube-controllers' pod leak collection, in the agent holding the GC lease: an address
/// whose Pod does not exist is released after the grace period, one whose Pod exists is kept,
/// and a Pod deleted later (seen through the leader's Pod watch) has its address released too.
#[test]
fn leaked_pod_addresses_are_collected_and_live_pods_keep_theirs() {
    require_root();
    let spec = ClusterSpec {
        topology: TopologySpec::new().segment(["g1"]),
        pool_yaml: Some(
            "apiVersion: crd.projectcalico.org/v1\nkind: IPPool\nmetadata:\n  name: p\nspec:\n  cidr: 10.244.0.0/16\n"
                .to_owned(),
        ),
        agent_env: agent_env(&[
            ("TORTIE_IPAM_GC_INTERVAL_SECS", "1"),
            ("TORTIE_IPAM_GC_GRACE_SECS", "1"),
        ]),
        ..Default::default()
    };
    let Some(c) = TestCluster::start(
        "leaked_pod_addresses_are_collected_and_live_pods_keep_theirs",
        spec,
    )
    .unwrap() else {
        return;
    };
    c.wait_ready(Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e:#}\n{}", c.logs()));
    // The Pod object of `keeper` exists (no kubelet runs it; its IPs are not reported yet,
    // which the collector reads as "unknown", not "different").
    c.api
        .apply(
            &serde_json::json!({"apiVersion": "v1", "kind": "List", "items": [
                // No controller manager here to make the namespace's default ServiceAccount.
                {"apiVersion": "v1", "kind": "ServiceAccount",
                 "metadata": {"name": "default", "namespace": "default"}},
                {"apiVersion": "v1", "kind": "Pod",
                 "metadata": {"name": "keeper", "namespace": "default"},
                 "spec": {"containers": [{"name": "c", "image": "none"}],
                          "automountServiceAccountToken": false}},
            ]})
            .to_string(),
        )
        .unwrap();
    let keeper = c.add_pod("g1", "keeper").unwrap();
    let leaker = c.add_pod("g1", "leaker").unwrap();
    let handles = || c.kubectl(&["get", "ipamhandles", "-o", "name"]);
    let start = Instant::now();
    wait_for(
        "the address without a Pod released",
        Duration::from_secs(30),
        || Ok((!handles()?.contains(&leaker.container_id)).then_some(())),
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", c.logs()));
    eprintln!(
        "FIGURE pod leak collection: address without a Pod released after {:?} (grace 1 s)",
        start.elapsed()
    );
    // Several more passes: the live Pod's address stays.
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        handles().unwrap().contains(&keeper.container_id),
        "the address of an existing Pod was collected\n{}",
        c.logs()
    );
    c.kubectl(&["delete", "pod", "keeper", "-n", "default", "--wait=false"])
        .unwrap();
    wait_for(
        "the deleted Pod's address released",
        Duration::from_secs(30),
        || Ok((!handles()?.contains(&keeper.container_id)).then_some(())),
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", c.logs()));
}
