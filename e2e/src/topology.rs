//! Namespaced topologies: L2 segments (bridges in a fabric namespace), a router joining them,
//! node namespaces with an uplink on a segment, and pod namespaces attached to a node by a veth.
//!
//! ```text
//!            fabric netns                     router netns
//!   ┌───────────────────────────┐        ┌──────────────────┐
//!   │ br-0 ──┬── n0 (node0 eth0)│        │ seg0: 10.77.0.1  │
//!   │        ├── n1 (node1 eth0)│        │ seg1: 10.77.1.1  │
//!   │        └── r0 ─────────────────────┤ forwarding on    │
//!   │ br-1 ──┬── n2 (node2 eth0)│        │                  │
//!   │        └── r1 ─────────────────────┤                  │
//!   └───────────────────────────┘        └──────────────────┘
//! ```
//! Segment `i` is 10.77.i.0/24 and fd77:i::/64; the router is `.1`/`::1`, nodes count up from `.10`.
//! The addresses exist only inside the test's own namespaces, so every test may reuse them.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context, Result, bail};

use crate::netns::Netns;

/// What to build: segment count, nodes per segment, and whether a router joins the segments.
#[derive(Debug, Clone, Default)]
pub struct TopologySpec {
    /// Node names per segment: `segments[i]` lists the nodes on segment `i`.
    pub segments: Vec<Vec<String>>,
    pub router: bool,
}

impl TopologySpec {
    /// `TopologySpec::new().segment(["a", "b"]).segment(["c"]).router()`
    pub fn new() -> Self {
        Self::default()
    }

    pub fn segment<I, S>(mut self, nodes: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.segments
            .push(nodes.into_iter().map(Into::into).collect());
        self
    }

    pub fn router(mut self) -> Self {
        self.router = true;
        self
    }

    pub fn build(self) -> Result<Topology> {
        Topology::build(self)
    }
}

/// A node: a namespace with `eth0` on one segment.
#[derive(Debug)]
pub struct Node {
    pub name: String,
    pub ns: Netns,
    pub segment: usize,
    pub addr: Ipv4Addr,
    pub prefix_len: u8,
    pub addr6: Ipv6Addr,
    pub gateway: Option<Ipv4Addr>,
    pub uplink: &'static str,
}

/// The router joining the segments; `addrs[i]` is its address on segment `i`.
#[derive(Debug)]
pub struct Router {
    pub ns: Netns,
    pub addrs: Vec<Ipv4Addr>,
    pub addrs6: Vec<Ipv6Addr>,
}

/// A built topology; dropping it deletes every namespace it made (and the processes in them).
#[derive(Debug)]
pub struct Topology {
    pub nodes: Vec<Node>,
    pub router: Option<Router>,
    /// Holds the bridges; dropped last.
    pub fabric: Netns,
}

pub fn segment_addr(segment: usize, host: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 77, segment as u8, host)
}

pub fn segment_addr6(segment: usize, host: u16) -> Ipv6Addr {
    Ipv6Addr::new(0xfd77, segment as u16, 0, 0, 0, 0, 0, host)
}

impl Topology {
    fn build(spec: TopologySpec) -> Result<Topology> {
        if spec.segments.is_empty() || spec.segments.len() > 200 {
            bail!(
                "a topology needs 1..=200 segments, got {}",
                spec.segments.len()
            );
        }
        let fabric = Netns::create("fabric")?;
        for seg in 0..spec.segments.len() {
            let br = format!("br{seg}");
            fabric.run(&["ip", "link", "add", &br, "type", "bridge", "stp_state", "0"])?;
            fabric.run(&["ip", "link", "set", &br, "up"])?;
        }

        let router = if spec.router {
            let ns = Netns::create("router")?;
            let mut addrs = Vec::new();
            let mut addrs6 = Vec::new();
            for seg in 0..spec.segments.len() {
                let leg = format!("seg{seg}");
                let port = format!("r{seg}");
                plug(&fabric, seg, &port, &ns, &leg)?;
                let a = segment_addr(seg, 1);
                let a6 = segment_addr6(seg, 1);
                ns.run(&["ip", "addr", "add", &format!("{a}/24"), "dev", &leg])?;
                ns.run(&[
                    "ip",
                    "-6",
                    "addr",
                    "add",
                    &format!("{a6}/64"),
                    "dev",
                    &leg,
                    "nodad",
                ])?;
                addrs.push(a);
                addrs6.push(a6);
            }
            Some(Router { ns, addrs, addrs6 })
        } else {
            None
        };

        let mut nodes = Vec::new();
        for (seg, names) in spec.segments.iter().enumerate() {
            for (i, name) in names.iter().enumerate() {
                if i > 200 {
                    bail!("at most 200 nodes per segment");
                }
                let ns = Netns::create(name)?;
                let port = format!("n{}", nodes.len());
                plug(&fabric, seg, &port, &ns, "eth0")?;
                let addr = segment_addr(seg, 10 + i as u8);
                let addr6 = segment_addr6(seg, 0x10 + i as u16);
                ns.run(&["ip", "addr", "add", &format!("{addr}/24"), "dev", "eth0"])?;
                ns.run(&[
                    "ip",
                    "-6",
                    "addr",
                    "add",
                    &format!("{addr6}/64"),
                    "dev",
                    "eth0",
                    "nodad",
                ])?;
                let gateway = router.as_ref().map(|r| r.addrs[seg]);
                // Without a router the default route still points at `.1`, as on a real host:
                // proxy ARP for pods' 169.254.1.1 gateway needs the node to have a route to it.
                let gw4 = segment_addr(seg, 1).to_string();
                let gw6 = segment_addr6(seg, 1).to_string();
                ns.run(&[
                    "ip", "route", "add", "default", "via", &gw4, "dev", "eth0", "onlink",
                ])?;
                ns.run(&[
                    "ip", "-6", "route", "add", "default", "via", &gw6, "dev", "eth0",
                ])?;
                nodes.push(Node {
                    name: name.clone(),
                    ns,
                    segment: seg,
                    addr,
                    prefix_len: 24,
                    addr6,
                    gateway,
                    uplink: "eth0",
                });
            }
        }
        Ok(Topology {
            nodes,
            router,
            fabric,
        })
    }

