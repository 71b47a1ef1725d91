//! A Kubernetes cluster built from binaries, as tortie's users build theirs: etcd,
//! kube-apiserver, kube-controller-manager and kube-scheduler in the router namespace; on each
//! node containerd + runc + kubelet + kube-proxy. Each node is its own network namespace and its
//! own mount namespace, so `/etc/cni/net.d`, `/opt/cni/bin`, `/run`, `/var/lib/kubelet` and
//! containerd's root are that node's own, as on separate machines, and a DaemonSet's hostPaths
//! land there.
//!
//! ```text
//!   router netns: etcd, kube-apiserver (advertised at 10.77.0.1), controller-manager, scheduler
//!   node netns + mount ns (one per node):
//!     /run, /var/lib, /var/log, /opt  bound from <workdir>/<node>/fs/…
//!     /etc                            an overlay on the host's /etc (writes stay in the node)
//!     /sys                            remounted for the node's netns, cgroup hierarchies kept
//!     containerd (Debian 1.6) ── runc ── pods; kubelet (cgroupRoot /tortie-e2e/<pid>-<node>);
//!     kube-proxy (nftables)
//! ```
//!
//! Nothing is left on the host: every mount lives in a node's mount namespace and goes with it,
//! the cgroups are removed bottom-up, and the kernel settings the kubelet writes globally
//! (`vm.overcommit_memory`, `kernel.panic`, …) are restored when the cluster drops.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::apiserver::{ApiServerOptions, TestApiServer, kube_bin_dir};
use crate::daemons::{Owned, WorkDir};
use crate::netns::run_host;
use crate::topology::{Topology, TopologySpec};
use crate::wait::wait_until;

/// Binaries `e2e/scripts/build-node.sh` adds beside the apiserver's.
const NODE_BINARIES: [&str; 4] = [
    "kubelet",
    "kube-proxy",
    "kube-controller-manager",
    "kube-scheduler",
];
/// Debian's containerd and runc (`make deps`).
const CONTAINERD: &str = "/usr/bin/containerd";
const CTR: &str = "/usr/bin/ctr";
/// The CNI plugins an administrator installs in `/opt/cni/bin` with the cluster (Debian's
/// containernetworking-plugins): containerd needs `loopback`, tortie's conflist chains `portmap`.
const HOST_CNI_PLUGINS: [&str; 4] = ["loopback", "portmap", "host-local", "bridge"];
const HOST_CNI_DIR: &str = "/usr/lib/cni";
/// The sandbox image containerd runs for every pod (imported, never pulled).
pub const PAUSE_IMAGE: &str = "tortie.local/pause:1";
/// The workload image: Debian's busybox-static (sh, ping, wget, nc, httpd, nslookup).
pub const BUSYBOX_IMAGE: &str = "tortie.local/busybox:1";
/// The Service network of the test API server; the cluster DNS address is its `.10`.
pub const CLUSTER_DNS: &str = "10.96.0.10";
/// Kernel settings the kubelet writes on the whole host (not per namespace): saved before the
/// first kubelet starts and written back when the cluster drops.
const HOST_SYSCTLS: [&str; 6] = [
    "vm.overcommit_memory",
    "vm.panic_on_oom",
    "kernel.panic",
    "kernel.panic_on_oops",
    "kernel.keys.root_maxkeys",
    "kernel.keys.root_maxbytes",
];

static INSTANCES: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// Where `make image` / `e2e/images/build.sh` put the OCI archives.
pub fn image_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::cluster::workspace_root().join("target"));
    target.join("image")
}

/// The tortie image's tag: the workspace version (`tortie:<version>`).
pub fn tortie_image() -> String {
    format!("tortie:{}", env!("CARGO_PKG_VERSION"))
}

