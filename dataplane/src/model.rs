//! The dataplane's vocabulary: what the agent tells it (inputs) and what the kernel should hold (routes, devices, neighbours).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use std::time::Duration;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

/// tortie's default route protocol number (`proto 84` in `ip route`). Unused by iproute2's
/// `rt_protos`, by BIRD (12), by BGP daemons (186) and by Felix (which marks routes with 3 "boot"
/// and 80), so `ip route show proto 84` lists exactly tortie's routes.
pub const DEFAULT_ROUTE_PROTOCOL: u8 = 84;

/// Calico's VXLAN network identifier and UDP port; kept so mixed clusters interoperate.
pub const VXLAN_VNI: u32 = 4096;
pub const VXLAN_PORT: u16 = 4789;
/// Overheads subtracted from the uplink MTU for each tunnel.
pub const IPIP_OVERHEAD: u32 = 20;
pub const VXLAN_V4_OVERHEAD: u32 = 50;
pub const VXLAN_V6_OVERHEAD: u32 = 70;

/// How the dataplane is configured once, at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Route protocol number marking tortie's routes; never 0–4 (kernel's own), 12 (bird) or 186 (bgp).
    pub route_protocol: u8,
    /// Full dump-and-compare safety net (Felix's `routeRefreshInterval`).
    pub resync_interval: Duration,
    /// Re-mark calico-node's leftovers (proto 12 block routes and blackholes, pod /32s on
    /// `cali*` links) as tortie's when they match the desired state, with an in-place replace.
    pub adopt_calico_routes: bool,
    /// Receive buffer of the monitor socket; a small one makes overruns (and resyncs) likely.
    pub monitor_rcvbuf: usize,
    pub ipip_device: String,
    pub vxlan_device: String,
    pub vxlan_v6_device: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            route_protocol: DEFAULT_ROUTE_PROTOCOL,
            resync_interval: Duration::from_secs(90),
            adopt_calico_routes: false,
            monitor_rcvbuf: 8 << 20,
            ipip_device: "tunl0".into(),
            vxlan_device: "vxlan.calico".into(),
            vxlan_v6_device: "vxlan-v6.calico".into(),
        }
    }
}

/// Encapsulation setting of one IP pool for one tunnel type (Calico's `ipipMode` / `vxlanMode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EncapMode {
    #[default]
    Never,
    Always,
    /// Tunnel only to nodes outside this node's subnet.
    CrossSubnet,
}

/// An IP pool's CIDR and its encapsulation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pool {
    pub cidr: IpNet,
    pub ipip: EncapMode,
    pub vxlan: EncapMode,
}

/// A pod on this node: its address and the host end of its veth.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    pub ip: IpAddr,
    pub host_if: String,
}

/// A block another node announced (normally learned over BGP).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteBlock {
    pub cidr: IpNet,
    /// The announcing node's address (BGP next hop).
    pub node_ip: IpAddr,
}

/// Another node's VXLAN endpoint: its tunnel address, its device MAC and its underlay address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteVtep {
    pub node_ip: IpAddr,
    pub tunnel_addr: IpAddr,
    pub mac: [u8; 6],
}

/// Everything the desired state is computed from. The agent rebuilds and hands over a whole
/// value each time something changes; the dataplane is level-triggered on it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Inputs {
    /// Seeds this node's stable VTEP MAC.
    pub node_name: String,
    /// This node's address with its subnet's prefix length; CrossSubnet decides by it.
    pub node_addr_v4: Option<Ipv4Net>,
    pub node_addr_v6: Option<Ipv6Net>,
    pub uplink: String,
    pub uplink_mtu: u32,
    pub ipip_tunnel_addr: Option<Ipv4Addr>,
    pub vxlan_tunnel_addr_v4: Option<Ipv4Addr>,
    pub vxlan_tunnel_addr_v6: Option<Ipv6Addr>,
    pub pools: Vec<Pool>,
    pub workloads: Vec<Workload>,
    pub owned_blocks: Vec<IpNet>,
    pub remote_blocks: Vec<RemoteBlock>,
    pub remote_vteps: Vec<RemoteVtep>,
}

/// Bad inputs, each naming the object and field at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InputError {
    #[error("pool {pool}: ipipMode and vxlanMode are both enabled; choose one")]
    PoolBothEncapsulations { pool: IpNet },
    #[error("pool {pool}: ipipMode must be Never for an IPv6 pool")]
    IpipOnIpv6Pool { pool: IpNet },
    #[error("inputs.uplink_mtu {mtu} is too small for tunnel overheads (need > {min})")]
    UplinkMtuTooSmall { mtu: u32, min: u32 },
    #[error("inputs.uplink is empty")]
    NoUplink,
    #[error("workload {ip}: host_if {host_if:?} is not a valid interface name (1..=15 bytes)")]
    BadWorkloadInterface { ip: IpAddr, host_if: String },
}

/// Bad configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "config.route_protocol {0} is reserved (0-4 belong to the kernel, 12 to BIRD, 186 to BGP daemons)"
    )]
    ReservedProtocol(u8),
    #[error("config.{field} {name:?} is not a valid interface name (1..=15 bytes)")]
    BadDeviceName { field: &'static str, name: String },
}

impl Config {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if matches!(self.route_protocol, 0..=4 | 12 | 186) {
            return Err(ConfigError::ReservedProtocol(self.route_protocol));
        }
        for (field, name) in [
            ("ipip_device", &self.ipip_device),
            ("vxlan_device", &self.vxlan_device),
            ("vxlan_v6_device", &self.vxlan_v6_device),
        ] {
            if !valid_ifname(name) {
                return Err(ConfigError::BadDeviceName {
                    field,
                    name: name.clone(),
                });
            }
        }
        Ok(())
    }
}

