//! The compare-and-swap datastore IPAM runs on ([`Store`]), and an in-memory implementation with fault injection.
//!
//! The trait is async because the agent implements it over the Kubernetes API (kube-rs on tokio).
//! Methods are declared as `-> impl Future + Send` (return-position `impl Trait` in traits), so an
//! implementation may simply write `async fn`, and an `Ipam<S>` future stays `Send` for
//! `tokio::spawn`. Methods are generic over the [`Resource`] kind, so the trait is used through
//! generics, not `dyn`.
//!
//! Revisions are Kubernetes `resourceVersion`s: an object read from the store carries its revision
//! in `metadata.resourceVersion`, `update` is a CAS on it, `delete` takes the revision expected.
//! Reads may come from a cache (a reflector): a stale read only costs a CAS retry.

use std::any::Any;
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use crate::model::Resource;

/// Why a store operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The object changed since it was read (revision mismatch).
    #[error("{kind} {name}: revision conflict")]
    Conflict {
        /// Kind, e.g. `IPAMBlock`.
        kind: &'static str,
        /// Object name.
        name: String,
    },
    /// `create` of an object that exists.
    #[error("{kind} {name} already exists")]
    AlreadyExists {
        /// Kind.
        kind: &'static str,
        /// Object name.
        name: String,
    },
    /// The object does not exist.
    #[error("{kind} {name} not found")]
    NotFound {
        /// Kind.
        kind: &'static str,
        /// Object name.
        name: String,
    },
    /// Anything else (transport, decoding, permission…).
    #[error("{kind} {name}: {message}")]
    Other {
        /// Kind.
        kind: &'static str,
        /// Object name (empty for list).
        name: String,
        /// Description.
        message: String,
    },
}

impl StoreError {
    /// Shorthand for a [`StoreError::Conflict`].
    pub fn conflict<K: Resource>(name: &str) -> Self {
        Self::Conflict {
            kind: K::KIND,
            name: name.to_string(),
        }
    }
    /// Shorthand for a [`StoreError::NotFound`].
    pub fn not_found<K: Resource>(name: &str) -> Self {
        Self::NotFound {
            kind: K::KIND,
            name: name.to_string(),
        }
    }
    /// Shorthand for a [`StoreError::AlreadyExists`].
    pub fn already_exists<K: Resource>(name: &str) -> Self {
        Self::AlreadyExists {
            kind: K::KIND,
            name: name.to_string(),
        }
    }
}

/// Reads-then-deletes [`Store::take`]'s default makes before giving up on a busy object.
const TAKE_ATTEMPTS: u32 = 8;

/// A datastore of Calico objects with per-object compare-and-swap.
pub trait Store: Send + Sync {
    /// Reads one object.
    fn get<K: Resource>(&self, name: &str) -> impl Future<Output = Result<K, StoreError>> + Send;

    /// Reads every object of a kind.
    fn list<K: Resource>(&self) -> impl Future<Output = Result<Vec<K>, StoreError>> + Send;

    /// What `pick` takes from each object of a kind, for the objects it picks: a caller that
    /// needs a field of every object (say each block's CIDR) gets it without the objects being
    /// copied. The default lists and maps; a store holding its objects in a cache maps them in
    /// place.
    fn list_map<K: Resource, T: Send>(
        &self,
        pick: impl Fn(&K) -> Option<T> + Send,
    ) -> impl Future<Output = Result<Vec<T>, StoreError>> + Send {
        async move { Ok(self.list::<K>().await?.iter().filter_map(pick).collect()) }
    }

    /// The objects of a kind for which `keep` holds (only those are copied).
    fn list_where<K: Resource>(
        &self,
        keep: impl Fn(&K) -> bool + Send,
    ) -> impl Future<Output = Result<Vec<K>, StoreError>> + Send {
        self.list_map(move |k: &K| keep(k).then(|| k.clone()))
    }

    /// Creates an object (its `resourceVersion` is ignored); returns it as stored, with its revision.
    fn create<K: Resource>(&self, obj: &K) -> impl Future<Output = Result<K, StoreError>> + Send;

    /// Replaces an object if its stored revision still equals `obj.metadata.resourceVersion`;
    /// returns it as stored, with its new revision.
    fn update<K: Resource>(&self, obj: &K) -> impl Future<Output = Result<K, StoreError>> + Send;

