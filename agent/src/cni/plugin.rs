//! The CNI plugin's commands (ADD, DEL, CHECK, VERSION, STATUS, GC): the runtime runs
//! `/opt/cni/bin/tortie` with CNI_* in the environment and the network config on stdin; the
//! plugin asks the local agent for addresses and wires the pod with `workload_iface`.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ipnet::IpNet;
use serde_json::{Value, json};
use tortie_dataplane::workload_iface::{
    self, IPV4_GATEWAY, IPV6_GATEWAY, Place, WorkloadIfaceError, WorkloadIfaceSpec,
};
use tracing::{debug, info, warn};

use super::spec::{
    CniError, CniResult, Command, ErrorCode, FALLBACK_VERSION, Interface, Invocation, IpConfig,
    NetConf, Route, SUPPORTED_VERSIONS, check_version, format_mac, host_veth_name,
};
use crate::local_api::{self, Reply, Request};

/// Where the agent's socket lives unless the config or `TORTIE_RUN_DIR` says otherwise.
pub const DEFAULT_RUN_DIR: &str = "/run/tortie";
/// Assigning may take the agent a few API server round trips when the node's block is full.
const ASSIGN_TIMEOUT: Duration = Duration::from_secs(30);
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
const DEFAULT_MTU: u32 = 1500;
/// Stdin larger than this is not a network config.
const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// Runs one plugin invocation from the process environment and stdin; returns the exit code.
pub fn run() -> i32 {
    let env: BTreeMap<String, String> = std::env::vars().collect();
    let mut stdin = Vec::new();
    let read = std::io::stdin()
        .take(MAX_CONFIG_BYTES)
        .read_to_end(&mut stdin);
    let outcome = match read {
        Ok(_) => execute(&env, &stdin),
        Err(e) => Outcome::failed(
            FALLBACK_VERSION,
            CniError::new(
                ErrorCode::Io,
                "reading the network config from stdin failed",
                e.to_string(),
            ),
        ),
    };
    let mut stdout = std::io::stdout().lock();
    if let Some(out) = &outcome.stdout {
        // Nothing useful can be done when stdout is gone; the exit code still tells.
        let _ = writeln!(stdout, "{out}");
    }
    let _ = stdout.flush();
    outcome.exit_code
}

/// What one invocation prints and how it exits.
#[derive(Debug)]
pub struct Outcome {
    pub stdout: Option<Value>,
    pub exit_code: i32,
}

impl Outcome {
    fn ok(stdout: Option<Value>) -> Outcome {
        Outcome {
            stdout,
            exit_code: 0,
        }
    }

    fn failed(cni_version: &str, err: CniError) -> Outcome {
        Outcome {
            stdout: Some(err.to_json(cni_version)),
            exit_code: 1,
        }
    }
}

/// The whole plugin as a function of its environment and stdin.
pub fn execute(env: &BTreeMap<String, String>, stdin: &[u8]) -> Outcome {
    // The version errors are reported in is the config's, as far as it can be read.
    let declared = serde_json::from_slice::<Value>(stdin)
        .ok()
        .and_then(|v| {
            v.get("cniVersion")
                .and_then(Value::as_str)
                .map(str::to_owned)
        })
        .filter(|v| SUPPORTED_VERSIONS.contains(&v.as_str()))
        .unwrap_or_else(|| FALLBACK_VERSION.to_owned());
    let inv = match Invocation::from_env(env) {
        Ok(inv) => inv,
        Err(e) => return Outcome::failed(&declared, e),
    };
    if inv.command == Command::Version {
        return version(stdin);
    }
    let conf = match NetConf::parse(stdin) {
        Ok(c) => c,
        Err(e) => return Outcome::failed(&declared, e),
    };
    init_logging(conf.log_level.as_deref());
    let agent = AgentClient::new(socket_for(&conf, env));
    let started = Instant::now();
    let result = match inv.command {
        Command::Add => add(&inv, &conf, &agent).map(Some),
        Command::Del => del(&inv, &agent).map(|()| None),
        Command::Check => check(&inv, &conf).map(|()| None),
        Command::Status => status(&agent).map(|()| None),
        // The agent's IPAM leak collector reclaims handles of containers that are gone, and
        // veths die with their namespace: there is nothing left for GC to sweep here.
        Command::Gc => Ok(None),
        Command::Version => Ok(None),
    };
    match result {
        Ok(out) => {
            info!(command = ?inv.command, container = %inv.container_id, elapsed = ?started.elapsed(), "done");
            Outcome::ok(out)
        }
        Err(e) => {
            warn!(command = ?inv.command, container = %inv.container_id, error = %e, "failed");
            Outcome::failed(&conf.cni_version, e)
        }
    }
}

