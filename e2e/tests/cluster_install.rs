//! tortie installed as its users install it: `kubectl apply -f manifests/` on a cluster built
//! from binaries (etcd, kube-apiserver, controller-manager, scheduler; per node containerd +
//! runc + kubelet + kube-proxy), with the image `make image` builds imported into each node's
//! containerd. The kubelets' container runtime calls the CNI plugin for every pod: nothing here
//! plays the kubelet.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;
use tortie_e2e::cluster::workspace_root;
use tortie_e2e::kubelet_cluster::{
    BUSYBOX_IMAGE, KubeletCluster, KubeletClusterSpec, tortie_image,
};
use tortie_e2e::{TopologySpec, require_root, wait_until};

const POOL_CIDR: &str = "10.244.0.0/16";
const REPLICAS: usize = 30;

/// The manifests as a user edits them before `kubectl apply -f manifests/`: the image built
/// here and calico.yaml-style env (pool CIDR, encapsulation, autodetection method).
fn user_manifests(encapsulation: &str) -> Result<Vec<(String, String)>> {
    let root = workspace_root().join("manifests");
    let mut out = Vec::new();
    for name in ["crds.yaml", "rbac.yaml", "daemonset.yaml"] {
        let text = std::fs::read_to_string(root.join(name))
            .with_context(|| format!("reading manifests/{name}"))?;
        out.push((name.to_owned(), text));
    }
    let ds = &mut out[2].1;
    let image_line = format!("image: {}", tortie_image());
    if !ds.contains(&image_line) {
        bail!("manifests/daemonset.yaml does not use the image `make image` builds ({image_line})");
    }
    for (name, value) in [
        ("IP_AUTODETECTION_METHOD", "interface=eth.*"),
        ("CALICO_IPV4POOL_CIDR", POOL_CIDR),
        ("CALICO_IPV4POOL_VXLAN", encapsulation),
    ] {
        *ds = set_env_value(ds, name, value)
            .with_context(|| format!("setting {name} in daemonset.yaml"))?;
    }
    Ok(out)
}

/// Replaces the `value:` line following `- name: <name>` (as a user editing the YAML would).
fn set_env_value(yaml: &str, name: &str, value: &str) -> Result<String> {
    let marker = format!("- name: {name}\n");
    let at = yaml.find(&marker).context("env var not in the manifest")?;
    let after = at + marker.len();
    let line_end = yaml[after..].find('\n').context("truncated manifest")? + after;
    let line = &yaml[after..line_end];
    let indent = &line[..line.len() - line.trim_start().len()];
    if !line.trim_start().starts_with("value:") {
        bail!("`{name}` has no literal value line");
    }
    Ok(format!(
        "{}{indent}value: \"{value}\"{}",
        &yaml[..after],
        &yaml[line_end..]
    ))
}

fn pods(c: &KubeletCluster, selector: &str, namespace: &str) -> Result<Vec<Value>> {
    let out = c.kubectl(&["get", "pods", "-n", namespace, "-l", selector, "-o", "json"])?;
    let list: Value = serde_json::from_str(&out)?;
    Ok(list["items"].as_array().cloned().unwrap_or_default())
}

fn is_ready(pod: &Value) -> bool {
    pod["status"]["conditions"].as_array().is_some_and(|cs| {
        cs.iter()
            .any(|c| c["type"] == "Ready" && c["status"] == "True")
    })
}

fn nodes_ready(c: &KubeletCluster) -> Result<usize> {
    let list: Value = serde_json::from_str(&c.kubectl(&["get", "nodes", "-o", "json"])?)?;
    Ok(list["items"]
        .as_array()
        .map(|items| {
            items
                .iter()
                .filter(|n| {
                    n["status"]["conditions"].as_array().is_some_and(|cs| {
                        cs.iter()
                            .any(|c| c["type"] == "Ready" && c["status"] == "True")
                    })
                })
                .count()
        })
        .unwrap_or(0))
}

fn deployment(name: &str, replicas: usize) -> String {
    format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata: {{name: {name}, namespace: default}}
spec:
  replicas: {replicas}
  selector: {{matchLabels: {{app: {name}}}}}
  template:
    metadata: {{labels: {{app: {name}}}}}
    spec:
      terminationGracePeriodSeconds: 1
      topologySpreadConstraints:
        - maxSkew: 1
          topologyKey: kubernetes.io/hostname
          whenUnsatisfiable: DoNotSchedule
          labelSelector: {{matchLabels: {{app: {name}}}}}
      containers:
        - name: main
          image: {BUSYBOX_IMAGE}
          imagePullPolicy: Never
          command: ["sleep", "3600"]
"#
    )
}

