//! Shared pieces of the tortie-bgp interop suites: a tortie speaker running inside a node's
//! namespace, Loc-RIB probes, and waits with deadlines. Included by each `bgp_interop_*` test
//! file with `#[path]`, so not every helper is used by every file.
#![allow(dead_code)]

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::time::Duration;

use tortie_bgp::{
    BestPath, GracefulRestartConfig, NextHop, PeerConfig, PeerStatus, SessionState, Speaker,
    SpeakerConfig,
};
use tortie_e2e::wait_for;
use tortie_e2e::{Node, Topology, TopologySpec, require_root};

/// Deadline for a session to come up or a route to arrive: the daemons retry every second.
pub const WAIT: Duration = Duration::from_secs(20);

/// Calico's default AS; the iBGP tests use it on both sides.
pub const CALICO_AS: u32 = 64512;

/// Two nodes on one segment: `tortie` (10.77.0.10, fd77:0::10) and `peer` (10.77.0.11, fd77:0::11),
/// plus optional extra nodes after them.
pub fn pair_topology(extra: &[&str]) -> Topology {
    require_root();
    let mut nodes = vec!["tortie", "peer"];
    nodes.extend_from_slice(extra);
    TopologySpec::new().segment(nodes).build().unwrap()
}

/// Opens `/var/run/netns/<name>` and moves the calling thread into it.
fn enter_netns(name: &str) -> std::io::Result<()> {
    let file = File::open(format!("/var/run/netns/{name}"))?;
    // SAFETY: setns on the calling thread with a namespace fd that lives for the call.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// A tortie speaker whose sockets live in one node's namespace: every thread of its tokio
/// runtime joins the namespace when it starts, so listener and outgoing connections are there.
pub struct TortieNode {
    rt: Option<tokio::runtime::Runtime>,
    speaker: Option<Speaker>,
}

impl TortieNode {
    /// Starts a speaker with `config` inside `node`'s namespace.
    pub fn start(node: &Node, config: SpeakerConfig) -> TortieNode {
        let ns_name = node.ns.name().to_owned();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .on_thread_start(move || {
                if let Err(e) = enter_netns(&ns_name) {
                    panic!("runtime thread cannot enter netns {ns_name}: {e}");
                }
            })
            .build()
            .unwrap();
        let speaker = rt
            .block_on(async { tokio::spawn(Speaker::start(config)).await })
            .unwrap()
            .unwrap();
        TortieNode {
            rt: Some(rt),
            speaker: Some(speaker),
        }
    }

    pub fn speaker(&self) -> &Speaker {
        self.speaker.as_ref().unwrap()
    }

    fn rt(&self) -> &tokio::runtime::Runtime {
        self.rt.as_ref().unwrap()
    }

    /// Adds a peer; `add_peer` spawns the session task, so it runs on a runtime thread.
    pub fn add_peer(&self, peer: PeerConfig) {
        let speaker = self.speaker().clone();
        self.rt()
            .block_on(async { tokio::spawn(async move { speaker.add_peer(peer) }).await })
            .unwrap()
            .unwrap();
    }

    /// Replaces a peer's settings (the session restarts), on a runtime thread like `add_peer`.
    pub fn update_peer(&self, peer: PeerConfig) {
        let speaker = self.speaker().clone();
        self.rt()
            .block_on(async { tokio::spawn(async move { speaker.update_peer(peer) }).await })
            .unwrap()
            .unwrap();
    }

    pub fn originate(&self, prefix: &str) {
        self.speaker().originate(prefix.parse().unwrap()).unwrap();
    }

    pub fn withdraw(&self, prefix: &str) {
        self.speaker().withdraw(prefix.parse().unwrap()).unwrap();
    }

    /// The Loc-RIB as (prefix text, best path).
    pub fn loc_rib(&self) -> Vec<(String, BestPath)> {
        let speaker = self.speaker().clone();
        self.rt()
            .block_on(async { tokio::spawn(async move { speaker.best_paths().await }).await })
            .unwrap()
            .unwrap()
            .into_iter()
            .map(|(p, b)| (p.to_string(), b))
            .collect()
    }

    /// The best path for `prefix` (as text, e.g. "10.0.0.0/24"), if any.
    pub fn best(&self, prefix: &str) -> Option<BestPath> {
        self.loc_rib()
            .into_iter()
            .find(|(p, _)| p == prefix)
            .map(|(_, b)| b)
    }

    pub fn status(&self, peer: IpAddr) -> PeerStatus {
        self.speaker().peer(peer).unwrap()
    }

    pub fn established(&self, peer: IpAddr) -> bool {
        self.status(peer).state == SessionState::Established
    }

    /// Waits until the session with `peer` is Established.
    pub fn wait_established(&self, peer: IpAddr, daemon_log: impl Fn() -> String) {
        wait_for(&format!("tortie's session with {peer}"), WAIT, || {
            Ok(self.established(peer).then_some(()))
        })
        .unwrap_or_else(|e| {
            panic!(
                "{e}\ntortie: {:?}\ndaemon:\n{}",
                self.status(peer),
                daemon_log()
            )
        });
    }

    /// Waits until `prefix` is in the Loc-RIB learned from `from`, and returns its path.
    pub fn wait_route(&self, prefix: &str, from: IpAddr) -> BestPath {
        wait_for(
            &format!("{prefix} from {from} in tortie's Loc-RIB"),
            WAIT,
            || Ok(self.best(prefix).filter(|b| b.from == Some(from))),
        )
        .unwrap_or_else(|e| panic!("{e}\nLoc-RIB: {:?}", self.loc_rib()))
    }

    /// Waits until `prefix` is gone from the Loc-RIB.
    pub fn wait_no_route(&self, prefix: &str, within: Duration) {
        wait_for(
            &format!("{prefix} gone from tortie's Loc-RIB"),
            within,
            || Ok(self.best(prefix).is_none().then_some(())),
        )
        .unwrap_or_else(|e| panic!("{e}\nLoc-RIB: {:?}", self.loc_rib()))
    }

    /// After the peer was frozen: tortie's hold timer (3 s in these tests) expires, it sends
    /// NOTIFICATION 4/0, and the peer's `prefix` leaves the Loc-RIB.
    pub fn expect_hold_timer_expiry(&self, peer: IpAddr, prefix: &str) {
        wait_true(
            "tortie's hold timer expires",
            Duration::from_secs(8),
            || !self.established(peer),
            || format!("{:?}", self.status(peer)),
        );
        let status = self.status(peer);
        assert_eq!(
            status.last_error.as_deref(),
            Some("sent NOTIFICATION 4/0"),
            "{status:?}"
        );
        self.wait_no_route(prefix, Duration::from_secs(2));
    }

    /// Like a crash: every task is aborted, sockets close without a NOTIFICATION.
    pub fn abort(mut self) {
        drop(self.speaker.take());
        if let Some(rt) = self.rt.take() {
            rt.shutdown_timeout(Duration::from_secs(2));
        }
    }
}

impl Drop for TortieNode {
    fn drop(&mut self) {
        drop(self.speaker.take());
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// Speaker settings for a node: router id = its address, quick retries, listening on
/// `[::]:179` (dual stack) so both IPv4 and IPv6 sessions are accepted.
pub fn speaker_config(node: &Node, local_as: u32) -> SpeakerConfig {
    SpeakerConfig {
        listen: Some(SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 179)),
        connect_retry: Duration::from_secs(1),
        graceful_restart: Some(GracefulRestartConfig {
            restart_time: 60,
            ..GracefulRestartConfig::default()
        }),
        ..SpeakerConfig::new(node.addr, local_as)
    }
}

/// An IPv4 peer of `tortie` that also carries IPv6 routes (next hop: tortie's IPv6 address).
pub fn peer_v4(tortie: &Node, peer: &Node, remote_as: u32) -> PeerConfig {
    PeerConfig {
        next_hop_v6: Some(tortie.addr6),
        ..PeerConfig::new(IpAddr::V4(peer.addr), remote_as)
    }
}

pub fn v4(node: &Node) -> IpAddr {
    IpAddr::V4(node.addr)
}

pub fn v6(node: &Node) -> IpAddr {
    IpAddr::V6(node.addr6)
}

/// The global part of an IPv6 next hop (link-local second address ignored).
pub fn global_v6(next_hop: &NextHop) -> Option<Ipv6Addr> {
    match next_hop {
        NextHop::V6 { global, .. } => Some(*global),
        _ => None,
    }
}

pub fn ipv4(next_hop: &NextHop) -> Option<Ipv4Addr> {
    match next_hop {
        NextHop::V4(a) => Some(*a),
        _ => None,
    }
}

/// Waits until `probe` holds, panicking with `context()` on timeout.
pub fn wait_true(
    what: &str,
    within: Duration,
    mut probe: impl FnMut() -> bool,
    context: impl Fn() -> String,
) {
    if let Err(e) = wait_for(what, within, || Ok(probe().then_some(()))) {
        panic!("{e}\n{}", context());
    }
}

/// Counts non-overlapping occurrences of `needle` in a log file's text.
pub fn count_in(text: &str, needle: &str) -> usize {
    text.matches(needle).count()
}
