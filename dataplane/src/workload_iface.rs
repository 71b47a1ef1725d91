//! A pod's veth, wired the way Calico's CNI plugin wires it: the host end (`cali…`) in the
//! calling thread's namespace, the pod end created directly inside the pod's namespace, its
//! `/32`/`/128` and the link-local gateway routes. Only netlink and `/proc/sys`, no `ip`.
//!
//! ```text
//!   host netns                               pod netns (CNI_NETNS)
//!   cali0123456789a  ◄──── veth ────►  eth0  10.0.0.5/32, fd00::5/128
//!   ee:ee:ee:ee:ee:ee                        169.254.1.1 dev eth0 scope link
//!   proxy_arp=1 forwarding=1                 default via 169.254.1.1 dev eth0
//!   (IPv6: link-local fe80::ecee:eeff:feee:eeee, default via fe80::ecee:eeff:feee:eeee dev eth0
//!    proxy_ndp=1 accept_ra=0)
//! ```
//!
//! The host `/32` route towards the pod is not made here: it is the dataplane reconciler's,
//! installed when the agent learns of the workload.

use std::fs::File;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ipnet::IpNet;
use netlink_packet_core::{NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_packet_route::address::{AddressAttribute, AddressFlags, AddressHeaderFlags};
use netlink_packet_route::link::{InfoData, InfoKind, InfoVeth, LinkAttribute, LinkFlags};
use netlink_packet_route::link::{LinkInfo, LinkMessage};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::{AddressFamily, route::RouteHeader};

use crate::messages::{self, KernelRoute};
use crate::socket::{BatchSocket, Nack, Request, SocketError};

/// The host end's MAC: every pod sees the same gateway MAC, so a pod moved between nodes or a
/// re-created veth never needs a new neighbour entry (Calico uses the same address).
pub const HOST_MAC: [u8; 6] = [0xee; 6];
/// The pod's IPv4 next hop; nobody owns it, proxy ARP on the host end answers for it.
pub const IPV4_GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
/// The host end's EUI-64 link-local address, derived from [`HOST_MAC`]; the pod's IPv6 next hop.
pub const IPV6_GATEWAY: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0xecee, 0xeeff, 0xfeee, 0xeeee);
/// Linux's IFNAMSIZ less the terminating NUL.
pub const MAX_IFNAME_LEN: usize = 15;
/// Routes inside the pod are marked the way `ip route add` marks them (RTPROT_BOOT), so they
/// never look like the reconciler's own (protocol 84) to anybody reading the table.
const POD_ROUTE_PROTOCOL: RouteProtocol = RouteProtocol::Boot;

/// Where an operation ran: the host (the caller's namespace) or a pod's namespace file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Place {
    Host,
    Netns(PathBuf),
}

