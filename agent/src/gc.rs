//! IPAM garbage collection (calico-kube-controllers' IPAM job), run by one agent at a time:
//! the holder of the `tortie-ipam-gc` Lease releases leaked pod addresses and deleted nodes' IPAM.
//! The holder keeps the cluster's Pods in a watch (their names and IPs only) while it leads;
//! the Nodes come from the agent's own Node watch.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use anyhow::Result;
use futures::StreamExt;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::Client;
use kube::api::{Api, PostParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use tokio::sync::watch;
use tortie_ipam::{Ipam, LeakCollector, LiveState};
use tracing::{info, warn};

use crate::cluster::NodeInfo;
use crate::datastore::ipam_store::KubeIpamStore;
use crate::datastore::watch::Snapshot;

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

/// Runs forever: renew or take the lease; while holding it, keep a Pod watch and run a
/// collection pass per interval.
pub async fn run(
    client: Client,
    ipam: Arc<Ipam<KubeIpamStore>>,
    nodes: watch::Receiver<Arc<Snapshot<NodeInfo>>>,
    cfg: GcConfig,
) {
    let mut collector = LeakCollector::new(cfg.grace);
    let mut pods: Option<PodWatch> = None;
    let mut tick = tokio::time::interval(cfg.interval);
    loop {
        tick.tick().await;
        let leading = match try_hold_lease(&client, &cfg.identity, cfg.lease_seconds).await {
            Ok(leading) => leading,
            Err(e) => {
                warn!(error = %e, "IPAM GC lease: cannot renew; standing down");
                false
            }
        };
        if leading != pods.is_some() {
            info!(leading, "IPAM garbage collection leadership changed");
            // Only the leader pays for watching every Pod in the cluster.
            pods = leading.then(|| PodWatch::start(client.clone()));
        }
        let Some(pods) = &pods else {
            continue;
        };
        let Some(live) = live_state(pods, &nodes) else {
            info!("IPAM GC: waiting for the first list of Pods and Nodes");
            continue;
        };
        match collector.collect(&ipam, &live, SystemTime::now()).await {
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
        }
    }
}

/// Pods by namespace and name with their IPs; `synced` once the first list is in.
#[derive(Debug, Default)]
struct PodIndex {
    pods: BTreeMap<(String, String), Vec<IpAddr>>,
    synced: bool,
}

impl PodIndex {
    fn key_and_ips(pod: &Pod) -> ((String, String), Vec<IpAddr>) {
        let key = (
            pod.metadata.namespace.clone().unwrap_or_default(),
            pod.metadata.name.clone().unwrap_or_default(),
        );
        let ips = pod
            .status
            .as_ref()
            .and_then(|s| s.pod_ips.as_ref())
            .into_iter()
            .flatten()
            .filter_map(|ip| ip.ip.parse().ok())
            .collect();
        (key, ips)
    }
}

/// The leader's Pod watch; dropping it stops the watch.
struct PodWatch {
    index: Arc<Mutex<PodIndex>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for PodWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl PodWatch {
    fn start(client: Client) -> PodWatch {
        let index: Arc<Mutex<PodIndex>> = Arc::default();
        let shared = index.clone();
        let task = tokio::spawn(async move {
            let api: Api<Pod> = Api::all(client);
            let stream = watcher::watcher(api, watcher::Config::default()).default_backoff();
            futures::pin_mut!(stream);
            let mut relisting: Option<BTreeMap<(String, String), Vec<IpAddr>>> = None;
            while let Some(ev) = stream.next().await {
                let lock = || {
                    shared
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                };
                match ev {
                    Ok(Event::Apply(pod)) => {
                        let (key, ips) = PodIndex::key_and_ips(&pod);
                        lock().pods.insert(key, ips);
                    }
                    Ok(Event::Delete(pod)) => {
                        lock().pods.remove(&PodIndex::key_and_ips(&pod).0);
                    }
                    Ok(Event::Init) => relisting = Some(BTreeMap::new()),
                    Ok(Event::InitApply(pod)) => {
                        if let Some(r) = relisting.as_mut() {
                            let (key, ips) = PodIndex::key_and_ips(&pod);
                            r.insert(key, ips);
                        }
                    }
                    Ok(Event::InitDone) => {
                        let mut index = lock();
                        if let Some(r) = relisting.take() {
                            index.pods = r;
                        }
                        index.synced = true;
                    }
                    // Keeps the last view: a collection on it only ever sees Pods that existed.
                    Err(e) => warn!(error = %e, "IPAM GC: Pod watch failed; retrying"),
                }
            }
        });
        PodWatch { index, task }
    }
}

/// What exists now, or `None` until both the Pod and the Node lists have arrived (an empty
/// view would make every allocation look leaked).
fn live_state(
    pods: &PodWatch,
    nodes: &watch::Receiver<Arc<Snapshot<NodeInfo>>>,
) -> Option<LiveState> {
    let nodes = nodes.borrow().clone();
    let index = pods
        .index
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if !index.synced || !nodes.synced {
        return None;
    }
    let mut live = LiveState::default();
    for (key, ips) in &index.pods {
        live.pods.insert(key.clone(), ips.clone());
    }
    live.nodes.extend(nodes.objects.keys().cloned());
    Some(live)
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