    /// Deletes an object if its stored revision still equals `revision`.
    fn delete<K: Resource>(
        &self,
        name: &str,
        revision: &str,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Deletes an object whatever its revision and returns what it held (`None` when the store
    /// deleted it but cannot say); [`StoreError::NotFound`] if there was none. One round trip
    /// where the store allows; the default reads, then deletes at the revision read.
    fn take<K: Resource>(
        &self,
        name: &str,
    ) -> impl Future<Output = Result<Option<K>, StoreError>> + Send {
        async move {
            for _ in 0..TAKE_ATTEMPTS {
                let current: K = self.get(name).await?;
                let revision = current
                    .metadata()
                    .resource_version
                    .clone()
                    .unwrap_or_default();
                match self.delete::<K>(name, &revision).await {
                    Ok(()) => return Ok(Some(current)),
                    Err(StoreError::Conflict { .. }) => continue,
                    Err(e) => return Err(e),
                }
            }
            Err(StoreError::conflict::<K>(name))
        }
    }

    /// Waits between two CAS attempts. The store is the one piece that knows the runtime, so it
    /// owns the timer (tokio's `sleep` in the agent); the default does not wait at all.
    fn backoff(&self, delay: Duration) -> impl Future<Output = ()> + Send {
        let _ = delay;
        std::future::ready(())
    }
}

impl<T: Store> Store for Arc<T> {
    fn get<K: Resource>(&self, name: &str) -> impl Future<Output = Result<K, StoreError>> + Send {
        (**self).get(name)
    }
    fn list<K: Resource>(&self) -> impl Future<Output = Result<Vec<K>, StoreError>> + Send {
        (**self).list()
    }
    fn list_map<K: Resource, P: Send>(
        &self,
        pick: impl Fn(&K) -> Option<P> + Send,
    ) -> impl Future<Output = Result<Vec<P>, StoreError>> + Send {
        (**self).list_map(pick)
    }
    fn create<K: Resource>(&self, obj: &K) -> impl Future<Output = Result<K, StoreError>> + Send {
        (**self).create(obj)
    }
    fn update<K: Resource>(&self, obj: &K) -> impl Future<Output = Result<K, StoreError>> + Send {
        (**self).update(obj)
    }
    fn delete<K: Resource>(
        &self,
        name: &str,
        revision: &str,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        (**self).delete::<K>(name, revision)
    }
    fn take<K: Resource>(
        &self,
        name: &str,
    ) -> impl Future<Output = Result<Option<K>, StoreError>> + Send {
        (**self).take::<K>(name)
    }
    fn backoff(&self, delay: Duration) -> impl Future<Output = ()> + Send {
        (**self).backoff(delay)
    }
}

/// Faults the [`MemoryStore`] injects, for tests.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// Fail one `update`/`delete` in this many with a spurious [`StoreError::Conflict`] (0: never).
    pub conflict_one_in: u32,
    /// Apply one successful write in this many but report it as failed with
    /// [`StoreError::Other`] (0: never), like a timeout after the API server committed.
    pub ambiguous_one_in: u32,
    /// Seed of the fault generator, so a failing run replays.
    pub seed: u64,
    /// Every operation returns `Pending` once before running, so futures polled by an
    /// interleaving scheduler switch between tasks at every store call.
    pub yield_before_each_op: bool,
}

/// Operation counters of a [`MemoryStore`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// `get` calls.
    pub gets: u64,
    /// `list` calls.
    pub lists: u64,
    /// Successful `create`s.
    pub creates: u64,
    /// Successful `update`s.
    pub updates: u64,
    /// Successful `delete`s.
    pub deletes: u64,
    /// Conflicts returned, injected or real.
    pub conflicts: u64,
    /// Conflicts that were injected.
    pub injected_conflicts: u64,
    /// Writes applied but reported as failed.
    pub injected_ambiguous: u64,
    /// Backoff pauses requested between CAS attempts.
    pub backoffs: u64,
}

impl StoreStats {
    /// Successful writes (create + update + delete).
    pub fn writes(&self) -> u64 {
        self.creates + self.updates + self.deletes
    }
}

struct Entry {
    revision: u64,
    object: Arc<dyn Any + Send + Sync>,
}

