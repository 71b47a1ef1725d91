//! A whole tortie cluster on the test bed: a topology, a real apiserver in the router
//! namespace with tortie's CRDs and RBAC applied, a Node object per node namespace, and a
//! `tortie agent` per node running under the DaemonSet's ServiceAccount.

use std::collections::BTreeMap;
use std::fs;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::apiserver::{ApiServerOptions, TestApiServer};
use crate::daemons::{Owned, WorkDir};
use crate::netns::Netns;
use crate::topology::{Topology, TopologySpec};
use crate::wait::wait_for;

/// The workspace root (this crate lives in `<root>/e2e`). Cargo's run-time value first: a
/// test binary reused from a shared target directory may have been built in another checkout.
pub fn workspace_root() -> PathBuf {
    let manifest_dir = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    manifest_dir
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// The `tortie` binary: `$TORTIE_BIN` when set (benchmarks point it at a release build),
/// otherwise the debug build, which `cargo build -p tortie` brings up to date once per test
/// process so a test never runs a stale agent.
pub fn tortie_binary() -> Result<PathBuf> {
    static BUILT: std::sync::OnceLock<Result<PathBuf, String>> = std::sync::OnceLock::new();
    if let Some(bin) = std::env::var_os("TORTIE_BIN") {
        return Ok(PathBuf::from(bin));
    }
    BUILT
        .get_or_init(|| {
            let root = workspace_root();
            let target = std::env::var_os("CARGO_TARGET_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| root.join("target"));
            let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
            let status = std::process::Command::new(cargo)
                .args(["build", "-q", "-p", "tortie"])
                .current_dir(&root)
                .env("CARGO_TARGET_DIR", &target)
                .status()
                .map_err(|e| format!("running cargo build -p tortie: {e}"))?;
            let bin = target.join("debug/tortie");
            if !status.success() || !bin.exists() {
                return Err(format!(
                    "cargo build -p tortie failed ({status}); {} missing",
                    bin.display()
                ));
            }
            Ok(bin)
        })
        .clone()
        .map_err(|e| anyhow::anyhow!(e))
}

/// What to build.
#[derive(Debug, Clone, Default)]
pub struct ClusterSpec {
    pub topology: TopologySpec,
    /// The IPPool created before the agents start, as YAML (`None`: the agents create the default).
    pub pool_yaml: Option<String>,
    /// Extra env for every agent (e.g. CALICO_IPV4POOL_* when no pool is given).
    pub agent_env: BTreeMap<String, String>,
    /// Install the fixture reproducing Calico v3.26's own CRDs instead of tortie's.
    pub calico_crds: bool,
    /// Nodes whose namespaces exist from the start but which join (Node object + agent) only
    /// when the test calls [`TestCluster::join`].
    pub deferred_nodes: Vec<String>,
    /// Two kube-apiservers behind nginx, every kubeconfig pointing at nginx (two masters
    /// behind a VIP); `c.api.stop_apiserver()` is then a failover.
    pub api_behind_balancer: bool,
}

/// Agent environment from `(name, value)` pairs, for [`ClusterSpec::agent_env`].
pub fn agent_env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// One node's running agent.
#[derive(Debug)]
pub struct AgentProc {
    pub node: String,
    pub dir: WorkDir,
    pub proc: Option<Owned>,
}

impl AgentProc {
    pub fn run_dir(&self) -> PathBuf {
        self.dir.file("run")
    }

    pub fn cni_conf_dir(&self) -> PathBuf {
        self.dir.file("net.d")
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.file("agent.log")).unwrap_or_default()
    }
}

/// A running cluster; drop order stops agents, then the apiserver, then the namespaces.
pub struct TestCluster {
    pub agents: Vec<AgentProc>,
    pub api: TestApiServer,
    pub sa_kubeconfig: PathBuf,
    pub topo: Topology,
    spec: ClusterSpec,
}

impl TestCluster {
    /// Builds the topology (a router is always added: the apiserver lives there), starts the
    /// apiserver, applies `manifests/crds.yaml` and `manifests/rbac.yaml`, registers the Nodes,
    /// applies the pool, and starts one agent per node. Returns `None` when the apiserver
    /// binaries are absent and CI did not require them (a loud SKIP was printed).
    pub fn start(test: &str, spec: ClusterSpec) -> Result<Option<TestCluster>> {
        let topo = spec.topology.clone().router().build()?;
        let router = topo.router.as_ref().context("cluster needs a router")?;
        let api_addr: IpAddr = IpAddr::V4(router.addrs[0]);
        let options = ApiServerOptions {
            bind_address: api_addr,
            netns: Some(router.ns.name().to_owned()),
            ..ApiServerOptions::default()
        };
        let Some(mut api) = TestApiServer::start_or_skip(test, options)? else {
            return Ok(None);
        };
        if spec.api_behind_balancer {
            api.serve_behind_balancer()
                .context("putting the API server behind nginx")?;
        }
        let root = workspace_root();
        let crds = if spec.calico_crds {
            "e2e/fixtures/calico-v3.26-crds.yaml"
        } else {
            "manifests/crds.yaml"
        };
        for m in [crds, "manifests/rbac.yaml"] {
            let text = fs::read_to_string(root.join(m)).with_context(|| format!("reading {m}"))?;
            api.apply(&text).with_context(|| format!("applying {m}"))?;
        }
        api.kubectl_ok([
            "wait",
            "--for=condition=Established",
            "--timeout=30s",
            "crd",
            "--all",
        ])?;
        for node in topo
            .nodes
            .iter()
            .filter(|n| !spec.deferred_nodes.contains(&n.name))
        {
            register_node(&api, &node.name, node.segment)?;
        }
        if let Some(pool) = &spec.pool_yaml {
            api.apply(pool)?;
        }
        let sa_kubeconfig = api.mint_service_account_kubeconfig("kube-system", "tortie-node")?;
        let mut cluster = TestCluster {
            agents: Vec::new(),
            api,
            sa_kubeconfig,
            topo,
            spec,
        };
        for i in 0..cluster.topo.nodes.len() {
            let name = cluster.topo.nodes[i].name.clone();
            if cluster.spec.deferred_nodes.contains(&name) {
                continue;
            }
            let dir = WorkDir::new(&format!("agent-{name}"))?;
            let mut agent = AgentProc {
                node: name,
                dir,
                proc: None,
            };
            cluster.launch(&mut agent)?;
            cluster.agents.push(agent);
        }
        Ok(Some(cluster))
    }

    fn launch(&self, agent: &mut AgentProc) -> Result<()> {
        let node = self.topo.node(&agent.node);
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(agent.dir.file("agent.log"))?;
        let mut cmd = node.ns.command(tortie_binary()?);
        cmd.arg("agent")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env(
                "RUST_LOG",
                std::env::var("TORTIE_AGENT_LOG").unwrap_or_else(|_| "info".into()),
            )
            .env("NODENAME", &node.name)
            .env("KUBECONFIG", &self.sa_kubeconfig)
            .env("IP_AUTODETECTION_METHOD", "interface=eth0")
            .env("TORTIE_RUN_DIR", agent.run_dir())
            .env("CNI_NET_DIR", agent.cni_conf_dir())
            .env("TORTIE_HEALTH_LISTEN", "127.0.0.1:9099")
            .env("TORTIE_METRICS_LISTEN", "127.0.0.1:9091")
            .envs(&self.spec.agent_env)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        agent.proc = Some(Owned::new(cmd.spawn().context("starting tortie agent")?));
        Ok(())
    }

    /// A deferred node joins: its Node object is registered (as kubelet would) and its agent starts.
    pub fn join(&mut self, node: &str) -> Result<()> {
        let segment = self.topo.node(node).segment;
        register_node(&self.api, node, segment)?;
        let dir = WorkDir::new(&format!("agent-{node}"))?;
        let mut agent = AgentProc {
            node: node.to_owned(),
            dir,
            proc: None,
        };
        self.launch(&mut agent)?;
        self.agents.push(agent);
        Ok(())
    }

    pub fn agent(&self, node: &str) -> &AgentProc {
        match self.agents.iter().find(|a| a.node == node) {
            Some(a) => a,
            None => panic!("no agent for node {node}"),
        }
    }

    /// Kills a node's agent with SIGKILL (no cleanup runs, as on a crash).
    pub fn kill_agent(&mut self, node: &str) -> Result<()> {
        let agent = self
            .agents
            .iter_mut()
            .find(|a| a.node == node)
            .context("no such agent")?;
        agent.proc = None;
        Ok(())
    }

    pub fn restart_agent(&mut self, node: &str) -> Result<()> {
        let idx = self
            .agents
            .iter()
            .position(|a| a.node == node)
            .context("no such agent")?;
        let mut agent = self.agents.remove(idx);
        agent.proc = None;
        let r = self.launch(&mut agent);
        self.agents.insert(idx, agent);
        r
    }

    /// `tortie status --json` on a node.
    pub fn status(&self, node: &str) -> Result<serde_json::Value> {
        let agent = self.agent(node);
        let out = self
            .topo
            .node(node)
            .ns
            .command(tortie_binary()?)
            .args(["status", "--json", "--run-dir"])
            .arg(agent.run_dir())
            .stdin(Stdio::null())
            .output()?;
        if !out.status.success() {
            bail!(
                "tortie status on {node}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    /// Waits until every agent reports ready (the desired state is complete).
    pub fn wait_ready(&self, timeout: Duration) -> Result<()> {
        for a in &self.agents {
            wait_for(&format!("agent on {} ready", a.node), timeout, || {
                let s = self.status(&a.node)?;
                Ok((s["ready"] == true).then_some(()))
            })
            .with_context(|| format!("agent log of {}:\n{}", a.node, tail(&a.log(), 40)))?;
        }
        Ok(())
    }

    /// `ip -j route show proto <tortie>` on a node, as (dst, rest-of-route) JSON objects.
    pub fn routes(&self, node: &str) -> Result<Vec<serde_json::Value>> {
        let out = self
            .topo
            .node(node)
            .ns
            .run(&["ip", "-j", "route", "show", "proto", "84"])?;
        Ok(serde_json::from_str(&out)?)
    }

    /// The agent's Prometheus text from its metrics port (127.0.0.1:9091 in the node namespace).
    pub fn metrics(&self, node: &str) -> Result<String> {
        let script = "exec 3<>/dev/tcp/127.0.0.1/9091; printf 'GET /metrics HTTP/1.0\\r\\n\\r\\n' >&3; cat <&3";
        self.topo.node(node).ns.run(&["bash", "-c", script])
    }

    pub fn kubectl(&self, args: &[&str]) -> Result<String> {
        self.api.kubectl_ok(args.iter().copied())
    }

    /// The agents' logs, for failure messages.
    pub fn logs(&self) -> String {
        self.agents
            .iter()
            .map(|a| format!("--- agent {} ---\n{}\n", a.node, tail(&a.log(), 30)))
            .collect()
    }
}

/// A pod made through the CNI plugin, exactly as a container runtime would.
#[derive(Debug)]
pub struct TestPod {
    pub name: String,
    pub node: String,
    pub container_id: String,
    pub ip: IpAddr,
    /// The plugin's result JSON.
    pub result: serde_json::Value,
    pub ns: Netns,
}

impl TestCluster {
    /// The plugin config a runtime would pass for tortie's entry of the agent's conflist.
    fn cni_config(&self, node: &str) -> Result<String> {
        let path = self.agent(node).cni_conf_dir().join("10-tortie.conflist");
        let list: serde_json::Value = serde_json::from_slice(
            &fs::read(&path)
                .with_context(|| format!("reading {} (is the agent ready?)", path.display()))?,
        )?;
        let mut conf = list["plugins"][0].clone();
        conf["name"] = list["name"].clone();
        conf["cniVersion"] = list["cniVersion"].clone();
        Ok(conf.to_string())
    }

    /// Runs the `tortie` binary as a CNI plugin on `node`; returns stdout JSON or the error JSON.
    pub fn cni(
        &self,
        node: &str,
        command: &str,
        container_id: &str,
        netns: &str,
        pod: &str,
    ) -> Result<serde_json::Value> {
        use std::io::Write as _;
        let conf = self.cni_config(node)?;
        let mut child = self
            .topo
            .node(node)
            .ns
            .command(tortie_binary()?)
            .env_clear()
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", container_id)
            .env("CNI_NETNS", netns)
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", "/usr/lib/cni")
            .env("CNI_ARGS", format!("K8S_POD_NAMESPACE=default;K8S_POD_NAME={pod};K8S_POD_INFRA_CONTAINER_ID={container_id}"))
            .env("TORTIE_RUN_DIR", self.agent(node).run_dir())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        child
            .stdin
            .take()
            .context("stdin")?
            .write_all(conf.as_bytes())?;
        let out = child.wait_with_output()?;
        let stdout: serde_json::Value = if out.stdout.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_slice(&out.stdout).with_context(|| {
                format!(
                    "plugin printed non-JSON: {}",
                    String::from_utf8_lossy(&out.stdout)
                )
            })?
        };
        if !out.status.success() {
            bail!(
                "CNI {command} for {pod} on {node} failed: {stdout} {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(stdout)
    }

    /// Creates a pod namespace and runs CNI ADD for it on `node`.
    pub fn add_pod(&self, node: &str, name: &str) -> Result<TestPod> {
        let ns = Netns::create(&format!("pod-{name}"))?;
        let container_id = format!("{:016x}{name}", std::process::id());
        let result = self.cni(
            node,
            "ADD",
            &container_id,
            &format!("/var/run/netns/{}", ns.name()),
            name,
        )?;
        let ip: IpAddr = result["ips"][0]["address"]
            .as_str()
            .and_then(|a| a.split('/').next())
            .and_then(|a| a.parse().ok())
            .with_context(|| format!("no address in CNI result {result}"))?;
        Ok(TestPod {
            name: name.to_owned(),
            node: node.to_owned(),
            container_id,
            ip,
            result,
            ns,
        })
    }

    /// CNI DEL for a pod (the namespace goes when the `TestPod` drops).
    pub fn del_pod(&self, pod: &TestPod) -> Result<()> {
        self.cni(
            &pod.node,
            "DEL",
            &pod.container_id,
            &format!("/var/run/netns/{}", pod.ns.name()),
            &pod.name,
        )?;
        Ok(())
    }
}

fn register_node(api: &TestApiServer, name: &str, segment: usize) -> Result<()> {
    api.apply(&format!(
        "apiVersion: v1\nkind: Node\nmetadata:\n  name: {name}\n  labels:\n    kubernetes.io/hostname: {name}\n    \
         tortie.test/segment: \"{segment}\"\n"
    ))?;
    Ok(())
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
