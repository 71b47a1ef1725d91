//! The pure desired-state computation: inputs → routes, tunnel devices, VXLAN neighbours/FDB.

use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;

use crate::model::{
    Config, DesiredRoute, DesiredState, DeviceSpec, EncapMode, FdbEntry, IPIP_OVERHEAD, InputError,
    Inputs, Neighbour, Pool, RemoteBlock, RouteKind, RouteTarget, Skipped, VXLAN_PORT,
    VXLAN_V4_OVERHEAD, VXLAN_V6_OVERHEAD, VXLAN_VNI, valid_ifname, vtep_mac_for,
};

/// The tunnel a remote block's pool asks for, if any.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Encap {
    None,
    Ipip(EncapMode),
    Vxlan(EncapMode),
}

/// Computes what the kernel should hold. Precedence for one destination: a local workload's
/// host route, then an owned block's blackhole, then a remote block's route.
pub fn desired(inputs: &Inputs, config: &Config) -> Result<DesiredState, InputError> {
    validate(inputs)?;
    let mut state = DesiredState::default();
    let uplink: Arc<str> = Arc::from(inputs.uplink.as_str());

    let needs = |v6: bool, pick: fn(&Pool) -> EncapMode| {
        inputs
            .pools
            .iter()
            .any(|p| p.cidr.addr().is_ipv6() == v6 && pick(p) != EncapMode::Never)
    };
    let ipip_dev = needs(false, |p| p.ipip)
        .then(|| ipip_device(inputs, config, &mut state))
        .flatten();
    let vxlan4_dev = needs(false, |p| p.vxlan)
        .then(|| vxlan_device(inputs, config, false, &mut state))
        .flatten();
    let vxlan6_dev = needs(true, |p| p.vxlan)
        .then(|| vxlan_device(inputs, config, true, &mut state))
        .flatten();
    let ipip_name: Option<Arc<str>> = ipip_dev.as_ref().map(|d| Arc::from(d.name()));
    let vxlan4_name: Option<Arc<str>> = vxlan4_dev.as_ref().map(|d| Arc::from(d.name()));
    let vxlan6_name: Option<Arc<str>> = vxlan6_dev.as_ref().map(|d| Arc::from(d.name()));

    for block in &inputs.remote_blocks {
        let v6 = block.cidr.addr().is_ipv6();
        if v6 != block.node_ip.is_ipv6() {
            state.skipped.push(Skipped {
                cidr: block.cidr,
                reason: format!("next hop {} is of the other address family", block.node_ip),
            });
            continue;
        }
        let across = |mode: EncapMode| match mode {
            EncapMode::Never => false,
            EncapMode::Always => true,
            EncapMode::CrossSubnet => !same_subnet(inputs, block.node_ip),
        };
        let direct = || RouteTarget::Gateway {
            via: block.node_ip,
            ifname: uplink.clone(),
            onlink: false,
        };
        let route = match encap_for(&inputs.pools, block) {
            Encap::Vxlan(mode) if across(mode) => {
                let dev = if v6 { &vxlan6_name } else { &vxlan4_name };
                vxlan_route(inputs, block, dev.as_ref())
            }
            Encap::Ipip(mode) if across(mode) => match &ipip_name {
                Some(dev) => Ok(DesiredRoute {
                    target: RouteTarget::Gateway {
                        via: block.node_ip,
                        ifname: dev.clone(),
                        onlink: true,
                    },
                    kind: RouteKind::Ipip,
                }),
                None => Err("IPIP device missing (no ipip_tunnel_addr)".to_string()),
            },
            _ if off_subnet(inputs, block.node_ip) => Err(format!(
                "next hop {} is outside this node's subnet and the pool has no tunnel",
                block.node_ip
            )),
            _ => Ok(DesiredRoute {
                target: direct(),
                kind: RouteKind::Direct,
            }),
        };
        match route {
            Ok(route) => {
                state.routes.insert(block.cidr, route);
            }
            Err(reason) => state.skipped.push(Skipped {
                cidr: block.cidr,
                reason,
            }),
        }
    }

    for block in &inputs.owned_blocks {
        state.routes.insert(
            *block,
            DesiredRoute {
                target: RouteTarget::Blackhole,
                kind: RouteKind::Blackhole,
            },
        );
    }

    for workload in &inputs.workloads {
        state.routes.insert(
            IpNet::from(workload.ip),
            DesiredRoute {
                target: RouteTarget::Device {
                    ifname: Arc::from(workload.host_if.as_str()),
                },
                kind: RouteKind::Workload,
            },
        );
    }

    // Every known VTEP of the family gets its neighbour and FDB entries (as Felix does), so a
    // CrossSubnet peer that later moves subnet needs only a route replace.
    for dev in [&vxlan4_dev, &vxlan6_dev].into_iter().flatten() {
        let DeviceSpec::Vxlan {
            name, local, addr, ..
        } = dev
        else {
            continue;
        };
        for vtep in &inputs.remote_vteps {
            if vtep.tunnel_addr.is_ipv6() != addr.is_ipv6()
                || vtep.node_ip.is_ipv6() != local.is_ipv6()
                || vtep.node_ip == *local
                || vtep.tunnel_addr == *addr
            {
                continue;
            }
            state.neighbours.insert(Neighbour {
                ifname: name.clone(),
                ip: vtep.tunnel_addr,
                mac: vtep.mac,
            });
            state.fdb.insert(FdbEntry {
                ifname: name.clone(),
                mac: vtep.mac,
                dst: vtep.node_ip,
            });
        }
    }

    state
        .devices
        .extend([ipip_dev, vxlan4_dev, vxlan6_dev].into_iter().flatten());
    Ok(state)
}

