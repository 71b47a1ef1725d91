//! IPAM garbage collection (calico-kube-controllers' IPAM job), run by one agent at a time:
//! the holder of the `tortie-ipam-gc` Lease releases leaked pod addresses and deleted nodes' IPAM.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::Client;
use kube::api::{Api, ListParams, PostParams};
use tortie_ipam::{Ipam, LeakCollector, LiveState};
use tracing::{info, warn};

use crate::datastore::ipam_store::KubeIpamStore;

pub const LEASE_NAME: &str = "tortie-ipam-gc";
const LEASE_NAMESPACE: &str = "kube-system";

/// Settings for the collector task.
#[derive(Debug, Clone)]
pub struct GcConfig {
    pub identity: String,
    pub interval: Duration,
    pub grace: Duration,
    /// How long the lease stays ours without renewal: after a holder dies, another agent
    /// takes over within this time (renewals happen every `interval`).
    pub lease_seconds: i32,
}

/// Runs forever: renew or take the lease; while holding it, run a collection pass per interval.
pub async fn run(client: Client, ipam: Arc<Ipam<KubeIpamStore>>, cfg: GcConfig) {
    let mut collector = LeakCollector::new(cfg.grace);
    let mut leading = false;
    let mut tick = tokio::time::interval(cfg.interval);
    loop {
        tick.tick().await;
        match try_hold_lease(&client, &cfg.identity, cfg.lease_seconds).await {
            Ok(now_leading) => {
                if now_leading != leading {
                    info!(
                        leading = now_leading,
                        "IPAM garbage collection leadership changed"
                    );
                    leading = now_leading;
                }
            }
            Err(e) => {
                warn!(error = %e, "IPAM GC lease: cannot renew; standing down");
                leading = false;
            }
        }
        if !leading {
            continue;
        }
        match live_state(&client).await {
            Ok(live) => match collector.collect(&ipam, &live, SystemTime::now()).await {
                Ok(report) if !report.released.is_empty() || !report.released_nodes.is_empty() => {
                    info!(
                        released = report.released.len(),
                        handles = ?report.released_handles,
                        nodes = ?report.released_nodes,
                        "IPAM garbage collected"
                    )
                }
                Ok(_) => {}
                Err(e) => warn!(error = %e, "IPAM garbage collection pass failed"),
            },
            Err(e) => warn!(error = %e, "IPAM GC: listing pods and nodes failed"),
        }
    }
}

async fn live_state(client: &Client) -> Result<LiveState> {
    let pods: Api<Pod> = Api::all(client.clone());
    let nodes: Api<Node> = Api::all(client.clone());
    let mut live = LiveState::default();
    for p in pods
        .list(&ListParams::default())
        .await
        .context("listing Pods")?
    {
        let ns = p.metadata.namespace.clone().unwrap_or_default();
        let name = p.metadata.name.clone().unwrap_or_default();
        let ips = p
            .status
            .and_then(|s| s.pod_ips)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|ip| ip.ip.parse().ok())
            .collect();
        live.pods.insert((ns, name), ips);
    }
    for n in nodes
        .list(&ListParams::default())
        .await
        .context("listing Nodes")?
    {
        if let Some(name) = n.metadata.name {
            live.nodes.insert(name);
        }
    }
    Ok(live)
}

/// Takes the lease if free or expired, renews it if ours; CAS through resourceVersion.
async fn try_hold_lease(client: &Client, identity: &str, lease_seconds: i32) -> Result<bool> {
    let api: Api<Lease> = Api::namespaced(client.clone(), LEASE_NAMESPACE);
    let now = k8s_openapi::jiff::Timestamp::now();
    match api.get_opt(LEASE_NAME).await? {
        None => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(LEASE_NAME.into()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(identity.into()),
                    lease_duration_seconds: Some(lease_seconds),
                    acquire_time: Some(MicroTime(now)),
                    renew_time: Some(MicroTime(now)),
                    ..LeaseSpec::default()
                }),
            };
            match api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                Err(e) => Err(e.into()),
            }
        }
        Some(mut lease) => {
            let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
            let holder = spec.holder_identity.clone().unwrap_or_default();
            let duration = i64::from(spec.lease_duration_seconds.unwrap_or(lease_seconds));
            let expired = spec
                .renew_time
                .as_ref()
                .is_none_or(|t| now.as_second() > t.0.as_second() + duration);
            if holder != identity && !expired {
                return Ok(false);
            }
            if holder != identity {
                spec.acquire_time = Some(MicroTime(now));
                spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
            }
            spec.holder_identity = Some(identity.into());
            spec.lease_duration_seconds = Some(lease_seconds);
            spec.renew_time = Some(MicroTime(now));
            match api
                .replace(LEASE_NAME, &PostParams::default(), &lease)
                .await
            {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                Err(e) => Err(e.into()),
            }
        }
    }
}
