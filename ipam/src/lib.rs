//! tortie-ipam: Calico-compatible block IPAM over a compare-and-swap store.
//!
//! The crate reads and writes Calico's own `crd.projectcalico.org/v1` objects (IPPool, IPAMBlock,
//! BlockAffinity, IPAMHandle, IPAMConfig) with their exact JSON, so tortie and Calico can share a
//! cluster's IPAM state. It knows nothing of Kubernetes: the agent implements [`Store`] over the
//! API server (`resourceVersion` as the CAS revision); [`MemoryStore`] serves tests and benches.
//!
//! Public API:
//! - Data model: [`IpPool`], [`IpamBlock`], [`BlockAffinity`], [`IpamHandle`], [`IpamConfig`] and
//!   their specs; names via [`block_name`], [`affinity_name`], [`handle_name`]; handles via
//!   [`pod_handle_id`], [`TunnelKind::handle_id`]; attributes via [`workload_attributes`].
//! - Pools: [`validate_pools`] → [`PoolSet`] of [`Pool`]s (Calico defaults applied) and
//!   [`PoolError`]s naming pool and field; [`Selector`] for `nodeSelector`.
//! - Store: [`Store`] (async, CAS), [`StoreError`], [`MemoryStore`] with [`Faults`].
//! - Allocator: [`Ipam`] — [`Ipam::auto_assign`], [`Ipam::assign_ip`], [`Ipam::release_by_handle`],
//!   [`Ipam::release_ips`], [`Ipam::ips_by_handle`], [`Ipam::host_blocks`],
//!   [`Ipam::release_node`], [`Ipam::ensure_tunnel_address`], [`Ipam::pools`], [`Ipam::settings`].
//! - Leak collection: [`LeakCollector`] with [`LiveState`].
//! - Block internals for checks: [`IpamBlockSpec::check_invariants`].

mod allocator;
mod block;
mod leak;
mod model;
mod pool;
mod selector;
mod store;

pub use allocator::{
    Assigned, AutoAssignRequest, DEFAULT_MAX_BLOCKS_PER_HOST, Ipam, IpamError, IpamSettings,
    NodeReleaseReport, RetryPolicy, TunnelKind,
};
pub use block::{BlockInvariantError, Released, ip_to_ordinal, new_block, ordinal_to_ip};
pub use leak::{DEFAULT_LEAK_GRACE_PERIOD, LeakCollector, LeakReport, LiveState};
pub use model::{
    API_VERSION, AffinityState, AllocationAttribute, BlockAffinity, BlockAffinitySpec,
    IPAM_CONFIG_NAME, IpPool, IpPoolSpec, IpamBlock, IpamBlockSpec, IpamConfig, IpamConfigSpec,
    IpamHandle, IpamHandleSpec, LegacyIpip, ObjectMeta, Resource, affinity_name, attr, block_name,
    cidr_to_name, handle_name, host_affinity, pod_handle_id, workload_attributes,
};
pub use pool::{AllowedUse, EncapMode, Pool, PoolError, PoolSet, validate_pools};
pub use selector::{Selector, SelectorError};
pub use store::{Faults, MemoryStore, Store, StoreError, StoreStats};
