//! The node agent's main loop: datastore caches + BGP + local workloads → desired state →
//! dataplane, and the local API the CNI plugin and `tortie status` use.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::Node;
use kube::Client;
use kube::api::Api;
use kube::core::DynamicObject;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tortie_dataplane as dp;
use tortie_ipam::{
    AutoAssignRequest, BlockAffinity, IpPool, Ipam, IpamBlock, IpamConfig, pod_handle_id,
    validate_pools, workload_attributes,
};
use tracing::{error, info, warn};

use crate::assigner::Assigner;
use crate::bootstrap::{self, NodeIdentity};
use crate::cluster::{ClusterView, LearnedRoute, NodeInfo};
use crate::config::Config;
use crate::datastore::calico::{BgpConfigurationSpec, BgpPeerSpec, api_resource};
use crate::datastore::ipam_store::KubeIpamStore;
use crate::datastore::watch::{Snapshot, spawn_cache};
use crate::local_api::{self, Call, Reply, Request};
use crate::releases::ReleaseQueue;
use crate::routing::Routing;

type Cache<K> = watch::Receiver<Arc<Snapshot<K>>>;

/// A pod on this node as the CNI plugin reported it; persisted so a restarted agent keeps
/// its routes without asking anybody.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalWorkload {
    pub host_if: String,
    pub ips: Vec<IpAddr>,
}

struct Caches {
    nodes: Cache<NodeInfo>,
    pools: Cache<IpPool>,
    blocks: Cache<IpamBlock>,
    bgp_configs: Cache<BgpConfigurationSpec>,
    bgp_peers: Cache<BgpPeerSpec>,
    /// Read by IPAM only (see `ipam_store`): no part of the desired state, so their changes
    /// neither gate nor trigger a recompute.
    ipam_configs: Cache<IpamConfig>,
    affinities: Cache<BlockAffinity>,
}

/// A Calico object as its typed form (the whole object, with metadata but without
/// `managedFields`: the API server keeps those itself, tortie never sends them back, and they
/// are often the larger part of a block held in every cache and copied on every read).
fn decode_object<T: serde::de::DeserializeOwned>(obj: &DynamicObject) -> Result<T, String> {
    let mut value = serde_json::to_value(obj).map_err(|e| format!("does not encode: {e}"))?;
    if let Some(meta) = value.get_mut("metadata").and_then(|m| m.as_object_mut()) {
        meta.remove("managedFields");
    }
    serde_json::from_value(value).map_err(|e| format!("does not decode: {e}"))
}

/// A Calico object's `spec` (an absent spec is an empty one).
fn decode_spec<T: serde::de::DeserializeOwned>(obj: &DynamicObject) -> Result<T, String> {
    let spec = obj
        .data
        .get("spec")
        .cloned()
        .unwrap_or_else(|| serde_json::json!({}));
    serde_json::from_value(spec).map_err(|e| format!("spec does not decode: {e}"))
}

/// What tortie needs of a Node; a bad annotation is reported and that field left unset.
fn decode_node(node: &Node) -> Result<NodeInfo, String> {
    let name = node.metadata.name.clone().unwrap_or_default();
    let ann = node.metadata.annotations.clone().unwrap_or_default();
    let labels = node.metadata.labels.clone().unwrap_or_default();
    let (info, errors) = NodeInfo::from_annotations(&name, &ann, &labels);
    for e in errors {
        warn!("{e}");
    }
    Ok(info)
}

impl Caches {
    fn start(client: &Client) -> Caches {
        let api = |kind: &str| Api::<DynamicObject>::all_with(client.clone(), &api_resource(kind));
        Caches {
            nodes: spawn_cache("Node", Api::all(client.clone()), decode_node),
            pools: spawn_cache("IPPool", api("IPPool"), decode_object::<IpPool>),
            blocks: spawn_cache("IPAMBlock", api("IPAMBlock"), decode_object::<IpamBlock>),
            bgp_configs: spawn_cache(
                "BGPConfiguration",
                api("BGPConfiguration"),
                decode_spec::<BgpConfigurationSpec>,
            ),
            bgp_peers: spawn_cache("BGPPeer", api("BGPPeer"), decode_spec::<BgpPeerSpec>),
            ipam_configs: spawn_cache("IPAMConfig", api("IPAMConfig"), decode_object::<IpamConfig>),
            affinities: spawn_cache(
                "BlockAffinity",
                api("BlockAffinity"),
                decode_object::<BlockAffinity>,
            ),
        }
    }

