//! tortie-ipam: Calico-compatible block IPAM over a compare-and-swap store.
//!
//! The crate reads and writes Calico's own `crd.projectcalico.org/v1` objects (IPPool, IPAMBlock,
//! BlockAffinity, IPAMHandle, IPAMConfig) with their exact JSON, so tortie and Calico can share a
//! cluster's IPAM state. It knows nothing of Kubernetes: the agent implements [`Store`] over the
//! API server (`resourceVersion` as the CAS revision); [`MemoryStore`] serves tests and benches.
//!
//! # Public API
//! - Data model: [`IpPool`], [`IpamBlock`], [`BlockAffinity`], [`IpamHandle`], [`IpamConfig`] and
//!   their specs (unknown fields kept, so a Calico object round-trips); names via [`block_name`],
//!   [`affinity_name`], [`handle_name`]; handles via [`pod_handle_id`], [`TunnelKind::handle_id`];
//!   attributes via [`workload_attributes`] and [`attr`].
//! - Pools: [`validate_pools`] → [`PoolSet`] of [`Pool`]s (Calico's defaults applied) and
//!   [`PoolError`]s naming pool and field; [`Selector`] parses and evaluates `nodeSelector`;
//!   [`PoolSet::usage`] gives [`PoolUsage`] (blocks, addresses in use and free) for metrics.
//! - Store: [`Store`] (async, CAS, with a `backoff` hook), [`StoreError`], [`MemoryStore`] with
//!   [`Faults`] (injected conflicts, forced task switches) and [`StoreStats`];
//!   [`check_store_contract`] checks another implementation's CAS behaviour.
//! - Allocator: [`Ipam`] — [`Ipam::auto_assign`], [`Ipam::assign_ip`], [`Ipam::release_by_handle`],
//!   [`Ipam::release_ips`], [`Ipam::ips_by_handle`], [`Ipam::host_blocks`] (for BGP),
//!   [`Ipam::release_node`], [`Ipam::ensure_tunnel_address`], [`Ipam::pools`], [`Ipam::settings`].
//! - Leak collection: [`LeakCollector`] fed with [`LiveState`] and the current time.
//! - Block checks: [`IpamBlockSpec::check_invariants`].
//!
//! # Example
//! ```
//! use std::sync::Arc;
//! use tortie_ipam::{
//!     AutoAssignRequest, IpPool, IpPoolSpec, Ipam, MemoryStore, pod_handle_id, workload_attributes,
//! };
//!
//! # fn block_on<F: std::future::Future>(fut: F) -> F::Output {
//! #     let mut fut = std::pin::pin!(fut);
//! #     let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
//! #     for _ in 0..1_000_000 {
//! #         if let std::task::Poll::Ready(v) = fut.as_mut().poll(&mut cx) { return v; }
//! #     }
//! #     panic!("the in-memory store never blocks");
//! # }
//! let store = Arc::new(MemoryStore::new());
//! store.put(&IpPool::new("default-ipv4-ippool", IpPoolSpec {
//!     cidr: "10.244.0.0/16".into(),
//!     ..IpPoolSpec::default()
//! }));
//! let ipam = Ipam::new(store.clone());
//!
//! let handle = pod_handle_id("3f2a9c1d7e");
//! let request = AutoAssignRequest {
//!     handle_id: handle.clone(),
//!     attributes: workload_attributes("default", "web-0", "node-1", "2026-11-28 04:00:00 +0000 UTC"),
//!     node: "node-1".into(),
//!     num_v4: 1,
//!     ..AutoAssignRequest::default()
//! };
//! let assigned = block_on(ipam.auto_assign(&request)).unwrap();
//! assert_eq!(block_on(ipam.ips_by_handle(&handle)).unwrap(), assigned.ipv4);
//! // node-1 now owns a /26 (the default block size) that it advertises over BGP.
//! let blocks = block_on(ipam.host_blocks("node-1")).unwrap();
//! assert!(blocks[0].contains(&assigned.ipv4[0]));
//! assert_eq!(block_on(ipam.release_by_handle(&handle)).unwrap(), assigned.ipv4);
//! ```
//!
//! # Design choices
//! - **Async store, generic not `dyn`.** The agent is tokio + kube-rs, so [`Store`] methods return
//!   `impl Future + Send` (an implementation writes plain `async fn`) and every [`Ipam`] future is
//!   `Send`. Methods are generic over the object kind, which rules out `dyn Store`; `Ipam<S>` is
//!   generic instead. The allocator owns no runtime: the only wait, between CAS retries, goes
//!   through [`Store::backoff`].
//! - **Where the pure core is.** The CAS loops interleave reads and writes, so the allocator is
//!   async code over the store; the decisions inside them are pure and unit-tested without I/O
//!   (block assign/release/invariants in `block`, pool validation, selector, candidate order).
//!   Deterministic replay of concurrent runs comes from [`MemoryStore`] with
//!   [`Faults::yield_before_each_op`] under a seeded scheduler (see the crate's tests).
//! - **Concurrency.** Safety (never one address twice, no lost allocation) rests only on the
//!   per-object CAS, whoever runs concurrently, including several requests of one host. The
//!   `maxBlocksPerHost` limit is exact only when a host's requests are serialized (calico-ipam
//!   takes a host-wide lock for this); unserialized, claims in flight can overshoot it.
//! - **Interrupted operations heal.** A host's next auto-assignment finishes or drops what an
//!   interrupted claim or release left in its affinities; writes whose outcome is unknown leave
//!   handle counts too high, never too low, so a release by handle still finds every address.
//!
//! # Calico semantics kept
//! Block layout and free-list order; shared attributes, compacted on release; `sequenceNumber`
//! bumped per change with per-allocation sequence numbers; write order (handle before block on
//! assign, block before handle on release); two-phase claim (pending → block → confirmed) with
//! undo on a lost race; `maxBlocksPerHost` counted per address family; borrowing only when
//! `strictAffinity` is false (and a specific address in another host's block refused when true);
//! object names, including Calico's cut-and-hash of over-long affinity names; objects that Calico
//! marked `deleted` are treated as going away, and an interrupted block deletion is finished.
//!
//! # Choices where tortie differs or decides
//! `maxBlocksPerHost: 0` (or no IPAMConfig) means 20 here, as tortie's issue specifies, where
//! Calico's allocator reads 0 as "no limit";
//! pool overlap is resolved by name order (the first enabled pool wins, later ones are reported);
//! a host's emptied block gives up its affinity unless it is the host's last one of its family;
//! an auto-assignment is all-or-nothing; the deprecated `ipip`/`nat-outgoing` fields are honoured
//! when the v3 fields are absent; the leak collector also releases the IPAM of nodes gone for the
//! grace period.

