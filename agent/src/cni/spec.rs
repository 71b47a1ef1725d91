//! CNI spec types: the plugin's view of the network config, the runtime's environment, the
//! result in each supported `cniVersion`'s shape, and the spec's error object. Pure: no I/O.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use serde_json::{Value, json};

/// The versions whose configs this plugin accepts (1.1.0 for STATUS and GC).
pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];
/// Used for replies when the config could not be read far enough to know its version.
pub const FALLBACK_VERSION: &str = "1.0.0";

/// The spec's well-known error codes (and tortie's own, from 100).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum ErrorCode {
    IncompatibleVersion = 1,
    ContainerUnknown = 3,
    InvalidEnvironment = 4,
    Io = 5,
    DecodeFailure = 6,
    InvalidConfig = 7,
    TryAgainLater = 11,
    NotAvailable = 50,
    /// The agent answered but refused (no address left, IPAM error); its words are in `msg`.
    AgentRefused = 100,
    /// Creating or checking the pod's interface failed in the kernel.
    Interface = 101,
    /// CHECK found the pod's wiring different from prevResult.
    CheckMismatch = 102,
}

/// A failure as the runtime sees it: printed as the spec's error JSON on stdout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniError {
    pub code: ErrorCode,
    pub msg: String,
    pub details: String,
}

impl CniError {
    pub fn new(code: ErrorCode, msg: impl Into<String>, details: impl Into<String>) -> CniError {
        CniError {
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }

    pub fn to_json(&self, cni_version: &str) -> Value {
        json!({
            "cniVersion": cni_version,
            "code": self.code as u32,
            "msg": self.msg,
            "details": self.details,
        })
    }
}

impl std::fmt::Display for CniError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (code {})", self.msg, self.code as u32)?;
        if !self.details.is_empty() {
            write!(f, ": {}", self.details)?;
        }
        Ok(())
    }
}

fn invalid(field: &str, why: impl std::fmt::Display) -> CniError {
    CniError::new(
        ErrorCode::InvalidConfig,
        format!("network config field {field:?} is invalid"),
        why.to_string(),
    )
}

/// The parts of the network config (plain or one plugin of a conflist, as the runtime
/// hands it over) that tortie reads. Unknown fields are allowed, as in Calico's config.
#[derive(Debug, Clone, PartialEq)]
pub struct NetConf {
    pub cni_version: String,
    pub name: String,
    pub mtu: Option<u32>,
    pub run_dir: Option<String>,
    pub log_level: Option<String>,
    pub assign_ipv4: bool,
    pub assign_ipv6: bool,
    pub dns: Option<Value>,
    pub prev_result: Option<Value>,
}