    /// An IPAM store that reads pools, blocks, affinities and the IPAM config from these caches
    /// once they have listed (and from the API server until then).
    fn ipam_store(&self, client: &Client) -> KubeIpamStore {
        KubeIpamStore::new(client.clone())
            .with_cache(self.pools.clone())
            .with_cache(self.blocks.clone())
            .with_cache(self.affinities.clone())
            .with_cache(self.ipam_configs.clone())
    }

    fn synced(&self) -> bool {
        self.nodes.borrow().synced
            && self.pools.borrow().synced
            && self.blocks.borrow().synced
            && self.bgp_configs.borrow().synced
            && self.bgp_peers.borrow().synced
    }

    async fn changed(&mut self) -> Result<()> {
        tokio::select! {
            r = self.nodes.changed() => r?,
            r = self.pools.changed() => r?,
            r = self.blocks.changed() => r?,
            r = self.bgp_configs.changed() => r?,
            r = self.bgp_peers.changed() => r?,
        }
        Ok(())
    }
}

struct Agent {
    cfg: Config,
    client: Client,
    node: NodeIdentity,
    ipam: Arc<Ipam<KubeIpamStore>>,
    releases: ReleaseQueue<KubeIpamStore>,
    /// ADDs' assignments, one batch at a time: the node's pods share a block, so concurrent
    /// assignments only make each other's compare-and-swap fail (50 ADDs at once, each on its
    /// own: 1.3 s with 5.7 conflicts per pod).
    assigner: Assigner<KubeIpamStore>,
    dataplane: dp::Dataplane,
    routing: Routing,
    workloads: BTreeMap<String, LocalWorkload>,
    view: ClusterView,
    last_pool_modes: Option<Vec<(String, String, String)>>,
    reported_errors: Vec<String>,
    complete: bool,
    network_up_reported: bool,
    started: Instant,
    ready_tx: watch::Sender<bool>,
    metrics_text: crate::http::MetricsText,
    /// natOutgoing's nftables table; `None` when nftables is unusable here (logged once).
    nat: Option<dp::nat::NatOutgoing>,
    last_nat: Option<dp::nat::NatInputs>,
    ticks: u64,
    /// What the CNI config on disk says (MTU, families), once written.
    cni_config_written: Option<(u32, crate::cni::PodFamilies)>,
}

/// How long an ADD waits for a pending release of its own handle before failing (the runtime
/// retries the ADD).
const RELEASE_WAIT_LIMIT: Duration = Duration::from_secs(10);

/// How long a DEL whose release could not be recorded waits for it to be written instead.
const INLINE_RELEASE_LIMIT: Duration = Duration::from_secs(3);

