//! The allocator: Calico's block IPAM algorithms (affinity claims, assignment, borrowing, release) over a [`Store`].
//!
//! Every write is a compare-and-swap; every retry loop is bounded by [`RetryPolicy`] and pauses
//! with jittered exponential backoff through [`Store::backoff`]. Order of writes follows Calico so
//! that a crash between two writes leaves something a later release or the leak collector can
//! clean up, never a double assignment:
//! - assign: handle count up, then block; release: block, then handle count down;
//! - claim: pending BlockAffinity, then block, then affinity confirmed;
//! - release affinity: affinity pendingDeletion, then block deleted (or un-affined), then affinity deleted.
//!
//! Per-host operations are expected to be serialized by the caller (as calico-ipam does with its
//! host-wide lock); different hosts may run concurrently on the same store.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::IpAddr;
use std::time::Duration;

use ipnet::IpNet;
use tracing::{Instrument, debug, debug_span, info, warn};

use crate::block::{ip_to_ordinal, new_block, ordinal_to_ip};
use crate::model::{
    AffinityState, BlockAffinity, BlockAffinitySpec, IPAM_CONFIG_NAME, IpPool, IpamBlock,
    IpamConfig, IpamHandle, IpamHandleSpec, affinity_name, attr, block_name, family, handle_name,
};
use crate::pool::{AllowedUse, Pool, PoolSet, validate_pools};
use crate::store::{Store, StoreError};

mod batch;
pub use batch::BatchAssigned;

/// Bounds and pacing of compare-and-swap retries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts per object write before giving up.
    pub max_attempts: u32,
    /// First backoff; doubles per attempt, with full jitter.
    pub base_delay: Duration,
    /// Backoff ceiling.
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 16,
            base_delay: Duration::from_millis(2),
            max_delay: Duration::from_millis(200),
        }
    }
}

/// Effective cluster IPAM settings (IPAMConfig `default` with Calico's defaults applied).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpamSettings {
    /// Never borrow from blocks affine to other hosts.
    pub strict_affinity: bool,
    /// Hosts may claim new blocks.
    pub auto_allocate_blocks: bool,
    /// Most blocks a host may hold per address family.
    pub max_blocks_per_host: u32,
}

/// What `maxBlocksPerHost: 0` (or no IPAMConfig) means.
pub const DEFAULT_MAX_BLOCKS_PER_HOST: u32 = 20;

impl Default for IpamSettings {
    fn default() -> Self {
        Self {
            strict_affinity: false,
            auto_allocate_blocks: true,
            max_blocks_per_host: DEFAULT_MAX_BLOCKS_PER_HOST,
        }
    }
}

impl IpamSettings {
    /// Settings from an IPAMConfig object.
    pub fn from_config(config: &IpamConfig) -> Self {
        let max = config
            .spec
            .max_blocks_per_host
            .filter(|m| *m > 0)
            .map(|m| u32::try_from(m).unwrap_or(u32::MAX))
            .unwrap_or(DEFAULT_MAX_BLOCKS_PER_HOST);
        Self {
            strict_affinity: config.spec.strict_affinity,
            auto_allocate_blocks: config.spec.auto_allocate_blocks,
            max_blocks_per_host: max,
        }
    }
}

/// Errors of allocator operations.
#[derive(Debug, thiserror::Error)]
pub enum IpamError {
    /// The datastore failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// No enabled, valid pool of this family allows this use on this node.
    #[error("no usable IPv{family} pool for node {node} ({use_:?})")]
    NoPool {
        /// 4 or 6.
        family: u8,
        /// Node name.
        node: String,
        /// Requested use.
        use_: AllowedUse,
    },
    /// Not enough free addresses; nothing from this request was kept.
    #[error("IPv{family} pools exhausted for node {node}: wanted {requested}, found {found}")]
    Exhausted {
        /// 4 or 6.
        family: u8,
        /// Node name.
        node: String,
        /// Addresses asked for.
        requested: usize,
        /// Addresses that could be assigned before running out (all released again).
        found: usize,
    },
    /// The address is in no enabled valid pool.
    #[error("{0} is not in any enabled IPPool")]
    NotInPool(IpAddr),
    /// The address is already assigned.
    #[error("{ip} is already assigned (handle {holder:?})")]
    AlreadyAssigned {
        /// Address.
        ip: IpAddr,
        /// Current holder's handle.
        holder: Option<String>,
    },
    /// [`Ipam::assign_once`] found the handle already there: the caller asked for the addresses
    /// it holds rather than more.
    #[error("handle {handle} already exists")]
    HandleExists {
        /// Handle ID.
        handle: String,
    },
    /// A CAS loop hit its bound.
    #[error("gave up on {kind} {name} after {attempts} conflicting attempts")]
    TooManyConflicts {
        /// Kind.
        kind: &'static str,
        /// Object name.
        name: String,
        /// Attempts made.
        attempts: u32,
    },
    /// `strictAffinity` forbids assigning in a block affine to another host.
    #[error(
        "{ip} is in block {block} of host {owner:?}; strictAffinity forbids assigning it to {node}"
    )]
    NotAffine {
        /// Address asked for.
        ip: IpAddr,
        /// Its block.
        block: IpNet,
        /// The block's host, if any.
        owner: Option<String>,
        /// Host asking.
        node: String,
    },
    /// The request itself is unusable (e.g. no handle or node).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// A stored object is unusable.
    #[error("{kind} {name}: {reason}")]
    InvalidObject {
        /// Kind.
        kind: &'static str,
        /// Object name.
        name: String,
        /// What is wrong, naming the field.
        reason: String,
    },
}

/// A request to assign addresses automatically (what CNI ADD asks for).
#[derive(Debug, Clone, Default)]
pub struct AutoAssignRequest {
    /// Handle to record the addresses under, e.g. [`crate::pod_handle_id`].
    pub handle_id: String,
    /// Secondary attributes, e.g. [`crate::workload_attributes`].
    pub attributes: BTreeMap<String, String>,
    /// Node asking.
    pub node: String,
    /// The node's labels, matched against pools' `nodeSelector`.
    pub node_labels: BTreeMap<String, String>,
    /// IPv4 addresses wanted.
    pub num_v4: usize,
    /// IPv6 addresses wanted.
    pub num_v6: usize,
    /// Only these pools (by CIDR) when non-empty, e.g. CNI `ipv4_pools`.
    pub pools: Vec<IpNet>,
    /// `Tunnel` for tunnel addresses; `Workload` (the default) otherwise.
    pub use_: Option<AllowedUse>,
    /// Handles whose addresses are to be released in the same block writes as this
    /// assignment: releases already promised (a CNI DEL answered before its write) that would
    /// otherwise write the same block again, and race this write for it. Only addresses in
    /// blocks this call writes are released; [`Assigned::released`] says which handles are
    /// then free of addresses. Their handle objects are left to [`Ipam::forget_handle`].
    pub release_with: Vec<String>,
}

/// A new handle holding `count` addresses of one block.
fn handle_for(handle_id: &str, cidr: &IpNet, count: i64) -> IpamHandle {
    IpamHandle::new(
        handle_name(handle_id),
        IpamHandleSpec {
            handle_id: handle_id.to_string(),
            block: BTreeMap::from([(cidr.to_string(), count)]),
            deleted: None,
            extra: Default::default(),
        },
    )
}

/// How a block write went, for the CAS loop around it.
enum BlockWrite {
    Done,
    /// The block changed since it was read: read it again.
    Conflict,
    /// The block is gone.
    Gone,
}

/// Addresses assigned by [`Ipam::auto_assign`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Assigned {
    /// IPv4 addresses.
    pub ipv4: Vec<IpAddr>,
    /// IPv6 addresses.
    pub ipv6: Vec<IpAddr>,
    /// Handles of [`AutoAssignRequest::release_with`] whose addresses this call released, all
    /// of them: what is left of such a release is its handle object.
    pub released: Vec<String>,
}

/// Which tunnel address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TunnelKind {
    /// IPIP (`tunl0`), handle `ipip-tunnel-addr-<node>`.
    Ipip,
    /// VXLAN (`vxlan.calico`), handle `vxlan-tunnel-addr-<node>`.
    Vxlan,
    /// IPv6 VXLAN (`vxlan-v6.calico`), handle `vxlan-v6-tunnel-addr-<node>`.
    VxlanV6,
}

impl TunnelKind {
    /// Calico's handle ID for this node's tunnel address.
    pub fn handle_id(self, node: &str) -> String {
        match self {
            Self::Ipip => format!("ipip-tunnel-addr-{node}"),
            Self::Vxlan => format!("vxlan-tunnel-addr-{node}"),
            Self::VxlanV6 => format!("vxlan-v6-tunnel-addr-{node}"),
        }
    }

    fn type_attr(self) -> &'static str {
        match self {
            Self::Ipip => attr::TYPE_IPIP_TUNNEL,
            Self::Vxlan => attr::TYPE_VXLAN_TUNNEL,
            Self::VxlanV6 => attr::TYPE_VXLAN_V6_TUNNEL,
        }
    }

    fn pool_enables(self, pool: &Pool) -> bool {
        match self {
            Self::Ipip => pool.ipip_mode.is_enabled(),
            Self::Vxlan | Self::VxlanV6 => pool.vxlan_mode.is_enabled(),
        }
    }

    /// 4 or 6: the family of the address.
    pub fn family(self) -> u8 {
        match self {
            Self::Ipip | Self::Vxlan => 4,
            Self::VxlanV6 => 6,
        }
    }
}