/// Brings the image archives up to date once per test process (`e2e/images/build.sh`: tortie's
/// image from the current sources, pause and busybox only when their inputs changed), so a
/// cluster never runs a stale agent image.
pub fn build_images() -> Result<()> {
    static BUILT: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let root = crate::cluster::workspace_root();
            let out = Command::new(root.join("e2e/images/build.sh"))
                .current_dir(&root)
                .stdin(Stdio::null())
                .output()
                .map_err(|e| format!("running e2e/images/build.sh: {e}"))?;
            if !out.status.success() {
                return Err(format!(
                    "e2e/images/build.sh failed ({}): {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr)
                ));
            }
            Ok(())
        })
        .clone()
        .map_err(|e| anyhow::anyhow!(e))
}

/// Binaries or image archives this cluster needs that are missing.
pub fn missing_parts() -> Vec<String> {
    let bin = kube_bin_dir();
    let mut missing: Vec<String> = NODE_BINARIES
        .iter()
        .filter(|b| !bin.join(b).is_file())
        .map(|b| bin.join(b).display().to_string())
        .collect();
    for path in [
        CONTAINERD,
        CTR,
        "/usr/sbin/runc",
        "/usr/bin/nsenter",
        "/usr/sbin/nft",
    ] {
        if !Path::new(path).exists() {
            missing.push(path.to_owned());
        }
    }
    for archive in image_archives() {
        if !archive.is_file() {
            missing.push(archive.display().to_string());
        }
    }
    missing
}

fn image_archives() -> Vec<PathBuf> {
    let dir = image_dir();
    vec![
        dir.join("pause-1.oci.tar"),
        dir.join("busybox-1.oci.tar"),
        dir.join(format!("tortie-{}.oci.tar", env!("CARGO_PKG_VERSION"))),
    ]
}

/// One node: its namespaces, its processes, its cgroup root.
pub struct KubeletNode {
    pub name: String,
    pub addr: std::net::Ipv4Addr,
    netns: String,
    dir: PathBuf,
    cgroup_root: String,
    containerd: Option<Owned>,
    kubelet: Option<Owned>,
    kube_proxy: Option<Owned>,
}

