//! One task per peer: owns the TCP connection(s) and the FSM, moves bytes and time.

use super::rib_task::{PeerOut, RibCmd};
use super::{PeerConfig, PeerShared, SpeakerConfig, socket};
use crate::fsm::{
    Action, DownReason, Event, Fsm, FsmConfig, Negotiated, State, Timer, keep_locally_initiated,
};
use crate::rib::{OutChange, PeerSession, RouteAttrs};
use crate::wire::{
    Afi, Capability, DecodeContext, DecodeError, GracefulRestart, GracefulRestartFamily, Message,
    SAFI_UNICAST, Update, code, frame_length,
};
use bytes::BytesMut;
use ipnet::IpNet;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{Instrument, debug, info, info_span, warn};

/// Commands from the speaker handle.
pub(crate) enum PeerCmd {
    /// The listener accepted a connection from this peer's address.
    Incoming(TcpStream),
    /// The peer was removed: send Cease and end the task.
    Remove,
    /// Ask the peer to re-send its routes (ROUTE-REFRESH, RFC 2918).
    RequestRefresh,
}

pub(crate) struct SessionParams {
    pub peer: PeerConfig,
    pub speaker: SpeakerConfig,
    pub shared: Arc<PeerShared>,
    pub rib: mpsc::UnboundedSender<RibCmd>,
    pub commands: mpsc::UnboundedReceiver<PeerCmd>,
    pub routes: mpsc::UnboundedReceiver<PeerOut>,
    /// Until then, OPENs carry the graceful-restart Restart State bit (if configured).
    pub restart_window_end: Instant,
}

/// Free space ensured before each read: small, so idle sessions stay cheap (the buffer
/// still grows to hold a whole message when one is larger).
const READ_RESERVE: usize = 4096;
/// How long a second (colliding) connection may take to send its OPEN.
const COLLISION_OPEN_WAIT: Duration = Duration::from_secs(30);

struct Conn {
    reader: OwnedReadHalf,
    writer: OwnedWriteHalf,
    buf: BytesMut,
    local: SocketAddr,
    locally_initiated: bool,
}

impl Conn {
    fn new(stream: TcpStream, locally_initiated: bool) -> std::io::Result<Conn> {
        let local = stream.local_addr()?;
        stream.set_nodelay(true)?;
        let (reader, writer) = stream.into_split();
        Ok(Conn {
            reader,
            writer,
            buf: BytesMut::with_capacity(4096),
            local,
            locally_initiated,
        })
    }
}

/// A second connection during a collision (§6.8), with its own FSM.
struct Secondary {
    conn: Conn,
    fsm: Fsm,
    deadline: Instant,
}

struct Session {
    peer: PeerConfig,
    speaker: SpeakerConfig,
    shared: Arc<PeerShared>,
    rib: mpsc::UnboundedSender<RibCmd>,
    fsm: Fsm,
    primary: Option<Conn>,
    secondary: Option<Secondary>,
    timers: [Option<Instant>; 3],
    idle_restart: Option<Instant>,
    connect_attempt: u64,
    connect_tx: mpsc::UnboundedSender<(u64, std::io::Result<TcpStream>)>,
    generation: u64,
    removed: bool,
    /// Peer's graceful restart capability on the current session (for the helper role).
    peer_gr: Option<GracefulRestart>,
    ctx: DecodeContext,
    restart_window_end: Instant,
}

enum Wake {
    Command(Option<PeerCmd>),
    Primary(std::io::Result<usize>),
    Secondary(std::io::Result<usize>),
    Routes(Option<PeerOut>),
    Connected(Option<(u64, std::io::Result<TcpStream>)>),
    Timer,
}

fn timer_index(timer: Timer) -> usize {
    match timer {
        Timer::ConnectRetry => 0,
        Timer::Hold => 1,
        Timer::Keepalive => 2,
    }
}

const TIMERS: [Timer; 3] = [Timer::ConnectRetry, Timer::Hold, Timer::Keepalive];

async fn read_some(conn: &mut Option<Conn>) -> std::io::Result<usize> {
    match conn {
        Some(c) => {
            c.buf.reserve(READ_RESERVE);
            c.reader.read_buf(&mut c.buf).await
        }
        None => std::future::pending().await,
    }
}

async fn read_secondary(sec: &mut Option<Secondary>) -> std::io::Result<usize> {
    match sec {
        Some(s) => {
            s.conn.buf.reserve(READ_RESERVE);
            s.conn.reader.read_buf(&mut s.conn.buf).await
        }
        None => std::future::pending().await,
    }
}

