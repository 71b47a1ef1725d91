//! The RFC 4271 §8 session state machine, without I/O: events in, actions out.
//!
//! One [`Fsm`] drives one TCP connection. The runtime owns sockets and clocks: it turns
//! socket and timer happenings into [`Event`]s and carries out the returned [`Action`]s.
//! Connection collisions (§6.8) involve two connections, so the runtime runs two `Fsm`s
//! and asks [`keep_locally_initiated`] which survives; the loser gets `OpenCollisionDump`.
//!
//! Deviations from the RFC text, on purpose:
//! - Optional session attributes DelayOpen, DampPeerOscillations and the IdleHoldTimer are
//!   not implemented; the runtime waits ConnectRetryTime before an automatic restart from Idle.
//! - A passive peer stays in Active when the ConnectRetryTimer expires instead of connecting.

use crate::wire::{
    Afi, Capability, DecodeContext, DecodeError, GracefulRestart, Message, Notification, Open,
    SAFI_UNICAST, code,
};
use std::net::Ipv4Addr;
use std::time::Duration;

/// Hold timer value while waiting for the peer's OPEN (RFC 4271 §8: "4 minutes is suggested").
pub const LARGE_HOLD_TIME: Duration = Duration::from_secs(240);

/// Session states (RFC 4271 §8.2.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum State {
    /// Refusing connections, waiting for a start event.
    Idle,
    /// Waiting for an outgoing TCP connection to complete.
    Connect,
    /// Listening for an incoming TCP connection.
    Active,
    /// OPEN sent, waiting for the peer's OPEN.
    OpenSent,
    /// OPENs exchanged, waiting for KEEPALIVE.
    OpenConfirm,
    /// Session up: UPDATEs flow.
    Established,
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self, f)
    }
}

/// The three timers the FSM arms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Timer {
    /// ConnectRetryTimer.
    ConnectRetry,
    /// HoldTimer.
    Hold,
    /// KeepaliveTimer.
    Keepalive,
}

/// Input events, named as in RFC 4271 §8.1 (events 1-28 that tortie uses).
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Event 1: operator starts the peer, active connection.
    ManualStart,
    /// Event 2: operator stops the peer.
    ManualStop,
    /// Event 3: automatic restart, active connection.
    AutomaticStart,
    /// Event 4: operator starts the peer, passive only.
    ManualStart_with_PassiveTcpEstablishment,
    /// Event 5: automatic restart, passive only.
    AutomaticStart_with_PassiveTcpEstablishment,
    /// Event 8: the system stops the peer (e.g. it was de-configured).
    AutomaticStop,
    /// Event 9.
    ConnectRetryTimer_Expires,
    /// Event 10.
    HoldTimer_Expires,
    /// Event 11.
    KeepaliveTimer_Expires,
    /// Event 16: our outgoing connection completed.
    Tcp_CR_Acked,
    /// Event 17: an incoming connection was accepted.
    TcpConnectionConfirmed,
    /// Event 18: the connection failed or was closed by the peer.
    TcpConnectionFails,
    /// Event 19: a valid OPEN arrived.
    BGPOpen(Open),
    /// Event 21: a message header error.
    BGPHeaderErr(DecodeError),
    /// Event 22: an OPEN message error.
    BGPOpenMsgErr(DecodeError),
    /// Event 23: this connection lost a collision (§6.8).
    OpenCollisionDump,
    /// Event 24: NOTIFICATION with a version error.
    NotifMsgVerErr(Notification),
    /// Event 25: any other NOTIFICATION.
    NotifMsg(Notification),
    /// Event 26.
    KeepAliveMsg,
    /// Event 27: a valid UPDATE (including RFC 7606 treat-as-withdraw ones).
    UpdateMsg,
    /// Event 28: an UPDATE error that resets the session.
    UpdateMsgErr(DecodeError),
    /// A ROUTE-REFRESH arrived (RFC 2918; restarts the hold timer like any message).
    RouteRefreshMsg,
}

