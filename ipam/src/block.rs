//! Pure (no I/O) operations on one IPAMBlock: assign, release, look up, and the block invariant checker.
//!
//! These mirror Calico's allocation block: `allocations[ordinal]` points into `attributes`,
//! `unallocated` is the ordered free list (assign takes from the front, release appends), identical
//! attributes are shared, unreferenced attributes are compacted away on release, and
//! `sequenceNumber` is bumped on every change.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

use crate::model::{AllocationAttribute, IpamBlock, IpamBlockSpec, block_name, host_affinity};

/// A broken block: the object, and what is inconsistent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("IPAMBlock {block}: {problem}")]
pub struct BlockInvariantError {
    /// Block object name.
    pub block: String,
    /// What is inconsistent, naming the field.
    pub problem: String,
}

/// Number of addresses in a block of this CIDR, if small enough to hold in memory.
fn block_len(cidr: &IpNet) -> Option<usize> {
    let host_bits = u32::from(cidr.max_prefix_len() - cidr.prefix_len());
    // Calico's largest block is /20 or /116: 4096 addresses.
    (host_bits <= 16).then(|| 1usize << host_bits)
}

fn to_u128(addr: IpAddr) -> u128 {
    match addr {
        IpAddr::V4(a) => u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    }
}

/// The address at `ordinal` within `cidr`.
pub fn ordinal_to_ip(cidr: &IpNet, ordinal: u32) -> IpAddr {
    let base = to_u128(cidr.network()) + u128::from(ordinal);
    match cidr {
        // The block is at most /20, so base fits in 32 bits for IPv4.
        IpNet::V4(_) => IpAddr::V4(Ipv4Addr::from(base as u32)),
        IpNet::V6(_) => IpAddr::V6(Ipv6Addr::from(base)),
    }
}

/// The ordinal of `addr` within `cidr`, if inside.
pub fn ip_to_ordinal(cidr: &IpNet, addr: IpAddr) -> Option<u32> {
    if !cidr.contains(&addr) {
        return None;
    }
    u32::try_from(to_u128(addr) - to_u128(cidr.network())).ok()
}

/// A new empty block, optionally affine to a node, in Calico's initial layout.
pub fn new_block(cidr: IpNet, affinity_node: Option<&str>) -> IpamBlock {
    let len = block_len(&cidr).unwrap_or(0);
    IpamBlock::new(
        block_name(&cidr),
        IpamBlockSpec {
            cidr: cidr.to_string(),
            affinity: affinity_node.map(host_affinity),
            allocations: vec![None; len],
            unallocated: (0..len as u32).collect(),
            attributes: Vec::new(),
            deleted: None,
            sequence_number: 0,
            sequence_number_for_allocation: Some(BTreeMap::new()),
            strict_affinity: false,
            extra: Default::default(),
        },
    )
}

/// One released allocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Released {
    /// Ordinal in the block.
    pub ordinal: u32,
    /// Handle that held it, if the attributes named one.
    pub handle_id: Option<String>,
}

impl IpamBlockSpec {
    /// Parsed `cidr`.
    pub fn parsed_cidr(&self) -> Option<IpNet> {
        self.cidr.parse().ok()
    }

    /// Whether Calico marked the block for deletion.
    pub fn is_deleted(&self) -> bool {
        self.deleted == Some(true)
    }

    /// The node this block is affine to (`host:<node>`), if any.
    pub fn affine_node(&self) -> Option<&str> {
        self.affinity.as_deref()?.strip_prefix("host:")
    }

    /// Number of free addresses.
    pub fn free_count(&self) -> usize {
        self.unallocated.len()
    }

    /// Whether nothing is allocated.
    pub fn is_empty(&self) -> bool {
        self.allocations.iter().all(Option::is_none)
    }

    /// Handle ID of the allocation at `ordinal`, if allocated.
    pub fn handle_at(&self, ordinal: u32) -> Option<&str> {
        let idx = (*self.allocations.get(ordinal as usize)?)?;
        self.attributes.get(idx as usize)?.handle_id.as_deref()
    }

    /// Attributes of the allocation at `ordinal`, if allocated.
    pub fn attribute_at(&self, ordinal: u32) -> Option<&AllocationAttribute> {
        let idx = (*self.allocations.get(ordinal as usize)?)?;
        self.attributes.get(idx as usize)
    }

    /// The sequence number recorded when `ordinal` was allocated.
    pub fn sequence_at(&self, ordinal: u32) -> Option<u64> {
        self.sequence_number_for_allocation
            .as_ref()?
            .get(&ordinal.to_string())
            .copied()
    }