impl Inputs {
    /// Checks the inputs without computing anything: the errors [`desired`] would return.
    pub fn validate(&self) -> Result<(), InputError> {
        validate(self)
    }
}

fn validate(inputs: &Inputs) -> Result<(), InputError> {
    if inputs.uplink.is_empty() {
        return Err(InputError::NoUplink);
    }
    for pool in &inputs.pools {
        if pool.ipip != EncapMode::Never && pool.vxlan != EncapMode::Never {
            return Err(InputError::PoolBothEncapsulations { pool: pool.cidr });
        }
        if pool.cidr.addr().is_ipv6() && pool.ipip != EncapMode::Never {
            return Err(InputError::IpipOnIpv6Pool { pool: pool.cidr });
        }
    }
    let tunnels = inputs
        .pools
        .iter()
        .any(|p| p.ipip != EncapMode::Never || p.vxlan != EncapMode::Never);
    if tunnels && inputs.uplink_mtu <= VXLAN_V6_OVERHEAD {
        return Err(InputError::UplinkMtuTooSmall {
            mtu: inputs.uplink_mtu,
            min: VXLAN_V6_OVERHEAD,
        });
    }
    for w in &inputs.workloads {
        if !valid_ifname(&w.host_if) {
            return Err(InputError::BadWorkloadInterface {
                ip: w.ip,
                host_if: w.host_if.clone(),
            });
        }
    }
    Ok(())
}

/// The encapsulation of the most specific pool containing the block; none if no pool does.
fn encap_for(pools: &[Pool], block: &RemoteBlock) -> Encap {
    let pool = pools
        .iter()
        .filter(|p| p.cidr.contains(&block.cidr))
        .max_by_key(|p| p.cidr.prefix_len());
    match pool {
        Some(p) if p.vxlan != EncapMode::Never => Encap::Vxlan(p.vxlan),
        Some(p) if p.ipip != EncapMode::Never => Encap::Ipip(p.ipip),
        _ => Encap::None,
    }
}

/// True when `peer` sits in this node's own subnet. A host-prefix node address (/32, /128)
/// has no subnet, so every peer is across.
fn same_subnet(inputs: &Inputs, peer: IpAddr) -> bool {
    match peer {
        IpAddr::V4(ip) => inputs
            .node_addr_v4
            .is_some_and(|net| net.prefix_len() < 32 && net.contains(&ip)),
        IpAddr::V6(ip) => inputs
            .node_addr_v6
            .is_some_and(|net| net.prefix_len() < 128 && net.contains(&ip)),
    }
}

