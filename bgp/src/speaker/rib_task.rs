//! The task that owns the RIB: applies peer and operator commands, fans out the results.

use super::PeerShared;
use crate::rib::{
    BestChange, BestPath, OutChange, PeerSession, PeerSettings, Rib, RibConfig, RibOutput,
};
use crate::wire::{Afi, Update};
use ipnet::IpNet;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::time::Instant;
use tracing::{debug, info};

/// Outbound changes for one peer, tagged with the session they were computed for.
#[derive(Debug)]
pub(crate) struct PeerOut {
    pub generation: u64,
    pub changes: Vec<OutChange>,
}

pub(crate) enum RibCmd {
    AddPeer {
        address: IpAddr,
        settings: PeerSettings,
        out: mpsc::UnboundedSender<PeerOut>,
        shared: Arc<PeerShared>,
    },
    RemovePeer {
        address: IpAddr,
    },
    PeerUp {
        address: IpAddr,
        generation: u64,
        session: PeerSession,
        /// `None`: the peer sent no graceful restart capability. Otherwise the families
        /// whose forwarding state it preserved (stale routes of other families go now).
        preserved: Option<Vec<Afi>>,
    },
    PeerDown {
        address: IpAddr,
        keep_stale: Vec<Afi>,
        restart_time: Duration,
    },
    Update {
        address: IpAddr,
        update: Box<Update>,
    },
    RouteRefresh {
        address: IpAddr,
        afi: Afi,
    },
    Originate(IpNet),
    Withdraw(IpNet),
    BestPaths(oneshot::Sender<Vec<(IpNet, BestPath)>>),
}

struct PeerLink {
    out: mpsc::UnboundedSender<PeerOut>,
    shared: Arc<PeerShared>,
    generation: u64,
}

struct RibTask {
    rib: Rib,
    links: HashMap<IpAddr, PeerLink>,
    best: broadcast::Sender<BestChange>,
    stale_deadlines: HashMap<IpAddr, Instant>,
    stale_routes_time: Duration,
}

pub(crate) async fn run(
    config: RibConfig,
    mut commands: mpsc::UnboundedReceiver<RibCmd>,
    best: broadcast::Sender<BestChange>,
    stale_routes_time: Duration,
) {
    let mut task = RibTask {
        rib: Rib::new(config),
        links: HashMap::new(),
        best,
        stale_deadlines: HashMap::new(),
        stale_routes_time,
    };
    loop {
        let next_deadline = task.stale_deadlines.values().min().copied();
        let sleep = async {
            match next_deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            cmd = commands.recv() => match cmd {
                Some(cmd) => task.handle(cmd),
                None => return,
            },
            () = sleep => task.expire_stale(),
        }
    }
}

impl RibTask {
    fn handle(&mut self, cmd: RibCmd) {
        match cmd {
            RibCmd::AddPeer {
                address,
                settings,
                out,
                shared,
            } => {
                self.rib.add_peer(address, settings);
                self.links.insert(
                    address,
                    PeerLink {
                        out,
                        shared,
                        generation: 0,
                    },
                );
            }
            RibCmd::RemovePeer { address } => {
                let output = self.rib.remove_peer(address);
                self.links.remove(&address);
                self.stale_deadlines.remove(&address);
                self.publish(output, None);
            }
            RibCmd::PeerUp {
                address,
                generation,
                session,
                preserved,
            } => {
                if let Some(link) = self.links.get_mut(&address) {
                    link.generation = generation;
                }
                let mut output = self.rib.peer_up(address, session);
                if self.rib.stale_count(address) > 0 {
                    // RFC 4724 §4.2: families not preserved across the restart lose their stale routes now.
                    for afi in [Afi::Ipv4, Afi::Ipv6] {
                        if !preserved.as_ref().is_some_and(|p| p.contains(&afi)) {
                            merge(&mut output, self.rib.sweep_stale(address, Some(afi)));
                        }
                    }
                    if self.rib.stale_count(address) > 0 {
                        self.stale_deadlines
                            .insert(address, Instant::now() + self.stale_routes_time);
                    }
                }
                self.publish(output, Some(address));
            }
            RibCmd::PeerDown {
                address,
                keep_stale,
                restart_time,
            } => {
                let output = self.rib.peer_down(address, &keep_stale);
                if self.rib.stale_count(address) > 0 {
                    info!(peer = %address, stale = self.rib.stale_count(address), "bgp peer restarting: keeping routes as stale");
                    self.stale_deadlines
                        .insert(address, Instant::now() + restart_time);
                } else {
                    self.stale_deadlines.remove(&address);
                }
                self.publish(output, Some(address));
            }
            RibCmd::Update { address, update } => {
                let mut output = if let Some(afi) = update.end_of_rib_family() {
                    debug!(peer = %address, ?afi, "bgp End-of-RIB received");
                    self.rib.sweep_stale(address, Some(afi))
                } else {
                    self.rib.apply_update(address, &update).0
                };
                if self.stale_deadlines.contains_key(&address) && self.rib.stale_count(address) == 0
                {
                    self.stale_deadlines.remove(&address);
                }
                // Keep the output ordering stable even when nothing changed.
                output.out.retain(|(_, c)| !c.is_empty());
                self.publish(output, Some(address));
            }
            RibCmd::RouteRefresh { address, afi } => {
                let changes = self.rib.refresh(address, afi);
                if let Some(link) = self.links.get(&address) {
                    let _ = link.out.send(PeerOut {
                        generation: link.generation,
                        changes,
                    });
                }
            }
            RibCmd::Originate(prefix) => {
                let output = self.rib.originate(prefix);
                self.publish(output, None);
            }
            RibCmd::Withdraw(prefix) => {
                let output = self.rib.withdraw_local(prefix);
                self.publish(output, None);
            }
            RibCmd::BestPaths(reply) => {
                let _ = reply.send(self.rib.best_paths());
            }
        }
    }

    fn expire_stale(&mut self) {
        let now = Instant::now();
        let expired: Vec<IpAddr> = self
            .stale_deadlines
            .iter()
            .filter(|(_, d)| **d <= now)
            .map(|(a, _)| *a)
            .collect();
        for address in expired {
            self.stale_deadlines.remove(&address);
            info!(peer = %address, stale = self.rib.stale_count(address), "bgp restart/stale timer expired: sweeping stale routes");
            let output = self.rib.sweep_stale(address, None);
            self.publish(output, Some(address));
        }
    }

    fn publish(&mut self, output: RibOutput, touched: Option<IpAddr>) {
        for change in output.best {
            // No subscriber is fine: the agent may not listen yet.
            let _ = self.best.send(change);
        }
        for (address, changes) in output.out {
            if let Some(link) = self.links.get(&address) {
                let _ = link.out.send(PeerOut {
                    generation: link.generation,
                    changes,
                });
                if let Some(counts) = self.rib.peer_counts(address) {
                    link.shared.set_prefix_counts(counts);
                }
            }
        }
        if let Some(address) = touched
            && let (Some(link), Some(counts)) =
                (self.links.get(&address), self.rib.peer_counts(address))
        {
            link.shared.set_prefix_counts(counts);
        }
    }
}

fn merge(into: &mut RibOutput, more: RibOutput) {
    into.best.extend(more.best);
    into.out.extend(more.out);
}