    /// Whether any attribute names this handle: a cheap test before [`Self::ordinals_for_handle`].
    pub fn holds_handle(&self, handle_id: &str) -> bool {
        self.attributes
            .iter()
            .any(|a| a.handle_id.as_deref() == Some(handle_id))
    }

    /// Ordinals held by `handle_id`.
    pub fn ordinals_for_handle(&self, handle_id: &str) -> Vec<u32> {
        (0..self.allocations.len() as u32)
            .filter(|o| self.handle_at(*o) == Some(handle_id))
            .collect()
    }

    fn attribute_index(&mut self, handle_id: &str, secondary: &BTreeMap<String, String>) -> u32 {
        let wanted_secondary = (!secondary.is_empty()).then(|| secondary.clone());
        if let Some(i) = self.attributes.iter().position(|a| {
            a.handle_id.as_deref() == Some(handle_id)
                && a.secondary == wanted_secondary
                && a.extra.is_empty()
        }) {
            return i as u32;
        }
        self.attributes.push(AllocationAttribute {
            handle_id: Some(handle_id.to_string()),
            secondary: wanted_secondary,
            extra: Default::default(),
        });
        (self.attributes.len() - 1) as u32
    }

    fn mark_allocated(&mut self, ordinal: u32, attr_index: u32) {
        self.allocations[ordinal as usize] = Some(attr_index);
        let seq = self.sequence_number;
        self.sequence_number_for_allocation
            .get_or_insert_with(BTreeMap::new)
            .insert(ordinal.to_string(), seq);
    }

    /// Takes up to `num` free addresses from the front of the free list for `handle_id`; returns
    /// their ordinals (empty if the block is full).
    pub fn assign(
        &mut self,
        num: usize,
        handle_id: &str,
        secondary: &BTreeMap<String, String>,
    ) -> Vec<u32> {
        let take = num.min(self.unallocated.len());
        if take == 0 {
            return Vec::new();
        }
        let ordinals: Vec<u32> = self.unallocated.drain(..take).collect();
        let idx = self.attribute_index(handle_id, secondary);
        for o in &ordinals {
            self.mark_allocated(*o, idx);
        }
        self.sequence_number += 1;
        ordinals
    }

    /// Assigns one specific ordinal; `Err` carries the current holder's handle if it is taken.
    pub fn assign_ordinal(
        &mut self,
        ordinal: u32,
        handle_id: &str,
        secondary: &BTreeMap<String, String>,
    ) -> Result<(), Option<String>> {
        let Some(pos) = self.unallocated.iter().position(|o| *o == ordinal) else {
            return Err(self.handle_at(ordinal).map(str::to_string));
        };
        self.unallocated.remove(pos);
        let idx = self.attribute_index(handle_id, secondary);
        self.mark_allocated(ordinal, idx);
        self.sequence_number += 1;
        Ok(())
    }

    /// Frees the given ordinals (those not allocated are skipped), compacts attributes, and returns
    /// what was released.
    pub fn release_ordinals(&mut self, ordinals: &[u32]) -> Vec<Released> {
        let mut released = Vec::new();
        let mut seen = BTreeSet::new();
        for &o in ordinals {
            if !seen.insert(o) {
                continue;
            }
            let Some(Some(idx)) = self.allocations.get(o as usize).copied() else {
                continue;
            };
            released.push(Released {
                ordinal: o,
                handle_id: self
                    .attributes
                    .get(idx as usize)
                    .and_then(|a| a.handle_id.clone()),
            });
            self.allocations[o as usize] = None;
            self.unallocated.push(o);
            if let Some(seqs) = self.sequence_number_for_allocation.as_mut() {
                seqs.remove(&o.to_string());
            }
        }
        if !released.is_empty() {
            self.compact_attributes();
            self.sequence_number += 1;
        }
        released
    }

    /// Frees every address held by `handle_id`.
    pub fn release_handle(&mut self, handle_id: &str) -> Vec<Released> {
        let ordinals = self.ordinals_for_handle(handle_id);
        self.release_ordinals(&ordinals)
    }

    /// Frees what the block holds of `handles`, skipping those `keep` names; returns the
    /// handles it freed addresses of (releases carried by an assignment's write).
    pub fn release_carried(
        &mut self,
        handles: &[String],
        keep: impl Fn(&str) -> bool,
    ) -> Vec<String> {
        let carried: Vec<String> = handles
            .iter()
            .filter(|h| !keep(h) && self.holds_handle(h))
            .cloned()
            .collect();
        for h in &carried {
            self.release_handle(h);
        }
        carried
    }