/// What [`Ipam::release_node`] cleaned up.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeReleaseReport {
    /// Addresses released.
    pub released: Vec<IpAddr>,
    /// Blocks deleted (they were empty).
    pub blocks_deleted: Vec<IpNet>,
    /// Blocks kept because other nodes still hold addresses in them; their affinity was cleared.
    pub blocks_unaffined: Vec<IpNet>,
}

/// Outcome of releasing one host's affinity for a block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AffinityRelease {
    Deleted,
    Unaffined,
    KeptNotEmpty,
    Gone,
}

/// Calico block IPAM over a [`Store`].
#[derive(Debug)]
pub struct Ipam<S> {
    store: S,
    retry: RetryPolicy,
}

/// The attempts of one compare-and-swap loop (read, change, write back): at most
/// [`RetryPolicy::max_attempts`], with a jittered exponential backoff after each conflict. Every
/// such loop of the allocator counts its attempts here, so the bound, the pacing and the error
/// when the bound is hit are the same for all of them.
struct CasRetry<'a, S> {
    ipam: &'a Ipam<S>,
    kind: &'static str,
    name: &'a str,
    /// Attempts started so far.
    started: u32,
}

impl<S: Store> CasRetry<'_, S> {
    /// Starts an attempt; [`IpamError::TooManyConflicts`] once they are all spent, so that a
    /// livelock between hosts ends in an error rather than in a CNI ADD that never returns.
    fn attempt(&mut self) -> Result<(), IpamError> {
        let max = self.ipam.retry.max_attempts;
        if self.started >= max {
            return Err(IpamError::TooManyConflicts {
                kind: self.kind,
                name: self.name.to_string(),
                attempts: max,
            });
        }
        self.started += 1;
        Ok(())
    }

    /// The current attempt lost to another writer: wait before the next one.
    async fn back_off(&self) {
        let retry = &self.ipam.retry;
        let attempt = self.started.saturating_sub(1);
        let exp = retry
            .base_delay
            .saturating_mul(1u32 << attempt.min(16))
            .min(retry.max_delay);
        // Full jitter: uniform in [0, exp], so colliding writers spread out.
        let nanos = u64::try_from(exp.as_nanos()).unwrap_or(u64::MAX);
        let jittered = if nanos == 0 {
            0
        } else {
            rand::random::<u64>() % (nanos + 1)
        };
        self.ipam
            .store
            .backoff(Duration::from_nanos(jittered))
            .await;
    }
}

/// FNV-1a: stable across runs and platforms, unlike `DefaultHasher`.
fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// The blocks of `pool` as a pseudo-random permutation seeded by the host name: position `i` is
/// block `(start + i·stride) mod n` with an odd stride, a bijection since `n` is a power of two.
/// Different hosts start in different places, so concurrent claims rarely collide.
pub(crate) struct CandidateBlocks {
    base: u128,
    block_bits: u32,
    mask: u128,
    start: u128,
    stride: u128,
    family_v4: bool,
}

impl CandidateBlocks {
    pub(crate) fn new(pool: &Pool, host: &str) -> Self {
        let index_bits = u32::from(pool.block_size - pool.cidr.prefix_len());
        let block_bits = u32::from(pool.cidr.max_prefix_len() - pool.block_size);
        let mask = if index_bits >= 128 {
            u128::MAX
        } else {
            (1u128 << index_bits) - 1
        };
        let seed = fnv1a(host.as_bytes()) ^ fnv1a(pool.cidr.to_string().as_bytes());
        let r1 = splitmix(seed);
        let r2 = splitmix(r1);
        let start = ((u128::from(r1) << 64) | u128::from(r2)) & mask;
        let stride = ((u128::from(splitmix(r2)) << 1) | 1) & mask.max(1);
        let base = match pool.cidr.network() {
            IpAddr::V4(a) => u128::from(u32::from(a)),
            IpAddr::V6(a) => u128::from(a),
        };
        Self {
            base,
            block_bits,
            mask,
            start,
            stride: if mask == 0 { 0 } else { stride | 1 },
            family_v4: matches!(pool.cidr, IpNet::V4(_)),
        }
    }

    /// Number of blocks, saturating.
    pub(crate) fn len(&self) -> u128 {
        self.mask.saturating_add(1)
    }

    pub(crate) fn nth(&self, i: u128) -> IpNet {
        let index = self.start.wrapping_add(i.wrapping_mul(self.stride)) & self.mask;
        let addr = self.base + (index << self.block_bits);
        let prefix = if self.family_v4 {
            32 - self.block_bits
        } else {
            128 - self.block_bits
        } as u8;
        let ip = if self.family_v4 {
            IpAddr::V4((addr as u32).into())
        } else {
            IpAddr::V6(addr.into())
        };
        // prefix is the pool's block size, already validated for this family.
        IpNet::new(ip, prefix).unwrap_or_else(|_| IpNet::from(ip))
    }
}

/// Most candidates tried beyond the blocks known to exist, to bound lost claim races.
const MAX_LOST_CLAIMS: u128 = 16;

impl<S: Store> Ipam<S> {
    /// An allocator with the default retry policy.
    pub fn new(store: S) -> Self {
        Self::with_retry(store, RetryPolicy::default())
    }

    /// An allocator with a given retry policy.
    pub fn with_retry(store: S, retry: RetryPolicy) -> Self {
        Self { store, retry }
    }

    /// The underlying store.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// The attempts of one compare-and-swap loop on the object `name` of kind `K`.
    fn cas_retry<'a, K: crate::model::Resource>(&'a self, name: &'a str) -> CasRetry<'a, S> {
        CasRetry {
            ipam: self,
            kind: K::KIND,
            name,
            started: 0,
        }
    }

    /// Current settings: the IPAMConfig `default`, or Calico's defaults without one.
    pub async fn settings(&self) -> Result<IpamSettings, IpamError> {
        match self.store.get::<IpamConfig>(IPAM_CONFIG_NAME).await {
            Ok(cfg) => Ok(IpamSettings::from_config(&cfg)),
            Err(StoreError::NotFound { .. }) => Ok(IpamSettings::default()),
            Err(e) => Err(e.into()),
        }
    }

    /// Every pool, validated; invalid ones are returned for the caller to report.
    pub async fn pools(&self) -> Result<PoolSet, IpamError> {
        let pools = self.store.list::<IpPool>().await?;
        let set = validate_pools(&pools);
        // Reported once per change by the caller (it has the pool watch); here only traced.
        for e in &set.invalid {
            debug!(pool = %e.pool, field = e.field, "ignoring IPPool: {}", e.reason);
        }
        Ok(set)
    }

    /// Assigns addresses automatically, Calico style: from the node's affine blocks, then from newly
    /// claimed blocks, then (unless strict affinity) borrowed from other blocks. All-or-nothing: on
    /// shortfall every address assigned by this call is released again.
    pub async fn auto_assign(&self, req: &AutoAssignRequest) -> Result<Assigned, IpamError> {
        self.check_request(req)?;
        let span = debug_span!("auto_assign", node = %req.node, handle = %req.handle_id);
        self.auto_assign_inner(req, false).instrument(span).await
    }

    /// [`Ipam::auto_assign`] for a CNI ADD, which the runtime may retry: when the handle already
    /// holds addresses those are returned and nothing more is assigned. The handle's existence is
    /// learnt from its create, so a new handle costs no extra read.
    pub async fn assign_once(&self, req: &AutoAssignRequest) -> Result<Assigned, IpamError> {
        self.check_request(req)?;
        let span = debug_span!("assign_once", node = %req.node, handle = %req.handle_id);
        async {
            match self.auto_assign_inner(req, true).await {
                Err(IpamError::HandleExists { .. }) => {}
                other => return other,
            }
            let held = self.ips_by_handle(&req.handle_id).await?;
            if held.is_empty() {
                // A handle without addresses (an interrupted release, or counts a lost write left
                // behind): assign under it as usual.
                return self.auto_assign_inner(req, false).await;
            }
            debug!(
                n = held.len(),
                "handle already holds addresses; returning them"
            );
            let (mut ipv4, mut ipv6): (Vec<IpAddr>, Vec<IpAddr>) =
                held.into_iter().partition(|ip| ip.is_ipv4());
            // An earlier write of unknown outcome may have left the handle more than was asked
            // for: the pod gets what it asked for (which of them may differ from what an
            // earlier answer said), the rest goes with its DEL (release by handle frees
            // everything the handle holds).
            if (req.num_v4 > 0 && ipv4.len() > req.num_v4)
                || (req.num_v6 > 0 && ipv6.len() > req.num_v6)
            {
                warn!(
                    handle = %req.handle_id,
                    held = ?ipv4.iter().chain(&ipv6).collect::<Vec<_>>(),
                    "handle holds more addresses than asked for; returning the first"
                );
            }
            if req.num_v4 > 0 {
                ipv4.truncate(req.num_v4);
            }
            if req.num_v6 > 0 {
                ipv6.truncate(req.num_v6);
            }
            Ok(Assigned {
                ipv4,
                ipv6,
                released: Vec::new(),
            })
        }
        .instrument(span)
        .await
    }