#[derive(Default)]
struct MemoryState {
    objects: HashMap<(&'static str, String), Entry>,
    next_revision: u64,
    faults: Faults,
    rng: u64,
    stats: StoreStats,
    backoff_delays: Vec<Duration>,
}

impl MemoryState {
    fn next_random(&mut self) -> u64 {
        // xorshift64*: tiny, deterministic, good enough to pick faults.
        let mut x = self.rng.max(1);
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn inject_conflict(&mut self) -> bool {
        let n = self.faults.conflict_one_in;
        if n > 0 && self.next_random().is_multiple_of(u64::from(n)) {
            self.stats.injected_conflicts += 1;
            self.stats.conflicts += 1;
            return true;
        }
        false
    }

    /// Whether to report the write just applied as failed.
    fn inject_ambiguous(&mut self) -> bool {
        let n = self.faults.ambiguous_one_in;
        if n > 0 && self.next_random().is_multiple_of(u64::from(n)) {
            self.stats.injected_ambiguous += 1;
            return true;
        }
        false
    }

    fn bump(&mut self) -> u64 {
        self.next_revision += 1;
        self.next_revision
    }
}

/// An in-memory [`Store`] with Kubernetes-like revisions, for tests and benchmarks; can inject
/// spurious conflicts and writes of unknown outcome, and force task switches at every call.
#[derive(Default)]
pub struct MemoryStore {
    state: Mutex<MemoryState>,
}

fn ambiguous<K: Resource>(name: &str) -> StoreError {
    StoreError::Other {
        kind: K::KIND,
        name: name.to_string(),
        message: "injected fault: write applied, outcome reported as unknown".to_string(),
    }
}

fn decode_revision<K: Resource>(name: &str, revision: Option<&str>) -> Result<u64, StoreError> {
    revision
        .ok_or("missing metadata.resourceVersion")
        .and_then(|r| {
            r.parse::<u64>()
                .map_err(|_| "unparsable metadata.resourceVersion")
        })
        .map_err(|message| StoreError::Other {
            kind: K::KIND,
            name: name.to_string(),
            message: message.to_string(),
        })
}

impl MemoryStore {
    /// An empty store without faults.
    pub fn new() -> Self {
        Self::default()
    }

    /// Replaces the fault plan.
    pub fn set_faults(&self, faults: Faults) {
        let mut st = self.lock();
        st.rng = faults.seed ^ 0x9E37_79B9_7F4A_7C15;
        st.faults = faults;
    }

    /// Operation counters so far.
    pub fn stats(&self) -> StoreStats {
        self.lock().stats
    }

    /// The backoff delays requested so far (the memory store records them and does not wait).
    pub fn backoff_delays(&self) -> Vec<Duration> {
        self.lock().backoff_delays.clone()
    }

    /// Every stored object of a kind, synchronously (for invariant checks between steps).
    pub fn snapshot<K: Resource>(&self) -> Vec<K> {
        let st = self.lock();
        let mut out: Vec<K> = st
            .objects
            .iter()
            .filter(|((kind, _), _)| *kind == K::KIND)
            .filter_map(|(_, e)| Self::materialize::<K>(e))
            .collect();
        out.sort_by(|a, b| a.metadata().name.cmp(&b.metadata().name));
        out
    }

    /// Stores an object unconditionally (test setup); returns it with its revision.
    pub fn put<K: Resource>(&self, obj: &K) -> K {
        let mut st = self.lock();
        let rev = st.bump();
        let mut stored = obj.clone();
        stored.metadata_mut().resource_version = Some(rev.to_string());
        st.objects.insert(
            (K::KIND, obj.metadata().name.clone()),
            Entry {
                revision: rev,
                object: Arc::new(stored.clone()),
            },
        );
        stored
    }

    fn lock(&self) -> MutexGuard<'_, MemoryState> {
        // A panic while holding the lock leaves plain data behind; keep using it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn materialize<K: Resource>(entry: &Entry) -> Option<K> {
        entry.object.downcast_ref::<K>().cloned()
    }

    fn yield_point(&self) -> YieldOnce {
        YieldOnce {
            pending: self.lock().faults.yield_before_each_op,
        }
    }

    fn get_now<K: Resource>(&self, name: &str) -> Result<K, StoreError> {
        let mut st = self.lock();
        st.stats.gets += 1;
        st.objects
            .get(&(K::KIND, name.to_string()))
            .and_then(Self::materialize::<K>)
            .ok_or_else(|| StoreError::not_found::<K>(name))
    }