    /// Drops attributes no allocation points to and renumbers the rest.
    fn compact_attributes(&mut self) {
        let mut used = vec![false; self.attributes.len()];
        for idx in self.allocations.iter().flatten() {
            if let Some(u) = used.get_mut(*idx as usize) {
                *u = true;
            }
        }
        if used.iter().all(|u| *u) {
            return;
        }
        let mut remap = vec![0u32; used.len()];
        let mut next = 0u32;
        for (i, u) in used.iter().enumerate() {
            if *u {
                remap[i] = next;
                next += 1;
            }
        }
        let mut i = 0;
        self.attributes.retain(|_| {
            let keep = used[i];
            i += 1;
            keep
        });
        for idx in self.allocations.iter_mut().flatten() {
            if let Some(new) = remap.get(*idx as usize) {
                *idx = *new;
            }
        }
    }

    /// Checks that allocations, unallocated, attributes and sequence numbers agree: every ordinal is
    /// either allocated or on the free list exactly once, every allocation points at an attribute,
    /// every attribute is used, and only allocated ordinals have a sequence number.
    pub fn check_invariants(&self) -> Result<(), BlockInvariantError> {
        let name = self
            .parsed_cidr()
            .map(|c| block_name(&c))
            .unwrap_or_else(|| self.cidr.clone());
        let fail = |problem: String| {
            Err(BlockInvariantError {
                block: name.clone(),
                problem,
            })
        };
        let Some(cidr) = self.parsed_cidr() else {
            return fail(format!("spec.cidr {:?} is not a CIDR", self.cidr));
        };
        if cidr.trunc() != cidr {
            return fail(format!("spec.cidr {cidr} has host bits set"));
        }
        let Some(len) = block_len(&cidr) else {
            return fail(format!("spec.cidr {cidr} is larger than any Calico block"));
        };
        if self.allocations.len() != len {
            return fail(format!(
                "spec.allocations has {} entries, block {cidr} has {len} addresses",
                self.allocations.len()
            ));
        }
        let mut on_free_list = vec![false; len];
        for &o in &self.unallocated {
            let Some(slot) = on_free_list.get_mut(o as usize) else {
                return fail(format!(
                    "spec.unallocated has ordinal {o} outside the block"
                ));
            };
            if *slot {
                return fail(format!("spec.unallocated lists ordinal {o} twice"));
            }
            *slot = true;
        }
        let mut attribute_used = vec![false; self.attributes.len()];
        for (o, alloc) in self.allocations.iter().enumerate() {
            match alloc {
                None if !on_free_list[o] => {
                    return fail(format!(
                        "ordinal {o} is free in spec.allocations but missing from spec.unallocated"
                    ));
                }
                None => {}
                Some(idx) => {
                    if on_free_list[o] {
                        return fail(format!(
                            "ordinal {o} is allocated but also listed in spec.unallocated"
                        ));
                    }
                    let Some(used) = attribute_used.get_mut(*idx as usize) else {
                        return fail(format!(
                            "spec.allocations[{o}] points at attribute {idx}, only {} exist",
                            self.attributes.len()
                        ));
                    };
                    *used = true;
                }
            }
        }
        if let Some(unused) = attribute_used.iter().position(|u| !u) {
            return fail(format!(
                "spec.attributes[{unused}] is not referenced by any allocation"
            ));
        }
        if let Some(seqs) = &self.sequence_number_for_allocation {
            for (key, seq) in seqs {
                let allocated = key
                    .parse::<usize>()
                    .ok()
                    .and_then(|o| self.allocations.get(o))
                    .is_some_and(Option::is_some);
                if !allocated {
                    return fail(format!(
                        "spec.sequenceNumberForAllocation has key {key:?} for an ordinal that is not allocated"
                    ));
                }
                if *seq > self.sequence_number {
                    return fail(format!(
                        "spec.sequenceNumberForAllocation[{key}] = {seq} is ahead of spec.sequenceNumber {}",
                        self.sequence_number
                    ));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attrs(pod: &str) -> BTreeMap<String, String> {
        BTreeMap::from([("pod".to_string(), pod.to_string())])
    }

    fn block29() -> IpamBlockSpec {
        new_block("10.0.0.8/29".parse().unwrap(), Some("n1")).spec
    }

    #[test]
    fn new_block_has_calico_initial_layout() {
        let b = block29();
        assert_eq!(b.allocations, vec![None; 8]);
        assert_eq!(b.unallocated, (0..8).collect::<Vec<_>>());
        assert_eq!(b.affinity.as_deref(), Some("host:n1"));
        assert_eq!(b.affine_node(), Some("n1"));
        b.check_invariants().unwrap();
        let name = new_block("10.244.1.0/26".parse().unwrap(), None)
            .metadata
            .name;
        assert_eq!(name, "10-244-1-0-26");
    }

    #[test]
    fn assign_takes_from_front_and_shares_identical_attributes() {
        let mut b = block29();
        assert_eq!(b.assign(2, "h1", &attrs("p1")), vec![0, 1]);
        assert_eq!(b.assign(1, "h1", &attrs("p1")), vec![2]);
        assert_eq!(b.attributes.len(), 1, "identical attributes are reused");
        assert_eq!(b.assign(1, "h2", &attrs("p2")), vec![3]);
        assert_eq!(b.attributes.len(), 2);
        assert_eq!(b.sequence_number, 3);
        assert_eq!(b.sequence_at(3), Some(2));
        assert_eq!(b.ordinals_for_handle("h1"), vec![0, 1, 2]);
        b.check_invariants().unwrap();
    }

    #[test]
    fn assign_never_exceeds_free_space() {
        let mut b = block29();
        assert_eq!(b.assign(100, "h", &attrs("p")).len(), 8);
        assert!(b.assign(1, "h", &attrs("p")).is_empty());
        assert_eq!(b.free_count(), 0);
        b.check_invariants().unwrap();
    }

    #[test]
    fn release_appends_to_free_list_and_compacts_attributes() {
        let mut b = block29();
        b.assign(1, "h1", &attrs("p1"));
        b.assign(1, "h2", &attrs("p2"));
        b.assign(1, "h3", &attrs("p3"));
        let released = b.release_handle("h2");
        assert_eq!(
            released,
            vec![Released {
                ordinal: 1,
                handle_id: Some("h2".into())
            }]
        );
        assert_eq!(b.unallocated.last(), Some(&1));
        assert_eq!(b.attributes.len(), 2);
        assert_eq!(
            b.handle_at(2),
            Some("h3"),
            "index remapped after compaction"
        );
        assert_eq!(b.sequence_at(1), None);
        b.check_invariants().unwrap();
        assert!(
            b.release_ordinals(&[1, 1, 7]).is_empty(),
            "free ordinals are skipped"
        );
    }

    #[test]
    fn assign_ordinal_reports_the_holder() {
        let mut b = block29();
        b.assign_ordinal(5, "h1", &attrs("p")).unwrap();
        assert_eq!(
            b.assign_ordinal(5, "h2", &attrs("q")),
            Err(Some("h1".into()))
        );
        assert!(!b.unallocated.contains(&5));
        b.check_invariants().unwrap();
    }

    #[test]
    fn ordinal_ip_conversion_round_trips() {
        let c: IpNet = "10.244.1.64/26".parse().unwrap();
        assert_eq!(
            ordinal_to_ip(&c, 3),
            "10.244.1.67".parse::<IpAddr>().unwrap()
        );
        assert_eq!(ip_to_ordinal(&c, "10.244.1.67".parse().unwrap()), Some(3));
        assert_eq!(ip_to_ordinal(&c, "10.244.1.128".parse().unwrap()), None);
        let c6: IpNet = "fd00::40/122".parse().unwrap();
        assert_eq!(
            ordinal_to_ip(&c6, 63),
            "fd00::7f".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn invariant_checker_catches_each_inconsistency() {
        let mut base = block29();
        base.assign(2, "h", &attrs("p"));
        let broken = |f: &dyn Fn(&mut IpamBlockSpec)| {
            let mut b = base.clone();
            f(&mut b);
            b.check_invariants().unwrap_err().problem
        };
        assert!(broken(&|b| b.unallocated.push(0)).contains("also listed"));
        assert!(broken(&|b| b.unallocated.push(7)).contains("twice"));
        assert!(broken(&|b| b.unallocated.push(99)).contains("outside"));
        assert!(
            broken(&|b| {
                b.unallocated.pop();
            })
            .contains("missing from spec.unallocated")
        );
        assert!(broken(&|b| b.allocations[0] = Some(4)).contains("points at attribute"));
        assert!(broken(&|b| b.attributes.push(Default::default())).contains("not referenced"));
        assert!(broken(&|b| b.allocations.push(None)).contains("entries"));
        assert!(
            broken(&|b| {
                b.sequence_number_for_allocation
                    .get_or_insert_default()
                    .insert("6".into(), 0);
            })
            .contains("not allocated")
        );
        assert!(broken(&|b| b.cidr = "10.0.0.9/29".into()).contains("host bits"));
    }
}