    fn check_request(&self, req: &AutoAssignRequest) -> Result<(), IpamError> {
        if req.handle_id.is_empty() || req.node.is_empty() {
            return Err(IpamError::InvalidRequest(format!(
                "auto-assign needs a handle and a node (handle {:?}, node {:?})",
                req.handle_id, req.node
            )));
        }
        Ok(())
    }

    /// With `new_handle_only`, the first handle write of the call fails with
    /// [`IpamError::HandleExists`] if the handle is already there.
    async fn auto_assign_inner(
        &self,
        req: &AutoAssignRequest,
        new_handle_only: bool,
    ) -> Result<Assigned, IpamError> {
        let settings = self.settings().await?;
        let pools = self.pools().await?;
        let mut out = Assigned::default();
        // Handles of `release_with` that a written block held.
        let mut released_here = BTreeSet::new();
        for (fam, want) in [(4u8, req.num_v4), (6u8, req.num_v6)] {
            if want == 0 {
                continue;
            }
            let mut got = Vec::with_capacity(want);
            let new_handle_only = new_handle_only && out.ipv4.is_empty();
            let result = self
                .auto_assign_family(
                    req,
                    fam,
                    want,
                    (&settings, &pools),
                    new_handle_only,
                    &mut got,
                    &mut released_here,
                )
                .await;
            let result = result.and_then(|()| {
                if got.len() < want {
                    Err(IpamError::Exhausted {
                        family: fam,
                        node: req.node.clone(),
                        requested: want,
                        found: got.len(),
                    })
                } else {
                    Ok(())
                }
            });
            if fam == 4 {
                out.ipv4 = got;
            } else {
                out.ipv6 = got;
            }
            if let Err(e) = result {
                // All-or-nothing: give back everything this call took, whatever failed.
                let undo: Vec<IpAddr> = out.ipv4.iter().chain(&out.ipv6).copied().collect();
                if !undo.is_empty()
                    && let Err(release_err) = self.release_ips(&undo).await
                {
                    warn!(
                        handle = %req.handle_id,
                        "could not undo a failed assignment ({release_err}); \
                         a release by handle or the leak collector will free it"
                    );
                }
                return Err(e);
            }
        }
        out.released = self.fully_released(released_here).await;
        Ok(out)
    }

    /// Of the handles whose addresses a write just released, those no block holds any more
    /// (a handle may also hold addresses in blocks the write did not touch). Best effort: the
    /// assignment stands either way, and a handle left unreported is released in full by the
    /// caller instead.
    async fn fully_released(&self, released_here: BTreeSet<String>) -> Vec<String> {
        if released_here.is_empty() {
            return Vec::new();
        }
        let handles: Vec<String> = released_here.iter().cloned().collect();
        match self.blocks_holding(&handles).await {
            Ok(holding) => {
                let still_held: BTreeSet<String> =
                    holding.into_iter().flat_map(|(_, held)| held).collect();
                released_here.difference(&still_held).cloned().collect()
            }
            Err(e) => {
                debug!("not reporting the releases carried ({e})");
                Vec::new()
            }
        }
    }

    /// Assigns up to `want` addresses of one family into `got`; an error may leave `got`
    /// partly filled, and the caller releases it. `new_handle_only` holds until the first
    /// address is taken.
    #[allow(clippy::too_many_arguments)]
    async fn auto_assign_family(
        &self,
        req: &AutoAssignRequest,
        fam: u8,
        want: usize,
        (settings, pools): (&IpamSettings, &PoolSet),
        new_handle_only: bool,
        got: &mut Vec<IpAddr>,
        released_here: &mut BTreeSet<String>,
    ) -> Result<(), IpamError> {
        let use_ = req.use_.unwrap_or(AllowedUse::Workload);
        let candidates: Vec<&Pool> = pools
            .valid
            .iter()
            .filter(|p| p.family() == fam && p.usable_for(use_, &req.node_labels))
            .filter(|p| req.pools.is_empty() || req.pools.contains(&p.cidr))
            .collect();
        if candidates.is_empty() {
            return Err(IpamError::NoPool {
                family: fam,
                node: req.node.clone(),
                use_,
            });
        }
        let in_candidates =
            |cidr: &IpNet| candidates.iter().any(|p| p.cidr.contains(&cidr.network()));

        // 1. Blocks already affine to this host.
        let mut affine = self.host_affinities(&req.node, fam).await?;
        if affine.iter().any(|(_, st)| *st != AffinityState::Confirmed) {
            self.heal_affinities(&req.node, &affine).await?;
            affine = self.host_affinities(&req.node, fam).await?;
        }
        for cidr in affine
            .iter()
            .filter(|(_, st)| *st == AffinityState::Confirmed)
            .map(|(c, _)| c)
            .filter(|c| in_candidates(c))
        {
            if got.len() == want {
                return Ok(());
            }
            let exclusive = new_handle_only && got.is_empty();
            let ips = self
                .assign_from_block(
                    cidr,
                    want - got.len(),
                    req,
                    Some(&req.node),
                    exclusive,
                    released_here,
                )
                .await?;
            got.extend(ips);
        }

        // 2. Claim new blocks while under the per-host limit.
        if got.len() < want && settings.auto_allocate_blocks {
            let max_claims = settings.max_blocks_per_host as usize + candidates.len();
            for _ in 0..max_claims {
                if got.len() == want {
                    return Ok(());
                }
                let owned = self.host_affinities(&req.node, fam).await?.len();
                if owned >= settings.max_blocks_per_host as usize {
                    debug!(node = %req.node, owned, "host at maxBlocksPerHost");
                    break;
                }
                let Some(cidr) = self.claim_new_block(&candidates, &req.node).await? else {
                    debug!(node = %req.node, "no unclaimed block left in the pools");
                    break;
                };
                let exclusive = new_handle_only && got.is_empty();
                let ips = self
                    .assign_from_block(
                        &cidr,
                        want - got.len(),
                        req,
                        Some(&req.node),
                        exclusive,
                        released_here,
                    )
                    .await?;
                got.extend(ips);
            }
        }

        // 3. Borrow from any block with room.
        if got.len() < want && !settings.strict_affinity {
            // Only the CIDRs are needed here (each block is read again when written).
            let with_room = self
                .store
                .list_map(|b: &IpamBlock| {
                    (!b.spec.is_deleted() && b.spec.free_count() > 0)
                        .then(|| b.spec.parsed_cidr())
                        .flatten()
                        .filter(|c| in_candidates(c))
                })
                .await?;
            let seed = fnv1a(req.node.as_bytes());
            let mut borrowable: Vec<(u64, IpNet)> = with_room
                .into_iter()
                .map(|c| (splitmix(seed ^ fnv1a(c.to_string().as_bytes())), c))
                .collect();
            borrowable.sort();
            for (_, cidr) in borrowable {
                if got.len() == want {
                    return Ok(());
                }
                let exclusive = new_handle_only && got.is_empty();
                let ips = self
                    .assign_from_block(&cidr, want - got.len(), req, None, exclusive, released_here)
                    .await?;
                if !ips.is_empty() {
                    debug!(node = %req.node, block = %cidr, n = ips.len(), "borrowed addresses");
                }
                got.extend(ips);
            }
        }
        Ok(())
    }

    /// Finishes what an interrupted operation left in this host's affinities. Operations of one
    /// host are serialized, so a pending claim seen here is stale: confirm it if its block was
    /// created, else drop it. A pending deletion may be another host's release in flight, which
    /// is idempotent to run again: it deletes the block if empty or restores the affinity.
    async fn heal_affinities(
        &self,
        node: &str,
        affinities: &[(IpNet, AffinityState)],
    ) -> Result<(), IpamError> {
        for (cidr, state) in affinities {
            match state {
                AffinityState::Pending => {
                    if self.block_is_ours(node, cidr).await? {
                        info!(node, block = %cidr, "confirming an interrupted block claim");
                        self.claim_block(node, cidr).await?;
                    } else {
                        info!(node, block = %cidr, "dropping a stale pending affinity");
                        self.delete_affinity_if(node, cidr, |a| {
                            a.spec.state == AffinityState::Pending
                        })
                        .await?;
                    }
                }
                AffinityState::PendingDeletion => {
                    self.release_block_affinity(node, cidr, true).await?;
                }
                AffinityState::Confirmed | AffinityState::Other(_) => {}
            }
        }
        Ok(())
    }

    /// The node's affinities of one family in every state, by block CIDR. Counting includes
    /// those pending deletion: until the release finishes they may still turn back to confirmed,
    /// and a host must not claim past its limit in the meantime.
    async fn host_affinities(
        &self,
        node: &str,
        fam: u8,
    ) -> Result<Vec<(IpNet, AffinityState)>, IpamError> {
        let affs = self
            .store
            .list_where(|a: &BlockAffinity| a.spec.node == node)
            .await?;
        let mut out: Vec<(IpNet, AffinityState)> = affs
            .into_iter()
            .map(|mut a| {
                // Calico marks an affinity deleted just before deleting it.
                if a.spec.deleted == "true" {
                    a.spec.state = AffinityState::PendingDeletion;
                }
                a
            })
            .filter_map(|a| {
                let cidr: IpNet = a.spec.cidr.parse().ok()?;
                (family(&cidr.network()) == fam).then_some((cidr, a.spec.state))
            })
            .collect();
        out.sort_by_key(|a| a.0);
        Ok(out)
    }

