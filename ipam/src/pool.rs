//! IPPool validation and Calico's client-side defaults: turns stored pools into usable [`Pool`]s or named errors.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;

use crate::model::{IpPool, IpamBlock};
use crate::selector::Selector;

/// When a pool's traffic is encapsulated (IPIP or VXLAN).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EncapMode {
    /// `Never`
    Never,
    /// `Always`
    Always,
    /// `CrossSubnet`: only towards nodes on another subnet.
    CrossSubnet,
}

impl EncapMode {
    fn parse(value: &str) -> Option<Self> {
        match value {
            "Never" => Some(Self::Never),
            "Always" => Some(Self::Always),
            "CrossSubnet" => Some(Self::CrossSubnet),
            _ => None,
        }
    }

    /// Whether any traffic is encapsulated.
    pub fn is_enabled(self) -> bool {
        self != Self::Never
    }
}

/// What a pool's addresses may be used for (`allowedUses`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AllowedUse {
    /// Pod addresses.
    Workload,
    /// Node tunnel addresses (IPIP/VXLAN).
    Tunnel,
}

/// A pool that passed validation, with Calico's defaults applied.
#[derive(Debug, Clone, PartialEq)]
pub struct Pool {
    /// Object name.
    pub name: String,
    /// Pool CIDR (aligned).
    pub cidr: IpNet,
    /// Block prefix length.
    pub block_size: u8,
    /// Effective IPIP mode (`ipipMode`, else the deprecated `ipip` block, else Never).
    pub ipip_mode: EncapMode,
    /// Effective VXLAN mode.
    pub vxlan_mode: EncapMode,
    /// `natOutgoing` or the deprecated `nat-outgoing`.
    pub nat_outgoing: bool,
    /// Disabled pools make no new assignments; existing ones stay.
    pub disabled: bool,
    /// `disableBGPExport`
    pub disable_bgp_export: bool,
    /// Which nodes may take blocks from this pool.
    pub node_selector: Selector,
    /// What the pool's addresses may be used for.
    pub allowed_uses: Vec<AllowedUse>,
}

/// A pool that cannot be used, naming the pool and the field at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("IPPool {pool}: spec.{field}: {reason}")]
pub struct PoolError {
    /// Pool object name.
    pub pool: String,
    /// Field under `spec`.
    pub field: &'static str,
    /// What is wrong.
    pub reason: String,
}

/// Result of validating every stored pool: the usable ones (sorted by name) and the rejected ones.
#[derive(Debug, Clone, Default)]
pub struct PoolSet {
    /// Usable pools, sorted by name.
    pub valid: Vec<Pool>,
    /// Rejected pools; callers log these and carry on with the rest.
    pub invalid: Vec<PoolError>,
}

/// Address accounting of one pool, for metrics and status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolUsage {
    /// Pool name.
    pub pool: String,
    /// Pool CIDR.
    pub cidr: IpNet,
    /// Blocks carved out of the pool so far.
    pub blocks: u64,
    /// Addresses allocated.
    pub in_use: u64,
    /// Free addresses inside existing blocks.
    pub free_in_blocks: u64,
    /// Addresses in the pool not yet in any block (saturating for huge IPv6 pools).
    pub unclaimed: u64,
}

impl PoolSet {
    /// The valid pool whose CIDR contains `addr`, enabled or not.
    pub fn containing(&self, addr: IpAddr) -> Option<&Pool> {
        self.valid.iter().find(|p| p.cidr.contains(&addr))
    }

