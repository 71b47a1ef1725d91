//! Translation between tortie's kernel objects and netlink-packet-route's typed messages.

use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{
    InfoData, InfoKind, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteHeader, RouteMessage, RouteProtocol, RouteScope,
    RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};

use crate::model::{DeviceSpec, RouteTarget};

pub const MAIN_TABLE: u8 = RouteHeader::RT_TABLE_MAIN;
/// The metric the kernel gives IPv6 routes added without one; set explicitly so tortie's
/// replace and delete requests match the route it added.
pub const IPV6_DEFAULT_METRIC: u32 = 1024;

fn family_of(ip: IpAddr) -> AddressFamily {
    if ip.is_ipv6() {
        AddressFamily::Inet6
    } else {
        AddressFamily::Inet
    }
}

/// The header and destination shared by route add, replace and delete.
fn route_base(dst: &IpNet, protocol: u8) -> RouteMessage {
    let mut msg = RouteMessage::default();
    msg.header.address_family = family_of(dst.addr());
    msg.header.destination_prefix_length = dst.prefix_len();
    msg.header.table = MAIN_TABLE;
    msg.header.protocol = RouteProtocol::from(protocol);
    if dst.prefix_len() > 0 {
        msg.attributes
            .push(RouteAttribute::Destination(RouteAddress::from(dst.addr())));
    }
    if dst.addr().is_ipv6() {
        msg.attributes
            .push(RouteAttribute::Priority(IPV6_DEFAULT_METRIC));
    }
    msg
}

/// `RTM_NEWROUTE` body for `dst` → `target`; `oif` is the resolved interface index.
pub fn route_message(
    dst: &IpNet,
    target: &RouteTarget,
    oif: Option<u32>,
    protocol: u8,
) -> RouteMessage {
    let mut msg = route_base(dst, protocol);
    match target {
        RouteTarget::Blackhole => {
            msg.header.kind = RouteType::BlackHole;
            msg.header.scope = RouteScope::Universe;
        }
        RouteTarget::Device { .. } => {
            msg.header.kind = RouteType::Unicast;
            // IPv6 has no route scopes: the kernel reports universe whatever was asked.
            msg.header.scope = if dst.addr().is_ipv6() {
                RouteScope::Universe
            } else {
                RouteScope::Link
            };
        }
        RouteTarget::Gateway { via, onlink, .. } => {
            msg.header.kind = RouteType::Unicast;
            msg.header.scope = RouteScope::Universe;
            msg.attributes
                .push(RouteAttribute::Gateway(RouteAddress::from(*via)));
            if *onlink {
                msg.header.flags |= RouteFlags::Onlink;
            }
        }
        RouteTarget::Unrecognised { .. } => {}
    }
    if let Some(oif) = oif {
        msg.attributes.push(RouteAttribute::Oif(oif));
    }
    msg
}

/// `RTM_DELROUTE` body: matches only a main-table route of tortie's protocol at `dst`, so a
/// delete can never remove somebody else's route.
pub fn route_delete_message(dst: &IpNet, protocol: u8) -> RouteMessage {
    let mut msg = route_base(dst, protocol);
    msg.header.scope = RouteScope::NoWhere;
    msg
}

/// A route dump request filtered (with strict checking) to one family, the main table and,
/// if given, one protocol.
pub fn route_dump_request(v6: bool, protocol: Option<u8>) -> RouteNetlinkMessage {
    let mut msg = RouteMessage::default();
    msg.header.address_family = if v6 {
        AddressFamily::Inet6
    } else {
        AddressFamily::Inet
    };
    msg.header.table = MAIN_TABLE;
    if let Some(p) = protocol {
        msg.header.protocol = RouteProtocol::from(p);
    }
    RouteNetlinkMessage::GetRoute(msg)
}

/// A route as the kernel reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelRoute {
    pub dst: IpNet,
    pub target: RouteTarget,
    pub protocol: u8,
    pub priority: u32,
}