impl KubeletNode {
    /// A command run inside this node's network and mount namespaces.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", self.netns))
            .arg(format!("--mount={}", self.mount_ns_file().display()))
            .arg("--")
            .arg(program);
        cmd
    }

    /// Runs `sh -c script` in the node; a non-zero exit is an error with its output.
    pub fn sh(&self, script: &str) -> Result<String> {
        let out = self
            .command("sh")
            .args(["-c", script])
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running a script in node {}", self.name))?;
        if !out.status.success() {
            bail!(
                "node {}: `{script}` failed ({}): {}{}",
                self.name,
                out.status,
                String::from_utf8_lossy(&out.stderr),
                String::from_utf8_lossy(&out.stdout)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The node's kubelet cgroup root (`cgroupRoot`), the same path in every v1 hierarchy.
    pub fn cgroup_root(&self) -> &str {
        &self.cgroup_root
    }

    fn mount_ns_file(&self) -> PathBuf {
        self.dir.join("mnt")
    }

    /// The node's own files as the host sees them (`fs/run` is the node's `/run`, …), for
    /// `/run`, `/var/…` and `/opt`. Not `/etc`: it is an overlay, written through [`Self::sh`].
    pub fn host_path(&self, node_path: &str) -> PathBuf {
        let trimmed = node_path.trim_start_matches('/');
        let (top, rest) = trimmed.split_once('/').unwrap_or((trimmed, ""));
        let base = match top {
            "run" => "run",
            "var" => {
                let (second, rest2) = rest.split_once('/').unwrap_or((rest, ""));
                return self
                    .dir
                    .join("fs")
                    .join(format!("var-{second}"))
                    .join(rest2);
            }
            other => other,
        };
        self.dir.join("fs").join(base).join(rest)
    }

    pub fn log_tail(&self, component: &str, lines: usize) -> String {
        let text =
            fs::read_to_string(self.dir.join(format!("{component}.log"))).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    fn spawn(&self, component: &str, program: &Path, args: &[String]) -> Result<Owned> {
        let log = fs::File::create(self.dir.join(format!("{component}.log")))?;
        let child = self
            .command(program)
            .args(args)
            .env(
                "PATH",
                format!(
                    "{}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                    kube_bin_dir().display()
                ),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {component} on {}", self.name))?;
        Ok(Owned::new(child))
    }

    /// Kills every process of the node (its daemons, the shims in its netns, every container in
    /// its cgroup root), then removes its cgroups and its mount namespace.
    fn tear_down(&mut self) {
        for proc in [self.kubelet.take(), self.kube_proxy.take()] {
            drop(proc);
        }
        // Containers first, so their shims do not restart anything; bounded passes.
        for _ in 0..20 {
            let pids = cgroup_pids(&self.cgroup_root);
            if pids.is_empty() {
                break;
            }
            for pid in pids {
                // SAFETY: kill(2) of a pid read from this node's own cgroup.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        drop(self.containerd.take());
        if let Ok(pids) = run_host(&["ip", "netns", "pids", &self.netns]) {
            for pid in pids
                .split_whitespace()
                .filter_map(|p| p.parse::<i32>().ok())
            {
                // SAFETY: kill(2) of a process in this node's own network namespace.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
        }
        remove_cgroup_root(&self.cgroup_root);
        let mnt = self.mount_ns_file();
        let _ = Command::new("umount").arg("-l").arg(&mnt).status();
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

/// What to build.
#[derive(Debug, Clone)]
pub struct KubeletClusterSpec {
    pub topology: TopologySpec,
    /// Two kube-apiservers behind nginx, as two masters behind a VIP.
    pub api_behind_balancer: bool,
}

/// A running cluster; drops nodes, then the control plane, then the namespaces.
pub struct KubeletCluster {
    pub nodes: Vec<KubeletNode>,
    control_plane: Vec<Owned>,
    pub api: TestApiServer,
    pub topo: Topology,
    pub dir: WorkDir,
    saved_sysctls: BTreeMap<String, String>,
    /// Tells this process's clusters apart (cgroup roots).
    instance: u32,
    /// Start of [`KubeletCluster::start`] to every Node registered.
    pub time_to_nodes_registered: Duration,
}

impl Drop for KubeletCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            node.tear_down();
        }
        self.control_plane.clear();
        for (key, value) in &self.saved_sysctls {
            let _ = run_host(&["sysctl", "-qw", &format!("{key}={value}")]);
        }
        for hierarchy in cgroup_hierarchies() {
            let _ = fs::remove_dir(hierarchy.join("tortie-e2e"));
        }
    }
}

impl KubeletCluster {
    /// Builds the topology, the control plane and every node, and waits until every kubelet has
    /// registered its Node (NotReady: no CNI config yet). `None` (after a loud SKIP) when parts
    /// are missing and `TORTIE_REQUIRE_KUBE` is unset.
    pub fn start(test: &str, spec: KubeletClusterSpec) -> Result<Option<KubeletCluster>> {
        let required = std::env::var_os(crate::apiserver::REQUIRE_KUBE_ENV).is_some();
        if let Err(e) = build_images() {
            if required {
                return Err(e);
            }
            eprintln!("kubelet cluster: {e:#}");
        }
        let missing = missing_parts();
        if !missing.is_empty() {
            if required {
                bail!("kubelet cluster parts missing: {missing:?} (run `make deps e2e-images`)");
            }
            let _ = std::io::Write::write_all(
                &mut std::io::stderr(),
                format!(
                    "\n==================== SKIP {test} ====================\n\
                     missing: {missing:?}\nrun `make deps e2e-images`\n"
                )
                .as_bytes(),
            );
            return Ok(None);
        }
        sweep_dead_clusters();
        let started = Instant::now();
        let topo = spec.topology.clone().router().build()?;
        let router = topo.router.as_ref().context("cluster needs a router")?;
        let api_addr = std::net::IpAddr::V4(router.addrs[0]);
        // master02 on its own address of the first segment (nodes count up from .10).
        let standby = std::net::Ipv4Addr::new(10, 77, 0, 2);
        if spec.api_behind_balancer {
            router
                .ns
                .run(&["ip", "addr", "add", &format!("{standby}/24"), "dev", "seg0"])?;
        }
        let options = ApiServerOptions {
            standby_address: spec
                .api_behind_balancer
                .then_some(std::net::IpAddr::V4(standby)),
            bind_address: api_addr,
            netns: Some(router.ns.name().to_owned()),
            extra_apiserver_args: vec![
                // The `kubernetes` Service gets the apiserver's address as its endpoint, so
                // pods and host-network agents reach it at 10.96.0.1 through kube-proxy.
                "--endpoint-reconciler-type=lease".into(),
                "--kubelet-preferred-address-types=InternalIP".into(),
                "--enable-admission-plugins=NodeRestriction".into(),
            ],
            ..ApiServerOptions::default()
        };
        let mut api = TestApiServer::start(options)?;
        if spec.api_behind_balancer {
            api.serve_behind_balancer()?;
        }
        let dir = WorkDir::new("kubelet-cluster")?;
        let saved_sysctls = save_host_sysctls();
        let _ = run_host(&["sysctl", "-qw", "fs.inotify.max_user_instances=1024"]);
        let mut cluster = KubeletCluster {
            nodes: Vec::new(),
            control_plane: Vec::new(),
            api,
            topo,
            dir,
            saved_sysctls,
            instance: INSTANCES.fetch_add(1, std::sync::atomic::Ordering::SeqCst),
            time_to_nodes_registered: Duration::ZERO,
        };
        cluster.start_controllers()?;
        let names: Vec<String> = cluster.topo.nodes.iter().map(|n| n.name.clone()).collect();
        for name in &names {
            let node = cluster.start_node(name)?;
            cluster.nodes.push(node);
        }
        cluster.wait_nodes_registered(&names, Duration::from_secs(120))?;
        cluster.time_to_nodes_registered = started.elapsed();
        Ok(Some(cluster))
    }

    fn start_controllers(&mut self) -> Result<()> {
        let router = self.topo.router.as_ref().context("router")?;
        let pki = self.api.pki_dir();
        let bin = kube_bin_dir();
        let cm_kubeconfig = self
            .api
            .issue_client_kubeconfig("controller-manager", "/CN=system:kube-controller-manager")?;
        let sched_kubeconfig = self
            .api
            .issue_client_kubeconfig("scheduler", "/CN=system:kube-scheduler")?;
        let cm_args = vec![
            format!("--kubeconfig={}", cm_kubeconfig.display()),
            format!("--authentication-kubeconfig={}", cm_kubeconfig.display()),
            format!("--authorization-kubeconfig={}", cm_kubeconfig.display()),
            format!(
                "--service-account-private-key-file={}",
                pki.join("sa.key").display()
            ),
            format!("--root-ca-file={}", pki.join("ca.crt").display()),
            "--use-service-account-credentials=true".into(),
            "--leader-elect=false".into(),
            "--bind-address=127.0.0.1".into(),
            "--cluster-name=tortie-e2e".into(),
            // Node CIDRs are tortie's (IPAM blocks), not the controller-manager's.
            "--allocate-node-cidrs=false".into(),
            "--v=1".into(),
        ];
        let sched_args = vec![
            format!("--kubeconfig={}", sched_kubeconfig.display()),
            format!("--authentication-kubeconfig={}", sched_kubeconfig.display()),
            format!("--authorization-kubeconfig={}", sched_kubeconfig.display()),
            "--leader-elect=false".into(),
            "--bind-address=127.0.0.1".into(),
            "--v=1".into(),
        ];
        for (name, args) in [
            ("kube-controller-manager", cm_args),
            ("kube-scheduler", sched_args),
        ] {
            let log = fs::File::create(self.dir.file(&format!("{name}.log")))?;
            let child = router
                .ns
                .command(bin.join(name))
                .args(&args)
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .with_context(|| format!("starting {name}"))?;
            self.control_plane.push(Owned::new(child));
        }
        Ok(())
    }

    fn start_node(&self, name: &str) -> Result<KubeletNode> {
        let topo_node = self.topo.node(name);
        let dir = self.dir.file(name);
        fs::create_dir_all(&dir)?;
        let mut node = KubeletNode {
            name: name.to_owned(),
            addr: topo_node.addr,
            netns: topo_node.ns.name().to_owned(),
            dir: dir.clone(),
            cgroup_root: format!(
                "/tortie-e2e/{}-{}-{name}",
                std::process::id(),
                self.instance
            ),
            containerd: None,
            kubelet: None,
            kube_proxy: None,
        };
        create_cgroup_root(&node.cgroup_root)?;
        make_mount_namespace(&node)?;
        let runc = runc_wrapper(&dir)?;
        fs::write(dir.join("containerd.toml"), containerd_config(&runc))?;
        node.containerd = Some(node.spawn(
            "containerd",
            Path::new(CONTAINERD),
            &[format!(
                "--config={}",
                dir.join("containerd.toml").display()
            )],
        )?);
        wait_until(
            &format!("containerd on {name}"),
            Duration::from_secs(30),
            || node.host_path("/run/containerd/containerd.sock").exists(),
        )
        .with_context(|| node.log_tail("containerd", 30))?;
        for archive in image_archives() {
            node.sh(&format!(
                "{CTR} -a /run/containerd/containerd.sock -n k8s.io images import {}",
                archive.display()
            ))
            .with_context(|| format!("importing {} on {name}", archive.display()))?;
        }

        let kubelet_kubeconfig = self.api.issue_client_kubeconfig(
            &format!("kubelet-{name}"),
            &format!("/O=system:nodes/CN=system:node:{name}"),
        )?;
        fs::write(
            dir.join("resolv.conf"),
            format!("nameserver {CLUSTER_DNS}\n"),
        )?;
        fs::write(
            dir.join("kubelet.yaml"),
            kubelet_config(
                &node,
                &self.api.pki_dir().join("ca.crt"),
                &dir.join("resolv.conf"),
            ),
        )?;
        node.kubelet = Some(node.spawn(
            "kubelet",
            &kube_bin_dir().join("kubelet"),
            &[
                format!("--config={}", dir.join("kubelet.yaml").display()),
                format!("--kubeconfig={}", kubelet_kubeconfig.display()),
                format!("--hostname-override={name}"),
                format!("--node-ip={}", node.addr),
                "--v=1".into(),
            ],
        )?);
        let proxy_kubeconfig = self
            .api
            .issue_client_kubeconfig(&format!("kube-proxy-{name}"), "/CN=system:kube-proxy")?;
        fs::write(
            dir.join("kube-proxy.yaml"),
            kube_proxy_config(name, &proxy_kubeconfig),
        )?;
        node.kube_proxy = Some(node.spawn(
            "kube-proxy",
            &kube_bin_dir().join("kube-proxy"),
            &[
                format!("--config={}", dir.join("kube-proxy.yaml").display()),
                "--v=1".into(),
            ],
        )?);
        Ok(node)
    }

    fn wait_nodes_registered(&self, names: &[String], timeout: Duration) -> Result<()> {
        let result = wait_until("every kubelet registered its Node", timeout, || {
            let Ok(out) = self.kubectl(&["get", "nodes", "-o", "name"]) else {
                return false;
            };
            names
                .iter()
                .all(|n| out.lines().any(|l| l.trim() == format!("node/{n}")))
        });
        result.map(drop).with_context(|| self.diagnostics())
    }

    /// Every node's kubelet, containerd and kube-proxy log tails, for failure messages.
    pub fn diagnostics(&self) -> String {
        let mut text = String::new();
        for node in &self.nodes {
            for component in ["kubelet", "containerd", "kube-proxy"] {
                text.push_str(&format!(
                    "\n--- {} {component} ---\n{}",
                    node.name,
                    node.log_tail(component, 25)
                ));
            }
        }
        for component in ["kube-controller-manager", "kube-scheduler"] {
            text.push_str(&format!(
                "\n--- {component} ---\n{}",
                self.dir.tail(&format!("{component}.log"), 15)
            ));
        }
        text
    }

    pub fn node(&self, name: &str) -> &KubeletNode {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("no node {name}"))
    }

    /// Installs the kubelet's own reference CNI instead of tortie: containernetworking's
    /// `bridge` + `host-local`, a /24 of 10.245.0.0/16 per node (no routes between nodes: the
    /// reference for how fast pods get addresses, not for reachability).
    pub fn install_bridge_cni(&self) -> Result<()> {
        for (i, node) in self.nodes.iter().enumerate() {
            let conflist = format!(
                r#"{{"cniVersion":"1.0.0","name":"reference","plugins":[{{"type":"bridge","bridge":"cni0","isGateway":true,"ipMasq":false,"ipam":{{"type":"host-local","ranges":[[{{"subnet":"10.245.{i}.0/24"}}]],"routes":[{{"dst":"0.0.0.0/0"}}]}}}},{{"type":"portmap","capabilities":{{"portMappings":true}}}}]}}"#
            );
            let staged = node.dir.join("10-reference.conflist");
            fs::write(&staged, conflist)?;
            node.sh(&format!("cp {} /etc/cni/net.d/", staged.display()))?;
        }
        Ok(())
    }

    /// `kubectl` as the cluster admin; a non-zero exit is an error with its output.
    pub fn kubectl(&self, args: &[&str]) -> Result<String> {
        self.api.kubectl_ok(args)
    }

    /// `kubectl apply -f -` of a manifest.
    pub fn apply(&self, manifest: &str) -> Result<String> {
        self.api.apply(manifest)
    }
}

/// An empty persistent mount namespace for the node, entered with its network namespace, with
/// the node's own directories bound over the host's.
fn make_mount_namespace(node: &KubeletNode) -> Result<()> {
    let d = node.dir.display().to_string();
    // A private bind of the node dir: `unshare --mount=<file>` refuses a file on a shared mount.
    run_host(&["mount", "--bind", &d, &d])?;
    run_host(&["mount", "--make-private", &d])?;
    fs::write(node.mount_ns_file(), b"")?;
    let mut plugins = String::new();
    for p in HOST_CNI_PLUGINS {
        plugins.push_str(&format!("cp {HOST_CNI_DIR}/{p} /opt/cni/bin/{p}\n"));
    }
    let script = format!(
        r#"set -e
d={d}
mkdir -p $d/fs/run $d/fs/var-lib $d/fs/var-log $d/fs/opt $d/fs/etc-up $d/fs/etc-work $d/cg
# /sys for this netns (as `ip netns exec` does), keeping the cgroup hierarchies.
mount --rbind /sys/fs/cgroup $d/cg
umount -l /sys
mount -t sysfs sysfs /sys
mount --rbind $d/cg /sys/fs/cgroup
umount -l $d/cg
mount --bind $d/fs/run /run
mount --bind $d/fs/var-lib /var/lib
mount --bind $d/fs/var-log /var/log
mount --bind $d/fs/opt /opt
mount -t overlay overlay -o lowerdir=/etc,upperdir=$d/fs/etc-up,workdir=$d/fs/etc-work /etc
mkdir -p /etc/cni/net.d /opt/cni/bin /var/lib/kubelet /var/lib/containerd /run/containerd \
  /var/log/pods /var/log/containers /run/tortie /var/lib/cni
{plugins}
# Mounts the kubelet and containers make must propagate between them (as kind's nodes do).
mount --make-rshared /
"#
    );
    let status = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", node.netns))
        .args(["unshare", "--propagation", "private"])
        .arg(format!("--mount={}", node.mount_ns_file().display()))
        .args(["sh", "-c", &script])
        .output()
        .context("creating the node's mount namespace")?;
    if !status.status.success() {
        bail!(
            "mount namespace for {}: {}",
            node.name,
            String::from_utf8_lossy(&status.stderr)
        );
    }
    Ok(())
}

/// runc as containerd calls it. Where this process lacks CAP_SYS_RESOURCE (some sandboxed
/// machines, this test bed's among them), no process may lower its `oom_score_adj`, and the
/// kubelet asks -998 for every pod sandbox and -997 for critical pods: runc then fails with
/// "failed to update /proc/self/oom_score_adj: Permission denied". The wrapper raises negative
/// requests to 0 in the bundle's spec there; everything else reaches runc unchanged.
/// `TORTIE_E2E_RUNC` names another runc (e.g. one adding `--debug`) for diagnosing sandboxes.
fn runc_wrapper(dir: &Path) -> Result<PathBuf> {
    let runc = std::env::var("TORTIE_E2E_RUNC").unwrap_or_else(|_| "/usr/sbin/runc".into());
    if has_cap_sys_resource() {
        return Ok(PathBuf::from(runc));
    }
    let path = dir.join("runc");
    let script = format!(
        r#"#!/bin/sh
prev=""
for arg in "$@"; do
  case "$prev" in
    --bundle|-b) [ -f "$arg/config.json" ] && sed -i -E 's/"oomScoreAdj": ?-[0-9]+/"oomScoreAdj":0/' "$arg/config.json" ;;
    --process|-p) [ -f "$arg" ] && sed -i -E 's/"oomScoreAdj": ?-[0-9]+/"oomScoreAdj":0/' "$arg" ;;
  esac
  prev="$arg"
done
exec {runc} "$@"
"#
    );
    fs::write(&path, script)?;
    fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    Ok(path)
}

fn has_cap_sys_resource() -> bool {
    const CAP_SYS_RESOURCE: u32 = 24;
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let line = status.lines().find(|l| l.starts_with("CapEff:"))?;
            u64::from_str_radix(line.split_whitespace().nth(1)?, 16).ok()
        })
        .is_some_and(|caps| caps & (1 << CAP_SYS_RESOURCE) != 0)
}

fn containerd_config(runc: &Path) -> String {
    let runc = runc.display();
    format!(
        r#"version = 2
root = "/var/lib/containerd"
state = "/run/containerd"
[grpc]
  address = "/run/containerd/containerd.sock"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        BinaryName = "{runc}"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/opt/cni/bin"
    conf_dir = "/etc/cni/net.d"
    max_conf_num = 1
"#
    )
}

fn kubelet_config(node: &KubeletNode, ca: &Path, resolv: &Path) -> String {
    format!(
        r#"apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
failCgroupV1: false
cgroupDriver: cgroupfs
cgroupsPerQOS: true
cgroupRoot: {root}
failSwapOn: false
containerRuntimeEndpoint: unix:///run/containerd/containerd.sock
address: {addr}
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
resolvConf: {resolv}
clusterDomain: cluster.local
clusterDNS: [{CLUSTER_DNS}]
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard:
  nodefs.available: "0%"
  nodefs.inodesFree: "0%"
  imagefs.available: "0%"
protectKernelDefaults: false
authentication:
  anonymous: {{enabled: false}}
  webhook: {{enabled: false}}
  x509: {{clientCAFile: {ca}}}
authorization: {{mode: AlwaysAllow}}
rotateCertificates: false
serverTLSBootstrap: false
serializeImagePulls: false
nodeStatusUpdateFrequency: 4s
"#,
        root = node.cgroup_root,
        addr = node.addr,
        resolv = resolv.display(),
        ca = ca.display(),
    )
}

fn kube_proxy_config(node: &str, kubeconfig: &Path) -> String {
    format!(
        r#"apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection:
  kubeconfig: {kubeconfig}
mode: nftables
hostnameOverride: {node}
clusterCIDR: 10.244.0.0/16
conntrack:
  maxPerCore: 0
metricsBindAddress: 127.0.0.1:10249
healthzBindAddress: 127.0.0.1:10256
"#,
        kubeconfig = kubeconfig.display()
    )
}

fn cgroup_hierarchies() -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir("/sys/fs/cgroup") else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.file_name().is_some_and(|n| n != "unified") && p.is_dir())
        .filter(|p| !fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_symlink()))
        .collect();
    out.sort();
    out
}

