//! Pod address releases answered to the CNI DEL before the API server has them: persisted
//! first, retried until written, awaited by an ADD of the same handle.
//!
//! A DEL only needs the sandbox's network gone. The addresses stay allocated in their block
//! until the release lands, so nobody can be handed them early; what must not happen is losing
//! the release, hence the file in the run directory (tmpfs: it survives an agent restart, and
//! after a node reboot the leak collector frees addresses of pods that are gone). The API server
//! being away then delays the release instead of failing the DEL, which would keep the pod
//! terminating while the runtime retries.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tortie_ipam::{Ipam, Store};
use tracing::{error, info, warn};

/// First pause after a failed release; doubles up to [`RETRY_CAP`].
const RETRY_FIRST: Duration = Duration::from_millis(200);
const RETRY_CAP: Duration = Duration::from_secs(10);
/// How long a release is retried before it is left to the leak collector (which frees
/// addresses of pods that no longer exist, after its grace period).
const GIVE_UP_AFTER: Duration = Duration::from_secs(3600);
/// Release durations kept for `tortie status`.
const RECENT_KEPT: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum ReleaseError {
    #[error("saving pending releases to {path}: {source}")]
    Persist {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the release of {handle} is still pending after {waited:?}")]
    StillPending { handle: String, waited: Duration },
}

struct Pending {
    /// Flips to true once the release is written (or given up).
    done_tx: watch::Sender<bool>,
    since: Instant,
}

/// Whether a failed release means there was nothing (left) to release: retrying cannot help.
pub fn nothing_left(e: &tortie_ipam::IpamError) -> bool {
    matches!(
        e,
        tortie_ipam::IpamError::Store(tortie_ipam::StoreError::NotFound { .. })
    )
}

/// The queue; clones share it.
pub struct ReleaseQueue<S: Store + 'static> {
    ipam: Arc<Ipam<S>>,
    path: PathBuf,
    pending: Arc<Mutex<BTreeMap<String, Pending>>>,
    /// How long recent releases took from the DEL's answer to the API server's write, newest
    /// last (bounded).
    recent: Arc<Mutex<std::collections::VecDeque<Duration>>>,
    /// Held from reading `pending` to renaming the file, so the last file written is the
    /// newest state (an older snapshot written late could drop a pending release).
    saving: Arc<Mutex<()>>,
}

impl<S: Store + 'static> Clone for ReleaseQueue<S> {
    fn clone(&self) -> Self {
        Self {
            ipam: self.ipam.clone(),
            path: self.path.clone(),
            pending: self.pending.clone(),
            recent: self.recent.clone(),
            saving: self.saving.clone(),
        }
    }
}