impl std::fmt::Display for Place {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Place::Host => write!(f, "the host namespace"),
            Place::Netns(p) => write!(f, "netns {}", p.display()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WorkloadIfaceError {
    #[error("network namespace {} does not exist", path.display())]
    NetnsMissing { path: PathBuf },
    #[error("opening network namespace {}: {source}", path.display())]
    OpenNetns {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("entering network namespace {}: {source}", path.display())]
    EnterNetns {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("interface name {name:?} is not usable: {reason}")]
    BadName { name: String, reason: &'static str },
    #[error("{op} {ifname} in {place}: {nack}")]
    Netlink {
        op: &'static str,
        ifname: String,
        place: Place,
        nack: Nack,
    },
    #[error("netlink socket in {place}: {source}")]
    Socket {
        place: Place,
        #[source]
        source: SocketError,
    },
    #[error("setting {path} to {value} in {place}: {source}")]
    Sysctl {
        path: String,
        value: &'static str,
        place: Place,
        #[source]
        source: io::Error,
    },
    #[error("interface {ifname} vanished from {place} while it was being set up")]
    Vanished { ifname: String, place: Place },
}

impl WorkloadIfaceError {
    /// The kernel's errno, when the kernel refused something.
    pub fn errno(&self) -> Option<i32> {
        match self {
            WorkloadIfaceError::Netlink { nack, .. } => Some(nack.errno),
            WorkloadIfaceError::Sysctl { source, .. }
            | WorkloadIfaceError::OpenNetns { source, .. }
            | WorkloadIfaceError::EnterNetns { source, .. } => source.raw_os_error(),
            WorkloadIfaceError::Socket {
                source: SocketError::Kernel { errno, .. },
                ..
            } => Some(*errno),
            _ => None,
        }
    }
}

/// What to build for one pod.
#[derive(Debug, Clone)]
pub struct WorkloadIfaceSpec {
    /// The pod's network namespace file (CNI_NETNS).
    pub netns: PathBuf,
    /// The host end's name (`cali` + 11 hex digits).
    pub host_if: String,
    /// The pod end's name (CNI_IFNAME).
    pub container_if: String,
    pub mtu: u32,
    /// At most one address per family is expected; each becomes a `/32` or `/128`.
    pub ips: Vec<IpAddr>,
}

/// What was built: both ends' indexes and MACs, for the CNI result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkloadIface {
    pub host_if: String,
    pub host_index: u32,
    pub host_mac: [u8; 6],
    pub container_if: String,
    pub container_index: u32,
    pub container_mac: Option<[u8; 6]>,
}

/// One interface as seen inside a namespace, with its addresses and the routes through it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IfaceState {
    pub name: String,
    pub index: u32,
    pub up: bool,
    pub mtu: u32,
    pub mac: Option<[u8; 6]>,
    pub kind: Option<String>,
    pub addresses: Vec<IpNet>,
    /// Main-table routes whose output interface is this one.
    pub routes: Vec<KernelRoute>,
}

/// Rejects names the kernel would refuse or that would escape a `/proc/sys` path.
pub fn validate_ifname(name: &str) -> Result<(), WorkloadIfaceError> {
    let bad = |reason| {
        Err(WorkloadIfaceError::BadName {
            name: name.to_owned(),
            reason,
        })
    };
    if name.is_empty() {
        return bad("empty");
    }
    if name.len() > MAX_IFNAME_LEN {
        return bad("longer than 15 bytes");
    }
    if name == "." || name == ".." {
        return bad("reserved name");
    }
    if name
        .bytes()
        .any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace() || b == 0)
    {
        return bad("contains '/', ':', whitespace or NUL");
    }
    Ok(())
}

/// Runs `f` on a short-lived thread that has joined the network namespace at `netns`, so
/// netlink sockets it opens and `/proc/sys/net` paths it writes belong to that namespace.
pub fn in_netns<R, F>(netns: &Path, f: F) -> Result<R, WorkloadIfaceError>
where
    F: FnOnce() -> Result<R, WorkloadIfaceError> + Send,
    R: Send,
{
    let file = open_netns(netns)?;
    std::thread::scope(|scope| {
        let joined = scope
            .spawn(|| {
                // SAFETY: setns(2) on this thread only, with a namespace fd that `file` keeps open.
                let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                if rc != 0 {
                    return Err(WorkloadIfaceError::EnterNetns {
                        path: netns.to_owned(),
                        source: io::Error::last_os_error(),
                    });
                }
                f()
            })
            .join();
        match joined {
            Ok(r) => r,
            Err(_) => Err(WorkloadIfaceError::EnterNetns {
                path: netns.to_owned(),
                source: io::Error::other("the thread inside the namespace panicked"),
            }),
        }
    })
}

fn open_netns(netns: &Path) -> Result<File, WorkloadIfaceError> {
    File::open(netns).map_err(|source| {
        if source.kind() == io::ErrorKind::NotFound {
            WorkloadIfaceError::NetnsMissing {
                path: netns.to_owned(),
            }
        } else {
            WorkloadIfaceError::OpenNetns {
                path: netns.to_owned(),
                source,
            }
        }
    })
}

fn open_socket(place: &Place) -> Result<BatchSocket, WorkloadIfaceError> {
    BatchSocket::open().map_err(|source| WorkloadIfaceError::Socket {
        place: place.clone(),
        source,
    })
}

/// Writes a `/proc/sys` value unless it already holds it: writes to `forwarding` and
/// `disable_ipv6` take the RTNL lock (spinning on a trylock), which many concurrent ADDs
/// contend for, and new links usually inherit the wanted value from `conf/default`.
fn write_sysctl(
    place: &Place,
    path: String,
    value: &'static str,
) -> Result<(), WorkloadIfaceError> {
    if std::fs::read_to_string(&path).is_ok_and(|current| current.trim() == value) {
        return Ok(());
    }
    std::fs::write(&path, value).map_err(|source| WorkloadIfaceError::Sysctl {
        path,
        value,
        place: place.clone(),
        source,
    })
}