impl NetConf {
    /// Parses and validates stdin's config; every error names the field and what is wrong.
    pub fn parse(bytes: &[u8]) -> Result<NetConf, CniError> {
        let root: Value = serde_json::from_slice(bytes).map_err(|e| {
            CniError::new(
                ErrorCode::DecodeFailure,
                "the network config on stdin is not valid JSON",
                e.to_string(),
            )
        })?;
        let Some(obj) = root.as_object() else {
            return Err(CniError::new(
                ErrorCode::DecodeFailure,
                "the network config on stdin is not a JSON object",
                format!("got {root}"),
            ));
        };
        let cni_version = match obj.get("cniVersion") {
            Some(Value::String(v)) => v.clone(),
            Some(other) => {
                return Err(invalid(
                    "cniVersion",
                    format!("expected a string, got {other}"),
                ));
            }
            None => {
                return Err(invalid(
                    "cniVersion",
                    "missing; set it to one of 0.3.0, 0.3.1, 0.4.0, 1.0.0, 1.1.0",
                ));
            }
        };
        check_version(&cni_version)?;
        let name = match obj.get("name") {
            Some(Value::String(n)) if !n.is_empty() => n.clone(),
            Some(other) => {
                return Err(invalid(
                    "name",
                    format!("expected a non-empty string, got {other}"),
                ));
            }
            None => return Err(invalid("name", "missing; the network's name is required")),
        };
        let mtu = match obj.get("mtu") {
            None | Some(Value::Null) => None,
            Some(v) => {
                let m = v
                    .as_u64()
                    .ok_or_else(|| invalid("mtu", format!("expected an integer, got {v}")))?;
                if !(68..=65535).contains(&m) {
                    return Err(invalid("mtu", format!("{m} is outside 68..=65535")));
                }
                Some(m as u32)
            }
        };
        let run_dir = optional_string(obj, "tortie_run_dir")?;
        let log_level = optional_string(obj, "log_level")?;
        // Calico's configs say this under "ipam" as strings; tortie's may say it at the top.
        let ipam = obj.get("ipam").and_then(Value::as_object);
        let flag = |key: &str, default: bool| -> Result<bool, CniError> {
            let (field, v) = match (obj.get(key), ipam.and_then(|i| i.get(key))) {
                (Some(v), _) => (key.to_owned(), v),
                (None, Some(v)) => (format!("ipam.{key}"), v),
                (None, None) => return Ok(default),
            };
            match v {
                Value::Bool(b) => Ok(*b),
                Value::String(s) if s == "true" => Ok(true),
                Value::String(s) if s == "false" => Ok(false),
                other => Err(invalid(
                    &field,
                    format!("expected true or false, got {other}"),
                )),
            }
        };
        let assign_ipv4 = flag("assign_ipv4", true)?;
        let assign_ipv6 = flag("assign_ipv6", false)?;
        if !assign_ipv4 && !assign_ipv6 {
            return Err(invalid(
                "assign_ipv4",
                "both assign_ipv4 and assign_ipv6 are false; a pod needs at least one address",
            ));
        }
        let dns = match obj.get("dns") {
            None | Some(Value::Null) => None,
            Some(v @ Value::Object(_)) => Some(v.clone()),
            Some(other) => return Err(invalid("dns", format!("expected an object, got {other}"))),
        };
        let prev_result = match obj.get("prevResult") {
            None | Some(Value::Null) => None,
            Some(v @ Value::Object(_)) => Some(v.clone()),
            Some(other) => {
                return Err(invalid(
                    "prevResult",
                    format!("expected an object, got {other}"),
                ));
            }
        };
        Ok(NetConf {
            cni_version,
            name,
            mtu,
            run_dir,
            log_level,
            assign_ipv4,
            assign_ipv6,
            dns,
            prev_result,
        })
    }
}

fn optional_string(
    obj: &serde_json::Map<String, Value>,
    key: &str,
) -> Result<Option<String>, CniError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(invalid(key, format!("expected a string, got {other}"))),
    }
}

/// Errors with code 1 for any version outside [`SUPPORTED_VERSIONS`].
pub fn check_version(v: &str) -> Result<(), CniError> {
    if SUPPORTED_VERSIONS.contains(&v) {
        Ok(())
    } else {
        Err(CniError::new(
            ErrorCode::IncompatibleVersion,
            format!("cniVersion {v:?} is not supported by tortie"),
            format!("supported versions: {}", SUPPORTED_VERSIONS.join(", ")),
        ))
    }
}

/// Whether results in `v` carry the per-IP `"version"` field (every version before 1.0.0).
fn ips_carry_version(v: &str) -> bool {
    v.starts_with("0.")
}

/// The runtime's command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Version,
    Status,
    Gc,
}

impl Command {
    pub fn parse(s: &str) -> Result<Command, CniError> {
        Ok(match s {
            "ADD" => Command::Add,
            "DEL" => Command::Del,
            "CHECK" => Command::Check,
            "VERSION" => Command::Version,
            "STATUS" => Command::Status,
            "GC" => Command::Gc,
            other => {
                return Err(CniError::new(
                    ErrorCode::InvalidEnvironment,
                    format!("CNI_COMMAND {other:?} is not a CNI command"),
                    "expected ADD, DEL, CHECK, VERSION, STATUS or GC",
                ));
            }
        })
    }
}

/// The CNI_* environment of one invocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invocation {
    pub command: Command,
    pub container_id: String,
    pub netns: Option<String>,
    pub ifname: String,
    pub args: BTreeMap<String, String>,
}