    pub fn node(&self, name: &str) -> &Node {
        match self.nodes.iter().find(|n| n.name == name) {
            Some(n) => n,
            None => panic!("topology has no node {name:?}"),
        }
    }
}

/// Connects `ns`'s interface `ifname` to segment `seg`'s bridge through a veth whose fabric end is `port`.
fn plug(fabric: &Netns, seg: usize, port: &str, ns: &Netns, ifname: &str) -> Result<()> {
    crate::netns::run_host(&[
        "ip",
        "link",
        "add",
        port,
        "netns",
        fabric.name(),
        "type",
        "veth",
        "peer",
        "name",
        ifname,
        "netns",
        ns.name(),
    ])
    .with_context(|| format!("plugging {} into segment {seg}", ns.name()))?;
    fabric.run(&[
        "ip",
        "link",
        "set",
        port,
        "master",
        &format!("br{seg}"),
        "up",
    ])?;
    ns.run(&["ip", "link", "set", ifname, "up"])?;
    Ok(())
}

static POD_COUNTER: AtomicU32 = AtomicU32::new(0);

/// A pod: its own namespace, `eth0` inside, and a host-side veth in the node's namespace.
#[derive(Debug)]
pub struct Pod {
    pub name: String,
    pub ns: Netns,
    /// The veth end in the node's namespace.
    pub host_if: String,
    pub ip: Option<Ipv4Addr>,
}

impl Pod {
    /// A pod namespace joined to `node` by a veth, with nothing configured on either end
    /// beyond link up (a CNI plugin's job). `host_if` must be ≤ 15 bytes.
    pub fn attach(node: &Node, name: &str, host_if: Option<&str>) -> Result<Pod> {
        let ns = Netns::create(&format!("pod-{name}"))?;
        let host_if = match host_if {
            Some(h) => h.to_owned(),
            None => format!("tp{}", POD_COUNTER.fetch_add(1, Ordering::SeqCst)),
        };
        if host_if.len() > 15 {
            bail!("interface name {host_if:?} longer than 15 bytes");
        }
        crate::netns::run_host(&[
            "ip",
            "link",
            "add",
            &host_if,
            "netns",
            node.ns.name(),
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            ns.name(),
        ])?;
        node.ns.run(&["ip", "link", "set", &host_if, "up"])?;
        ns.run(&["ip", "link", "set", "eth0", "up"])?;
        Ok(Pod {
            name: name.to_owned(),
            ns,
            host_if,
            ip: None,
        })
    }

    /// A pod wired the way Calico's CNI wires one, except the host's `/32` route, which the
    /// dataplane under test must add: `ip/32` on eth0, `169.254.1.1` link route and default
    /// route inside; proxy ARP on the host end.
    pub fn attach_calico_style(
        node: &Node,
        name: &str,
        host_if: Option<&str>,
        ip: Ipv4Addr,
    ) -> Result<Pod> {
        let mut pod = Pod::attach(node, name, host_if)?;
        node.ns.run(&[
            "sysctl",
            "-qw",
            &format!("net.ipv4.conf.{}.proxy_arp=1", pod.host_if),
        ])?;
        node.ns.run(&[
            "ip",
            "link",
            "set",
            &pod.host_if,
            "address",
            "ee:ee:ee:ee:ee:ee",
        ])?;
        pod.ns
            .run(&["ip", "addr", "add", &format!("{ip}/32"), "dev", "eth0"])?;
        pod.ns.run(&[
            "ip",
            "route",
            "add",
            "169.254.1.1",
            "dev",
            "eth0",
            "scope",
            "link",
        ])?;
        pod.ns.run(&[
            "ip",
            "route",
            "add",
            "default",
            "via",
            "169.254.1.1",
            "dev",
            "eth0",
        ])?;
        pod.ip = Some(ip);
        Ok(pod)
    }
}
