//! The cluster as this node sees it (nodes, pools, blocks, BGP settings) and the pure functions
//! that turn it into the dataplane's inputs, the BGP peer set and the prefixes to advertise.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use tortie_dataplane as dp;
use tortie_ipam::{EncapMode, IpamBlock, PoolSet, Selector};

use crate::datastore::calico::{
    BgpConfigurationSpec, BgpPeerSpec, annotations, parse_go_duration_secs,
};

/// What tortie needs of a Kubernetes Node, read from Calico's annotations and the labels.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeInfo {
    pub name: String,
    pub addr_v4: Option<Ipv4Net>,
    pub addr_v6: Option<Ipv6Net>,
    pub ipip_tunnel_addr: Option<Ipv4Addr>,
    pub vxlan_tunnel_addr: Option<Ipv4Addr>,
    pub vxlan_mac: Option<[u8; 6]>,
    pub vxlan_tunnel_addr_v6: Option<Ipv6Addr>,
    pub vxlan_mac_v6: Option<[u8; 6]>,
    pub as_number: Option<u32>,
    pub rr_cluster_id: Option<String>,
    pub labels: BTreeMap<String, String>,
}

/// A problem with one annotation of one Node; the rest of the node is still used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("Node {node}: annotation {annotation}: {reason}")]
pub struct NodeFieldError {
    pub node: String,
    pub annotation: &'static str,
    pub reason: String,
}

impl NodeInfo {
    /// Reads a Node's Calico annotations; a bad value is reported and that field left unset.
    pub fn from_annotations(
        name: &str,
        annotations_map: &BTreeMap<String, String>,
        labels: &BTreeMap<String, String>,
    ) -> (NodeInfo, Vec<NodeFieldError>) {
        let mut errors = Vec::new();
        let field = |key: &'static str| annotations_map.get(key).map(|v| (key, v.trim()));
        let mut info = NodeInfo {
            name: name.to_owned(),
            labels: labels.clone(),
            ..NodeInfo::default()
        };
        let mut bad = |annotation: &'static str, reason: String| {
            errors.push(NodeFieldError {
                node: name.to_owned(),
                annotation,
                reason,
            })
        };
        if let Some((k, v)) = field(annotations::IPV4_ADDRESS) {
            match parse_addr_with_len::<Ipv4Net, Ipv4Addr>(v) {
                Ok(a) => info.addr_v4 = Some(a),
                Err(e) => bad(k, e),
            }
        }
        if let Some((k, v)) = field(annotations::IPV6_ADDRESS) {
            match parse_addr_with_len::<Ipv6Net, Ipv6Addr>(v) {
                Ok(a) => info.addr_v6 = Some(a),
                Err(e) => bad(k, e),
            }
        }
        if let Some((k, v)) = field(annotations::IPV4_IPIP_TUNNEL_ADDR) {
            match v.parse() {
                Ok(a) => info.ipip_tunnel_addr = Some(a),
                Err(e) => bad(k, format!("{v:?}: {e}")),
            }
        }
        if let Some((k, v)) = field(annotations::IPV4_VXLAN_TUNNEL_ADDR) {
            match v.parse() {
                Ok(a) => info.vxlan_tunnel_addr = Some(a),
                Err(e) => bad(k, format!("{v:?}: {e}")),
            }
        }
        if let Some((k, v)) = field(annotations::VXLAN_TUNNEL_MAC) {
            match parse_mac(v) {
                Some(m) => info.vxlan_mac = Some(m),
                None => bad(k, format!("{v:?} is not a MAC address")),
            }
        }
        if let Some((k, v)) = field(annotations::IPV6_VXLAN_TUNNEL_ADDR) {
            match v.parse() {
                Ok(a) => info.vxlan_tunnel_addr_v6 = Some(a),
                Err(e) => bad(k, format!("{v:?}: {e}")),
            }
        }
        if let Some((k, v)) = field(annotations::VXLAN_TUNNEL_MAC_V6) {
            match parse_mac(v) {
                Some(m) => info.vxlan_mac_v6 = Some(m),
                None => bad(k, format!("{v:?} is not a MAC address")),
            }
        }
        if let Some((k, v)) = field(annotations::AS_NUMBER) {
            match v.parse::<u32>() {
                Ok(a) if a != 0 => info.as_number = Some(a),
                _ => bad(k, format!("{v:?} is not an AS number (1-4294967295)")),
            }
        }
        if let Some((_, v)) = field(annotations::RR_CLUSTER_ID)
            && !v.is_empty()
        {
            info.rr_cluster_id = Some(v.to_owned());
        }
        (info, errors)
    }
}