impl<S: Store + 'static> ReleaseQueue<S> {
    /// Opens the queue persisted at `path` and resumes what it holds. Must run on a tokio
    /// runtime.
    pub fn start(ipam: Arc<Ipam<S>>, path: PathBuf) -> Self {
        let queue = Self {
            ipam,
            path,
            pending: Arc::default(),
            recent: Arc::default(),
            saving: Arc::default(),
        };
        let resumed = queue.load();
        if !resumed.is_empty() {
            info!(
                count = resumed.len(),
                "resuming address releases of an earlier run"
            );
        }
        for handle in resumed {
            queue.track(&handle);
            queue.spawn_release(handle);
        }
        queue
    }

    /// Records the release durably, then writes it to the API server in the background.
    pub fn enqueue(&self, handle: &str) -> Result<(), ReleaseError> {
        if !self.track(handle) {
            // Already on its way (a repeated DEL).
            return Ok(());
        }
        if let Err(e) = self.save() {
            self.untrack(handle);
            return Err(e);
        }
        self.spawn_release(handle.to_owned());
        Ok(())
    }

    /// Waits, at most `limit`, until no release of `handle` is pending: an ADD reusing a handle
    /// must not be handed addresses that a pending release is about to free.
    pub async fn wait_released(&self, handle: &str, limit: Duration) -> Result<(), ReleaseError> {
        let Some(mut done) = self.lock().get(handle).map(|p| p.done_tx.subscribe()) else {
            return Ok(());
        };
        match tokio::time::timeout(limit, done.wait_for(|d| *d)).await {
            Ok(_) => Ok(()),
            Err(_) => Err(ReleaseError::StillPending {
                handle: handle.to_owned(),
                waited: limit,
            }),
        }
    }

    /// Releases not yet written.
    pub fn pending_count(&self) -> usize {
        self.lock().len()
    }

    /// Age of the oldest pending release, for `tortie status` and the logs.
    pub fn oldest_pending(&self) -> Option<Duration> {
        self.lock().values().map(|p| p.since.elapsed()).max()
    }

    /// p50 and p99 of the recent releases' time until written, in milliseconds.
    pub fn recent_write_ms(&self) -> Option<(f64, f64)> {
        let mut ms: Vec<f64> = self
            .recent
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .map(|d| d.as_secs_f64() * 1e3)
            .collect();
        if ms.is_empty() {
            return None;
        }
        ms.sort_by(f64::total_cmp);
        let at = |p: f64| ms[((ms.len() - 1) as f64 * p).round() as usize];
        Some((at(0.50), at(0.99)))
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, Pending>> {
        // Entries are inserted and removed whole; a panic elsewhere leaves the map valid.
        self.pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Adds the handle; false if it was there already.
    fn track(&self, handle: &str) -> bool {
        let mut pending = self.lock();
        if pending.contains_key(handle) {
            return false;
        }
        let (done_tx, _) = watch::channel(false);
        pending.insert(
            handle.to_owned(),
            Pending {
                done_tx,
                since: Instant::now(),
            },
        );
        true
    }

    fn untrack(&self, handle: &str) {
        let Some(p) = self.lock().remove(handle) else {
            return;
        };
        p.done_tx.send_replace(true);
        let mut recent = self
            .recent
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if recent.len() == RECENT_KEPT {
            recent.pop_front();
        }
        recent.push_back(p.since.elapsed());
    }

    fn spawn_release(&self, handle: String) {
        let queue = self.clone();
        tokio::spawn(async move {
            queue.release_until_written(&handle).await;
            queue.untrack(&handle);
            if let Err(e) = queue.save() {
                // The entry comes back after a restart and is released again: harmless.
                warn!(handle, error = %e, "could not record a finished release");
            }
        });
    }

    async fn release_until_written(&self, handle: &str) {
        let started = Instant::now();
        let mut pause = RETRY_FIRST;
        for attempt in 1u32.. {
            match self.ipam.release_by_handle(handle).await {
                Ok(_) => {
                    if attempt > 1 {
                        info!(handle, attempt, "address release written after retries");
                    }
                    return;
                }
                Err(e) if nothing_left(&e) => return,
                Err(e) if started.elapsed() >= GIVE_UP_AFTER => {
                    error!(
                        handle,
                        attempt,
                        error = %e,
                        "giving up on an address release; the leak collector will free it"
                    );
                    return;
                }
                Err(e) => {
                    warn!(handle, attempt, error = %e, retry_in = ?pause, "address release failed");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(RETRY_CAP);
                }
            }
        }
    }

    fn load(&self) -> Vec<String> {
        match std::fs::read(&self.path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                // Unreadable: the leak collector frees what those releases would have.
                error!(path = %self.path.display(), error = %e, "pending releases unreadable; ignoring them");
                Vec::new()
            }),
            Err(_) => Vec::new(),
        }
    }

    fn save(&self) -> Result<(), ReleaseError> {
        let _saving = self
            .saving
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let handles: Vec<String> = self.lock().keys().cloned().collect();
        let tmp = self.path.with_extension("json.tmp");
        let write = || -> std::io::Result<()> {
            if let Some(dir) = self.path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            std::fs::write(&tmp, serde_json::to_vec(&handles)?)?;
            std::fs::rename(&tmp, &self.path)
        };
        write().map_err(|source| ReleaseError::Persist {
            path: self.path.clone(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tortie_ipam::{
        AutoAssignRequest, Faults, IpPool, IpPoolSpec, IpamBlock, MemoryStore, pod_handle_id,
    };

    fn ipam_with_pool() -> (Arc<MemoryStore>, Arc<Ipam<Arc<MemoryStore>>>) {
        let store = Arc::new(MemoryStore::new());
        store.put(&IpPool::new(
            "p",
            IpPoolSpec {
                cidr: "10.0.0.0/24".into(),
                ..IpPoolSpec::default()
            },
        ));
        (store.clone(), Arc::new(Ipam::new(store)))
    }

    async fn assign(ipam: &Ipam<Arc<MemoryStore>>, container: &str) {
        let req = AutoAssignRequest {
            handle_id: pod_handle_id(container),
            node: "n1".into(),
            num_v4: 1,
            ..AutoAssignRequest::default()
        };
        ipam.assign_once(&req).await.expect("assign");
    }

    fn allocated(store: &MemoryStore) -> usize {
        store
            .snapshot::<IpamBlock>()
            .iter()
            .map(|b| b.spec.allocations.iter().filter(|a| a.is_some()).count())
            .sum()
    }

    fn scratch(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("tortie-releases-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir.join("pending-releases.json")
    }

    #[tokio::test]
    async fn a_release_is_persisted_then_written_and_awaitable() {
        let (store, ipam) = ipam_with_pool();
        assign(&ipam, "c1").await;
        assign(&ipam, "c2").await;
        let path = scratch("persisted");
        let queue = ReleaseQueue::start(ipam, path.clone());
        let handle = pod_handle_id("c1");
        queue.enqueue(&handle).unwrap();
        // Persisted before enqueue returns (the release task has not run yet on this runtime).
        let saved: Vec<String> = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(saved, vec![handle.clone()]);
        queue
            .wait_released(&handle, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(allocated(&store), 1, "c2 keeps its address");
        assert_eq!(queue.pending_count(), 0);
        assert!(queue.recent_write_ms().is_some_and(|(p50, p99)| p50 <= p99));
        // The finished release leaves the file (written by the task after it untracked).
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let saved: Vec<String> =
                serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
            if saved.is_empty() {
                break;
            }
            assert!(Instant::now() < deadline, "file still lists {saved:?}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }

    #[tokio::test]
    async fn releases_of_an_earlier_run_are_resumed() {
        let (store, ipam) = ipam_with_pool();
        assign(&ipam, "c1").await;
        let path = scratch("resumed");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(
            &path,
            serde_json::to_vec(&vec![pod_handle_id("c1")]).unwrap(),
        )
        .unwrap();
        let queue = ReleaseQueue::start(ipam, path.clone());
        queue
            .wait_released(&pod_handle_id("c1"), Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(allocated(&store), 0);
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }

    #[tokio::test]
    async fn a_failing_datastore_delays_the_release_but_does_not_lose_it() {
        let (store, ipam) = ipam_with_pool();
        assign(&ipam, "c1").await;
        // Every write conflicts: each release attempt gives up after its CAS bound.
        store.set_faults(Faults {
            conflict_one_in: 1,
            ..Faults::default()
        });
        let path = scratch("failing");
        let queue = ReleaseQueue::start(ipam, path.clone());
        let handle = pod_handle_id("c1");
        queue.enqueue(&handle).unwrap();
        let waited = queue
            .wait_released(&handle, Duration::from_millis(300))
            .await;
        assert!(
            matches!(waited, Err(ReleaseError::StillPending { .. })),
            "{waited:?}"
        );
        assert_eq!(allocated(&store), 1, "nothing released while writes fail");
        assert_eq!(queue.pending_count(), 1);
        store.set_faults(Faults::default());
        queue
            .wait_released(&handle, Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!(allocated(&store), 0);
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }

    #[tokio::test]
    async fn a_repeated_del_is_one_release() {
        let (_store, ipam) = ipam_with_pool();
        assign(&ipam, "c1").await;
        let path = scratch("repeated");
        let queue = ReleaseQueue::start(ipam, path.clone());
        let handle = pod_handle_id("c1");
        queue.enqueue(&handle).unwrap();
        queue.enqueue(&handle).unwrap();
        assert_eq!(queue.pending_count(), 1);
        queue
            .wait_released(&handle, Duration::from_secs(5))
            .await
            .unwrap();
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }
}
