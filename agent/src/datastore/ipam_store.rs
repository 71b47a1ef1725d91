//! `tortie_ipam::Store` over the Kubernetes API: `resourceVersion` is the compare-and-swap revision.

use std::time::Duration;

use kube::Client;
use kube::api::{Api, DeleteParams, ListParams, PostParams, Preconditions};
use kube::core::DynamicObject;
use tortie_ipam::{Resource, Store, StoreError};

use super::calico::api_resource;

/// Reads and writes Calico's IPAM objects through the API server. Every write is a CAS on
/// `metadata.resourceVersion`, which the API server enforces (409 Conflict on mismatch).
#[derive(Clone)]
pub struct KubeIpamStore {
    client: Client,
}

impl KubeIpamStore {
    pub fn new(client: Client) -> Self {
        Self { client }
    }

    fn api<K: Resource>(&self) -> Api<DynamicObject> {
        Api::all_with(self.client.clone(), &api_resource(K::KIND))
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
    serde_json::to_value(obj)
        .and_then(serde_json::from_value)
        .map_err(|e| other::<K>(&name, format!("encoding: {e}")))
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
        let api = self.api::<K>();
        let obj = timed(K::KIND, "get", name, api.get(name))
            .await
            .map_err(|e| map_err::<K>(name, e))?;
        from_dynamic(obj)
    }

    async fn list<K: Resource>(&self) -> Result<Vec<K>, StoreError> {
        let api = self.api::<K>();
        // Served from the API server's watch cache: a consistent list waits for etcd's progress
        // notification (~100 ms here), and IPAM tolerates a stale read, since every write is
        // a compare-and-swap that fails on a stale revision and is retried.
        let params = ListParams::default().match_any();
        let list = timed(K::KIND, "list", "", api.list(&params))
            .await
            .map_err(|e| map_err::<K>("", e))?;
        list.items.into_iter().map(from_dynamic).collect()
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
        .map_err(|e| map_err::<K>(&name, e))?;
        from_dynamic(created)
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
        .map_err(|e| map_err::<K>(&name, e))?;
        from_dynamic(stored)
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
        timed(K::KIND, "delete", name, api.delete(name, &params))
            .await
            .map_err(|e| map_err::<K>(name, e))?;
        Ok(())
    }

    async fn backoff(&self, delay: Duration) {
        tokio::time::sleep(delay).await;
    }
}