#![warn(missing_docs)]

mod allocator;
mod block;
mod leak;
mod model;
mod pool;
mod selector;
mod store;

pub use allocator::{
    Assigned, AutoAssignRequest, BatchAssigned, DEFAULT_MAX_BLOCKS_PER_HOST, Ipam, IpamError,
    IpamSettings, NodeReleaseReport, RetryPolicy, TunnelKind,
};
pub use block::{BlockInvariantError, Released, ip_to_ordinal, new_block, ordinal_to_ip};
pub use leak::{DEFAULT_LEAK_GRACE_PERIOD, LeakCollector, LeakReport, LiveState};
pub use model::{
    API_VERSION, AffinityState, AllocationAttribute, BlockAffinity, BlockAffinitySpec,
    IPAM_CONFIG_NAME, IpPool, IpPoolSpec, IpamBlock, IpamBlockSpec, IpamConfig, IpamConfigSpec,
    IpamHandle, IpamHandleSpec, LegacyIpip, ObjectMeta, Resource, affinity_name, attr, block_name,
    cidr_to_name, handle_name, host_affinity, pod_handle_id, workload_attributes,
};
pub use pool::{AllowedUse, EncapMode, Pool, PoolError, PoolSet, PoolUsage, validate_pools};
pub use selector::{Selector, SelectorError};
pub use store::{
    ContractViolation, Faults, MemoryStore, Store, StoreError, StoreStats, check_store_contract,
};
