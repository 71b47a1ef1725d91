//! Shared helpers for the dataplane kernel tests (each `dataplane_*.rs` includes this file with
//! `#[path]`): a node/pod world with one block per node, inputs per encapsulation mode, kernel
//! table snapshots in `ip route` syntax, and a continuous ping that counts losses.
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::process::{Child, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tortie_dataplane::{
    Config, Dataplane, EncapMode, Inputs, Pool, RemoteBlock, RemoteVtep, Workload, vtep_mac_for,
};
use tortie_e2e::{Netns, Node, Pod, Topology, wait_for};

pub const PROTO: u8 = tortie_dataplane::DEFAULT_ROUTE_PROTOCOL;
pub const SKIP_NO_IPIP: &str =
    "SKIP: no ipip module (tunl0 cannot be created) — runs in QEMU via make test-kernel";
pub const POOL: &str = "10.244.0.0/16";
pub const POOL6: &str = "fd44::/48";

/// Node `i`'s block, its pod and its tunnel address: 10.244.(i+1).0/26, .2 and .1.
pub fn block(i: usize) -> String {
    format!("10.244.{}.0/26", i + 1)
}
pub fn pod_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, i as u8 + 1, 2)
}
pub fn tunnel_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, i as u8 + 1, 1)
}
pub fn block6(i: usize) -> String {
    format!("fd44:0:0:{}::/122", i + 1)
}
pub fn tunnel_ip6(i: usize) -> String {
    format!("fd44:0:0:{}::1", i + 1)
}
pub fn pod_ip6(i: usize) -> String {
    format!("fd44:0:0:{}::2", i + 1)
}

/// An encapsulation setting for the one IPv4 pool (and, for VXLAN, the IPv6 pool).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mode {
    pub ipip: EncapMode,
    pub vxlan: EncapMode,
}

pub const NEVER: Mode = Mode {
    ipip: EncapMode::Never,
    vxlan: EncapMode::Never,
};
pub const IPIP_ALWAYS: Mode = Mode {
    ipip: EncapMode::Always,
    vxlan: EncapMode::Never,
};
pub const IPIP_CROSS: Mode = Mode {
    ipip: EncapMode::CrossSubnet,
    vxlan: EncapMode::Never,
};
pub const VXLAN_ALWAYS: Mode = Mode {
    ipip: EncapMode::Never,
    vxlan: EncapMode::Always,
};
pub const VXLAN_CROSS: Mode = Mode {
    ipip: EncapMode::Never,
    vxlan: EncapMode::CrossSubnet,
};

/// Topology plus one Calico-style pod per node (`pods[i]` on `topo.nodes[i]`).
pub struct World {
    pub pods: Vec<Pod>,
    pub topo: Topology,
}

impl World {
    pub fn new(topo: Topology) -> World {
        let pods = topo
            .nodes
            .iter()
            .enumerate()
            .map(|(i, n)| {
                Pod::attach_calico_style(n, &format!("p{i}"), Some(&format!("cali{i}")), pod_ip(i))
                    .unwrap()
            })
            .collect();
        World { pods, topo }
    }

    /// Starts a dataplane on every node in `mode` (complete at once) and waits until each
    /// node's kernel table is exactly that mode's.
    pub fn start_all(&self, mode: Mode) -> Vec<Dataplane> {
        let dps: Vec<Dataplane> = (0..self.topo.nodes.len())
            .map(|i| {
                let dp = start(self.node(i), Config::default());
                dp.set_desired(self.inputs(i, mode, false)).unwrap();
                dp.mark_complete();
                dp
            })
            .collect();
        for i in 0..dps.len() {
            wait_for_mode(self, i, mode).unwrap();
        }
        dps
    }

