//! The kernel as tortie last saw it ([`Actual`]) and the pure comparison with the desired
//! state that yields a [`Plan`] of device operations and route/neighbour writes.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use ipnet::IpNet;

use crate::messages::KernelLink;
use crate::model::{DesiredState, DeviceSpec, FdbEntry, Neighbour, RouteKind, RouteTarget};

/// A small multiply-rotate hasher (the Fx scheme) for tortie's own maps: keys are route
/// prefixes and interface names the kernel or the agent gave us, not attacker-chosen, and
/// SipHash made a 100k-route no-op diff twice as slow.
#[derive(Debug, Default, Clone, Copy)]
pub struct FastHasher(u64);

impl std::hash::Hasher for FastHasher {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(word));
        }
    }

    fn write_u8(&mut self, n: u8) {
        self.write_u64(u64::from(n));
    }

    fn write_u32(&mut self, n: u32) {
        self.write_u64(u64::from(n));
    }

    fn write_usize(&mut self, n: usize) {
        self.write_u64(n as u64);
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

pub type FastMap<K, V> = HashMap<K, V, std::hash::BuildHasherDefault<FastHasher>>;
pub type FastSet<K> = HashSet<K, std::hash::BuildHasherDefault<FastHasher>>;

/// tortie's view of the kernel, kept current by dumps and monitor events.
#[derive(Debug, Default, Clone)]
pub struct Actual {
    /// Main-table routes carrying tortie's protocol, by destination.
    pub routes: FastMap<IpNet, RouteTarget>,
    pub links: HashMap<u32, KernelLink>,
    pub link_index: FastMap<Arc<str>, u32>,
    pub addrs: HashMap<u32, BTreeSet<IpNet>>,
    /// Permanent neighbour and FDB entries on tortie's VXLAN devices.
    pub neighbours: BTreeSet<Neighbour>,
    pub fdb: BTreeSet<FdbEntry>,
    /// calico-node's leftovers that a desired route may take over in place (adoption).
    pub adoptable: HashMap<IpNet, RouteTarget>,
    /// Destinations where somebody replaced tortie's route with one of another protocol.
    pub displaced: HashSet<IpNet>,
}

impl Actual {
    pub fn link(&self, name: &str) -> Option<&KernelLink> {
        self.link_index.get(name).and_then(|i| self.links.get(i))
    }

    pub fn insert_link(&mut self, link: KernelLink) {
        if let Some(old) = self.links.get(&link.index)
            && old.name != link.name
        {
            self.link_index.remove(&old.name);
        }
        self.link_index.insert(link.name.clone(), link.index);
        self.links.insert(link.index, link);
    }

    pub fn remove_link(&mut self, index: u32) {
        if let Some(old) = self.links.remove(&index) {
            if self.link_index.get(&old.name) == Some(&index) {
                self.link_index.remove(&old.name);
            }
            self.addrs.remove(&index);
        }
    }
}

/// A change to one of tortie's tunnel devices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceOp {
    Create(DeviceSpec),
    /// Bring up and set MTU (and MAC for VXLAN).
    Configure(DeviceSpec),
    AddAddress {
        name: String,
        addr: IpNet,
    },
    DelAddress {
        name: String,
        addr: IpNet,
    },
    Delete {
        name: String,
    },
    /// Take down a device that cannot be deleted (the ipip module's fallback `tunl0`).
    Disable {
        name: String,
    },
}

impl DeviceOp {
    /// The device the operation is about.
    pub fn name(&self) -> &str {
        match self {
            DeviceOp::Create(spec) | DeviceOp::Configure(spec) => spec.name(),
            DeviceOp::AddAddress { name, .. }
            | DeviceOp::DelAddress { name, .. }
            | DeviceOp::Delete { name }
            | DeviceOp::Disable { name } => name,
        }
    }
}

/// How a route write is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteMode {
    /// `NLM_F_CREATE | NLM_F_EXCL`: never overwrite a route tortie does not own.
    Create,
    /// `NLM_F_CREATE | NLM_F_REPLACE`: the destination is tortie's (or was taken from it, or
    /// is an adopted calico-node route); changed in place with no gap.
    Replace,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteWrite {
    pub dst: IpNet,
    pub target: RouteTarget,
    pub kind: RouteKind,
    pub mode: WriteMode,
}

