//! `tortie_ipam::Store` over the Kubernetes API: `resourceVersion` is the compare-and-swap revision;
//! reads of watched kinds come from the agent's watch caches, with this agent's own writes laid over them.

use std::any::Any;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use kube::Client;
use kube::api::{Api, DeleteParams, ListParams, PostParams, Preconditions};
use kube::core::DynamicObject;
use tokio::sync::watch;
use tortie_ipam::{Resource, Store, StoreError};

use super::calico::api_resource;
use super::watch::Snapshot;

type AnyObject = Arc<dyn Any + Send + Sync>;

/// A watch cache seen through its kind's erased type, so the generic `Store` methods can pick
/// the one for `K::KIND` and downcast what it returns.
trait KindCache: Send + Sync {
    /// Calls `f` with every object of the current complete view; false (and no call) before
    /// the first list arrived.
    fn for_each(&self, f: &mut dyn FnMut(&str, &(dyn Any + Send + Sync))) -> bool;
    /// One object of the current view (`Some(None)`: not there), or `None` before the first list.
    fn lookup(&self, name: &str) -> Option<Option<AnyObject>>;
}

impl<T: Resource> KindCache for watch::Receiver<Arc<Snapshot<T>>> {
    fn for_each(&self, f: &mut dyn FnMut(&str, &(dyn Any + Send + Sync))) -> bool {
        let snap = self.borrow();
        if snap.synced {
            for (name, obj) in &snap.objects {
                f(name, &**obj);
            }
        }
        snap.synced
    }

    fn lookup(&self, name: &str) -> Option<Option<AnyObject>> {
        let snap = self.borrow();
        snap.synced
            .then(|| snap.objects.get(name).map(|o| o.clone() as AnyObject))
    }
}

/// How long this agent's own write shadows the watch cache at most. The watch delivers a write
/// within milliseconds; the bound only keeps the overlay small if an event never comes (then a
/// stale read costs a CAS conflict, which reads through to the API server).
const OVERLAY_TTL: Duration = Duration::from_secs(30);

/// The outcome of one of this agent's writes, kept until the watch cache shows it.
struct Written {
    /// The revision the write produced (for a delete: the one it deleted).
    revision: u64,
    /// The object as stored, or `None` after a delete.
    object: Option<AnyObject>,
    at: Instant,
}