/// The index of `name` in the calling thread's namespace, `None` when there is no such link.
fn index_of(name: &str) -> Option<u32> {
    let c_name = std::ffi::CString::new(name).ok()?;
    // SAFETY: if_nametoindex reads a NUL-terminated string that lives across the call.
    let index = unsafe { libc::if_nametoindex(c_name.as_ptr()) };
    (index != 0).then_some(index)
}

/// Creates the veth pair for one pod and configures both ends. On error, whatever was made
/// is left for the caller to remove with [`delete_host_iface`] (deleting the host end takes
/// the pod end with it).
pub fn create(spec: &WorkloadIfaceSpec) -> Result<WorkloadIface, WorkloadIfaceError> {
    validate_ifname(&spec.host_if)?;
    validate_ifname(&spec.container_if)?;
    let has_v4 = spec.ips.iter().any(IpAddr::is_ipv4);
    let has_v6 = spec.ips.iter().any(IpAddr::is_ipv6);
    let host = Place::Host;
    let netns_file = open_netns(&spec.netns)?;
    let mut sock = open_socket(&host)?;

    let netlink_err = |op, ifname: &str, place: &Place| {
        let ifname = ifname.to_owned();
        let place = place.clone();
        move |nack| WorkloadIfaceError::Netlink {
            op,
            ifname,
            place,
            nack,
        }
    };
    sock.request(
        RouteNetlinkMessage::NewLink(veth_create_message(spec, &netns_file)),
        NLM_F_CREATE | NLM_F_EXCL,
    )
    .map_err(netlink_err("creating veth", &spec.host_if, &host))?;
    drop(netns_file);

    // Sysctls before the link goes up: an IPv4-only host end must never get a link-local.
    host_sysctls(&spec.host_if, has_v4, has_v6)?;
    let host_index = index_of(&spec.host_if).ok_or_else(|| WorkloadIfaceError::Vanished {
        ifname: spec.host_if.clone(),
        place: host.clone(),
    })?;
    sock.request(RouteNetlinkMessage::SetLink(link_up_message(host_index)), 0)
        .map_err(netlink_err("setting up", &spec.host_if, &host))?;

    let (container_index, container_mac) = in_netns(&spec.netns, || configure_container(spec))?;
    Ok(WorkloadIface {
        host_if: spec.host_if.clone(),
        host_index,
        host_mac: HOST_MAC,
        container_if: spec.container_if.clone(),
        container_index,
        container_mac,
    })
}

/// `RTM_NEWLINK` for the pair: host end down with its MAC and MTU, peer named and placed in
/// the pod's namespace in the same request (IFLA_NET_NS_FD inside VETH_INFO_PEER).
fn veth_create_message(spec: &WorkloadIfaceSpec, netns: &File) -> LinkMessage {
    let mut peer = LinkMessage::default();
    peer.attributes
        .push(LinkAttribute::IfName(spec.container_if.clone()));
    peer.attributes.push(LinkAttribute::Mtu(spec.mtu));
    peer.attributes
        .push(LinkAttribute::NetNsFd(netns.as_raw_fd()));

    let mut msg = LinkMessage::default();
    msg.attributes
        .push(LinkAttribute::IfName(spec.host_if.clone()));
    msg.attributes.push(LinkAttribute::Mtu(spec.mtu));
    msg.attributes
        .push(LinkAttribute::Address(HOST_MAC.to_vec()));
    msg.attributes.push(LinkAttribute::LinkInfo(vec![
        LinkInfo::Kind(InfoKind::Veth),
        LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(peer))),
    ]));
    msg
}

fn link_up_message(index: u32) -> LinkMessage {
    let mut msg = LinkMessage::default();
    msg.header.index = index;
    msg.header.flags = LinkFlags::Up;
    msg.header.change_mask = LinkFlags::Up;
    msg
}