    /// Blocks confirmed affine to `node`, both families: what the node advertises over BGP.
    pub async fn host_blocks(&self, node: &str) -> Result<Vec<IpNet>, IpamError> {
        let affs = self
            .store
            .list_where(|a: &BlockAffinity| a.spec.node == node)
            .await?;
        let mut out: Vec<IpNet> = affs
            .iter()
            .filter(|a| a.spec.state == AffinityState::Confirmed)
            .filter(|a| a.spec.deleted != "true")
            .filter_map(|a| a.spec.cidr.parse().ok())
            .collect();
        out.sort();
        Ok(out)
    }

    /// Assigns up to `num` addresses from one block (CAS loop), releasing in the same write what
    /// the block holds of `req.release_with` (those handles go into `released_here`). With
    /// `require_affinity`, only if the block is still affine to that node. With
    /// `new_handle_only`, fails with [`IpamError::HandleExists`] rather than add to an existing
    /// handle.
    async fn assign_from_block(
        &self,
        cidr: &IpNet,
        num: usize,
        req: &AutoAssignRequest,
        require_affinity: Option<&str>,
        new_handle_only: bool,
        released_here: &mut BTreeSet<String>,
    ) -> Result<Vec<IpAddr>, IpamError> {
        let name = block_name(cidr);
        let mut cas = self.cas_retry::<IpamBlock>(&name);
        loop {
            cas.attempt()?;
            let mut block = match self.store.get::<IpamBlock>(&name).await {
                Ok(b) if !b.spec.is_deleted() => b,
                Ok(_) | Err(StoreError::NotFound { .. }) => return Ok(Vec::new()),
                Err(e) => return Err(e.into()),
            };
            if let Some(node) = require_affinity
                && block.spec.affine_node() != Some(node)
            {
                return Ok(Vec::new());
            }
            if let Err(e) = block.spec.check_invariants() {
                // Writing to a corrupt block could hand out an address twice: leave it alone.
                warn!(block = %name, "skipping corrupt block: {e}");
                return Ok(Vec::new());
            }
            // Released before assigning: this matters only to a full block, which gets their
            // room (otherwise Calico's free list, freed ordinals appended at its end, reuses them
            // last). The handle being assigned is never released here, whatever the list says.
            let releasing = block
                .spec
                .release_carried(&req.release_with, |h| h == req.handle_id);
            let ordinals = block.spec.assign(num, &req.handle_id, &req.attributes);
            if ordinals.is_empty() {
                return Ok(Vec::new());
            }
            let n = ordinals.len() as i64;
            let done = |released_here: &mut BTreeSet<String>| {
                released_here.extend(releasing.iter().cloned());
                ordinals.iter().map(|o| ordinal_to_ip(cidr, *o)).collect()
            };
            if new_handle_only {
                match self
                    .write_block_and_new_handle(&block, &ordinals, &req.handle_id, cidr)
                    .await?
                {
                    BlockWrite::Done => return Ok(done(released_here)),
                    BlockWrite::Gone => return Ok(Vec::new()),
                    BlockWrite::Conflict => {
                        cas.back_off().await;
                        continue;
                    }
                }
            }
            self.adjust_handle(&req.handle_id, cidr, n).await?;
            match self.store.update(&block).await {
                Ok(_) => return Ok(done(released_here)),
                Err(e @ (StoreError::Conflict { .. } | StoreError::NotFound { .. })) => {
                    // The block write definitely failed: take the handle count back down.
                    self.adjust_handle(&req.handle_id, cidr, -n).await?;
                    if matches!(e, StoreError::NotFound { .. }) {
                        return Ok(Vec::new());
                    }
                    cas.back_off().await;
                }
                // The write may or may not have landed (e.g. a timeout): keep the handle count,
                // since a handle that over-counts is harmless and one that under-counts leaks.
                Err(other) => return Err(other.into()),
            }
        }
    }

    /// Writes a block holding new `ordinals` for a handle that must not exist yet, and creates
    /// that handle, both at once: each is a round trip to the API server, and neither needs the
    /// other's result. Whichever fails is undone. A crash between the two leaves either a handle
    /// that over-counts (harmless) or addresses recorded under their handle ID in the block,
    /// where a release by handle finds them without the handle.
    async fn write_block_and_new_handle(
        &self,
        block: &IpamBlock,
        ordinals: &[u32],
        handle_id: &str,
        cidr: &IpNet,
    ) -> Result<BlockWrite, IpamError> {
        let n = ordinals.len() as i64;
        let (handle, written) = futures_util::future::join(
            self.create_handle(handle_id, cidr, n),
            self.store.update(block),
        )
        .await;
        match (handle, written) {
            (Ok(()), Ok(_)) => Ok(BlockWrite::Done),
            (Ok(()), Err(e @ (StoreError::Conflict { .. } | StoreError::NotFound { .. }))) => {
                // The block write definitely failed: the handle goes again.
                self.adjust_handle(handle_id, cidr, -n).await?;
                Ok(if matches!(e, StoreError::NotFound { .. }) {
                    BlockWrite::Gone
                } else {
                    BlockWrite::Conflict
                })
            }
            // The block write may have landed: keep the handle, which then counts it.
            (Ok(()), Err(other)) => Err(other.into()),
            (Err(handle_err), Ok(_)) => {
                // Give back exactly the addresses just written (the handle may hold others of
                // the same block, e.g. a retried ADD's).
                let mine: BTreeSet<u32> = ordinals.iter().copied().collect();
                self.release_in_block(
                    cidr,
                    |b| {
                        mine.iter()
                            .copied()
                            .filter(|o| b.handle_at(*o) == Some(handle_id))
                            .collect()
                    },
                    true,
                )
                .await?;
                Err(handle_err)
            }
            (Err(handle_err), Err(StoreError::Conflict { .. } | StoreError::NotFound { .. })) => {
                Err(handle_err)
            }
            (Err(handle_err), Err(block_err)) => {
                warn!(
                    handle = handle_id,
                    block = %cidr,
                    "block write of unknown outcome ({block_err}) while the handle failed; \
                     a release by handle or the leak collector will free what it holds"
                );
                Err(handle_err)
            }
        }
    }

    /// Creates the handle with `count` addresses in one block; [`IpamError::HandleExists`] if it
    /// is already there.
    async fn create_handle(
        &self,
        handle_id: &str,
        cidr: &IpNet,
        count: i64,
    ) -> Result<(), IpamError> {
        match self.store.create(&handle_for(handle_id, cidr, count)).await {
            Ok(_) => Ok(()),
            Err(StoreError::AlreadyExists { .. }) => Err(IpamError::HandleExists {
                handle: handle_id.to_string(),
            }),
            Err(e) => Err(e.into()),
        }
    }