/// `10.0.0.5/24`, or a bare address meaning a host prefix.
fn parse_addr_with_len<N, A>(v: &str) -> Result<N, String>
where
    N: std::str::FromStr + From<A>,
    A: std::str::FromStr,
{
    v.parse::<N>()
        .or_else(|_| v.parse::<A>().map(N::from))
        .map_err(|_| format!("{v:?} is not an address with prefix length"))
}

pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut mac {
        *b = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// Everything the agent has learned from the datastore, as one value.
#[derive(Debug, Clone, Default)]
pub struct ClusterView {
    pub me: String,
    pub nodes: BTreeMap<String, NodeInfo>,
    pub pools: PoolSet,
    /// Shared with the watch cache: a recompute copies pointers, not allocation tables.
    pub blocks: Vec<std::sync::Arc<IpamBlock>>,
    pub bgp_config: BgpConfigurationSpec,
    /// BGPPeer objects by name.
    pub bgp_peers: BTreeMap<String, BgpPeerSpec>,
}

/// A route learned over BGP that the dataplane should install (prefix, next hop).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct LearnedRoute {
    pub prefix: IpNet,
    pub next_hop: IpAddr,
}

fn to_dp_mode(m: EncapMode) -> dp::EncapMode {
    match m {
        EncapMode::Never => dp::EncapMode::Never,
        EncapMode::Always => dp::EncapMode::Always,
        EncapMode::CrossSubnet => dp::EncapMode::CrossSubnet,
    }
}

impl ClusterView {
    pub fn my_node(&self) -> Option<&NodeInfo> {
        self.nodes.get(&self.me)
    }

