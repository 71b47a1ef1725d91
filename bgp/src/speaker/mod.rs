//! The tokio runtime around the sans-IO cores: listener, one task per peer, one RIB task.
//!
//! Data flow: peer tasks decode messages and move UPDATEs (by value, no shared state) to
//! the RIB task over a channel; the RIB task sends per-peer outbound changes back and
//! publishes best-path changes on a broadcast channel. The only locks are short
//! `std::sync::Mutex` sections for the peer table and status snapshots, never held across
//! an `.await`.

mod rib_task;
mod session;
pub(crate) mod socket;

use crate::fsm::State;
use crate::rib::{BestChange, BestPath, PeerSettings, RibConfig};
use ipnet::IpNet;
use rib_task::RibCmd;
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::task::JoinHandle;
use tracing::{Instrument, debug, warn};

/// Default BGP port.
pub const BGP_PORT: u16 = 179;

/// Errors from the speaker API.
#[derive(Debug, thiserror::Error)]
pub enum SpeakerError {
    /// The listen socket could not be set up.
    #[error("bgp listener {addr}: {source}")]
    Listen {
        /// Address we tried.
        addr: SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
    /// A configuration value is out of range.
    #[error("bgp config: {field}: {reason}")]
    InvalidConfig {
        /// Which field, e.g. `peer 10.0.0.2 hold_time`.
        field: String,
        /// What is wrong.
        reason: String,
    },
    /// `add_peer` for an address that is already a peer.
    #[error("bgp peer {0} already exists")]
    PeerExists(IpAddr),
    /// `update_peer`/`remove_peer` for an address that is not a peer.
    #[error("bgp peer {0} does not exist")]
    UnknownPeer(IpAddr),
    /// Installing the TCP-MD5 key on the listener failed.
    #[error("bgp peer {peer}: TCP-MD5 key on listener: {source}")]
    Md5 {
        /// Peer address.
        peer: IpAddr,
        /// Cause.
        source: std::io::Error,
    },
    /// The speaker's tasks are gone.
    #[error("bgp speaker stopped")]
    Stopped,
}

/// Graceful restart settings (RFC 4724).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GracefulRestartConfig {
    /// Restart time we announce, seconds (≤ 4095).
    pub restart_time: u16,
    /// Set the Restart State bit: this process has just restarted. Originate every prefix
    /// before adding peers so the first End-of-RIB follows a complete table.
    pub restarting: bool,
    /// Announce that forwarding state (kernel routes) survived the restart.
    pub forwarding_preserved: bool,
    /// After a restarting peer reconnects, how long to wait for its End-of-RIB before
    /// dropping its still-stale routes.
    pub stale_routes_time: Duration,
}

impl Default for GracefulRestartConfig {
    fn default() -> Self {
        GracefulRestartConfig {
            restart_time: 120,
            restarting: false,
            forwarding_preserved: true,
            stale_routes_time: Duration::from_secs(360),
        }
    }
}

/// Speaker-wide settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpeakerConfig {
    /// BGP identifier.
    pub router_id: Ipv4Addr,
    /// Local AS.
    pub local_as: u32,
    /// Where to accept connections; `None` runs without a listener (active peers only).
    pub listen: Option<SocketAddr>,
    /// Cluster ID when reflecting; defaults to the router id.
    pub cluster_id: Option<Ipv4Addr>,
    /// Graceful restart; `None` disables it (no capability sent, no helper behaviour).
    pub graceful_restart: Option<GracefulRestartConfig>,
    /// ConnectRetryTime, also the back-off before an automatic restart from Idle.
    pub connect_retry: Duration,
}

impl SpeakerConfig {
    /// Defaults: listen on 0.0.0.0:179, graceful restart on, 5 s connect retry.
    pub fn new(router_id: Ipv4Addr, local_as: u32) -> Self {
        SpeakerConfig {
            router_id,
            local_as,
            listen: Some(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), BGP_PORT)),
            cluster_id: None,
            graceful_restart: Some(GracefulRestartConfig::default()),
            connect_retry: Duration::from_secs(5),
        }
    }
}

