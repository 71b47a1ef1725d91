//! Test support: a runtime-free executor, a seeded interleaving scheduler, store setup and the
//! whole-store invariant checker run after every step.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use ipnet::IpNet;
use tortie_ipam::{
    AffinityState, BlockAffinity, IpPool, IpPoolSpec, Ipam, IpamBlock, IpamConfig, IpamConfigSpec,
    IpamHandle, MemoryStore, ordinal_to_ip,
};

/// Polls a future to completion; the in-memory store never waits on anything external, so every
/// `Pending` is a voluntary yield and the loop is bounded.
pub fn block_on<F: Future>(fut: F) -> F::Output {
    let mut fut = std::pin::pin!(fut);
    let mut cx = Context::from_waker(Waker::noop());
    for _ in 0..10_000_000u64 {
        if let Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
            return v;
        }
    }
    panic!("future did not complete within the poll bound");
}

pub type Task<'a> = Pin<Box<dyn Future<Output = Result<(), String>> + 'a>>;

/// Runs tasks interleaved at every yield point in an order drawn from `seed`, calling `check`
/// after every single poll. Returns each task's result.
pub fn run_interleaved(
    mut tasks: Vec<Task<'_>>,
    seed: u64,
    mut check: impl FnMut(),
) -> Vec<Result<(), String>> {
    let mut cx = Context::from_waker(Waker::noop());
    let mut results: Vec<Option<Result<(), String>>> = tasks.iter().map(|_| None).collect();
    let mut rng = seed | 1;
    for _ in 0..5_000_000u64 {
        let live: Vec<usize> = (0..tasks.len()).filter(|i| results[*i].is_none()).collect();
        if live.is_empty() {
            return results.into_iter().map(Option::unwrap).collect();
        }
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let i = live[(rng % live.len() as u64) as usize];
        if let Poll::Ready(r) = tasks[i].as_mut().poll(&mut cx) {
            results[i] = Some(r);
        }
        check();
    }
    panic!("interleaved tasks did not finish within the step bound");
}

pub fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

pub fn pool(name: &str, cidr: &str, block_size: i64) -> IpPool {
    IpPool::new(
        name,
        IpPoolSpec {
            cidr: cidr.to_string(),
            block_size: Some(block_size),
            ..IpPoolSpec::default()
        },
    )
}

pub fn config(strict: bool, max_blocks: i64) -> IpamConfig {
    IpamConfig::new(
        "default",
        IpamConfigSpec {
            strict_affinity: strict,
            auto_allocate_blocks: true,
            max_blocks_per_host: Some(max_blocks),
            extra: Default::default(),
        },
    )
}

pub fn new_ipam(
    pools: &[IpPool],
    cfg: Option<IpamConfig>,
) -> (Arc<MemoryStore>, Ipam<Arc<MemoryStore>>) {
    let store = Arc::new(MemoryStore::new());
    for p in pools {
        store.put(p);
    }
    if let Some(c) = cfg {
        store.put(&c);
    }
    (store.clone(), Ipam::new(store))
}

/// Invariants that hold at every instant, even with operations in flight:
/// every block is internally consistent, and every confirmed affinity has its block, affine to
/// that node.
pub fn check_always(store: &MemoryStore) {
    let blocks = store.snapshot::<IpamBlock>();
    let mut by_cidr = HashMap::new();
    for b in &blocks {
        if let Err(e) = b.spec.check_invariants() {
            panic!("block invariant broken: {e}\n{b:#?}");
        }
        by_cidr.insert(b.spec.cidr.clone(), b);
    }
    for a in store.snapshot::<BlockAffinity>() {
        if a.spec.state != AffinityState::Confirmed {
            continue;
        }
        let b = by_cidr.get(&a.spec.cidr).unwrap_or_else(|| {
            panic!(
                "confirmed affinity {} has no block {}",
                a.metadata.name, a.spec.cidr
            )
        });
        assert_eq!(
            b.spec.affine_node(),
            Some(a.spec.node.as_str()),
            "confirmed affinity {} but block {} says {:?}",
            a.metadata.name,
            a.spec.cidr,
            b.spec.affinity
        );
    }
}

/// Every allocated address with its handle, across all blocks.
pub fn allocations(store: &MemoryStore) -> BTreeMap<IpAddr, String> {
    let mut out = BTreeMap::new();
    for b in store.snapshot::<IpamBlock>() {
        let cidr: IpNet = b.spec.cidr.parse().unwrap();
        for o in 0..b.spec.allocations.len() as u32 {
            if b.spec.allocations[o as usize].is_some() {
                let h = b.spec.handle_at(o).unwrap_or("<none>").to_string();
                assert!(
                    out.insert(ordinal_to_ip(&cidr, o), h).is_none(),
                    "address in two blocks"
                );
            }
        }
    }
    out
}

/// Invariants that hold when no operation is in flight: the handles' per-block counts equal the
/// allocations actually held, no handle object is left empty, and no affinity is left pending.
pub fn check_quiescent(store: &MemoryStore) {
    check_always(store);
    let mut actual: BTreeMap<(String, String), i64> = BTreeMap::new();
    for b in store.snapshot::<IpamBlock>() {
        for o in 0..b.spec.allocations.len() as u32 {
            if let Some(h) = b.spec.handle_at(o) {
                *actual
                    .entry((h.to_string(), b.spec.cidr.clone()))
                    .or_default() += 1;
            }
        }
    }
    let mut recorded: BTreeMap<(String, String), i64> = BTreeMap::new();
    for h in store.snapshot::<IpamHandle>() {
        assert!(
            !h.spec.block.is_empty(),
            "empty handle {} left behind",
            h.metadata.name
        );
        for (cidr, n) in &h.spec.block {
            recorded.insert((h.spec.handle_id.clone(), cidr.clone()), *n);
        }
    }
    assert_eq!(
        recorded, actual,
        "handle counts (left) disagree with block allocations (right)"
    );
    for a in store.snapshot::<BlockAffinity>() {
        assert_eq!(
            a.spec.state,
            AffinityState::Confirmed,
            "affinity {} left in state {:?} with nothing in flight",
            a.metadata.name,
            a.spec.state
        );
    }
}

/// Affinities of a node, any state.
pub fn affinities_of(store: &MemoryStore, node: &str) -> Vec<BlockAffinity> {
    store
        .snapshot::<BlockAffinity>()
        .into_iter()
        .filter(|a| a.spec.node == node)
        .collect()
}

pub fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

pub fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}