/// Decodes a main-table unicast/blackhole route; `None` for other tables, cloned or cache
/// entries, and anything tortie never manages.
pub fn parse_route(
    msg: &RouteMessage,
    name_of: impl Fn(u32) -> Option<Arc<str>>,
) -> Option<KernelRoute> {
    let h = &msg.header;
    let mut table = u32::from(h.table);
    let mut dst_addr = None;
    let mut gateway = None;
    let mut oif = None;
    let mut priority = 0;
    let mut multipath = false;
    for attr in &msg.attributes {
        match attr {
            RouteAttribute::Table(t) => table = *t,
            RouteAttribute::Destination(a) => dst_addr = route_address(a),
            RouteAttribute::Gateway(a) => gateway = route_address(a),
            RouteAttribute::Oif(i) => oif = Some(*i),
            RouteAttribute::Priority(p) => priority = *p,
            RouteAttribute::MultiPath(_) => multipath = true,
            _ => {}
        }
    }
    if table != u32::from(MAIN_TABLE) {
        return None;
    }
    let dst_addr = match (dst_addr, h.address_family) {
        (Some(a), _) => a,
        (None, AddressFamily::Inet) => IpAddr::from([0u8; 4]),
        (None, AddressFamily::Inet6) => IpAddr::from([0u16; 8]),
        _ => return None,
    };
    let dst = IpNet::new(dst_addr, h.destination_prefix_length).ok()?;
    let ifname = |i: u32| name_of(i).unwrap_or_else(|| Arc::from(format!("if#{i}").as_str()));
    let target = match (h.kind, gateway, oif) {
        (RouteType::BlackHole, _, _) => RouteTarget::Blackhole,
        _ if multipath => RouteTarget::Unrecognised {
            description: "multipath".into(),
        },
        (RouteType::Unicast, Some(via), Some(i)) => RouteTarget::Gateway {
            via,
            ifname: ifname(i),
            onlink: h.flags.contains(RouteFlags::Onlink),
        },
        (RouteType::Unicast, None, Some(i)) => RouteTarget::Device { ifname: ifname(i) },
        (kind, _, _) => RouteTarget::Unrecognised {
            description: format!("type {}", u8::from(kind)),
        },
    };
    Some(KernelRoute {
        dst,
        target,
        protocol: u8::from(h.protocol),
        priority,
    })
}

fn route_address(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

/// Permanent neighbour (ARP/NDP) entry: VTEP IP → VTEP MAC on `ifindex`.
pub fn neighbour_message(ifindex: u32, ip: IpAddr, mac: [u8; 6]) -> NeighbourMessage {
    let mut msg = NeighbourMessage::default();
    msg.header.family = family_of(ip);
    msg.header.ifindex = ifindex;
    msg.header.state = NeighbourState::Permanent;
    msg.attributes
        .push(NeighbourAttribute::Destination(NeighbourAddress::from(ip)));
    msg.attributes
        .push(NeighbourAttribute::LinkLayerAddress(mac.to_vec()));
    msg
}

/// Permanent FDB entry on a VXLAN device: VTEP MAC → remote node underlay address.
pub fn fdb_message(ifindex: u32, mac: [u8; 6], dst: IpAddr) -> NeighbourMessage {
    let mut msg = NeighbourMessage::default();
    msg.header.family = AddressFamily::Bridge;
    msg.header.ifindex = ifindex;
    msg.header.state = NeighbourState::Permanent;
    msg.header.flags = NeighbourFlags::Own;
    msg.attributes
        .push(NeighbourAttribute::LinkLayerAddress(mac.to_vec()));
    msg.attributes
        .push(NeighbourAttribute::Destination(NeighbourAddress::from(dst)));
    msg
}

pub fn neighbour_dump_request(family: AddressFamily) -> RouteNetlinkMessage {
    let mut msg = NeighbourMessage::default();
    msg.header.family = family;
    RouteNetlinkMessage::GetNeighbour(msg)
}

/// A neighbour or FDB entry as the kernel reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelNeighbour {
    pub bridge: bool,
    pub ifindex: u32,
    pub ip: Option<IpAddr>,
    pub mac: Option<[u8; 6]>,
    pub permanent: bool,
}

pub fn parse_neighbour(msg: &NeighbourMessage) -> KernelNeighbour {
    let mut ip = None;
    let mut mac = None;
    for attr in &msg.attributes {
        match attr {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(a)) => ip = Some(IpAddr::V4(*a)),
            NeighbourAttribute::Destination(NeighbourAddress::Inet6(a)) => {
                ip = Some(IpAddr::V6(*a))
            }
            NeighbourAttribute::Destination(NeighbourAddress::Other(b)) => {
                ip = match b.len() {
                    4 => Some(IpAddr::from([b[0], b[1], b[2], b[3]])),
                    16 => <[u8; 16]>::try_from(b.as_slice()).ok().map(IpAddr::from),
                    _ => None,
                }
            }
            NeighbourAttribute::LinkLayerAddress(b) => mac = <[u8; 6]>::try_from(b.as_slice()).ok(),
            _ => {}
        }
    }
    KernelNeighbour {
        bridge: msg.header.family == AddressFamily::Bridge,
        ifindex: msg.header.ifindex,
        ip,
        mac,
        permanent: msg.header.state == NeighbourState::Permanent,
    }
}

/// What tortie needs to know about a link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelLink {
    pub index: u32,
    pub name: Arc<str>,
    pub up: bool,
    pub mtu: u32,
    pub mac: Option<[u8; 6]>,
    pub kind: Option<String>,
    pub vxlan: Option<VxlanParams>,
}

/// The VXLAN settings tortie checks; changing any of them needs a new device.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct VxlanParams {
    pub vni: Option<u32>,
    pub port: Option<u16>,
    pub local: Option<IpAddr>,
    pub learning: Option<bool>,
}

