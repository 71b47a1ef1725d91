//! Leak collection (calico-kube-controllers' IPAM garbage collection): allocations whose pod or node is gone, released after a grace period.
//!
//! The collector is a plain struct driven by the caller: each [`LeakCollector::collect`] gets the
//! live pods and nodes and the current time (so tests control the clock). An allocation becomes a
//! *candidate* the first time it looks leaked; it is released only when every allocation of its
//! handle has been a candidate for the whole grace period (all-or-nothing per handle), and each
//! release re-reads the block and CASes only if the allocation is still the one observed (same
//! handle, same allocation sequence number).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use ipnet::IpNet;
use tracing::{debug, info};

use crate::allocator::{Ipam, IpamError};
use crate::block::{ip_to_ordinal, ordinal_to_ip};
use crate::model::{BlockAffinity, IpamBlock, attr, block_name};
use crate::store::{Store, StoreError};

/// Calico's default leak grace period.
pub const DEFAULT_LEAK_GRACE_PERIOD: Duration = Duration::from_secs(15 * 60);

/// What exists right now in the cluster, as the caller's informers see it.
#[derive(Debug, Clone, Default)]
pub struct LiveState {
    /// Live pods by (namespace, name) with their known IPs (empty when not reported yet).
    pub pods: HashMap<(String, String), Vec<IpAddr>>,
    /// Live node names.
    pub nodes: HashSet<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct AllocationKey {
    block: IpNet,
    ip: IpAddr,
    handle_id: String,
    sequence: Option<u64>,
}

/// Outcome of one collection pass.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LeakReport {
    /// Allocations that currently look leaked (including those released now).
    pub candidates: usize,
    /// Addresses released in this pass.
    pub released: Vec<IpAddr>,
    /// Handles released in this pass.
    pub released_handles: Vec<String>,
    /// Nodes gone for the grace period whose blocks, affinities and addresses were released.
    pub released_nodes: Vec<String>,
}

/// Finds and releases leaked allocations; keep one per cluster and call it periodically.
#[derive(Debug, Clone)]
pub struct LeakCollector {
    grace: Duration,
    first_seen: HashMap<AllocationKey, SystemTime>,
    node_first_seen: HashMap<String, SystemTime>,
}

impl Default for LeakCollector {
    fn default() -> Self {
        Self::new(DEFAULT_LEAK_GRACE_PERIOD)
    }
}

/// Why an allocation looks leaked, or `None` when it belongs to something alive (or cannot be
/// judged: allocations without pod or node attributes are never touched).
fn leaked(
    secondary: &BTreeMap<String, String>,
    ip: IpAddr,
    live: &LiveState,
) -> Option<&'static str> {
    if let (Some(ns), Some(pod)) = (secondary.get(attr::NAMESPACE), secondary.get(attr::POD)) {
        return match live.pods.get(&(ns.clone(), pod.clone())) {
            None => Some("pod gone"),
            // A pod re-created under the same name got another address: this one is stale.
            Some(ips) if !ips.is_empty() && !ips.contains(&ip) => Some("pod has other IPs"),
            Some(_) => None,
        };
    }
    let is_tunnel = secondary.get(attr::TYPE).is_some_and(|t| {
        [
            attr::TYPE_IPIP_TUNNEL,
            attr::TYPE_VXLAN_TUNNEL,
            attr::TYPE_VXLAN_V6_TUNNEL,
        ]
        .contains(&t.as_str())
    });
    if is_tunnel
        && let Some(node) = secondary.get(attr::NODE)
        && !live.nodes.contains(node)
    {
        return Some("node gone");
    }
    None
}