/// One peering.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerConfig {
    /// Peer address (also how incoming connections are matched).
    pub address: IpAddr,
    /// Peer's TCP port for outgoing connections.
    pub port: u16,
    /// Peer AS; equal to the local AS means iBGP.
    pub remote_as: u32,
    /// Only accept connections, never initiate.
    pub passive: bool,
    /// TCP-MD5 password.
    pub md5_password: Option<String>,
    /// Source address for outgoing connections.
    pub source_address: Option<IpAddr>,
    /// Proposed hold time, seconds (0 or ≥ 3).
    pub hold_time: u16,
    /// Treat the peer as our route-reflector client.
    pub route_reflector_client: bool,
    /// Advertise only locally originated prefixes to this peer (no transit).
    pub export_local_only: bool,
    /// Outgoing TTL (e.g. 255 for GTSM-style, or > 1 for multihop).
    pub ttl: Option<u8>,
    /// IPv4 next hop to announce for our routes; default: the session's local address.
    pub next_hop_v4: Option<Ipv4Addr>,
    /// IPv6 next hop to announce for our routes; default: the session's local address on an
    /// IPv6 session. On an IPv4 session without it, IPv6 routes are not announced.
    pub next_hop_v6: Option<Ipv6Addr>,
}

impl PeerConfig {
    /// Defaults: port 179, active, hold time 90, no MD5, not a reflector client.
    pub fn new(address: IpAddr, remote_as: u32) -> Self {
        PeerConfig {
            address,
            port: BGP_PORT,
            remote_as,
            passive: false,
            md5_password: None,
            source_address: None,
            hold_time: 90,
            route_reflector_client: false,
            export_local_only: false,
            ttl: None,
            next_hop_v4: None,
            next_hop_v6: None,
        }
    }

    fn validate(&self) -> Result<(), SpeakerError> {
        let invalid = |field: &str, reason: &str| SpeakerError::InvalidConfig {
            field: format!("peer {} {field}", self.address),
            reason: reason.to_string(),
        };
        if self.hold_time == 1 || self.hold_time == 2 {
            return Err(invalid("hold_time", "must be 0 or at least 3 seconds"));
        }
        if self
            .md5_password
            .as_ref()
            .is_some_and(|p| p.is_empty() || p.len() > socket::MD5_MAX_KEY_LEN)
        {
            return Err(invalid("md5_password", "must be 1 to 80 octets"));
        }
        if self.address.is_unspecified() || self.address.is_multicast() {
            return Err(invalid("address", "must be a unicast address"));
        }
        Ok(())
    }
}

/// Snapshot of one peer for metrics and `tortie status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerStatus {
    /// Peer address.
    pub address: IpAddr,
    /// FSM state.
    pub state: State,
    /// Time since the session reached Established, if it is.
    pub uptime: Option<Duration>,
    /// Prefixes in Adj-RIB-In.
    pub prefixes_received: u64,
    /// Prefixes that passed import checks.
    pub prefixes_accepted: u64,
    /// Prefixes in Adj-RIB-Out.
    pub prefixes_advertised: u64,
    /// Messages received.
    pub messages_in: u64,
    /// Messages sent.
    pub messages_out: u64,
    /// Last error (NOTIFICATION sent or received, socket error).
    pub last_error: Option<String>,
}

/// Counters shared between a peer's task, the RIB task and status readers.
#[derive(Debug, Default)]
pub(crate) struct PeerShared {
    state: AtomicU8,
    established_at: Mutex<Option<Instant>>,
    messages_in: AtomicU64,
    messages_out: AtomicU64,
    received: AtomicU64,
    accepted: AtomicU64,
    advertised: AtomicU64,
    last_error: Mutex<Option<String>>,
}

fn state_code(state: State) -> u8 {
    match state {
        State::Idle => 0,
        State::Connect => 1,
        State::Active => 2,
        State::OpenSent => 3,
        State::OpenConfirm => 4,
        State::Established => 5,
    }
}

fn state_from_code(code: u8) -> State {
    match code {
        1 => State::Connect,
        2 => State::Active,
        3 => State::OpenSent,
        4 => State::OpenConfirm,
        5 => State::Established,
        _ => State::Idle,
    }
}