pub fn parse_link(msg: &LinkMessage) -> Option<KernelLink> {
    let mut name = None;
    let mut mtu = 0;
    let mut mac = None;
    let mut kind = None;
    let mut vxlan = None;
    for attr in &msg.attributes {
        match attr {
            LinkAttribute::IfName(n) => name = Some(Arc::from(n.as_str())),
            LinkAttribute::Mtu(m) => mtu = *m,
            LinkAttribute::Address(a) => mac = <[u8; 6]>::try_from(a.as_slice()).ok(),
            LinkAttribute::LinkInfo(infos) => {
                for info in infos {
                    match info {
                        LinkInfo::Kind(k) => kind = Some(k.to_string()),
                        LinkInfo::Data(InfoData::Vxlan(v)) => {
                            let mut p = VxlanParams::default();
                            for item in v {
                                match item {
                                    InfoVxlan::Id(id) => p.vni = Some(*id),
                                    InfoVxlan::Port(port) => p.port = Some(*port),
                                    InfoVxlan::Local(a) => p.local = Some(IpAddr::V4(*a)),
                                    InfoVxlan::Local6(a) => p.local = Some(IpAddr::V6(*a)),
                                    InfoVxlan::Learning(l) => p.learning = Some(*l),
                                    _ => {}
                                }
                            }
                            vxlan = Some(p);
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    Some(KernelLink {
        index: msg.header.index,
        name: name?,
        up: msg.header.flags.contains(LinkFlags::Up),
        mtu,
        mac,
        kind,
        vxlan,
    })
}

pub fn link_dump_request() -> RouteNetlinkMessage {
    RouteNetlinkMessage::GetLink(LinkMessage::default())
}

/// `RTM_NEWLINK` creating a tunnel device (down; [`link_set_message`] brings it up).
pub fn link_create_message(spec: &DeviceSpec, underlay_index: Option<u32>) -> LinkMessage {
    let mut msg = LinkMessage::default();
    msg.attributes
        .push(LinkAttribute::IfName(spec.name().to_string()));
    msg.attributes.push(LinkAttribute::Mtu(spec.mtu()));
    match spec {
        DeviceSpec::Ipip { .. } => {
            msg.attributes
                .push(LinkAttribute::LinkInfo(vec![LinkInfo::Kind(
                    InfoKind::IpIp,
                )]));
        }
        DeviceSpec::Vxlan {
            vni,
            port,
            local,
            mac,
            ..
        } => {
            msg.attributes.push(LinkAttribute::Address(mac.to_vec()));
            let mut data = vec![InfoVxlan::Id(*vni)];
            data.push(match local {
                IpAddr::V4(a) => InfoVxlan::Local(*a),
                IpAddr::V6(a) => InfoVxlan::Local6(*a),
            });
            data.push(InfoVxlan::Port(*port));
            data.push(InfoVxlan::Learning(false));
            if let Some(i) = underlay_index {
                data.push(InfoVxlan::Link(i));
            }
            msg.attributes.push(LinkAttribute::LinkInfo(vec![
                LinkInfo::Kind(InfoKind::Vxlan),
                LinkInfo::Data(InfoData::Vxlan(data)),
            ]));
        }
    }
    msg
}

/// `RTM_NEWLINK` on an existing index setting MTU, MAC (if given) and administrative state.
pub fn link_set_message(index: u32, mtu: u32, mac: Option<[u8; 6]>, up: bool) -> LinkMessage {
    let mut msg = LinkMessage::default();
    msg.header.index = index;
    msg.header.change_mask = LinkFlags::Up;
    if up {
        msg.header.flags = LinkFlags::Up;
    }
    msg.attributes.push(LinkAttribute::Mtu(mtu));
    if let Some(mac) = mac {
        msg.attributes.push(LinkAttribute::Address(mac.to_vec()));
    }
    msg
}

pub fn link_delete_message(index: u32) -> LinkMessage {
    let mut msg = LinkMessage::default();
    msg.header.index = index;
    msg
}

/// `RTM_NEWADDR`/`RTM_DELADDR` body for a host-prefix tunnel address.
pub fn address_message(index: u32, addr: IpNet) -> AddressMessage {
    let mut msg = AddressMessage::default();
    msg.header.family = family_of(addr.addr());
    msg.header.prefix_len = addr.prefix_len();
    msg.header.index = index;
    msg.attributes.push(AddressAttribute::Local(addr.addr()));
    msg.attributes.push(AddressAttribute::Address(addr.addr()));
    msg
}

pub fn address_dump_request() -> RouteNetlinkMessage {
    RouteNetlinkMessage::GetAddress(AddressMessage::default())
}

/// An interface address: its link index and prefix.
pub fn parse_address(msg: &AddressMessage) -> Option<(u32, IpNet)> {
    let mut addr = None;
    let mut local = None;
    for attr in &msg.attributes {
        match attr {
            AddressAttribute::Address(a) => addr = Some(*a),
            AddressAttribute::Local(a) => local = Some(*a),
            _ => {}
        }
    }
    // For IPv4 IFA_LOCAL is the interface's own address (IFA_ADDRESS is the peer on p2p links).
    let ip = local.or(addr)?;
    Some((
        msg.header.index,
        IpNet::new(ip, msg.header.prefix_len).ok()?,
    ))
}