    /// Per-pool address accounting from the current blocks (pure; the caller supplies the list).
    pub fn usage<B: std::borrow::Borrow<IpamBlock>>(&self, blocks: &[B]) -> Vec<PoolUsage> {
        self.valid
            .iter()
            .map(|p| {
                let mut u = PoolUsage {
                    pool: p.name.clone(),
                    cidr: p.cidr,
                    blocks: 0,
                    in_use: 0,
                    free_in_blocks: 0,
                    unclaimed: 0,
                };
                let mut block_addresses: u128 = 0;
                for b in blocks {
                    let b: &IpamBlock = b.borrow();
                    let Some(cidr) = b.spec.parsed_cidr() else {
                        continue;
                    };
                    if !p.cidr.contains(&cidr.network()) {
                        continue;
                    }
                    u.blocks += 1;
                    let free = b.spec.free_count() as u64;
                    u.free_in_blocks += free;
                    u.in_use +=
                        b.spec.allocations.len() as u64 - free.min(b.spec.allocations.len() as u64);
                    block_addresses += b.spec.allocations.len() as u128;
                }
                let host_bits = u32::from(p.cidr.max_prefix_len() - p.cidr.prefix_len());
                let size = 1u128.checked_shl(host_bits).unwrap_or(u128::MAX);
                u.unclaimed =
                    u64::try_from(size.saturating_sub(block_addresses)).unwrap_or(u64::MAX);
                u
            })
            .collect()
    }
}

const DEFAULT_BLOCK_SIZE_V4: u8 = 26;
const DEFAULT_BLOCK_SIZE_V6: u8 = 122;

fn link_local_v4() -> IpNet {
    IpNet::V4(ipnet::Ipv4Net::new_assert([169, 254, 0, 0].into(), 16))
}

fn link_local_v6() -> IpNet {
    IpNet::V6(ipnet::Ipv6Net::new_assert(
        [0xfe80, 0, 0, 0, 0, 0, 0, 0].into(),
        10,
    ))
}

/// Whether two networks share any address.
pub(crate) fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

impl Pool {
    /// Validates one pool on its own and applies defaults (overlap with other pools is checked
    /// by [`validate_pools`]).
    pub fn from_resource(pool: &IpPool) -> Result<Self, PoolError> {
        let name = pool.metadata.name.clone();
        let spec = &pool.spec;
        let err = |field: &'static str, reason: String| PoolError {
            pool: name.clone(),
            field,
            reason,
        };

        let cidr: IpNet = spec
            .cidr
            .trim()
            .parse()
            .map_err(|e| err("cidr", format!("{:?} is not a CIDR: {e}", spec.cidr)))?;
        if cidr.trunc() != cidr {
            return Err(err(
                "cidr",
                format!(
                    "{cidr} is not aligned to its prefix length (host bits set; did you mean {}?)",
                    cidr.trunc()
                ),
            ));
        }
        let is_v4 = matches!(cidr, IpNet::V4(_));
        let link_local = if is_v4 {
            link_local_v4()
        } else {
            link_local_v6()
        };
        if overlaps(&cidr, &link_local) {
            return Err(err(
                "cidr",
                format!("{cidr} overlaps the link-local range {link_local}"),
            ));
        }

        let (range, default_size) = if is_v4 {
            (20..=32, DEFAULT_BLOCK_SIZE_V4)
        } else {
            (116..=128, DEFAULT_BLOCK_SIZE_V6)
        };
        let block_size = match spec.block_size {
            None => default_size,
            Some(size) if range.contains(&size) => size as u8,
            Some(size) => {
                return Err(err(
                    "blockSize",
                    format!(
                        "{size} is out of range for an IPv{} pool ({}–{})",
                        if is_v4 { 4 } else { 6 },
                        range.start(),
                        range.end()
                    ),
                ));
            }
        };
        if cidr.prefix_len() > block_size {
            return Err(err(
                "blockSize",
                format!(
                    "pool {cidr} is smaller than one block (/{block_size}); the pool must be at least /{block_size}"
                ),
            ));
        }