/// Why an Established session went down.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DownReason {
    /// ManualStop or AutomaticStop.
    Stopped,
    /// Our hold timer expired.
    HoldTimerExpired,
    /// The peer sent a NOTIFICATION.
    NotificationReceived(Notification),
    /// We sent a NOTIFICATION because of an error.
    NotificationSent(Notification),
    /// TCP failed or closed.
    ConnectionFailed,
}

impl DownReason {
    /// RFC 4724: keep the peer's routes as stale? Only when the transport died (TCP
    /// failure, or the hold timer ran out on a silent peer). A NOTIFICATION ends the session
    /// for good: tortie does not negotiate RFC 8538's N bit.
    pub fn is_graceful_candidate(&self) -> bool {
        matches!(
            self,
            DownReason::HoldTimerExpired | DownReason::ConnectionFailed
        )
    }
}

/// What the session settled on when both OPENs were exchanged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    /// Peer's AS.
    pub remote_as: u32,
    /// Peer's BGP identifier.
    pub remote_id: Ipv4Addr,
    /// Negotiated hold time in seconds (0 = no hold/keepalive timers).
    pub hold_time: u16,
    /// How the session's bytes are read and written.
    pub ctx: DecodeContext,
    /// Both sides support ROUTE-REFRESH.
    pub route_refresh: bool,
    /// The peer's graceful restart capability, if it sent one.
    pub peer_graceful_restart: Option<GracefulRestart>,
}

impl Negotiated {
    /// Families carried on this session.
    pub fn families(&self) -> Vec<Afi> {
        let mut families = Vec::new();
        if self.ctx.ipv4_unicast {
            families.push(Afi::Ipv4);
        }
        if self.ctx.ipv6_unicast {
            families.push(Afi::Ipv6);
        }
        families
    }
}

/// Output of the FSM for the runtime to carry out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Open a TCP connection to the peer.
    Connect,
    /// Close the TCP connection.
    Disconnect,
    /// Send a message on the connection.
    Send(Message),
    /// (Re)arm a timer.
    StartTimer(Timer, Duration),
    /// Cancel a timer.
    StopTimer(Timer),
    /// The session reached Established.
    SessionUp(Negotiated),
    /// The session left Established.
    SessionDown(DownReason),
}

/// Static settings of one peering.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsmConfig {
    /// Our AS.
    pub local_as: u32,
    /// Our BGP identifier.
    pub local_id: Ipv4Addr,
    /// The AS the peer must have.
    pub remote_as: u32,
    /// Hold time we propose (0 or ≥ 3).
    pub hold_time: u16,
    /// ConnectRetryTime.
    pub connect_retry: Duration,
    /// Never initiate connections.
    pub passive: bool,
    /// Capabilities we send, other than 4-octet AS which is always sent.
    pub capabilities: Vec<Capability>,
}

/// One connection's state machine.
#[derive(Debug, Clone)]
pub struct Fsm {
    config: FsmConfig,
    state: State,
    connect_retry_counter: u32,
    negotiated: Option<Negotiated>,
}

/// §6.8: the connection to keep in a collision is the one initiated by the speaker with
/// the higher BGP identifier. Returns true if that is the locally initiated one.
pub fn keep_locally_initiated(local_id: Ipv4Addr, remote_id: Ipv4Addr) -> bool {
    u32::from(local_id) > u32::from(remote_id)
}

fn cease(subcode: u8) -> Notification {
    Notification::new(code::CEASE, subcode)
}

/// Cease subcodes (RFC 4486).
const CEASE_ADMIN_SHUTDOWN: u8 = 2;
const CEASE_PEER_DECONFIGURED: u8 = 3;
const CEASE_COLLISION: u8 = 7;

impl Fsm {
    /// A new FSM in Idle.
    pub fn new(config: FsmConfig) -> Self {
        Fsm {
            config,
            state: State::Idle,
            connect_retry_counter: 0,
            negotiated: None,
        }
    }

    /// Current state.
    pub fn state(&self) -> State {
        self.state
    }

    /// Negotiated parameters once OPENs were exchanged.
    pub fn negotiated(&self) -> Option<&Negotiated> {
        self.negotiated.as_ref()
    }