impl Invocation {
    /// Reads the environment; the fields each command needs are required for it only.
    pub fn from_env(env: &BTreeMap<String, String>) -> Result<Invocation, CniError> {
        let get = |k: &str| env.get(k).filter(|v| !v.is_empty()).cloned();
        let missing = |k: &str| {
            CniError::new(
                ErrorCode::InvalidEnvironment,
                format!("environment variable {k} is missing or empty"),
                "the container runtime must set it for this command",
            )
        };
        let command = Command::parse(&get("CNI_COMMAND").ok_or_else(|| missing("CNI_COMMAND"))?)?;
        let per_container = matches!(command, Command::Add | Command::Del | Command::Check);
        let container_id = get("CNI_CONTAINERID").unwrap_or_default();
        if per_container {
            if container_id.is_empty() {
                return Err(missing("CNI_CONTAINERID"));
            }
            if !container_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-')
            {
                return Err(CniError::new(
                    ErrorCode::InvalidEnvironment,
                    "CNI_CONTAINERID may hold only letters, digits, '_', '.' and '-'",
                    format!("got {container_id:?}"),
                ));
            }
        }
        let netns = get("CNI_NETNS");
        if matches!(command, Command::Add | Command::Check) && netns.is_none() {
            return Err(missing("CNI_NETNS"));
        }
        let ifname = get("CNI_IFNAME").unwrap_or_default();
        if per_container && ifname.is_empty() {
            return Err(missing("CNI_IFNAME"));
        }
        let args = parse_cni_args(&get("CNI_ARGS").unwrap_or_default())?;
        Ok(Invocation {
            command,
            container_id,
            netns,
            ifname,
            args,
        })
    }

    pub fn pod_namespace(&self) -> Option<&str> {
        self.args.get("K8S_POD_NAMESPACE").map(String::as_str)
    }

    pub fn pod_name(&self) -> Option<&str> {
        self.args.get("K8S_POD_NAME").map(String::as_str)
    }
}

/// `CNI_ARGS`: `KEY=VALUE` pairs separated by `;` (K8S_POD_NAMESPACE, K8S_POD_NAME,
/// K8S_POD_INFRA_CONTAINER_ID, K8S_POD_UID, IgnoreUnknown, …). Unknown keys are kept.
pub fn parse_cni_args(s: &str) -> Result<BTreeMap<String, String>, CniError> {
    let mut out = BTreeMap::new();
    for pair in s.split(';').filter(|p| !p.is_empty()) {
        let Some((k, v)) = pair.split_once('=') else {
            return Err(CniError::new(
                ErrorCode::InvalidEnvironment,
                "CNI_ARGS is malformed",
                format!("{pair:?} is not KEY=VALUE"),
            ));
        };
        out.insert(k.to_owned(), v.to_owned());
    }
    Ok(out)
}

/// Calico's host-side veth name: `cali` + the first 11 hex digits of sha1("<ns>.<pod>"), so
/// tools and Felix-era habits that expect it keep working. Without Kubernetes arguments the
/// container id stands in for the pod.
pub fn host_veth_name(
    pod_namespace: Option<&str>,
    pod_name: Option<&str>,
    container_id: &str,
) -> String {
    let key = match (pod_namespace, pod_name) {
        (Some(ns), Some(pod)) => format!("{ns}.{pod}"),
        _ => container_id.to_owned(),
    };
    format!(
        "cali{}",
        &sha1_smol::Sha1::from(key.as_bytes()).digest().to_string()[..11]
    )
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    pub mac: Option<String>,
    pub sandbox: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpConfig {
    pub address: IpNet,
    pub gateway: Option<IpAddr>,
    pub interface: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub dst: IpNet,
    pub gw: Option<IpAddr>,
}

/// A result in version-independent form; [`CniResult::to_json`] shapes it for a version.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct CniResult {
    pub interfaces: Vec<Interface>,
    pub ips: Vec<IpConfig>,
    pub routes: Vec<Route>,
    pub dns: Option<Value>,
}

pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

