//! Pod address releases answered to the CNI DEL before the API server has them: persisted
//! first, carried by the node's next assignment or written after a short window, retried until
//! written, awaited by an ADD of the same handle.
//!
//! A DEL only needs the sandbox's network gone. The addresses stay allocated in their block
//! until the release lands, so nobody can be handed them early; what must not happen is losing
//! the release, hence the file in the run directory (tmpfs: it survives an agent restart, and
//! after a node reboot the leak collector frees addresses of pods that are gone).
//!
//! Why not write it at once: the node's pods share a block, and the block is one object with a
//! resourceVersion. A release written on its own is a second write of the block per pod, and
//! one in flight makes the next ADD's write of the same block conflict. Instead a release waits
//! up to [`CARRY_WINDOW`] for an ADD, whose block write frees the old addresses and takes the
//! new ones at once; releases nobody carried are written together, one write per block, so a
//! scale-down does not race itself either. The API server being away delays the release
//! instead of failing the DEL, which would keep the pod terminating while the runtime retries.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tortie_ipam::{Ipam, Store};
use tracing::{debug, error, info, warn};

/// How long a release waits for an assignment to carry it before it is written on its own.
pub const CARRY_WINDOW: Duration = Duration::from_millis(300);
/// First pause after a failed release; doubles up to [`RETRY_CAP`].
const RETRY_FIRST: Duration = Duration::from_millis(200);
const RETRY_CAP: Duration = Duration::from_secs(10);
/// How long a release is retried before it is left to the leak collector (which frees
/// addresses of pods that no longer exist, after its grace period).
const GIVE_UP_AFTER: Duration = Duration::from_secs(3600);
/// Failed attempts of a batch of releases before each is retried on its own, so one bad
/// object holds up only its own release. (Retried on their own, releases sharing a block may
/// conflict with each other; compare-and-swap sorts that out at the cost of extra writes.)
const BATCH_ATTEMPTS: u32 = 3;
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

/// Where a pending release is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Being saved to the file: not to be carried before it is durable.
    Recording,
    /// Waiting for an assignment to carry it, until its window closes.
    Waiting,
    /// Taken by an assignment whose block writes carry it.
    Carried,
    /// Being written by the queue itself (window closed, carrying failed, resumed, awaited).
    Writing,
}

struct Pending {
    /// Flips to true once the release is written (or given up).
    done_tx: watch::Sender<bool>,
    since: Instant,
    stage: Stage,
}

/// What is left to write of a release.
#[derive(Debug, Clone, Copy)]
enum Remaining {
    /// Its addresses and its handle.
    Everything,
    /// Only its handle object: an assignment's block write freed the addresses.
    HandleObject,
}

/// The node's IPAM writer turn: the queue's release writes, the assigner's batches and the
/// tunnel address sync each hold it while they write, so the node's own operations never run
/// concurrently (the allocator expects that of each host, as calico-ipam's host-wide lock
/// ensures; concurrent claim and release of one block by the same host can leave an affinity
/// confirmed for a block just deleted).
pub type IpamTurn = Arc<tokio::sync::Mutex<()>>;

/// The queue's figures for `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReleaseFigures {
    /// Releases answered and not yet written.
    pub pending: usize,
    /// Releases written so far: carried by an assignment's block write.
    pub carried: u64,
    /// Written by the queue in a batch of several.
    pub batched: u64,
    /// Written by the queue on their own.
    pub alone: u64,
}

/// Releases written so far, by how (see [`ReleaseFigures`]).
#[derive(Default)]
struct WrittenCounts {
    carried: AtomicU64,
    batched: AtomicU64,
    alone: AtomicU64,
}

/// Releases an assignment took to carry; handed back with [`Carrying::done`].
pub struct Carrying<S: Store + 'static> {
    queue: ReleaseQueue<S>,
    handles: Vec<String>,
}

impl<S: Store + 'static> Carrying<S> {
    /// The handles, for [`tortie_ipam::AutoAssignRequest::release_with`].
    pub fn handles(&self) -> &[String] {
        &self.handles
    }

    /// The assignment finished; `released` are the handles its block writes freed entirely
    /// ([`tortie_ipam::Assigned::released`]), empty if it failed.
    pub fn done(mut self, released: &[String]) {
        let taken = std::mem::take(&mut self.handles);
        self.queue.assignment_done(taken, released);
    }
}