        let mode = |field: &'static str, value: &Option<String>| -> Result<EncapMode, PoolError> {
            match value.as_deref() {
                None | Some("") => Ok(EncapMode::Never),
                Some(v) => EncapMode::parse(v).ok_or_else(|| {
                    err(
                        field,
                        format!("unknown mode {v:?} (expected Always, CrossSubnet or Never)"),
                    )
                }),
            }
        };
        let mut ipip_mode = mode("ipipMode", &spec.ipip_mode)?;
        if spec.ipip_mode.as_deref().unwrap_or("").is_empty()
            && let Some(legacy) = &spec.ipip
            && legacy.enabled == Some(true)
        {
            ipip_mode = match legacy.mode.as_deref() {
                None | Some("") | Some("always") => EncapMode::Always,
                Some("cross-subnet") => EncapMode::CrossSubnet,
                Some(other) => {
                    return Err(err(
                        "ipip.mode",
                        format!("unknown mode {other:?} (expected always or cross-subnet)"),
                    ));
                }
            };
        }
        let vxlan_mode = mode("vxlanMode", &spec.vxlan_mode)?;
        if ipip_mode.is_enabled() && vxlan_mode.is_enabled() {
            return Err(err(
                "vxlanMode",
                "IPIP and VXLAN cannot both be enabled on one pool".to_string(),
            ));
        }
        if ipip_mode.is_enabled() && !is_v4 {
            return Err(err(
                "ipipMode",
                "IPIP is not supported on an IPv6 pool".to_string(),
            ));
        }

        let node_selector = match spec.node_selector.as_deref() {
            None => Selector::all(),
            Some(text) => Selector::parse(text).map_err(|e| {
                err(
                    "nodeSelector",
                    format!(
                        "at position {}: expected {}, found {}",
                        e.position, e.expected, e.found
                    ),
                )
            })?,
        };

        let allowed_uses = match spec.allowed_uses.as_deref() {
            None | Some([]) => vec![AllowedUse::Workload, AllowedUse::Tunnel],
            Some(uses) => {
                let mut parsed = Vec::with_capacity(uses.len());
                for u in uses {
                    let use_ = match u.as_str() {
                        "Workload" => AllowedUse::Workload,
                        "Tunnel" => AllowedUse::Tunnel,
                        other => {
                            return Err(err(
                                "allowedUses",
                                format!("unknown use {other:?} (expected Workload or Tunnel)"),
                            ));
                        }
                    };
                    if !parsed.contains(&use_) {
                        parsed.push(use_);
                    }
                }
                parsed
            }
        };

        Ok(Self {
            name,
            cidr,
            block_size,
            ipip_mode,
            vxlan_mode,
            nat_outgoing: spec.nat_outgoing.unwrap_or(false)
                || spec.nat_outgoing_legacy.unwrap_or(false),
            disabled: spec.disabled.unwrap_or(false),
            disable_bgp_export: spec.disable_bgp_export.unwrap_or(false),
            node_selector,
            allowed_uses,
        })
    }

    /// Whether the pool may hand out addresses of this use to a node with these labels.
    pub fn usable_for(&self, use_: AllowedUse, node_labels: &BTreeMap<String, String>) -> bool {
        !self.disabled
            && self.allowed_uses.contains(&use_)
            && self.node_selector.matches(node_labels)
    }

    /// The block containing `addr` (which must be inside the pool).
    pub fn block_for(&self, addr: IpAddr) -> IpNet {
        // block_size was range-checked against the family in from_resource.
        IpNet::new(addr, self.block_size)
            .map(|n| n.trunc())
            .unwrap_or(self.cidr)
    }

    /// Address family, 4 or 6.
    pub fn family(&self) -> u8 {
        match self.cidr {
            IpNet::V4(_) => 4,
            IpNet::V6(_) => 6,
        }
    }
}

impl fmt::Display for Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.name, self.cidr)
    }
}

