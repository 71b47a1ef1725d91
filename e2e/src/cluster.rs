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
use crate::topology::{Topology, TopologySpec};
use crate::wait::wait_for;

/// The workspace root (this crate lives in `<root>/e2e`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// The `tortie` binary cargo built (`cargo build -p tortie` runs before the tests).
pub fn tortie_binary() -> Result<PathBuf> {
    let mut candidates = Vec::new();
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        candidates.push(PathBuf::from(dir).join("debug/tortie"));
    }
    if let Some(home) = std::env::var_os("HOME") {
        candidates.push(PathBuf::from(home).join(".cache/tortie/target/debug/tortie"));
    }
    candidates.push(workspace_root().join("target/debug/tortie"));
    candidates
        .iter()
        .find(|p| p.exists())
        .cloned()
        .with_context(|| {
            format!("tortie binary not found in {candidates:?}; run `cargo build -p tortie`")
        })
}

/// What to build.
#[derive(Debug, Clone)]
pub struct ClusterSpec {
    pub topology: TopologySpec,
    /// The IPPool created before the agents start, as YAML (`None`: the agents create the default).
    pub pool_yaml: Option<String>,
    /// Extra env for every agent (e.g. CALICO_IPV4POOL_* when no pool is given).
    pub agent_env: BTreeMap<String, String>,
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
        let Some(api) = TestApiServer::start_or_skip(test, options)? else {
            return Ok(None);
        };
        let root = workspace_root();
        for m in ["manifests/crds.yaml", "manifests/rbac.yaml"] {
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
        for node in &topo.nodes {
            api.apply(&format!(
                "apiVersion: v1\nkind: Node\nmetadata:\n  name: {}\n  labels:\n    kubernetes.io/hostname: {}\n    tortie.test/segment: \"{}\"\n",
                node.name, node.name, node.segment
            ))?;
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

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
