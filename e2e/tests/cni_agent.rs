//! The CNI plugin against the real agent (real API server, VXLAN pool): DEL hands the host
//! veth to the agent, which removes it after answering; the veth and the pod's /32 must still
//! be gone promptly, and a new sandbox of the same pod must never lose its veth to that removal
//! or to a late DEL of an older sandbox.

#[path = "cni_support.rs"]
mod support;

use std::time::{Duration, Instant};

use support::PodRef;
use tortie_e2e::cluster::{ClusterSpec, TestCluster};
use tortie_e2e::{Netns, TopologySpec, require_root, wait_for};

/// How long after DEL returns the host veth and its /32 may linger.
const GONE_DEADLINE: Duration = Duration::from_secs(2);

fn start(test: &str) -> Option<TestCluster> {
    let spec = ClusterSpec {
        topology: TopologySpec::new().segment(["a1"]),
        pool_yaml: Some(
            "apiVersion: crd.projectcalico.org/v1\nkind: IPPool\nmetadata:\n  name: default-ipv4-ippool\n\
             spec:\n  cidr: 10.244.0.0/16\n  vxlanMode: Always\n  natOutgoing: false\n"
                .to_owned(),
        ),
        ..Default::default()
    };
    let c = TestCluster::start(test, spec).unwrap()?;
    c.wait_ready(Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e:#}\n{}", c.logs()));
    Some(c)
}

/// Calico's host veth name of pod `default/<name>` (independently of tortie).
fn host_if_of(name: &str) -> String {
    PodRef::in_netns_named("unused", name).host_if()
}

fn link_exists(ns: &Netns, name: &str) -> bool {
    ns.exec(&["ip", "link", "show", "dev", name])
        .is_ok_and(|o| o.status.success())
}

/// The node's route to `ip`, as `ip route` prints it (empty when there is none).
fn route_to(ns: &Netns, ip: &str) -> String {
    ns.run(&["ip", "route", "show", "exact", &format!("{ip}/32")])
        .unwrap_or_default()
        .trim()
        .to_owned()
}

#[test]
fn del_removes_the_host_veth_and_its_route_within_a_deadline() {
    require_root();
    let Some(c) = start("del_removes_the_host_veth_and_its_route_within_a_deadline") else {
        return;
    };
    let node = &c.topo.node("a1").ns;
    let pod = c.add_pod("a1", "gone").unwrap();
    let host_if = host_if_of("gone");
    let ip = pod.ip.to_string();
    wait_for("the pod's /32 via its veth", Duration::from_secs(5), || {
        Ok(route_to(node, &ip).contains(&host_if).then_some(()))
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", c.logs()));

    let del_started = Instant::now();
    c.del_pod(&pod).unwrap();
    let del_took = del_started.elapsed();
    wait_for(
        "the host veth and the pod's /32 are gone",
        GONE_DEADLINE,
        || Ok((!link_exists(node, &host_if) && route_to(node, &ip).is_empty()).then_some(())),
    )
    .unwrap_or_else(|e| panic!("{e:#}\nroute: {}\n{}", route_to(node, &ip), c.logs()));
    eprintln!(
        "FIGURE real agent: DEL returned after {del_took:?}; veth and /32 gone {:?} after DEL began",
        del_started.elapsed()
    );
    // The pod's end went with the host end.
    assert!(
        !link_exists(&pod.ns, "eth0"),
        "the pod end outlived its host end"
    );
    let log = c.agent("a1").log();
    assert!(
        !log.contains("removing the pod's host interface failed"),
        "{log}"
    );
}

#[test]
fn del_then_immediate_add_of_the_same_pod_keeps_the_new_sandboxs_veth() {
    require_root();
    let Some(c) = start("del_then_immediate_add_of_the_same_pod_keeps_the_new_sandboxs_veth")
    else {
        return;
    };
    let node = &c.topo.node("a1").ns;
    let node_addr = c.topo.node("a1").addr.to_string();
    let host_if = host_if_of("same");
    let old = c.add_pod("a1", "same").unwrap();

    // The runtime tears the old sandbox down and at once sets up a new one of the same pod.
    c.del_pod(&old).unwrap();
    let new_ns = Netns::create("pod-same-2").unwrap();
    let new_id = format!("{:016x}same-2", std::process::id());
    let result = c
        .cni(
            "a1",
            "ADD",
            &new_id,
            &format!("/var/run/netns/{}", new_ns.name()),
            "same",
        )
        .unwrap_or_else(|e| panic!("{e:#}\n{}", c.logs()));
    let new_ip = result["ips"][0]["address"]
        .as_str()
        .and_then(|a| a.split('/').next())
        .unwrap_or_else(|| panic!("no address in {result}"))
        .to_owned();

    // The old sandbox's end is gone; the new one's veth is there, routed, and stays.
    wait_for("the old sandbox's veth is gone", GONE_DEADLINE, || {
        Ok((!link_exists(&old.ns, "eth0")).then_some(()))
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", c.logs()));
    wait_for(
        "the new pod's /32 via its veth",
        Duration::from_secs(5),
        || Ok(route_to(node, &new_ip).contains(&host_if).then_some(())),
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", c.logs()));
    assert!(link_exists(node, &host_if), "the new sandbox lost its veth");
    assert!(
        link_exists(&new_ns, "eth0"),
        "the new sandbox lost its eth0"
    );
    wait_for("the new pod pings its node", Duration::from_secs(5), || {
        Ok(new_ns.ping_once(&node_addr, 200).then_some(()))
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", c.logs()));

    c.cni(
        "a1",
        "DEL",
        &new_id,
        &format!("/var/run/netns/{}", new_ns.name()),
        "same",
    )
    .unwrap();
    wait_for("the new sandbox's veth is gone", GONE_DEADLINE, || {
        Ok((!link_exists(node, &host_if)).then_some(()))
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", c.logs()));
}

#[test]
fn late_del_of_an_older_sandbox_keeps_the_newer_sandboxs_veth() {
    require_root();
    let Some(c) = start("late_del_of_an_older_sandbox_keeps_the_newer_sandboxs_veth") else {
        return;
    };
    let node = &c.topo.node("a1").ns;
    let node_addr = c.topo.node("a1").addr.to_string();
    let host_if = host_if_of("late");
    // The runtime sets up a new sandbox of the pod before tearing the old one down.
    let old = c.add_pod("a1", "late").unwrap();
    let new_ns = Netns::create("pod-late-2").unwrap();
    let new_id = format!("{:016x}late-2", std::process::id());
    let new_netns = format!("/var/run/netns/{}", new_ns.name());
    c.cni("a1", "ADD", &new_id, &new_netns, "late")
        .unwrap_or_else(|e| panic!("{e:#}\n{}", c.logs()));

    c.del_pod(&old).unwrap();
    wait_for(
        "the agent kept the newer sandbox's veth",
        GONE_DEADLINE,
        || {
            Ok(c.agent("a1")
                .log()
                .contains("host interface belongs to a newer sandbox; kept")
                .then_some(()))
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", c.logs()));
    assert!(link_exists(node, &host_if), "the late DEL took the veth");
    wait_for("the new pod pings its node", Duration::from_secs(5), || {
        Ok(new_ns.ping_once(&node_addr, 200).then_some(()))
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", c.logs()));

    c.cni("a1", "DEL", &new_id, &new_netns, "late").unwrap();
    wait_for("the veth is gone after its own DEL", GONE_DEADLINE, || {
        Ok((!link_exists(node, &host_if)).then_some(()))
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", c.logs()));
}

/// Mutating requests the API server has served for IPAM blocks (its own counter).
fn block_writes(c: &TestCluster) -> f64 {
    let m = c.kubectl(&["get", "--raw", "/metrics"]).unwrap();
    m.lines()
        .filter(|l| l.starts_with("apiserver_request_total{"))
        .filter(|l| l.contains("resource=\"ipamblocks\""))
        .filter(|l| {
            ["\"PUT\"", "\"PATCH\"", "\"DELETE\""]
                .iter()
                .any(|v| l.contains(v))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// One `tortie_ipam_releases_total` sample of the node's agent.
fn releases_written(c: &TestCluster, how: &str) -> f64 {
    let m = c.metrics("a1").unwrap();
    let prefix = format!("tortie_ipam_releases_total{{written=\"{how}\"}} ");
    m.lines()
        .find_map(|l| l.strip_prefix(&prefix)?.parse().ok())
        .unwrap_or_else(|| panic!("no {prefix} in the agent's metrics"))
}

fn wait_no_pending_release(c: &TestCluster) {
    wait_for("no release pending", Duration::from_secs(5), || {
        Ok((c.status("a1")?["pending_releases"] == 0).then_some(()))
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", c.logs()));
}

#[test]
fn pods_deleted_together_free_their_addresses_in_one_block_write_and_a_release_rides_on_the_next_add()
 {
    require_root();
    let Some(c) = start("pods_deleted_together_free_their_addresses_in_one_block_write") else {
        return;
    };
    let pods: Vec<_> = (0..6)
        .map(|i| c.add_pod("a1", &format!("batch-{i}")).unwrap())
        .collect();
    wait_no_pending_release(&c);
    let writes_before = block_writes(&c);
    // A scale-down: every DEL at once.
    std::thread::scope(|s| {
        for pod in &pods {
            let c = &c;
            s.spawn(move || c.del_pod(pod).unwrap());
        }
    });
    let answered = Instant::now();
    wait_no_pending_release(&c);
    let after_release = answered.elapsed();
    let writes = block_writes(&c) - writes_before;
    // One write when the six DELs land inside one window; two if the runtime spread them.
    assert!(
        (1.0..=2.0).contains(&writes),
        "six releases took {writes} block writes\n{}",
        c.logs()
    );
    let handles = c.kubectl(&["get", "ipamhandles", "-o", "name"]).unwrap();
    for pod in &pods {
        assert!(
            !handles.contains(&pod.container_id),
            "{} still has its handle: {handles}",
            pod.name
        );
    }
    // /metrics is rendered once per agent tick.
    wait_for("six releases counted", Duration::from_secs(5), || {
        let n = releases_written(&c, "batched") + releases_written(&c, "alone");
        Ok((n == 6.0).then_some(()))
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", c.metrics("a1").unwrap_or_default()));
    eprintln!(
        "FIGURE six pods deleted together: released {after_release:?} after the DELs returned, {writes} block write(s)"
    );

    // A pod replaced: the old one's release rides on the new one's ADD, so the block is
    // written once for both.
    let old = c.add_pod("a1", "replaced").unwrap();
    wait_no_pending_release(&c);
    let writes_before = block_writes(&c);
    let carried_before = releases_written(&c, "with_assignment");
    c.del_pod(&old).unwrap();
    let del_done = Instant::now();
    let new = c.add_pod("a1", "replacement").unwrap();
    let gap = del_done.elapsed();
    wait_no_pending_release(&c);
    let handles = c.kubectl(&["get", "ipamhandles", "-o", "name"]).unwrap();
    assert!(!handles.contains(&old.container_id), "{handles}");
    assert!(handles.contains(&new.container_id), "{handles}");
    if gap < Duration::from_millis(250) {
        wait_for(
            "the carried release counted",
            Duration::from_secs(5),
            || {
                let carried = releases_written(&c, "with_assignment") - carried_before;
                Ok((carried == 1.0).then_some(()))
            },
        )
        .unwrap_or_else(|e| {
            panic!(
                "the release was not carried by the ADD {gap:?} later: {e:#}\n{}",
                c.logs()
            )
        });
        assert_eq!(block_writes(&c) - writes_before, 1.0);
    } else {
        eprintln!(
            "NOTE: the replacement ADD came {gap:?} after the DEL, past the carry window; \
             carrying not checked on this run"
        );
    }
}

#[test]
fn pods_added_together_get_distinct_addresses_in_few_block_writes() {
    require_root();
    let Some(c) = start("pods_added_together_get_distinct_addresses_in_few_block_writes") else {
        return;
    };
    let node_addr = c.topo.node("a1").addr.to_string();
    // The node's block exists before the burst (as on a node that already runs pods).
    let _first = c.add_pod("a1", "before-burst").unwrap();
    let writes_before = block_writes(&c);
    let pods: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..12)
            .map(|i| {
                let c = &c;
                s.spawn(move || c.add_pod("a1", &format!("burst-{i}")))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap().unwrap_or_else(|e| panic!("{e:#}")))
            .collect()
    });
    let writes = block_writes(&c) - writes_before;
    let mut ips: Vec<_> = pods.iter().map(|p| p.ip).collect();
    ips.sort();
    ips.dedup();
    assert_eq!(ips.len(), pods.len(), "an address handed out twice");
    // Each address is in the datastore under its own pod's handle.
    let blocks: serde_json::Value =
        serde_json::from_str(&c.kubectl(&["get", "ipamblocks", "-o", "json"]).unwrap()).unwrap();
    let handles_in_blocks: Vec<String> = blocks["items"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|b| {
            b["spec"]["attributes"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .filter_map(|a| a["handle_id"].as_str().map(str::to_owned))
        .collect();
    for pod in &pods {
        assert!(
            handles_in_blocks
                .iter()
                .any(|h| h.ends_with(&pod.container_id)),
            "{} has no allocation under its handle",
            pod.name
        );
        wait_for("the pod reaches its node", Duration::from_secs(5), || {
            Ok(pod.ns.ping_once(&node_addr, 200).then_some(()))
        })
        .unwrap_or_else(|e| panic!("{}: {e:#}\n{}", pod.name, c.logs()));
    }
    assert!(
        writes <= pods.len() as f64,
        "{writes} block writes for {} pods",
        pods.len()
    );
    eprintln!(
        "FIGURE {} pods added at once: {writes} block write(s)",
        pods.len()
    );
}
