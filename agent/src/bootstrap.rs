//! Node bootstrap, as `calico-node -startup` does it: find this node's address, write Calico's
//! Node annotations, create the default pools, and keep tunnel addresses as the pools require.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use ipnet::IpNet;
use k8s_openapi::api::core::v1::Node;
use kube::Client;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;
use tortie_ipam::{IpPool, IpPoolSpec, Ipam, Store, TunnelKind};
use tracing::{info, warn};

use crate::autodetect::{self, Method};
use crate::config::{AddressSetting, Config, DefaultPool};
use crate::datastore::calico::annotations;
use crate::datastore::ipam_store::KubeIpamStore;

/// What bootstrap found out about this node.
#[derive(Debug, Clone)]
pub struct NodeIdentity {
    pub name: String,
    pub addr_v4: Option<IpNet>,
    pub addr_v6: Option<IpNet>,
    /// The interface holding the node address (the underlay for routes and VXLAN).
    pub uplink: String,
    pub uplink_mtu: u32,
    /// The IPv4 default gateway, through which plainly routed blocks of nodes on other
    /// subnets are reached (what BIRD's `gateway recursive` resolves to).
    pub default_gateway_v4: Option<std::net::Ipv4Addr>,
    pub labels: BTreeMap<String, String>,
}

const NODE_WAIT: Duration = Duration::from_secs(300);