    /// ConnectRetryCounter.
    pub fn connect_retry_counter(&self) -> u32 {
        self.connect_retry_counter
    }

    /// Settings.
    pub fn config(&self) -> &FsmConfig {
        &self.config
    }

    /// The OPEN this FSM sends.
    pub fn open_message(&self) -> Open {
        let mut capabilities = self.config.capabilities.clone();
        capabilities.push(Capability::FourOctetAs(self.config.local_as));
        Open {
            asn: self.config.local_as,
            hold_time: self.config.hold_time,
            bgp_id: self.config.local_id,
            capabilities,
        }
    }

    /// Feed one event; returns the actions to perform, in order.
    pub fn on_event(&mut self, event: Event) -> Vec<Action> {
        use Event::*;
        use State::*;
        let mut actions = Vec::new();
        let was_established = self.state == Established;
        match (self.state, event) {
            (Idle, ManualStart) | (Idle, AutomaticStart) => {
                if self.config.passive {
                    actions.push(self.start_connect_retry());
                    self.state = Active;
                } else {
                    actions.push(self.start_connect_retry());
                    actions.push(Action::Connect);
                    self.state = Connect;
                }
            }
            (Idle, ManualStart_with_PassiveTcpEstablishment)
            | (Idle, AutomaticStart_with_PassiveTcpEstablishment) => {
                actions.push(self.start_connect_retry());
                self.state = Active;
            }
            (Idle, _) => {}

            (Connect | Active, ManualStop) => {
                self.connect_retry_counter = 0;
                self.enter_idle(&mut actions);
            }
            (Connect, ConnectRetryTimer_Expires) => {
                actions.push(Action::Disconnect);
                actions.push(self.start_connect_retry());
                actions.push(Action::Connect);
            }
            (Active, ConnectRetryTimer_Expires) => {
                actions.push(self.start_connect_retry());
                if !self.config.passive {
                    actions.push(Action::Connect);
                    self.state = Connect;
                }
            }
            (Connect | Active, Tcp_CR_Acked | TcpConnectionConfirmed) => {
                actions.push(Action::StopTimer(Timer::ConnectRetry));
                actions.push(Action::Send(Message::Open(self.open_message())));
                actions.push(Action::StartTimer(Timer::Hold, LARGE_HOLD_TIME));
                self.state = OpenSent;
            }
            (Connect | Active, _) => {
                self.connect_retry_counter += 1;
                self.enter_idle(&mut actions);
            }

            (OpenSent | OpenConfirm | Established, ManualStop) => {
                self.connect_retry_counter = 0;
                self.notify_and_idle(&mut actions, cease(CEASE_ADMIN_SHUTDOWN));
                self.down(&mut actions, was_established, DownReason::Stopped);
            }
            (OpenSent | OpenConfirm | Established, AutomaticStop) => {
                self.connect_retry_counter += 1;
                self.notify_and_idle(&mut actions, cease(CEASE_PEER_DECONFIGURED));
                self.down(&mut actions, was_established, DownReason::Stopped);
            }
            (OpenSent | OpenConfirm | Established, HoldTimer_Expires) => {
                self.connect_retry_counter += 1;
                self.notify_and_idle(&mut actions, Notification::new(code::HOLD_TIMER_EXPIRED, 0));
                self.down(&mut actions, was_established, DownReason::HoldTimerExpired);
            }
            (OpenSent | OpenConfirm | Established, BGPHeaderErr(e))
            | (OpenSent | OpenConfirm, BGPOpenMsgErr(e))
            | (Established, UpdateMsgErr(e)) => {
                self.connect_retry_counter += 1;
                let n = e.to_notification();
                self.notify_and_idle(&mut actions, n.clone());
                self.down(
                    &mut actions,
                    was_established,
                    DownReason::NotificationSent(n),
                );
            }
            (OpenSent | OpenConfirm | Established, OpenCollisionDump) => {
                self.connect_retry_counter += 1;
                self.notify_and_idle(&mut actions, cease(CEASE_COLLISION));
                self.down(&mut actions, was_established, DownReason::Stopped);
            }
            (OpenSent, TcpConnectionFails) => {
                // §8.2.2: back to Active and keep listening.
                actions.push(Action::Disconnect);
                actions.push(Action::StopTimer(Timer::Hold));
                actions.push(self.start_connect_retry());
                self.state = Active;
            }
            (OpenConfirm | Established, TcpConnectionFails) => {
                self.connect_retry_counter += 1;
                self.enter_idle(&mut actions);
                self.down(&mut actions, was_established, DownReason::ConnectionFailed);
            }
            (OpenSent | OpenConfirm | Established, NotifMsg(n) | NotifMsgVerErr(n)) => {
                self.connect_retry_counter += 1;
                self.enter_idle(&mut actions);
                self.down(
                    &mut actions,
                    was_established,
                    DownReason::NotificationReceived(n),
                );
            }
            (OpenSent, BGPOpen(open)) => match self.negotiate(&open) {
                Ok(negotiated) => {
                    actions.push(Action::StopTimer(Timer::ConnectRetry));
                    actions.push(Action::Send(Message::Keepalive));
                    self.arm_session_timers(&mut actions, negotiated.hold_time);
                    self.negotiated = Some(negotiated);
                    self.state = OpenConfirm;
                }
                Err(e) => {
                    self.connect_retry_counter += 1;
                    self.notify_and_idle(&mut actions, e.to_notification());
                }
            },
            (OpenConfirm | Established, KeepaliveTimer_Expires) => {
                actions.push(Action::Send(Message::Keepalive));
                if let Some(n) = &self.negotiated {
                    actions.push(Action::StartTimer(
                        Timer::Keepalive,
                        keepalive_interval(n.hold_time),
                    ));
                }
            }
            (OpenConfirm, KeepAliveMsg) => {
                if let Some(n) = self.negotiated.clone() {
                    if n.hold_time > 0 {
                        actions.push(Action::StartTimer(
                            Timer::Hold,
                            Duration::from_secs(n.hold_time.into()),
                        ));
                    }
                    self.state = Established;
                    actions.push(Action::SessionUp(n));
                }
            }
            (Established, KeepAliveMsg | UpdateMsg | RouteRefreshMsg) => {
                if let Some(n) = &self.negotiated
                    && n.hold_time > 0
                {
                    actions.push(Action::StartTimer(
                        Timer::Hold,
                        Duration::from_secs(n.hold_time.into()),
                    ));
                }
            }
            // A second connection while established is the runtime's business (collision or GR restart).
            (Established, Tcp_CR_Acked | TcpConnectionConfirmed) => {}
            (state @ (OpenSent | OpenConfirm | Established), _) => {
                // RFC 6608 subcodes: 1 OpenSent, 2 OpenConfirm, 3 Established.
                let subcode = match state {
                    OpenSent => 1,
                    OpenConfirm => 2,
                    _ => 3,
                };
                self.connect_retry_counter += 1;
                let n = Notification::new(code::FSM, subcode);
                self.notify_and_idle(&mut actions, n.clone());
                self.down(
                    &mut actions,
                    was_established,
                    DownReason::NotificationSent(n),
                );
            }
        }
        actions
    }