impl<S: Store + 'static> Drop for Carrying<S> {
    /// An assignment dropped before it finished (a panic, a cancelled task): the queue
    /// writes what it took, so nothing stays carried forever.
    fn drop(&mut self) {
        let taken = std::mem::take(&mut self.handles);
        if !taken.is_empty() {
            self.queue.assignment_done(taken, &[]);
        }
    }
}

/// Moves every release waiting for a carrier, other than `except`'s, to `stage`; returns
/// their handles.
fn restage_waiting(
    pending: &mut BTreeMap<String, Pending>,
    stage: Stage,
    except: &[String],
) -> Vec<String> {
    pending
        .iter_mut()
        .filter(|(h, p)| p.stage == Stage::Waiting && !except.contains(h))
        .map(|(h, p)| {
            p.stage = stage;
            h.clone()
        })
        .collect()
}

/// How writing a release ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Written,
    /// Retried for [`GIVE_UP_AFTER`].
    GaveUp,
    /// The attempts allowed ran out (a batch, retried handle by handle next).
    OutOfAttempts,
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
    window: Duration,
    pending: Arc<Mutex<BTreeMap<String, Pending>>>,
    /// How long recent releases took from the DEL's answer to the API server's write, newest
    /// last (bounded).
    recent: Arc<Mutex<std::collections::VecDeque<Duration>>>,
    written: Arc<WrittenCounts>,
    turn: IpamTurn,
    /// Held from reading `pending` to renaming the file, so the last file written is the
    /// newest state (an older snapshot written late could drop a pending release).
    saving: Arc<Mutex<()>>,
}

impl<S: Store + 'static> Clone for ReleaseQueue<S> {
    fn clone(&self) -> Self {
        Self {
            ipam: self.ipam.clone(),
            path: self.path.clone(),
            window: self.window,
            pending: self.pending.clone(),
            recent: self.recent.clone(),
            written: self.written.clone(),
            turn: self.turn.clone(),
            saving: self.saving.clone(),
        }
    }
}