/// Validates every pool; an enabled pool overlapping an earlier (by name) enabled pool is rejected,
/// so one bad object never stops the good ones.
pub fn validate_pools(pools: &[IpPool]) -> PoolSet {
    let mut sorted: Vec<&IpPool> = pools.iter().collect();
    sorted.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    let mut set = PoolSet::default();
    for pool in sorted {
        match Pool::from_resource(pool) {
            Err(e) => set.invalid.push(e),
            Ok(p) => {
                let clash = (!p.disabled)
                    .then(|| {
                        set.valid
                            .iter()
                            .find(|q| !q.disabled && overlaps(&q.cidr, &p.cidr))
                    })
                    .flatten();
                if let Some(q) = clash {
                    set.invalid.push(PoolError {
                        pool: p.name.clone(),
                        field: "cidr",
                        reason: format!(
                            "{} overlaps enabled IPPool {} ({})",
                            p.cidr, q.name, q.cidr
                        ),
                    });
                } else {
                    set.valid.push(p);
                }
            }
        }
    }
    set
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::IpPoolSpec;

    fn pool(name: &str, cidr: &str) -> IpPool {
        IpPool::new(
            name,
            IpPoolSpec {
                cidr: cidr.to_string(),
                ..IpPoolSpec::default()
            },
        )
    }

    fn with(name: &str, cidr: &str, f: impl FnOnce(&mut IpPoolSpec)) -> IpPool {
        let mut p = pool(name, cidr);
        f(&mut p.spec);
        p
    }

    fn rejected(p: IpPool) -> PoolError {
        Pool::from_resource(&p).unwrap_err()
    }

    #[test]
    fn bare_pool_gets_calico_defaults() {
        let v4 = Pool::from_resource(&pool("default-ipv4-ippool", "10.244.0.0/16")).unwrap();
        assert_eq!(v4.block_size, 26);
        assert_eq!(v4.ipip_mode, EncapMode::Never);
        assert_eq!(v4.vxlan_mode, EncapMode::Never);
        assert_eq!(v4.node_selector.source(), "all()");
        assert_eq!(
            v4.allowed_uses,
            vec![AllowedUse::Workload, AllowedUse::Tunnel]
        );
        assert!(!v4.disabled && !v4.nat_outgoing);
        let v6 = Pool::from_resource(&pool("v6", "fd00:10:244::/48")).unwrap();
        assert_eq!(v6.block_size, 122);
    }

    #[test]
    fn block_size_out_of_range_names_pool_and_field() {
        let e = rejected(with("big", "10.0.0.0/8", |s| s.block_size = Some(40)));
        assert_eq!((e.pool.as_str(), e.field), ("big", "blockSize"));
        assert!(e.to_string().contains("IPPool big: spec.blockSize"), "{e}");
        assert_eq!(
            rejected(with("p", "10.0.0.0/8", |s| s.block_size = Some(19))).field,
            "blockSize"
        );
        assert_eq!(
            rejected(with("p", "fd00::/48", |s| s.block_size = Some(115))).field,
            "blockSize"
        );
        assert_eq!(
            rejected(with("p", "fd00::/48", |s| s.block_size = Some(26))).field,
            "blockSize"
        );
        assert!(Pool::from_resource(&with("p", "10.0.0.0/8", |s| s.block_size = Some(20))).is_ok());
        assert!(Pool::from_resource(&with("p", "10.0.0.0/8", |s| s.block_size = Some(32))).is_ok());
        assert!(Pool::from_resource(&with("p", "fd00::/48", |s| s.block_size = Some(128))).is_ok());
    }

    #[test]
    fn pool_smaller_than_a_block_is_rejected() {
        let e = rejected(pool("tiny", "10.0.0.0/28"));
        assert_eq!(e.field, "blockSize");
    }

    #[test]
    fn unknown_mode_ipip_v6_and_both_encaps_are_rejected() {
        let e = rejected(with("p", "10.0.0.0/16", |s| {
            s.ipip_mode = Some("Sometimes".into())
        }));
        assert_eq!(e.field, "ipipMode");
        assert!(e.reason.contains("Sometimes"));
        let e = rejected(with("p", "10.0.0.0/16", |s| {
            s.vxlan_mode = Some("always".into())
        }));
        assert_eq!(e.field, "vxlanMode");
        let e = rejected(with("p", "10.0.0.0/16", |s| {
            s.ipip_mode = Some("Always".into());
            s.vxlan_mode = Some("CrossSubnet".into());
        }));
        assert_eq!(e.field, "vxlanMode");
        let e = rejected(with("p", "fd00::/48", |s| {
            s.ipip_mode = Some("Always".into())
        }));
        assert_eq!(e.field, "ipipMode");
    }

    #[test]
    fn link_local_and_unaligned_cidrs_are_rejected() {
        assert_eq!(rejected(pool("ll", "169.254.0.0/20")).field, "cidr");
        assert_eq!(rejected(pool("ll6", "fe80::/64")).field, "cidr");
        assert_eq!(rejected(pool("wide", "160.0.0.0/4")).field, "cidr");
        let e = rejected(pool("odd", "10.244.1.0/16"));
        assert_eq!(e.field, "cidr");
        assert!(e.reason.contains("10.244.0.0/16"), "{e}");
        assert_eq!(rejected(pool("junk", "not-a-cidr")).field, "cidr");
    }

    #[test]
    fn bad_selector_and_unknown_use_are_rejected() {
        let e = rejected(with("p", "10.0.0.0/16", |s| {
            s.node_selector = Some("zone = 'a'".into())
        }));
        assert_eq!(e.field, "nodeSelector");
        assert!(e.reason.contains("position 5"), "{e}");
        let e = rejected(with("p", "10.0.0.0/16", |s| {
            s.allowed_uses = Some(vec!["LoadBalancerX".into()])
        }));
        assert_eq!(e.field, "allowedUses");
    }

    #[test]
    fn legacy_fields_are_honoured() {
        let p = Pool::from_resource(&with("p", "10.0.0.0/16", |s| {
            s.ipip = Some(crate::model::LegacyIpip {
                enabled: Some(true),
                mode: Some("cross-subnet".into()),
                ..Default::default()
            });
            s.nat_outgoing_legacy = Some(true);
        }))
        .unwrap();
        assert_eq!(p.ipip_mode, EncapMode::CrossSubnet);
        assert!(p.nat_outgoing);
    }

    #[test]
    fn usage_counts_blocks_allocations_and_unclaimed_space() {
        let set = validate_pools(&[pool("a", "10.0.0.0/24"), pool("b", "fd00::/64")]);
        let mut b1 = crate::block::new_block("10.0.0.0/26".parse().unwrap(), Some("n1"));
        b1.spec.assign(3, "h", &Default::default());
        let b2 = crate::block::new_block("10.0.0.64/26".parse().unwrap(), None);
        let elsewhere = crate::block::new_block("10.9.0.0/26".parse().unwrap(), None);
        let usage = set.usage(&[b1, b2, elsewhere]);
        assert_eq!(
            usage[0],
            PoolUsage {
                pool: "a".into(),
                cidr: "10.0.0.0/24".parse().unwrap(),
                blocks: 2,
                in_use: 3,
                free_in_blocks: 125,
                unclaimed: 128,
            }
        );
        assert_eq!(usage[1].blocks, 0);
        assert_eq!(usage[1].unclaimed, u64::MAX, "2^64 saturates");
    }

    #[test]
    fn overlapping_enabled_pools_keep_the_first_by_name() {
        let set = validate_pools(&[
            pool("b-pool", "10.0.0.0/16"),
            pool("a-pool", "10.0.0.0/8"),
            with("c-disabled", "10.0.0.0/12", |s| s.disabled = Some(true)),
            pool("d-other", "192.168.0.0/16"),
            with("e-bad", "10.0.0.0/16", |s| s.block_size = Some(40)),
        ]);
        let names: Vec<_> = set.valid.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["a-pool", "c-disabled", "d-other"]);
        let bad: Vec<_> = set
            .invalid
            .iter()
            .map(|e| (e.pool.as_str(), e.field))
            .collect();
        assert_eq!(bad, [("b-pool", "cidr"), ("e-bad", "blockSize")]);
        assert!(set.invalid[0].reason.contains("a-pool"));
    }
}