    fn list_now<K: Resource>(&self) -> Vec<K> {
        self.lock().stats.lists += 1;
        self.snapshot()
    }

    fn create_now<K: Resource>(&self, obj: &K) -> Result<K, StoreError> {
        let name = obj.metadata().name.clone();
        let mut st = self.lock();
        if st.objects.contains_key(&(K::KIND, name.clone())) {
            return Err(StoreError::already_exists::<K>(&name));
        }
        let rev = st.bump();
        let mut stored = obj.clone();
        stored.metadata_mut().resource_version = Some(rev.to_string());
        st.objects.insert(
            (K::KIND, name.clone()),
            Entry {
                revision: rev,
                object: Arc::new(stored.clone()),
            },
        );
        st.stats.creates += 1;
        if st.inject_ambiguous() {
            return Err(ambiguous::<K>(&name));
        }
        Ok(stored)
    }

    fn update_now<K: Resource>(&self, obj: &K) -> Result<K, StoreError> {
        let name = obj.metadata().name.clone();
        let expected = decode_revision::<K>(&name, obj.metadata().resource_version.as_deref())?;
        let mut st = self.lock();
        let key = (K::KIND, name.clone());
        let current = match st.objects.get(&key) {
            None => return Err(StoreError::not_found::<K>(&name)),
            Some(e) => e.revision,
        };
        if current != expected {
            st.stats.conflicts += 1;
            return Err(StoreError::conflict::<K>(&name));
        }
        if st.inject_conflict() {
            return Err(StoreError::conflict::<K>(&name));
        }
        let rev = st.bump();
        let mut stored = obj.clone();
        stored.metadata_mut().resource_version = Some(rev.to_string());
        st.objects.insert(
            key,
            Entry {
                revision: rev,
                object: Arc::new(stored.clone()),
            },
        );
        st.stats.updates += 1;
        if st.inject_ambiguous() {
            return Err(ambiguous::<K>(&name));
        }
        Ok(stored)
    }

    fn delete_now<K: Resource>(&self, name: &str, revision: &str) -> Result<(), StoreError> {
        let expected = decode_revision::<K>(name, Some(revision))?;
        let mut st = self.lock();
        let key = (K::KIND, name.to_string());
        let current = match st.objects.get(&key) {
            None => return Err(StoreError::not_found::<K>(name)),
            Some(e) => e.revision,
        };
        if current != expected {
            st.stats.conflicts += 1;
            return Err(StoreError::conflict::<K>(name));
        }
        if st.inject_conflict() {
            return Err(StoreError::conflict::<K>(name));
        }
        st.objects.remove(&key);
        st.stats.deletes += 1;
        if st.inject_ambiguous() {
            return Err(ambiguous::<K>(name));
        }
        Ok(())
    }

    fn take_now<K: Resource>(&self, name: &str) -> Result<Option<K>, StoreError> {
        let mut st = self.lock();
        let key = (K::KIND, name.to_string());
        let Some(entry) = st.objects.remove(&key) else {
            return Err(StoreError::not_found::<K>(name));
        };
        st.stats.deletes += 1;
        if st.inject_ambiguous() {
            return Err(ambiguous::<K>(name));
        }
        Ok(Self::materialize(&entry))
    }
}

/// A future that is `Pending` once (waking itself) when asked to, then ready.
struct YieldOnce {
    pending: bool,
}

impl Future for YieldOnce {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.pending {
            self.pending = false;
            cx.waker().wake_by_ref();
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    }
}

impl Store for MemoryStore {
    async fn get<K: Resource>(&self, name: &str) -> Result<K, StoreError> {
        self.yield_point().await;
        self.get_now(name)
    }

    async fn list<K: Resource>(&self) -> Result<Vec<K>, StoreError> {
        self.yield_point().await;
        Ok(self.list_now())
    }

    async fn list_map<K: Resource, T: Send>(
        &self,
        pick: impl Fn(&K) -> Option<T> + Send,
    ) -> Result<Vec<T>, StoreError> {
        self.yield_point().await;
        let mut st = self.lock();
        st.stats.lists += 1;
        // In name order, as `list`, so seeded interleavings replay exactly.
        let mut picked: Vec<(&str, T)> = st
            .objects
            .iter()
            .filter(|((kind, _), _)| *kind == K::KIND)
            .filter_map(|((_, name), e)| {
                Some((name.as_str(), pick(e.object.downcast_ref::<K>()?)?))
            })
            .collect();
        picked.sort_by(|a, b| a.0.cmp(b.0));
        let out = picked.into_iter().map(|(_, t)| t).collect();
        drop(st);
        Ok(out)
    }