fn version(stdin: &[u8]) -> Outcome {
    let requested = serde_json::from_slice::<Value>(stdin).ok().and_then(|v| {
        v.get("cniVersion")
            .and_then(Value::as_str)
            .map(str::to_owned)
    });
    let cni_version = match requested {
        Some(v) => {
            if let Err(e) = check_version(&v) {
                return Outcome::failed(FALLBACK_VERSION, e);
            }
            v
        }
        None => SUPPORTED_VERSIONS[SUPPORTED_VERSIONS.len() - 1].to_owned(),
    };
    Outcome::ok(Some(json!({
        "cniVersion": cni_version,
        "supportedVersions": SUPPORTED_VERSIONS,
    })))
}

fn init_logging(level: Option<&str>) {
    let filter = tracing_subscriber::EnvFilter::try_new(level.unwrap_or("warn"))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    // stdout belongs to the result JSON; logs go to stderr, which runtimes keep.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_writer(std::io::stderr)
        .try_init();
}

/// The agent's socket: config `tortie_run_dir`, else `$TORTIE_RUN_DIR`, else /run/tortie.
fn socket_for(conf: &NetConf, env: &BTreeMap<String, String>) -> PathBuf {
    let dir = conf
        .run_dir
        .clone()
        .or_else(|| env.get("TORTIE_RUN_DIR").filter(|d| !d.is_empty()).cloned())
        .unwrap_or_else(|| DEFAULT_RUN_DIR.to_owned());
    local_api::socket_path(Path::new(&dir))
}

/// The agent, as the plugin talks to it: each call maps failures onto CNI error codes. One
/// connection serves every call of the invocation; a failed call drops it.
struct AgentClient {
    socket: PathBuf,
    connection: RefCell<Option<local_api::Connection>>,
}

impl AgentClient {
    fn new(socket: PathBuf) -> AgentClient {
        AgentClient {
            socket,
            connection: RefCell::new(None),
        }
    }

    fn send(&self, req: &Request, timeout: Duration) -> anyhow::Result<Reply> {
        let mut connection = match self.connection.take() {
            Some(c) => c,
            None => local_api::Connection::open(&self.socket)?,
        };
        let reply = connection.call(req, timeout)?;
        self.connection.replace(Some(connection));
        Ok(reply)
    }

    /// One request; an agent that answers `ok: false` is an error.
    fn call(&self, what: &str, req: &Request, timeout: Duration) -> Result<Reply, CniError> {
        let reply = self.exchange(what, req, timeout)?;
        if !reply.ok {
            return Err(refused(what, &reply));
        }
        Ok(reply)
    }

    /// One request; any reply the agent sends, refusals included, is returned.
    fn exchange(&self, what: &str, req: &Request, timeout: Duration) -> Result<Reply, CniError> {
        self.send(req, timeout).map_err(|e| {
            // An I/O failure (no socket, refused, timed out) is transient; anything else is a
            // reply this plugin cannot read.
            if e.root_cause().downcast_ref::<std::io::Error>().is_none() {
                return CniError::new(
                    ErrorCode::AgentRefused,
                    format!(
                        "{what}: the tortie agent at {} sent a reply this plugin cannot read; \
                         are the agent and /opt/cni/bin/tortie from the same release?",
                        self.socket.display()
                    ),
                    format!("{e:#}"),
                );
            }
            CniError::new(
                ErrorCode::TryAgainLater,
                format!(
                    "{what}: the tortie agent at {} did not answer; check that the tortie-node \
                     pod on this node is running (the runtime will retry)",
                    self.socket.display()
                ),
                format!("{e:#}"),
            )
        })
    }