/// The host end's sysctls, Calico's set: proxy ARP answers for 169.254.1.1 without delay,
/// forwarding from the pod; with IPv6, proxy NDP, forwarding, no RA and no DAD, keeping only
/// the link-local the pod routes through. IPv4-only pods get IPv6 off on the host end, so it
/// carries no IPv6 address at all.
fn host_sysctls(ifname: &str, has_v4: bool, has_v6: bool) -> Result<(), WorkloadIfaceError> {
    let host = Place::Host;
    if has_v4 {
        write_sysctl(
            &host,
            format!("/proc/sys/net/ipv4/conf/{ifname}/proxy_arp"),
            "1",
        )?;
        write_sysctl(
            &host,
            format!("/proc/sys/net/ipv4/neigh/{ifname}/proxy_delay"),
            "0",
        )?;
        write_sysctl(
            &host,
            format!("/proc/sys/net/ipv4/conf/{ifname}/forwarding"),
            "1",
        )?;
    }
    let v6 = format!("/proc/sys/net/ipv6/conf/{ifname}");
    if !Path::new(&v6).exists() {
        // IPv6 is compiled out or disabled on the kernel command line: nothing to switch.
        return Ok(());
    }
    if has_v6 {
        write_sysctl(&host, format!("{v6}/disable_ipv6"), "0")?;
        write_sysctl(&host, format!("{v6}/accept_ra"), "0")?;
        write_sysctl(&host, format!("{v6}/accept_dad"), "0")?;
        write_sysctl(&host, format!("{v6}/proxy_ndp"), "1")?;
        write_sysctl(&host, format!("{v6}/forwarding"), "1")?;
    } else {
        write_sysctl(&host, format!("{v6}/disable_ipv6"), "1")?;
    }
    Ok(())
}

/// Runs inside the pod's namespace: IPv6 on (if needed), link up, addresses, gateway routes.
fn configure_container(
    spec: &WorkloadIfaceSpec,
) -> Result<(u32, Option<[u8; 6]>), WorkloadIfaceError> {
    let place = Place::Netns(spec.netns.clone());
    let ifname = &spec.container_if;
    let has_v6 = spec.ips.iter().any(IpAddr::is_ipv6);
    let index = index_of(ifname).ok_or_else(|| WorkloadIfaceError::Vanished {
        ifname: ifname.clone(),
        place: place.clone(),
    })?;
    if has_v6 {
        // Without these the pod end gets no IPv6 at all; DAD would hold the /128 back for
        // a second on a link where nothing else can own it.
        for scope in ["all", "default", "lo", ifname.as_str()] {
            write_sysctl(
                &place,
                format!("/proc/sys/net/ipv6/conf/{scope}/disable_ipv6"),
                "0",
            )?;
        }
        write_sysctl(
            &place,
            format!("/proc/sys/net/ipv6/conf/{ifname}/accept_dad"),
            "0",
        )?;
    }

    // Not at creation: the kernel refuses to open a veth end before its peer is linked
    // (ENOTCONN), and the pod end is created first.
    let mut requests = vec![(
        "setting up",
        Request {
            message: RouteNetlinkMessage::SetLink(link_up_message(index)),
            flags: 0,
        },
    )];
    for ip in &spec.ips {
        requests.push((
            "adding an address to",
            Request {
                message: RouteNetlinkMessage::NewAddress(pod_address_message(index, *ip)),
                flags: NLM_F_CREATE | NLM_F_REPLACE,
            },
        ));
    }
    for route in pod_routes(&spec.ips, index) {
        requests.push((
            "adding a route via",
            Request {
                message: RouteNetlinkMessage::NewRoute(route),
                flags: NLM_F_CREATE | NLM_F_REPLACE,
            },
        ));
    }
    let mut sock = open_socket(&place)?;
    let (ops, batch): (Vec<_>, Vec<_>) = requests.into_iter().unzip();
    let results = sock
        .batch(batch)
        .map_err(|source| WorkloadIfaceError::Socket {
            place: place.clone(),
            source,
        })?;
    if let Some((op, nack)) = ops
        .into_iter()
        .zip(results)
        .find_map(|(op, r)| r.map(|nack| (op, nack)))
    {
        return Err(WorkloadIfaceError::Netlink {
            op,
            ifname: ifname.clone(),
            place,
            nack,
        });
    }
    let mac = dump_links(&mut sock, &place)?
        .into_iter()
        .find(|l| l.index == index)
        .and_then(|l| l.mac);
    Ok((index, mac))
}