/// True when this node has a real subnet and `peer` is outside it: a plain `via` route to
/// it would not be on-link, so the kernel refuses it (ENETUNREACH). With a host-prefix node
/// address nothing is known, and the kernel decides.
fn off_subnet(inputs: &Inputs, peer: IpAddr) -> bool {
    let has_subnet = match peer {
        IpAddr::V4(_) => inputs.node_addr_v4.is_some_and(|n| n.prefix_len() < 32),
        IpAddr::V6(_) => inputs.node_addr_v6.is_some_and(|n| n.prefix_len() < 128),
    };
    has_subnet && !same_subnet(inputs, peer)
}

fn vxlan_route(
    inputs: &Inputs,
    block: &RemoteBlock,
    dev: Option<&Arc<str>>,
) -> Result<DesiredRoute, String> {
    let Some(dev) = dev else {
        return Err("VXLAN device missing (no tunnel address or node address)".into());
    };
    let vtep = inputs
        .remote_vteps
        .iter()
        .find(|v| v.node_ip == block.node_ip && v.tunnel_addr.is_ipv6() == block.node_ip.is_ipv6())
        .ok_or_else(|| format!("no VTEP known for node {}", block.node_ip))?;
    Ok(DesiredRoute {
        target: RouteTarget::Gateway {
            via: vtep.tunnel_addr,
            ifname: dev.clone(),
            onlink: true,
        },
        kind: RouteKind::Vxlan,
    })
}

fn ipip_device(inputs: &Inputs, config: &Config, state: &mut DesiredState) -> Option<DeviceSpec> {
    match inputs.ipip_tunnel_addr {
        Some(addr) => Some(DeviceSpec::Ipip {
            name: config.ipip_device.clone(),
            mtu: inputs.uplink_mtu - IPIP_OVERHEAD,
            addr,
        }),
        None => {
            state.skipped.push(Skipped {
                cidr: IpNet::from(IpAddr::from([0, 0, 0, 0])),
                reason: format!(
                    "device {}: inputs.ipip_tunnel_addr is unset",
                    config.ipip_device
                ),
            });
            None
        }
    }
}

