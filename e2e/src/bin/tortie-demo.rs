//! `make demo`: a 3-node tortie cluster on 2 segments in network namespaces, against a real
//! kube-apiserver, with 2 pods per node made through the CNI plugin. Prints BGP sessions,
//! routes and a pod-to-pod ping matrix, then re-prints the matrix whenever the IPPool changes,
//! until Ctrl-C removes everything.

use std::io::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tortie_e2e::TopologySpec;
use tortie_e2e::cluster::{ClusterSpec, TestCluster, TestPod};

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

const POOL: &str = "apiVersion: crd.projectcalico.org/v1\nkind: IPPool\nmetadata:\n  name: default-ipv4-ippool\n\
                    spec:\n  cidr: 10.244.0.0/16\n  blockSize: 26\n  ipipMode: Never\n  vxlanMode: Always\n  \
                    natOutgoing: true\n  nodeSelector: all()\n";

fn main() -> Result<()> {
    // SAFETY: installs a handler that only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    let started = Instant::now();
    println!("tortie demo: building 3 nodes on 2 segments, a router, and a real kube-apiserver…");
    let spec = ClusterSpec {
        topology: TopologySpec::new()
            .segment(["node-a1", "node-a2"])
            .segment(["node-b1"]),
        pool_yaml: Some(POOL.to_owned()),
        ..Default::default()
    };
    let cluster =
        TestCluster::start("demo", spec)?.context("kube binaries missing: run `make deps`")?;
    cluster.wait_ready(Duration::from_secs(60))?;
    let mut pods = Vec::new();
    for node in ["node-a1", "node-a2", "node-b1"] {
        for i in 0..2 {
            pods.push(cluster.add_pod(
                node,
                &format!("{}-pod{i}", node.trim_start_matches("node-")),
            )?);
        }
    }
    println!("cluster up in {:.1} s\n", started.elapsed().as_secs_f64());
    for node in ["node-a1", "node-a2", "node-b1"] {
        print_status(&cluster, node);
    }
    print_matrix(&pods);

    let router = cluster.topo.router.as_ref().context("router")?;
    let wrapper = write_kubectl_wrapper(&cluster, router.ns.name())?;
    println!("\nThe cluster stays up. Try, in another shell (as root):");
    println!("  {wrapper} get nodes,ippools");
    println!("  {wrapper} edit ippool default-ipv4-ippool     # set vxlanMode: CrossSubnet");
    println!("The matrix is printed again whenever the pool changes. Ctrl-C removes everything.\n");

    let mut last = pool_version(&cluster);
    while !STOP.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(500));
        let now = pool_version(&cluster);
        // An empty answer is a failed read (e.g. Ctrl-C reached kubectl), not a change.
        if !now.is_empty() && now != last {
            last = now;
            println!("IPPool changed: {}", pool_modes(&cluster));
            let t = Instant::now();
            print_matrix(&pods);
            println!(
                "(matrix taken {:.0} ms after the change was seen)\n",
                t.elapsed().as_millis()
            );
        }
    }
    println!("\nremoving the demo cluster…");
    drop(pods);
    drop(cluster);
    let _ = std::fs::remove_file(&wrapper);
    println!("done");
    Ok(())
}

fn pool_version(c: &TestCluster) -> String {
    c.kubectl(&[
        "get",
        "ippool",
        "default-ipv4-ippool",
        "-o",
        "jsonpath={.metadata.resourceVersion}",
    ])
    .unwrap_or_default()
}

fn pool_modes(c: &TestCluster) -> String {
    c.kubectl(&[
        "get",
        "ippool",
        "default-ipv4-ippool",
        "-o",
        "jsonpath=ipipMode={.spec.ipipMode} vxlanMode={.spec.vxlanMode} natOutgoing={.spec.natOutgoing}",
    ])
    .unwrap_or_default()
}

fn print_status(c: &TestCluster, node: &str) {
    println!("── {node} ({}) ──", c.topo.node(node).addr);
    match c.status(node) {
        Ok(s) => {
            for p in s["peers"].as_array().into_iter().flatten() {
                println!(
                    "  BGP {:<12} AS {:<6} {:<12} up {:<6} prefixes in {}",
                    p["address"].as_str().unwrap_or("?"),
                    p["as"],
                    p["state"].as_str().unwrap_or("?"),
                    p["since"].as_str().unwrap_or("-"),
                    p["prefixes_received"]
                );
            }
            println!("  blocks: {}", s["blocks"]);
        }
        Err(e) => println!("  status unavailable: {e:#}"),
    }
    let routes = c
        .topo
        .node(node)
        .ns
        .run(&["ip", "route", "show", "proto", "84"])
        .unwrap_or_default();
    for r in routes.lines() {
        println!("  route {r}");
    }
}

fn print_matrix(pods: &[TestPod]) {
    print!("\n{:>12}", "from \\ to");
    for p in pods {
        print!(" {:>9}", p.name);
    }
    println!();
    let mut lost = 0;
    for a in pods {
        print!("{:>12}", a.name);
        for b in pods {
            let cell = if a.name == b.name {
                "-"
            } else if a.ns.ping_once(&b.ip.to_string(), 500) {
                "ok"
            } else {
                lost += 1;
                "FAIL"
            };
            print!(" {cell:>9}");
        }
        println!();
        let _ = std::io::stdout().flush();
    }
    println!("{} pairs, {lost} failed", pods.len() * (pods.len() - 1));
}

/// A `kubectl` for the demo cluster: the apiserver lives in the router namespace.
fn write_kubectl_wrapper(c: &TestCluster, router_ns: &str) -> Result<String> {
    let dir = std::path::PathBuf::from(std::env::var("TORTIE_CACHE").unwrap_or_else(|_| {
        format!(
            "{}/.cache/tortie",
            std::env::var("HOME").unwrap_or_else(|_| "/root".into())
        )
    }));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("demo-kubectl");
    let kubectl = tortie_e2e::apiserver::kube_bin_dir().join("kubectl");
    std::fs::write(
        &path,
        format!(
            "#!/bin/sh\n# kubectl for the running tortie demo (its apiserver is inside netns {router_ns})\n\
             exec ip netns exec {router_ns} {} --kubeconfig {} \"$@\"\n",
            kubectl.display(),
            c.api.admin_kubeconfig().display()
        ),
    )?;
    std::process::Command::new("chmod")
        .arg("+x")
        .arg(&path)
        .status()?;
    Ok(path.display().to_string())
}