pub async fn run(cfg: Config) -> Result<()> {
    let client = Client::try_default()
        .await
        .context("connecting to the Kubernetes API (KUBECONFIG or in-cluster)")?;
    let node = bootstrap::bootstrap(&client, &cfg).await?;
    // The caches start later (keeping the startup order of the API calls); read pools directly.
    bootstrap::ensure_default_pools(&KubeIpamStore::new(client.clone()), &cfg).await?;

    let dp_config = dp::Config {
        route_protocol: cfg.route_protocol,
        ..dp::Config::default()
    };
    let dataplane = dp::Dataplane::start(dp_config).context("starting the dataplane")?;
    let routing = Routing::start(&cfg, &node, client.clone())
        .await
        .context("starting BGP")?;

    let (calls_tx, mut calls_rx) = mpsc::channel::<Call>(64);
    let socket = local_api::socket_path(&cfg.run_dir);
    tokio::spawn(async move {
        if let Err(e) = local_api::serve(socket, calls_tx).await {
            error!(error = %e, "local API stopped");
        }
    });
    let (ready_tx, ready_rx) = watch::channel(false);
    let metrics_text = crate::http::MetricsText::default();
    crate::http::spawn(
        cfg.health_listen,
        cfg.metrics_listen,
        ready_rx,
        metrics_text.clone(),
    )?;

    let mut caches = Caches::start(&client);
    let ipam = Arc::new(Ipam::new(caches.ipam_store(&client)));
    tokio::spawn(crate::gc::run(
        client.clone(),
        ipam.clone(),
        caches.nodes.clone(),
        crate::gc::GcConfig {
            identity: node.name.clone(),
            interval: Duration::from_secs(cfg.gc_interval_secs),
            grace: Duration::from_secs(cfg.gc_grace_secs),
            lease_seconds: i32::try_from(cfg.gc_lease_secs).unwrap_or(30),
        },
    ));
    let releases = ReleaseQueue::start(ipam.clone(), cfg.run_dir.join("pending-releases.json"));
    let assigner = Assigner::new(ipam.clone(), releases.clone());
    let workloads = load_workloads(&workloads_path(&cfg));
    info!(node = %node.name, workloads = workloads.len(), "agent started");
    let mut agent = Agent {
        view: ClusterView {
            me: node.name.clone(),
            ..ClusterView::default()
        },
        cfg,
        client,
        node,
        ipam,
        releases,
        assigner,
        dataplane,
        routing,
        workloads,
        last_pool_modes: None,
        reported_errors: Vec::new(),
        complete: false,
        network_up_reported: false,
        started: Instant::now(),
        ready_tx,
        metrics_text,
        nat: match dp::nat::NatOutgoing::open() {
            Ok(n) => Some(n),
            Err(e) => {
                error!(error = %e, "nftables unavailable: natOutgoing will not be applied");
                None
            }
        },
        last_nat: None,
        ticks: 0,
        cni_config_written: None,
    };
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            r = caches.changed() => { r?; agent.recompute(&caches).await; }
            Some((req, reply)) = calls_rx.recv() => {
                let changed = agent.handle(req, reply);
                if changed { agent.recompute(&caches).await; }
            }
            Some(()) = agent.routing.changed() => agent.recompute(&caches).await,
            _ = tick.tick() => agent.on_tick(&caches).await,
            _ = tokio::signal::ctrl_c() => break,
            _ = sigterm.recv() => break,
        }
    }
    info!("stopping; kernel routes stay in place for the next start");
    Ok(())
}

fn workloads_path(cfg: &Config) -> PathBuf {
    cfg.run_dir.join("workloads.json")
}

fn load_workloads(path: &std::path::Path) -> BTreeMap<String, LocalWorkload> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            warn!(path = %path.display(), error = %e, "workload state unreadable; starting empty");
            BTreeMap::new()
        }),
        Err(_) => BTreeMap::new(),
    }
}

impl Agent {
    fn save_workloads(&self) {
        let path = workloads_path(&self.cfg);
        let tmp = path.with_extension("json.tmp");
        let write = || -> std::io::Result<()> {
            std::fs::create_dir_all(&self.cfg.run_dir)?;
            std::fs::write(&tmp, serde_json::to_vec(&self.workloads)?)?;
            std::fs::rename(&tmp, &path)
        };
        if let Err(e) = write() {
            error!(path = %path.display(), error = %e, "saving workload state failed");
        }
    }

    fn mtu(&self) -> u32 {
        let encap = self.view.pools.valid.iter().fold(0, |acc, p| {
            // A pod's veth has one MTU for both families: the largest overhead in use wins.
            let o = if p.vxlan_mode.is_enabled() && p.family() == 6 {
                dp::VXLAN_V6_OVERHEAD
            } else if p.vxlan_mode.is_enabled() {
                dp::VXLAN_V4_OVERHEAD
            } else if p.ipip_mode.is_enabled() {
                dp::IPIP_OVERHEAD
            } else {
                0
            };
            acc.max(o)
        });
        self.node.uplink_mtu.saturating_sub(encap)
    }