    fn start_connect_retry(&self) -> Action {
        Action::StartTimer(Timer::ConnectRetry, self.config.connect_retry)
    }

    fn arm_session_timers(&self, actions: &mut Vec<Action>, hold_time: u16) {
        if hold_time == 0 {
            actions.push(Action::StopTimer(Timer::Hold));
            actions.push(Action::StopTimer(Timer::Keepalive));
        } else {
            actions.push(Action::StartTimer(
                Timer::Keepalive,
                keepalive_interval(hold_time),
            ));
            actions.push(Action::StartTimer(
                Timer::Hold,
                Duration::from_secs(hold_time.into()),
            ));
        }
    }

    fn enter_idle(&mut self, actions: &mut Vec<Action>) {
        actions.push(Action::Disconnect);
        actions.push(Action::StopTimer(Timer::ConnectRetry));
        actions.push(Action::StopTimer(Timer::Hold));
        actions.push(Action::StopTimer(Timer::Keepalive));
        self.state = State::Idle;
    }

    fn notify_and_idle(&mut self, actions: &mut Vec<Action>, notification: Notification) {
        actions.push(Action::Send(Message::Notification(notification)));
        self.enter_idle(actions);
    }

    fn down(&mut self, actions: &mut Vec<Action>, was_established: bool, reason: DownReason) {
        if was_established {
            actions.push(Action::SessionDown(reason));
        }
    }