/// Waits (bounded) for the Node object, which kubelet creates, then detects the node's
/// addresses and writes the annotations other nodes read.
pub async fn bootstrap(client: &Client, cfg: &Config) -> Result<NodeIdentity> {
    let nodes: Api<Node> = Api::all(client.clone());
    let node = wait_for_node(&nodes, &cfg.node_name).await?;
    let internal_ips: Vec<IpAddr> = node
        .status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .map(|a| {
            a.iter()
                .filter(|a| a.type_ == "InternalIP")
                .filter_map(|a| a.address.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    let ifaces = autodetect::interface_addrs()?;
    let detect = |setting: &AddressSetting, v6: bool| -> Result<Option<IpNet>> {
        Ok(match setting {
            AddressSetting::None => None,
            AddressSetting::Fixed(net) => Some(*net),
            AddressSetting::Autodetect(method) => Some(autodetect::select(
                &Method::parse(method)?,
                &ifaces,
                v6,
                &internal_ips,
            )?),
        })
    };
    let addr_v4 = detect(&cfg.ipv4, false).context("detecting the node's IPv4 address (IP)")?;
    let addr_v6 = detect(&cfg.ipv6, true).context("detecting the node's IPv6 address (IP6)")?;
    let Some(primary) = addr_v4.or(addr_v6) else {
        bail!("IP and IP6 are both `none`: tortie needs a node address");
    };
    let uplink = ifaces
        .iter()
        .find(|i| i.addr.addr() == primary.addr())
        .map(|i| i.ifname.clone())
        .with_context(|| format!("no interface holds the node address {primary}"))?;
    let uplink_mtu = read_mtu(&uplink).unwrap_or(1500);

    let mut ann = serde_json::Map::new();
    if let Some(a) = addr_v4 {
        ann.insert(annotations::IPV4_ADDRESS.into(), json!(a.to_string()));
    }
    if let Some(a) = addr_v6 {
        ann.insert(annotations::IPV6_ADDRESS.into(), json!(a.to_string()));
    }
    patch_annotations(&nodes, &cfg.node_name, ann).await?;
    info!(node = %cfg.node_name, ?addr_v4, ?addr_v6, %uplink, uplink_mtu, "node address detected");
    Ok(NodeIdentity {
        name: cfg.node_name.clone(),
        addr_v4,
        addr_v6,
        uplink,
        uplink_mtu,
        default_gateway_v4: default_gateway_v4(),
        labels: node.metadata.labels.unwrap_or_default(),
    })
}

async fn wait_for_node(nodes: &Api<Node>, name: &str) -> Result<Node> {
    let deadline = tokio::time::Instant::now() + NODE_WAIT;
    let mut delay = Duration::from_millis(200);
    loop {
        match nodes.get_opt(name).await {
            Ok(Some(n)) => return Ok(n),
            Ok(None) => warn!(
                node = name,
                "Node object does not exist yet (kubelet registers it); waiting"
            ),
            Err(e) => warn!(node = name, error = %e, "reading the Node failed; retrying"),
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("Node {name} did not appear within {NODE_WAIT:?} (is NODENAME right?)");
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

/// Merge-patches annotations (a `null` value removes one).
pub async fn patch_annotations(
    nodes: &Api<Node>,
    name: &str,
    ann: serde_json::Map<String, serde_json::Value>,
) -> Result<()> {
    if ann.is_empty() {
        return Ok(());
    }
    let patch = json!({ "metadata": { "annotations": ann } });
    nodes
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .with_context(|| format!("writing annotations on Node {name}"))?;
    Ok(())
}

/// The main table's IPv4 default gateway, from /proc/net/route (hex, little-endian fields).
fn default_gateway_v4() -> Option<std::net::Ipv4Addr> {
    let table = std::fs::read_to_string("/proc/net/route").ok()?;
    parse_default_gateway(&table)
}

fn parse_default_gateway(table: &str) -> Option<std::net::Ipv4Addr> {
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (dest, gw, mask) = (f.get(1)?, f.get(2)?, f.get(7)?);
        if *dest != "00000000" || *mask != "00000000" {
            return None;
        }
        let gw = u32::from_str_radix(gw, 16).ok()?;
        (gw != 0).then(|| std::net::Ipv4Addr::from(gw.swap_bytes()))
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn default_gateway_is_read_from_proc_net_route() {
        let table = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                     eth0\t00000000\t01004D0A\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
                     eth0\t00004D0A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n";
        assert_eq!(
            super::parse_default_gateway(table),
            Some("10.77.0.1".parse().unwrap())
        );
        assert_eq!(super::parse_default_gateway("Iface\n"), None);
    }
}

fn read_mtu(ifname: &str) -> Option<u32> {
    std::fs::read_to_string(format!("/sys/class/net/{ifname}/mtu"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Creates `default-ipv4-ippool` / `default-ipv6-ippool` when the cluster has no pool at all,
/// as calico-node does on first start. An existing pool of any name means hands off.
pub async fn ensure_default_pools<S: Store>(store: &S, cfg: &Config) -> Result<()> {
    let existing: Vec<IpPool> = store.list().await.context("listing IPPools")?;
    let wanted = [
        ("default-ipv4-ippool", &cfg.default_pool_v4, false),
        ("default-ipv6-ippool", &cfg.default_pool_v6, true),
    ];
    for (name, pool, v6) in wanted {
        let Some(pool) = pool else { continue };
        if existing.iter().any(|p| p.spec.cidr.contains(':') == v6) {
            continue;
        }
        match store.create(&IpPool::new(name, pool_spec(pool))).await {
            Ok(_) => info!(pool = name, cidr = %pool.cidr, "created the default IPPool"),
            // Another node won the race: fine.
            Err(tortie_ipam::StoreError::AlreadyExists { .. }) => {}
            Err(e) => return Err(e).with_context(|| format!("creating IPPool {name}")),
        }
    }
    Ok(())
}

fn pool_spec(p: &DefaultPool) -> IpPoolSpec {
    IpPoolSpec {
        cidr: p.cidr.to_string(),
        block_size: Some(i64::from(
            p.block_size
                .unwrap_or(if p.cidr.addr().is_ipv6() { 122 } else { 26 }),
        )),
        ipip_mode: Some(p.ipip_mode.clone()),
        vxlan_mode: Some(p.vxlan_mode.clone()),
        nat_outgoing: Some(p.nat_outgoing),
        node_selector: Some(p.node_selector.clone()),
        ..IpPoolSpec::default()
    }
}

/// This node's tunnel addresses after making them match the pools' modes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TunnelAddrs {
    pub ipip: Option<IpAddr>,
    pub vxlan: Option<IpAddr>,
    pub vxlan_v6: Option<IpAddr>,
}

/// Allocates or frees the IPIP, VXLAN and IPv6 VXLAN tunnel addresses (Calico's
/// allocate-tunnel-addrs) and writes them, with the VTEP MACs, into the Node's annotations.
pub async fn sync_tunnel_addresses(
    client: &Client,
    ipam: &Ipam<KubeIpamStore>,
    node: &NodeIdentity,
) -> Result<TunnelAddrs> {
    let ipip = ipam
        .ensure_tunnel_address(&node.name, &node.labels, TunnelKind::Ipip)
        .await
        .context("allocating the IPIP tunnel address")?;
    let vxlan = ipam
        .ensure_tunnel_address(&node.name, &node.labels, TunnelKind::Vxlan)
        .await
        .context("allocating the VXLAN tunnel address")?;
    // Calico gives a node an IPv6 VTEP only when it has an IPv6 address to carry it.
    let vxlan_v6 = if node.addr_v6.is_some() {
        ipam.ensure_tunnel_address(&node.name, &node.labels, TunnelKind::VxlanV6)
            .await
            .context("allocating the IPv6 VXLAN tunnel address")?
    } else {
        ipam.release_by_handle(&TunnelKind::VxlanV6.handle_id(&node.name))
            .await
            .context("releasing the IPv6 VXLAN tunnel address")?;
        None
    };
    let mut ann = serde_json::Map::new();
    let value = |a: Option<IpAddr>| {
        a.map(|a| json!(a.to_string()))
            .unwrap_or(serde_json::Value::Null)
    };
    ann.insert(annotations::IPV4_IPIP_TUNNEL_ADDR.into(), value(ipip));
    ann.insert(annotations::IPV4_VXLAN_TUNNEL_ADDR.into(), value(vxlan));
    // A VTEP's MAC is announced while it has an address (null removes the annotation).
    let mac = |tunnel: Option<IpAddr>, ipv6: bool| match tunnel {
        Some(_) => json!(tortie_dataplane::format_mac(
            &tortie_dataplane::vtep_mac_for(&node.name, ipv6)
        )),
        None => serde_json::Value::Null,
    };
    ann.insert(annotations::VXLAN_TUNNEL_MAC.into(), mac(vxlan, false));
    ann.insert(annotations::IPV6_VXLAN_TUNNEL_ADDR.into(), value(vxlan_v6));
    ann.insert(annotations::VXLAN_TUNNEL_MAC_V6.into(), mac(vxlan_v6, true));
    patch_annotations(&Api::all(client.clone()), &node.name, ann).await?;
    Ok(TunnelAddrs {
        ipip,
        vxlan,
        vxlan_v6,
    })
}

/// Sets the Node's `NetworkUnavailable` condition, as Calico does (reason `CalicoIsUp` when
/// routing works, `CalicoIsDown` on shutdown), so the kubelet's readiness gate opens.
pub async fn set_network_unavailable(client: &Client, node: &str, unavailable: bool) -> Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    let (status, reason, message) = if unavailable {
        (
            "True",
            "CalicoIsDown",
            "tortie is shutting down on this node",
        )
    } else {
        ("False", "CalicoIsUp", "tortie is running on this node")
    };
    let patch = json!({ "status": { "conditions": [{
        "type": "NetworkUnavailable", "status": status, "reason": reason, "message": message,
        "lastTransitionTime": now, "lastHeartbeatTime": now,
    }]}});
    nodes
        .patch_status(node, &PatchParams::default(), &Patch::Strategic(&patch))
        .await
        .with_context(|| format!("setting NetworkUnavailable={status} on Node {node}"))?;
    Ok(())
}