    /// Handles one local API request; returns whether the desired state changed.
    fn handle(&mut self, req: Request, reply: tokio::sync::oneshot::Sender<Reply>) -> bool {
        match req {
            Request::Assign {
                container_id,
                namespace,
                pod,
                ipv4,
                ipv6,
                host_if,
            } => {
                let releases = self.releases.clone();
                let assigner = self.assigner.clone();
                let node = self.node.clone();
                let mtu = self.mtu();
                // IPAM talks to the API server; do not hold up the loop while it does.
                tokio::spawn(async move {
                    let started = std::time::Instant::now();
                    // A DEL of the pod's previous sandbox may still be removing the veth name
                    // this ADD is about to create.
                    if let Some(host_if) = &host_if
                        && let Err(e) = crate::cni::veth_reaper::VethReaper::shared()
                            .wait_removed(host_if, crate::cni::veth_reaper::ADD_WAIT_LIMIT)
                            .await
                    {
                        let _ = reply.send(Reply::err(format!(
                            "assigning an address to {namespace}/{pod}: {e}"
                        )));
                        return;
                    }
                    let handle_id = pod_handle_id(&container_id);
                    // A DEL of this very sandbox may have been answered with its release still
                    // on the way: this ADD must not be handed what that release will free.
                    if let Err(e) = releases.wait_released(&handle_id, RELEASE_WAIT_LIMIT).await {
                        let _ = reply.send(Reply::err(format!(
                            "assigning an address to {namespace}/{pod}: {e}"
                        )));
                        return;
                    }
                    let result = async {
                        let req = AutoAssignRequest {
                            handle_id,
                            attributes: workload_attributes(
                                &namespace,
                                &pod,
                                &node.name,
                                &k8s_openapi::jiff::Timestamp::now().to_string(),
                            ),
                            node: node.name.clone(),
                            node_labels: node.labels.clone(),
                            num_v4: usize::from(ipv4),
                            num_v6: usize::from(ipv6),
                            pools: Vec::new(),
                            use_: None,
                            // The batch carries the releases waiting (see assigner.rs).
                            release_with: Vec::new(),
                        };
                        // A retried ADD gets the addresses it already has.
                        let a = assigner.assign(req).await?;
                        Ok::<_, crate::assigner::AssignError>(
                            a.ipv4.into_iter().chain(a.ipv6).collect(),
                        )
                    }
                    .await;
                    tracing::debug!(pod = %format!("{namespace}/{pod}"), ms = started.elapsed().as_secs_f64() * 1e3, "assign served");
                    let _ = reply.send(match result {
                        Ok(ips) => Reply {
                            ips,
                            mtu: Some(mtu),
                            ..Reply::ok()
                        },
                        Err(e) => {
                            Reply::err(format!("assigning an address to {namespace}/{pod}: {e}"))
                        }
                    });
                });
                false
            }
            Request::WorkloadUp {
                container_id,
                host_if,
                ips,
            } => {
                self.workloads
                    .insert(container_id, LocalWorkload { host_if, ips });
                self.save_workloads();
                let _ = reply.send(Reply::ok());
                true
            }
            Request::Release {
                container_id,
                host_if,
            } => {
                let removed = self.workloads.remove(&container_id).is_some();
                if removed {
                    self.save_workloads();
                }
                // The host veth goes in the background: its teardown costs the kernel ~20 ms
                // that the runtime need not wait for. The /32 goes with the workload above.
                let host_if_handled = host_if.is_some_and(|host_if| {
                    // A late DEL of an older sandbox must not take the newer sandbox's veth.
                    if let Some((owner, _)) =
                        self.workloads.iter().find(|(_, w)| w.host_if == host_if)
                    {
                        info!(host_if, container = %container_id, owner = %owner, "host interface belongs to a newer sandbox; kept");
                        return true;
                    }
                    match crate::cni::veth_reaper::VethReaper::shared().remove(&host_if) {
                        Ok(removal) => {
                            tracing::debug!(host_if, ?removal, "host interface removal");
                            true
                        }
                        Err(e) => {
                            warn!(container = %container_id, error = %e, "not removing the host interface");
                            false
                        }
                    }
                });
                // The release is recorded and answered; the next ADD's block write carries it
                // (see releases.rs). Only if it cannot be recorded is it written in line.
                let handle_id = pod_handle_id(&container_id);
                let ipam = self.ipam.clone();
                let releases = self.releases.clone();
                tokio::spawn(async move {
                    let released = match releases.enqueue(&handle_id) {
                        Ok(()) => Reply::ok(),
                        Err(persist) => {
                            warn!(container = %container_id, error = %persist, "releasing in line");
                            let turn = releases.turn();
                            let inline = tokio::time::timeout(INLINE_RELEASE_LIMIT, async {
                                let _turn = turn.lock().await;
                                ipam.release_by_handle(&handle_id).await
                            })
                            .await;
                            match inline {
                                Ok(Ok(_)) => Reply::ok(),
                                Ok(Err(e)) if crate::releases::nothing_left(&e) => Reply::ok(),
                                Ok(Err(e)) => Reply::err(format!(
                                    "releasing {container_id}: {e}; and it could not be deferred: {persist}"
                                )),
                                Err(_elapsed) => Reply::err(format!(
                                    "releasing {container_id}: no answer from the API server within \
                                     {INLINE_RELEASE_LIMIT:?}; and it could not be deferred: {persist}"
                                )),
                            }
                        }
                    };
                    let _ = reply.send(Reply {
                        host_if_handled,
                        ..released
                    });
                });
                removed
            }
            Request::Ready => {
                let ready = *self.ready_tx.borrow();
                let _ = reply.send(if ready {
                    Reply::ok()
                } else {
                    Reply::err("tortie agent is not ready yet")
                });
                false
            }
            Request::Shutdown => {
                // preStop: tell the scheduler this node's network is going away; routes stay.
                let client = self.client.clone();
                let node = self.node.name.clone();
                tokio::spawn(async move {
                    let r = bootstrap::set_network_unavailable(&client, &node, true).await;
                    let _ = reply.send(match r {
                        Ok(()) => Reply::ok(),
                        Err(e) => Reply::err(format!("{e:#}")),
                    });
                });
                false
            }
            Request::Status => {
                let _ = reply.send(Reply {
                    status: Some(self.status()),
                    ..Reply::ok()
                });
                false
            }
        }
    }