    /// Check the peer's OPEN against our configuration and settle the session parameters.
    fn negotiate(&self, open: &Open) -> Result<Negotiated, DecodeError> {
        if open.asn != self.config.remote_as {
            return Err(DecodeError::BadPeerAs(open.asn));
        }
        if open.bgp_id.is_unspecified()
            || (open.bgp_id == self.config.local_id && open.asn == self.config.local_as)
        {
            return Err(DecodeError::BadBgpIdentifier(open.bgp_id));
        }
        if open.hold_time == 1 || open.hold_time == 2 {
            return Err(DecodeError::UnacceptableHoldTime(open.hold_time));
        }
        let hold_time = open.hold_time.min(self.config.hold_time);
        let ours = self.open_message();
        let their_families = open.families();
        let our_families = ours.families();
        let both = |afi: Afi| {
            let f = (afi.code(), SAFI_UNICAST);
            their_families.contains(&f) && our_families.contains(&f)
        };
        Ok(Negotiated {
            remote_as: open.asn,
            remote_id: open.bgp_id,
            hold_time,
            ctx: DecodeContext {
                four_octet_as: open.four_octet_as(),
                ipv4_unicast: both(Afi::Ipv4),
                ipv6_unicast: both(Afi::Ipv6),
            },
            route_refresh: open.route_refresh() && ours.route_refresh(),
            peer_graceful_restart: open.graceful_restart().cloned(),
        })
    }
}