pub(crate) async fn run(params: SessionParams) {
    let span = info_span!("bgp_peer", peer = %params.peer.address);
    run_inner(params).instrument(span).await
}

fn fsm_config(
    peer: &PeerConfig,
    speaker: &SpeakerConfig,
    passive: bool,
    restarting: bool,
) -> FsmConfig {
    let mut capabilities = vec![
        Capability::MultiProtocol {
            afi: Afi::Ipv4.code(),
            safi: SAFI_UNICAST,
        },
        Capability::MultiProtocol {
            afi: Afi::Ipv6.code(),
            safi: SAFI_UNICAST,
        },
        Capability::RouteRefresh,
    ];
    if let Some(gr) = &speaker.graceful_restart {
        capabilities.push(Capability::GracefulRestart(GracefulRestart {
            restart_state: restarting,
            notification: false,
            restart_time: gr.restart_time,
            families: [Afi::Ipv4, Afi::Ipv6]
                .iter()
                .map(|afi| GracefulRestartFamily {
                    afi: afi.code(),
                    safi: SAFI_UNICAST,
                    forwarding_preserved: gr.forwarding_preserved,
                })
                .collect(),
        }));
    }
    FsmConfig {
        local_as: speaker.local_as,
        local_id: speaker.router_id,
        remote_as: peer.remote_as,
        hold_time: peer.hold_time,
        connect_retry: speaker.connect_retry,
        passive,
        capabilities,
    }
}

