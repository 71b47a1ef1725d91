//! The agent's settings, read from calico-node's environment variable names so a calico.yaml
//! DaemonSet's env carries over unchanged.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use ipnet::IpNet;

/// What `IP` / `IP6` ask for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AddressSetting {
    /// Detect with the autodetection method (`autodetect`, or unset for IPv4).
    Autodetect(String),
    /// A fixed address, with prefix length (a bare address means a host prefix).
    Fixed(IpNet),
    /// `none`: this family is off.
    None,
}

/// The default pool calico-node would create on first start (`CALICO_IPV4POOL_*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DefaultPool {
    pub cidr: IpNet,
    pub block_size: Option<u8>,
    pub ipip_mode: String,
    pub vxlan_mode: String,
    pub nat_outgoing: bool,
    pub node_selector: String,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub node_name: String,
    pub ipv4: AddressSetting,
    pub ipv6: AddressSetting,
    pub default_pool_v4: Option<DefaultPool>,
    pub default_pool_v6: Option<DefaultPool>,
    pub bgp_listen: SocketAddr,
    pub metrics_listen: SocketAddr,
    pub health_listen: SocketAddr,
    pub run_dir: PathBuf,
    pub cni_conf_dir: PathBuf,
    pub route_protocol: u8,
    /// How long after start to wait for peers' End-of-RIB before removing stale routes.
    pub startup_grace_secs: u64,
    /// IPAM garbage collection: pass interval and how long an allocation must look leaked.
    pub gc_interval_secs: u64,
    pub gc_grace_secs: u64,
    pub gc_lease_secs: u64,
}

/// Reads the config from `env` (a map so tests need not touch the process environment).
pub fn from_env(env: &BTreeMap<String, String>) -> Result<Config> {
    let get = |k: &str| {
        env.get(k)
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
    };
    let node_name = match get("NODENAME").or_else(|| get("HOSTNAME")) {
        Some(n) => n,
        None => hostname()?,
    };
    let address = |var: &str, method_var: &str, default_on: bool| -> Result<AddressSetting> {
        let method = get(method_var).unwrap_or_else(|| "first-found".into());
        Ok(match get(var).as_deref() {
            None if default_on => AddressSetting::Autodetect(method),
            None => AddressSetting::None,
            Some("autodetect") => AddressSetting::Autodetect(method),
            Some("none") => AddressSetting::None,
            Some(v) => AddressSetting::Fixed(
                v.parse::<IpNet>()
                    .or_else(|_| v.parse::<std::net::IpAddr>().map(IpNet::from))
                    .with_context(|| {
                        format!("{var}={v:?}: not an address, `autodetect` or `none`")
                    })?,
            ),
        })
    };
    let ipv4 = address("IP", "IP_AUTODETECTION_METHOD", true)?;
    let ipv6 = address("IP6", "IP6_AUTODETECTION_METHOD", false)?;
    let no_default = get("NO_DEFAULT_POOLS").is_some_and(|v| v.eq_ignore_ascii_case("true"));
    let pool = |prefix: &str,
                default_cidr: Option<&str>,
                family_on: bool|
     -> Result<Option<DefaultPool>> {
        if no_default || !family_on {
            return Ok(None);
        }
        let Some(cidr) = get(&format!("{prefix}_CIDR")).or(default_cidr.map(str::to_owned)) else {
            return Ok(None);
        };
        let cidr: IpNet = cidr
            .parse()
            .with_context(|| format!("{prefix}_CIDR={cidr:?}: not a CIDR"))?;
        let block_size = match get(&format!("{prefix}_BLOCK_SIZE")) {
            Some(b) => Some(
                b.parse()
                    .with_context(|| format!("{prefix}_BLOCK_SIZE={b:?}: not a number"))?,
            ),
            None => None,
        };
        let mode = |var: &str, default: &str| -> Result<String> {
            let v = get(&format!("{prefix}_{var}")).unwrap_or_else(|| default.into());
            // calico-node accepts these spellings for the startup pool.
            Ok(match v.to_ascii_lowercase().as_str() {
                "always" => "Always".into(),
                "never" | "off" => "Never".into(),
                "crosssubnet" | "cross-subnet" => "CrossSubnet".into(),
                _ => bail!("{prefix}_{var}={v:?}: expected Always, CrossSubnet or Never"),
            })
        };
        let is_v6 = cidr.addr().is_ipv6();
        Ok(Some(DefaultPool {
            cidr,
            block_size,
            ipip_mode: if is_v6 {
                "Never".into()
            } else {
                mode("IPIP", "Always")?
            },
            vxlan_mode: mode("VXLAN", "Never")?,
            nat_outgoing: get(&format!("{prefix}_NAT_OUTGOING"))
                .map(|v| v.eq_ignore_ascii_case("true"))
                .unwrap_or(!is_v6),
            node_selector: get(&format!("{prefix}_NODE_SELECTOR"))
                .unwrap_or_else(|| "all()".into()),
        }))
    };
    let default_pool_v4 = pool(
        "CALICO_IPV4POOL",
        Some("192.168.0.0/16"),
        ipv4 != AddressSetting::None,
    )?;
    let default_pool_v6 = pool("CALICO_IPV6POOL", None, ipv6 != AddressSetting::None)?;
    if let Some(p) = &default_pool_v4
        && p.ipip_mode != "Never"
        && p.vxlan_mode != "Never"
    {
        bail!("CALICO_IPV4POOL_IPIP and CALICO_IPV4POOL_VXLAN are both enabled; choose one");
    }
    let addr = |var: &str, default: &str| -> Result<SocketAddr> {
        let v = get(var).unwrap_or_else(|| default.into());
        v.parse()
            .with_context(|| format!("{var}={v:?}: expected address:port"))
    };
    let secs = |var: &str, default: u64| -> Result<u64> {
        match get(var) {
            Some(v) => v
                .parse()
                .with_context(|| format!("{var}={v:?}: expected whole seconds")),
            None => Ok(default),
        }
    };
    Ok(Config {
        node_name,
        ipv4,
        ipv6,
        default_pool_v4,
        default_pool_v6,
        bgp_listen: addr("TORTIE_BGP_LISTEN", "0.0.0.0:179")?,
        metrics_listen: addr("TORTIE_METRICS_LISTEN", "0.0.0.0:9091")?,
        health_listen: addr("TORTIE_HEALTH_LISTEN", "127.0.0.1:9099")?,
        run_dir: get("TORTIE_RUN_DIR")
            .unwrap_or_else(|| "/run/tortie".into())
            .into(),
        cni_conf_dir: get("CNI_NET_DIR")
            .unwrap_or_else(|| "/etc/cni/net.d".into())
            .into(),
        route_protocol: match get("TORTIE_ROUTE_PROTOCOL") {
            Some(v) => v
                .parse()
                .with_context(|| format!("TORTIE_ROUTE_PROTOCOL={v:?}: expected 1-255"))?,
            None => tortie_dataplane::DEFAULT_ROUTE_PROTOCOL,
        },
        startup_grace_secs: secs("TORTIE_STARTUP_GRACE_SECS", 120)?,
        gc_interval_secs: secs("TORTIE_IPAM_GC_INTERVAL_SECS", 30)?.max(1),
        // calico-kube-controllers' default leak grace period: 15 minutes.
        gc_grace_secs: secs("TORTIE_IPAM_GC_GRACE_SECS", 900)?,
        gc_lease_secs: secs("TORTIE_IPAM_GC_LEASE_SECS", 30)?.clamp(1, 3600),
    })
}

