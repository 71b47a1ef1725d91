//! Assign+release throughput and latency for one pod when the host has an affine block with room.
//!
//! Both allocators run against an in-memory compare-and-swap store where every read copies the
//! object and every write is a CAS, so the comparison is about the data layout, not the transport.
//!
//! Reference (`single_object_cas`): the straightforward design Calico's blocks exist to avoid — the
//! whole pool's allocation list in one object (as single-CR IPAMs such as whereabouts keep it). Each
//! operation copies the full list, scans it for a free address (or the handle), and CAS-writes the
//! whole list back. It does fewer writes per pod, but its cost grows with the cluster's pod count,
//! while a block allocation touches one 64-address block and one small handle.
//!
//! tortie is measured twice: assign and release each written on their own, and the agent's CNI
//! way, where a pod's release rides on the next pod's assignment write.
//!
//! Cluster shape for both: 32 other nodes with 40 pods each (1280 allocations) in a /16 pool.

use std::collections::HashSet;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use tortie_ipam::{
    AutoAssignRequest, IpPool, IpPoolSpec, Ipam, MemoryStore, pod_handle_id, workload_attributes,
};

const OTHER_NODES: usize = 32;
const PODS_PER_NODE: usize = 40;
const WARMUP: usize = 2_000;
const MAX_ITERATIONS: usize = 50_000;
const TIME_BUDGET: Duration = Duration::from_secs(15);

fn block_on<F: Future>(fut: F) -> F::Output {
    let mut fut = std::pin::pin!(fut);
    let mut cx = Context::from_waker(Waker::noop());
    for _ in 0..1_000_000u32 {
        if let Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
            return v;
        }
    }
    panic!("in-memory operation did not complete");
}

fn request(handle: &str, node: &str) -> AutoAssignRequest {
    AutoAssignRequest {
        handle_id: handle.to_string(),
        attributes: workload_attributes("bench", handle, node, "2026-11-28 04:00:00 +0000 UTC"),
        node: node.to_string(),
        num_v4: 1,
        ..AutoAssignRequest::default()
    }
}

struct Measured {
    latencies: Vec<Duration>,
    total: Duration,
    writes_per_pod: f64,
}

impl Measured {
    fn percentile(&self, p: f64) -> Duration {
        let mut sorted = self.latencies.clone();
        sorted.sort();
        let idx = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
        sorted[idx]
    }
    fn per_second(&self) -> f64 {
        self.latencies.len() as f64 / self.total.as_secs_f64()
    }
}

/// Runs `op(i)` (one assign + release) until the iteration or time budget is used up.
fn measure(mut op: impl FnMut(usize), writes: impl Fn() -> u64) -> Measured {
    for i in 0..WARMUP {
        op(i);
    }
    let writes_before = writes();
    let mut latencies = Vec::with_capacity(MAX_ITERATIONS);
    let start = Instant::now();
    for i in WARMUP..WARMUP + MAX_ITERATIONS {
        let t = Instant::now();
        op(i);
        latencies.push(t.elapsed());
        if start.elapsed() > TIME_BUDGET {
            break;
        }
    }
    let total = start.elapsed();
    let writes_per_pod = (writes() - writes_before) as f64 / latencies.len() as f64;
    Measured {
        latencies,
        total,
        writes_per_pod,
    }
}

/// The bench pool with 32 other nodes' pods and one resident pod on the bench node.
fn tortie_cluster() -> (Arc<MemoryStore>, Ipam<Arc<MemoryStore>>) {
    let store = Arc::new(MemoryStore::new());
    store.put(&IpPool::new(
        "default-ipv4-ippool",
        IpPoolSpec {
            cidr: "10.244.0.0/16".into(),
            block_size: Some(26),
            ..IpPoolSpec::default()
        },
    ));
    let ipam = Ipam::new(store.clone());
    for n in 0..OTHER_NODES {
        let node = format!("node-{n}");
        for p in 0..PODS_PER_NODE {
            block_on(ipam.auto_assign(&request(&format!("bg-{n}-{p}"), &node)))
                .expect("background assignment");
        }
    }
    // The bench node owns a block and keeps one pod in it, so the block stays with room.
    block_on(ipam.auto_assign(&request("resident", "bench-node"))).expect("resident pod");
    (store, ipam)
}

/// Assign, then release by handle: each written on its own (Calico's CNI plugin's way).
fn bench_tortie() -> Measured {
    let (store, ipam) = tortie_cluster();
    measure(
        |i| {
            let handle = pod_handle_id(&format!("{i:064x}"));
            let got = block_on(ipam.auto_assign(&request(&handle, "bench-node")))
                .expect("assign from affine block");
            assert_eq!(got.ipv4.len(), 1);
            let released = block_on(ipam.release_by_handle(&handle)).expect("release");
            assert_eq!(released, got.ipv4);
        },
        || store.stats().writes(),
    )
}