    /// Blocks whose affinity is `host:<node>` (not deleted), with their CIDRs.
    fn blocks_of(&self, node: &str) -> impl Iterator<Item = IpNet> + '_ {
        let want = format!("host:{node}");
        self.blocks
            .iter()
            .filter(move |b| {
                b.spec.affinity.as_deref() == Some(want.as_str()) && b.spec.deleted != Some(true)
            })
            .filter_map(|b| b.spec.cidr.parse().ok())
    }

    pub fn my_blocks(&self) -> Vec<IpNet> {
        let mut v: Vec<IpNet> = self.blocks_of(&self.me).collect();
        v.sort();
        v
    }

    /// The dataplane's inputs: pools' modes, our blocks, every other node's blocks (from the
    /// datastore, so they survive a BGP restart) and anything else learned over BGP.
    pub fn dataplane_inputs(
        &self,
        workloads: Vec<dp::Workload>,
        learned: &[LearnedRoute],
        uplink: &str,
        uplink_mtu: u32,
        default_gateway_v4: Option<Ipv4Addr>,
    ) -> dp::Inputs {
        let me = self.my_node();
        let pools = self
            .pools
            .valid
            .iter()
            .map(|p| dp::Pool {
                cidr: p.cidr,
                ipip: to_dp_mode(p.ipip_mode),
                vxlan: to_dp_mode(p.vxlan_mode),
            })
            .collect();
        let mut remote: BTreeMap<IpNet, IpAddr> = BTreeMap::new();
        let mut vteps = Vec::new();
        for (name, node) in &self.nodes {
            if *name == self.me {
                continue;
            }
            if let (Some(tun), Some(mac), Some(addr)) =
                (node.vxlan_tunnel_addr, node.vxlan_mac, node.addr_v4)
            {
                vteps.push(dp::RemoteVtep {
                    node_ip: IpAddr::V4(addr.addr()),
                    tunnel_addr: IpAddr::V4(tun),
                    mac,
                });
            }
            if let (Some(tun), Some(mac), Some(addr)) =
                (node.vxlan_tunnel_addr_v6, node.vxlan_mac_v6, node.addr_v6)
            {
                vteps.push(dp::RemoteVtep {
                    node_ip: IpAddr::V6(addr.addr()),
                    tunnel_addr: IpAddr::V6(tun),
                    mac,
                });
            }
            for block in self.blocks_of(name) {
                let node_ip = match block {
                    IpNet::V4(_) => node.addr_v4.map(|a| IpAddr::V4(a.addr())),
                    IpNet::V6(_) => node.addr_v6.map(|a| IpAddr::V6(a.addr())),
                };
                if let Some(ip) = node_ip {
                    remote.insert(block, ip);
                }
            }
        }
        let mine: BTreeSet<IpNet> = self.my_blocks().into_iter().collect();
        for r in learned {
            if !mine.contains(&r.prefix) && !self.is_own_address(r.next_hop) {
                remote.entry(r.prefix).or_insert(r.next_hop);
            }
        }
        // A plainly routed block (no tunnel in its pool) of a node on another subnet is reached
        // through our gateway, as BIRD's `gateway recursive` resolves it; the router must know
        // the block (a ToR peered through BGPPeer), as with Calico.
        if let (Some(gw), Some(my_net)) = (default_gateway_v4, me.and_then(|n| n.addr_v4)) {
            for (block, next_hop) in remote.iter_mut() {
                let routed = self
                    .pools
                    .containing(block.addr())
                    .is_none_or(|p| !p.ipip_mode.is_enabled() && !p.vxlan_mode.is_enabled());
                if let IpAddr::V4(nh) = next_hop
                    && routed
                    && !my_net.contains(&*nh)
                {
                    *next_hop = IpAddr::V4(gw);
                }
            }
        }
        dp::Inputs {
            node_name: self.me.clone(),
            node_addr_v4: me.and_then(|n| n.addr_v4),
            node_addr_v6: me.and_then(|n| n.addr_v6),
            uplink: uplink.to_owned(),
            uplink_mtu,
            ipip_tunnel_addr: me.and_then(|n| n.ipip_tunnel_addr),
            vxlan_tunnel_addr_v4: me.and_then(|n| n.vxlan_tunnel_addr),
            vxlan_tunnel_addr_v6: me.and_then(|n| n.vxlan_tunnel_addr_v6),
            pools,
            workloads,
            owned_blocks: mine.into_iter().collect(),
            remote_blocks: remote
                .into_iter()
                .map(|(cidr, node_ip)| dp::RemoteBlock { cidr, node_ip })
                .collect(),
            remote_vteps: vteps,
        }
    }

    fn is_own_address(&self, ip: IpAddr) -> bool {
        self.my_node().is_some_and(|n| {
            n.addr_v4.is_some_and(|a| IpAddr::V4(a.addr()) == ip)
                || n.addr_v6.is_some_and(|a| IpAddr::V6(a.addr()) == ip)
        })
    }

    /// The AS this node speaks as: its own annotation, else the cluster's BGPConfiguration.
    pub fn my_as(&self) -> u32 {
        self.my_node()
            .and_then(|n| n.as_number)
            .unwrap_or_else(|| self.bgp_config.as_number())
    }

    /// The prefixes this node originates: its confirmed blocks in pools that allow BGP export.
    /// Our blocks, plus a host route for each local pod whose address was borrowed from
    /// another node's block (strictAffinity off, our blocks full): the more specific route
    /// draws its traffic here, also on the block's owner, as Calico does.
    pub fn advertised_prefixes_with(&self, local_pod_ips: &[IpAddr]) -> Vec<IpNet> {
        let exported = |addr: IpAddr| {
            self.pools
                .valid
                .iter()
                .find(|p| p.cidr.contains(&addr))
                .is_some_and(|p| !p.disable_bgp_export)
        };
        let mine = self.my_blocks();
        let mut out: Vec<IpNet> = mine
            .iter()
            .copied()
            .filter(|b| exported(b.addr()))
            .collect();
        for ip in local_pod_ips {
            if exported(*ip) && !mine.iter().any(|b| b.contains(ip)) {
                out.push(IpNet::from(*ip));
            }
        }
        out
    }

    /// The BGP sessions this node should have: the full mesh (unless disabled, and except
    /// route reflectors, which leave it), plus every BGPPeer that selects this node.
    pub fn desired_peers(&self) -> (Vec<PeerPlan>, Vec<String>) {
        let mut errors = Vec::new();
        let mut peers: BTreeMap<(IpAddr, u16), PeerPlan> = BTreeMap::new();
        let Some(me) = self.my_node() else {
            return (Vec::new(), errors);
        };
        let my_as = self.my_as();
        let i_am_reflector = me.rr_cluster_id.is_some();
        if self.bgp_config.mesh_enabled() && !i_am_reflector {
            let restart = self
                .bgp_config
                .node_mesh_max_restart_time
                .as_deref()
                .and_then(parse_go_duration_secs);
            for (name, node) in &self.nodes {
                if *name == self.me || node.rr_cluster_id.is_some() {
                    continue;
                }
                for addr in node_addrs(node) {
                    peers.insert(
                        (addr, 179),
                        PeerPlan {
                            address: addr,
                            port: 179,
                            remote_as: node
                                .as_number
                                .unwrap_or_else(|| self.bgp_config.as_number()),
                            source: PeerSource::Mesh(name.clone()),
                            rr_client: false,
                            password: self
                                .bgp_config
                                .node_mesh_password
                                .as_ref()
                                .and_then(|p| p.secret_key_ref.clone()),
                            max_restart_secs: restart,
                        },
                    );
                }
            }
        }
        for (peer_name, spec) in &self.bgp_peers {
            match self.peer_applies_to_me(peer_name, spec) {
                Ok(false) => continue,
                Ok(true) => {}
                Err(e) => {
                    errors.push(e);
                    continue;
                }
            }
            let restart = spec
                .max_restart_time
                .as_deref()
                .and_then(parse_go_duration_secs);
            let password = spec
                .password
                .as_ref()
                .and_then(|p| p.secret_key_ref.clone());
            if let Some(ip) = &spec.peer_ip {
                match parse_peer_ip(ip) {
                    Ok((addr, port)) => {
                        let Some(asn) = spec.as_number else {
                            errors.push(format!(
                                "BGPPeer {peer_name}: spec.asNumber is required with peerIP"
                            ));
                            continue;
                        };
                        peers.insert(
                            (addr, port),
                            PeerPlan {
                                address: addr,
                                port,
                                remote_as: asn,
                                source: PeerSource::BgpPeer(peer_name.clone()),
                                rr_client: false,
                                password,
                                max_restart_secs: restart,
                            },
                        );
                    }
                    Err(e) => errors.push(format!("BGPPeer {peer_name}: spec.peerIP: {e}")),
                }
            } else if let Some(sel) = &spec.peer_selector {
                let selector = match Selector::parse(sel) {
                    Ok(s) => s,
                    Err(e) => {
                        errors.push(format!("BGPPeer {peer_name}: spec.peerSelector: {e}"));
                        continue;
                    }
                };
                for (name, node) in &self.nodes {
                    if *name == self.me || !selector.matches(&node.labels) {
                        continue;
                    }
                    // A reflector peering with a node that is not itself a reflector (of the
                    // same cluster) treats it as a client, as BIRD's Calico config does.
                    let rr_client = i_am_reflector && node.rr_cluster_id.is_none();
                    for addr in node_addrs(node) {
                        peers.insert(
                            (addr, 179),
                            PeerPlan {
                                address: addr,
                                port: 179,
                                remote_as: node.as_number.unwrap_or(my_as),
                                source: PeerSource::BgpPeer(peer_name.clone()),
                                rr_client,
                                password: password.clone(),
                                max_restart_secs: restart,
                            },
                        );
                    }
                }
            } else {
                errors.push(format!(
                    "BGPPeer {peer_name}: neither spec.peerIP nor spec.peerSelector is set"
                ));
            }
        }
        (peers.into_values().collect(), errors)
    }

    fn peer_applies_to_me(&self, peer_name: &str, spec: &BgpPeerSpec) -> Result<bool, String> {
        if let Some(node) = &spec.node {
            return Ok(*node == self.me);
        }
        if let Some(sel) = &spec.node_selector {
            let selector = Selector::parse(sel)
                .map_err(|e| format!("BGPPeer {peer_name}: spec.nodeSelector: {e}"))?;
            let labels = self.my_node().map(|n| n.labels.clone()).unwrap_or_default();
            return Ok(selector.matches(&labels));
        }
        Ok(true)
    }
}

