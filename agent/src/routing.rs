//! BGP glue: turns the cluster view's peer plan and advertised blocks into `tortie-bgp` calls,
//! and its best paths into routes for the dataplane.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::Result;
use ipnet::IpNet;
use k8s_openapi::api::core::v1::Secret;
use kube::Client;
use kube::api::Api;
use tokio::sync::broadcast;
use tortie_bgp::fsm::State;
use tortie_bgp::speaker::{GracefulRestartConfig, PeerConfig, Speaker, SpeakerConfig};
use tortie_bgp::wire::NextHop;
use tracing::{info, warn};

use crate::bootstrap::NodeIdentity;
use crate::cluster::{ClusterView, LearnedRoute, PeerPlan, PeerSource};
use crate::config::Config;
use crate::datastore::calico::SecretKeyRef;

/// Namespace holding BGP password secrets, as for calico-node.
const SECRETS_NAMESPACE: &str = "kube-system";

/// The BGP side of the agent: one speaker, restarted only when the router id or AS changes.
pub struct Routing {
    client: Client,
    listen: SocketAddr,
    node_v4: Option<Ipv4Addr>,
    node_v6: Option<std::net::Ipv6Addr>,
    restarting: bool,
    speaker: Option<(Speaker, SpeakerConfig)>,
    best: Option<broadcast::Receiver<tortie_bgp::rib::BestChange>>,
    learned: BTreeMap<IpNet, LearnedRoute>,
    plans: BTreeMap<IpAddr, PeerPlan>,
    advertised: BTreeSet<IpNet>,
    all_established_since: Option<Instant>,
    /// Connections refused by speakers since replaced (AS or router id changes), so the
    /// counter never goes back.
    refused_by_earlier_speakers: u64,
}

impl Routing {
    pub async fn start(cfg: &Config, node: &NodeIdentity, client: Client) -> Result<Routing> {
        let node_v4 = node.addr_v4.and_then(|a| match a.addr() {
            IpAddr::V4(v4) => Some(v4),
            IpAddr::V6(_) => None,
        });
        let node_v6 = node.addr_v6.and_then(|a| match a.addr() {
            IpAddr::V6(v6) => Some(v6),
            IpAddr::V4(_) => None,
        });
        Ok(Routing {
            client,
            listen: cfg.bgp_listen,
            node_v4,
            node_v6,
            // State left by a previous run means this is a restart: tell peers (RFC 4724 R bit)
            // so they keep our routes while we come back; our kernel routes were kept too.
            restarting: cfg.run_dir.join("workloads.json").exists(),
            speaker: None,
            best: None,
            learned: BTreeMap::new(),
            plans: BTreeMap::new(),
            advertised: BTreeSet::new(),
            all_established_since: None,
            refused_by_earlier_speakers: 0,
        })
    }

    fn router_id(&self, view: &ClusterView) -> Ipv4Addr {
        // A v6-only node still needs a 32-bit identifier: derive a stable one from its name.
        self.node_v4.unwrap_or_else(|| {
            let h = view.me.bytes().fold(0x811c9dc5u32, |h, b| {
                (h ^ u32::from(b)).wrapping_mul(0x01000193)
            });
            Ipv4Addr::from(h)
        })
    }

