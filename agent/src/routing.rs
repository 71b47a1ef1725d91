//! BGP glue: turns the cluster view's peer plan and advertised blocks into `tortie-bgp` calls,
//! and its best paths into routes for the dataplane.

use anyhow::Result;
use ipnet::IpNet;

use crate::bootstrap::NodeIdentity;
use crate::cluster::{ClusterView, LearnedRoute, PeerPlan};
use crate::config::Config;

/// The BGP side of the agent. Until the speaker is wired in, the agent routes pool blocks from
/// the datastore alone (every node's blocks and address are there) and learns nothing over BGP.
pub struct Routing {
    peers: Vec<PeerPlan>,
    advertised: Vec<IpNet>,
}

impl Routing {
    pub async fn start(_cfg: &Config, _node: &NodeIdentity) -> Result<Routing> {
        Ok(Routing {
            peers: Vec::new(),
            advertised: Vec::new(),
        })
    }

    pub async fn apply(
        &mut self,
        _view: &ClusterView,
        peers: Vec<PeerPlan>,
        advertised: Vec<IpNet>,
    ) {
        self.peers = peers;
        self.advertised = advertised;
    }

    pub fn learned(&self) -> Vec<LearnedRoute> {
        Vec::new()
    }

    /// Resolves when the learned routes changed; pending forever while nothing is learned.
    pub async fn changed(&mut self) -> Option<()> {
        std::future::pending().await
    }

    pub fn converged(&self) -> bool {
        true
    }

    pub fn status(&self) -> serde_json::Value {
        serde_json::json!(self
            .peers
            .iter()
            .map(|p| serde_json::json!({ "address": p.address.to_string(), "as": p.remote_as, "state": "NotStarted" }))
            .collect::<Vec<_>>())
    }
}