fn node_addrs(node: &NodeInfo) -> Vec<IpAddr> {
    node.addr_v4
        .map(|a| IpAddr::V4(a.addr()))
        .into_iter()
        .chain(node.addr_v6.map(|a| IpAddr::V6(a.addr())))
        .collect()
}

/// `10.0.0.1`, `10.0.0.1:1179`, `fd00::1`, `[fd00::1]:1179`.
pub fn parse_peer_ip(s: &str) -> Result<(IpAddr, u16), String> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok((ip, 179));
    }
    s.parse::<SocketAddr>()
        .map(|sa| (sa.ip(), sa.port()))
        .map_err(|_| format!("{s:?} is not an address[:port]"))
}

/// Where a desired session comes from, for status and logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerSource {
    Mesh(String),
    BgpPeer(String),
}

/// One BGP session this node should have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerPlan {
    pub address: IpAddr,
    pub port: u16,
    pub remote_as: u32,
    pub source: PeerSource,
    pub rr_client: bool,
    pub password: Option<crate::datastore::calico::SecretKeyRef>,
    pub max_restart_secs: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use tortie_ipam::{IpPool, IpPoolSpec, new_block, validate_pools};

    fn node(name: &str, addr: &str) -> NodeInfo {
        let ann = BTreeMap::from([(annotations::IPV4_ADDRESS.to_owned(), addr.to_owned())]);
        NodeInfo::from_annotations(name, &ann, &BTreeMap::new()).0
    }

    fn view() -> ClusterView {
        let pool = IpPool::new(
            "default-ipv4-ippool",
            IpPoolSpec {
                cidr: "10.244.0.0/16".into(),
                vxlan_mode: Some("CrossSubnet".into()),
                ..Default::default()
            },
        );
        let mut v = ClusterView {
            me: "a".into(),
            pools: validate_pools(&[pool]),
            ..Default::default()
        };
        for (n, a) in [
            ("a", "10.77.0.10/24"),
            ("b", "10.77.0.11/24"),
            ("c", "10.77.1.10/24"),
        ] {
            v.nodes.insert(n.into(), node(n, a));
        }
        v.blocks
            .push(new_block("10.244.0.0/26".parse().unwrap(), Some("a")).into());
        v.blocks
            .push(new_block("10.244.0.64/26".parse().unwrap(), Some("b")).into());
        v.blocks
            .push(new_block("10.244.1.0/26".parse().unwrap(), Some("c")).into());
        v
    }

    #[test]
    fn a_dual_stack_nodes_ipv6_vtep_and_our_ipv6_tunnel_address_reach_the_dataplane() {
        let mut v = view();
        v.me = "a".into();
        let dual = |name: &str, v4: &str, v6: &str, tun6: &str, mac: &str| {
            let ann = BTreeMap::from([
                (annotations::IPV4_ADDRESS.to_owned(), v4.to_owned()),
                (annotations::IPV6_ADDRESS.to_owned(), v6.to_owned()),
                (
                    annotations::IPV6_VXLAN_TUNNEL_ADDR.to_owned(),
                    tun6.to_owned(),
                ),
                (annotations::VXLAN_TUNNEL_MAC_V6.to_owned(), mac.to_owned()),
            ]);
            let (n, errs) = NodeInfo::from_annotations(name, &ann, &BTreeMap::new());
            assert!(errs.is_empty(), "{errs:?}");
            n
        };
        v.nodes.insert(
            "a".into(),
            dual(
                "a",
                "10.77.0.10/24",
                "fd77::a/64",
                "fd00:5::1",
                "66:00:00:00:00:0a",
            ),
        );
        v.nodes.insert(
            "b".into(),
            dual(
                "b",
                "10.77.0.11/24",
                "fd77::b/64",
                "fd00:5::41",
                "66:00:00:00:00:0b",
            ),
        );
        let inputs = v.dataplane_inputs(vec![], &[], "eth0", 1500, None);
        assert_eq!(
            inputs.vxlan_tunnel_addr_v6,
            Some("fd00:5::1".parse().unwrap())
        );
        let vtep6 = inputs
            .remote_vteps
            .iter()
            .find(|t| t.tunnel_addr.is_ipv6())
            .expect("b's IPv6 VTEP");
        assert_eq!(vtep6.node_ip, "fd77::b".parse::<IpAddr>().unwrap());
        assert_eq!(vtep6.tunnel_addr, "fd00:5::41".parse::<IpAddr>().unwrap());
        assert_eq!(vtep6.mac, [0x66, 0, 0, 0, 0, 0x0b]);
    }

    #[test]
    fn a_malformed_ipv6_vtep_annotation_is_reported_by_node_and_annotation() {
        let ann = BTreeMap::from([(
            annotations::IPV6_VXLAN_TUNNEL_ADDR.to_owned(),
            "fd00::zz".to_owned(),
        )]);
        let (n, errs) = NodeInfo::from_annotations("b", &ann, &BTreeMap::new());
        assert_eq!(n.vxlan_tunnel_addr_v6, None);
        assert_eq!(errs.len(), 1);
        let msg = errs[0].to_string();
        assert!(
            msg.contains("Node b") && msg.contains("projectcalico.org/IPv6VXLANTunnelAddr"),
            "{msg}"
        );
    }

    #[test]
    fn annotations_parse_like_calico_writes_them() {
        let ann = BTreeMap::from([
            (
                annotations::IPV4_ADDRESS.to_owned(),
                "10.77.0.10/24".to_owned(),
            ),
            (
                annotations::VXLAN_TUNNEL_MAC.to_owned(),
                "66:aa:bb:cc:dd:ee".to_owned(),
            ),
            (
                annotations::IPV4_VXLAN_TUNNEL_ADDR.to_owned(),
                "10.244.0.1".to_owned(),
            ),
            (annotations::AS_NUMBER.to_owned(), "65010".to_owned()),
        ]);
        let (n, errs) = NodeInfo::from_annotations("a", &ann, &BTreeMap::new());
        assert!(errs.is_empty(), "{errs:?}");
        assert_eq!(n.addr_v4.unwrap().to_string(), "10.77.0.10/24");
        assert_eq!(n.vxlan_mac, Some([0x66, 0xaa, 0xbb, 0xcc, 0xdd, 0xee]));
        assert_eq!(n.as_number, Some(65010));
    }

    #[test]
    fn a_bad_annotation_names_node_and_annotation_and_keeps_the_rest() {
        let ann = BTreeMap::from([
            (
                annotations::IPV4_ADDRESS.to_owned(),
                "10.77.0.10/24".to_owned(),
            ),
            (annotations::AS_NUMBER.to_owned(), "sixty".to_owned()),
        ]);
        let (n, errs) = NodeInfo::from_annotations("a", &ann, &BTreeMap::new());
        assert_eq!(errs.len(), 1);
        assert_eq!(
            errs[0].to_string(),
            "Node a: annotation projectcalico.org/ASNumber: \"sixty\" is not an AS number (1-4294967295)"
        );
        assert!(n.addr_v4.is_some());
    }

    #[test]
    fn other_nodes_blocks_become_remote_blocks_via_their_address() {
        let v = view();
        let inputs = v.dataplane_inputs(vec![], &[], "eth0", 1500, None);
        let remote: Vec<String> = inputs
            .remote_blocks
            .iter()
            .map(|r| format!("{} {}", r.cidr, r.node_ip))
            .collect();
        assert_eq!(
            remote,
            vec!["10.244.0.64/26 10.77.0.11", "10.244.1.0/26 10.77.1.10"]
        );
        assert_eq!(
            inputs.owned_blocks,
            vec!["10.244.0.0/26".parse::<IpNet>().unwrap()]
        );
        assert_eq!(inputs.pools[0].vxlan, dp::EncapMode::CrossSubnet);
        assert_eq!(inputs.node_addr_v4.unwrap().prefix_len(), 24);
    }

    #[test]
    fn bgp_learned_prefixes_outside_blocks_are_added_but_never_our_own() {
        let v = view();
        let learned = vec![
            LearnedRoute {
                prefix: "192.0.2.0/24".parse().unwrap(),
                next_hop: "10.77.0.1".parse().unwrap(),
            },
            LearnedRoute {
                prefix: "10.244.0.0/26".parse().unwrap(),
                next_hop: "10.77.0.11".parse().unwrap(),
            },
        ];
        let inputs = v.dataplane_inputs(vec![], &learned, "eth0", 1500, None);
        assert!(
            inputs
                .remote_blocks
                .iter()
                .any(|r| r.cidr.to_string() == "192.0.2.0/24")
        );
        assert!(
            !inputs
                .remote_blocks
                .iter()
                .any(|r| r.cidr.to_string() == "10.244.0.0/26")
        );
    }

    #[test]
    fn routed_blocks_of_other_subnets_go_through_the_gateway_tunnelled_ones_do_not() {
        let mut v = view();
        let gw = Some("10.77.0.1".parse().unwrap());
        // CrossSubnet pool: c's block keeps c's address so the dataplane can choose the tunnel.
        let inputs = v.dataplane_inputs(vec![], &[], "eth0", 1500, gw);
        let c_route = inputs
            .remote_blocks
            .iter()
            .find(|r| r.cidr.to_string() == "10.244.1.0/26")
            .unwrap();
        assert_eq!(c_route.node_ip.to_string(), "10.77.1.10");
        // A plainly routed pool: c is on another subnet, so its block goes via the gateway;
        // b shares our subnet and stays direct.
        let pool = IpPool::new(
            "p",
            IpPoolSpec {
                cidr: "10.244.0.0/16".into(),
                ..Default::default()
            },
        );
        v.pools = validate_pools(&[pool]);
        let inputs = v.dataplane_inputs(vec![], &[], "eth0", 1500, gw);
        let hops: Vec<String> = inputs
            .remote_blocks
            .iter()
            .map(|r| format!("{} {}", r.cidr, r.node_ip))
            .collect();
        assert_eq!(
            hops,
            vec!["10.244.0.64/26 10.77.0.11", "10.244.1.0/26 10.77.0.1"]
        );
    }

    #[test]
    fn mesh_peers_every_other_node_with_the_default_as() {
        let (peers, errs) = view().desired_peers();
        assert!(errs.is_empty());
        let addrs: Vec<String> = peers
            .iter()
            .map(|p| format!("{} {}", p.address, p.remote_as))
            .collect();
        assert_eq!(addrs, vec!["10.77.0.11 64512", "10.77.1.10 64512"]);
    }

    #[test]
    fn mesh_off_leaves_only_explicit_bgp_peers() {
        let mut v = view();
        v.bgp_config.node_to_node_mesh_enabled = Some(false);
        v.bgp_peers.insert(
            "tor".into(),
            BgpPeerSpec {
                peer_ip: Some("10.77.0.1".into()),
                as_number: Some(65000),
                ..Default::default()
            },
        );
        v.bgp_peers.insert(
            "other-node-only".into(),
            BgpPeerSpec {
                node: Some("b".into()),
                peer_ip: Some("10.77.0.2".into()),
                as_number: Some(65000),
                ..Default::default()
            },
        );
        let (peers, errs) = v.desired_peers();
        assert!(errs.is_empty(), "{errs:?}");
        assert_eq!(peers.len(), 1);
        assert_eq!(peers[0].address.to_string(), "10.77.0.1");
        assert_eq!(peers[0].source, PeerSource::BgpPeer("tor".into()));
    }

    #[test]
    fn route_reflector_leaves_the_mesh_and_treats_selected_nodes_as_clients() {
        let mut v = view();
        v.me = "c".into();
        v.nodes.get_mut("c").unwrap().rr_cluster_id = Some("224.0.0.1".into());
        v.nodes
            .get_mut("a")
            .unwrap()
            .labels
            .insert("rr-client".into(), "yes".into());
        v.bgp_peers.insert(
            "to-clients".into(),
            BgpPeerSpec {
                peer_selector: Some("has(rr-client)".into()),
                ..Default::default()
            },
        );
        let (peers, errs) = v.desired_peers();
        assert!(errs.is_empty(), "{errs:?}");
        assert_eq!(peers.len(), 1, "{peers:?}");
        assert!(peers[0].rr_client);
        assert_eq!(peers[0].address.to_string(), "10.77.0.10");
    }

    #[test]
    fn a_bad_bgp_peer_is_reported_by_name_and_field_and_others_still_apply() {
        let mut v = view();
        v.bgp_peers.insert(
            "broken".into(),
            BgpPeerSpec {
                peer_ip: Some("not-an-ip".into()),
                ..Default::default()
            },
        );
        let (peers, errs) = v.desired_peers();
        assert_eq!(
            errs,
            vec!["BGPPeer broken: spec.peerIP: \"not-an-ip\" is not an address[:port]".to_owned()]
        );
        assert_eq!(peers.len(), 2, "mesh peers still there");
    }

    #[test]
    fn peer_ip_with_port_parses() {
        assert_eq!(parse_peer_ip("10.0.0.1:1179").unwrap().1, 1179);
        assert_eq!(
            parse_peer_ip("[fd00::1]:1179").unwrap().0.to_string(),
            "fd00::1"
        );
        assert_eq!(parse_peer_ip("fd00::1").unwrap().1, 179);
    }

    #[test]
    fn borrowed_pod_addresses_are_advertised_as_host_routes() {
        let v = view();
        let own: IpAddr = "10.244.0.5".parse().unwrap();
        let borrowed: IpAddr = "10.244.0.70".parse().unwrap(); // inside b's block
        let outside: IpAddr = "192.0.2.9".parse().unwrap(); // in no pool
        let adv: Vec<String> = v
            .advertised_prefixes_with(&[own, borrowed, outside])
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(adv, vec!["10.244.0.0/26", "10.244.0.70/32"]);
    }

    #[test]
    fn advertised_prefixes_are_my_blocks_unless_the_pool_disables_export() {
        let mut v = view();
        assert_eq!(v.advertised_prefixes_with(&[]).len(), 1);
        let pool = IpPool::new(
            "p",
            IpPoolSpec {
                cidr: "10.244.0.0/16".into(),
                disable_bgp_export: Some(true),
                ..Default::default()
            },
        );
        v.pools = validate_pools(&[pool]);
        assert!(v.advertised_prefixes_with(&[]).is_empty());
    }
}