impl PeerShared {
    pub(crate) fn set_state(&self, state: State) {
        let previous = state_from_code(self.state.swap(state_code(state), Ordering::Relaxed));
        if previous != state {
            let mut at = self
                .established_at
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            *at = (state == State::Established).then(Instant::now);
        }
    }
    pub(crate) fn set_error(&self, error: String) {
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(error);
    }
    pub(crate) fn count_in(&self) {
        self.messages_in.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn count_out(&self, n: u64) {
        self.messages_out.fetch_add(n, Ordering::Relaxed);
    }
    pub(crate) fn set_prefix_counts(&self, counts: crate::rib::PeerCounts) {
        self.received.store(counts.received, Ordering::Relaxed);
        self.accepted.store(counts.accepted, Ordering::Relaxed);
        self.advertised.store(counts.advertised, Ordering::Relaxed);
    }
    fn snapshot(&self, address: IpAddr) -> PeerStatus {
        PeerStatus {
            address,
            state: state_from_code(self.state.load(Ordering::Relaxed)),
            uptime: self
                .established_at
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .map(|t| t.elapsed()),
            prefixes_received: self.received.load(Ordering::Relaxed),
            prefixes_accepted: self.accepted.load(Ordering::Relaxed),
            prefixes_advertised: self.advertised.load(Ordering::Relaxed),
            messages_in: self.messages_in.load(Ordering::Relaxed),
            messages_out: self.messages_out.load(Ordering::Relaxed),
            last_error: self
                .last_error
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        }
    }
}

struct PeerHandle {
    config: PeerConfig,
    cmd: mpsc::UnboundedSender<session::PeerCmd>,
    shared: Arc<PeerShared>,
    task: JoinHandle<()>,
}

struct Inner {
    config: SpeakerConfig,
    local_addr: Option<SocketAddr>,
    listener_fd: Option<std::os::fd::RawFd>,
    rib: mpsc::UnboundedSender<RibCmd>,
    best: broadcast::Sender<BestChange>,
    peers: Mutex<HashMap<IpAddr, PeerHandle>>,
    refused: AtomicU64,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    started: tokio::time::Instant,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Peer tasks first: once the RIB task is gone their route channels close, and a
        // peer task that ran before its abort would take that for a removal and send Cease,
        // which a graceful-restart helper answers by flushing our routes.
        for (_, peer) in self
            .peers
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .drain()
        {
            peer.task.abort();
        }
        for task in self
            .tasks
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            task.abort();
        }
    }
}

/// A running BGP speaker. Cheap to clone; dropping the last handle aborts every task
/// (connections close without NOTIFICATION, as a crash would; use [`Speaker::shutdown`]
/// for a clean stop).
#[derive(Clone)]
pub struct Speaker {
    inner: Arc<Inner>,
}

/// Capacity of the best-path broadcast channel; a receiver that lags further than this
/// gets `RecvError::Lagged` and should resynchronise with [`Speaker::best_paths`].
pub const BEST_PATH_CHANNEL: usize = 65536;

impl Speaker {
    /// Bind the listener (if configured) and start the RIB and accept tasks.
    pub async fn start(config: SpeakerConfig) -> Result<Speaker, SpeakerError> {
        if config.router_id.is_unspecified() {
            return Err(SpeakerError::InvalidConfig {
                field: "router_id".into(),
                reason: "must not be 0.0.0.0".into(),
            });
        }
        if config
            .graceful_restart
            .as_ref()
            .is_some_and(|gr| gr.restart_time > 4095)
        {
            return Err(SpeakerError::InvalidConfig {
                field: "graceful_restart.restart_time".into(),
                reason: "must be at most 4095 seconds".into(),
            });
        }
        let listener = match config.listen {
            Some(addr) => {
                Some(socket::listen(addr).map_err(|source| SpeakerError::Listen { addr, source })?)
            }
            None => None,
        };
        let local_addr = listener.as_ref().and_then(|l| l.local_addr().ok());
        let listener_fd = listener.as_ref().map(|l| l.as_raw_fd());
        let (rib_tx, rib_rx) = mpsc::unbounded_channel();
        let (best_tx, _) = broadcast::channel(BEST_PATH_CHANNEL);
        let rib_config = RibConfig {
            local_as: config.local_as,
            router_id: config.router_id,
            cluster_id: config.cluster_id.unwrap_or(config.router_id),
        };
        let stale_routes_time = config
            .graceful_restart
            .as_ref()
            .map_or(Duration::ZERO, |gr| gr.stale_routes_time);
        let rib_task = tokio::spawn(
            rib_task::run(rib_config, rib_rx, best_tx.clone(), stale_routes_time).instrument(
                tracing::info_span!("bgp_rib", router_id = %config.router_id, local_as = config.local_as),
            ),
        );
        let inner = Arc::new(Inner {
            config,
            local_addr,
            listener_fd,
            rib: rib_tx,
            best: best_tx,
            peers: Mutex::new(HashMap::new()),
            refused: AtomicU64::new(0),
            tasks: Mutex::new(vec![rib_task]),
            started: tokio::time::Instant::now(),
        });
        if let Some(listener) = listener {
            let weak = Arc::downgrade(&inner);
            let span = tracing::info_span!("bgp_listener", listen = ?local_addr);
            let accept = tokio::spawn(accept_loop(listener, weak).instrument(span));
            inner
                .tasks
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(accept);
        }
        Ok(Speaker { inner })
    }