async fn run_inner(params: SessionParams) {
    let SessionParams {
        peer,
        speaker,
        shared,
        rib,
        mut commands,
        mut routes,
        restart_window_end,
    } = params;
    let (connect_tx, mut connect_rx) = mpsc::unbounded_channel();
    let restarting = speaker
        .graceful_restart
        .as_ref()
        .is_some_and(|gr| gr.restarting);
    let fsm = Fsm::new(fsm_config(&peer, &speaker, peer.passive, restarting));
    let mut s = Session {
        peer,
        speaker,
        shared,
        rib,
        fsm,
        primary: None,
        secondary: None,
        timers: [None; 3],
        idle_restart: None,
        connect_attempt: 0,
        connect_tx,
        generation: 0,
        removed: false,
        peer_gr: None,
        ctx: DecodeContext::default(),
        restart_window_end,
    };
    let start = if s.peer.passive {
        Event::ManualStart_with_PassiveTcpEstablishment
    } else {
        Event::ManualStart
    };
    s.feed(start).await;
    while !s.removed {
        let deadline = s.next_deadline();
        let wake = tokio::select! {
            cmd = commands.recv() => Wake::Command(cmd),
            r = read_some(&mut s.primary) => Wake::Primary(r),
            r = read_secondary(&mut s.secondary) => Wake::Secondary(r),
            out = routes.recv() => Wake::Routes(out),
            c = connect_rx.recv() => Wake::Connected(c),
            () = sleep_until_opt(deadline) => Wake::Timer,
        };
        match wake {
            // The speaker handle is gone, or the RIB task is: the speaker was dropped, which
            // must look like a crash to the peer (connection closed, no NOTIFICATION), so a
            // graceful-restart helper keeps our routes. `remove_peer` sends `Remove` first.
            Wake::Command(None) => s.abandon(),
            Wake::Routes(None) if s.rib.is_closed() => s.abandon(),
            // The RIB closing our route channel while it runs means the peer was removed.
            Wake::Command(Some(PeerCmd::Remove)) | Wake::Routes(None) => {
                s.removed = true;
                s.feed(Event::ManualStop).await;
                s.secondary = None;
            }
            Wake::Command(Some(PeerCmd::Incoming(stream))) => s.incoming(stream).await,
            Wake::Command(Some(PeerCmd::RequestRefresh)) => s.request_refresh().await,
            Wake::Primary(r) => s.on_primary_read(r).await,
            Wake::Secondary(r) => s.on_secondary_read(r).await,
            Wake::Routes(Some(out)) => s.send_routes(out).await,
            Wake::Connected(Some((attempt, result))) => s.connected(attempt, result).await,
            Wake::Connected(None) => {}
            Wake::Timer => s.fire_timers().await,
        }
    }
    s.shared.set_state(State::Idle);
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

impl Session {
    /// End the task without a NOTIFICATION: the connections just close.
    fn abandon(&mut self) {
        debug!("bgp speaker dropped; closing the connection without NOTIFICATION");
        self.removed = true;
        self.primary = None;
        self.secondary = None;
    }

    /// A fresh FSM for a new connection attempt. The Restart State bit is only announced
    /// while the restart window after start-up lasts (RFC 4724 §3).
    fn new_fsm(&self, passive: bool) -> Fsm {
        let restarting = self
            .speaker
            .graceful_restart
            .as_ref()
            .is_some_and(|gr| gr.restarting)
            && Instant::now() < self.restart_window_end;
        Fsm::new(fsm_config(&self.peer, &self.speaker, passive, restarting))
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.timers
            .iter()
            .flatten()
            .copied()
            .chain(self.idle_restart)
            .chain(self.secondary.as_ref().map(|s| s.deadline))
            .min()
    }

    async fn fire_timers(&mut self) {
        let now = Instant::now();
        if let Some(sec) = &self.secondary
            && sec.deadline <= now
        {
            debug!("colliding connection sent no OPEN in time; dropping it");
            self.secondary = None;
        }
        if self.idle_restart.is_some_and(|t| t <= now) {
            self.idle_restart = None;
            self.fsm = self.new_fsm(self.peer.passive);
            let event = if self.peer.passive {
                Event::AutomaticStart_with_PassiveTcpEstablishment
            } else {
                Event::AutomaticStart
            };
            self.feed(event).await;
        }
        for timer in TIMERS {
            let i = timer_index(timer);
            if self.timers[i].is_some_and(|t| t <= now) {
                self.timers[i] = None;
                let event = match timer {
                    Timer::ConnectRetry => Event::ConnectRetryTimer_Expires,
                    Timer::Hold => Event::HoldTimer_Expires,
                    Timer::Keepalive => Event::KeepaliveTimer_Expires,
                };
                if timer == Timer::Hold {
                    self.shared.set_error("hold timer expired".into());
                }
                self.feed(event).await;
            }
        }
    }

    /// Feed the primary FSM and carry out its actions.
    async fn feed(&mut self, event: Event) {
        // Actions can fail in ways that are themselves FSM events (a write that cannot
        // complete is a TCP failure); those are queued rather than fed recursively.
        let mut queue = std::collections::VecDeque::from([event]);
        let mut bounded = 0;
        while let Some(event) = queue.pop_front() {
            bounded += 1;
            for action in self.fsm.on_event(event) {
                if let Some(follow_up) = self.perform(action).await
                    && bounded < 8
                {
                    queue.push_back(follow_up);
                }
            }
        }
        self.shared.set_state(self.fsm.state());
        if self.fsm.state() == State::Idle && !self.removed && self.idle_restart.is_none() {
            self.idle_restart = Some(Instant::now() + self.speaker.connect_retry);
        }
    }

    /// How long one write may take before the connection counts as failed: a peer that
    /// stops reading must not stall this task past its hold time.
    fn write_limit(&self) -> Duration {
        match self.fsm.negotiated().map(|n| n.hold_time) {
            Some(hold) if hold > 0 => Duration::from_secs(hold.into()),
            _ => crate::fsm::LARGE_HOLD_TIME,
        }
    }

    /// Write to the primary connection; `Err` means the connection is unusable.
    async fn write_primary(&mut self, bytes: &[u8], messages: u64) -> Result<(), ()> {
        let limit = self.write_limit();
        let Some(conn) = self.primary.as_mut() else {
            return Ok(());
        };
        match tokio::time::timeout(limit, conn.writer.write_all(bytes)).await {
            Ok(Ok(())) => {
                self.shared.count_out(messages);
                Ok(())
            }
            Ok(Err(e)) => {
                debug!(error = %e, "bgp write failed");
                self.shared.set_error(format!("write: {e}"));
                Err(())
            }
            Err(_) => {
                warn!(?limit, "bgp write stalled: peer is not reading");
                self.shared
                    .set_error(format!("write stalled for {limit:?}"));
                Err(())
            }
        }
    }

    async fn perform(&mut self, action: Action) -> Option<Event> {
        match action {
            Action::Connect => self.start_connect(),
            Action::Disconnect => {
                self.connect_attempt += 1;
                if let Some(mut conn) = self.primary.take() {
                    let _ = conn.writer.shutdown().await;
                }
            }
            Action::Send(message) => {
                if let Message::Notification(n) = &message {
                    warn!(%n, "bgp sending NOTIFICATION");
                    self.shared.set_error(format!("sent {n}"));
                }
                let mut buf = BytesMut::with_capacity(64);
                message.encode(&mut buf, &self.ctx);
                let is_notification = matches!(message, Message::Notification(_));
                // After a NOTIFICATION the connection is closed anyway.
                if self.write_primary(&buf, 1).await.is_err() && !is_notification {
                    return Some(Event::TcpConnectionFails);
                }
            }
            Action::StartTimer(timer, after) => {
                self.timers[timer_index(timer)] = Some(Instant::now() + after);
            }
            Action::StopTimer(timer) => self.timers[timer_index(timer)] = None,
            Action::SessionUp(negotiated) => self.session_up(negotiated),
            Action::SessionDown(reason) => self.session_down(reason),
        }
        None
    }

    fn start_connect(&mut self) {
        self.connect_attempt += 1;
        let attempt = self.connect_attempt;
        let params = socket::ConnectParams {
            remote: SocketAddr::new(self.peer.address, self.peer.port),
            source: self.peer.source_address,
            md5_key: self
                .peer
                .md5_password
                .as_ref()
                .map(|p| p.as_bytes().to_vec()),
            ttl: self.peer.ttl,
            timeout: self.speaker.connect_retry,
        };
        let tx = self.connect_tx.clone();
        tokio::spawn(async move {
            let result = socket::connect(params).await;
            let _ = tx.send((attempt, result));
        });
    }

    async fn connected(&mut self, attempt: u64, result: std::io::Result<TcpStream>) {
        if attempt != self.connect_attempt || self.fsm.state() != State::Connect {
            return;
        }
        match result.and_then(|stream| Conn::new(stream, true)) {
            Ok(conn) => {
                self.ctx = DecodeContext::default();
                self.primary = Some(conn);
                self.feed(Event::Tcp_CR_Acked).await;
            }
            Err(e) => {
                debug!(error = %e, "bgp connect failed");
                self.shared.set_error(format!("connect: {e}"));
                self.feed(Event::TcpConnectionFails).await;
            }
        }
    }

    async fn incoming(&mut self, stream: TcpStream) {
        if let Some(ttl) = self.peer.ttl
            && let Err(e) = stream.set_ttl(ttl.into())
        {
            debug!(error = %e, "setting TTL on accepted connection");
        }
        let conn = match Conn::new(stream, false) {
            Ok(c) => c,
            Err(e) => {
                debug!(error = %e, "accepted connection unusable");
                return;
            }
        };
        match self.fsm.state() {
            State::Idle | State::Connect | State::Active => {
                if self.removed {
                    return;
                }
                if self.fsm.state() == State::Idle {
                    self.idle_restart = None;
                    self.fsm = self.new_fsm(self.peer.passive);
                    self.feed(Event::AutomaticStart_with_PassiveTcpEstablishment)
                        .await;
                }
                // An outgoing attempt still in flight loses to the connection we already have.
                self.connect_attempt += 1;
                self.ctx = DecodeContext::default();
                self.primary = Some(conn);
                self.feed(Event::TcpConnectionConfirmed).await;
            }
            State::OpenSent | State::OpenConfirm => {
                if self.secondary.is_some() {
                    return;
                }
                let mut fsm = self.new_fsm(true);
                fsm.on_event(Event::ManualStart_with_PassiveTcpEstablishment);
                let mut sec = Secondary {
                    conn,
                    fsm,
                    deadline: Instant::now() + COLLISION_OPEN_WAIT,
                };
                let actions = sec.fsm.on_event(Event::TcpConnectionConfirmed);
                if write_actions(&mut sec.conn, &actions).await.is_ok() {
                    self.secondary = Some(sec);
                }
            }
            State::Established => {
                if self.peer_gr.is_some() && self.speaker.graceful_restart.is_some() {
                    // RFC 4724 §4.2: a new connection from an established GR peer means it restarted.
                    info!("bgp peer reconnected while established: treating as graceful restart");
                    self.feed(Event::TcpConnectionFails).await;
                    self.idle_restart = None;
                    self.fsm = self.new_fsm(self.peer.passive);
                    self.feed(Event::AutomaticStart_with_PassiveTcpEstablishment)
                        .await;
                    self.ctx = DecodeContext::default();
                    self.primary = Some(conn);
                    self.feed(Event::TcpConnectionConfirmed).await;
                } else {
                    debug!("bgp connection while established: closing the new one");
                }
            }
        }
    }

    async fn on_primary_read(&mut self, result: std::io::Result<usize>) {
        match result {
            Ok(0) | Err(_) => {
                if let Err(e) = &result {
                    self.shared.set_error(format!("read: {e}"));
                } else if self.fsm.state() == State::Established {
                    self.shared.set_error("connection closed by peer".into());
                }
                self.feed(Event::TcpConnectionFails).await;
            }
            Ok(_) => loop {
                let Some(conn) = self.primary.as_mut() else {
                    return;
                };
                let message = match frame_length(&conn.buf) {
                    Ok(None) => return,
                    Ok(Some(len)) => {
                        let mut frame = conn.buf.split_to(len).freeze();
                        Message::decode(&mut frame, &self.ctx)
                    }
                    Err(e) => Err(e),
                };
                self.shared.count_in();
                match message {
                    Ok(message) => self.on_message(message).await,
                    Err(e) => {
                        self.shared.set_error(format!("decode: {e}"));
                        let event = error_event(e);
                        self.feed(event).await;
                        return;
                    }
                }
            },
        }
    }

    async fn on_message(&mut self, message: Message) {
        match message {
            Message::Open(open) => {
                if self.secondary.is_some() && !self.resolve_collision_on_primary_open(&open).await
                {
                    return;
                }
                self.feed(Event::BGPOpen(open)).await;
            }
            Message::Keepalive => self.feed(Event::KeepAliveMsg).await,
            Message::Notification(n) => {
                warn!(%n, "bgp received NOTIFICATION");
                self.shared.set_error(format!("received {n}"));
                let event = if n.code == code::OPEN_MESSAGE && n.subcode == 1 {
                    Event::NotifMsgVerErr(n)
                } else {
                    Event::NotifMsg(n)
                };
                self.feed(event).await;
            }
            Message::Update(mut update) => {
                self.feed(Event::UpdateMsg).await;
                if self.fsm.state() != State::Established {
                    return;
                }
                // A session between two speakers sharing one address (::1 in tests) cannot
                // tell "points at us" from "points at the peer"; leave those alone.
                if update.outcome.treat_as_withdraw.is_none()
                    && let Some(local) = self.primary.as_ref().map(|c| c.local.ip())
                    && local != self.peer.address
                {
                    update.outcome.treat_as_withdraw = next_hop_is_local(&update, local);
                }
                if let Some(e) = &update.outcome.treat_as_withdraw {
                    warn!(error = %e, "bgp UPDATE malformed: treat-as-withdraw (RFC 7606)");
                    self.shared.set_error(format!("treat-as-withdraw: {e}"));
                }
                for e in &update.outcome.discarded {
                    debug!(error = %e, "bgp attribute discarded (RFC 7606)");
                }
                let _ = self.rib.send(RibCmd::Update {
                    address: self.peer.address,
                    update,
                });
            }
            Message::RouteRefresh(rr) => {
                self.feed(Event::RouteRefreshMsg).await;
                if self.fsm.state() != State::Established || rr.safi != SAFI_UNICAST {
                    return;
                }
                if let Some(afi) = Afi::from_code(rr.afi) {
                    let _ = self.rib.send(RibCmd::RouteRefresh {
                        address: self.peer.address,
                        afi,
                    });
                }
            }
        }
    }

    /// The primary connection got an OPEN while a colliding connection exists: §6.8.
    /// Returns false if the primary lost and the secondary took its place.
    async fn resolve_collision_on_primary_open(&mut self, open: &crate::wire::Open) -> bool {
        let primary_local = self.primary.as_ref().is_some_and(|c| c.locally_initiated);
        let keep_local = keep_locally_initiated(self.speaker.router_id, open.bgp_id);
        if keep_local == primary_local {
            debug!("bgp collision: keeping the existing connection");
            if let Some(mut sec) = self.secondary.take() {
                let actions = sec.fsm.on_event(Event::OpenCollisionDump);
                let _ = write_actions(&mut sec.conn, &actions).await;
            }
            true
        } else {
            debug!("bgp collision: switching to the peer's connection");
            self.promote_secondary().await;
            false
        }
    }

    /// Replace the primary connection and FSM by the secondary ones (the old primary, if it
    /// got past Active, is closed with Cease 7).
    async fn promote_secondary(&mut self) {
        let Some(sec) = self.secondary.take() else {
            return;
        };
        if matches!(
            self.fsm.state(),
            State::OpenSent | State::OpenConfirm | State::Established
        ) {
            self.feed(Event::OpenCollisionDump).await;
        } else if let Some(mut old) = self.primary.take() {
            let _ = old.writer.shutdown().await;
        }
        self.connect_attempt += 1;
        self.idle_restart = None;
        self.fsm = sec.fsm;
        self.timers = [None, Some(sec.deadline), None];
        self.ctx = DecodeContext::default();
        self.primary = Some(sec.conn);
        self.shared.set_state(self.fsm.state());
    }

    async fn on_secondary_read(&mut self, result: std::io::Result<usize>) {
        let Some(sec) = self.secondary.as_mut() else {
            return;
        };
        let mut frame = match result {
            Ok(0) | Err(_) => {
                self.secondary = None;
                return;
            }
            Ok(_) => match frame_length(&sec.conn.buf) {
                Ok(None) => return,
                Ok(Some(len)) => sec.conn.buf.split_to(len).freeze(),
                Err(_) => {
                    self.secondary = None;
                    return;
                }
            },
        };
        let open = match Message::decode(&mut frame, &DecodeContext::default()) {
            Ok(Message::Open(open)) => open,
            _ => {
                self.secondary = None;
                return;
            }
        };
        self.shared.count_in();
        let primary_wins = match self.fsm.state() {
            State::Idle | State::Connect | State::Active => false,
            State::Established => true,
            State::OpenSent | State::OpenConfirm => {
                let primary_local = self.primary.as_ref().is_some_and(|c| c.locally_initiated);
                keep_locally_initiated(self.speaker.router_id, open.bgp_id) == primary_local
            }
        };
        if primary_wins {
            debug!("bgp collision: keeping the existing connection");
            if let Some(mut sec) = self.secondary.take() {
                let actions = sec.fsm.on_event(Event::OpenCollisionDump);
                let _ = write_actions(&mut sec.conn, &actions).await;
            }
            return;
        }
        debug!("bgp collision: switching to the peer's connection");
        self.promote_secondary().await;
        self.feed(Event::BGPOpen(open)).await;
        if self.primary.as_ref().is_some_and(|c| !c.buf.is_empty()) {
            self.on_primary_read(Ok(1)).await;
        }
    }

    async fn request_refresh(&mut self) {
        let Some(negotiated) = self.fsm.negotiated().cloned() else {
            return;
        };
        if self.fsm.state() != State::Established || !negotiated.route_refresh {
            debug!(
                "route refresh not possible: session not established or capability not negotiated"
            );
            return;
        }
        for afi in negotiated.families() {
            let message = Message::RouteRefresh(crate::wire::RouteRefresh {
                afi: afi.code(),
                subtype: 0,
                safi: SAFI_UNICAST,
            });
            if let Some(event) = self.perform(Action::Send(message)).await {
                self.feed(event).await;
                return;
            }
        }
    }

    fn session_up(&mut self, negotiated: Negotiated) {
        self.generation += 1;
        self.ctx = negotiated.ctx;
        self.peer_gr = negotiated.peer_graceful_restart.clone();
        let local_ip = self.primary.as_ref().map(|c| c.local.ip());
        let (v4, v6) = match local_ip {
            Some(IpAddr::V4(v4)) => (Some(v4), None),
            Some(IpAddr::V6(v6)) => (v6.to_ipv4_mapped(), Some(v6)),
            None => (None, None),
        };
        info!(
            remote_id = %negotiated.remote_id,
            hold_time = negotiated.hold_time,
            families = ?negotiated.families(),
            "bgp session established"
        );
        let preserved = negotiated.peer_graceful_restart.as_ref().map(|gr| {
            gr.families
                .iter()
                .filter(|f| f.forwarding_preserved && f.safi == SAFI_UNICAST)
                .filter_map(|f| Afi::from_code(f.afi))
                .collect()
        });
        let _ = self.rib.send(RibCmd::PeerUp {
            address: self.peer.address,
            generation: self.generation,
            session: PeerSession {
                remote_id: negotiated.remote_id,
                families: negotiated.families(),
                next_hop_v4: self.peer.next_hop_v4.or(v4),
                next_hop_v6: self.peer.next_hop_v6.or(v6),
            },
            preserved,
        });
    }

    fn session_down(&mut self, reason: DownReason) {
        info!(?reason, "bgp session down");
        let keep_stale: Vec<Afi> = match (&self.peer_gr, &self.speaker.graceful_restart) {
            (Some(gr), Some(_)) if reason.is_graceful_candidate() && gr.restart_time > 0 => gr
                .families
                .iter()
                .filter(|f| f.safi == SAFI_UNICAST)
                .filter_map(|f| Afi::from_code(f.afi))
                .collect(),
            _ => Vec::new(),
        };
        let restart_time =
            Duration::from_secs(self.peer_gr.as_ref().map_or(0, |gr| gr.restart_time.into()));
        self.generation += 1;
        let _ = self.rib.send(RibCmd::PeerDown {
            address: self.peer.address,
            keep_stale,
            restart_time,
        });
    }

    async fn send_routes(&mut self, out: PeerOut) {
        if out.generation != self.generation || self.fsm.state() != State::Established {
            return;
        }
        let updates = build_updates(&out.changes, &self.ctx);
        if updates.is_empty() {
            return;
        }
        let mut buf = BytesMut::with_capacity(4096);
        for update in &updates {
            Message::Update(Box::new(update.clone())).encode(&mut buf, &self.ctx);
        }
        if self
            .write_primary(&buf, updates.len() as u64)
            .await
            .is_err()
        {
            self.feed(Event::TcpConnectionFails).await;
        }
    }
}

/// RFC 4271 §6.3: a NEXT_HOP that is the receiving speaker's own address is semantically
/// incorrect (the route would point back at us); RFC 7606 §7.3 makes that treat-as-withdraw.
/// `local` is our end of the session, IPv4-mapped when accepted on a dual-stack listener.
fn next_hop_is_local(update: &Update, local: IpAddr) -> Option<DecodeError> {
    let (local_v4, local_v6) = match local {
        IpAddr::V4(v4) => (Some(v4), None),
        IpAddr::V6(v6) => (v6.to_ipv4_mapped(), Some(v6)),
    };
    if let (Some(next_hop), Some(own)) = (update.attributes.next_hop, local_v4)
        && next_hop == own
        && !update.nlri.is_empty()
    {
        let [a, b, c, d] = next_hop.octets();
        let attribute = bytes::Bytes::copy_from_slice(&[0x40, 3, 4, a, b, c, d]);
        return Some(DecodeError::InvalidNextHopAttribute { attribute });
    }
    let reach = update.mp_reach.as_ref().filter(|r| !r.nlri.is_empty())?;
    let own = match reach.next_hop {
        crate::wire::NextHop::V4(v4) => local_v4.filter(|own| *own == v4).map(IpAddr::V4),
        crate::wire::NextHop::V6 { global, .. } => {
            local_v6.filter(|own| *own == global).map(IpAddr::V6)
        }
    };
    own.map(|_| DecodeError::InvalidNextHopAttribute {
        attribute: bytes::Bytes::new(),
    })
}

/// Turn a decode error into the FSM event that carries it (by NOTIFICATION code).
fn error_event(e: DecodeError) -> Event {
    match e.notification_code().0 {
        code::MESSAGE_HEADER => Event::BGPHeaderErr(e),
        code::OPEN_MESSAGE => Event::BGPOpenMsgErr(e),
        _ => Event::UpdateMsgErr(e),
    }
}

async fn write_actions(conn: &mut Conn, actions: &[Action]) -> std::io::Result<()> {
    for action in actions {
        if let Action::Send(message) = action {
            let mut buf = BytesMut::with_capacity(64);
            message.encode(&mut buf, &DecodeContext::default());
            tokio::time::timeout(COLLISION_OPEN_WAIT, conn.writer.write_all(&buf))
                .await
                .map_err(|_| {
                    std::io::Error::new(std::io::ErrorKind::TimedOut, "write stalled")
                })??;
        }
    }
    Ok(())
}

/// Pack outbound changes into UPDATEs: End-of-RIB markers stay after everything queued
/// before them; between markers the last change per prefix wins, withdrawals go first and
/// announcements are grouped by shared attributes.
pub(crate) fn build_updates(changes: &[OutChange], ctx: &DecodeContext) -> Vec<Update> {
    let mut updates = Vec::new();
    let mut segment_start = 0;
    for (i, change) in changes.iter().enumerate() {
        if let OutChange::EndOfRib(afi) = change {
            pack_segment(&changes[segment_start..i], ctx, &mut updates);
            updates.push(Update::end_of_rib(*afi));
            segment_start = i + 1;
        }
    }
    pack_segment(&changes[segment_start..], ctx, &mut updates);
    updates
}

fn pack_segment(segment: &[OutChange], ctx: &DecodeContext, updates: &mut Vec<Update>) {
    if segment.is_empty() {
        return;
    }
    let prefix_of = |c: &OutChange| match c {
        OutChange::Announce(p, _) | OutChange::Withdraw(p) => Some(*p),
        OutChange::EndOfRib(_) => None,
    };
    let mut last: HashMap<IpNet, usize> = HashMap::with_capacity(segment.len());
    for (i, change) in segment.iter().enumerate() {
        if let Some(p) = prefix_of(change) {
            last.insert(p, i);
        }
    }
    let mut withdrawn: Vec<IpNet> = Vec::new();
    let mut groups: Vec<(Arc<RouteAttrs>, Vec<IpNet>)> = Vec::new();
    let mut group_of: HashMap<(*const RouteAttrs, Afi), usize> = HashMap::new();
    for (i, change) in segment.iter().enumerate() {
        match change {
            OutChange::Withdraw(p) if last.get(p) == Some(&i) => withdrawn.push(*p),
            OutChange::Announce(p, attrs) if last.get(p) == Some(&i) => {
                let key = (Arc::as_ptr(attrs), family_of_prefix(p));
                let index = *group_of.entry(key).or_insert_with(|| {
                    groups.push((attrs.clone(), Vec::new()));
                    groups.len() - 1
                });
                groups[index].1.push(*p);
            }
            _ => {}
        }
    }
    updates.extend(Update::withdrawals(&withdrawn));
    for (attrs, prefixes) in groups {
        updates.extend(Update::announcements(
            &attrs.path,
            attrs.next_hop,
            &prefixes,
            ctx,
        ));
    }
}

fn family_of_prefix(prefix: &IpNet) -> Afi {
    match prefix {
        IpNet::V4(_) => Afi::Ipv4,
        IpNet::V6(_) => Afi::Ipv6,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{NextHop, Origin, PathAttributes};
    use std::net::Ipv4Addr;

    fn attrs(next_hop: [u8; 4]) -> Arc<RouteAttrs> {
        Arc::new(RouteAttrs {
            next_hop: NextHop::V4(Ipv4Addr::from(next_hop)),
            path: PathAttributes {
                origin: Some(Origin::Igp),
                ..Default::default()
            },
        })
    }

    fn p(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn packing_groups_shared_attributes_into_one_update() {
        let a = attrs([10, 0, 0, 1]);
        let changes: Vec<OutChange> = (0..100u32)
            .map(|i| OutChange::Announce(p(&format!("10.{}.{}.0/24", i / 256, i % 256)), a.clone()))
            .collect();
        let updates = build_updates(&changes, &DecodeContext::default());
        assert_eq!(updates.len(), 1);
        assert_eq!(updates[0].nlri.len(), 100);
        assert_eq!(
            updates[0].attributes.next_hop,
            Some(Ipv4Addr::new(10, 0, 0, 1))
        );
    }

    #[test]
    fn packing_keeps_only_the_last_change_per_prefix() {
        let a = attrs([10, 0, 0, 1]);
        let b = attrs([10, 0, 0, 2]);
        let changes = vec![
            OutChange::Announce(p("10.1.0.0/16"), a.clone()),
            OutChange::Withdraw(p("10.1.0.0/16")),
            OutChange::Withdraw(p("10.2.0.0/16")),
            OutChange::Announce(p("10.2.0.0/16"), b.clone()),
        ];
        let updates = build_updates(&changes, &DecodeContext::default());
        assert_eq!(updates.len(), 2, "{updates:?}");
        assert_eq!(updates[0].withdrawn, vec!["10.1.0.0/16".parse().unwrap()]);
        assert_eq!(updates[1].nlri, vec!["10.2.0.0/16".parse().unwrap()]);
        assert_eq!(
            updates[1].attributes.next_hop,
            Some(Ipv4Addr::new(10, 0, 0, 2))
        );
    }

    #[test]
    fn end_of_rib_follows_everything_queued_before_it() {
        let a = attrs([10, 0, 0, 1]);
        let changes = vec![
            OutChange::Announce(p("10.1.0.0/16"), a.clone()),
            OutChange::EndOfRib(Afi::Ipv4),
            OutChange::Announce(p("10.2.0.0/16"), a),
        ];
        let updates = build_updates(&changes, &DecodeContext::default());
        assert_eq!(updates.len(), 3);
        assert_eq!(updates[1].end_of_rib_family(), Some(Afi::Ipv4));
        assert_eq!(updates[2].nlri, vec!["10.2.0.0/16".parse().unwrap()]);
    }
}