#[derive(Default)]
struct Overlay {
    written: HashMap<(&'static str, String), Written>,
    /// Objects a write found changed or gone: the next read goes to the API server.
    read_through: HashSet<(&'static str, String)>,
}

/// A `resourceVersion` as a number: the API server hands out etcd revisions, which grow with
/// every write, so comparing two tells which read is newer. `None` if it is not one.
fn revision_of<K: Resource>(obj: &K) -> Option<u64> {
    obj.metadata().resource_version.as_deref()?.parse().ok()
}

/// What a reader should see of one object: the cached one unless this agent's own later write
/// has not reached the cache yet. Also says whether the write can be forgotten (the cache
/// caught up); `None` when a revision is not a number (then ask the API server).
fn newest<K: Resource>(cached: Option<&K>, written: Option<&Written>) -> Option<(Option<K>, bool)> {
    let Some(w) = written else {
        return Some((cached.cloned(), false));
    };
    let mine = || {
        w.object
            .as_ref()
            .and_then(|o| o.downcast_ref::<K>())
            .cloned()
    };
    let Some(c) = cached else {
        return Some((mine(), false));
    };
    let cached_rev = revision_of(c)?;
    // A deleted object shows a later revision only once it has been created anew.
    let caught_up = match w.object {
        Some(_) => cached_rev >= w.revision,
        None => cached_rev > w.revision,
    };
    Some(if caught_up {
        (Some(c.clone()), true)
    } else {
        (mine(), false)
    })
}

/// Reads and writes Calico's IPAM objects through the API server. Every write is a CAS on
/// `metadata.resourceVersion`, which the API server enforces (409 Conflict on mismatch).
///
/// Kinds given a watch cache ([`KubeIpamStore::with_cache`]) are read from it once it has
/// listed: IPAM tolerates a stale read, since the write that follows is a CAS that fails on a
/// stale revision, and after such a failure the object is read from the API server. Stale must
/// never mean older than this agent's own writes (a release reading a block from before its
/// assignment would find nothing to free), so each write is kept and served until the watch
/// delivers it.
#[derive(Clone)]
pub struct KubeIpamStore {
    client: Client,
    caches: HashMap<&'static str, Arc<dyn KindCache>>,
    overlay: Arc<Mutex<Overlay>>,
}

impl KubeIpamStore {
    /// A store reading everything from the API server.
    pub fn new(client: Client) -> Self {
        Self {
            client,
            caches: HashMap::new(),
            overlay: Arc::default(),
        }
    }

    /// Reads kind `K` from `cache` once it has listed (the API server until then).
    pub fn with_cache<K: Resource>(mut self, cache: watch::Receiver<Arc<Snapshot<K>>>) -> Self {
        self.caches.insert(K::KIND, Arc::new(cache));
        self
    }

    fn api<K: Resource>(&self) -> Api<DynamicObject> {
        Api::all_with(self.client.clone(), &api_resource(K::KIND))
    }

    fn overlay(&self) -> MutexGuard<'_, Overlay> {
        // The overlay only holds finished writes; a panic elsewhere cannot leave it half-updated.
        self.overlay
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// `K`'s object from the cache, or `None` when the API server must answer instead.
    fn cached_get<K: Resource>(&self, name: &str) -> Option<Result<K, StoreError>> {
        let cache = self.caches.get(K::KIND)?;
        let key = (K::KIND, name.to_owned());
        let mut overlay = self.overlay();
        if overlay.read_through.contains(&key) {
            return None;
        }
        let cached = cache.lookup(name)?;
        let cached = cached.as_ref().and_then(|o| o.downcast_ref::<K>());
        let (seen, caught_up) = newest(cached, overlay.written.get(&key))?;
        if caught_up {
            overlay.written.remove(&key);
        }
        Some(seen.ok_or_else(|| StoreError::not_found::<K>(name)))
    }

    /// What `pick` takes from every `K` of the cache, with this agent's pending writes
    /// applied, or `None` when the API server must answer instead. Nothing is copied but what
    /// `pick` returns, and it sees each object once, in its newest known state.
    fn cached_list_map<K: Resource, T>(&self, pick: impl Fn(&K) -> Option<T>) -> Option<Vec<T>> {
        let cache = self.caches.get(K::KIND)?;
        let overlay = self.overlay();
        let written: HashSet<&str> = overlay
            .written
            .keys()
            .filter(|(kind, _)| *kind == K::KIND)
            .map(|(_, name)| name.as_str())
            .collect();
        let mut out = Vec::new();
        let synced = cache.for_each(&mut |name, obj| {
            if !written.contains(name)
                && let Some(picked) = obj.downcast_ref::<K>().and_then(&pick)
            {
                out.push(picked);
            }
        });
        if !synced {
            return None;
        }
        for name in written {
            let w = overlay.written.get(&(K::KIND, name.to_owned()))?;
            let cached = cache
                .lookup(name)?
                .and_then(|o| o.downcast_ref::<K>().cloned());
            if let (Some(k), _) = newest(cached.as_ref(), Some(w))? {
                out.extend(pick(&k));
            }
        }
        Some(out)
    }

    /// Remembers an object as this agent last wrote or read it from the API server, unless
    /// something newer is remembered already.
    fn remember<K: Resource>(&self, name: &str, obj: Option<&K>, revision: u64) {
        if !self.caches.contains_key(K::KIND) {
            return;
        }
        let key = (K::KIND, name.to_owned());
        let now = Instant::now();
        let mut overlay = self.overlay();
        overlay.read_through.remove(&key);
        overlay
            .written
            .retain(|_, w| now.duration_since(w.at) < OVERLAY_TTL);
        if overlay
            .written
            .get(&key)
            .is_some_and(|w| w.revision > revision)
        {
            return;
        }
        overlay.written.insert(
            key,
            Written {
                revision,
                object: obj.map(|o| Arc::new(o.clone()) as AnyObject),
                at: now,
            },
        );
    }

    /// A write found the object changed or gone: forget what we knew, ask the API server next.
    fn distrust<K: Resource>(&self, name: &str) {
        if !self.caches.contains_key(K::KIND) {
            return;
        }
        let key = (K::KIND, name.to_owned());
        let mut overlay = self.overlay();
        overlay.written.remove(&key);
        overlay.read_through.insert(key);
    }

    /// Remembers an object read or written through the API server (one without a numeric
    /// revision is not remembered, and later reads of it go to the API server while the cache
    /// cannot be compared with it either).
    fn remember_stored<K: Resource>(&self, obj: &K) {
        let name = &obj.metadata().name;
        match revision_of(obj) {
            Some(rev) => self.remember(name, Some(obj), rev),
            None => self.distrust::<K>(name),
        }
    }
}

/// Runs one API call and logs its latency at debug level (per-pod IPAM cost is a benchmark).
async fn timed<T>(
    kind: &str,
    op: &str,
    name: &str,
    fut: impl std::future::Future<Output = T>,
) -> T {
    let t = std::time::Instant::now();
    let r = fut.await;
    tracing::debug!(
        kind,
        op,
        name,
        ms = t.elapsed().as_secs_f64() * 1e3,
        "API call"
    );
    r
}

fn to_dynamic<K: Resource>(obj: &K) -> Result<DynamicObject, StoreError> {
    let name = obj.metadata().name.clone();
    let mut dynamic: DynamicObject = serde_json::to_value(obj)
        .and_then(serde_json::from_value)
        .map_err(|e| other::<K>(&name, format!("encoding: {e}")))?;
    // Sent back, the API server would decode and check them on every write; left out, it
    // keeps and updates its own record of field ownership.
    dynamic.metadata.managed_fields = None;
    Ok(dynamic)
}

fn from_dynamic<K: Resource>(obj: DynamicObject) -> Result<K, StoreError> {
    let name = obj.metadata.name.clone().unwrap_or_default();
    serde_json::to_value(obj)
        .and_then(serde_json::from_value)
        .map_err(|e| other::<K>(&name, format!("decoding the stored object: {e}")))
}

fn other<K: Resource>(name: &str, message: String) -> StoreError {
    StoreError::Other {
        kind: K::KIND,
        name: name.to_owned(),
        message,
    }
}

fn map_err<K: Resource>(name: &str, err: kube::Error) -> StoreError {
    if let kube::Error::Api(status) = &err {
        match (status.code, status.reason.as_str()) {
            (409, "AlreadyExists") => return StoreError::already_exists::<K>(name),
            (409, _) => return StoreError::conflict::<K>(name),
            (404, _) => return StoreError::not_found::<K>(name),
            // A failed delete precondition is the API's way of saying the revision moved on.
            (422, _) if status.message.contains("Precondition failed") => {
                return StoreError::conflict::<K>(name);
            }
            _ => {}
        }
    }
    other::<K>(name, err.to_string())
}

impl Store for KubeIpamStore {
    async fn get<K: Resource>(&self, name: &str) -> Result<K, StoreError> {
        if let Some(cached) = self.cached_get::<K>(name) {
            return cached;
        }
        let api = self.api::<K>();
        match timed(K::KIND, "get", name, api.get(name)).await {
            Ok(obj) => {
                let obj: K = from_dynamic(obj)?;
                self.remember_stored(&obj);
                Ok(obj)
            }
            Err(e) => {
                let e = map_err::<K>(name, e);
                if matches!(e, StoreError::NotFound { .. }) {
                    self.overlay()
                        .read_through
                        .remove(&(K::KIND, name.to_owned()));
                }
                Err(e)
            }
        }
    }

    async fn list<K: Resource>(&self) -> Result<Vec<K>, StoreError> {
        self.list_map(|k: &K| Some(k.clone())).await
    }

    async fn list_map<K: Resource, T: Send>(
        &self,
        pick: impl Fn(&K) -> Option<T> + Send,
    ) -> Result<Vec<T>, StoreError> {
        if let Some(cached) = self.cached_list_map::<K, T>(&pick) {
            return Ok(cached);
        }
        let api = self.api::<K>();
        // Served from the API server's watch cache: a consistent list waits for etcd's progress
        // notification (~100 ms here), and IPAM tolerates a stale read, since every write is
        // a compare-and-swap that fails on a stale revision and is retried.
        let params = ListParams::default().match_any();
        let list = timed(K::KIND, "list", "", api.list(&params))
            .await
            .map_err(|e| map_err::<K>("", e))?;
        let mut out = Vec::new();
        for item in list.items {
            out.extend(pick(&from_dynamic::<K>(item)?));
        }
        Ok(out)
    }

    async fn create<K: Resource>(&self, obj: &K) -> Result<K, StoreError> {
        let name = obj.metadata().name.clone();
        let mut dynamic = to_dynamic(obj)?;
        dynamic.metadata.resource_version = None;
        let api = self.api::<K>();
        let created = timed(
            K::KIND,
            "create",
            &name,
            api.create(&PostParams::default(), &dynamic),
        )
        .await
        .map_err(|e| {
            let e = map_err::<K>(&name, e);
            if !matches!(e, StoreError::NotFound { .. }) {
                // Exists after all, or the create may have landed: ask the API server next.
                self.distrust::<K>(&name);
            }
            e
        })?;
        let created: K = from_dynamic(created)?;
        self.remember_stored(&created);
        Ok(created)
    }

    async fn update<K: Resource>(&self, obj: &K) -> Result<K, StoreError> {
        let name = obj.metadata().name.clone();
        if obj.metadata().resource_version.is_none() {
            // Without a revision the API server would overwrite blindly; IPAM never wants that.
            return Err(other::<K>(
                &name,
                "update without metadata.resourceVersion".into(),
            ));
        }
        let dynamic = to_dynamic(obj)?;
        let api = self.api::<K>();
        let stored = timed(
            K::KIND,
            "update",
            &name,
            api.replace(&name, &PostParams::default(), &dynamic),
        )
        .await
        .map_err(|e| {
            // Conflict or gone: what we read was stale. Anything else: it may have landed.
            self.distrust::<K>(&name);
            map_err::<K>(&name, e)
        })?;
        let stored: K = from_dynamic(stored)?;
        self.remember_stored(&stored);
        Ok(stored)
    }

    async fn delete<K: Resource>(&self, name: &str, revision: &str) -> Result<(), StoreError> {
        let params = DeleteParams {
            preconditions: Some(Preconditions {
                resource_version: Some(revision.to_owned()),
                uid: None,
            }),
            ..DeleteParams::default()
        };
        let api = self.api::<K>();
        let result = timed(K::KIND, "delete", name, api.delete(name, &params))
            .await
            .map_err(|e| map_err::<K>(name, e));
        match (&result, revision.parse::<u64>()) {
            (Ok(_) | Err(StoreError::NotFound { .. }), Ok(rev)) => {
                self.remember::<K>(name, None, rev)
            }
            _ => self.distrust::<K>(name),
        }
        result.map(|_| ())
    }

    async fn take<K: Resource>(&self, name: &str) -> Result<Option<K>, StoreError> {
        let api = self.api::<K>();
        let result = timed(
            K::KIND,
            "take",
            name,
            api.delete(name, &DeleteParams::default()),
        )
        .await
        .map_err(|e| map_err::<K>(name, e));
        // The deletion's own revision is not returned: read through until the watch shows it.
        self.distrust::<K>(name);
        match result? {
            either::Either::Left(obj) => from_dynamic(obj).map(Some),
            // What the API server answers for a custom resource (v1.36): the object is gone,
            // its last state is not returned.
            either::Either::Right(_status) => Ok(None),
        }
    }

    async fn backoff(&self, delay: Duration) {
        tokio::time::sleep(delay).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tortie_ipam::{IpamBlock, new_block};

    fn block(rev: &str, node: &str) -> IpamBlock {
        let mut b = new_block("10.0.0.0/26".parse().unwrap(), Some(node));
        b.metadata.resource_version = Some(rev.to_owned());
        b
    }

    const NAME: &str = "10-0-0-0-26";

    impl KubeIpamStore {
        /// The cached objects `keep` selects, as `list_where` would serve them.
        fn cached_list<K: Resource>(&self, keep: impl Fn(&K) -> bool) -> Option<Vec<K>> {
            self.cached_list_map(|k: &K| keep(k).then(|| k.clone()))
        }
    }

    fn snapshot(objects: &[IpamBlock], synced: bool) -> Arc<Snapshot<IpamBlock>> {
        Arc::new(Snapshot {
            objects: objects
                .iter()
                .map(|b| (b.metadata.name.clone(), Arc::new(b.clone())))
                .collect(),
            synced,
        })
    }

    /// A store whose API server is unreachable, so a test sees only what the cache answers.
    fn store(cache: watch::Receiver<Arc<Snapshot<IpamBlock>>>) -> KubeIpamStore {
        let config = kube::Config::new("http://127.0.0.1:9".parse().unwrap());
        KubeIpamStore::new(Client::try_from(config).unwrap()).with_cache(cache)
    }

    fn cached_rev(s: &KubeIpamStore) -> Option<Result<String, StoreError>> {
        s.cached_get::<IpamBlock>(NAME)
            .map(|r| r.map(|b| b.metadata.resource_version.unwrap()))
    }

    #[tokio::test]
    async fn reads_go_to_the_api_server_until_the_cache_has_listed() {
        let (tx, rx) = watch::channel(snapshot(&[block("5", "n1")], false));
        let s = store(rx);
        assert!(cached_rev(&s).is_none());
        assert!(s.cached_list::<IpamBlock>(|_| true).is_none());
        tx.send(snapshot(&[block("5", "n1")], true)).unwrap();
        assert_eq!(cached_rev(&s), Some(Ok("5".into())));
        assert_eq!(s.cached_list::<IpamBlock>(|_| true).unwrap().len(), 1);
    }

    #[tokio::test]
    async fn kinds_without_a_cache_read_the_api_server() {
        let (_tx, rx) = watch::channel(snapshot(&[], true));
        let s = store(rx);
        assert!(s.cached_get::<tortie_ipam::IpamHandle>("h").is_none());
        assert!(s.cached_list::<tortie_ipam::IpamHandle>(|_| true).is_none());
    }

    #[tokio::test]
    async fn own_write_is_read_back_until_the_watch_delivers_it() {
        let (tx, rx) = watch::channel(snapshot(&[block("5", "n1")], true));
        let s = store(rx);
        s.remember_stored(&block("7", "n1"));
        assert_eq!(cached_rev(&s), Some(Ok("7".into())));
        let listed = s.cached_list::<IpamBlock>(|_| true).unwrap();
        assert_eq!(listed[0].metadata.resource_version.as_deref(), Some("7"));
        // Someone else's later write reaches the cache: it wins and our copy is dropped.
        tx.send(snapshot(&[block("9", "n2")], true)).unwrap();
        assert_eq!(cached_rev(&s), Some(Ok("9".into())));
        assert!(s.overlay().written.is_empty());
    }

    #[tokio::test]
    async fn a_filtered_list_applies_the_filter_to_own_writes_too() {
        let affine_to = |node: &'static str| {
            move |b: &IpamBlock| b.spec.affinity.as_deref() == Some(&format!("host:{node}"))
        };
        let (_tx, rx) = watch::channel(snapshot(&[block("5", "n1")], true));
        let s = store(rx);
        assert_eq!(
            s.cached_list::<IpamBlock>(affine_to("n1")).unwrap().len(),
            1
        );
        assert!(
            s.cached_list::<IpamBlock>(affine_to("n2"))
                .unwrap()
                .is_empty()
        );
        // Our own write moves the block to n2 before the watch shows it.
        s.remember_stored(&block("7", "n2"));
        assert!(
            s.cached_list::<IpamBlock>(affine_to("n1"))
                .unwrap()
                .is_empty()
        );
        let n2 = s.cached_list::<IpamBlock>(affine_to("n2")).unwrap();
        assert_eq!(n2[0].metadata.resource_version.as_deref(), Some("7"));
    }

    #[tokio::test]
    async fn an_older_read_does_not_replace_a_newer_write() {
        let (_tx, rx) = watch::channel(snapshot(&[block("5", "n1")], true));
        let s = store(rx);
        s.remember_stored(&block("8", "n1"));
        s.remember_stored(&block("6", "n1"));
        assert_eq!(cached_rev(&s), Some(Ok("8".into())));
    }

    #[tokio::test]
    async fn own_delete_hides_the_cached_object_until_it_is_created_anew() {
        let (tx, rx) = watch::channel(snapshot(&[block("5", "n1")], true));
        let s = store(rx);
        s.remember::<IpamBlock>(NAME, None, 5);
        assert!(matches!(
            cached_rev(&s),
            Some(Err(StoreError::NotFound { .. }))
        ));
        assert!(s.cached_list::<IpamBlock>(|_| true).unwrap().is_empty());
        tx.send(snapshot(&[block("12", "n2")], true)).unwrap();
        assert_eq!(cached_rev(&s), Some(Ok("12".into())));
    }

    #[tokio::test]
    async fn after_a_failed_write_the_next_read_goes_to_the_api_server() {
        let (_tx, rx) = watch::channel(snapshot(&[block("5", "n1")], true));
        let s = store(rx);
        s.remember_stored(&block("7", "n1"));
        s.distrust::<IpamBlock>(NAME);
        assert!(cached_rev(&s).is_none());
        // What the API server answers is trusted again.
        s.remember_stored(&block("11", "n1"));
        assert_eq!(cached_rev(&s), Some(Ok("11".into())));
    }

    #[tokio::test]
    async fn revisions_that_are_not_numbers_are_not_compared() {
        let (_tx, rx) = watch::channel(snapshot(&[block("abc", "n1")], true));
        let s = store(rx);
        assert_eq!(cached_rev(&s), Some(Ok("abc".into())));
        s.remember::<IpamBlock>(NAME, Some(&block("7", "n1")), 7);
        assert!(cached_rev(&s).is_none());
        assert!(s.cached_list::<IpamBlock>(|_| true).is_none());
    }
}
