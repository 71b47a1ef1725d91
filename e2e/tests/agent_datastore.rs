//! The agent against the datastore's bad days: invalid pools, and the API server going away.

use std::time::{Duration, Instant};

use tortie_e2e::cluster::{ClusterSpec, TestCluster, agent_env};
use tortie_e2e::{TopologySpec, require_root, wait_for};

const GOOD_POOL: &str = "apiVersion: crd.projectcalico.org/v1\nkind: IPPool\nmetadata:\n  name: good\nspec:\n  \
                         cidr: 10.244.0.0/16\n  vxlanMode: Always\n";

fn cluster(test: &str) -> Option<TestCluster> {
    let spec = ClusterSpec {
        topology: TopologySpec::new().segment(["a1"]).segment(["b1"]),
        pool_yaml: Some(GOOD_POOL.to_owned()),
        ..Default::default()
    };
    let c = TestCluster::start(test, spec).unwrap()?;
    c.wait_ready(Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e:#}\n{}", c.logs()));
    Some(c)
}

fn route_table(c: &TestCluster, node: &str) -> String {
    c.topo
        .node(node)
        .ns
        .run(&["ip", "route", "show", "proto", "84"])
        .unwrap()
}

/// `kubectl patch` of the good pool to `vxlanMode: Never`.
fn vxlan_off(c: &TestCluster) -> anyhow::Result<String> {
    c.kubectl(&[
        "patch",
        "ippool",
        "good",
        "--type=merge",
        "-p",
        r#"{"spec":{"vxlanMode":"Never"}}"#,
    ])
}

fn wait_remote_block_route(c: &TestCluster, node: &str) -> String {
    wait_for(
        &format!("{node} has a remote block route"),
        Duration::from_secs(30),
        || {
            let t = route_table(c, node);
            Ok(t.contains("dev vxlan.calico").then_some(t))
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", c.logs()))
}

#[test]
fn a_bad_pool_is_reported_by_name_and_field_and_good_pools_keep_working() {
    require_root();
    let Some(c) = cluster("a_bad_pool_is_reported_by_name_and_field_and_good_pools_keep_working")
    else {
        return;
    };
    let before = wait_remote_block_route(&c, "a1");
    // Calico's CRDs accept both (no enum, no range): tortie must judge them itself.
    c.api
        .apply(
            "apiVersion: crd.projectcalico.org/v1\nkind: IPPool\nmetadata:\n  name: sometimes\nspec:\n  \
             cidr: 10.245.0.0/16\n  ipipMode: Sometimes\n---\napiVersion: crd.projectcalico.org/v1\nkind: IPPool\n\
             metadata:\n  name: huge-blocks\nspec:\n  cidr: 10.246.0.0/16\n  blockSize: 40\n",
        )
        .unwrap();
    wait_for(
        "the agent names both bad pools and their fields",
        Duration::from_secs(10),
        || {
            let log = c.agent("a1").log();
            Ok((log.contains("IPPool sometimes: spec.ipipMode")
                && log.contains("IPPool huge-blocks: spec.blockSize"))
            .then_some(()))
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", c.logs()));
    assert_eq!(
        route_table(&c, "a1"),
        before,
        "a bad pool must not disturb the good pool's routes"
    );
    // And the good pool still takes live edits.
    vxlan_off(&c).unwrap();
    wait_for(
        "good pool edit applied despite the bad ones",
        Duration::from_secs(10),
        || Ok((!route_table(&c, "a1").contains("vxlan.calico")).then_some(())),
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", c.logs()));
}

#[test]
fn api_server_outage_keeps_routes_and_the_agent_resumes_after() {
    require_root();
    let Some(mut c) = cluster("api_server_outage_keeps_routes_and_the_agent_resumes_after") else {
        return;
    };
    wait_remote_block_route(&c, "a1");
    let pa = c.add_pod("a1", "client").unwrap();
    let pb = c.add_pod("b1", "server").unwrap();
    let leaver = c.add_pod("a1", "leaver").unwrap();
    let leaver_handle = format!("k8s-pod-network.{}", leaver.container_id);
    wait_for("pods reach each other", Duration::from_secs(20), || {
        Ok(pa.ns.ping_once(&pb.ip.to_string(), 200).then_some(()))
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", c.logs()));
    c.api.stop_apiserver();
    wait_for(
        "a1 reports not ready while the API is away",
        Duration::from_secs(30),
        || Ok((c.status("a1")?["ready"] == false).then_some(())),
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", c.logs()));
    // A pod deleted while the API is away: the DEL succeeds (the runtime need not retry and
    // the pod does not hang in Terminating); its address release waits, recorded, for the API.
    c.del_pod(&leaver)
        .unwrap_or_else(|e| panic!("CNI DEL during the API outage: {e:#}\n{}", c.logs()));
    assert_eq!(c.status("a1").unwrap()["pending_releases"], 1);
    let before = route_table(&c, "a1");
    // Through the outage (60 s, as an apiserver failover may take; TORTIE_E2E_OUTAGE_SECS
    // shortens it for local runs) the kernel keeps every route and pod traffic keeps flowing.
    let secs: u32 = std::env::var("TORTIE_E2E_OUTAGE_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60);
    let count = (secs * 100).to_string();
    let outage = Instant::now();
    let out = pa
        .ns
        .exec(&[
            "ping",
            "-n",
            "-q",
            "-c",
            &count,
            "-i",
            "0.01",
            "-W",
            "1",
            &pb.ip.to_string(),
        ])
        .unwrap();
    let summary = String::from_utf8_lossy(&out.stdout).into_owned();
    let (_, received) = tortie_e2e::netns::ping_counts(&summary).unwrap_or_else(|| {
        panic!(
            "no ping summary: {summary} (status {:?}, stderr {})",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let lost = secs * 100 - received;
    assert_eq!(
        route_table(&c, "a1"),
        before,
        "routes changed during the API outage"
    );
    eprintln!(
        "FIGURE api outage: {lost} of {count} pod pings (10 ms apart) lost over {:?}",
        outage.elapsed()
    );
    assert_eq!(lost, 0, "pings lost during the API outage");
    c.api.start_apiserver_again().unwrap();
    wait_for(
        "a1 ready again after the API returns",
        Duration::from_secs(60),
        || Ok((c.status("a1")?["ready"] == true).then_some(())),
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", c.logs()));
    wait_for(
        "the release recorded during the outage reaches the API server",
        Duration::from_secs(30),
        || {
            let handles = c.kubectl(&["get", "ipamhandles", "-o", "name"])?;
            let pending = c.status("a1")?["pending_releases"].as_u64();
            Ok((!handles.contains(&leaver_handle) && pending == Some(0)).then_some(()))
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", c.logs()));
    let blocks = c.kubectl(&["get", "ipamblocks", "-o", "json"]).unwrap();
    assert!(
        !blocks.contains(&leaver.container_id),
        "the deleted pod's allocation is still in a block: {blocks}"
    );
    vxlan_off(&c).unwrap();
    wait_for(
        "pool edit after the outage re-routes a1",
        Duration::from_secs(20),
        || Ok((!route_table(&c, "a1").contains("vxlan.calico")).then_some(())),
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", c.logs()));
}

#[test]
fn first_agent_creates_the_default_pool_from_calico_env() {
    require_root();
    let env = [
        ("CALICO_IPV4POOL_CIDR", "10.250.0.0/16"),
        ("CALICO_IPV4POOL_BLOCK_SIZE", "27"),
        ("CALICO_IPV4POOL_IPIP", "Never"),
        ("CALICO_IPV4POOL_VXLAN", "Always"),
        ("CALICO_IPV4POOL_NAT_OUTGOING", "false"),
    ];
    let spec = ClusterSpec {
        topology: TopologySpec::new().segment(["a1"]).segment(["b1"]),
        pool_yaml: None,
        agent_env: agent_env(&env),
        ..Default::default()
    };
    let Some(c) =
        TestCluster::start("first_agent_creates_the_default_pool_from_calico_env", spec).unwrap()
    else {
        return;
    };
    c.wait_ready(Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e:#}\n{}", c.logs()));
    let pools = c.kubectl(&["get", "ippools", "-o", "json"]).unwrap();
    let v: serde_json::Value = serde_json::from_str(&pools).unwrap();
    let items = v["items"].as_array().unwrap();
    assert_eq!(
        items.len(),
        1,
        "exactly one default pool, even with two agents racing: {pools}"
    );
    let p = &items[0];
    assert_eq!(p["metadata"]["name"], "default-ipv4-ippool");
    let s = &p["spec"];
    assert_eq!(
        (
            s["cidr"].as_str(),
            s["blockSize"].as_i64(),
            s["ipipMode"].as_str(),
            s["vxlanMode"].as_str(),
            s["natOutgoing"].as_bool(),
            s["nodeSelector"].as_str()
        ),
        (
            Some("10.250.0.0/16"),
            Some(27),
            Some("Never"),
            Some("Always"),
            Some(false),
            Some("all()")
        ),
        "{s}"
    );
    // And the pool is used: each node gets its VXLAN tunnel address from it.
    for n in ["a1", "b1"] {
        let addr = wait_for(
            &format!("{n}'s tunnel address"),
            Duration::from_secs(20),
            || {
                let a = c.kubectl(&[
                    "get",
                    "node",
                    n,
                    "-o",
                    "jsonpath={.metadata.annotations.projectcalico\\.org/IPv4VXLANTunnelAddr}",
                ])?;
                Ok((!a.is_empty()).then_some(a))
            },
        )
        .unwrap_or_else(|e| panic!("{e:#}\n{}", c.logs()));
        assert!(
            addr.starts_with("10.250."),
            "{n}'s tunnel address {addr} is not from the default pool"
        );
    }
}

/// Two masters behind nginx, the agents' kubeconfig pointing at nginx (how the clusters tortie
/// serves are built): every connection goes to the first master until it dies, then to the
/// second. The agents' watches break and reconnect through nginx; an IPPool edit made after the
/// failover reaches the dataplane, and a new pod gets its address through the second master.
#[test]
fn api_failover_behind_nginx_is_just_a_reconnect() {
    require_root();
    let spec = ClusterSpec {
        topology: TopologySpec::new().segment(["a1", "a2"]),
        pool_yaml: Some(GOOD_POOL.to_owned()),
        api_behind_balancer: true,
        ..Default::default()
    };
    let Some(mut c) =
        TestCluster::start("api_failover_behind_nginx_is_just_a_reconnect", spec).unwrap()
    else {
        return;
    };
    c.wait_ready(Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e:#}\n{}", c.logs()));
    wait_remote_block_route(&c, "a1");
    let pa = c.add_pod("a1", "before").unwrap();
    let pb = c.add_pod("a2", "peer").unwrap();
    wait_for("pods reach each other", Duration::from_secs(20), || {
        Ok(pa.ns.ping_once(&pb.ip.to_string(), 200).then_some(()))
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", c.logs()));

    // The first master's machine dies (no graceful shutdown).
    let failover = Instant::now();
    c.api.kill_apiserver();
    // Through nginx to the second master: a live edit still re-routes the node.
    vxlan_off(&c).unwrap_or_else(|e| panic!("{e:#}\n{}", c.logs()));
    wait_for(
        "the edit made after the failover reaches a1",
        Duration::from_secs(30),
        || Ok((!route_table(&c, "a1").contains("vxlan.calico")).then_some(())),
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", c.logs()));
    eprintln!(
        "FIGURE API failover behind nginx: pool edit applied {:?} after the first master stopped",
        failover.elapsed()
    );
    let pc = c
        .add_pod("a1", "after")
        .unwrap_or_else(|e| panic!("CNI ADD after the failover: {e:#}\n{}", c.logs()));
    wait_for(
        "the new pod reaches its peer",
        Duration::from_secs(20),
        || Ok(pc.ns.ping_once(&pb.ip.to_string(), 200).then_some(())),
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", c.logs()));
    for n in ["a1", "a2"] {
        wait_for(
            &format!("{n} ready through the second master"),
            Duration::from_secs(30),
            || Ok((c.status(n)?["ready"] == true).then_some(())),
        )
        .unwrap_or_else(|e| panic!("{e:#}\n{}", c.logs()));
    }
    assert!(
        pa.ns.ping_once(&pb.ip.to_string(), 1000),
        "pods from before the failover still reach each other"
    );
}