impl CniResult {
    pub fn to_json(&self, cni_version: &str) -> Value {
        let interfaces: Vec<Value> = self
            .interfaces
            .iter()
            .map(|i| {
                let mut o = json!({ "name": i.name });
                if let Some(m) = &i.mac {
                    o["mac"] = json!(m);
                }
                if let Some(s) = &i.sandbox {
                    o["sandbox"] = json!(s);
                }
                o
            })
            .collect();
        let ips: Vec<Value> = self
            .ips
            .iter()
            .map(|ip| {
                let mut o = json!({ "address": ip.address.to_string() });
                if ips_carry_version(cni_version) {
                    o["version"] = json!(if ip.address.addr().is_ipv4() {
                        "4"
                    } else {
                        "6"
                    });
                }
                if let Some(g) = ip.gateway {
                    o["gateway"] = json!(g.to_string());
                }
                if let Some(i) = ip.interface {
                    o["interface"] = json!(i);
                }
                o
            })
            .collect();
        let routes: Vec<Value> = self
            .routes
            .iter()
            .map(|r| {
                let mut o = json!({ "dst": r.dst.to_string() });
                if let Some(g) = r.gw {
                    o["gw"] = json!(g.to_string());
                }
                o
            })
            .collect();
        let mut out = json!({
            "cniVersion": cni_version,
            "interfaces": interfaces,
            "ips": ips,
            "routes": routes,
        });
        if let Some(dns) = &self.dns {
            out["dns"] = dns.clone();
        }
        out
    }

    /// Reads a prevResult of any supported version (CHECK compares the pod against it).
    pub fn from_json(v: &Value) -> Result<CniResult, CniError> {
        let bad = |why: String| invalid("prevResult", why);
        let mut out = CniResult {
            dns: v.get("dns").cloned(),
            ..CniResult::default()
        };
        for (i, iface) in array(v, "interfaces").iter().enumerate() {
            let name = iface
                .get("name")
                .and_then(Value::as_str)
                .ok_or_else(|| bad(format!("interfaces[{i}] has no name")))?;
            out.interfaces.push(Interface {
                name: name.to_owned(),
                mac: iface.get("mac").and_then(Value::as_str).map(str::to_owned),
                sandbox: iface
                    .get("sandbox")
                    .and_then(Value::as_str)
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned),
            });
        }
        for (i, ip) in array(v, "ips").iter().enumerate() {
            let address = ip
                .get("address")
                .and_then(Value::as_str)
                .and_then(|a| a.parse::<IpNet>().ok())
                .ok_or_else(|| bad(format!("ips[{i}].address is not an address/prefix")))?;
            let gateway = match ip.get("gateway").and_then(Value::as_str) {
                Some(g) => Some(
                    g.parse()
                        .map_err(|_| bad(format!("ips[{i}].gateway {g:?} is not an address")))?,
                ),
                None => None,
            };
            let interface = ip
                .get("interface")
                .and_then(Value::as_u64)
                .map(|n| n as usize);
            out.ips.push(IpConfig {
                address,
                gateway,
                interface,
            });
        }
        for (i, r) in array(v, "routes").iter().enumerate() {
            let dst = r
                .get("dst")
                .and_then(Value::as_str)
                .and_then(|d| d.parse::<IpNet>().ok())
                .ok_or_else(|| bad(format!("routes[{i}].dst is not a prefix")))?;
            let gw = match r.get("gw").and_then(Value::as_str) {
                Some(g) => Some(
                    g.parse()
                        .map_err(|_| bad(format!("routes[{i}].gw {g:?} is not an address")))?,
                ),
                None => None,
            };
            out.routes.push(Route { dst, gw });
        }
        Ok(out)
    }
}