    /// Releases the pod's addresses; the caller removes the host veth itself.
    fn release(&self, container_id: &str) -> Result<(), CniError> {
        self.call(
            "releasing the pod's addresses",
            &Request::Release {
                container_id: container_id.to_owned(),
                host_if: None,
            },
            CALL_TIMEOUT,
        )
        .map(drop)
    }

    /// Releases the pod's addresses and hands the host veth to the agent, which removes it
    /// after answering. Returns whether the agent took the veth (an older agent does not),
    /// alongside the outcome of the release.
    fn release_with_host_if(
        &self,
        container_id: &str,
        host_if: &str,
    ) -> (bool, Result<(), CniError>) {
        const WHAT: &str = "releasing the pod's addresses";
        let req = Request::Release {
            container_id: container_id.to_owned(),
            host_if: Some(host_if.to_owned()),
        };
        match self.exchange(WHAT, &req, CALL_TIMEOUT) {
            Ok(reply) if reply.ok => (reply.host_if_handled, Ok(())),
            Ok(reply) => (reply.host_if_handled, Err(refused(WHAT, &reply))),
            Err(e) => (false, Err(e)),
        }
    }
}

fn refused(what: &str, reply: &Reply) -> CniError {
    CniError::new(
        ErrorCode::AgentRefused,
        format!(
            "{what}: the tortie agent refused: {}",
            reply.error.as_deref().unwrap_or("no reason given")
        ),
        "see the tortie-node pod's log on this node",
    )
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn iface_error(what: &str, e: &WorkloadIfaceError) -> CniError {
    let code = match e {
        WorkloadIfaceError::NetnsMissing { .. } => ErrorCode::ContainerUnknown,
        _ => ErrorCode::Interface,
    };
    CniError::new(code, format!("{what}: {e}"), "")
}

fn host_if_of(inv: &Invocation) -> String {
    host_veth_name(inv.pod_namespace(), inv.pod_name(), &inv.container_id)
}

/// ADD: addresses from the agent, the veth, WorkloadUp, the result. A failure part-way
/// removes the veth and releases the addresses before reporting.
fn add(inv: &Invocation, conf: &NetConf, agent: &AgentClient) -> Result<Value, CniError> {
    let netns = inv.netns.clone().unwrap_or_default();
    workload_iface::validate_ifname(&inv.ifname).map_err(|e| {
        CniError::new(
            ErrorCode::InvalidEnvironment,
            format!("CNI_IFNAME: {e}"),
            "",
        )
    })?;
    if !Path::new(&netns).exists() {
        return Err(CniError::new(
            ErrorCode::ContainerUnknown,
            format!("the pod's network namespace {netns} does not exist"),
            "the sandbox was removed before its network was set up",
        ));
    }
    let host_if = host_if_of(inv);
    let started = Instant::now();
    let reply = agent.call(
        "assigning the pod's addresses",
        &Request::Assign {
            container_id: inv.container_id.clone(),
            namespace: inv.pod_namespace().unwrap_or_default().to_owned(),
            pod: inv.pod_name().unwrap_or(&inv.container_id).to_owned(),
            ipv4: conf.assign_ipv4,
            ipv6: conf.assign_ipv6,
            host_if: Some(host_if.clone()),
        },
        ASSIGN_TIMEOUT,
    )?;
    let undo = |cause: CniError| -> CniError {
        let mut cause = cause;
        if let Err(e) = workload_iface::delete_host_iface(&host_if) {
            cause.details = format!("{}; also failed to remove {host_if}: {e}", cause.details);
        }
        if let Err(e) = agent.release(&inv.container_id) {
            cause.details = format!(
                "{}; also failed to release the addresses: {e}",
                cause.details
            );
        }
        cause
    };
    let assigned = started.elapsed();
    let ips = wanted_ips(&reply.ips, conf).map_err(&undo)?;
    let mtu = reply.mtu.or(conf.mtu).unwrap_or(DEFAULT_MTU);

    // A host end left by an earlier ADD of the same pod (runtime retry) is replaced.
    workload_iface::delete_host_iface(&host_if)
        .map_err(|e| undo(iface_error("removing a stale host interface", &e)))?;
    let spec = WorkloadIfaceSpec {
        netns: PathBuf::from(&netns),
        host_if: host_if.clone(),
        container_if: inv.ifname.clone(),
        mtu,
        ips: ips.clone(),
    };
    let iface = workload_iface::create(&spec)
        .map_err(|e| undo(iface_error("wiring the pod's interface", &e)))?;
    let wired = started.elapsed();
    agent
        .call(
            "reporting the pod's interface",
            &Request::WorkloadUp {
                container_id: inv.container_id.clone(),
                host_if: host_if.clone(),
                ips: ips.clone(),
            },
            CALL_TIMEOUT,
        )
        .map_err(&undo)?;

    debug!(
        host_if,
        assign_ms = ms(assigned),
        wire_ms = ms(wired - assigned),
        workload_up_ms = ms(started.elapsed() - wired),
        "ADD phases"
    );
    let result = CniResult {
        interfaces: vec![
            Interface {
                name: iface.host_if.clone(),
                mac: Some(format_mac(&iface.host_mac)),
                sandbox: None,
            },
            Interface {
                name: iface.container_if.clone(),
                mac: iface.container_mac.as_ref().map(format_mac),
                sandbox: Some(netns),
            },
        ],
        ips: ips
            .iter()
            .map(|ip| IpConfig {
                address: IpNet::from(*ip),
                gateway: Some(gateway_for(*ip)),
                interface: Some(1),
            })
            .collect(),
        routes: pod_default_routes(&ips),
        dns: conf.dns.clone(),
    };
    Ok(result.to_json(&conf.cni_version))
}

/// The agent's addresses, checked against what the config asked for.
fn wanted_ips(assigned: &[IpAddr], conf: &NetConf) -> Result<Vec<IpAddr>, CniError> {
    let v4 = assigned.iter().find(|ip| ip.is_ipv4()).copied();
    let v6 = assigned.iter().find(|ip| ip.is_ipv6()).copied();
    let mut ips = Vec::new();
    for (wanted, got, family) in [
        (conf.assign_ipv4, v4, "IPv4"),
        (conf.assign_ipv6, v6, "IPv6"),
    ] {
        match (wanted, got) {
            (true, Some(ip)) => ips.push(ip),
            (true, None) => {
                return Err(CniError::new(
                    ErrorCode::AgentRefused,
                    format!("the tortie agent assigned no {family} address"),
                    format!(
                        "it returned {assigned:?}; check that an enabled IPPool of that family \
                         exists and selects this node"
                    ),
                ));
            }
            (false, _) => {}
        }
    }
    Ok(ips)
}

fn gateway_for(ip: IpAddr) -> IpAddr {
    if ip.is_ipv4() {
        IpAddr::V4(IPV4_GATEWAY)
    } else {
        IpAddr::V6(IPV6_GATEWAY)
    }
}

fn pod_default_routes(ips: &[IpAddr]) -> Vec<Route> {
    let mut routes = Vec::new();
    if ips.iter().any(IpAddr::is_ipv4) {
        routes.push(Route {
            dst: IpNet::V4(ipnet::Ipv4Net::default()),
            gw: Some(IpAddr::V4(IPV4_GATEWAY)),
        });
    }
    if ips.iter().any(IpAddr::is_ipv6) {
        routes.push(Route {
            dst: IpNet::V6(ipnet::Ipv6Net::default()),
            gw: Some(IpAddr::V6(IPV6_GATEWAY)),
        });
    }
    routes
}

/// DEL: idempotent. The agent releases the addresses, drops the pod's routes and removes the
/// host end (taking the pod end with it) after answering, so the runtime does not wait for
/// the kernel's veth teardown. When the agent cannot take the veth (unreachable, or from a
/// release without `host_if`), the plugin removes it here. A namespace already gone, an
/// agent that restarted and never heard of the pod, an ADD that never finished: all succeed.
fn del(inv: &Invocation, agent: &AgentClient) -> Result<(), CniError> {
    let host_if = host_if_of(inv);
    let (handed_over, released) = agent.release_with_host_if(&inv.container_id, &host_if);
    if handed_over {
        info!(host_if, "host interface handed to the agent");
    } else {
        match workload_iface::delete_host_iface(&host_if) {
            Ok(existed) => info!(host_if, existed, "host interface removed"),
            Err(e) => {
                let mut err = iface_error("removing the pod's host interface", &e);
                if let Err(release) = released {
                    err.details = format!("also, {release}");
                }
                return Err(err);
            }
        }
    }
    released
}

/// CHECK: the pod end, its addresses and routes, and the host end, against prevResult.
fn check(inv: &Invocation, conf: &NetConf) -> Result<(), CniError> {
    let Some(prev) = &conf.prev_result else {
        return Err(CniError::new(
            ErrorCode::InvalidConfig,
            "network config field \"prevResult\" is missing",
            "CHECK needs the result of the ADD it verifies",
        ));
    };
    let prev = CniResult::from_json(prev)?;
    let netns = inv.netns.clone().unwrap_or_default();
    let mismatch = |msg: String| CniError::new(ErrorCode::CheckMismatch, msg, "");
    let Some(index) = prev
        .interfaces
        .iter()
        .position(|i| i.name == inv.ifname && i.sandbox.is_some())
    else {
        return Err(mismatch(format!(
            "prevResult lists no interface {} inside a sandbox",
            inv.ifname
        )));
    };
    let pod = workload_iface::inspect_in_netns(Path::new(&netns), &inv.ifname)
        .map_err(|e| iface_error("inspecting the pod's interface", &e))?
        .ok_or_else(|| {
            mismatch(format!(
                "interface {} is missing from netns {netns}",
                inv.ifname
            ))
        })?;
    if !pod.up {
        return Err(mismatch(format!(
            "interface {} in netns {netns} is down",
            inv.ifname
        )));
    }
    if let Some(mac) = &prev.interfaces[index].mac
        && pod.mac.map(|m| format_mac(&m)).as_deref() != Some(mac.as_str())
    {
        return Err(mismatch(format!(
            "interface {} in netns {netns} has MAC {:?}, prevResult says {mac}",
            inv.ifname,
            pod.mac.map(|m| format_mac(&m))
        )));
    }
    for ip in prev
        .ips
        .iter()
        .filter(|ip| ip.interface.is_none_or(|i| i == index))
    {
        if !pod.addresses.contains(&ip.address) {
            return Err(mismatch(format!(
                "address {} is missing from {} in netns {netns} (it has {:?})",
                ip.address, inv.ifname, pod.addresses
            )));
        }
    }
    for route in &prev.routes {
        let present = pod.routes.iter().any(|r| {
            r.dst == route.dst
                && match (route.gw, &r.target) {
                    (None, _) => true,
                    (Some(gw), tortie_dataplane::RouteTarget::Gateway { via, .. }) => *via == gw,
                    (Some(_), _) => false,
                }
        });
        if !present {
            return Err(mismatch(format!(
                "route {}{} via {} is missing from netns {netns}",
                route.dst,
                route.gw.map(|g| format!(" gw {g}")).unwrap_or_default(),
                inv.ifname
            )));
        }
    }
    if let Some(host) = prev.interfaces.iter().find(|i| i.sandbox.is_none()) {
        let state = workload_iface::inspect_here(&host.name, &Place::Host)
            .map_err(|e| iface_error("inspecting the host interface", &e))?
            .ok_or_else(|| mismatch(format!("host interface {} is missing", host.name)))?;
        if !state.up {
            return Err(mismatch(format!("host interface {} is down", host.name)));
        }
    }
    Ok(())
}

/// STATUS (CNI 1.1): ready when the agent says it can serve pods.
fn status(agent: &AgentClient) -> Result<(), CniError> {
    agent
        .call(
            "asking whether tortie is ready",
            &Request::Ready,
            CALL_TIMEOUT,
        )
        .map(drop)
        .map_err(|e| CniError {
            // The spec's "plugin not available" for STATUS, whatever the cause.
            code: ErrorCode::NotAvailable,
            ..e
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn version_lists_every_supported_version() {
        let out = execute(
            &env(&[("CNI_COMMAND", "VERSION")]),
            br#"{"cniVersion":"0.4.0"}"#,
        );
        assert_eq!(out.exit_code, 0);
        let v = out.stdout.unwrap();
        assert_eq!(v["cniVersion"], "0.4.0");
        assert_eq!(
            v["supportedVersions"].as_array().unwrap().len(),
            SUPPORTED_VERSIONS.len()
        );
    }

    #[test]
    fn status_with_no_agent_is_not_available_code_50() {
        let dir = std::env::temp_dir().join(format!("tortie-cni-status-{}", std::process::id()));
        let conf = format!(
            r#"{{"cniVersion":"1.1.0","name":"n","type":"tortie","tortie_run_dir":"{}"}}"#,
            dir.display()
        );
        let out = execute(&env(&[("CNI_COMMAND", "STATUS")]), conf.as_bytes());
        assert_eq!(out.exit_code, 1);
        let v = out.stdout.unwrap();
        assert_eq!(v["code"], 50);
        assert!(v["msg"].as_str().unwrap().contains("tortie.sock"), "{v}");
    }

    #[test]
    fn unknown_command_is_reported_in_the_configs_version() {
        let out = execute(
            &env(&[("CNI_COMMAND", "FROB")]),
            br#"{"cniVersion":"0.3.1","name":"n","type":"tortie"}"#,
        );
        assert_eq!(out.exit_code, 1);
        let v = out.stdout.unwrap();
        assert_eq!(v["cniVersion"], "0.3.1");
        assert_eq!(v["code"], 4);
    }

    #[test]
    fn check_without_prev_result_names_the_field() {
        let out = execute(
            &env(&[
                ("CNI_COMMAND", "CHECK"),
                ("CNI_CONTAINERID", "c1"),
                ("CNI_NETNS", "/var/run/netns/none"),
                ("CNI_IFNAME", "eth0"),
            ]),
            br#"{"cniVersion":"1.0.0","name":"n","type":"tortie"}"#,
        );
        let v = out.stdout.unwrap();
        assert_eq!(v["code"], 7);
        assert!(v["msg"].as_str().unwrap().contains("prevResult"));
    }

    #[test]
    fn agent_assigning_only_ipv6_to_an_ipv4_pod_is_an_error() {
        let conf = NetConf::parse(br#"{"cniVersion":"1.0.0","name":"n","type":"tortie"}"#).unwrap();
        let err = wanted_ips(&["fd00::1".parse().unwrap()], &conf).unwrap_err();
        assert!(err.msg.contains("IPv4"), "{err}");
        let ok = wanted_ips(
            &["fd00::1".parse().unwrap(), "10.0.0.1".parse().unwrap()],
            &conf,
        )
        .unwrap();
        assert_eq!(ok, vec!["10.0.0.1".parse::<IpAddr>().unwrap()]);
    }
}