pub(crate) fn valid_ifname(name: &str) -> bool {
    !name.is_empty() && name.len() <= 15 && !name.contains(['/', ' ', '\0'])
}

/// Which rule produced a route; used for counters (`tortie_routes{kind=…}`) and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RouteKind {
    /// `<pod>/32 dev cali… scope link`
    Workload,
    /// `blackhole <owned block>`
    Blackhole,
    /// `<block> via <node> dev <uplink>`
    Direct,
    /// `<block> via <node> dev tunl0 onlink`
    Ipip,
    /// `<block> via <vtep> dev vxlan.calico onlink`
    Vxlan,
}

impl RouteKind {
    pub const ALL: [RouteKind; 5] = [
        RouteKind::Workload,
        RouteKind::Blackhole,
        RouteKind::Direct,
        RouteKind::Ipip,
        RouteKind::Vxlan,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RouteKind::Workload => "workload",
            RouteKind::Blackhole => "blackhole",
            RouteKind::Direct => "direct",
            RouteKind::Ipip => "ipip",
            RouteKind::Vxlan => "vxlan",
        }
    }
}

/// Where a route sends packets. Interface names are shared (`Arc<str>`) because 100k routes
/// usually name the same one or two devices.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum RouteTarget {
    Blackhole,
    /// Directly attached: `dev <ifname> scope link` (IPv4) / `dev <ifname>` (IPv6).
    Device {
        ifname: Arc<str>,
    },
    Gateway {
        via: IpAddr,
        ifname: Arc<str>,
        onlink: bool,
    },
    /// Only ever seen in the kernel: a route of tortie's protocol that tortie would not build
    /// (multipath, unreachable, …); the reconciler replaces or deletes it.
    Unrecognised {
        description: String,
    },
}

impl RouteTarget {
    pub fn ifname(&self) -> Option<&str> {
        match self {
            RouteTarget::Blackhole | RouteTarget::Unrecognised { .. } => None,
            RouteTarget::Device { ifname } | RouteTarget::Gateway { ifname, .. } => Some(ifname),
        }
    }
}

impl fmt::Display for RouteTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RouteTarget::Blackhole => write!(f, "blackhole"),
            RouteTarget::Device { ifname } => write!(f, "dev {ifname} scope link"),
            RouteTarget::Gateway {
                via,
                ifname,
                onlink,
            } => {
                write!(f, "via {via} dev {ifname}")?;
                if *onlink {
                    write!(f, " onlink")?;
                }
                Ok(())
            }
            RouteTarget::Unrecognised { description } => write!(f, "unrecognised ({description})"),
        }
    }
}

/// One route tortie wants in the main table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredRoute {
    pub target: RouteTarget,
    pub kind: RouteKind,
}

/// A permanent neighbour entry on a VXLAN device: remote VTEP IP → remote VTEP MAC.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Neighbour {
    pub ifname: String,
    pub ip: IpAddr,
    pub mac: [u8; 6],
}

/// A permanent FDB entry on a VXLAN device: remote VTEP MAC → remote node's underlay address.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FdbEntry {
    pub ifname: String,
    pub mac: [u8; 6],
    pub dst: IpAddr,
}

/// A tunnel device tortie owns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceSpec {
    Ipip {
        name: String,
        mtu: u32,
        addr: Ipv4Addr,
    },
    Vxlan {
        name: String,
        vni: u32,
        port: u16,
        local: IpAddr,
        /// Underlay device (the uplink).
        underlay: String,
        mtu: u32,
        mac: [u8; 6],
        addr: IpAddr,
    },
}

impl DeviceSpec {
    pub fn name(&self) -> &str {
        match self {
            DeviceSpec::Ipip { name, .. } | DeviceSpec::Vxlan { name, .. } => name,
        }
    }

    pub fn mtu(&self) -> u32 {
        match self {
            DeviceSpec::Ipip { mtu, .. } | DeviceSpec::Vxlan { mtu, .. } => *mtu,
        }
    }

    /// The tunnel address, always configured as a host prefix (/32 or /128).
    pub fn addr(&self) -> IpNet {
        match self {
            DeviceSpec::Ipip { addr, .. } => IpNet::from(IpAddr::V4(*addr)),
            DeviceSpec::Vxlan { addr, .. } => IpNet::from(*addr),
        }
    }
}

/// A desired route the inputs asked for but that cannot be built yet, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    pub cidr: IpNet,
    pub reason: String,
}

/// Everything tortie wants in the kernel, computed purely from [`Inputs`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DesiredState {
    pub routes: BTreeMap<IpNet, DesiredRoute>,
    pub devices: Vec<DeviceSpec>,
    pub neighbours: BTreeSet<Neighbour>,
    pub fdb: BTreeSet<FdbEntry>,
    pub skipped: Vec<Skipped>,
}

/// Formats a MAC as `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    let [a, b, c, d, e, g] = mac;
    format!("{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
}

/// The VTEP MAC a node's VXLAN device gets: a hash of the node name (and the family, so the
/// IPv4 and IPv6 devices differ), marked locally administered and unicast. Stable across
/// restarts, so peers' neighbour entries stay right; the agent publishes it for other nodes.
pub fn vtep_mac_for(node_name: &str, ipv6: bool) -> [u8; 6] {
    // FNV-1a: tiny, deterministic across platforms and Rust versions (unlike std's hasher).
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let suffix: &[u8] = if ipv6 { b"/vxlan-v6" } else { b"/vxlan" };
    for byte in node_name.as_bytes().iter().chain(suffix) {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    let b = hash.to_be_bytes();
    [(b[0] & 0xfe) | 0x02, b[1], b[2], b[3], b[4], b[5]]
}
