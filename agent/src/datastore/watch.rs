//! Level-triggered caches of API objects: one task per kind runs a kube-rs watcher (which
//! relists after 410 Gone and backs off on errors) and publishes the whole set on every change.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use futures::StreamExt;
use kube::api::Api;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use serde::de::DeserializeOwned;
use tokio::sync::watch;
use tracing::{info, warn};

/// Retry delays after a watch error: 200 ms doubling to 2 s. kube-runtime's default climbs
/// to 30 s, which after an API server failover would leave the node unready for that long.
#[derive(Debug, Clone, Copy)]
struct QuickBackoff {
    next: std::time::Duration,
}

impl QuickBackoff {
    const FIRST: std::time::Duration = std::time::Duration::from_millis(200);
    const CAP: std::time::Duration = std::time::Duration::from_secs(2);
}

impl Default for QuickBackoff {
    fn default() -> Self {
        Self { next: Self::FIRST }
    }
}

impl Iterator for QuickBackoff {
    type Item = std::time::Duration;

    fn next(&mut self) -> Option<Self::Item> {
        let d = self.next;
        self.next = (self.next * 2).min(Self::CAP);
        Some(d)
    }
}

impl kube::runtime::utils::Backoff for QuickBackoff {
    fn reset(&mut self) {
        self.next = Self::FIRST;
    }
}

/// A kind's objects by name, decoded once when they arrive (so a recompute costs pointer
/// copies, not a JSON decode of every block); `synced` turns true once the first full list
/// arrived.
#[derive(Debug)]
pub struct Snapshot<T> {
    pub objects: BTreeMap<String, Arc<T>>,
    pub synced: bool,
}

impl<K> Default for Snapshot<K> {
    fn default() -> Self {
        Self {
            objects: BTreeMap::new(),
            synced: false,
        }
    }
}

/// Counts watch stream errors (and so restarts) across kinds, for metrics.
pub static WATCH_RESTARTS: AtomicU64 = AtomicU64::new(0);

/// Watches currently failing (API server unreachable, …); readiness is false while any is.
pub static WATCHES_FAILING: AtomicU64 = AtomicU64::new(0);

pub fn datastore_healthy() -> bool {
    WATCHES_FAILING.load(Ordering::Relaxed) == 0
}

/// Starts watching `api`; the receiver always holds the latest complete view, each object
/// turned into a `T` by `decode`. An object that does not decode is logged with its name and
/// the reason, and left out (others are unaffected). While the API server is unreachable the
/// last view stays (nothing is deleted) and the watcher retries with backoff.
pub fn spawn_cache<K, T>(
    kind: &'static str,
    api: Api<K>,
    decode: fn(&K) -> Result<T, String>,
) -> watch::Receiver<Arc<Snapshot<T>>>
where
    K: kube::Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    T: Send + Sync + 'static,
{
    let (tx, rx) = watch::channel(Arc::new(Snapshot::default()));
    tokio::spawn(async move {
        let mut current: BTreeMap<String, Arc<T>> = BTreeMap::new();
        let mut relisting: Option<BTreeMap<String, Arc<T>>> = None;
        let decoded = |obj: &K| -> Option<(String, Arc<T>)> {
            let name = obj.meta().name.clone().unwrap_or_default();
            match decode(obj) {
                Ok(v) => Some((name, Arc::new(v))),
                Err(reason) => {
                    warn!(
                        kind,
                        name, "{reason}; the object is ignored until it is fixed"
                    );
                    None
                }
            }
        };
        let mut synced = false;
        let mut failing = false;
        let stream =
            watcher::watcher(api, watcher::Config::default()).backoff(QuickBackoff::default());
        futures::pin_mut!(stream);
        while let Some(ev) = stream.next().await {
            if failing && ev.is_ok() {
                failing = false;
                WATCHES_FAILING.fetch_sub(1, Ordering::Relaxed);
                info!(kind, "watch recovered");
            }
            let changed = match ev {
                Ok(Event::Apply(obj)) => {
                    let name = obj.meta().name.clone().unwrap_or_default();
                    match decoded(&obj) {
                        Some((name, v)) => current.insert(name, v),
                        None => current.remove(&name),
                    };
                    true
                }
                Ok(Event::Delete(obj)) => {
                    current.remove(obj.meta().name.as_deref().unwrap_or_default());
                    true
                }
                Ok(Event::Init) => {
                    relisting = Some(BTreeMap::new());
                    false
                }
                Ok(Event::InitApply(obj)) => {
                    if let (Some(r), Some((name, v))) = (relisting.as_mut(), decoded(&obj)) {
                        r.insert(name, v);
                    }
                    false
                }
                Ok(Event::InitDone) => {
                    if let Some(r) = relisting.take() {
                        current = r;
                    }
                    if !synced {
                        info!(kind, count = current.len(), "initial list complete");
                    }
                    synced = true;
                    true
                }
                Err(e) => {
                    WATCH_RESTARTS.fetch_add(1, Ordering::Relaxed);
                    if !failing {
                        failing = true;
                        WATCHES_FAILING.fetch_add(1, Ordering::Relaxed);
                    }
                    warn!(kind, error = %e, "watch failed; keeping the last view and retrying");
                    false
                }
            };
            if changed
                && tx
                    .send(Arc::new(Snapshot {
                        objects: current.clone(),
                        synced,
                    }))
                    .is_err()
            {
                return;
            }
        }
    });
    rx
}