/// Address → (handle id, pod name) for every allocation in every IPAMBlock.
fn block_allocations(c: &KubeletCluster) -> Result<BTreeMap<Ipv4Addr, (String, String)>> {
    let out = c.kubectl(&["get", "ipamblocks.crd.projectcalico.org", "-o", "json"])?;
    let list: Value = serde_json::from_str(&out)?;
    let mut by_addr = BTreeMap::new();
    for block in list["items"].as_array().into_iter().flatten() {
        let spec = &block["spec"];
        let cidr = spec["cidr"].as_str().context("block without cidr")?;
        let base: Ipv4Addr = cidr
            .split('/')
            .next()
            .and_then(|a| a.parse().ok())
            .context("block cidr")?;
        let attrs = spec["attributes"].as_array().cloned().unwrap_or_default();
        for (ordinal, slot) in spec["allocations"]
            .as_array()
            .into_iter()
            .flatten()
            .enumerate()
        {
            let Some(index) = slot.as_u64() else { continue };
            let attr = &attrs[index as usize];
            let addr = Ipv4Addr::from(u32::from(base) + ordinal as u32);
            let handle = attr["handle_id"].as_str().unwrap_or_default().to_owned();
            let pod = attr["secondary"]["pod"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            by_addr.insert(addr, (handle, pod));
        }
    }
    Ok(by_addr)
}

fn exec(c: &KubeletCluster, namespace: &str, pod: &str, argv: &[&str]) -> Result<String> {
    let mut args = vec!["exec", "-n", namespace, pod, "--"];
    args.extend_from_slice(argv);
    c.kubectl(&args)
}

#[test]
fn daemonset_install_on_real_kubelets() -> Result<()> {
    require_root();
    // The kubelet writes kernel.panic (and others) on the whole host; the cluster restores them.
    let panic_before = std::fs::read_to_string("/proc/sys/kernel/panic")?;
    let spec = KubeletClusterSpec {
        topology: TopologySpec::new()
            .segment(["node-a", "node-b"])
            .segment(["node-c"]),
        // The seed's two masters behind nginx: kubelets, kube-proxy and controllers use the VIP.
        api_behind_balancer: true,
    };
    let Some(c) = KubeletCluster::start("daemonset_install_on_real_kubelets", spec)? else {
        return Ok(());
    };
    let cluster_ready = c.time_to_nodes_registered;
    println!(
        "cluster ready (all components, 3 Nodes registered) after {:.1} s",
        cluster_ready.as_secs_f64()
    );
    println!(
        "BENCH cluster_components_ready tortie={:.1}s",
        cluster_ready.as_secs_f64()
    );
    // Before tortie, no node can run pods: no CNI config.
    assert_eq!(
        nodes_ready(&c)?,
        0,
        "a node was Ready before any CNI was installed"
    );

    let applied = Instant::now();
    for (name, text) in user_manifests("CrossSubnet")? {
        c.apply(&text)
            .with_context(|| format!("kubectl apply -f manifests/{name}"))?;
        if name == "crds.yaml" {
            c.kubectl(&[
                "wait",
                "--for=condition=Established",
                "--timeout=30s",
                "crd",
                "--all",
            ])?;
        }
    }
    let all_ready = wait_until(
        "every tortie-node pod Ready and every Node Ready",
        Duration::from_secs(180),
        || {
            let Ok(agents) = pods(&c, "k8s-app=tortie-node", "kube-system") else {
                return false;
            };
            agents.len() == 3 && agents.iter().all(is_ready) && nodes_ready(&c).unwrap_or(0) == 3
        },
    );
    if let Err(e) = all_ready {
        let describe = c
            .kubectl(&["describe", "pods", "-n", "kube-system"])
            .unwrap_or_default();
        let logs = c
            .kubectl(&[
                "logs",
                "-n",
                "kube-system",
                "-l",
                "k8s-app=tortie-node",
                "--tail=30",
                "--all-containers",
            ])
            .unwrap_or_default();
        bail!("{e:#}\n{describe}\n{logs}\n{}", c.diagnostics());
    }
    let install = applied.elapsed();
    // Both masters serve the `kubernetes` Service the agents reach the API through.
    let endpoints = c.kubectl(&[
        "get",
        "endpoints",
        "kubernetes",
        "-o",
        "jsonpath={.subsets[*].addresses[*].ip}",
    ])?;
    for master in ["10.77.0.1", "10.77.0.2"] {
        assert!(
            endpoints.split_whitespace().any(|a| a == master),
            "kubernetes endpoints {endpoints:?} lack {master}"
        );
    }
    println!(
        "kubectl apply -f manifests/ -> all Nodes Ready after {:.1} s",
        install.as_secs_f64()
    );
    println!(
        "BENCH install_to_nodes_ready tortie={:.1}s",
        install.as_secs_f64()
    );

    // A Deployment spread over the three nodes.
    let created = Instant::now();
    c.apply(&deployment("spread", REPLICAS))?;
    let running = wait_until(
        "30 pods Running with addresses",
        Duration::from_secs(180),
        || {
            pods(&c, "app=spread", "default").is_ok_and(|ps| {
                ps.len() == REPLICAS
                    && ps.iter().all(|p| {
                        p["status"]["phase"] == "Running" && p["status"]["podIP"].is_string()
                    })
            })
        },
    );
    if let Err(e) = running {
        let describe = c
            .kubectl(&["describe", "pods", "-l", "app=spread"])
            .unwrap_or_default();
        bail!(
            "{e:#}\n{}\n{}",
            &describe[describe.len().saturating_sub(6000)..],
            c.diagnostics()
        );
    }
    let deploy_time = created.elapsed();
    println!(
        "{REPLICAS}-pod Deployment -> all Running with addresses after {:.1} s",
        deploy_time.as_secs_f64()
    );

    // Every pod's address is in the pool, held in an IPAMBlock by its own pod.
    let spread = pods(&c, "app=spread", "default")?;
    let allocations = block_allocations(&c)?;
    let pool: ipnet_lite::Net = POOL_CIDR.parse()?;
    let mut per_node: BTreeMap<String, Vec<(String, Ipv4Addr)>> = BTreeMap::new();
    for p in &spread {
        let name = p["metadata"]["name"]
            .as_str()
            .context("pod name")?
            .to_owned();
        let ips: Vec<Ipv4Addr> = p["status"]["podIPs"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|i| i["ip"].as_str()?.parse().ok())
            .collect();
        assert_eq!(ips.len(), 1, "pod {name}: podIPs {ips:?}");
        let ip = ips[0];
        assert!(
            pool.contains(ip),
            "pod {name} got {ip}, outside {POOL_CIDR}"
        );
        let (handle, owner) = allocations
            .get(&ip)
            .with_context(|| format!("pod {name}'s {ip} is in no IPAMBlock"))?;
        assert_eq!(owner, &name, "{ip} is allocated to {owner}, not {name}");
        assert!(
            handle.starts_with("k8s-pod-network."),
            "{ip}: handle {handle}"
        );
        let node = p["spec"]["nodeName"]
            .as_str()
            .context("nodeName")?
            .to_owned();
        per_node.entry(node).or_default().push((name, ip));
    }
    assert_eq!(
        per_node.len(),
        3,
        "pods not spread over 3 nodes: {per_node:?}"
    );

    // Pods reach each other across nodes and segments.
    let firsts: Vec<(String, Ipv4Addr)> = per_node.values().map(|v| v[0].clone()).collect();
    for (from, _) in &firsts {
        for (to, ip) in &firsts {
            if from == to {
                continue;
            }
            let out = exec(
                &c,
                "default",
                from,
                &["ping", "-c", "1", "-W", "3", &ip.to_string()],
            )
            .with_context(|| format!("{from} pinging {to} ({ip})"))?;
            assert!(out.contains("1 packets received"), "{from} -> {to}: {out}");
        }
    }

    // Operators' tools: `tortie status` in the agent's container, metrics on the declared port.
    let agents = pods(&c, "k8s-app=tortie-node", "kube-system")?;
    let agent = agents[0]["metadata"]["name"]
        .as_str()
        .context("agent pod")?;
    let status = exec(&c, "kube-system", agent, &["tortie", "status"])?;
    assert!(status.contains("Established"), "tortie status: {status}");
    // Scraped the way Prometheus does it: from the pod network, at the node's address and the
    // port the manifest declares.
    let node_ip = agents[0]["status"]["hostIP"].as_str().context("hostIP")?;
    let port = agents[0]["spec"]["containers"][0]["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["name"] == "metrics")
        .and_then(|p| p["containerPort"].as_u64())
        .context("the DaemonSet declares no metrics port")?;
    let (client, _) = &firsts[0];
    let metrics = exec(
        &c,
        "default",
        client,
        &["wget", "-qO-", &format!("http://{node_ip}:{port}/metrics")],
    )?;
    assert!(
        metrics.contains("tortie_routes"),
        "metrics: {}",
        &metrics[..metrics.len().min(500)]
    );

    // What the agent costs its node, read from its container's cgroup after a minute idle.
    let agent_pod = &agents[0];
    let node = c.node(
        agent_pod["spec"]["nodeName"]
            .as_str()
            .context("agent nodeName")?,
    );
    let uid = agent_pod["metadata"]["uid"].as_str().context("uid")?;
    let container_id = agent_pod["status"]["containerStatuses"][0]["containerID"]
        .as_str()
        .and_then(|id| id.strip_prefix("containerd://"))
        .context("agent containerID")?;
    let cgroup = |controller: &str| {
        std::path::Path::new("/sys/fs/cgroup")
            .join(controller)
            .join(node.cgroup_root().trim_start_matches('/'))
            .join(format!("kubepods/burstable/pod{uid}"))
            .join(container_id)
    };
    let cpu_ns = || -> Result<u64> {
        Ok(
            std::fs::read_to_string(cgroup("cpuacct").join("cpuacct.usage"))?
                .trim()
                .parse()?,
        )
    };
    let before = cpu_ns()?;
    // Measuring an idle minute, not waiting for an event.
    std::thread::sleep(Duration::from_secs(60));
    let idle_cpu = (cpu_ns()? - before) as f64 / 1e9;
    let stat = std::fs::read_to_string(cgroup("memory").join("memory.stat"))?;
    let rss: u64 = stat
        .lines()
        .find_map(|l| l.strip_prefix("total_rss "))
        .context("no total_rss in memory.stat")?
        .trim()
        .parse()?;
    println!(
        "tortie-node on {}: RSS {:.1} MiB, {idle_cpu:.3} CPU s over 60 s idle ({:.2}% of a core)",
        node.name,
        rss as f64 / 1048576.0,
        idle_cpu / 60.0 * 100.0
    );
    println!(
        "BENCH agent_idle_60s rss={:.1}MiB cpu={idle_cpu:.3}s",
        rss as f64 / 1048576.0
    );

    // Nothing is left on the host: cgroups, mounts (the work dir's bind), kernel settings.
    let roots: Vec<std::path::PathBuf> = c
        .nodes
        .iter()
        .map(|n| {
            std::path::Path::new("/sys/fs/cgroup/pids")
                .join(n.cgroup_root().trim_start_matches('/'))
        })
        .collect();
    let work = c.dir.path().to_owned();
    drop(c);
    for root in &roots {
        assert!(!root.exists(), "{} left behind", root.display());
    }
    let mounts = std::fs::read_to_string("/proc/self/mountinfo")?;
    assert!(
        !mounts.contains(work.to_str().unwrap_or("?")),
        "mounts under {} left behind",
        work.display()
    );
    let panic_after = std::fs::read_to_string("/proc/sys/kernel/panic")?;
    assert_eq!(
        panic_after, panic_before,
        "kernel.panic not restored after the kubelets"
    );

    // The same Deployment on the same kind of cluster with the kubelet's reference CNI
    // (bridge + host-local) instead of tortie, in the same run.
    let spec = KubeletClusterSpec {
        topology: TopologySpec::new()
            .segment(["node-a", "node-b"])
            .segment(["node-c"]),
        api_behind_balancer: true,
    };
    let Some(r) = KubeletCluster::start("reference_bridge_host_local", spec)? else {
        return Ok(());
    };
    r.install_bridge_cni()?;
    wait_until("reference nodes Ready", Duration::from_secs(120), || {
        nodes_ready(&r).unwrap_or(0) == 3
    })?;
    let created = Instant::now();
    r.apply(&deployment("spread", REPLICAS))?;
    wait_until(
        "30 reference pods Running",
        Duration::from_secs(180),
        || {
            pods(&r, "app=spread", "default").is_ok_and(|ps| {
                ps.len() == REPLICAS
                    && ps.iter().all(|p| {
                        p["status"]["phase"] == "Running" && p["status"]["podIP"].is_string()
                    })
            })
        },
    )
    .with_context(|| r.diagnostics())?;
    let reference = created.elapsed();
    println!(
        "BENCH deployment_30_running tortie={:.1}s ref(bridge+host-local)={:.1}s",
        deploy_time.as_secs_f64(),
        reference.as_secs_f64()
    );
    Ok(())
}

/// A tiny IPv4 network type, so the test does not lean on the code under test.
mod ipnet_lite {
    use std::net::Ipv4Addr;
    use std::str::FromStr;

    pub struct Net {
        base: u32,
        mask: u32,
    }

    impl FromStr for Net {
        type Err = anyhow::Error;
        fn from_str(s: &str) -> anyhow::Result<Net> {
            let (a, l) = s
                .split_once('/')
                .ok_or_else(|| anyhow::anyhow!("no prefix"))?;
            let len: u32 = l.parse()?;
            let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
            Ok(Net {
                base: u32::from(a.parse::<Ipv4Addr>()?) & mask,
                mask,
            })
        }
    }

    impl Net {
        pub fn contains(&self, ip: Ipv4Addr) -> bool {
            u32::from(ip) & self.mask == self.base
        }
    }
}