/// Route and neighbour work, in the order it is applied: adds, route writes, then deletes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    pub neighbour_adds: Vec<Neighbour>,
    pub fdb_adds: Vec<FdbEntry>,
    pub route_writes: Vec<RouteWrite>,
    pub route_deletes: Vec<IpNet>,
    pub neighbour_dels: Vec<Neighbour>,
    pub fdb_dels: Vec<FdbEntry>,
    /// Desired routes whose interface does not exist or is down (a workload's veth being set
    /// up, a device).
    pub waiting: Vec<IpNet>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.neighbour_adds.is_empty()
            && self.fdb_adds.is_empty()
            && self.route_writes.is_empty()
            && self.route_deletes.is_empty()
            && self.neighbour_dels.is_empty()
            && self.fdb_dels.is_empty()
    }
}

/// Device work: creations and fixes for desired devices; deletions of tortie's device names
/// nobody needs (only once the desired state is complete).
pub fn diff_devices(
    desired: &DesiredState,
    actual: &Actual,
    owned_names: &[&str],
    complete: bool,
) -> Vec<DeviceOp> {
    let mut ops = Vec::new();
    for spec in &desired.devices {
        let want_addr = spec.addr();
        let Some(link) = actual.link(spec.name()) else {
            ops.push(DeviceOp::Create(spec.clone()));
            ops.push(DeviceOp::Configure(spec.clone()));
            ops.push(DeviceOp::AddAddress {
                name: spec.name().into(),
                addr: want_addr,
            });
            continue;
        };
        let (recreate, mac_ok) = match spec {
            DeviceSpec::Ipip { .. } => (link.kind.as_deref() != Some("ipip"), true),
            DeviceSpec::Vxlan {
                vni,
                port,
                local,
                mac,
                ..
            } => {
                let params = link.vxlan.clone().unwrap_or_default();
                let wrong = link.kind.as_deref() != Some("vxlan")
                    || params.vni != Some(*vni)
                    || params.port != Some(*port)
                    || params.local != Some(*local)
                    || params.learning != Some(false);
                (wrong, link.mac == Some(*mac))
            }
        };
        if recreate {
            ops.push(DeviceOp::Delete {
                name: spec.name().into(),
            });
            ops.push(DeviceOp::Create(spec.clone()));
            ops.push(DeviceOp::Configure(spec.clone()));
            ops.push(DeviceOp::AddAddress {
                name: spec.name().into(),
                addr: want_addr,
            });
            continue;
        }
        if !link.up || link.mtu != spec.mtu() || !mac_ok {
            ops.push(DeviceOp::Configure(spec.clone()));
        }
        let have = actual.addrs.get(&link.index);
        if !have.is_some_and(|a| a.contains(&want_addr)) {
            ops.push(DeviceOp::AddAddress {
                name: spec.name().into(),
                addr: want_addr,
            });
        }
        for addr in have.into_iter().flatten() {
            let link_local =
                matches!(addr, IpNet::V6(v6) if v6.addr().segments()[0] & 0xffc0 == 0xfe80);
            if *addr != want_addr && !link_local {
                ops.push(DeviceOp::DelAddress {
                    name: spec.name().into(),
                    addr: *addr,
                });
            }
        }
    }
    if complete {
        for name in owned_names {
            let wanted = desired.devices.iter().any(|d| d.name() == *name);
            let Some(link) = actual.link(name).filter(|_| !wanted) else {
                continue;
            };
            if link.kind.as_deref() == Some("ipip") && *name == "tunl0" {
                // The fallback device lives as long as the module: strip and disable it.
                for addr in actual.addrs.get(&link.index).into_iter().flatten() {
                    ops.push(DeviceOp::DelAddress {
                        name: (*name).into(),
                        addr: *addr,
                    });
                }
                if link.up {
                    ops.push(DeviceOp::Disable {
                        name: (*name).into(),
                    });
                }
            } else {
                ops.push(DeviceOp::Delete {
                    name: (*name).into(),
                });
            }
        }
    }
    ops
}