/// The agent's CNI way: each pod's release rides on the next pod's assignment write, then its
/// handle object goes.
fn bench_tortie_carried() -> Measured {
    let (store, ipam) = tortie_cluster();
    let handle = |i: usize| pod_handle_id(&format!("{i:064x}"));
    block_on(ipam.assign_once(&request(&handle(usize::MAX), "bench-node"))).expect("first pod");
    let mut previous = handle(usize::MAX);
    measure(
        |i| {
            let req = AutoAssignRequest {
                release_with: vec![previous.clone()],
                ..request(&handle(i), "bench-node")
            };
            let got = block_on(ipam.assign_once(&req)).expect("assign from affine block");
            assert_eq!(got.ipv4.len(), 1);
            assert_eq!(got.released, req.release_with, "the release was carried");
            block_on(ipam.forget_handle(&previous)).expect("handle deleted");
            previous = handle(i);
        },
        || store.stats().writes(),
    )
}

/// (offset in the pool, handle) for every allocation of the pool.
type AllocationList = Vec<(u32, String)>;

/// The reference allocator: one object holding every allocation of the pool, CAS on a revision.
struct SingleObjectPool {
    base: u32,
    size: u32,
    object: Mutex<(u64, Arc<AllocationList>)>,
    writes: Mutex<u64>,
}

impl SingleObjectPool {
    fn read(&self) -> (u64, AllocationList) {
        let guard = self.object.lock().expect("bench lock");
        // A datastore read hands out a private copy of the object.
        (guard.0, guard.1.as_ref().clone())
    }

    fn cas(&self, revision: u64, list: AllocationList) -> bool {
        let mut guard = self.object.lock().expect("bench lock");
        if guard.0 != revision {
            return false;
        }
        *guard = (revision + 1, Arc::new(list));
        *self.writes.lock().expect("bench lock") += 1;
        true
    }

    fn assign(&self, handle: &str) -> Option<IpAddr> {
        for _ in 0..16 {
            let (rev, mut list) = self.read();
            let used: HashSet<u32> = list.iter().map(|(offset, _)| *offset).collect();
            let free = (0..self.size).find(|o| !used.contains(o))?;
            list.push((free, handle.to_string()));
            if self.cas(rev, list) {
                return Some(IpAddr::V4(Ipv4Addr::from(self.base + free)));
            }
        }
        None
    }

    fn release(&self, handle: &str) -> usize {
        for _ in 0..16 {
            let (rev, mut list) = self.read();
            let before = list.len();
            list.retain(|(_, h)| h != handle);
            let removed = before - list.len();
            if self.cas(rev, list) {
                return removed;
            }
        }
        0
    }
}

fn bench_reference() -> Measured {
    let pool = SingleObjectPool {
        base: u32::from(Ipv4Addr::new(10, 244, 0, 0)),
        size: 1 << 16,
        object: Mutex::new((0, Arc::new(Vec::new()))),
        writes: Mutex::new(0),
    };
    for n in 0..OTHER_NODES {
        for p in 0..PODS_PER_NODE {
            pool.assign(&format!("bg-{n}-{p}"))
                .expect("background assignment");
        }
    }
    pool.assign("resident").expect("resident pod");
    measure(
        |i| {
            let handle = pod_handle_id(&format!("{i:064x}"));
            pool.assign(&handle).expect("assign");
            assert_eq!(pool.release(&handle), 1);
        },
        || *pool.writes.lock().expect("bench lock"),
    )
}

fn micros(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1e6)
}

fn main() {
    let tortie = bench_tortie();
    let carried = bench_tortie_carried();
    let reference = bench_reference();
    println!(
        "# {} tortie iterations, {} reference iterations; latency = one assign + one release",
        tortie.latencies.len(),
        reference.latencies.len()
    );
    println!(
        "BENCH name=ipam_assign_release_p99 unit=us tortie={} ref=single_object_cas:{} better=lower",
        micros(tortie.percentile(0.99)),
        micros(reference.percentile(0.99))
    );
    println!(
        "BENCH name=ipam_assign_release_p50 unit=us tortie={} ref=single_object_cas:{} better=lower",
        micros(tortie.percentile(0.50)),
        micros(reference.percentile(0.50))
    );
    println!(
        "BENCH name=ipam_assign_release_throughput unit=pods_per_s tortie={:.0} ref=single_object_cas:{:.0} better=higher",
        tortie.per_second(),
        reference.per_second()
    );
    println!(
        "BENCH name=ipam_store_writes_per_pod unit=writes tortie={:.1} ref=single_object_cas:{:.1} better=lower",
        tortie.writes_per_pod, reference.writes_per_pod
    );
    println!(
        "BENCH name=ipam_assign_carried_release_p99 unit=us tortie={} ref=single_object_cas:{} better=lower",
        micros(carried.percentile(0.99)),
        micros(reference.percentile(0.99))
    );
    println!(
        "BENCH name=ipam_store_writes_per_pod_carried unit=writes tortie={:.1} ref=single_object_cas:{:.1} better=lower",
        carried.writes_per_pod, reference.writes_per_pod
    );
    let p99 = tortie.percentile(0.99);
    if p99 > Duration::from_millis(1) {
        println!(
            "# WARNING: tortie p99 {} us is over the 1 ms target",
            micros(p99)
        );
    }
}