/// `RTM_NEWADDR` for the pod's `/32` or `/128` (IPv6 without DAD).
fn pod_address_message(index: u32, ip: IpAddr) -> netlink_packet_route::address::AddressMessage {
    // IpNet::from(ip) is the host prefix: /32 or /128.
    let mut msg = messages::address_message(index, IpNet::from(ip));
    if ip.is_ipv6() {
        msg.header.flags = AddressHeaderFlags::Nodad;
        msg.attributes
            .push(AddressAttribute::Flags(AddressFlags::Nodad));
    }
    msg
}

/// The pod's routes: `169.254.1.1 scope link` and `default via 169.254.1.1` for IPv4,
/// `default via fe80::ecee:eeff:feee:eeee` for IPv6, all through the pod end.
fn pod_routes(ips: &[IpAddr], index: u32) -> Vec<RouteMessage> {
    let base = |v6: bool, scope: RouteScope| {
        let mut msg = RouteMessage::default();
        msg.header.address_family = if v6 {
            AddressFamily::Inet6
        } else {
            AddressFamily::Inet
        };
        msg.header.table = RouteHeader::RT_TABLE_MAIN;
        msg.header.protocol = POD_ROUTE_PROTOCOL;
        msg.header.kind = RouteType::Unicast;
        msg.header.scope = scope;
        msg.attributes.push(RouteAttribute::Oif(index));
        msg
    };
    let mut out = Vec::new();
    if ips.iter().any(IpAddr::is_ipv4) {
        let mut gw = base(false, RouteScope::Link);
        gw.header.destination_prefix_length = 32;
        gw.attributes
            .push(RouteAttribute::Destination(RouteAddress::Inet(
                IPV4_GATEWAY,
            )));
        out.push(gw);
        let mut default = base(false, RouteScope::Universe);
        default
            .attributes
            .push(RouteAttribute::Gateway(RouteAddress::Inet(IPV4_GATEWAY)));
        out.push(default);
    }
    if ips.iter().any(IpAddr::is_ipv6) {
        let mut default = base(true, RouteScope::Universe);
        default
            .attributes
            .push(RouteAttribute::Gateway(RouteAddress::Inet6(IPV6_GATEWAY)));
        default
            .attributes
            .push(RouteAttribute::Priority(messages::IPV6_DEFAULT_METRIC));
        out.push(default);
    }
    out
}

/// Deletes the host end `name` in the calling thread's namespace (the pod end goes with it).
/// Returns whether it existed; a missing interface is success, so DEL can be repeated.
pub fn delete_host_iface(name: &str) -> Result<bool, WorkloadIfaceError> {
    validate_ifname(name)?;
    let host = Place::Host;
    let Some(index) = index_of(name) else {
        return Ok(false);
    };
    let mut sock = open_socket(&host)?;
    match sock.request(
        RouteNetlinkMessage::DelLink(messages::link_delete_message(index)),
        0,
    ) {
        Ok(()) => Ok(true),
        // Gone between the lookup and the delete (a concurrent DEL, or the pod's namespace
        // being torn down): what the caller wanted.
        Err(nack) if nack.errno == libc::ENODEV => Ok(false),
        Err(nack) => Err(WorkloadIfaceError::Netlink {
            op: "deleting",
            ifname: name.to_owned(),
            place: host,
            nack,
        }),
    }
}

/// The interface `ifname` in the calling thread's namespace, `None` when it does not exist.
pub fn inspect_here(ifname: &str, place: &Place) -> Result<Option<IfaceState>, WorkloadIfaceError> {
    let mut sock = open_socket(place)?;
    let links = dump_links(&mut sock, place)?;
    let Some(link) = links.iter().find(|l| &*l.name == ifname) else {
        return Ok(None);
    };
    let socket_err = |source| WorkloadIfaceError::Socket {
        place: place.clone(),
        source,
    };
    let addresses = sock
        .dump("addresses", &messages::address_dump_request())
        .map_err(socket_err)?
        .iter()
        .filter_map(|m| match m {
            RouteNetlinkMessage::NewAddress(a) => messages::parse_address(a),
            _ => None,
        })
        .filter(|(index, _)| *index == link.index)
        .map(|(_, net)| net)
        .collect();
    let names: Vec<(u32, Arc<str>)> = links.iter().map(|l| (l.index, l.name.clone())).collect();
    let name_of = |i: u32| names.iter().find(|(n, _)| *n == i).map(|(_, s)| s.clone());
    let mut routes = Vec::new();
    for v6 in [false, true] {
        for m in sock
            .dump("routes", &messages::route_dump_request(v6, None))
            .map_err(socket_err)?
        {
            if let RouteNetlinkMessage::NewRoute(r) = &m
                && let Some(route) = messages::parse_route(r, name_of)
                && route.target.ifname() == Some(ifname)
            {
                routes.push(route);
            }
        }
    }
    Ok(Some(IfaceState {
        name: ifname.to_owned(),
        index: link.index,
        up: link.up,
        mtu: link.mtu,
        mac: link.mac,
        kind: link.kind.clone(),
        addresses,
        routes,
    }))
}

