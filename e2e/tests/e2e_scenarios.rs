//! End-to-end scenarios: an agent SIGKILLed under traffic, pod churn, and a cluster running on
//! Calico v3.26's own CRDs with a pool written the way Calico's docs show.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use tortie_e2e::cluster::{ClusterSpec, TestCluster, TestPod};
use tortie_e2e::{TopologySpec, require_root, wait_for};

fn vxlan_pool(mode: &str) -> String {
    format!(
        "apiVersion: crd.projectcalico.org/v1\nkind: IPPool\nmetadata:\n  name: default-ipv4-ippool\nspec:\n  \
         cidr: 10.244.0.0/16\n  vxlanMode: {mode}\n  natOutgoing: false\n"
    )
}

fn start(test: &str, spec: ClusterSpec) -> Option<TestCluster> {
    let c = TestCluster::start(test, spec).unwrap()?;
    c.wait_ready(Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e:#}\n{}", c.logs()));
    Some(c)
}

/// Sends 800 pings 10 ms apart (8 s) while `during` runs, and counts replies. A fixed count
/// (not an interrupt) lets ping wait for the last reply, so only real losses count.
fn pings_during(from: &TestPod, to: &TestPod, during: impl FnOnce()) -> (u32, u32) {
    let child = from
        .ns
        .command("ping")
        .args([
            "-n",
            "-i",
            "0.01",
            "-c",
            "800",
            "-W",
            "1",
            &to.ip.to_string(),
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    during();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    // Name the lost sequence numbers, so a failure says when in the restart they fell.
    let answered: BTreeSet<u32> = text
        .lines()
        .filter_map(|l| {
            l.split("icmp_seq=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect();
    if let Some(&last) = answered.last() {
        let lost: Vec<u32> = (1..=last).filter(|n| !answered.contains(n)).collect();
        if !lost.is_empty() {
            eprintln!("ping: lost icmp_seq {lost:?} of 1..={last}");
        }
    }
    tortie_e2e::netns::ping_counts(&text).unwrap_or_else(|| panic!("no ping summary in: {text}"))
}

#[test]
fn sigkilled_agent_restarts_without_dropping_pod_traffic() {
    require_root();
    let spec = ClusterSpec {
        topology: TopologySpec::new().segment(["a1"]).segment(["b1"]),
        pool_yaml: Some(vxlan_pool("Always")),
        ..Default::default()
    };
    let Some(mut c) = start(
        "sigkilled_agent_restarts_without_dropping_pod_traffic",
        spec,
    ) else {
        return;
    };
    let pa = c.add_pod("a1", "client").unwrap();
    let pb = c.add_pod("b1", "server").unwrap();
    wait_for("pods reach each other", Duration::from_secs(20), || {
        Ok(pa.ns.ping_once(&pb.ip.to_string(), 200).then_some(()))
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", c.logs()));
    let routes_before = c
        .topo
        .node("a1")
        .ns
        .run(&["ip", "route", "show", "proto", "84"])
        .unwrap();
    let mut restart_ready = Duration::ZERO;
    let (sent, received) = pings_during(&pa, &pb, || {
        c.kill_agent("a1").unwrap();
        let t = Instant::now();
        c.restart_agent("a1").unwrap();
        c.wait_ready(Duration::from_secs(60)).unwrap();
        restart_ready = t.elapsed();
    });
    let lost = sent - received;
    eprintln!(
        "FIGURE SIGKILL + restart of a1's agent: {lost} of {sent} pings lost (10 ms interval); ready again after {restart_ready:?}"
    );
    assert!(
        lost <= 1,
        "lost {lost} of {sent} replies across an agent restart"
    );
    let routes_after = c
        .topo
        .node("a1")
        .ns
        .run(&["ip", "route", "show", "proto", "84"])
        .unwrap();
    assert_eq!(
        routes_before, routes_after,
        "the restarted agent must converge on the same routes"
    );
}

#[test]
fn pod_churn_never_duplicates_and_leaves_nothing_behind() {
    require_root();
    let spec = ClusterSpec {
        topology: TopologySpec::new().segment(["a1", "a2"]).segment(["b1"]),
        pool_yaml: Some(vxlan_pool("CrossSubnet")),
        ..Default::default()
    };
    let Some(c) = start("pod_churn_never_duplicates_and_leaves_nothing_behind", spec) else {
        return;
    };
    let nodes = ["a1", "a2", "b1"];
    let started = Instant::now();
    let mut seen = BTreeSet::new();
    let mut live: Vec<TestPod> = Vec::new();
    // 200 pods in waves of 20, 10 of them created concurrently per wave; half of each wave is
    // deleted before the next so addresses are reused.
    for wave in 0..10 {
        let batch: Vec<TestPod> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..20)
                .map(|i| {
                    let c = &c;
                    let node = nodes[(wave + i) % 3];
                    let name = format!("churn-{wave}-{i}");
                    s.spawn(move || c.add_pod(node, &name))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap().unwrap())
                .collect()
        });
        for p in &batch {
            let in_use: Vec<_> = live.iter().map(|l| l.ip).collect();
            assert!(
                !in_use.contains(&p.ip),
                "address {} handed out twice (pod {})",
                p.ip,
                p.name
            );
            seen.insert(p.ip);
        }
        live.extend(batch);
        let remove: Vec<TestPod> = live.drain(..live.len() / 2).collect();
        std::thread::scope(|s| {
            for p in &remove {
                let c = &c;
                s.spawn(move || c.del_pod(p).unwrap());
            }
        });
    }
    // One pod per node talks across, proving the survivors are wired.
    let (a, b) = (
        live.iter().find(|p| p.node == "a1").unwrap(),
        live.iter().find(|p| p.node == "b1").unwrap(),
    );
    wait_for(
        "survivors reach each other",
        Duration::from_secs(10),
        || Ok(a.ns.ping_once(&b.ip.to_string(), 200).then_some(())),
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", c.logs()));
    for p in live.drain(..) {
        c.del_pod(&p).unwrap();
    }
    eprintln!(
        "FIGURE pod churn: 200 pods added and deleted across 3 nodes in {:?} ({} distinct addresses)",
        started.elapsed(),
        seen.len()
    );
    // DEL is answered once the release is recorded; the API server has it moments later.
    wait_for("every pod handle released", Duration::from_secs(10), || {
        let handles = c.kubectl(&["get", "ipamhandles", "-o", "name"])?;
        Ok((!handles.contains("k8s-pod-network")).then_some(()))
    })
    .unwrap_or_else(|e| panic!("allocations left after every pod was deleted: {e:#}"));
    for n in nodes {
        let ns = &c.topo.node(n).ns;
        wait_for(
            &format!("{n}: no pod routes or veths left"),
            Duration::from_secs(10),
            || {
                let routes = ns.run(&["ip", "route", "show", "proto", "84", "scope", "link"])?;
                let links = ns.run(&["ip", "-o", "link"])?;
                // `5: cali0123456789a@if2: <…>` — pod veths, not vxlan.calico.
                let veths = links
                    .lines()
                    .filter(|l| {
                        l.split_whitespace()
                            .nth(1)
                            .is_some_and(|n| n.starts_with("cali"))
                    })
                    .count();
                Ok((routes.trim().is_empty() && veths == 0).then_some(()))
            },
        )
        .unwrap_or_else(|e| panic!("{e:#}\n{}", c.logs()));
    }
}

#[test]
fn runs_on_calico_v3_26_crds_with_a_pool_written_as_calicos_docs_show() {
    require_root();
    // As in Calico's docs for an IPPool: apiVersion projectcalico.org/v3 is what calicoctl
    // takes; kubectl writes the crd.projectcalico.org/v1 form with the same spec.
    let pool = "apiVersion: crd.projectcalico.org/v1\nkind: IPPool\nmetadata:\n  name: default-ipv4-ippool\nspec:\n  \
                cidr: 192.168.0.0/16\n  ipipMode: Never\n  vxlanMode: CrossSubnet\n  natOutgoing: true\n  \
                nodeSelector: all()\n  blockSize: 26\n";
    let spec = ClusterSpec {
        topology: TopologySpec::new().segment(["a1", "a2"]).segment(["b1"]),
        pool_yaml: Some(pool.to_owned()),
        calico_crds: true,
        ..Default::default()
    };
    let Some(c) = start("runs_on_calico_v3_26_crds", spec) else {
        return;
    };
    let crd = c.kubectl(&["get", "crd", "ippools.crd.projectcalico.org", "-o", "jsonpath={.spec.versions[0].schema.openAPIV3Schema.properties.spec.properties.ipipMode.description}"]).unwrap();
    assert!(
        !crd.contains("tortie"),
        "expected the Calico fixture CRDs, found tortie's: {crd}"
    );
    let pa = c.add_pod("a1", "x").unwrap();
    let pa2 = c.add_pod("a2", "y").unwrap();
    let pb = c.add_pod("b1", "z").unwrap();
    for (from, to) in [(&pa, &pa2), (&pa, &pb), (&pb, &pa2)] {
        wait_for(
            &format!("{} → {}", from.name, to.name),
            Duration::from_secs(20),
            || Ok(from.ns.ping_once(&to.ip.to_string(), 200).then_some(())),
        )
        .unwrap_or_else(|e| panic!("{e:#}\n{}", c.logs()));
    }
    assert!(
        pa.ip.to_string().starts_with("192.168."),
        "address from the Calico-shaped pool: {}",
        pa.ip
    );
    // The objects tortie wrote are Calico's shapes, readable through Calico's schema.
    let blocks = c.kubectl(&["get", "ipamblocks", "-o", "json"]).unwrap();
    let v: serde_json::Value = serde_json::from_str(&blocks).unwrap();
    let b = &v["items"][0]["spec"];
    for field in [
        "cidr",
        "affinity",
        "allocations",
        "unallocated",
        "attributes",
    ] {
        assert!(
            !b[field].is_null(),
            "IPAMBlock written without {field}: {b}"
        );
    }
    for p in [&pa, &pa2, &pb] {
        c.del_pod(p).unwrap();
    }
}