/// Creates `root` in every v1 hierarchy; in cpuset each level gets its parent's cpus and mems
/// (an empty cpuset refuses tasks).
fn create_cgroup_root(root: &str) -> Result<()> {
    for hierarchy in cgroup_hierarchies() {
        let mut path = hierarchy.clone();
        for part in root.trim_start_matches('/').split('/') {
            let parent = path.clone();
            path = path.join(part);
            if !path.exists() {
                fs::create_dir(&path).with_context(|| format!("creating {}", path.display()))?;
            }
            if hierarchy.ends_with("cpuset") {
                for file in ["cpuset.cpus", "cpuset.mems"] {
                    let value = fs::read_to_string(parent.join(file)).unwrap_or_default();
                    let _ = fs::write(path.join(file), value.trim());
                }
            }
        }
    }
    Ok(())
}

fn cgroup_pids(root: &str) -> Vec<i32> {
    let mut pids = Vec::new();
    let base = Path::new("/sys/fs/cgroup/pids").join(root.trim_start_matches('/'));
    collect_pids(&base, &mut pids, 0);
    pids
}

fn collect_pids(dir: &Path, pids: &mut Vec<i32>, depth: usize) {
    if depth > 16 {
        return;
    }
    if let Ok(text) = fs::read_to_string(dir.join("cgroup.procs")) {
        pids.extend(text.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
    }
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.filter_map(|e| e.ok()) {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                collect_pids(&e.path(), pids, depth + 1);
            }
        }
    }
}