    /// Makes the speaker match the plan: (re)start it if identity changed, then add, update
    /// and remove peers, and originate/withdraw prefixes by difference.
    pub async fn apply(
        &mut self,
        view: &ClusterView,
        peers: Vec<PeerPlan>,
        advertised: Vec<IpNet>,
    ) {
        let mut want = SpeakerConfig::new(self.router_id(view), view.my_as());
        want.listen = Some(self.listen);
        want.connect_retry = Duration::from_secs(2);
        want.graceful_restart = Some(GracefulRestartConfig {
            restarting: self.restarting,
            forwarding_preserved: true,
            ..GracefulRestartConfig::default()
        });
        if view
            .my_node()
            .and_then(|n| n.rr_cluster_id.as_ref())
            .is_some()
        {
            want.cluster_id = view
                .my_node()
                .and_then(|n| n.rr_cluster_id.as_ref())
                .and_then(|c| c.parse().ok());
        }
        if self.speaker.as_ref().map(|(_, c)| c) != Some(&want) {
            if let Some((old, _)) = self.speaker.take() {
                info!("BGP identity changed; restarting the speaker");
                self.refused_by_earlier_speakers += old.refused_connections();
                old.shutdown().await;
            }
            match Speaker::start(want.clone()).await {
                Ok(s) => {
                    info!(router_id = %want.router_id, asn = want.local_as, listen = %self.listen, "BGP speaker started");
                    self.best = Some(s.subscribe());
                    self.speaker = Some((s, want));
                    self.plans.clear();
                    self.advertised.clear();
                    self.learned.clear();
                }
                Err(e) => {
                    warn!(error = %e, "BGP speaker failed to start; retrying in a second");
                    return;
                }
            }
        }
        let Some((speaker, _)) = &self.speaker else {
            return;
        };
        let speaker = speaker.clone();

        let advertised: BTreeSet<IpNet> = advertised.into_iter().collect();
        for p in advertised.difference(&self.advertised) {
            if let Err(e) = speaker.originate(*p) {
                warn!(prefix = %p, error = %e, "originating a block failed");
            }
        }
        for p in self.advertised.difference(&advertised) {
            if let Err(e) = speaker.withdraw(*p) {
                warn!(prefix = %p, error = %e, "withdrawing a block failed");
            }
        }
        self.advertised = advertised;

        let desired: BTreeMap<IpAddr, PeerPlan> =
            peers.into_iter().map(|p| (p.address, p)).collect();
        for addr in self
            .plans
            .keys()
            .filter(|a| !desired.contains_key(a))
            .copied()
            .collect::<Vec<_>>()
        {
            info!(peer = %addr, "removing BGP peer");
            if let Err(e) = speaker.remove_peer(addr) {
                warn!(peer = %addr, error = %e, "removing a BGP peer failed");
            }
            self.plans.remove(&addr);
        }
        for (addr, plan) in desired {
            if self.plans.get(&addr) == Some(&plan) {
                continue;
            }
            let password = match &plan.password {
                Some(r) => match self.secret(r).await {
                    Ok(p) => Some(p),
                    Err(e) => {
                        warn!(peer = %addr, "{e:#}; the session waits for the secret");
                        continue;
                    }
                },
                None => None,
            };
            let mut pc = PeerConfig::new(addr, plan.remote_as);
            pc.port = plan.port;
            pc.md5_password = password;
            pc.route_reflector_client = plan.rr_client;
            pc.hold_time = 90;
            // An external router (eBGP BGPPeer) learns each block from the node that owns it;
            // re-advertising other nodes' blocks would make nodes transit and can loop.
            pc.export_local_only =
                matches!(plan.source, PeerSource::BgpPeer(_)) && plan.remote_as != view.my_as();
            // IPv6 blocks over an IPv4 session need a real IPv6 next hop (BIRD refuses mapped ones).
            pc.next_hop_v6 = self.node_v6;
            let result = if self.plans.contains_key(&addr) {
                speaker.update_peer(pc)
            } else {
                speaker.add_peer(pc)
            };
            match result {
                Ok(()) => {
                    info!(peer = %addr, remote_as = plan.remote_as, source = ?plan.source, "BGP peer configured");
                    self.plans.insert(addr, plan);
                }
                Err(e) => warn!(peer = %addr, error = %e, "configuring a BGP peer failed"),
            }
        }
    }