    /// Adds `delta` to the handle's count for a block, creating the handle or deleting it when it
    /// reaches zero.
    async fn adjust_handle(
        &self,
        handle_id: &str,
        cidr: &IpNet,
        delta: i64,
    ) -> Result<(), IpamError> {
        let name = handle_name(handle_id);
        let key = cidr.to_string();
        let new_handle = || handle_for(handle_id, cidr, delta);
        if delta > 0 {
            // A new pod's handle does not exist yet: try the create first and save a read.
            match self.store.create(&new_handle()).await {
                Ok(_) => return Ok(()),
                Err(StoreError::AlreadyExists { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        let mut cas = self.cas_retry::<IpamHandle>(&name);
        loop {
            cas.attempt()?;
            let mut handle = match self.store.get::<IpamHandle>(&name).await {
                Ok(h) if h.spec.deleted == Some(true) => {
                    // Calico marks a handle before deleting it; finish that deletion first.
                    let rev = h.metadata.resource_version.clone().unwrap_or_default();
                    match self.store.delete::<IpamHandle>(&name, &rev).await {
                        Ok(()) | Err(StoreError::NotFound { .. } | StoreError::Conflict { .. }) => {
                        }
                        Err(e) => return Err(e.into()),
                    }
                    continue;
                }
                Ok(h) => h,
                Err(StoreError::NotFound { .. }) => {
                    if delta <= 0 {
                        return Ok(());
                    }
                    match self.store.create(&new_handle()).await {
                        Ok(_) => return Ok(()),
                        Err(StoreError::AlreadyExists { .. }) => {
                            cas.back_off().await;
                            continue;
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
                Err(e) => return Err(e.into()),
            };
            let count = handle.spec.block.entry(key.clone()).or_insert(0);
            *count += delta;
            if *count <= 0 {
                handle.spec.block.remove(&key);
            }
            let result = if handle.spec.block.is_empty() {
                let rev = handle.metadata.resource_version.clone().unwrap_or_default();
                self.store.delete::<IpamHandle>(&name, &rev).await
            } else {
                self.store.update(&handle).await.map(|_| ())
            };
            match result {
                Ok(()) => return Ok(()),
                Err(StoreError::Conflict { .. } | StoreError::NotFound { .. }) => {
                    cas.back_off().await
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Completes a deletion Calico started (block marked `deleted`) if the block is empty, so its
    /// CIDR can be claimed again.
    async fn finish_block_deletion(&self, block: &IpamBlock) -> Result<(), IpamError> {
        if !block.spec.is_empty() {
            warn!(block = %block.metadata.name, "block marked deleted still has allocations; leaving it");
            return Ok(());
        }
        let rev = block.metadata.resource_version.clone().unwrap_or_default();
        match self
            .store
            .delete::<IpamBlock>(&block.metadata.name, &rev)
            .await
        {
            Ok(()) | Err(StoreError::NotFound { .. } | StoreError::Conflict { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Finds an unclaimed block in the pools and claims it for `node`.
    async fn claim_new_block(
        &self,
        pools: &[&Pool],
        node: &str,
    ) -> Result<Option<IpNet>, IpamError> {
        // Every block's CIDR, but only the dying blocks themselves: a big cluster's blocks are
        // not copied per claim.
        let blocks: Vec<(IpNet, Option<IpamBlock>)> = self
            .store
            .list_map(|b: &IpamBlock| {
                let cidr = b.spec.parsed_cidr()?;
                Some((cidr, b.spec.is_deleted().then(|| b.clone())))
            })
            .await?;
        for dying in blocks.iter().filter_map(|(_, b)| b.as_ref()) {
            self.finish_block_deletion(dying).await?;
        }
        // Blocks whose deletion just finished are still treated as taken until the next pass.
        let existing: HashSet<IpNet> = blocks.iter().map(|(cidr, _)| *cidr).collect();
        for pool in pools {
            let candidates = CandidateBlocks::new(pool, node);
            let known_in_pool = existing
                .iter()
                .filter(|c| pool.cidr.contains(&c.network()))
                .count() as u128;
            // Among known+1 distinct candidates at least one is free, unless claims race us.
            let limit = candidates.len().min(known_in_pool + 1 + MAX_LOST_CLAIMS);
            let mut i = 0u128;
            while i < limit {
                let cidr = candidates.nth(i);
                i += 1;
                if existing.contains(&cidr) {
                    continue;
                }
                if self.claim_block(node, &cidr).await? {
                    info!(node, block = %cidr, pool = %pool.name, "claimed block");
                    return Ok(Some(cidr));
                }
            }
        }
        Ok(None)
    }

    /// Two-phase claim of one block: pending affinity, block creation, affinity confirmed. Returns
    /// false when another host won the block (our pending affinity is removed again).
    async fn claim_block(&self, node: &str, cidr: &IpNet) -> Result<bool, IpamError> {
        let aff_name = affinity_name(node, cidr);
        let pending = BlockAffinity::new(
            aff_name.clone(),
            BlockAffinitySpec {
                state: AffinityState::Pending,
                node: node.to_string(),
                cidr: cidr.to_string(),
                deleted: "false".to_string(),
                extra: Default::default(),
            },
        );
        match self.store.create(&pending).await {
            Ok(_) => {}
            Err(e @ (StoreError::AlreadyExists { .. } | StoreError::Other { .. })) => {
                // Left over from an earlier attempt of ours (or our create landed despite the
                // error), or being released: never reuse the latter.
                match self.store.get::<BlockAffinity>(&aff_name).await {
                    Ok(a)
                        if a.spec.state == AffinityState::PendingDeletion
                            || a.spec.deleted == "true" =>
                    {
                        return Ok(false);
                    }
                    Ok(_) => {}
                    Err(StoreError::NotFound { .. }) if matches!(e, StoreError::Other { .. }) => {
                        return Err(e.into());
                    }
                    Err(StoreError::NotFound { .. }) => return Ok(false),
                    Err(get_err) => return Err(get_err.into()),
                }
            }
            Err(e) => return Err(e.into()),
        }

        let block = new_block(*cidr, Some(node));
        let ours = match self.store.create(&block).await {
            Ok(_) => true,
            // Someone else's block, or ours if the create landed despite the error: look.
            Err(StoreError::AlreadyExists { .. } | StoreError::Other { .. }) => {
                match self.store.get::<IpamBlock>(&block.metadata.name).await {
                    Ok(b) => !b.spec.is_deleted() && b.spec.affine_node() == Some(node),
                    Err(StoreError::NotFound { .. }) => false,
                    // Pending affinity left behind; this host's next assignment cleans it up.
                    Err(e) => return Err(e.into()),
                }
            }
            Err(e) => {
                self.delete_affinity_if(node, cidr, |a| a.spec.state == AffinityState::Pending)
                    .await?;
                return Err(e.into());
            }
        };
        if !ours {
            debug!(node, block = %cidr, "lost the race for a block; undoing pending affinity");
            self.delete_affinity_if(node, cidr, |a| a.spec.state == AffinityState::Pending)
                .await?;
            return Ok(false);
        }

        // Confirm the affinity, unless a release of the same block started meanwhile (another
        // request of this host emptying it): that release may delete the block, so it wins.
        let mut cas = self.cas_retry::<BlockAffinity>(&aff_name);
        loop {
            cas.attempt()?;
            let mut a = match self.store.get::<BlockAffinity>(&aff_name).await {
                Ok(a) => a,
                Err(StoreError::NotFound { .. }) => {
                    // A release finished under us; it deleted the block if it was empty. Record
                    // the claim again, as pending, only while the block is still ours.
                    if !self.block_is_ours(node, cidr).await? {
                        return Ok(false);
                    }
                    match self.store.create(&pending).await {
                        Ok(_) | Err(StoreError::AlreadyExists { .. }) => {}
                        Err(e) => return Err(e.into()),
                    }
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            match a.spec.state {
                AffinityState::Confirmed if a.spec.deleted != "true" => return Ok(true),
                AffinityState::Pending if a.spec.deleted != "true" => {}
                _ => {
                    debug!(node, block = %cidr, "block released while being claimed; leaving it");
                    return Ok(false);
                }
            }
            // Still pending: the block must exist (a release may have deleted it) before the
            // affinity says so.
            if !self.block_is_ours(node, cidr).await? {
                self.delete_affinity_if(node, cidr, |a| a.spec.state == AffinityState::Pending)
                    .await?;
                return Ok(false);
            }
            a.spec.state = AffinityState::Confirmed;
            match self.store.update(&a).await {
                Ok(_) => return Ok(true),
                Err(StoreError::Conflict { .. } | StoreError::NotFound { .. }) => {
                    cas.back_off().await
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Whether the block exists, is not being deleted, and is affine to `node`.
    async fn block_is_ours(&self, node: &str, cidr: &IpNet) -> Result<bool, IpamError> {
        match self.store.get::<IpamBlock>(&block_name(cidr)).await {
            Ok(b) => Ok(!b.spec.is_deleted() && b.spec.affine_node() == Some(node)),
            Err(StoreError::NotFound { .. }) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Deletes the node's affinity object for `cidr` if `pred` holds for it (CAS loop).
    async fn delete_affinity_if(
        &self,
        node: &str,
        cidr: &IpNet,
        pred: impl Fn(&BlockAffinity) -> bool,
    ) -> Result<(), IpamError> {
        let name = affinity_name(node, cidr);
        let mut cas = self.cas_retry::<BlockAffinity>(&name);
        loop {
            cas.attempt()?;
            let a = match self.store.get::<BlockAffinity>(&name).await {
                Ok(a) => a,
                Err(StoreError::NotFound { .. }) => return Ok(()),
                Err(e) => return Err(e.into()),
            };
            if !pred(&a) {
                return Ok(());
            }
            let rev = a.metadata.resource_version.clone().unwrap_or_default();
            match self.store.delete::<BlockAffinity>(&name, &rev).await {
                Ok(()) | Err(StoreError::NotFound { .. }) => return Ok(()),
                Err(StoreError::Conflict { .. }) => cas.back_off().await,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Assigns one specific address to a handle, claiming its block for `node` if no one has it.
    /// With `strictAffinity`, the block must be affine to `node`.
    pub async fn assign_ip(
        &self,
        ip: IpAddr,
        handle_id: &str,
        attributes: &BTreeMap<String, String>,
        node: &str,
    ) -> Result<(), IpamError> {
        let pools = self.pools().await?;
        let pool = pools
            .valid
            .iter()
            .find(|p| !p.disabled && p.cidr.contains(&ip))
            .ok_or(IpamError::NotInPool(ip))?;
        let cidr = pool.block_for(ip);
        let name = block_name(&cidr);
        let Some(ordinal) = ip_to_ordinal(&cidr, ip) else {
            return Err(IpamError::NotInPool(ip));
        };
        let strict = self.settings().await?.strict_affinity;
        let mut cas = self.cas_retry::<IpamBlock>(&name);
        loop {
            cas.attempt()?;
            let mut block = match self.store.get::<IpamBlock>(&name).await {
                Ok(b) if !b.spec.is_deleted() => b,
                Ok(dying) => {
                    self.finish_block_deletion(&dying).await?;
                    cas.back_off().await;
                    continue;
                }
                Err(StoreError::NotFound { .. }) => {
                    // Either we now own it or someone else created it: re-read either way.
                    self.claim_block(node, &cidr).await?;
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            block
                .spec
                .check_invariants()
                .map_err(|e| IpamError::InvalidObject {
                    kind: "IPAMBlock",
                    name: name.clone(),
                    reason: e.problem,
                })?;
            if strict && block.spec.affine_node() != Some(node) {
                return Err(IpamError::NotAffine {
                    ip,
                    block: cidr,
                    owner: block.spec.affine_node().map(str::to_string),
                    node: node.to_string(),
                });
            }
            if let Err(holder) = block.spec.assign_ordinal(ordinal, handle_id, attributes) {
                return Err(IpamError::AlreadyAssigned { ip, holder });
            }
            self.adjust_handle(handle_id, &cidr, 1).await?;
            match self.store.update(&block).await {
                Ok(_) => return Ok(()),
                Err(StoreError::Conflict { .. } | StoreError::NotFound { .. }) => {
                    self.adjust_handle(handle_id, &cidr, -1).await?;
                    cas.back_off().await;
                }
                // Ambiguous outcome: keep the handle count (see assign_from_block).
                Err(other) => return Err(other.into()),
            }
        }
    }

    /// Addresses currently held by a handle.
    pub async fn ips_by_handle(&self, handle_id: &str) -> Result<Vec<IpAddr>, IpamError> {
        let handle = match self.store.get::<IpamHandle>(&handle_name(handle_id)).await {
            Ok(h) => h,
            Err(StoreError::NotFound { .. }) => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        };
        let mut out = Vec::new();
        for key in handle.spec.block.keys() {
            let Ok(cidr) = key.parse::<IpNet>() else {
                warn!(handle = %handle.metadata.name, key, "spec.block key is not a CIDR");
                continue;
            };
            match self.store.get::<IpamBlock>(&block_name(&cidr)).await {
                Ok(b) => out.extend(
                    b.spec
                        .ordinals_for_handle(handle_id)
                        .into_iter()
                        .map(|o| ordinal_to_ip(&cidr, o)),
                ),
                Err(StoreError::NotFound { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        out.sort();
        Ok(out)
    }

    /// Releases every address of a handle and deletes the handle; returns what was released.
    /// A missing handle releases nothing (CNI DEL is idempotent).
    pub async fn release_by_handle(&self, handle_id: &str) -> Result<Vec<IpAddr>, IpamError> {
        let span = debug_span!("release_by_handle", handle = %handle_id);
        self.release_handles_inner(&[handle_id.to_owned()])
            .instrument(span)
            .await
    }

    /// [`Ipam::release_by_handle`] for several handles at once, with one write per block
    /// whatever the number of handles it holds: a node's pods deleted together (a scale-down,
    /// a drain) free their addresses in a write or two instead of racing each other for the
    /// same block.
    pub async fn release_handles(&self, handle_ids: &[String]) -> Result<Vec<IpAddr>, IpamError> {
        let span = debug_span!("release_handles", n = handle_ids.len());
        self.release_handles_inner(handle_ids)
            .instrument(span)
            .await
    }

    async fn release_handles_inner(&self, handle_ids: &[String]) -> Result<Vec<IpAddr>, IpamError> {
        // Every allocation names its handle in the block, so the blocks (a cached list in the
        // agent) say where the handles' addresses are without reading the handles.
        let holding = self.blocks_holding(handle_ids).await?;
        let in_blocks: BTreeSet<&String> = holding.iter().flat_map(|(_, hs)| hs).collect();
        let mut released = Vec::new();
        for handle_id in handle_ids.iter().filter(|h| !in_blocks.contains(h)) {
            // Nothing of it in the blocks as this store sees them: the handle, if any, says
            // where to look (and a DEL of an unknown container costs one read).
            released.extend(self.release_by_handle_record(handle_id).await?);
        }
        if in_blocks.is_empty() {
            released.sort();
            return Ok(released);
        }
        let mut done: BTreeSet<IpNet> = holding.iter().map(|(c, _)| *c).collect();
        let from_blocks = async {
            let mut released = Vec::new();
            for (cidr, held) in &holding {
                let select = |b: &crate::model::IpamBlockSpec| {
                    held.iter().flat_map(|h| b.ordinals_for_handle(h)).collect()
                };
                // The handles go whole afterwards, so per-block count updates are skipped.
                released.extend(self.release_in_block(cidr, select, true).await?);
            }
            Ok::<_, IpamError>(released)
        };
        // The handles go at the same time (a round trip saved). If the store returns what one
        // held, that names blocks a stale list could have missed; if the block writes fail,
        // the retried release finds the addresses in the blocks again.
        let names: Vec<String> = in_blocks.iter().map(|h| handle_name(h)).collect();
        let takes =
            futures_util::future::join_all(names.iter().map(|n| self.store.take::<IpamHandle>(n)));
        let (from_blocks, taken) = futures_util::future::join(from_blocks, takes).await;
        // Every handle object taken gets its stragglers looked at, whatever failed: once the
        // object is gone, only it could have named a block the cached list missed.
        let mut first_error = None;
        match from_blocks {
            Ok(r) => released.extend(r),
            Err(e) => first_error = Some(e),
        }
        for (handle_id, taken) in in_blocks.iter().zip(taken) {
            let handle = match taken {
                Ok(h) => h,
                Err(StoreError::NotFound { .. }) => None,
                Err(e) => {
                    first_error.get_or_insert(e.into());
                    continue;
                }
            };
            match self.release_stragglers(handle_id, handle, &mut done).await {
                Ok(r) => released.extend(r),
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        if let Some(e) = first_error {
            return Err(e);
        }
        released.sort();
        Ok(released)
    }

    /// The blocks holding addresses of any of `handle_ids`, each with those it holds.
    async fn blocks_holding(
        &self,
        handle_ids: &[String],
    ) -> Result<Vec<(IpNet, Vec<String>)>, IpamError> {
        Ok(self
            .store
            .list_map(|b: &IpamBlock| {
                let held: Vec<String> = handle_ids
                    .iter()
                    .filter(|h| b.spec.holds_handle(h))
                    .cloned()
                    .collect();
                if held.is_empty() {
                    return None;
                }
                Some((b.spec.parsed_cidr()?, held))
            })
            .await?)
    }

    /// Deletes a handle whose addresses were released already (see
    /// [`AutoAssignRequest::release_with`]). Whatever a block still holds of it, by the blocks'
    /// own records or by the handle's, is released too, so a retry after a failure finishes
    /// the job even once the handle object is gone.
    pub async fn forget_handle(&self, handle_id: &str) -> Result<Vec<IpAddr>, IpamError> {
        let handle = match self.store.take::<IpamHandle>(&handle_name(handle_id)).await {
            Ok(h) => h,
            Err(StoreError::NotFound { .. }) => None,
            Err(e) => return Err(e.into()),
        };
        let mut done = BTreeSet::new();
        let mut released = Vec::new();
        for (cidr, _) in self.blocks_holding(&[handle_id.to_owned()]).await? {
            done.insert(cidr);
            released.extend(self.release_handle_in_block(&cidr, handle_id).await?);
        }
        released.extend(
            self.release_stragglers(handle_id, handle, &mut done)
                .await?,
        );
        released.sort();
        Ok(released)
    }

    /// Releases the handle's addresses in the blocks its object names, other than `done`.
    async fn release_stragglers(
        &self,
        handle_id: &str,
        handle: Option<IpamHandle>,
        done: &mut BTreeSet<IpNet>,
    ) -> Result<Vec<IpAddr>, IpamError> {
        let mut released = Vec::new();
        for key in handle.iter().flat_map(|h| h.spec.block.keys()) {
            let Ok(cidr) = key.parse::<IpNet>() else {
                warn!(handle = %handle_name(handle_id), key, "spec.block key is not a CIDR; dropping it");
                continue;
            };
            if done.insert(cidr) {
                released.extend(self.release_handle_in_block(&cidr, handle_id).await?);
            }
        }
        Ok(released)
    }

    /// Releases what the handle object records, then deletes it at the revision read.
    async fn release_by_handle_record(&self, handle_id: &str) -> Result<Vec<IpAddr>, IpamError> {
        let name = handle_name(handle_id);
        let mut released = Vec::new();
        let mut cas = self.cas_retry::<IpamHandle>(&name);
        loop {
            cas.attempt()?;
            let handle = match self.store.get::<IpamHandle>(&name).await {
                Ok(h) => h,
                Err(StoreError::NotFound { .. }) => return Ok(released),
                Err(e) => return Err(e.into()),
            };
            for key in handle.spec.block.keys() {
                let Ok(cidr) = key.parse::<IpNet>() else {
                    warn!(handle = %name, key, "spec.block key is not a CIDR; dropping it");
                    continue;
                };
                released.extend(self.release_handle_in_block(&cidr, handle_id).await?);
            }
            let rev = handle.metadata.resource_version.clone().unwrap_or_default();
            match self.store.delete::<IpamHandle>(&name, &rev).await {
                Ok(()) | Err(StoreError::NotFound { .. }) => {
                    released.sort();
                    return Ok(released);
                }
                // An assignment to this handle raced us: go again with its new blocks.
                Err(StoreError::Conflict { .. }) => cas.back_off().await,
                Err(e) => return Err(e.into()),
            }
        }
    }

    async fn release_handle_in_block(
        &self,
        cidr: &IpNet,
        handle_id: &str,
    ) -> Result<Vec<IpAddr>, IpamError> {
        // The caller deletes the whole handle afterwards, so per-block count updates are skipped.
        self.release_in_block(cidr, |b| b.ordinals_for_handle(handle_id), true)
            .await
    }

    /// Releases the ordinals chosen by `select` from one block (CAS loop), then lowers the handle
    /// counts and gives the block up if it became empty. With `skip_handles` the caller will
    /// delete the handles itself.
    async fn release_in_block(
        &self,
        cidr: &IpNet,
        select: impl Fn(&crate::model::IpamBlockSpec) -> Vec<u32>,
        skip_handles: bool,
    ) -> Result<Vec<IpAddr>, IpamError> {
        let name = block_name(cidr);
        let mut cas = self.cas_retry::<IpamBlock>(&name);
        loop {
            cas.attempt()?;
            let mut block = match self.store.get::<IpamBlock>(&name).await {
                Ok(b) => b,
                Err(StoreError::NotFound { .. }) => return Ok(Vec::new()),
                Err(e) => return Err(e.into()),
            };
            let ordinals = select(&block.spec);
            if ordinals.is_empty() {
                return Ok(Vec::new());
            }
            if let Err(e) = block.spec.check_invariants() {
                return Err(IpamError::InvalidObject {
                    kind: "IPAMBlock",
                    name,
                    reason: e.problem,
                });
            }
            let released = block.spec.release_ordinals(&ordinals);
            let write = if block.spec.is_empty() && block.spec.affinity.is_none() {
                // An empty block nobody owns goes away in the same write, as in Calico.
                let rev = block.metadata.resource_version.clone().unwrap_or_default();
                self.store
                    .delete::<IpamBlock>(&name, &rev)
                    .await
                    .map(|()| None)
            } else {
                self.store.update(&block).await.map(Some)
            };
            match write {
                Ok(stored) => {
                    if !skip_handles {
                        let mut per_handle: BTreeMap<&str, i64> = BTreeMap::new();
                        for r in &released {
                            if let Some(h) = r.handle_id.as_deref() {
                                *per_handle.entry(h).or_insert(0) += 1;
                            }
                        }
                        for (h, n) in per_handle {
                            self.adjust_handle(h, cidr, -n).await?;
                        }
                    }
                    if let Some(stored) = stored
                        && stored.spec.is_empty()
                    {
                        self.give_up_empty_block(&stored).await?;
                    }
                    return Ok(released
                        .iter()
                        .map(|r| ordinal_to_ip(cidr, r.ordinal))
                        .collect());
                }
                Err(StoreError::Conflict { .. }) => cas.back_off().await,
                Err(StoreError::NotFound { .. }) => return Ok(Vec::new()),
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// An emptied block: delete it if it has no affinity; release its host's affinity if that host
    /// has other blocks of the family (a host keeps its last block).
    async fn give_up_empty_block(&self, block: &IpamBlock) -> Result<(), IpamError> {
        let Some(cidr) = block.spec.parsed_cidr() else {
            return Ok(());
        };
        match block.spec.affine_node() {
            None => {
                let rev = block.metadata.resource_version.clone().unwrap_or_default();
                match self
                    .store
                    .delete::<IpamBlock>(&block.metadata.name, &rev)
                    .await
                {
                    // Conflict: someone wrote to it since, so it is in use again.
                    Ok(()) | Err(StoreError::Conflict { .. } | StoreError::NotFound { .. }) => {
                        Ok(())
                    }
                    Err(e) => Err(e.into()),
                }
            }
            Some(node) => {
                let fam = family(&cidr.network());
                let confirmed = self
                    .host_affinities(node, fam)
                    .await?
                    .iter()
                    .filter(|(_, st)| *st == AffinityState::Confirmed)
                    .count();
                if confirmed > 1 {
                    let outcome = self.release_block_affinity(node, &cidr, true).await?;
                    debug!(node, block = %cidr, ?outcome, "released emptied block");
                }
                Ok(())
            }
        }
    }

    /// Releases `node`'s affinity for a block: affinity → pendingDeletion, block deleted if empty
    /// (or, unless `require_empty`, un-affined so other hosts' borrowed addresses stay), affinity
    /// deleted. With `require_empty` and a non-empty block the affinity goes back to confirmed.
    async fn release_block_affinity(
        &self,
        node: &str,
        cidr: &IpNet,
        require_empty: bool,
    ) -> Result<AffinityRelease, IpamError> {
        let aff_name = affinity_name(node, cidr);
        let blk_name = block_name(cidr);
        let mut cas = self.cas_retry::<BlockAffinity>(&aff_name);
        loop {
            cas.attempt()?;
            let aff = match self.store.get::<BlockAffinity>(&aff_name).await {
                Ok(mut a) => {
                    if a.spec.state != AffinityState::PendingDeletion {
                        a.spec.state = AffinityState::PendingDeletion;
                        match self.store.update(&a).await {
                            Ok(stored) => Some(stored),
                            Err(StoreError::Conflict { .. } | StoreError::NotFound { .. }) => {
                                cas.back_off().await;
                                continue;
                            }
                            Err(e) => return Err(e.into()),
                        }
                    } else {
                        Some(a)
                    }
                }
                Err(StoreError::NotFound { .. }) => None,
                Err(e) => return Err(e.into()),
            };

            let mut outcome = AffinityRelease::Gone;
            let block = match self.store.get::<IpamBlock>(&blk_name).await {
                Err(StoreError::NotFound { .. }) => None,
                Err(e) => return Err(e.into()),
                Ok(b) if b.spec.affine_node() != Some(node) => None,
                Ok(b) => Some(b),
            };
            if block.is_some() {
                // The block read must belong to the affinity being released, not to a new claim
                // of the same CIDR made after another releaser finished: a claim creates its
                // affinity before its block, so an unchanged affinity (same revision, or still
                // absent) after reading the block proves the block predates any new claim.
                let now = match self.store.get::<BlockAffinity>(&aff_name).await {
                    Ok(a) => a.metadata.resource_version,
                    Err(StoreError::NotFound { .. }) => None,
                    Err(e) => return Err(e.into()),
                };
                let seen = aff
                    .as_ref()
                    .and_then(|a| a.metadata.resource_version.clone());
                let same = match (&aff, &now) {
                    (None, None) => true,
                    (Some(_), Some(_)) => seen == now,
                    _ => false,
                };
                if !same {
                    cas.back_off().await;
                    continue;
                }
            }
            let mut aff = aff;
            match block {
                None => {}
                Some(b) if b.spec.is_empty() => {
                    // Mark the affinity deleted first (as Calico does): a concurrent releaser
                    // that read the block before it emptied would otherwise restore the
                    // affinity to confirmed after this one deleted the block. Its restore is a
                    // CAS on the affinity, which this write makes fail.
                    if let Some(a) = aff.as_mut().filter(|a| a.spec.deleted != "true") {
                        a.spec.deleted = "true".to_string();
                        match self.store.update(&*a).await {
                            Ok(stored) => *a = stored,
                            Err(StoreError::Conflict { .. } | StoreError::NotFound { .. }) => {
                                cas.back_off().await;
                                continue;
                            }
                            Err(e) => return Err(e.into()),
                        }
                    }
                    let rev = b.metadata.resource_version.clone().unwrap_or_default();
                    match self.store.delete::<IpamBlock>(&blk_name, &rev).await {
                        Ok(()) | Err(StoreError::NotFound { .. }) => {
                            outcome = AffinityRelease::Deleted
                        }
                        Err(StoreError::Conflict { .. }) => {
                            cas.back_off().await;
                            continue;
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
                Some(mut b) => {
                    if require_empty {
                        if let Some(mut a) = aff {
                            a.spec.state = AffinityState::Confirmed;
                            a.spec.deleted = "false".to_string();
                            match self.store.update(&a).await {
                                Ok(_) => return Ok(AffinityRelease::KeptNotEmpty),
                                Err(StoreError::Conflict { .. }) => {
                                    cas.back_off().await;
                                    continue;
                                }
                                Err(StoreError::NotFound { .. }) => {}
                                Err(e) => return Err(e.into()),
                            }
                        }
                        return Ok(AffinityRelease::KeptNotEmpty);
                    }
                    b.spec.affinity = None;
                    match self.store.update(&b).await {
                        Ok(_) => outcome = AffinityRelease::Unaffined,
                        Err(StoreError::Conflict { .. }) => {
                            cas.back_off().await;
                            continue;
                        }
                        Err(StoreError::NotFound { .. }) => {}
                        Err(e) => return Err(e.into()),
                    }
                }
            }

            if let Some(a) = aff {
                let rev = a.metadata.resource_version.clone().unwrap_or_default();
                match self.store.delete::<BlockAffinity>(&aff_name, &rev).await {
                    Ok(()) | Err(StoreError::NotFound { .. }) => {}
                    Err(StoreError::Conflict { .. }) => {
                        cas.back_off().await;
                        continue;
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            return Ok(outcome);
        }
    }

    /// Releases specific addresses, whoever holds them; returns those that were allocated.
    pub async fn release_ips(&self, ips: &[IpAddr]) -> Result<Vec<IpAddr>, IpamError> {
        if ips.is_empty() {
            return Ok(Vec::new());
        }
        let blocks = self.store.list::<IpamBlock>().await?;
        let cidrs: Vec<IpNet> = blocks.iter().filter_map(|b| b.spec.parsed_cidr()).collect();
        let mut by_block: BTreeMap<IpNet, Vec<IpAddr>> = BTreeMap::new();
        for ip in ips {
            match cidrs.iter().find(|c| c.contains(ip)) {
                Some(c) => by_block.entry(*c).or_default().push(*ip),
                None => debug!(%ip, "release of an address in no block"),
            }
        }
        let mut released = Vec::new();
        for (cidr, addrs) in by_block {
            let wanted: Vec<u32> = addrs
                .iter()
                .filter_map(|ip| ip_to_ordinal(&cidr, *ip))
                .collect();
            released.extend(
                self.release_in_block(&cidr, |_| wanted.clone(), false)
                    .await?,
            );
        }
        Ok(released)
    }

    /// Releases one allocation only if it is still the one observed: same handle and same
    /// allocation sequence number (guards the leak collector against a re-assigned address).
    pub(crate) async fn release_if_unchanged(
        &self,
        ip: IpAddr,
        cidr: &IpNet,
        handle_id: &str,
        sequence: Option<u64>,
    ) -> Result<bool, IpamError> {
        let Some(ordinal) = ip_to_ordinal(cidr, ip) else {
            return Ok(false);
        };
        let released = self
            .release_in_block(
                cidr,
                |b| {
                    let same = b.handle_at(ordinal) == Some(handle_id)
                        && b.sequence_at(ordinal) == sequence;
                    if same { vec![ordinal] } else { Vec::new() }
                },
                false,
            )
            .await?;
        Ok(!released.is_empty())
    }

    /// Releases everything of a deleted node: its tunnel addresses, every allocation made for it
    /// (attribute `node`), and its block affinities (empty blocks deleted, others un-affined).
    pub async fn release_node(&self, node: &str) -> Result<NodeReleaseReport, IpamError> {
        let span = tracing::info_span!("release_node", node);
        self.release_node_inner(node).instrument(span).await
    }

    async fn release_node_inner(&self, node: &str) -> Result<NodeReleaseReport, IpamError> {
        let mut report = NodeReleaseReport::default();
        for kind in [TunnelKind::Ipip, TunnelKind::Vxlan, TunnelKind::VxlanV6] {
            report
                .released
                .extend(self.release_by_handle(&kind.handle_id(node)).await?);
        }
        let blocks = self.store.list::<IpamBlock>().await?;
        let mut handles = BTreeSet::new();
        for b in &blocks {
            for o in 0..b.spec.allocations.len() as u32 {
                if let Some(a) = b.spec.attribute_at(o)
                    && a.secondary
                        .as_ref()
                        .and_then(|s| s.get(attr::NODE))
                        .is_some_and(|n| n == node)
                    && let Some(h) = &a.handle_id
                {
                    handles.insert(h.clone());
                }
            }
        }
        for h in &handles {
            report.released.extend(self.release_by_handle(h).await?);
        }

        let mut cidrs: BTreeSet<IpNet> = self
            .store
            .list::<BlockAffinity>()
            .await?
            .iter()
            .filter(|a| a.spec.node == node)
            .filter_map(|a| a.spec.cidr.parse().ok())
            .collect();
        // Blocks affine to the node without an affinity object (an interrupted claim or release).
        cidrs.extend(
            self.store
                .list::<IpamBlock>()
                .await?
                .iter()
                .filter(|b| b.spec.affine_node() == Some(node))
                .filter_map(|b| b.spec.parsed_cidr()),
        );
        for cidr in cidrs {
            match self.release_block_affinity(node, &cidr, false).await? {
                AffinityRelease::Deleted => report.blocks_deleted.push(cidr),
                AffinityRelease::Unaffined => report.blocks_unaffined.push(cidr),
                AffinityRelease::KeptNotEmpty | AffinityRelease::Gone => {}
            }
        }
        report.released.sort();
        info!(
            node,
            released = report.released.len(),
            deleted = report.blocks_deleted.len(),
            "released node's IPAM"
        );
        Ok(report)
    }

    /// Ensures the node has a tunnel address of this kind from a pool of its family with that
    /// encapsulation enabled that selects the node, reusing its current one when still valid (also in a
    /// pool disabled since). Returns `None` (after releasing
    /// any old address) when no pool for this node enables it.
    pub async fn ensure_tunnel_address(
        &self,
        node: &str,
        node_labels: &BTreeMap<String, String>,
        kind: TunnelKind,
    ) -> Result<Option<IpAddr>, IpamError> {
        let handle_id = kind.handle_id(node);
        let pools = self.pools().await?;
        // A current address stays valid in a pool that was disabled since (existing assignments
        // survive disabling); a new one only comes from an enabled pool.
        let suitable = |p: &&Pool| {
            p.family() == kind.family()
                && kind.pool_enables(p)
                && p.allowed_uses.contains(&AllowedUse::Tunnel)
                && p.node_selector.matches(node_labels)
        };
        let usable: Vec<&Pool> = pools
            .valid
            .iter()
            .filter(suitable)
            .filter(|p| !p.disabled)
            .collect();
        let current = self.ips_by_handle(&handle_id).await?;
        if let Some(ip) = current.iter().find(|ip| {
            pools
                .valid
                .iter()
                .filter(suitable)
                .any(|p| p.cidr.contains(*ip))
        }) {
            return Ok(Some(*ip));
        }
        if !current.is_empty() {
            self.release_by_handle(&handle_id).await?;
        }
        if usable.is_empty() {
            return Ok(None);
        }
        let req = AutoAssignRequest {
            handle_id,
            attributes: BTreeMap::from([
                (attr::NODE.to_string(), node.to_string()),
                (attr::TYPE.to_string(), kind.type_attr().to_string()),
            ]),
            node: node.to_string(),
            node_labels: node_labels.clone(),
            num_v4: usize::from(kind.family() == 4),
            num_v6: usize::from(kind.family() == 6),
            pools: usable.iter().map(|p| p.cidr).collect(),
            use_: Some(AllowedUse::Tunnel),
            release_with: Vec::new(),
        };
        let assigned = self.auto_assign(&req).await?;
        Ok(assigned.ipv4.into_iter().chain(assigned.ipv6).next())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::IpPoolSpec;

    fn pool(cidr: &str, block: i64) -> Pool {
        Pool::from_resource(&IpPool::new(
            "p",
            IpPoolSpec {
                cidr: cidr.into(),
                block_size: Some(block),
                ..Default::default()
            },
        ))
        .unwrap()
    }

    #[test]
    fn candidate_order_is_a_permutation_seeded_by_host() {
        let p = pool("10.0.0.0/24", 28);
        let a = CandidateBlocks::new(&p, "node-a");
        let b = CandidateBlocks::new(&p, "node-b");
        assert_eq!(a.len(), 16);
        let order_a: Vec<IpNet> = (0..16).map(|i| a.nth(i)).collect();
        let order_b: Vec<IpNet> = (0..16).map(|i| b.nth(i)).collect();
        let set: BTreeSet<IpNet> = order_a.iter().copied().collect();
        assert_eq!(set.len(), 16, "every block exactly once");
        assert!(
            set.iter()
                .all(|c| c.prefix_len() == 28 && p.cidr.contains(&c.network()))
        );
        assert_ne!(order_a, order_b, "hosts start in different places");
        let again: Vec<IpNet> = (0..16)
            .map(|i| CandidateBlocks::new(&p, "node-a").nth(i))
            .collect();
        assert_eq!(order_a, again, "deterministic per host");
    }

    #[test]
    fn candidate_blocks_handle_single_block_and_huge_v6_pools() {
        let one = CandidateBlocks::new(&pool("10.0.0.0/26", 26), "n");
        assert_eq!(one.len(), 1);
        assert_eq!(one.nth(0), "10.0.0.0/26".parse::<IpNet>().unwrap());
        let huge = CandidateBlocks::new(&pool("fd00::/8", 122), "n");
        assert_eq!(huge.len(), 1u128 << 114);
        let c = huge.nth(12345);
        assert_eq!(c.prefix_len(), 122);
        assert!("fd00::/8".parse::<IpNet>().unwrap().contains(&c.network()));
    }

    #[test]
    fn settings_default_max_blocks_when_zero() {
        let mut cfg = IpamConfig::new("default", Default::default());
        cfg.spec.max_blocks_per_host = Some(0);
        assert_eq!(IpamSettings::from_config(&cfg).max_blocks_per_host, 20);
        cfg.spec.max_blocks_per_host = Some(3);
        assert_eq!(IpamSettings::from_config(&cfg).max_blocks_per_host, 3);
    }
}