async fn still_allocated<S: Store>(ipam: &Ipam<S>, k: &AllocationKey) -> Result<bool, IpamError> {
    match ipam.store().get::<IpamBlock>(&block_name(&k.block)).await {
        Ok(b) => Ok(ip_to_ordinal(&k.block, k.ip).is_some_and(|o| {
            b.spec.handle_at(o) == Some(k.handle_id.as_str()) && b.spec.sequence_at(o) == k.sequence
        })),
        Err(StoreError::NotFound { .. }) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

impl LeakCollector {
    /// A collector with the given grace period.
    pub fn new(grace: Duration) -> Self {
        Self {
            grace,
            first_seen: HashMap::new(),
            node_first_seen: HashMap::new(),
        }
    }

    /// One pass: scan every block, track candidates, release handles whose allocations have all
    /// been leaked for the grace period; then release the IPAM of nodes gone for the grace period.
    ///
    /// `live` must come from synced informers: a pod missing from it counts as gone. As a guard
    /// against an unsynced cache, nodes are only collected when `live.nodes` is not empty.
    pub async fn collect<S: Store>(
        &mut self,
        ipam: &Ipam<S>,
        live: &LiveState,
        now: SystemTime,
    ) -> Result<LeakReport, IpamError> {
        let blocks = ipam.store().list::<IpamBlock>().await?;
        // handle -> (every allocation of it, whether each looks leaked)
        let mut by_handle: BTreeMap<String, Vec<(AllocationKey, bool)>> = BTreeMap::new();
        for b in &blocks {
            let Some(cidr) = b.spec.parsed_cidr() else {
                continue;
            };
            for o in 0..b.spec.allocations.len() as u32 {
                let Some(a) = b.spec.attribute_at(o) else {
                    continue;
                };
                let Some(handle_id) = a.handle_id.clone() else {
                    continue;
                };
                let ip = ordinal_to_ip(&cidr, o);
                let empty = BTreeMap::new();
                let why = leaked(a.secondary.as_ref().unwrap_or(&empty), ip, live);
                if let Some(why) = why {
                    debug!(%ip, handle = %handle_id, why, "leak candidate");
                }
                let key = AllocationKey {
                    block: cidr,
                    ip,
                    handle_id: handle_id.clone(),
                    sequence: b.spec.sequence_at(o),
                };
                by_handle
                    .entry(handle_id)
                    .or_default()
                    .push((key, why.is_some()));
            }
        }

        // Forget candidates that disappeared or came back to life.
        let current: HashSet<&AllocationKey> = by_handle
            .values()
            .flatten()
            .filter(|(_, is_leak)| *is_leak)
            .map(|(k, _)| k)
            .collect();
        self.first_seen.retain(|k, _| current.contains(k));
        for k in &current {
            self.first_seen.entry((*k).clone()).or_insert(now);
        }

        let mut report = LeakReport {
            candidates: self.first_seen.len(),
            ..LeakReport::default()
        };
        for (handle_id, allocs) in &by_handle {
            let ripe = allocs.iter().all(|(k, is_leak)| {
                *is_leak
                    && self
                        .first_seen
                        .get(k)
                        .is_some_and(|t| now.duration_since(*t).unwrap_or_default() >= self.grace)
            });
            if !ripe {
                continue;
            }
            // Re-check every allocation of the handle before touching any of them.
            let mut unchanged = true;
            for (k, _) in allocs {
                if !still_allocated(ipam, k).await? {
                    unchanged = false;
                    break;
                }
            }
            if !unchanged {
                debug!(handle = %handle_id, "allocation changed since observed; not releasing");
                for (k, _) in allocs {
                    self.first_seen.remove(k);
                }
                continue;
            }
            let mut released_any = false;
            for (k, _) in allocs {
                if ipam
                    .release_if_unchanged(k.ip, &k.block, &k.handle_id, k.sequence)
                    .await?
                {
                    report.released.push(k.ip);
                    released_any = true;
                }
                self.first_seen.remove(k);
            }
            if released_any {
                info!(handle = %handle_id, "released leaked allocation");
                report.released_handles.push(handle_id.clone());
            }
        }
        self.collect_nodes(ipam, &blocks, live, now, &mut report)
            .await?;
        report.released.sort();
        Ok(report)
    }

    async fn collect_nodes<S: Store>(
        &mut self,
        ipam: &Ipam<S>,
        blocks: &[IpamBlock],
        live: &LiveState,
        now: SystemTime,
        report: &mut LeakReport,
    ) -> Result<(), IpamError> {
        if live.nodes.is_empty() {
            self.node_first_seen.clear();
            return Ok(());
        }
        let mut owners: BTreeSet<String> = ipam
            .store()
            .list::<BlockAffinity>()
            .await?
            .into_iter()
            .map(|a| a.spec.node)
            .collect();
        owners.extend(
            blocks
                .iter()
                .filter_map(|b| b.spec.affine_node().map(str::to_string)),
        );
        owners.retain(|n| !live.nodes.contains(n));
        // A pod still listed keeps its node's IPAM until the pod is gone too.
        for b in blocks {
            for o in 0..b.spec.allocations.len() as u32 {
                let Some(secondary) = b.spec.attribute_at(o).and_then(|a| a.secondary.as_ref())
                else {
                    continue;
                };
                if let (Some(node), Some(ns), Some(pod)) = (
                    secondary.get(attr::NODE),
                    secondary.get(attr::NAMESPACE),
                    secondary.get(attr::POD),
                ) && live.pods.contains_key(&(ns.clone(), pod.clone()))
                {
                    owners.remove(node);
                }
            }
        }
        self.node_first_seen.retain(|n, _| owners.contains(n));
        for node in owners {
            let since = *self.node_first_seen.entry(node.clone()).or_insert(now);
            if now.duration_since(since).unwrap_or_default() < self.grace {
                continue;
            }
            let released = ipam.release_node(&node).await?;
            info!(node = %node, addresses = released.released.len(), "released IPAM of deleted node");
            report.released.extend(released.released);
            report.released_nodes.push(node.clone());
            self.node_first_seen.remove(&node);
        }
        Ok(())
    }
}