fn vxlan_device(
    inputs: &Inputs,
    config: &Config,
    v6: bool,
    state: &mut DesiredState,
) -> Option<DeviceSpec> {
    let (name, local, addr, overhead) = if v6 {
        (
            &config.vxlan_v6_device,
            inputs.node_addr_v6.map(|n| IpAddr::V6(n.addr())),
            inputs.vxlan_tunnel_addr_v6.map(IpAddr::V6),
            VXLAN_V6_OVERHEAD,
        )
    } else {
        (
            &config.vxlan_device,
            inputs.node_addr_v4.map(|n| IpAddr::V4(n.addr())),
            inputs.vxlan_tunnel_addr_v4.map(IpAddr::V4),
            VXLAN_V4_OVERHEAD,
        )
    };
    match (local, addr) {
        (Some(local), Some(addr)) => Some(DeviceSpec::Vxlan {
            name: name.clone(),
            vni: VXLAN_VNI,
            port: VXLAN_PORT,
            local,
            underlay: inputs.uplink.clone(),
            mtu: inputs.uplink_mtu - overhead,
            mac: vtep_mac_for(&inputs.node_name, v6),
            addr,
        }),
        _ => {
            state.skipped.push(Skipped {
                cidr: IpNet::from(if v6 {
                    IpAddr::from([0u16; 8])
                } else {
                    IpAddr::from([0u8; 4])
                }),
                reason: format!("device {name}: node address or VXLAN tunnel address is unset"),
            });
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{RemoteVtep, Workload};

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }
    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// Node 10.0.0.10/24; peer A in the same subnet (10.0.0.20), peer B across (10.1.0.30).
    fn inputs(ipip: EncapMode, vxlan: EncapMode) -> Inputs {
        Inputs {
            node_name: "node-1".into(),
            node_addr_v4: Some("10.0.0.10/24".parse().unwrap()),
            node_addr_v6: Some("fd00::10/64".parse().unwrap()),
            uplink: "eth0".into(),
            uplink_mtu: 1500,
            ipip_tunnel_addr: Some("192.168.1.1".parse().unwrap()),
            vxlan_tunnel_addr_v4: Some("192.168.1.0".parse().unwrap()),
            vxlan_tunnel_addr_v6: Some("fd99::1".parse().unwrap()),
            pools: vec![
                Pool {
                    cidr: net("192.168.0.0/16"),
                    ipip,
                    vxlan,
                },
                Pool {
                    cidr: net("fd99::/48"),
                    ipip: EncapMode::Never,
                    vxlan,
                },
            ],
            workloads: vec![Workload {
                ip: ip("192.168.1.5"),
                host_if: "cali1234".into(),
            }],
            owned_blocks: vec![net("192.168.1.0/26")],
            remote_blocks: vec![
                RemoteBlock {
                    cidr: net("192.168.2.0/26"),
                    node_ip: ip("10.0.0.20"),
                },
                RemoteBlock {
                    cidr: net("192.168.3.0/26"),
                    node_ip: ip("10.1.0.30"),
                },
                RemoteBlock {
                    cidr: net("fd99:0:0:3::/122"),
                    node_ip: ip("fd01::30"),
                },
            ],
            remote_vteps: vec![
                RemoteVtep {
                    node_ip: ip("10.0.0.20"),
                    tunnel_addr: ip("192.168.2.0"),
                    mac: [2, 0, 0, 0, 0, 0x20],
                },
                RemoteVtep {
                    node_ip: ip("10.1.0.30"),
                    tunnel_addr: ip("192.168.3.0"),
                    mac: [2, 0, 0, 0, 0, 0x30],
                },
                RemoteVtep {
                    node_ip: ip("fd01::30"),
                    tunnel_addr: ip("fd99:0:0:3::"),
                    mac: [2, 0, 0, 0, 6, 0x30],
                },
            ],
        }
    }

    fn target(state: &DesiredState, cidr: &str) -> String {
        state.routes[&net(cidr)].target.to_string()
    }

    #[test]
    fn never_routes_every_remote_block_via_its_node_on_the_uplink() {
        let mut i = inputs(EncapMode::Never, EncapMode::Never);
        i.node_addr_v4 = Some("10.0.0.10/15".parse().unwrap());
        i.node_addr_v6 = Some("fd00::10/15".parse().unwrap());
        let s = desired(&i, &Config::default()).unwrap();
        assert_eq!(target(&s, "192.168.2.0/26"), "via 10.0.0.20 dev eth0");
        assert_eq!(target(&s, "192.168.3.0/26"), "via 10.1.0.30 dev eth0");
        assert_eq!(target(&s, "fd99:0:0:3::/122"), "via fd01::30 dev eth0");
        assert!(s.devices.is_empty(), "no tunnel needed: {:?}", s.devices);
        assert!(s.neighbours.is_empty() && s.fdb.is_empty());
    }

    #[test]
    fn unencapsulated_block_behind_a_node_off_this_subnet_is_skipped() {
        let s = desired(
            &inputs(EncapMode::Never, EncapMode::Never),
            &Config::default(),
        )
        .unwrap();
        assert_eq!(target(&s, "192.168.2.0/26"), "via 10.0.0.20 dev eth0");
        assert!(!s.routes.contains_key(&net("192.168.3.0/26")));
        assert!(
            s.skipped
                .iter()
                .any(|k| k.cidr == net("192.168.3.0/26") && k.reason.contains("outside"))
        );
    }

    #[test]
    fn local_workload_gets_a_scope_link_host_route() {
        let s = desired(
            &inputs(EncapMode::Never, EncapMode::Never),
            &Config::default(),
        )
        .unwrap();
        let r = &s.routes[&net("192.168.1.5/32")];
        assert_eq!(r.kind, RouteKind::Workload);
        assert_eq!(r.target.to_string(), "dev cali1234 scope link");
    }

    #[test]
    fn owned_block_is_blackholed() {
        let s = desired(
            &inputs(EncapMode::Never, EncapMode::Never),
            &Config::default(),
        )
        .unwrap();
        assert_eq!(
            s.routes[&net("192.168.1.0/26")].target,
            RouteTarget::Blackhole
        );
    }

    #[test]
    fn ipip_always_tunnels_to_every_peer_onlink() {
        let s = desired(
            &inputs(EncapMode::Always, EncapMode::Never),
            &Config::default(),
        )
        .unwrap();
        assert_eq!(
            target(&s, "192.168.2.0/26"),
            "via 10.0.0.20 dev tunl0 onlink"
        );
        assert_eq!(
            target(&s, "192.168.3.0/26"),
            "via 10.1.0.30 dev tunl0 onlink"
        );
        // IPv6 pools never use IPIP (and fd01::30 is off this node's subnet: no route).
        assert!(!s.routes.contains_key(&net("fd99:0:0:3::/122")));
        assert_eq!(
            s.devices,
            vec![DeviceSpec::Ipip {
                name: "tunl0".into(),
                mtu: 1480,
                addr: "192.168.1.1".parse().unwrap()
            }]
        );
    }

    #[test]
    fn ipip_crosssubnet_keeps_same_segment_peers_direct() {
        let s = desired(
            &inputs(EncapMode::CrossSubnet, EncapMode::Never),
            &Config::default(),
        )
        .unwrap();
        assert_eq!(target(&s, "192.168.2.0/26"), "via 10.0.0.20 dev eth0");
        assert_eq!(
            target(&s, "192.168.3.0/26"),
            "via 10.1.0.30 dev tunl0 onlink"
        );
    }

    #[test]
    fn vxlan_always_routes_via_remote_vtep_with_neighbour_and_fdb() {
        let s = desired(
            &inputs(EncapMode::Never, EncapMode::Always),
            &Config::default(),
        )
        .unwrap();
        assert_eq!(
            target(&s, "192.168.2.0/26"),
            "via 192.168.2.0 dev vxlan.calico onlink"
        );
        assert_eq!(
            target(&s, "192.168.3.0/26"),
            "via 192.168.3.0 dev vxlan.calico onlink"
        );
        assert_eq!(
            target(&s, "fd99:0:0:3::/122"),
            "via fd99:0:0:3:: dev vxlan-v6.calico onlink"
        );
        assert!(s.neighbours.contains(&Neighbour {
            ifname: "vxlan.calico".into(),
            ip: ip("192.168.3.0"),
            mac: [2, 0, 0, 0, 0, 0x30]
        }));
        assert!(s.fdb.contains(&FdbEntry {
            ifname: "vxlan.calico".into(),
            mac: [2, 0, 0, 0, 0, 0x30],
            dst: ip("10.1.0.30")
        }));
        assert_eq!(s.neighbours.len(), 3, "{:?}", s.neighbours);
        assert_eq!(s.fdb.len(), 3);
        let v4 = &s.devices[0];
        assert_eq!(
            v4,
            &DeviceSpec::Vxlan {
                name: "vxlan.calico".into(),
                vni: 4096,
                port: 4789,
                local: ip("10.0.0.10"),
                underlay: "eth0".into(),
                mtu: 1450,
                mac: vtep_mac_for("node-1", false),
                addr: ip("192.168.1.0"),
            }
        );
        assert_eq!(s.devices[1].mtu(), 1430);
        assert_eq!(s.devices[1].name(), "vxlan-v6.calico");
    }

    #[test]
    fn vxlan_crosssubnet_keeps_same_segment_peers_direct() {
        let s = desired(
            &inputs(EncapMode::Never, EncapMode::CrossSubnet),
            &Config::default(),
        )
        .unwrap();
        assert_eq!(target(&s, "192.168.2.0/26"), "via 10.0.0.20 dev eth0");
        assert_eq!(
            target(&s, "192.168.3.0/26"),
            "via 192.168.3.0 dev vxlan.calico onlink"
        );
        assert_eq!(
            target(&s, "fd99:0:0:3::/122"),
            "via fd99:0:0:3:: dev vxlan-v6.calico onlink",
            "fd01::30 is outside fd00::/64"
        );
    }

    #[test]
    fn crosssubnet_with_host_prefix_node_address_tunnels_to_every_peer() {
        let mut i = inputs(EncapMode::CrossSubnet, EncapMode::Never);
        i.node_addr_v4 = Some("10.0.0.10/32".parse().unwrap());
        let s = desired(&i, &Config::default()).unwrap();
        assert_eq!(
            target(&s, "192.168.2.0/26"),
            "via 10.0.0.20 dev tunl0 onlink"
        );
    }

    #[test]
    fn block_outside_every_pool_is_routed_directly() {
        let mut i = inputs(EncapMode::Always, EncapMode::Never);
        i.remote_blocks.push(RemoteBlock {
            cidr: net("172.16.0.0/26"),
            node_ip: ip("10.1.0.30"),
        });
        i.node_addr_v4 = Some("10.0.0.10/15".parse().unwrap());
        let s = desired(&i, &Config::default()).unwrap();
        assert_eq!(target(&s, "172.16.0.0/26"), "via 10.1.0.30 dev eth0");
    }

    #[test]
    fn most_specific_pool_decides_the_mode() {
        let mut i = inputs(EncapMode::Always, EncapMode::Never);
        i.pools.push(Pool {
            cidr: net("192.168.3.0/24"),
            ipip: EncapMode::Never,
            vxlan: EncapMode::Never,
        });
        i.node_addr_v4 = Some("10.0.0.10/15".parse().unwrap());
        let s = desired(&i, &Config::default()).unwrap();
        assert_eq!(target(&s, "192.168.3.0/26"), "via 10.1.0.30 dev eth0");
        assert_eq!(
            target(&s, "192.168.2.0/26"),
            "via 10.0.0.20 dev tunl0 onlink"
        );
    }

    #[test]
    fn vxlan_block_without_known_vtep_is_skipped_not_misrouted() {
        let mut i = inputs(EncapMode::Never, EncapMode::Always);
        i.remote_vteps.retain(|v| v.node_ip != ip("10.1.0.30"));
        let s = desired(&i, &Config::default()).unwrap();
        assert!(!s.routes.contains_key(&net("192.168.3.0/26")));
        assert!(
            s.skipped
                .iter()
                .any(|k| k.cidr == net("192.168.3.0/26") && k.reason.contains("no VTEP"))
        );
    }

    #[test]
    fn workload_beats_owned_block_beats_remote_block_for_one_destination() {
        let mut i = inputs(EncapMode::Never, EncapMode::Never);
        i.remote_blocks.push(RemoteBlock {
            cidr: net("192.168.1.0/26"),
            node_ip: ip("10.0.0.20"),
        });
        i.owned_blocks.push(net("192.168.1.5/32"));
        let s = desired(&i, &Config::default()).unwrap();
        assert_eq!(s.routes[&net("192.168.1.0/26")].kind, RouteKind::Blackhole);
        assert_eq!(s.routes[&net("192.168.1.5/32")].kind, RouteKind::Workload);
    }

    #[test]
    fn pool_with_both_encapsulations_is_rejected_naming_the_pool() {
        let err = desired(
            &inputs(EncapMode::Always, EncapMode::Always),
            &Config::default(),
        )
        .unwrap_err();
        assert_eq!(
            err,
            InputError::PoolBothEncapsulations {
                pool: net("192.168.0.0/16")
            }
        );
        assert!(err.to_string().contains("192.168.0.0/16"));
    }

    #[test]
    fn ipip_on_ipv6_pool_is_rejected() {
        let mut i = inputs(EncapMode::Never, EncapMode::Never);
        i.pools[1].ipip = EncapMode::Always;
        assert_eq!(
            desired(&i, &Config::default()).unwrap_err(),
            InputError::IpipOnIpv6Pool {
                pool: net("fd99::/48")
            }
        );
    }

    #[test]
    fn vtep_mac_is_stable_unicast_and_locally_administered() {
        let a = vtep_mac_for("node-1", false);
        assert_eq!(a, vtep_mac_for("node-1", false));
        assert_ne!(a, vtep_mac_for("node-2", false));
        assert_ne!(a, vtep_mac_for("node-1", true));
        assert_eq!(a[0] & 0x01, 0, "unicast");
        assert_eq!(a[0] & 0x02, 0x02, "locally administered");
    }

    #[test]
    fn reserved_route_protocols_are_refused() {
        for p in [0, 3, 12, 186] {
            let c = Config {
                route_protocol: p,
                ..Config::default()
            };
            assert!(c.validate().is_err(), "protocol {p} accepted");
        }
        assert!(Config::default().validate().is_ok());
    }
}