impl<S: Store + 'static> ReleaseQueue<S> {
    /// Opens the queue persisted at `path` and resumes what it holds. Must run on a tokio
    /// runtime.
    pub fn start(ipam: Arc<Ipam<S>>, path: PathBuf) -> Self {
        Self::with_window(ipam, path, CARRY_WINDOW)
    }

    /// [`ReleaseQueue::start`] with another carry window.
    pub fn with_window(ipam: Arc<Ipam<S>>, path: PathBuf, window: Duration) -> Self {
        let queue = Self {
            ipam,
            path,
            window,
            pending: Arc::default(),
            recent: Arc::default(),
            written: Arc::default(),
            turn: IpamTurn::default(),
            saving: Arc::default(),
        };
        let resumed = queue.load();
        if !resumed.is_empty() {
            info!(
                count = resumed.len(),
                "resuming address releases of an earlier run"
            );
        }
        for handle in &resumed {
            queue.track(handle, Stage::Writing);
        }
        queue.spawn_write(resumed, Remaining::Everything);
        queue
    }

    /// Records the release durably; it is then carried by the next assignment or written
    /// once the window closes.
    pub fn enqueue(&self, handle: &str) -> Result<(), ReleaseError> {
        if !self.track(handle, Stage::Recording) {
            // Already on its way (a repeated DEL).
            return Ok(());
        }
        if let Err(e) = self.save() {
            // Nobody took it while it was recording; the caller releases it in line.
            self.lock().remove(handle);
            return Err(e);
        }
        if let Some(p) = self.lock().get_mut(handle) {
            p.stage = Stage::Waiting;
        }
        let queue = self.clone();
        let handle = handle.to_owned();
        tokio::spawn(async move {
            tokio::time::sleep(queue.window).await;
            queue.write_uncarried(&handle).await;
        });
        Ok(())
    }

    /// Takes the releases waiting for an assignment, for its `release_with`, except those of
    /// the handles being assigned (a DEL of that very sandbox racing its ADD: left to its
    /// window). Whatever the assignment's outcome, the releases come back through the returned
    /// [`Carrying`]: [`Carrying::done`], or its drop if the assignment never finished.
    pub fn take_for_assignment(&self, assigning: &[String]) -> Carrying<S> {
        let handles = restage_waiting(&mut self.lock(), Stage::Carried, assigning);
        Carrying {
            queue: self.clone(),
            handles,
        }
    }

    /// After an assignment that took `taken`: the handles in `released` need only their handle
    /// object deleted; the rest are written by the queue now.
    fn assignment_done(&self, taken: Vec<String>, released: &[String]) {
        {
            let mut pending = self.lock();
            for handle in &taken {
                if let Some(p) = pending.get_mut(handle) {
                    p.stage = Stage::Writing;
                }
            }
        }
        let (handle_objects, everything) = taken.into_iter().partition(|h| released.contains(h));
        self.spawn_write(handle_objects, Remaining::HandleObject);
        self.spawn_write(everything, Remaining::Everything);
    }

    /// Waits, at most `limit`, until no release of `handle` is pending: an ADD reusing a handle
    /// must not be handed addresses that a pending release is about to free. A release still
    /// waiting for a carrier is written now.
    pub async fn wait_released(&self, handle: &str, limit: Duration) -> Result<(), ReleaseError> {
        let (mut done, write_now) = {
            let mut pending = self.lock();
            let Some(p) = pending.get_mut(handle) else {
                return Ok(());
            };
            let write_now = p.stage == Stage::Waiting;
            if write_now {
                p.stage = Stage::Writing;
            }
            (p.done_tx.subscribe(), write_now)
        };
        if write_now {
            self.spawn_write(vec![handle.to_owned()], Remaining::Everything);
        }
        match tokio::time::timeout(limit, done.wait_for(|d| *d)).await {
            Ok(_) => Ok(()),
            Err(_) => Err(ReleaseError::StillPending {
                handle: handle.to_owned(),
                waited: limit,
            }),
        }
    }

    /// The node's IPAM writer turn, for the other writers to share.
    pub fn turn(&self) -> IpamTurn {
        self.turn.clone()
    }

    /// Releases not yet written.
    pub fn pending_count(&self) -> usize {
        self.lock().len()
    }

    /// Pending and written releases, for `/metrics`.
    pub fn figures(&self) -> ReleaseFigures {
        let n = |c: &AtomicU64| c.load(Ordering::Relaxed);
        ReleaseFigures {
            pending: self.pending_count(),
            carried: n(&self.written.carried),
            batched: n(&self.written.batched),
            alone: n(&self.written.alone),
        }
    }

    fn count_written(&self, handles: &[String], remaining: Remaining) {
        let counter = match remaining {
            // Only the handle object was left: the block write of an assignment carried it.
            Remaining::HandleObject => &self.written.carried,
            Remaining::Everything if handles.len() > 1 => &self.written.batched,
            Remaining::Everything => &self.written.alone,
        };
        counter.fetch_add(handles.len() as u64, Ordering::Relaxed);
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
    fn track(&self, handle: &str, stage: Stage) -> bool {
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
                stage,
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

    /// Marks the releases finished and drops them from the file.
    fn finish(&self, handles: &[String]) {
        for handle in handles {
            self.untrack(handle);
        }
        if let Err(e) = self.save() {
            // The entries come back after a restart and are released again: harmless.
            warn!(error = %e, "could not record finished releases");
        }
    }

    /// If `own` is still waiting for a carrier, writes it and every other release waiting, all
    /// blocks at once: DELs arriving together (a scale-down, a drain) cost a write per block.
    /// One already carried leaves the others alone: an ADD about to carry them is likely on its
    /// way (pods replaced one after another), and writing them now would race its block write.
    async fn write_uncarried(&self, own: &str) {
        let batch: Vec<String> = {
            let mut pending = self.lock();
            if pending.get(own).is_none_or(|p| p.stage != Stage::Waiting) {
                return;
            }
            restage_waiting(&mut pending, Stage::Writing, &[])
        };
        self.spawn_write(batch, Remaining::Everything);
    }

    /// Writes the releases in the background, then drops them from the queue.
    fn spawn_write(&self, handles: Vec<String>, remaining: Remaining) {
        if handles.is_empty() {
            return;
        }
        let queue = self.clone();
        tokio::spawn(async move {
            let batch_limit = (handles.len() > 1).then_some(BATCH_ATTEMPTS);
            match queue
                .write_until_done(&handles, remaining, batch_limit)
                .await
            {
                Outcome::Written => {
                    queue.count_written(&handles, remaining);
                    queue.finish(&handles);
                    return;
                }
                Outcome::GaveUp => {
                    queue.finish(&handles);
                    return;
                }
                Outcome::OutOfAttempts => {}
            }
            warn!(
                count = handles.len(),
                "a batch of address releases keeps failing; retrying each on its own"
            );
            let each = handles.iter().map(|h| async {
                let one = std::slice::from_ref(h);
                if queue.write_until_done(one, remaining, None).await == Outcome::Written {
                    queue.count_written(one, remaining);
                }
                queue.finish(one);
            });
            futures::future::join_all(each).await;
        });
    }

    /// Writes the releases, retrying with backoff until written, `attempts` run out, or
    /// [`GIVE_UP_AFTER`] (the leak collector then frees what is left).
    async fn write_until_done(
        &self,
        handles: &[String],
        remaining: Remaining,
        attempts: Option<u32>,
    ) -> Outcome {
        let started = Instant::now();
        let mut pause = RETRY_FIRST;
        for attempt in 1u32.. {
            let written = match remaining {
                Remaining::Everything => {
                    let _turn = self.turn.lock().await;
                    self.ipam.release_handles(handles).await.map(|_| ())
                }
                // Handle objects only (and rare stragglers): not worth holding up the next
                // assignment, which writes the block, not the handles.
                Remaining::HandleObject => {
                    let each = handles.iter().map(|h| self.ipam.forget_handle(h));
                    futures::future::join_all(each)
                        .await
                        .into_iter()
                        .find(|r| r.as_ref().is_err_and(|e| !nothing_left(e)))
                        .map_or(Ok(()), |r| r.map(|_| ()))
                }
            };
            match written {
                Ok(()) => {
                    if attempt > 1 {
                        info!(?handles, attempt, "address release written after retries");
                    } else {
                        debug!(?handles, ?remaining, "address release written");
                    }
                    return Outcome::Written;
                }
                Err(e) if nothing_left(&e) => return Outcome::Written,
                Err(e) if started.elapsed() >= GIVE_UP_AFTER => {
                    error!(
                        ?handles,
                        attempt,
                        error = %e,
                        "giving up on an address release; the leak collector will free it"
                    );
                    return Outcome::GaveUp;
                }
                Err(e) if attempts.is_some_and(|max| attempt >= max) => {
                    warn!(?handles, attempt, error = %e, "address release failed");
                    return Outcome::OutOfAttempts;
                }
                Err(e) => {
                    warn!(?handles, attempt, error = %e, retry_in = ?pause, "address release failed");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(RETRY_CAP);
                }
            }
        }
        Outcome::GaveUp
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
pub(crate) mod tests {
    use super::*;
    use tortie_ipam::{
        AutoAssignRequest, Faults, IpPool, IpPoolSpec, IpamBlock, IpamHandle, MemoryStore,
        pod_handle_id,
    };

    /// An in-memory store with one IPv4 pool, and the allocator over it.
    pub(crate) fn ipam_with_pool() -> (Arc<MemoryStore>, Arc<Ipam<Arc<MemoryStore>>>) {
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

    /// A test's own directory for the queue's file, removed when the test ends, passed or not.
    pub(crate) struct Scratch(PathBuf);

    impl Scratch {
        pub(crate) fn new(name: &str) -> Self {
            let dir =
                std::env::temp_dir().join(format!("tortie-releases-{}-{name}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            Self(dir)
        }

        pub(crate) fn file(&self) -> PathBuf {
            self.0.join("pending-releases.json")
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[tokio::test]
    async fn a_release_is_persisted_then_written_and_awaitable() {
        let (store, ipam) = ipam_with_pool();
        assign(&ipam, "c1").await;
        assign(&ipam, "c2").await;
        let scratch = Scratch::new("persisted");
        let path = scratch.file();
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
    }

    #[tokio::test]
    async fn releases_of_an_earlier_run_are_resumed() {
        let (store, ipam) = ipam_with_pool();
        assign(&ipam, "c1").await;
        let scratch = Scratch::new("resumed");
        let path = scratch.file();
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
        let scratch = Scratch::new("failing");
        let path = scratch.file();
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
    }

    #[tokio::test]
    async fn a_repeated_del_is_one_release() {
        let (_store, ipam) = ipam_with_pool();
        assign(&ipam, "c1").await;
        let scratch = Scratch::new("repeated");
        let path = scratch.file();
        let queue = ReleaseQueue::start(ipam, path.clone());
        let handle = pod_handle_id("c1");
        queue.enqueue(&handle).unwrap();
        queue.enqueue(&handle).unwrap();
        assert_eq!(queue.pending_count(), 1);
        queue
            .wait_released(&handle, Duration::from_secs(5))
            .await
            .unwrap();
    }

    /// Polls until nothing is pending (bounded).
    async fn drained<S: Store>(queue: &ReleaseQueue<S>) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while queue.pending_count() > 0 {
            assert!(
                Instant::now() < deadline,
                "{} still pending",
                queue.pending_count()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn releases_nobody_carried_are_written_together_when_the_window_closes() {
        let (store, ipam) = ipam_with_pool();
        for c in ["c1", "c2", "c3"] {
            assign(&ipam, c).await;
        }
        let scratch = Scratch::new("window");
        let path = scratch.file();
        let queue = ReleaseQueue::with_window(ipam, path.clone(), Duration::from_millis(50));
        let before = store.stats();
        queue.enqueue(&pod_handle_id("c1")).unwrap();
        // DELs of a scale-down arrive some milliseconds apart: the first window takes both.
        tokio::time::sleep(Duration::from_millis(20)).await;
        queue.enqueue(&pod_handle_id("c2")).unwrap();
        assert_eq!(allocated(&store), 3, "nothing written inside the window");
        drained(&queue).await;
        let after = store.stats();
        assert_eq!(allocated(&store), 1);
        assert_eq!(store.snapshot::<IpamHandle>().len(), 1);
        assert_eq!(
            after.updates - before.updates,
            1,
            "one block write for both: {before:?} -> {after:?}"
        );
        assert_eq!(
            queue.figures(),
            ReleaseFigures {
                batched: 2,
                ..ReleaseFigures::default()
            }
        );
    }

    #[tokio::test]
    async fn a_release_carried_by_an_assignment_leaves_only_its_handle_to_delete() {
        let (store, ipam) = ipam_with_pool();
        assign(&ipam, "c1").await;
        assign(&ipam, "c2").await;
        let scratch = Scratch::new("carried");
        let path = scratch.file();
        // A window the test never reaches: whatever is written, the carrier wrote.
        let queue = ReleaseQueue::with_window(ipam.clone(), path.clone(), Duration::from_secs(60));
        queue.enqueue(&pod_handle_id("c1")).unwrap();
        let taken = queue.take_for_assignment(&[pod_handle_id("c3")]);
        assert_eq!(taken.handles(), [pod_handle_id("c1")]);
        assert!(
            queue.take_for_assignment(&[]).handles().is_empty(),
            "taken once"
        );
        let before = store.stats();
        let got = ipam
            .assign_once(&AutoAssignRequest {
                handle_id: pod_handle_id("c3"),
                node: "n1".into(),
                num_v4: 1,
                release_with: taken.handles().to_vec(),
                ..AutoAssignRequest::default()
            })
            .await
            .unwrap();
        taken.done(&got.released);
        drained(&queue).await;
        let after = store.stats();
        assert_eq!(allocated(&store), 2, "c2 and c3");
        assert_eq!(
            after.updates - before.updates,
            1,
            "the assignment's block write only: {before:?} -> {after:?}"
        );
        let handles: Vec<String> = store
            .snapshot::<IpamHandle>()
            .into_iter()
            .map(|h| h.spec.handle_id)
            .collect();
        assert_eq!(handles, vec![pod_handle_id("c2"), pod_handle_id("c3")]);
        assert_eq!(queue.figures().carried, 1);
    }

    #[tokio::test]
    async fn a_release_its_assignment_did_not_carry_is_written_by_the_queue() {
        let (store, ipam) = ipam_with_pool();
        assign(&ipam, "c1").await;
        let scratch = Scratch::new("not-carried");
        let path = scratch.file();
        let queue = ReleaseQueue::with_window(ipam, path.clone(), Duration::from_secs(60));
        queue.enqueue(&pod_handle_id("c1")).unwrap();
        // The assignment failed before writing: its task ended without a word.
        drop(queue.take_for_assignment(&[]));
        drained(&queue).await;
        assert_eq!(allocated(&store), 0);
        assert!(store.snapshot::<IpamHandle>().is_empty());
    }

    #[tokio::test]
    async fn one_bad_block_does_not_hold_up_the_other_releases_of_its_batch() {
        let (store, ipam) = ipam_with_pool();
        assign(&ipam, "good").await;
        // The other pod lives in another node's block, which then turns corrupt.
        ipam.assign_once(&AutoAssignRequest {
            handle_id: pod_handle_id("bad"),
            node: "n2".into(),
            num_v4: 1,
            ..AutoAssignRequest::default()
        })
        .await
        .unwrap();
        let intact = store
            .snapshot::<IpamBlock>()
            .into_iter()
            .find(|b| b.spec.affine_node() == Some("n2"))
            .unwrap();
        let mut corrupt = intact.clone();
        let free = corrupt.spec.unallocated[0];
        corrupt.spec.unallocated.push(free);
        store.put(&corrupt);
        let scratch = Scratch::new("bad-block");
        let path = scratch.file();
        let queue = ReleaseQueue::with_window(ipam, path.clone(), Duration::from_millis(10));
        queue.enqueue(&pod_handle_id("good")).unwrap();
        queue.enqueue(&pod_handle_id("bad")).unwrap();
        queue
            .wait_released(&pod_handle_id("good"), Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(queue.pending_count(), 1, "the bad block's release is kept");
        assert_eq!(allocated(&store), 1);
        // Repaired (by hand, as an operator would): the kept release goes through.
        let mut repaired = store
            .snapshot::<IpamBlock>()
            .into_iter()
            .find(|b| b.spec.affine_node() == Some("n2"))
            .unwrap();
        repaired.spec.unallocated.pop();
        store.put(&repaired);
        queue
            .wait_released(&pod_handle_id("bad"), Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!(allocated(&store), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_window_closing_on_a_carried_release_leaves_the_next_one_to_its_carrier() {
        let (store, ipam) = ipam_with_pool();
        assign(&ipam, "c1").await;
        assign(&ipam, "c2").await;
        let scratch = Scratch::new("next-one");
        let path = scratch.file();
        let queue = ReleaseQueue::with_window(ipam, path.clone(), Duration::from_millis(300));
        queue.enqueue(&pod_handle_id("c1")).unwrap();
        let first_carrier = queue.take_for_assignment(&[]);
        tokio::time::sleep(Duration::from_millis(200)).await;
        queue.enqueue(&pod_handle_id("c2")).unwrap();
        // c1's window closes; c2's is still open and stays for the next ADD.
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert_eq!(allocated(&store), 2);
        let second_carrier = queue.take_for_assignment(&[]);
        assert_eq!(second_carrier.handles(), [pod_handle_id("c2")]);
        first_carrier.done(&[]);
        second_carrier.done(&[]);
        for c in ["c1", "c2"] {
            queue
                .wait_released(&pod_handle_id(c), Duration::from_secs(5))
                .await
                .unwrap();
        }
        assert_eq!(allocated(&store), 0);
    }

    #[tokio::test]
    async fn an_add_never_carries_the_release_of_its_own_handle() {
        let (store, ipam) = ipam_with_pool();
        assign(&ipam, "c1").await;
        let scratch = Scratch::new("own-handle");
        let path = scratch.file();
        let queue = ReleaseQueue::with_window(ipam, path.clone(), Duration::from_secs(60));
        queue.enqueue(&pod_handle_id("c1")).unwrap();
        let carrying = queue.take_for_assignment(&[pod_handle_id("c1")]);
        assert!(carrying.handles().is_empty());
        carrying.done(&[]);
        // Still waiting: the ADD's wait for its own handle writes it.
        assert_eq!(allocated(&store), 1);
        queue
            .wait_released(&pod_handle_id("c1"), Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(allocated(&store), 0);
    }
}