fn hostname() -> Result<String> {
    let name =
        std::fs::read_to_string("/proc/sys/kernel/hostname").context("reading the host name")?;
    Ok(name.trim().to_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn calico_defaults_when_only_nodename_is_set() {
        let c = from_env(&env(&[("NODENAME", "n1")])).unwrap();
        assert_eq!(c.node_name, "n1");
        assert_eq!(c.ipv4, AddressSetting::Autodetect("first-found".into()));
        assert_eq!(c.ipv6, AddressSetting::None);
        let p = c.default_pool_v4.unwrap();
        assert_eq!(p.cidr.to_string(), "192.168.0.0/16");
        assert_eq!(
            (p.ipip_mode.as_str(), p.vxlan_mode.as_str()),
            ("Always", "Never")
        );
        assert!(p.nat_outgoing);
        assert_eq!(p.node_selector, "all()");
    }

    #[test]
    fn calico_yaml_env_is_understood() {
        let c = from_env(&env(&[
            ("NODENAME", "n1"),
            ("IP", "autodetect"),
            ("IP_AUTODETECTION_METHOD", "interface=eth0"),
            ("CALICO_IPV4POOL_CIDR", "10.244.0.0/16"),
            ("CALICO_IPV4POOL_IPIP", "Never"),
            ("CALICO_IPV4POOL_VXLAN", "CrossSubnet"),
            ("CALICO_IPV4POOL_BLOCK_SIZE", "24"),
        ]))
        .unwrap();
        assert_eq!(c.ipv4, AddressSetting::Autodetect("interface=eth0".into()));
        let p = c.default_pool_v4.unwrap();
        assert_eq!(p.vxlan_mode, "CrossSubnet");
        assert_eq!(p.block_size, Some(24));
    }

    #[test]
    fn no_default_pools_and_fixed_ip() {
        let c = from_env(&env(&[
            ("NODENAME", "n1"),
            ("NO_DEFAULT_POOLS", "true"),
            ("IP", "10.0.0.5/24"),
        ]))
        .unwrap();
        assert!(c.default_pool_v4.is_none());
        assert_eq!(
            c.ipv4,
            AddressSetting::Fixed("10.0.0.5/24".parse().unwrap())
        );
    }

    #[test]
    fn bad_values_name_the_variable() {
        let e = from_env(&env(&[
            ("NODENAME", "n1"),
            ("CALICO_IPV4POOL_IPIP", "Sometimes"),
        ]))
        .unwrap_err();
        assert!(e.to_string().contains("CALICO_IPV4POOL_IPIP"), "{e}");
        let e = from_env(&env(&[("NODENAME", "n1"), ("IP", "ten")])).unwrap_err();
        assert!(e.to_string().contains("IP=\"ten\""), "{e}");
        let e = from_env(&env(&[
            ("NODENAME", "n1"),
            ("CALICO_IPV4POOL_VXLAN", "Always"),
        ]))
        .unwrap_err();
        assert!(e.to_string().contains("both enabled"), "{e}");
    }
}