fn remove_cgroup_root(root: &str) {
    for hierarchy in cgroup_hierarchies() {
        let base = hierarchy.join(root.trim_start_matches('/'));
        remove_cgroup_tree(&base, 0);
    }
}

fn remove_cgroup_tree(dir: &Path, depth: usize) {
    if depth > 16 {
        return;
    }
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.filter_map(|e| e.ok()) {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_tree(&e.path(), depth + 1);
            }
        }
    }
    let _ = fs::remove_dir(dir);
}

fn save_host_sysctls() -> BTreeMap<String, String> {
    HOST_SYSCTLS
        .iter()
        .filter_map(|key| {
            let value = run_host(&["sysctl", "-n", key]).ok()?;
            Some(((*key).to_owned(), value.trim().to_owned()))
        })
        .collect()
}

/// Removes what clusters of test processes that no longer run left behind (a test killed with
/// SIGKILL never drops its cluster): their containers, cgroups, mounts and work dirs.
pub fn sweep_dead_clusters() {
    let alive = |pid: &str| Path::new("/proc").join(pid).exists();
    let pids_root = Path::new("/sys/fs/cgroup/pids/tortie-e2e");
    if let Ok(entries) = fs::read_dir(pids_root) {
        for entry in entries.filter_map(|e| e.ok()) {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some((owner, _)) = name.split_once('-') else {
                continue;
            };
            if alive(owner) {
                continue;
            }
            let root = format!("/tortie-e2e/{name}");
            for pid in cgroup_pids(&root) {
                // SAFETY: kill(2) of a process in a cgroup of a test process that is gone.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
            std::thread::sleep(Duration::from_millis(100));
            remove_cgroup_root(&root);
        }
    }
    let Ok(mountinfo) = fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let tmp = std::env::temp_dir();
    let Ok(entries) = fs::read_dir(&tmp) else {
        return;
    };
    for entry in entries.filter_map(|e| e.ok()) {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix("tortie-") else {
            continue;
        };
        if !name.ends_with("-kubelet-cluster") {
            continue;
        }
        let Some((owner, _)) = rest.split_once('-') else {
            continue;
        };
        if alive(owner) {
            continue;
        }
        let dir = entry.path();
        let prefix = dir.display().to_string();
        let mut mounts: Vec<&str> = mountinfo
            .lines()
            .filter_map(|l| l.split_whitespace().nth(4))
            .filter(|m| m.starts_with(&prefix))
            .collect();
        // Deepest first: the namespace files before the node dirs they sit in.
        mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in mounts {
            let _ = Command::new("umount").args(["-l", m]).status();
        }
        let _ = fs::remove_dir_all(&dir);
    }
}