    async fn secret(&self, r: &SecretKeyRef) -> Result<String> {
        let api: Api<Secret> = Api::namespaced(self.client.clone(), SECRETS_NAMESPACE);
        let secret = api.get(&r.name).await.map_err(|e| {
            anyhow::anyhow!("BGP password: Secret {SECRETS_NAMESPACE}/{}: {e}", r.name)
        })?;
        let value = secret
            .data
            .and_then(|d| d.get(&r.key).cloned())
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "BGP password: Secret {SECRETS_NAMESPACE}/{} has no key {:?}",
                    r.name,
                    r.key
                )
            })?;
        Ok(String::from_utf8(value.0)?)
    }

    /// False after the speaker failed to start; the agent retries on its next tick.
    pub fn is_running(&self) -> bool {
        self.speaker.is_some()
    }

    pub fn learned(&self) -> Vec<LearnedRoute> {
        self.learned.values().cloned().collect()
    }

    /// Resolves when a best path changed; pending while no speaker runs.
    pub async fn changed(&mut self) -> Option<()> {
        let Some(rx) = self.best.as_mut() else {
            return std::future::pending().await;
        };
        match rx.recv().await {
            Ok(change) => {
                absorb(&mut self.learned, change);
                // Take whatever else is queued so one recompute covers a burst.
                while let Ok(change) = rx.try_recv() {
                    absorb(&mut self.learned, change);
                }
                Some(())
            }
            Err(broadcast::error::RecvError::Lagged(n)) => {
                warn!(
                    missed = n,
                    "best-path stream lagged; re-reading the Loc-RIB"
                );
                if let Some((s, _)) = &self.speaker
                    && let Ok(all) = s.best_paths().await
                {
                    self.learned.clear();
                    for (prefix, best) in all {
                        absorb(
                            &mut self.learned,
                            tortie_bgp::rib::BestChange {
                                prefix,
                                best: Some(best),
                            },
                        );
                    }
                }
                Some(())
            }
            Err(broadcast::error::RecvError::Closed) => {
                self.best = None;
                None
            }
        }
    }

    /// True once every configured peer has been Established for a moment (their initial
    /// tables are in), or there are no peers.
    pub fn converged(&mut self) -> bool {
        let Some((s, _)) = &self.speaker else {
            return false;
        };
        let status = s.peer_status();
        let all_up = status.iter().all(|p| p.state == State::Established);
        if !all_up {
            self.all_established_since = None;
            return false;
        }
        let since = *self.all_established_since.get_or_insert_with(Instant::now);
        status.is_empty() || since.elapsed() >= Duration::from_secs(1)
    }

    /// BGP connections refused since the agent started: they came from an address that is no
    /// configured peer (a node missing from the mesh, a ToR without a BGPPeer).
    pub fn refused_connections(&self) -> u64 {
        self.refused_by_earlier_speakers
            + self
                .speaker
                .as_ref()
                .map_or(0, |(s, _)| s.refused_connections())
    }

    pub fn status(&self) -> serde_json::Value {
        let Some((s, _)) = &self.speaker else {
            return serde_json::json!([]);
        };
        let status: BTreeMap<IpAddr, _> = s
            .peer_status()
            .into_iter()
            .map(|p| (p.address, p))
            .collect();
        serde_json::json!(self
            .plans
            .values()
            .map(|plan| {
                let st = status.get(&plan.address);
                serde_json::json!({
                    "address": plan.address.to_string(),
                    "as": plan.remote_as,
                    "type": match &plan.source { PeerSource::Mesh(n) => format!("node-to-node mesh ({n})"), PeerSource::BgpPeer(n) => format!("BGPPeer {n}") },
                    "state": st.map(|s| format!("{:?}", s.state)).unwrap_or_else(|| "Idle".into()),
                    "since": st.and_then(|s| s.uptime).map(|u| format!("{}s", u.as_secs())),
                    "uptime_seconds": st.and_then(|s| s.uptime).map(|u| u.as_secs_f64()),
                    "prefixes_received": st.map(|s| s.prefixes_received),
                    "prefixes_accepted": st.map(|s| s.prefixes_accepted),
                    "prefixes_advertised": st.map(|s| s.prefixes_advertised),
                    "messages_in": st.map(|s| s.messages_in),
                    "messages_out": st.map(|s| s.messages_out),
                    "last_error": st.and_then(|s| s.last_error.clone()),
                })
            })
            .collect::<Vec<_>>())
    }
}

/// Folds one best-path change into the learned routes (only paths from peers: our own
/// originated blocks are not routes to install).
fn absorb(learned: &mut BTreeMap<IpNet, LearnedRoute>, change: tortie_bgp::rib::BestChange) {
    match change.best {
        Some(best) if best.from.is_some() => {
            let next_hop = match best.attrs.next_hop {
                NextHop::V4(a) => IpAddr::V4(a),
                NextHop::V6 { global, .. } => IpAddr::V6(global),
            };
            learned.insert(
                change.prefix,
                LearnedRoute {
                    prefix: change.prefix,
                    next_hop,
                },
            );
        }
        _ => {
            learned.remove(&change.prefix);
        }
    }
}
