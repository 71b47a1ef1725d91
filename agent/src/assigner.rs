//! The node's pod address assignments, committed together: ADDs that arrive while one is
//! being written share the next block write (`Ipam::assign_once_batch`), and carry the
//! releases waiting in the [`ReleaseQueue`].
//!
//! One batch is written at a time, holding the node's IPAM turn (see [`IpamTurn`]), so the
//! node's assignments never race each other or its releases for their block (calico-ipam
//! serializes them with a host-wide lock for the same reason); a burst of pods costs a block
//! write or two instead of one per pod.

use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;
use tortie_ipam::{Assigned, AutoAssignRequest, Ipam, Store};
use tracing::debug;

use crate::releases::{IpamTurn, ReleaseQueue};

/// How an assignment can fail.
#[derive(Debug, thiserror::Error)]
pub enum AssignError {
    #[error(transparent)]
    Ipam(#[from] tortie_ipam::IpamError),
    #[error("the assignment was abandoned by the agent (its batch task ended early)")]
    Abandoned,
}

type Waiting = (
    AutoAssignRequest,
    oneshot::Sender<Result<Assigned, AssignError>>,
);

#[derive(Default)]
struct State {
    waiting: Vec<Waiting>,
    /// A batch task is running; it takes what arrives meanwhile.
    busy: bool,
}

/// The assigner; clones share it.
pub struct Assigner<S: Store + 'static> {
    ipam: Arc<Ipam<S>>,
    releases: ReleaseQueue<S>,
    /// Held while a batch is written (shared with the release queue's writes).
    turn: IpamTurn,
    state: Arc<Mutex<State>>,
}

impl<S: Store + 'static> Clone for Assigner<S> {
    fn clone(&self) -> Self {
        Self {
            ipam: self.ipam.clone(),
            releases: self.releases.clone(),
            turn: self.turn.clone(),
            state: self.state.clone(),
        }
    }
}

impl<S: Store + 'static> Assigner<S> {
    pub fn new(ipam: Arc<Ipam<S>>, releases: ReleaseQueue<S>) -> Self {
        Self {
            ipam,
            turn: releases.turn(),
            releases,
            state: Arc::default(),
        }
    }

    /// Assigns as [`Ipam::assign_once`] does (a retried ADD gets what its handle holds), in
    /// the next batch. Must run on a tokio runtime.
    pub async fn assign(&self, req: AutoAssignRequest) -> Result<Assigned, AssignError> {
        let (tx, rx) = oneshot::channel();
        let start = {
            let mut state = self.lock();
            state.waiting.push((req, tx));
            !std::mem::replace(&mut state.busy, true)
        };
        if start {
            // Made before the spawn: a task dropped before it first runs (runtime shutdown)
            // still leaves the assigner idle and answers what waits.
            let on_exit = AbandonOnPanic {
                state: self.state.clone(),
                armed: true,
            };
            let assigner = self.clone();
            tokio::spawn(async move { assigner.run_batches(on_exit).await });
        }
        rx.await.unwrap_or(Err(AssignError::Abandoned))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // The state is replaced whole under the lock; a panic elsewhere leaves it valid.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Writes batches until nothing waits.
    async fn run_batches(&self, mut on_exit: AbandonOnPanic) {
        loop {
            let batch = {
                let mut state = self.lock();
                let batch = std::mem::take(&mut state.waiting);
                if batch.is_empty() {
                    // Under the same lock as the pushes: an assignment either lands in a batch
                    // this task takes or finds it idle and starts another.
                    state.busy = false;
                    on_exit.armed = false;
                    return;
                }
                batch
            };
            let (reqs, replies): (Vec<AutoAssignRequest>, Vec<_>) = batch.into_iter().unzip();
            let handles: Vec<String> = reqs.iter().map(|r| r.handle_id.clone()).collect();
            let turn = self.turn.lock().await;
            let carrying = self.releases.take_for_assignment(&handles);
            let out = self.ipam.assign_once_batch(&reqs, carrying.handles()).await;
            drop(turn);
            carrying.done(&out.released);
            debug!(
                pods = reqs.len(),
                carried = out.released.len(),
                "assignment batch written"
            );
            for (reply, result) in replies.into_iter().zip(out.results) {
                let _ = reply.send(result.map_err(AssignError::from));
            }
        }
    }
}

/// If the batch task ends early (a panic, or dropped before it ran), answers everything
/// waiting `Abandoned` (the senders drop; requests not yet tried are abandoned too, and their
/// runtimes retry the ADD) and marks the assigner idle, so the next assignment starts a new
/// task.
struct AbandonOnPanic {
    state: Arc<Mutex<State>>,
    armed: bool,
}

impl Drop for AbandonOnPanic {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        state.waiting.clear();
        state.busy = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tortie_ipam::pod_handle_id;

    fn req(container: &str) -> AutoAssignRequest {
        AutoAssignRequest {
            handle_id: pod_handle_id(container),
            node: "n1".into(),
            num_v4: 1,
            ..AutoAssignRequest::default()
        }
    }

    #[tokio::test]
    async fn pods_arriving_together_share_one_block_write() {
        let (store, ipam) = crate::releases::tests::ipam_with_pool();
        let scratch = crate::releases::tests::Scratch::new("assigner");
        let releases = ReleaseQueue::start(ipam.clone(), scratch.file());
        let assigner = Assigner::new(ipam, releases);
        // The node's block exists (the first pod claimed it).
        assigner.assign(req("first")).await.unwrap();
        let before = store.stats();
        let all =
            futures::future::join_all((0..10).map(|i| assigner.assign(req(&format!("p{i}")))))
                .await;
        let after = store.stats();
        let mut ips: Vec<_> = all.into_iter().map(|r| r.unwrap().ipv4[0]).collect();
        ips.sort();
        ips.dedup();
        assert_eq!(ips.len(), 10);
        assert_eq!(after.updates - before.updates, 1, "{before:?} -> {after:?}");
        // And the next one alone still works (the batch task went idle and a new one starts).
        assigner.assign(req("later")).await.unwrap();
    }
}