    fn status(&self) -> serde_json::Value {
        let c = self.dataplane.counters();
        serde_json::json!({
            "node": self.node.name,
            "address": self.node.addr_v4.map(|a| a.to_string()),
            "address6": self.node.addr_v6.map(|a| a.to_string()),
            "as_number": self.view.my_as(),
            "peers": self.routing.status(),
            "blocks": self.view.my_blocks().iter().map(ToString::to_string).collect::<Vec<_>>(),
            "workloads": self.workloads.len(),
            "pending_releases": self.releases.pending_count(),
            "oldest_pending_release_seconds": self.releases.oldest_pending().map(|d| d.as_secs_f64()),
            "release_write_ms": self.releases.recent_write_ms().map(|(p50, p99)| serde_json::json!({"p50": p50, "p99": p99})),
            "routes": c.routes_by_kind.iter().map(|(k, v)| (k.as_str().to_owned(), *v)).collect::<BTreeMap<_, _>>(),
            "ready": *self.ready_tx.borrow(),
        })
    }

    async fn recompute(&mut self, caches: &Caches) {
        // A partial view (say, nodes listed but not yet pools) would ask the dataplane to drop
        // tunnels and the speaker to drop peers: nothing acts before every kind has listed.
        if !caches.synced() {
            return;
        }
        let nodes = caches.nodes.borrow().clone();
        let pools = caches.pools.borrow().clone();
        let blocks = caches.blocks.borrow().clone();
        let bgp_configs = caches.bgp_configs.borrow().clone();
        let bgp_peers = caches.bgp_peers.borrow().clone();

        let mut errors = Vec::new();
        let mut view = ClusterView {
            me: self.node.name.clone(),
            ..ClusterView::default()
        };
        view.nodes = nodes
            .objects
            .iter()
            .map(|(name, n)| (name.clone(), (**n).clone()))
            .collect();
        let pool_objs: Vec<IpPool> = pools.objects.values().map(|p| (**p).clone()).collect();
        view.pools = validate_pools(&pool_objs);
        errors.extend(
            view.pools
                .invalid
                .iter()
                .map(|e| format!("{e}; the pool is ignored")),
        );
        view.blocks = blocks.objects.values().cloned().collect();
        view.bgp_config = bgp_configs
            .objects
            .get("default")
            .map(|c| (**c).clone())
            .unwrap_or_default();
        view.bgp_peers = bgp_peers
            .objects
            .iter()
            .map(|(name, p)| (name.clone(), (**p).clone()))
            .collect();

        // Tunnel addresses follow the pools' modes (allocate-tunnel-addrs).
        let modes: Vec<(String, String, String)> = view
            .pools
            .valid
            .iter()
            .map(|p| {
                (
                    p.cidr.to_string(),
                    format!("{:?}", p.ipip_mode),
                    format!("{:?}", p.vxlan_mode),
                )
            })
            .collect();
        if self.last_pool_modes.as_ref() != Some(&modes) {
            let turn = self.releases.turn();
            let _turn = turn.lock().await;
            match bootstrap::sync_tunnel_addresses(&self.client, &self.ipam, &self.node).await {
                Ok(t) => {
                    self.last_pool_modes = Some(modes);
                    // Our own annotations may lag the watch; use what we just wrote.
                    if let Some(me) = view.nodes.get_mut(&self.node.name) {
                        me.ipip_tunnel_addr = t.ipip.and_then(|a| match a {
                            IpAddr::V4(v4) => Some(v4),
                            IpAddr::V6(_) => None,
                        });
                        me.vxlan_tunnel_addr = t.vxlan.and_then(|a| match a {
                            IpAddr::V4(v4) => Some(v4),
                            IpAddr::V6(_) => None,
                        });
                        me.vxlan_tunnel_addr_v6 = t.vxlan_v6.and_then(|a| match a {
                            IpAddr::V6(v6) => Some(v6),
                            IpAddr::V4(_) => None,
                        });
                    }
                }
                Err(e) => errors.push(format!("tunnel addresses: {e:#}")),
            }
        }

        let (peers, peer_errors) = view.desired_peers();
        errors.extend(peer_errors);
        self.routing
            .apply(
                &view,
                peers,
                view.advertised_prefixes_with(
                    &self
                        .workloads
                        .values()
                        .flat_map(|w| w.ips.iter().copied())
                        .collect::<Vec<_>>(),
                ),
            )
            .await;
        let learned: Vec<LearnedRoute> = self.routing.learned();
        let workloads: Vec<dp::Workload> = self
            .workloads
            .values()
            .flat_map(|w| {
                w.ips.iter().map(|ip| dp::Workload {
                    ip: *ip,
                    host_if: w.host_if.clone(),
                })
            })
            .collect();
        let inputs = view.dataplane_inputs(
            workloads,
            &learned,
            &self.node.uplink,
            self.node.uplink_mtu,
            self.node.default_gateway_v4,
        );
        tracing::debug!(remote_blocks = ?inputs.remote_blocks, owned = ?inputs.owned_blocks, "desired inputs");
        {
            let nat = dp::nat::NatInputs {
                masquerade: view
                    .pools
                    .valid
                    .iter()
                    .filter(|p| p.nat_outgoing)
                    .map(|p| p.cidr)
                    .collect(),
                all_pools: view.pools.valid.iter().map(|p| p.cidr).collect(),
            };
            if self.last_nat.as_ref() != Some(&nat) {
                self.apply_nat(nat);
            }
        }
        if let Err(e) = self.dataplane.set_desired(inputs) {
            errors.push(format!("dataplane inputs: {e}"));
        }
        if errors != self.reported_errors {
            for e in &errors {
                warn!("{e}");
            }
            self.reported_errors = errors;
        }
        self.view = view;
        self.maybe_complete(caches).await;
        if self.complete {
            self.write_cni_config();
        }
    }