/// The interface `ifname` inside the namespace at `netns` (for CNI CHECK).
pub fn inspect_in_netns(
    netns: &Path,
    ifname: &str,
) -> Result<Option<IfaceState>, WorkloadIfaceError> {
    let place = Place::Netns(netns.to_owned());
    in_netns(netns, || inspect_here(ifname, &place))
}

fn dump_links(
    sock: &mut BatchSocket,
    place: &Place,
) -> Result<Vec<messages::KernelLink>, WorkloadIfaceError> {
    Ok(sock
        .dump("links", &messages::link_dump_request())
        .map_err(|source| WorkloadIfaceError::Socket {
            place: place.clone(),
            source,
        })?
        .iter()
        .filter_map(|m| match m {
            RouteNetlinkMessage::NewLink(l) => messages::parse_link(l),
            _ => None,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_gateway_is_the_eui64_link_local_of_the_host_mac() {
        // EUI-64: flip the U/L bit of the first octet, insert ff:fe in the middle.
        let mut iid = [0u8; 8];
        iid[..3].copy_from_slice(&HOST_MAC[..3]);
        iid[0] ^= 0x02;
        iid[3] = 0xff;
        iid[4] = 0xfe;
        iid[5..].copy_from_slice(&HOST_MAC[3..]);
        let mut octets = [0u8; 16];
        octets[0] = 0xfe;
        octets[1] = 0x80;
        octets[8..].copy_from_slice(&iid);
        assert_eq!(Ipv6Addr::from(octets), IPV6_GATEWAY);
    }

    #[test]
    fn interface_names_the_kernel_would_refuse_are_rejected() {
        assert!(validate_ifname("eth0").is_ok());
        assert!(validate_ifname("cali0123456789a").is_ok());
        assert!(validate_ifname("cali0123456789ab").is_err());
        assert!(validate_ifname("").is_err());
        assert!(validate_ifname("../all").is_err());
        assert!(validate_ifname("eth 0").is_err());
    }

    #[test]
    fn dual_stack_pod_gets_three_routes_through_its_interface() {
        let ips: Vec<IpAddr> = vec!["10.0.0.5".parse().unwrap(), "fd00::5".parse().unwrap()];
        let routes = pod_routes(&ips, 7);
        assert_eq!(routes.len(), 3);
        assert!(
            routes
                .iter()
                .all(|r| r.attributes.contains(&RouteAttribute::Oif(7)))
        );
        assert_eq!(routes[0].header.scope, RouteScope::Link);
        assert!(
            routes[2]
                .attributes
                .contains(&RouteAttribute::Gateway(RouteAddress::Inet6(IPV6_GATEWAY)))
        );
    }

    #[test]
    fn ipv6_pod_address_skips_duplicate_address_detection() {
        let msg = pod_address_message(3, "fd00::5".parse().unwrap());
        assert_eq!(msg.header.prefix_len, 128);
        assert!(
            msg.attributes
                .contains(&AddressAttribute::Flags(AddressFlags::Nodad))
        );
        let msg = pod_address_message(3, "10.0.0.5".parse().unwrap());
        assert_eq!(msg.header.prefix_len, 32);
    }

    #[test]
    fn missing_netns_is_reported_as_missing() {
        let err = in_netns(Path::new("/nonexistent/netns/x"), || Ok(())).unwrap_err();
        assert!(
            matches!(err, WorkloadIfaceError::NetnsMissing { .. }),
            "{err}"
        );
    }
}