/// KeepaliveTime: one third of the hold time, at least a second.
pub fn keepalive_interval(hold_time: u16) -> Duration {
    Duration::from_secs(u64::from((hold_time / 3).max(1)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(passive: bool) -> FsmConfig {
        FsmConfig {
            local_as: 64512,
            local_id: Ipv4Addr::new(10, 0, 0, 1),
            remote_as: 64512,
            hold_time: 90,
            connect_retry: Duration::from_secs(5),
            passive,
            capabilities: vec![
                Capability::MultiProtocol { afi: 1, safi: 1 },
                Capability::MultiProtocol { afi: 2, safi: 1 },
                Capability::RouteRefresh,
            ],
        }
    }

    fn peer_open(hold_time: u16) -> Open {
        Open {
            asn: 64512,
            hold_time,
            bgp_id: Ipv4Addr::new(10, 0, 0, 2),
            capabilities: vec![
                Capability::MultiProtocol { afi: 1, safi: 1 },
                Capability::RouteRefresh,
                Capability::FourOctetAs(64512),
            ],
        }
    }

    fn sent_notification(actions: &[Action]) -> Option<(u8, u8)> {
        actions.iter().find_map(|a| match a {
            Action::Send(Message::Notification(n)) => Some((n.code, n.subcode)),
            _ => None,
        })
    }

    fn established(hold_time: u16) -> Fsm {
        let mut fsm = Fsm::new(config(false));
        fsm.on_event(Event::ManualStart);
        fsm.on_event(Event::Tcp_CR_Acked);
        fsm.on_event(Event::BGPOpen(peer_open(hold_time)));
        let actions = fsm.on_event(Event::KeepAliveMsg);
        assert!(
            matches!(actions.last(), Some(Action::SessionUp(_))),
            "{actions:?}"
        );
        fsm
    }

    #[test]
    fn manual_start_connects_and_arms_connect_retry() {
        let mut fsm = Fsm::new(config(false));
        let actions = fsm.on_event(Event::ManualStart);
        assert_eq!(fsm.state(), State::Connect);
        assert_eq!(
            actions,
            vec![
                Action::StartTimer(Timer::ConnectRetry, Duration::from_secs(5)),
                Action::Connect
            ]
        );
    }

    #[test]
    fn passive_start_waits_in_active_and_never_connects() {
        let mut fsm = Fsm::new(config(true));
        let actions = fsm.on_event(Event::ManualStart_with_PassiveTcpEstablishment);
        assert_eq!(fsm.state(), State::Active);
        assert!(!actions.contains(&Action::Connect));
        let actions = fsm.on_event(Event::ConnectRetryTimer_Expires);
        assert_eq!(fsm.state(), State::Active);
        assert!(!actions.contains(&Action::Connect));
    }

    #[test]
    fn active_peer_reconnects_when_connect_retry_expires() {
        let mut fsm = Fsm::new(config(false));
        fsm.on_event(Event::ManualStart);
        let actions = fsm.on_event(Event::ConnectRetryTimer_Expires);
        assert_eq!(fsm.state(), State::Connect);
        assert!(actions.contains(&Action::Connect));
    }

    #[test]
    fn tcp_established_sends_open_and_arms_large_hold_timer() {
        let mut fsm = Fsm::new(config(false));
        fsm.on_event(Event::ManualStart);
        let actions = fsm.on_event(Event::Tcp_CR_Acked);
        assert_eq!(fsm.state(), State::OpenSent);
        assert!(
            matches!(&actions[1], Action::Send(Message::Open(o)) if o.asn == 64512 && o.hold_time == 90)
        );
        assert!(actions.contains(&Action::StartTimer(Timer::Hold, LARGE_HOLD_TIME)));
    }

    #[test]
    fn open_negotiates_minimum_hold_time_and_keepalive_third() {
        let mut fsm = Fsm::new(config(false));
        fsm.on_event(Event::ManualStart);
        fsm.on_event(Event::Tcp_CR_Acked);
        let actions = fsm.on_event(Event::BGPOpen(peer_open(30)));
        assert_eq!(fsm.state(), State::OpenConfirm);
        assert!(actions.contains(&Action::Send(Message::Keepalive)));
        assert!(actions.contains(&Action::StartTimer(Timer::Hold, Duration::from_secs(30))));
        assert!(actions.contains(&Action::StartTimer(
            Timer::Keepalive,
            Duration::from_secs(10)
        )));
        let n = fsm.negotiated().unwrap();
        assert_eq!(n.hold_time, 30);
        assert!(n.ctx.four_octet_as && n.ctx.ipv4_unicast && !n.ctx.ipv6_unicast);
        assert!(n.route_refresh);
    }

    #[test]
    fn hold_time_zero_disables_hold_and_keepalive_timers() {
        let mut fsm = Fsm::new(config(false));
        fsm.on_event(Event::ManualStart);
        fsm.on_event(Event::Tcp_CR_Acked);
        let actions = fsm.on_event(Event::BGPOpen(peer_open(0)));
        assert!(actions.contains(&Action::StopTimer(Timer::Hold)));
        assert!(actions.contains(&Action::StopTimer(Timer::Keepalive)));
        let actions = fsm.on_event(Event::KeepAliveMsg);
        assert!(
            !actions
                .iter()
                .any(|a| matches!(a, Action::StartTimer(Timer::Hold, _)))
        );
        assert_eq!(fsm.state(), State::Established);
    }

    #[test]
    fn open_with_hold_time_2_sends_notification_2_6() {
        let mut fsm = Fsm::new(config(false));
        fsm.on_event(Event::ManualStart);
        fsm.on_event(Event::Tcp_CR_Acked);
        let actions = fsm.on_event(Event::BGPOpen(peer_open(2)));
        assert_eq!(sent_notification(&actions), Some((2, 6)));
        assert_eq!(fsm.state(), State::Idle);
    }

    #[test]
    fn open_from_wrong_as_sends_notification_2_2() {
        let mut fsm = Fsm::new(config(false));
        fsm.on_event(Event::ManualStart);
        fsm.on_event(Event::Tcp_CR_Acked);
        let mut open = peer_open(90);
        open.asn = 65000;
        let actions = fsm.on_event(Event::BGPOpen(open));
        assert_eq!(sent_notification(&actions), Some((2, 2)));
        assert_eq!(fsm.state(), State::Idle);
    }

    #[test]
    fn ibgp_open_with_our_identifier_sends_notification_2_3() {
        let mut fsm = Fsm::new(config(false));
        fsm.on_event(Event::ManualStart);
        fsm.on_event(Event::Tcp_CR_Acked);
        let mut open = peer_open(90);
        open.bgp_id = Ipv4Addr::new(10, 0, 0, 1);
        assert_eq!(
            sent_notification(&fsm.on_event(Event::BGPOpen(open))),
            Some((2, 3))
        );
    }

    #[test]
    fn keepalive_in_open_confirm_establishes_the_session() {
        let fsm = established(90);
        assert_eq!(fsm.state(), State::Established);
    }

    #[test]
    fn hold_timer_expiry_sends_notification_4_0() {
        let mut fsm = established(90);
        let actions = fsm.on_event(Event::HoldTimer_Expires);
        assert_eq!(sent_notification(&actions), Some((4, 0)));
        assert!(actions.contains(&Action::SessionDown(DownReason::HoldTimerExpired)));
        assert!(actions.contains(&Action::Disconnect));
        assert_eq!(fsm.state(), State::Idle);
    }

    #[test]
    fn hold_timer_expiry_in_open_sent_sends_notification_4_0_without_session_down() {
        let mut fsm = Fsm::new(config(false));
        fsm.on_event(Event::ManualStart);
        fsm.on_event(Event::Tcp_CR_Acked);
        let actions = fsm.on_event(Event::HoldTimer_Expires);
        assert_eq!(sent_notification(&actions), Some((4, 0)));
        assert!(!actions.iter().any(|a| matches!(a, Action::SessionDown(_))));
    }

    #[test]
    fn keepalive_timer_sends_keepalive_and_rearms() {
        let mut fsm = established(90);
        let actions = fsm.on_event(Event::KeepaliveTimer_Expires);
        assert_eq!(
            actions,
            vec![
                Action::Send(Message::Keepalive),
                Action::StartTimer(Timer::Keepalive, Duration::from_secs(30))
            ]
        );
    }

    #[test]
    fn update_restarts_hold_timer() {
        let mut fsm = established(90);
        let actions = fsm.on_event(Event::UpdateMsg);
        assert_eq!(
            actions,
            vec![Action::StartTimer(Timer::Hold, Duration::from_secs(90))]
        );
    }

    #[test]
    fn update_error_sends_its_notification_and_goes_idle() {
        let mut fsm = established(90);
        let actions = fsm.on_event(Event::UpdateMsgErr(DecodeError::InvalidNetworkField(
            "test",
        )));
        assert_eq!(sent_notification(&actions), Some((3, 10)));
        assert_eq!(fsm.state(), State::Idle);
    }

    #[test]
    fn manual_stop_in_established_sends_cease_2() {
        let mut fsm = established(90);
        let actions = fsm.on_event(Event::ManualStop);
        assert_eq!(sent_notification(&actions), Some((6, 2)));
        assert!(actions.contains(&Action::SessionDown(DownReason::Stopped)));
    }

    #[test]
    fn notification_received_drops_session_without_replying() {
        let mut fsm = established(90);
        let n = Notification::new(6, 4);
        let actions = fsm.on_event(Event::NotifMsg(n.clone()));
        assert_eq!(sent_notification(&actions), None);
        assert!(actions.contains(&Action::SessionDown(DownReason::NotificationReceived(n))));
    }

    #[test]
    fn update_in_open_sent_is_fsm_error_5_1() {
        let mut fsm = Fsm::new(config(false));
        fsm.on_event(Event::ManualStart);
        fsm.on_event(Event::Tcp_CR_Acked);
        assert_eq!(
            sent_notification(&fsm.on_event(Event::UpdateMsg)),
            Some((5, 1))
        );
    }

    #[test]
    fn open_in_established_is_fsm_error_5_3() {
        let mut fsm = established(90);
        assert_eq!(
            sent_notification(&fsm.on_event(Event::BGPOpen(peer_open(90)))),
            Some((5, 3))
        );
    }

    #[test]
    fn tcp_failure_in_open_sent_returns_to_active() {
        let mut fsm = Fsm::new(config(false));
        fsm.on_event(Event::ManualStart);
        fsm.on_event(Event::Tcp_CR_Acked);
        fsm.on_event(Event::TcpConnectionFails);
        assert_eq!(fsm.state(), State::Active);
    }

    #[test]
    fn tcp_failure_in_connect_goes_idle_and_counts() {
        let mut fsm = Fsm::new(config(false));
        fsm.on_event(Event::ManualStart);
        fsm.on_event(Event::TcpConnectionFails);
        assert_eq!(fsm.state(), State::Idle);
        assert_eq!(fsm.connect_retry_counter(), 1);
    }

    #[test]
    fn collision_dump_sends_cease_7() {
        let mut fsm = Fsm::new(config(false));
        fsm.on_event(Event::ManualStart);
        fsm.on_event(Event::Tcp_CR_Acked);
        fsm.on_event(Event::BGPOpen(peer_open(90)));
        let actions = fsm.on_event(Event::OpenCollisionDump);
        assert_eq!(sent_notification(&actions), Some((6, 7)));
        assert_eq!(fsm.state(), State::Idle);
    }

    #[test]
    fn collision_keeps_connection_initiated_by_higher_identifier() {
        let low = Ipv4Addr::new(10, 0, 0, 1);
        let high = Ipv4Addr::new(10, 0, 0, 2);
        assert!(!keep_locally_initiated(low, high));
        assert!(keep_locally_initiated(high, low));
    }

    #[test]
    fn events_in_idle_are_ignored() {
        let mut fsm = Fsm::new(config(false));
        assert!(fsm.on_event(Event::KeepAliveMsg).is_empty());
        assert!(fsm.on_event(Event::HoldTimer_Expires).is_empty());
        assert_eq!(fsm.state(), State::Idle);
    }

    #[test]
    fn graceful_restart_applies_only_to_transport_failures() {
        assert!(DownReason::HoldTimerExpired.is_graceful_candidate());
        assert!(DownReason::ConnectionFailed.is_graceful_candidate());
        assert!(!DownReason::Stopped.is_graceful_candidate());
        assert!(!DownReason::NotificationReceived(Notification::new(6, 2)).is_graceful_candidate());
        assert!(!DownReason::NotificationSent(Notification::new(3, 1)).is_graceful_candidate());
    }

    #[test]
    fn recorded_event_sequence_replays_to_identical_actions() {
        // A full life cycle: connect, establish, traffic, hold expiry, automatic restart.
        let events = vec![
            Event::ManualStart,
            Event::Tcp_CR_Acked,
            Event::BGPOpen(peer_open(90)),
            Event::KeepAliveMsg,
            Event::UpdateMsg,
            Event::KeepaliveTimer_Expires,
            Event::RouteRefreshMsg,
            Event::HoldTimer_Expires,
            Event::AutomaticStart,
            Event::TcpConnectionFails,
        ];
        let run = || {
            let mut fsm = Fsm::new(config(false));
            let log: Vec<(State, Vec<Action>)> = events
                .iter()
                .map(|e| {
                    let actions = fsm.on_event(e.clone());
                    (fsm.state(), actions)
                })
                .collect();
            (log, fsm.connect_retry_counter())
        };
        let (first, counter) = run();
        assert_eq!(first, run().0);
        let states: Vec<State> = first.iter().map(|(s, _)| *s).collect();
        assert_eq!(
            states,
            vec![
                State::Connect,
                State::OpenSent,
                State::OpenConfirm,
                State::Established,
                State::Established,
                State::Established,
                State::Established,
                State::Idle,
                State::Connect,
                State::Idle,
            ]
        );
        assert_eq!(
            counter, 2,
            "hold expiry and the failed reconnect both count"
        );
    }
}