    async fn create<K: Resource>(&self, obj: &K) -> Result<K, StoreError> {
        self.yield_point().await;
        self.create_now(obj)
    }

    async fn update<K: Resource>(&self, obj: &K) -> Result<K, StoreError> {
        self.yield_point().await;
        self.update_now(obj)
    }

    async fn delete<K: Resource>(&self, name: &str, revision: &str) -> Result<(), StoreError> {
        self.yield_point().await;
        self.delete_now::<K>(name, revision)
    }

    async fn take<K: Resource>(&self, name: &str) -> Result<Option<K>, StoreError> {
        self.yield_point().await;
        self.take_now::<K>(name)
    }

    fn backoff(&self, delay: Duration) -> impl Future<Output = ()> + Send {
        let mut st = self.lock();
        st.stats.backoffs += 1;
        // Bounded record: enough for tests to look at the distribution.
        if st.backoff_delays.len() < 10_000 {
            st.backoff_delays.push(delay);
        }
        std::future::ready(())
    }
}

/// A way in which a [`Store`] implementation breaks the contract the allocator relies on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("store contract, step {step:?}: {problem}")]
pub struct ContractViolation {
    /// Which step of [`check_store_contract`] failed.
    pub step: &'static str,
    /// What was expected and what happened.
    pub problem: String,
}

/// Exercises a store's compare-and-swap contract with one scratch IPAMHandle named
/// `<name_prefix>-store-contract` (removed again on success): create / duplicate create, get,
/// update with the current and with a stale revision, delete with a stale and the current
/// revision, the errors after deletion, and a take that returns what it deleted. Meant for an implementation's own tests, e.g. the
/// agent's store against a real API server.
pub async fn check_store_contract<S: Store>(
    store: &S,
    name_prefix: &str,
) -> Result<(), ContractViolation> {
    use crate::model::{IpamHandle, IpamHandleSpec};
    use std::collections::BTreeMap;

    fn fail<T>(step: &'static str, problem: String) -> Result<T, ContractViolation> {
        Err(ContractViolation { step, problem })
    }
    let name = format!("{name_prefix}-store-contract");
    let mut handle = IpamHandle::new(
        name.clone(),
        IpamHandleSpec {
            handle_id: name.clone(),
            block: BTreeMap::from([("10.255.255.0/26".to_string(), 1)]),
            deleted: None,
            extra: Default::default(),
        },
    );

    let created = match store.create(&handle).await {
        Ok(c) => c,
        Err(e) => return fail("create", format!("expected success, got {e}")),
    };
    let Some(r1) = created.metadata.resource_version.clone() else {
        return fail("create", "returned object has no resourceVersion".into());
    };
    match store.create(&handle).await {
        Err(StoreError::AlreadyExists { .. }) => {}
        other => {
            return fail(
                "create twice",
                format!("expected AlreadyExists, got {other:?}"),
            );
        }
    }
    match store.get::<IpamHandle>(&name).await {
        Ok(got) if got.metadata.resource_version.as_deref() == Some(r1.as_str()) => {
            if got.spec != handle.spec {
                return fail("get", format!("spec changed: {:?}", got.spec));
            }
        }
        other => return fail("get", format!("expected revision {r1}, got {other:?}")),
    }

    handle.metadata.resource_version = Some(r1.clone());
    handle.spec.block.insert("10.255.255.64/26".to_string(), 2);
    let r2 = match store.update(&handle).await {
        Ok(u) => match u.metadata.resource_version {
            Some(r2) if r2 != r1 => r2,
            other => return fail("update", format!("revision not advanced: {other:?}")),
        },
        Err(e) => return fail("update", format!("expected success, got {e}")),
    };
    match store.update(&handle).await {
        Err(StoreError::Conflict { .. }) => {}
        other => return fail("stale update", format!("expected Conflict, got {other:?}")),
    }
    match store.delete::<IpamHandle>(&name, &r1).await {
        Err(StoreError::Conflict { .. }) => {}
        other => return fail("stale delete", format!("expected Conflict, got {other:?}")),
    }
    match store.list::<IpamHandle>().await {
        // A list may lag behind writes (the API server serves it from its watch cache): the
        // allocator tolerates that, as every write after it is a CAS. What it shows must be
        // a state that existed.
        Ok(all) => {
            let found = all.iter().find(|h| h.metadata.name == name);
            let revision = found.and_then(|h| h.metadata.resource_version.as_deref());
            if found.is_some() && revision != Some(r1.as_str()) && revision != Some(r2.as_str()) {
                return fail(
                    "list",
                    format!("expected {name} at revision {r1} or {r2}, got {found:?}"),
                );
            }
        }
        Err(e) => return fail("list", format!("expected success, got {e}")),
    }
    if let Err(e) = store.delete::<IpamHandle>(&name, &r2).await {
        return fail("delete", format!("expected success, got {e}"));
    }
    match store.get::<IpamHandle>(&name).await {
        Err(StoreError::NotFound { .. }) => {}
        other => return fail("get deleted", format!("expected NotFound, got {other:?}")),
    }
    match store.delete::<IpamHandle>(&name, &r2).await {
        Err(StoreError::NotFound { .. }) => {}
        other => {
            return fail(
                "delete deleted",
                format!("expected NotFound, got {other:?}"),
            );
        }
    }
    handle.metadata.resource_version = Some(r2);
    match store.update(&handle).await {
        // The API server answers 404 or 409 here depending on version; both keep CAS safe.
        Err(StoreError::NotFound { .. } | StoreError::Conflict { .. }) => {}
        other => {
            return fail(
                "update deleted",
                format!("expected NotFound or Conflict, got {other:?}"),
            );
        }
    }

    if let Err(e) = store.create(&handle).await {
        return fail("create again", format!("expected success, got {e}"));
    }
    match store.take::<IpamHandle>(&name).await {
        Ok(Some(taken)) if taken.spec == handle.spec => {}
        // The Kubernetes API answers a custom resource's deletion with a Status.
        Ok(None) => {}
        other => return fail("take", format!("expected the handle, got {other:?}")),
    }
    match store.get::<IpamHandle>(&name).await {
        Err(StoreError::NotFound { .. }) => {}
        other => return fail("get taken", format!("expected NotFound, got {other:?}")),
    }
    match store.take::<IpamHandle>(&name).await {
        Err(StoreError::NotFound { .. }) => Ok(()),
        other => fail("take taken", format!("expected NotFound, got {other:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block_on<F: Future>(fut: F) -> F::Output {
        let mut fut = std::pin::pin!(fut);
        let mut cx = Context::from_waker(std::task::Waker::noop());
        for _ in 0..1000 {
            if let Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
                return v;
            }
        }
        panic!("memory store blocked");
    }

    #[test]
    fn memory_store_meets_the_contract_and_cleans_up() {
        let store = MemoryStore::new();
        block_on(check_store_contract(&store, "t")).unwrap();
        assert!(store.snapshot::<crate::IpamHandle>().is_empty());
        // Again on the same store: nothing left behind blocks a second run.
        block_on(check_store_contract(&store, "t")).unwrap();
    }

    /// A store that ignores revisions on update: what the contract check must catch.
    struct BlindUpdates(MemoryStore);

    impl Store for BlindUpdates {
        async fn get<K: Resource>(&self, name: &str) -> Result<K, StoreError> {
            self.0.get(name).await
        }
        async fn list<K: Resource>(&self) -> Result<Vec<K>, StoreError> {
            self.0.list().await
        }
        async fn create<K: Resource>(&self, obj: &K) -> Result<K, StoreError> {
            self.0.create(obj).await
        }
        async fn update<K: Resource>(&self, obj: &K) -> Result<K, StoreError> {
            let mut current: K = self.0.get(&obj.metadata().name).await?;
            let rev = current.metadata().resource_version.clone();
            current = obj.clone();
            current.metadata_mut().resource_version = rev;
            self.0.update(&current).await
        }
        async fn delete<K: Resource>(&self, name: &str, revision: &str) -> Result<(), StoreError> {
            self.0.delete::<K>(name, revision).await
        }
    }

    #[test]
    fn contract_check_catches_an_update_without_cas() {
        let err =
            block_on(check_store_contract(&BlindUpdates(MemoryStore::new()), "t")).unwrap_err();
        assert_eq!(err.step, "stale update");
    }
}
