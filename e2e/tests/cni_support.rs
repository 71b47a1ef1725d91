//! Shared by the `cni_*` tests: the built `tortie` binary run exactly as a container runtime
//! runs a CNI plugin, and a stand-in for the node agent's local API socket.
//!
//! The stand-in speaks the agent's JSON-lines protocol (`assign`, `workload_up`, `release`,
//! `ready`) and hands out addresses from 10.244.0.0/16 and fd00:244::/64; it replaces the agent
//! (which needs an API server), not the kernel: everything done to interfaces is real. Like the
//! agent, it can take the host veth named in `release` and remove it after answering (in the
//! node's namespace), holding back an `assign` for that name until the removal is over; without
//! a node it answers as an agent from before `host_if` existed, and the plugin removes the veth.
#![allow(dead_code)] // each test file uses a different part of this module

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use tortie_e2e::Netns;

/// The `tortie` binary (see `tortie_e2e::cluster::tortie_binary`).
pub fn tortie_binary() -> PathBuf {
    match tortie_e2e::cluster::tortie_binary() {
        Ok(bin) => bin,
        Err(e) => panic!("{e:#}"),
    }
}

/// What one plugin invocation printed and how it exited.
#[derive(Debug)]
pub struct PluginRun {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
    pub json: Option<Value>,
}

impl PluginRun {
    /// The result JSON of a successful run; panics with the plugin's error otherwise.
    pub fn result(&self) -> &Value {
        assert!(
            self.ok,
            "plugin failed: stdout {} stderr {}",
            self.stdout, self.stderr
        );
        self.json.as_ref().expect("a result on stdout")
    }

    /// The error JSON of a failed run; panics if the run succeeded.
    pub fn error(&self) -> &Value {
        assert!(!self.ok, "plugin unexpectedly succeeded: {}", self.stdout);
        let e = self
            .json
            .as_ref()
            .unwrap_or_else(|| panic!("no error JSON on stdout; stderr: {}", self.stderr));
        assert!(e["code"].as_u64().is_some(), "error without a code: {e}");
        assert!(
            !e["msg"].as_str().unwrap_or_default().is_empty(),
            "error without a msg: {e}"
        );
        e
    }
}

/// One pod's CNI identity, as kubelet would pass it.
#[derive(Debug, Clone)]
pub struct PodRef {
    pub container_id: String,
    pub namespace: String,
    pub name: String,
    pub netns: String,
    pub ifname: String,
}

impl PodRef {
    pub fn new(pod_ns: &Netns, name: &str) -> PodRef {
        PodRef::in_netns_named(pod_ns.name(), name)
    }

    /// A pod whose network namespace is `/var/run/netns/<netns_name>`.
    pub fn in_netns_named(netns_name: &str, name: &str) -> PodRef {
        static N: AtomicU32 = AtomicU32::new(0);
        PodRef {
            container_id: format!(
                "{:x}{:06x}",
                std::process::id(),
                N.fetch_add(1, Ordering::SeqCst)
            ),
            namespace: "default".into(),
            name: name.into(),
            netns: format!("/var/run/netns/{netns_name}"),
            ifname: "eth0".into(),
        }
    }

    pub fn cni_args(&self) -> String {
        format!(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID={};K8S_POD_UID=uid-{}",
            self.namespace, self.name, self.container_id, self.container_id
        )
    }

    /// Calico's host veth name for this pod, computed independently of tortie with `sha1sum`.
    pub fn host_if(&self) -> String {
        let out = Command::new("sh")
            .args([
                "-c",
                &format!("printf '%s' '{}.{}' | sha1sum", self.namespace, self.name),
            ])
            .output()
            .expect("sha1sum");
        format!("cali{}", &String::from_utf8_lossy(&out.stdout)[..11])
    }
}