    /// Makes tortie's nftables table match the pools (level-triggered; a no-op writes nothing).
    fn apply_nat(&mut self, inputs: dp::nat::NatInputs) {
        let Some(nat) = self.nat.as_mut() else { return };
        match nat.apply(&inputs) {
            Ok(change) => {
                if change != dp::nat::NatChange::Unchanged {
                    info!(?change, masquerade = ?inputs.masquerade, "natOutgoing applied");
                }
                self.last_nat = Some(inputs);
            }
            Err(e) => {
                warn!(error = %e, "applying natOutgoing failed; retrying on the next tick");
                self.last_nat = None;
            }
        }
    }

    async fn on_tick(&mut self, caches: &Caches) {
        self.ticks += 1;
        if !self.routing.is_running() {
            self.recompute(caches).await;
        }
        // Repairs tampering with tortie's nftables table, as the route resync does for routes.
        if self.ticks.is_multiple_of(30)
            && let Some(inputs) = self.last_nat.clone()
        {
            self.apply_nat(inputs);
        }
        self.maybe_complete(caches).await;
        // Ready means: the desired state was complete once and the datastore is reachable now.
        // An outage changes readiness only; the kernel keeps every route.
        let ready = self.complete && crate::datastore::watch::datastore_healthy();
        if *self.ready_tx.borrow() != ready {
            info!(ready, "readiness changed");
            let _ = self.ready_tx.send(ready);
        }
        let text = crate::metrics::render(
            &self.view,
            &self.dataplane.counters(),
            &self.routing.status(),
            self.routing.refused_connections(),
            self.workloads.len(),
            self.releases.figures(),
            ready,
        );
        if let Ok(mut t) = self.metrics_text.lock() {
            *t = text;
        }
    }