fn array<'a>(v: &'a Value, key: &str) -> &'a [Value] {
    v.get(key)
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or(&[])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_result() -> CniResult {
        CniResult {
            interfaces: vec![
                Interface {
                    name: "cali12345678901".into(),
                    mac: Some("ee:ee:ee:ee:ee:ee".into()),
                    sandbox: None,
                },
                Interface {
                    name: "eth0".into(),
                    mac: Some("02:00:00:00:00:01".into()),
                    sandbox: Some("/var/run/netns/p".into()),
                },
            ],
            ips: vec![IpConfig {
                address: "10.0.0.5/32".parse().unwrap(),
                gateway: Some("169.254.1.1".parse().unwrap()),
                interface: Some(1),
            }],
            routes: vec![Route {
                dst: "0.0.0.0/0".parse().unwrap(),
                gw: Some("169.254.1.1".parse().unwrap()),
            }],
            dns: Some(json!({"nameservers": ["10.96.0.10"]})),
        }
    }

    #[test]
    fn result_for_0_3_1_carries_ip_version_and_1_0_0_does_not() {
        let r = sample_result();
        let old = r.to_json("0.3.1");
        assert_eq!(old["ips"][0]["version"], "4");
        assert_eq!(old["cniVersion"], "0.3.1");
        let new = r.to_json("1.0.0");
        assert!(new["ips"][0].get("version").is_none());
        assert_eq!(new["ips"][0]["interface"], 1);
        assert_eq!(new["interfaces"][1]["sandbox"], "/var/run/netns/p");
        assert_eq!(new["dns"]["nameservers"][0], "10.96.0.10");
    }

    #[test]
    fn result_round_trips_through_prev_result_in_every_version() {
        let r = sample_result();
        for v in SUPPORTED_VERSIONS {
            assert_eq!(
                CniResult::from_json(&r.to_json(v)).unwrap(),
                r,
                "version {v}"
            );
        }
    }

    #[test]
    fn unsupported_version_is_code_1_listing_the_supported_ones() {
        let err =
            NetConf::parse(br#"{"cniVersion":"0.2.0","name":"n","type":"tortie"}"#).unwrap_err();
        assert_eq!(err.code, ErrorCode::IncompatibleVersion);
        assert!(err.details.contains("1.0.0"), "{err}");
    }

    #[test]
    fn bad_mtu_is_code_7_naming_the_field() {
        let err =
            NetConf::parse(br#"{"cniVersion":"1.0.0","name":"n","type":"tortie","mtu":"big"}"#)
                .unwrap_err();
        assert_eq!(err.code, ErrorCode::InvalidConfig);
        assert!(err.msg.contains("\"mtu\""), "{err}");
    }

    #[test]
    fn malformed_json_is_a_decode_failure() {
        let err = NetConf::parse(b"{\"cniVersion\": ").unwrap_err();
        assert_eq!(err.code, ErrorCode::DecodeFailure);
    }

    #[test]
    fn calico_style_ipam_flags_are_read_as_strings() {
        let c = NetConf::parse(
            br#"{"cniVersion":"0.3.1","name":"k8s-pod-network","type":"tortie",
                 "ipam":{"type":"calico-ipam","assign_ipv4":"true","assign_ipv6":"true"}}"#,
        )
        .unwrap();
        assert!(c.assign_ipv4 && c.assign_ipv6);
        let err = NetConf::parse(
            br#"{"cniVersion":"1.0.0","name":"n","type":"tortie","ipam":{"assign_ipv6":"yes"}}"#,
        )
        .unwrap_err();
        assert!(err.msg.contains("ipam.assign_ipv6"), "{err}");
    }

    #[test]
    fn cni_args_split_on_semicolons() {
        let a =
            parse_cni_args("IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0").unwrap();
        assert_eq!(a["K8S_POD_NAMESPACE"], "default");
        assert_eq!(a["K8S_POD_NAME"], "web-0");
        assert!(parse_cni_args("K8S_POD_NAME").is_err());
    }

    #[test]
    fn host_veth_name_is_calicos() {
        // sha1("default.web-0") = 0d7763386da219ddff1faed1cc6576fb9d57d419
        let name = host_veth_name(Some("default"), Some("web-0"), "abc");
        assert_eq!(name, "cali0d7763386da");
        assert_eq!(name.len(), 15);
    }

    #[test]
    fn add_without_netns_is_an_environment_error() {
        let env: BTreeMap<String, String> = [
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "abc"),
            ("CNI_IFNAME", "eth0"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        let err = Invocation::from_env(&env).unwrap_err();
        assert_eq!(err.code, ErrorCode::InvalidEnvironment);
        assert!(err.msg.contains("CNI_NETNS"));
    }
}