/// Runs a CNI plugin binary inside `node` (the node's network namespace is the "host" the
/// plugin sees) with the runtime's environment and `config` on stdin.
pub fn run_plugin(
    node: &Netns,
    binary: &Path,
    command: &str,
    pod: &PodRef,
    config: &Value,
) -> PluginRun {
    let mut child = node
        .command(binary)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", &pod.container_id)
        .env("CNI_NETNS", &pod.netns)
        .env("CNI_IFNAME", &pod.ifname)
        .env("CNI_ARGS", pod.cni_args())
        .env("CNI_PATH", "/opt/cni/bin:/usr/lib/cni")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning the plugin");
    let input = serde_json::to_vec(config).unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(&input)
        .expect("writing the config to the plugin");
    let out = child.wait_with_output().expect("waiting for the plugin");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    PluginRun {
        ok: out.status.success(),
        json: serde_json::from_str(stdout.trim()).ok(),
        stdout,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Runs the `tortie` binary as a plugin.
pub fn tortie(node: &Netns, command: &str, pod: &PodRef, config: &Value) -> PluginRun {
    run_plugin(node, &tortie_binary(), command, pod, config)
}

/// A conflist entry for tortie, as the runtime hands it to the plugin.
pub fn tortie_config(run_dir: &Path, version: &str) -> Value {
    json!({
        "cniVersion": version,
        "name": "k8s-pod-network",
        "type": "tortie",
        "mtu": 1500,
        "log_level": "debug",
        "tortie_run_dir": run_dir.display().to_string(),
        "dns": { "nameservers": ["10.96.0.10"], "search": ["default.svc.cluster.local"] },
    })
}

/// The agent's MTU answer (uplink minus an encapsulation), distinct from the config's 1500
/// so tests see which one the plugin used.
pub const AGENT_MTU: u32 = 1480;

/// How the stand-in answers.
#[derive(Debug, Clone, Default)]
pub struct Behaviour {
    /// What `ready` answers (CNI STATUS).
    pub ready: bool,
    /// An op answered with `ok: false`.
    pub refuse: Option<&'static str>,
    /// Serve in this directory (a restarted agent reuses its predecessor's).
    pub run_dir: Option<PathBuf>,
    /// The node's namespace file: the stand-in takes the host veth named in `release` and
    /// removes it there after answering, as the agent does. `None`: an older agent.
    pub removes_host_ifs_in: Option<PathBuf>,
}

/// How long an `assign` waits for the removal of its host veth name (the agent's limit).
const ASSIGN_WAIT_LIMIT: Duration = Duration::from_secs(5);

/// Host veths the stand-in is removing in the background, and a signal when one is done.
#[derive(Default)]
struct Removals {
    names: Mutex<BTreeSet<String>>,
    finished: Condvar,
}

impl Removals {
    /// Waits until `name` is not being removed; false when `limit` ran out first.
    fn wait_for(&self, name: &str, limit: Duration) -> bool {
        let names = self.names.lock().unwrap();
        let (_names, timeout) = self
            .finished
            .wait_timeout_while(names, limit, |names| names.contains(name))
            .unwrap();
        !timeout.timed_out()
    }

    fn start(self: &Arc<Self>, netns: &Path, name: &str) {
        if !self.names.lock().unwrap().insert(name.to_owned()) {
            return;
        }
        let removals = self.clone();
        let netns = netns.to_owned();
        let name = name.to_owned();
        std::thread::spawn(move || {
            let removed = tortie_dataplane::workload_iface::in_netns(&netns, || {
                tortie_dataplane::workload_iface::delete_host_iface(&name)
            });
            if let Err(e) = removed {
                eprintln!("stand-in agent: removing {name} failed: {e}");
            }
            removals.names.lock().unwrap().remove(&name);
            removals.finished.notify_all();
        });
    }

    fn pending(&self) -> usize {
        self.names.lock().unwrap().len()
    }
}

#[derive(Default)]
struct FakeState {
    next: u32,
    assigned: BTreeMap<String, Vec<String>>,
    events: Vec<Value>,
}

/// The stand-in agent: a unix socket in a private directory, answered by one thread.
pub struct FakeAgent {
    dir: PathBuf,
    state: Arc<Mutex<FakeState>>,
    removals: Arc<Removals>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl FakeAgent {
    pub fn start(ready: bool) -> Result<FakeAgent> {
        FakeAgent::start_with(Behaviour {
            ready,
            ..Behaviour::default()
        })
    }

    /// A ready stand-in that, like the agent, removes host veths in `node` after DEL answers.
    pub fn for_node(node: &Netns) -> Result<FakeAgent> {
        FakeAgent::start_with(Behaviour {
            ready: true,
            removes_host_ifs_in: Some(PathBuf::from(format!("/var/run/netns/{}", node.name()))),
            ..Behaviour::default()
        })
    }

    pub fn start_with(behaviour: Behaviour) -> Result<FakeAgent> {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = behaviour.run_dir.clone().unwrap_or_else(|| {
            std::env::temp_dir().join(format!(
                "tortie-{}-{}-fakeagent",
                std::process::id(),
                N.fetch_add(1, Ordering::SeqCst)
            ))
        });
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let listener = UnixListener::bind(dir.join("tortie.sock"))
            .with_context(|| format!("binding {}", dir.display()))?;
        let state = Arc::new(Mutex::new(FakeState {
            next: 2,
            ..FakeState::default()
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let removals = Arc::new(Removals::default());
        let thread = {
            let state = state.clone();
            let removals = removals.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                for stream in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(stream) = stream else { continue };
                    let state = state.clone();
                    let removals = removals.clone();
                    let behaviour = behaviour.clone();
                    std::thread::spawn(move || serve(stream, &state, &removals, &behaviour));
                }
            })
        };
        Ok(FakeAgent {
            dir,
            state,
            removals,
            stop,
            thread: Some(thread),
        })
    }

    /// The directory to use as `tortie_run_dir`.
    pub fn run_dir(&self) -> &Path {
        &self.dir
    }

    /// Every request received with this `op`, in order.
    pub fn requests(&self, op: &str) -> Vec<Value> {
        self.state
            .lock()
            .unwrap()
            .events
            .iter()
            .filter(|e| e["op"] == op)
            .cloned()
            .collect()
    }

    /// Addresses currently held, by container id.
    pub fn held(&self) -> BTreeMap<String, Vec<String>> {
        self.state.lock().unwrap().assigned.clone()
    }

    /// Waits (at most `limit`) until every host veth taken by a DEL is removed; returns how
    /// long that took.
    pub fn drain_removals(&self, limit: Duration) -> Result<Duration> {
        let started = Instant::now();
        let names = self.removals.names.lock().unwrap();
        let (names, timeout) = self
            .removals
            .finished
            .wait_timeout_while(names, limit, |names| !names.is_empty())
            .unwrap();
        if timeout.timed_out() {
            bail!("host veths still being removed after {limit:?}: {names:?}");
        }
        Ok(started.elapsed())
    }

    /// How many host veth removals are in progress.
    pub fn removals_pending(&self) -> usize {
        self.removals.pending()
    }
}

impl Drop for FakeAgent {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the accept loop so it sees the flag.
        let _ = UnixStream::connect(self.dir.join("tortie.sock"));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn serve(
    stream: UnixStream,
    state: &Mutex<FakeState>,
    removals: &Arc<Removals>,
    behaviour: &Behaviour,
) {
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    let reader = BufReader::new(stream);
    for line in reader.lines().take(1000) {
        let Ok(line) = line else { return };
        let req: Value = match serde_json::from_str(&line) {
            Ok(v) => v,
            Err(e) => {
                let _ = writeln!(
                    writer,
                    "{}",
                    json!({"ok": false, "error": format!("bad request: {e}")})
                );
                continue;
            }
        };
        let reply = answer(&req, state, removals, behaviour);
        if writeln!(writer, "{reply}").is_err() {
            return;
        }
    }
}

fn answer(
    req: &Value,
    state: &Mutex<FakeState>,
    removals: &Arc<Removals>,
    behaviour: &Behaviour,
) -> Value {
    let host_if = req["host_if"].as_str();
    // As the agent: an ADD reusing a host veth name waits for an earlier DEL's removal.
    if req["op"] == "assign"
        && let Some(name) = host_if
        && !removals.wait_for(name, ASSIGN_WAIT_LIMIT)
    {
        return json!({"ok": false, "error": format!("host interface {name} is still being removed")});
    }
    let mut s = state.lock().unwrap();
    s.events.push(req.clone());
    let id = req["container_id"].as_str().unwrap_or_default().to_owned();
    let op = req["op"].as_str().unwrap_or_default();
    if behaviour.refuse == Some(op) {
        return json!({"ok": false, "error": format!("{op} refused by the test")});
    }
    let ready = behaviour.ready;
    match op {
        "assign" => {
            if let Some(ips) = s.assigned.get(&id) {
                return json!({"ok": true, "ips": ips, "mtu": AGENT_MTU});
            }
            let n = s.next;
            s.next += 1;
            let mut ips = Vec::new();
            if req["ipv4"] == true {
                ips.push(format!("10.244.{}.{}", n >> 8, n & 0xff));
            }
            if req["ipv6"] == true {
                ips.push(format!("fd00:244::{n:x}"));
            }
            s.assigned.insert(id, ips.clone());
            json!({"ok": true, "ips": ips, "mtu": AGENT_MTU})
        }
        "workload_up" => json!({"ok": true}),
        "release" => {
            s.assigned.remove(&id);
            match (&behaviour.removes_host_ifs_in, host_if) {
                (Some(netns), Some(name)) => {
                    removals.start(netns, name);
                    json!({"ok": true, "host_if_handled": true})
                }
                _ => json!({"ok": true}),
            }
        }
        "ready" if ready => json!({"ok": true}),
        "ready" => json!({"ok": false, "error": "tortie agent is not ready yet"}),
        other => json!({"ok": false, "error": format!("unknown op {other}")}),
    }
}

/// Names of the links in `ns` whose name starts with `prefix`.
pub fn links_named(ns: &Netns, prefix: &str) -> Result<Vec<String>> {
    let out = ns.run(&["ip", "-o", "link", "show"])?;
    Ok(out
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_owned())
        .filter(|n| n.starts_with(prefix))
        .collect())
}

/// A sysctl's value inside `ns`.
pub fn sysctl(ns: &Netns, key: &str) -> Result<String> {
    let v = ns.run(&["sysctl", "-n", key])?;
    if v.trim().is_empty() {
        bail!("sysctl {key} is empty");
    }
    Ok(v.trim().to_owned())
}

/// How long a test waits on the kernel (link-local addresses, neighbour resolution).
pub const KERNEL_WAIT: Duration = Duration::from_secs(5);