    /// Gives every pod its IPv6 address the way Calico's CNI does: `/128` on eth0, default
    /// route via the host end's link-local address.
    pub fn add_ipv6_to_pods(&self) {
        for (i, pod) in self.pods.iter().enumerate() {
            let node = self.node(i);
            let out = node
                .ns
                .run(&[
                    "ip",
                    "-6",
                    "-j",
                    "addr",
                    "show",
                    "dev",
                    &pod.host_if,
                    "scope",
                    "link",
                ])
                .unwrap();
            let addrs: serde_json::Value = serde_json::from_str(&out).unwrap();
            let gateway = addrs[0]["addr_info"][0]["local"]
                .as_str()
                .unwrap_or_else(|| panic!("no link-local address on {}: {out}", pod.host_if))
                .to_owned();
            pod.ns
                .run(&[
                    "ip",
                    "-6",
                    "addr",
                    "add",
                    &format!("{}/128", pod_ip6(i)),
                    "dev",
                    "eth0",
                    "nodad",
                ])
                .unwrap();
            pod.ns
                .run(&[
                    "ip", "-6", "route", "add", "default", "via", &gateway, "dev", "eth0",
                ])
                .unwrap();
        }
    }

    pub fn node(&self, i: usize) -> &Node {
        &self.topo.nodes[i]
    }

    /// Inputs for node `i` in `mode`: its pod, its block, every other node's block and VTEP,
    /// and (with `v6`) an IPv6 block per node as well.
    pub fn inputs(&self, i: usize, mode: Mode, v6: bool) -> Inputs {
        let me = self.node(i);
        let mut inputs = Inputs {
            node_name: me.name.clone(),
            node_addr_v4: Some(format!("{}/{}", me.addr, me.prefix_len).parse().unwrap()),
            node_addr_v6: Some(format!("{}/64", me.addr6).parse().unwrap()),
            uplink: me.uplink.to_string(),
            uplink_mtu: 1500,
            ipip_tunnel_addr: Some(tunnel_ip(i)),
            vxlan_tunnel_addr_v4: Some(tunnel_ip(i)),
            vxlan_tunnel_addr_v6: v6.then(|| tunnel_ip6(i).parse().unwrap()),
            pools: vec![Pool {
                cidr: POOL.parse().unwrap(),
                ipip: mode.ipip,
                vxlan: mode.vxlan,
            }],
            workloads: vec![Workload {
                ip: pod_ip(i).into(),
                host_if: self.pods[i].host_if.clone(),
            }],
            owned_blocks: vec![block(i).parse().unwrap()],
            remote_blocks: vec![],
            remote_vteps: vec![],
        };
        if v6 {
            inputs.pools.push(Pool {
                cidr: POOL6.parse().unwrap(),
                ipip: EncapMode::Never,
                vxlan: mode.vxlan,
            });
            inputs.owned_blocks.push(block6(i).parse().unwrap());
            inputs.workloads.push(Workload {
                ip: pod_ip6(i).parse().unwrap(),
                host_if: self.pods[i].host_if.clone(),
            });
        }
        for (j, other) in self.topo.nodes.iter().enumerate() {
            if j == i {
                continue;
            }
            inputs.remote_blocks.push(RemoteBlock {
                cidr: block(j).parse().unwrap(),
                node_ip: other.addr.into(),
            });
            inputs.remote_vteps.push(RemoteVtep {
                node_ip: other.addr.into(),
                tunnel_addr: tunnel_ip(j).into(),
                mac: vtep_mac_for(&other.name, false),
            });
            if v6 {
                inputs.remote_blocks.push(RemoteBlock {
                    cidr: block6(j).parse().unwrap(),
                    node_ip: other.addr6.into(),
                });
                inputs.remote_vteps.push(RemoteVtep {
                    node_ip: other.addr6.into(),
                    tunnel_addr: tunnel_ip6(j).parse().unwrap(),
                    mac: vtep_mac_for(&other.name, true),
                });
            }
        }
        inputs
    }

    /// The IPv4 table node `i` must show in `mode`, in canonical `ip route` syntax.
    pub fn expected_routes(&self, i: usize, mode: Mode) -> BTreeSet<String> {
        let me = self.node(i);
        let mut out = BTreeSet::new();
        out.insert(format!("blackhole {}", block(i)));
        out.insert(format!(
            "{} dev {} scope link",
            pod_ip(i),
            self.pods[i].host_if
        ));
        for (j, other) in self.topo.nodes.iter().enumerate() {
            if j == i {
                continue;
            }
            let same = other.segment == me.segment;
            let across = |m: EncapMode| match m {
                EncapMode::Never => false,
                EncapMode::Always => true,
                EncapMode::CrossSubnet => !same,
            };
            let route = if across(mode.vxlan) {
                format!("{} via {} dev vxlan.calico onlink", block(j), tunnel_ip(j))
            } else if across(mode.ipip) {
                format!("{} via {} dev tunl0 onlink", block(j), other.addr)
            } else if same {
                format!("{} via {} dev eth0", block(j), other.addr)
            } else {
                continue; // unreachable without a tunnel: tortie installs nothing
            };
            out.insert(route);
        }
        out
    }