    /// The address the listener is bound to.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.inner.local_addr
    }

    /// Connections refused because they came from an address that is not a configured peer.
    pub fn refused_connections(&self) -> u64 {
        self.inner.refused.load(Ordering::Relaxed)
    }

    fn peers(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, PeerHandle>> {
        self.inner.peers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Add a peer and start its session.
    pub fn add_peer(&self, peer: PeerConfig) -> Result<(), SpeakerError> {
        peer.validate()?;
        let mut peers = self.peers();
        if peers.contains_key(&peer.address) {
            return Err(SpeakerError::PeerExists(peer.address));
        }
        if let Some(fd) = self.inner.listener_fd {
            let key = peer.md5_password.as_ref().map(|p| p.as_bytes());
            socket::set_md5(fd, peer.address, key).map_err(|source| SpeakerError::Md5 {
                peer: peer.address,
                source,
            })?;
        }
        let shared = Arc::new(PeerShared::default());
        let (out_tx, out_rx) = mpsc::unbounded_channel();
        self.inner
            .rib
            .send(RibCmd::AddPeer {
                address: peer.address,
                settings: PeerSettings {
                    remote_as: peer.remote_as,
                    route_reflector_client: peer.route_reflector_client,
                    export_local_only: peer.export_local_only,
                },
                out: out_tx,
                shared: shared.clone(),
            })
            .map_err(|_| SpeakerError::Stopped)?;
        let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(session::run(session::SessionParams {
            peer: peer.clone(),
            speaker: self.inner.config.clone(),
            shared: shared.clone(),
            rib: self.inner.rib.clone(),
            commands: cmd_rx,
            routes: out_rx,
            restart_window_end: self.inner.started
                + Duration::from_secs(
                    self.inner
                        .config
                        .graceful_restart
                        .as_ref()
                        .map_or(0, |gr| gr.restart_time.into()),
                ),
        }));
        debug!(peer = %peer.address, "bgp peer added");
        peers.insert(
            peer.address,
            PeerHandle {
                config: peer,
                cmd: cmd_tx,
                shared,
                task,
            },
        );
        Ok(())
    }

    /// Replace a peer's settings; the session restarts if anything changed.
    pub fn update_peer(&self, peer: PeerConfig) -> Result<(), SpeakerError> {
        peer.validate()?;
        {
            let peers = self.peers();
            let existing = peers
                .get(&peer.address)
                .ok_or(SpeakerError::UnknownPeer(peer.address))?;
            if existing.config == peer {
                return Ok(());
            }
        }
        self.remove_peer(peer.address)?;
        self.add_peer(peer)
    }

    /// Stop a peer's session (with a Cease NOTIFICATION) and forget its routes.
    pub fn remove_peer(&self, address: IpAddr) -> Result<(), SpeakerError> {
        let handle = self
            .peers()
            .remove(&address)
            .ok_or(SpeakerError::UnknownPeer(address))?;
        // The task sends Cease and exits; if it is already gone there is nothing to stop.
        let _ = handle.cmd.send(session::PeerCmd::Remove);
        if let Some(fd) = self.inner.listener_fd
            && let Err(e) = socket::set_md5(fd, address, None)
        {
            warn!(peer = %address, error = %e, "removing TCP-MD5 key from listener");
        }
        self.inner
            .rib
            .send(RibCmd::RemovePeer { address })
            .map_err(|_| SpeakerError::Stopped)
    }

    /// Ask a peer to re-send all its routes (ROUTE-REFRESH); a no-op unless the session is
    /// Established and both sides announced the capability.
    pub fn request_refresh(&self, address: IpAddr) -> Result<(), SpeakerError> {
        let peers = self.peers();
        let handle = peers
            .get(&address)
            .ok_or(SpeakerError::UnknownPeer(address))?;
        handle
            .cmd
            .send(session::PeerCmd::RequestRefresh)
            .map_err(|_| SpeakerError::Stopped)
    }

    /// Configured peers.
    pub fn peer_configs(&self) -> Vec<PeerConfig> {
        self.peers().values().map(|p| p.config.clone()).collect()
    }

    /// Announce a prefix with next hop self.
    pub fn originate(&self, prefix: IpNet) -> Result<(), SpeakerError> {
        self.inner
            .rib
            .send(RibCmd::Originate(prefix.trunc()))
            .map_err(|_| SpeakerError::Stopped)
    }

    /// Stop announcing a prefix.
    pub fn withdraw(&self, prefix: IpNet) -> Result<(), SpeakerError> {
        self.inner
            .rib
            .send(RibCmd::Withdraw(prefix.trunc()))
            .map_err(|_| SpeakerError::Stopped)
    }

    /// Stream of best-path changes (locally originated prefixes included, with `from: None`).
    pub fn subscribe(&self) -> broadcast::Receiver<BestChange> {
        self.inner.best.subscribe()
    }

    /// The whole Loc-RIB: every prefix with its best path.
    pub async fn best_paths(&self) -> Result<Vec<(IpNet, BestPath)>, SpeakerError> {
        let (tx, rx) = oneshot::channel();
        self.inner
            .rib
            .send(RibCmd::BestPaths(tx))
            .map_err(|_| SpeakerError::Stopped)?;
        rx.await.map_err(|_| SpeakerError::Stopped)
    }

    /// Status of every peer.
    pub fn peer_status(&self) -> Vec<PeerStatus> {
        let mut status: Vec<PeerStatus> = self
            .peers()
            .iter()
            .map(|(address, p)| p.shared.snapshot(*address))
            .collect();
        status.sort_by_key(|s| s.address);
        status
    }

    /// Status of one peer.
    pub fn peer(&self, address: IpAddr) -> Option<PeerStatus> {
        self.peers()
            .get(&address)
            .map(|p| p.shared.snapshot(address))
    }

    /// Stop every session with a Cease NOTIFICATION and wait (bounded) for the tasks to end.
    pub async fn shutdown(self) {
        let handles: Vec<PeerHandle> = self.peers().drain().map(|(_, h)| h).collect();
        for h in &handles {
            let _ = h.cmd.send(session::PeerCmd::Remove);
        }
        for h in handles {
            if tokio::time::timeout(Duration::from_secs(2), h.task)
                .await
                .is_err()
            {
                warn!("bgp peer task did not stop within 2 s");
            }
        }
        // Wait for the listener and RIB tasks to be gone, so the listening socket is closed
        // when this returns and a new speaker can bind the same address at once.
        let tasks: Vec<JoinHandle<()>> = self
            .inner
            .tasks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
            .collect();
        for task in tasks {
            task.abort();
            let _ = tokio::time::timeout(Duration::from_secs(2), task).await;
        }
    }
}

async fn accept_loop(listener: tokio::net::TcpListener, inner: std::sync::Weak<Inner>) {
    loop {
        let (stream, remote) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                warn!(error = %e, "bgp accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let remote_ip = match remote.ip() {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
            v4 => v4,
        };
        let target = inner
            .peers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&remote_ip)
            .map(|p| p.cmd.clone());
        match target {
            Some(cmd) => {
                let _ = cmd.send(session::PeerCmd::Incoming(stream));
            }
            None => {
                inner.refused.fetch_add(1, Ordering::Relaxed);
                debug!(remote = %remote, "bgp connection from unconfigured address refused");
            }
        }
    }
}