    /// Which families pods get: those the node has an address and an enabled pool of.
    fn pod_families(&self) -> crate::cni::PodFamilies {
        let pool_of = |fam: u8| {
            self.view
                .pools
                .valid
                .iter()
                .any(|p| p.family() == fam && !p.disabled)
        };
        crate::cni::PodFamilies::of_node(
            self.node.addr_v4.is_some(),
            self.node.addr_v6.is_some(),
            pool_of(4),
            pool_of(6),
        )
    }

    /// Writes the CNI config for what the node serves now; once complete, again whenever the
    /// MTU or the pod address families change (an IPv6 pool added to an IPv4 cluster).
    fn write_cni_config(&mut self) {
        let wanted = (self.mtu(), self.pod_families());
        if self.cni_config_written == Some(wanted) {
            return;
        }
        match crate::cni::write_conflist(
            &self.cfg.cni_conf_dir,
            wanted.0,
            &self.cfg.run_dir,
            wanted.1,
        ) {
            Ok(()) => {
                info!(
                    mtu = wanted.0,
                    ipv4 = wanted.1.ipv4,
                    ipv6 = wanted.1.ipv6,
                    "CNI config written"
                );
                self.cni_config_written = Some(wanted);
            }
            Err(e) => error!(error = %e, "writing the CNI config failed"),
        }
    }

    /// Once every cache has listed and BGP has converged (End-of-RIB from every peer, or the
    /// startup grace ran out), the desired state is complete: stale routes may go, pods may come.
    async fn maybe_complete(&mut self, caches: &Caches) {
        if self.complete || !caches.synced() {
            return;
        }
        let grace_over = self.started.elapsed() >= Duration::from_secs(self.cfg.startup_grace_secs);
        if !self.routing.converged() && !grace_over {
            return;
        }
        self.complete = true;
        self.dataplane.mark_complete();
        info!(after = ?self.started.elapsed(), "desired state complete; stale routes may now be removed");
        let _ = self.ready_tx.send(true);
        self.write_cni_config();
        if !self.network_up_reported {
            match bootstrap::set_network_unavailable(&self.client, &self.node.name, false).await {
                Ok(()) => self.network_up_reported = true,
                Err(e) => warn!(error = %e, "could not clear NetworkUnavailable"),
            }
        }
    }
}