/// Route and neighbour work. Nothing is deleted until `complete`: on a restart the kernel's
/// routes keep carrying traffic while the inputs are still being learned.
pub fn diff(desired: &DesiredState, actual: &Actual, complete: bool) -> Plan {
    let mut plan = Plan::default();
    // Most routes name the same device: remember the last answer for that very string.
    let mut last_link: Option<(*const u8, usize, bool)> = None;
    for (dst, route) in &desired.routes {
        if let Some(ifname) = route.target.ifname() {
            let key = (ifname.as_ptr(), ifname.len());
            let exists = match last_link {
                Some((p, l, e)) if (p, l) == key => e,
                _ => {
                    // A link that exists but is down refuses routes (ENETDOWN): wait for up.
                    let e = actual
                        .link_index
                        .get(ifname)
                        .and_then(|i| actual.links.get(i))
                        .is_some_and(|l| l.up);
                    last_link = Some((key.0, key.1, e));
                    e
                }
            };
            if !exists {
                plan.waiting.push(*dst);
                continue;
            }
        }
        let mode = match actual.routes.get(dst) {
            Some(have) if *have == route.target => continue,
            Some(_) => WriteMode::Replace,
            // An adoptable calico-node route is taken over in place even if it points
            // elsewhere (a different mode): replacing it is the migration, with no gap.
            None if actual.adoptable.contains_key(dst) || actual.displaced.contains(dst) => {
                WriteMode::Replace
            }
            None => WriteMode::Create,
        };
        plan.route_writes.push(RouteWrite {
            dst: *dst,
            target: route.target.clone(),
            kind: route.kind,
            mode,
        });
    }
    if complete {
        let mut deletes: Vec<IpNet> = actual
            .routes
            .keys()
            .filter(|dst| !desired.routes.contains_key(dst))
            .copied()
            .collect();
        deletes.sort_unstable();
        plan.route_deletes = deletes;
    }

    let device_exists = |name: &str| actual.link_index.contains_key(name);
    plan.neighbour_adds = desired
        .neighbours
        .difference(&actual.neighbours)
        .filter(|n| device_exists(&n.ifname))
        .cloned()
        .collect();
    plan.fdb_adds = desired
        .fdb
        .difference(&actual.fdb)
        .filter(|f| device_exists(&f.ifname))
        .cloned()
        .collect();
    if complete {
        // An entry whose key is being rewritten must not be deleted after the rewrite.
        plan.neighbour_dels = actual
            .neighbours
            .difference(&desired.neighbours)
            .filter(|n| {
                !plan
                    .neighbour_adds
                    .iter()
                    .any(|a| a.ifname == n.ifname && a.ip == n.ip)
            })
            .cloned()
            .collect();
        plan.fdb_dels = actual
            .fdb
            .difference(&desired.fdb)
            .filter(|f| {
                !plan
                    .fdb_adds
                    .iter()
                    .any(|a| a.ifname == f.ifname && a.mac == f.mac)
            })
            .cloned()
            .collect();
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::DesiredRoute;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn link(index: u32, name: &str) -> KernelLink {
        KernelLink {
            index,
            name: Arc::from(name),
            up: true,
            mtu: 1500,
            mac: None,
            kind: None,
            vxlan: None,
        }
    }

    fn via(gw: &str, dev: &str, onlink: bool) -> RouteTarget {
        RouteTarget::Gateway {
            via: gw.parse().unwrap(),
            ifname: Arc::from(dev),
            onlink,
        }
    }

    fn desired_with(routes: &[(&str, RouteTarget)]) -> DesiredState {
        let mut d = DesiredState::default();
        for (dst, t) in routes {
            d.routes.insert(
                net(dst),
                DesiredRoute {
                    target: t.clone(),
                    kind: RouteKind::Direct,
                },
            );
        }
        d
    }

    fn actual_with(routes: &[(&str, RouteTarget)]) -> Actual {
        let mut a = Actual::default();
        a.insert_link(link(2, "eth0"));
        a.insert_link(link(3, "tunl0"));
        for (dst, t) in routes {
            a.routes.insert(net(dst), t.clone());
        }
        a
    }

    #[test]
    fn next_hop_change_is_a_replace_not_delete_and_add() {
        let d = desired_with(&[("10.1.0.0/26", via("10.0.0.2", "tunl0", true))]);
        let a = actual_with(&[("10.1.0.0/26", via("10.0.0.2", "eth0", false))]);
        let plan = diff(&d, &a, true);
        assert_eq!(plan.route_writes.len(), 1);
        assert_eq!(plan.route_writes[0].mode, WriteMode::Replace);
        assert!(plan.route_deletes.is_empty(), "{:?}", plan.route_deletes);
    }

    #[test]
    fn matching_routes_produce_an_empty_plan() {
        let t = via("10.0.0.2", "eth0", false);
        let d = desired_with(&[("10.1.0.0/26", t.clone())]);
        let a = actual_with(&[("10.1.0.0/26", t)]);
        assert!(diff(&d, &a, true).is_empty());
    }

    #[test]
    fn stale_routes_survive_until_desired_state_is_complete() {
        let t = via("10.0.0.2", "eth0", false);
        let d = desired_with(&[]);
        let a = actual_with(&[("10.1.0.0/26", t)]);
        assert!(diff(&d, &a, false).route_deletes.is_empty());
        assert_eq!(diff(&d, &a, true).route_deletes, vec![net("10.1.0.0/26")]);
    }

    #[test]
    fn new_route_is_created_exclusively_unless_adoptable() {
        let t = via("10.0.0.2", "eth0", false);
        let d = desired_with(&[("10.1.0.0/26", t.clone())]);
        let mut a = actual_with(&[]);
        assert_eq!(diff(&d, &a, false).route_writes[0].mode, WriteMode::Create);
        a.adoptable.insert(net("10.1.0.0/26"), t);
        assert_eq!(diff(&d, &a, false).route_writes[0].mode, WriteMode::Replace);
    }

    #[test]
    fn route_over_a_missing_interface_waits() {
        let d = desired_with(&[(
            "10.2.0.5/32",
            RouteTarget::Device {
                ifname: Arc::from("cali0"),
            },
        )]);
        let plan = diff(&d, &actual_with(&[]), true);
        assert!(plan.route_writes.is_empty());
        assert_eq!(plan.waiting, vec![net("10.2.0.5/32")]);
    }

    #[test]
    fn unneeded_owned_device_is_deleted_only_when_complete() {
        let d = DesiredState::default();
        let a = actual_with(&[]);
        assert!(diff_devices(&d, &a, &["tunl0", "vxlan.calico"], false).is_empty());
        assert_eq!(
            diff_devices(&d, &a, &["tunl0", "vxlan.calico"], true),
            vec![DeviceOp::Delete {
                name: "tunl0".into()
            }]
        );
    }

    #[test]
    fn unneeded_fallback_tunl0_is_stripped_and_disabled_not_deleted() {
        let d = DesiredState::default();
        let mut a = actual_with(&[]);
        let mut tunl = link(3, "tunl0");
        tunl.kind = Some("ipip".into());
        a.insert_link(tunl);
        a.addrs.insert(3, [net("192.168.1.1/32")].into());
        assert_eq!(
            diff_devices(&d, &a, &["tunl0"], true),
            vec![
                DeviceOp::DelAddress {
                    name: "tunl0".into(),
                    addr: net("192.168.1.1/32")
                },
                DeviceOp::Disable {
                    name: "tunl0".into()
                }
            ]
        );
    }

    #[test]
    fn vxlan_device_with_wrong_local_address_is_recreated() {
        let spec = DeviceSpec::Vxlan {
            name: "vxlan.calico".into(),
            vni: 4096,
            port: 4789,
            local: "10.0.0.1".parse().unwrap(),
            underlay: "eth0".into(),
            mtu: 1450,
            mac: [2, 0, 0, 0, 0, 1],
            addr: "192.168.0.1".parse().unwrap(),
        };
        let d = DesiredState {
            devices: vec![spec.clone()],
            ..Default::default()
        };
        let mut a = actual_with(&[]);
        let mut l = link(9, "vxlan.calico");
        l.kind = Some("vxlan".into());
        l.mac = Some([2, 0, 0, 0, 0, 1]);
        l.mtu = 1450;
        l.vxlan = Some(crate::messages::VxlanParams {
            vni: Some(4096),
            port: Some(4789),
            local: Some("10.0.0.99".parse().unwrap()),
            learning: Some(false),
        });
        a.insert_link(l);
        a.addrs.insert(9, [net("192.168.0.1/32")].into());
        let ops = diff_devices(&d, &a, &["vxlan.calico"], false);
        assert_eq!(
            ops[0],
            DeviceOp::Delete {
                name: "vxlan.calico".into()
            }
        );
        assert_eq!(ops[1], DeviceOp::Create(spec));
    }

    #[test]
    fn neighbour_with_new_mac_is_rewritten_not_deleted() {
        let mut d = DesiredState::default();
        let new = Neighbour {
            ifname: "eth0".into(),
            ip: "192.168.3.0".parse().unwrap(),
            mac: [2, 0, 0, 0, 0, 2],
        };
        d.neighbours.insert(new.clone());
        let mut a = actual_with(&[]);
        a.neighbours.insert(Neighbour {
            mac: [2, 0, 0, 0, 0, 1],
            ..new.clone()
        });
        let plan = diff(&d, &a, true);
        assert_eq!(plan.neighbour_adds, vec![new]);
        assert!(plan.neighbour_dels.is_empty());
    }
}