    /// Neighbour (`ip lladdr`) and FDB (`mac dst`) entries node `i` must have on vxlan.calico.
    pub fn expected_vxlan_entries(
        &self,
        i: usize,
        mode: Mode,
    ) -> (BTreeSet<String>, BTreeSet<String>) {
        let mut neigh = BTreeSet::new();
        let mut fdb = BTreeSet::new();
        if mode.vxlan == EncapMode::Never {
            return (neigh, fdb);
        }
        for (j, other) in self.topo.nodes.iter().enumerate() {
            if j == i {
                continue;
            }
            let mac = mac_string(&vtep_mac_for(&other.name, false));
            neigh.insert(format!("{} {mac}", tunnel_ip(j)));
            fdb.insert(format!("{mac} {}", other.addr));
        }
        (neigh, fdb)
    }
}

pub fn mac_string(mac: &[u8; 6]) -> String {
    tortie_dataplane::format_mac(mac)
}

/// Starts a dataplane whose sockets live in `node`'s namespace.
pub fn start(node: &Node, config: Config) -> Dataplane {
    node.ns
        .enter(|| Dataplane::start(config))
        .unwrap()
        .unwrap_or_else(|e| panic!("starting the dataplane on {}: {e}", node.name))
}

/// tortie's routes (both families) in canonical `ip route` syntax.
pub fn routes(ns: &Netns, v6: bool) -> Result<BTreeSet<String>> {
    let proto = PROTO.to_string();
    let mut argv = vec!["ip", "-j"];
    if v6 {
        argv.push("-6");
    }
    argv.extend(["route", "show", "proto", &proto]);
    let out = ns.run(&argv)?;
    let list: Vec<serde_json::Value> =
        serde_json::from_str(&out).with_context(|| format!("parsing {out}"))?;
    Ok(list.iter().map(canonical_route).collect())
}

pub fn canonical_route(r: &serde_json::Value) -> String {
    let s = |k: &str| r[k].as_str().map(str::to_owned);
    let mut out = String::new();
    let kind = s("type");
    if let Some(t) = &kind {
        out.push_str(t);
        out.push(' ');
    }
    out.push_str(&s("dst").unwrap_or_default());
    if let Some(gw) = s("gateway") {
        out.push_str(&format!(" via {gw}"));
    }
    if kind.is_none()
        && let Some(dev) = s("dev")
    {
        out.push_str(&format!(" dev {dev}"));
    }
    if s("scope").as_deref() == Some("link") {
        out.push_str(" scope link");
    }
    if r["flags"]
        .as_array()
        .is_some_and(|f| f.iter().any(|x| x == "onlink"))
    {
        out.push_str(" onlink");
    }
    out
}

/// Permanent neighbours on `dev` as `ip lladdr`; empty when the device does not exist.
pub fn neighbours(ns: &Netns, dev: &str) -> Result<BTreeSet<String>> {
    if !link_exists(ns, dev) {
        return Ok(BTreeSet::new());
    }
    let out = ns.run(&["ip", "-j", "neigh", "show", "dev", dev])?;
    let list: Vec<serde_json::Value> = serde_json::from_str(&out)?;
    Ok(list
        .iter()
        .filter(|n| {
            n["state"]
                .as_array()
                .is_some_and(|s| s.iter().any(|x| x == "PERMANENT"))
        })
        .map(|n| {
            format!(
                "{} {}",
                n["dst"].as_str().unwrap_or("?"),
                n["lladdr"].as_str().unwrap_or("?")
            )
        })
        .collect())
}

