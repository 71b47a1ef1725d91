//! The Calico kinds tortie reads that no library crate owns (BGPConfiguration, BGPPeer) and
//! the API coordinates of every `crd.projectcalico.org/v1` kind tortie uses.

use kube::core::{ApiResource, GroupVersionKind};
use serde::{Deserialize, Serialize};

pub const GROUP: &str = "crd.projectcalico.org";
pub const VERSION: &str = "v1";

/// The kinds tortie uses, with their plurals as Calico's CRDs name them.
pub const KINDS: &[(&str, &str)] = &[
    ("IPPool", "ippools"),
    ("IPAMBlock", "ipamblocks"),
    ("BlockAffinity", "blockaffinities"),
    ("IPAMHandle", "ipamhandles"),
    ("IPAMConfig", "ipamconfigs"),
    ("BGPConfiguration", "bgpconfigurations"),
    ("BGPPeer", "bgppeers"),
];

/// The `ApiResource` for a Calico kind (all cluster scoped).
pub fn api_resource(kind: &str) -> ApiResource {
    let plural = KINDS
        .iter()
        .find(|(k, _)| *k == kind)
        .map(|(_, p)| *p)
        .unwrap_or("unknown");
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(GROUP, VERSION, kind), plural)
}

/// `BGPConfiguration.spec` (the object named `default` holds the cluster's settings; objects named
/// `node.<name>` override per node). Unknown fields are kept so nothing written by Calico is lost.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BgpConfigurationSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub as_number: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_to_node_mesh_enabled: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen_port: Option<u16>,
    /// Go duration string, e.g. "120s".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_mesh_max_restart_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_mesh_password: Option<BgpPassword>,
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// Calico's default AS number for nodes without their own.
pub const DEFAULT_AS_NUMBER: u32 = 64512;

impl BgpConfigurationSpec {
    pub fn as_number(&self) -> u32 {
        self.as_number.unwrap_or(DEFAULT_AS_NUMBER)
    }

    pub fn mesh_enabled(&self) -> bool {
        self.node_to_node_mesh_enabled.unwrap_or(true)
    }
}

/// `password: { secretKeyRef: { name, key } }` as Calico writes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BgpPassword {
    pub secret_key_ref: Option<SecretKeyRef>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretKeyRef {
    pub name: String,
    pub key: String,
}

/// `BGPPeer.spec`: a peer for every node (no node/nodeSelector), one node (`node`), or the nodes a
/// selector picks; the remote side is `peerIP` + `asNumber`, or the nodes `peerSelector` picks.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BgpPeerSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<String>,
    /// An address, optionally with `:port` (IPv6 as `[addr]:port`).
    #[serde(default, rename = "peerIP", skip_serializing_if = "Option::is_none")]
    pub peer_ip: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_selector: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub as_number: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<BgpPassword>,
    /// "UseNodeIP" (default) or "None".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_address: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_restart_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_original_next_hop: Option<bool>,
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// Node annotations Calico's node writes in Kubernetes-datastore mode; tortie writes the same.
pub mod annotations {
    pub const IPV4_ADDRESS: &str = "projectcalico.org/IPv4Address";
    pub const IPV6_ADDRESS: &str = "projectcalico.org/IPv6Address";
    pub const IPV4_IPIP_TUNNEL_ADDR: &str = "projectcalico.org/IPv4IPIPTunnelAddr";
    pub const IPV4_VXLAN_TUNNEL_ADDR: &str = "projectcalico.org/IPv4VXLANTunnelAddr";
    pub const VXLAN_TUNNEL_MAC: &str = "projectcalico.org/VXLANTunnelMACAddr";
    pub const IPV6_VXLAN_TUNNEL_ADDR: &str = "projectcalico.org/IPv6VXLANTunnelAddr";
    pub const VXLAN_TUNNEL_MAC_V6: &str = "projectcalico.org/VXLANTunnelMACAddrV6";
    pub const AS_NUMBER: &str = "projectcalico.org/ASNumber";
    pub const RR_CLUSTER_ID: &str = "projectcalico.org/RouteReflectorClusterID";
}

/// Parses a Go duration as Calico writes them ("120s", "2m", "1h30m", "500ms") into seconds.
pub fn parse_go_duration_secs(s: &str) -> Option<u64> {
    let mut total_ms: u64 = 0;
    let mut num = String::new();
    let mut chars = s.trim().chars().peekable();
    if s.trim().is_empty() {
        return None;
    }
    while let Some(c) = chars.next() {
        if c.is_ascii_digit() {
            num.push(c);
            continue;
        }
        let n: u64 = num.parse().ok()?;
        num.clear();
        let unit_ms = match c {
            'h' => 3_600_000,
            's' => 1000,
            'm' if chars.peek() == Some(&'s') => {
                chars.next();
                1
            }
            'm' => 60_000,
            _ => return None,
        };
        total_ms = total_ms.checked_add(n.checked_mul(unit_ms)?)?;
    }
    if !num.is_empty() {
        return None;
    }
    Some(total_ms / 1000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bgp_configuration_defaults_match_calico() {
        let spec: BgpConfigurationSpec = serde_json::from_str("{}").unwrap();
        assert_eq!(spec.as_number(), 64512);
        assert!(spec.mesh_enabled());
    }

    #[test]
    fn bgp_peer_round_trips_calico_json_without_losing_fields() {
        let json = serde_json::json!({
            "peerIP": "10.77.0.1", "asNumber": 65000, "node": "node-1",
            "password": {"secretKeyRef": {"name": "bgp-secrets", "key": "rr"}},
            "keepOriginalNextHop": true, "filters": ["f1"], "ttlSecurity": 1
        });
        let spec: BgpPeerSpec = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(spec.peer_ip.as_deref(), Some("10.77.0.1"));
        assert_eq!(serde_json::to_value(&spec).unwrap(), json);
    }

    #[test]
    fn go_durations_parse_as_calico_writes_them() {
        assert_eq!(parse_go_duration_secs("120s"), Some(120));
        assert_eq!(parse_go_duration_secs("2m"), Some(120));
        assert_eq!(parse_go_duration_secs("1h30m"), Some(5400));
        assert_eq!(parse_go_duration_secs("1500ms"), Some(1));
        assert_eq!(parse_go_duration_secs("soon"), None);
        assert_eq!(parse_go_duration_secs("12"), None);
    }

    #[test]
    fn api_resources_use_calico_plurals() {
        let ar = api_resource("BlockAffinity");
        assert_eq!(ar.plural, "blockaffinities");
        assert_eq!(ar.api_version, "crd.projectcalico.org/v1");
    }
}