/// FDB entries on `dev` as `mac dst`; empty when the device does not exist.
pub fn fdb(ns: &Netns, dev: &str) -> Result<BTreeSet<String>> {
    if !link_exists(ns, dev) {
        return Ok(BTreeSet::new());
    }
    let out = ns.run(&["bridge", "-j", "fdb", "show", "dev", dev])?;
    let list: Vec<serde_json::Value> = serde_json::from_str(&out)?;
    Ok(list
        .iter()
        .filter(|e| e["dst"].is_string())
        .map(|e| {
            format!(
                "{} {}",
                e["mac"].as_str().unwrap_or("?"),
                e["dst"].as_str().unwrap_or("?")
            )
        })
        .collect())
}

pub fn link_exists(ns: &Netns, dev: &str) -> bool {
    ns.exec(&["ip", "link", "show", dev])
        .is_ok_and(|o| o.status.success())
}

/// Waits until `probe` returns exactly `want`; the error shows both sides.
pub fn wait_exact(
    what: &str,
    timeout: Duration,
    want: &BTreeSet<String>,
    mut probe: impl FnMut() -> Result<BTreeSet<String>>,
) -> Result<()> {
    wait_for(what, timeout, || {
        let have = probe()?;
        if &have == want {
            Ok(Some(()))
        } else {
            bail!(
                "expected {want:#?}\n kernel shows {have:#?}\n missing {:?}\n extra {:?}",
                want.difference(&have).collect::<Vec<_>>(),
                have.difference(want).collect::<Vec<_>>()
            )
        }
    })
}

/// Waits until node `i` shows exactly the routes, neighbours and FDB entries of `mode`.
pub fn wait_for_mode(world: &World, i: usize, mode: Mode) -> Result<()> {
    let ns = &world.node(i).ns;
    let name = &world.node(i).name;
    wait_exact(
        &format!("{name}'s routes in {mode:?}"),
        Duration::from_secs(10),
        &world.expected_routes(i, mode),
        || routes(ns, false),
    )?;
    let (neigh, fdb_want) = world.expected_vxlan_entries(i, mode);
    wait_exact(
        &format!("{name}'s vxlan neighbours in {mode:?}"),
        Duration::from_secs(5),
        &neigh,
        || neighbours(ns, "vxlan.calico"),
    )?;
    wait_exact(
        &format!("{name}'s vxlan FDB in {mode:?}"),
        Duration::from_secs(5),
        &fdb_want,
        || fdb(ns, "vxlan.calico"),
    )
}

/// True when the kernel can give `ns` a tunl0 (the ipip module is present or loadable).
pub fn has_ipip(ns: &Netns) -> bool {
    if link_exists(ns, "tunl0") {
        return true;
    }
    let probe = ns.exec(&[
        "ip",
        "link",
        "add",
        "name",
        "ipipprobe",
        "type",
        "ipip",
        "remote",
        "10.77.0.99",
    ]);
    if probe.is_ok_and(|o| o.status.success()) {
        let _ = ns.exec(&["ip", "link", "del", "ipipprobe"]);
    }
    link_exists(ns, "tunl0")
}

/// `ping -i 0.01` running in the background; [`ContinuousPing::stop`] returns (sent, received).
pub struct ContinuousPing {
    child: Option<Child>,
    what: String,
}

impl ContinuousPing {
    pub fn start(from: &Pod, to: Ipv4Addr) -> ContinuousPing {
        let child = from
            .ns
            .command("ping")
            .args(["-n", "-q", "-i", "0.01", "-W", "1", "-w", "60"])
            .arg(to.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        ContinuousPing {
            child: Some(child),
            what: format!("{} -> {to}", from.name),
        }
    }

    /// Stops the ping (SIGINT, so it prints its summary) and returns (sent, received).
    pub fn stop(mut self) -> (u64, u64) {
        let child = self.child.take().unwrap();
        // SAFETY: plain kill(2) on the ping process this test started.
        unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
        let out = child.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let (sent, received) = tortie_e2e::netns::ping_counts(&text)
            .unwrap_or_else(|| panic!("ping {} printed no summary: {text}", self.what));
        (u64::from(sent), u64::from(received))
    }
}

impl Drop for ContinuousPing {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
