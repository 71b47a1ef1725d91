//! Group commit: several pods' assignments on one node in one block write.
//!
//! A node's pods share its affine block, and the block is one object written with
//! compare-and-swap: assignments written one after another pay a round trip each, and written
//! at the same time they only make each other's write fail. Requests that arrive together (a
//! node's pods restarting after a reboot, a scale-up) are instead written as one: one block
//! write holding every new allocation, beside one handle create per pod.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;
use tracing::{Instrument, debug, debug_span, warn};

use super::{Assigned, AutoAssignRequest, Ipam, IpamError};
use crate::block::ordinal_to_ip;
use crate::model::{AffinityState, IpamBlock, IpamHandle, block_name, handle_name};
use crate::pool::AllowedUse;
use crate::store::{Store, StoreError};

/// What [`Ipam::assign_once_batch`] did.
#[derive(Debug, Default)]
pub struct BatchAssigned {
    /// One result per request, in the requests' order.
    pub results: Vec<Result<Assigned, IpamError>>,
    /// Handles of the batch's `release_with` whose addresses were all released, as
    /// [`Assigned::released`].
    pub released: Vec<String>,
}

/// What every group write of one batch shares.
struct Batch<'a> {
    reqs: &'a [AutoAssignRequest],
    release_with: &'a [String],
    /// Every request's handle: none of them is released by the batch's writes.
    assigning: BTreeSet<&'a str>,
}

/// What one group write did.
struct GroupWrite {
    /// Requests answered, by index.
    done: Vec<(usize, Result<Assigned, IpamError>)>,
    /// Requests that were in the write (answered, or left to the one-by-one path).
    tried: Vec<usize>,
    /// Handles of `release_with` released in the write.
    released: Vec<String>,
}

/// One request of a group, with what the block write gave it.
struct Member<'a> {
    index: usize,
    req: &'a AutoAssignRequest,
    want: usize,
    ordinals: Vec<u32>,
}

impl<S: Store> Ipam<S> {
    /// [`Ipam::assign_once`] for several requests at once. Single-family requests of one node
    /// that fit together in one of its affine blocks get their addresses in one block write;
    /// the others (and all of them if the block has no room) are served one by one, as
    /// [`Ipam::assign_once`] would. `release_with` applies to the whole batch (each request's
    /// own is ignored).
    pub async fn assign_once_batch(
        &self,
        reqs: &[AutoAssignRequest],
        release_with: &[String],
    ) -> BatchAssigned {
        let span = debug_span!("assign_once_batch", n = reqs.len());
        self.assign_once_batch_inner(reqs, release_with)
            .instrument(span)
            .await
    }

    async fn assign_once_batch_inner(
        &self,
        reqs: &[AutoAssignRequest],
        release_with: &[String],
    ) -> BatchAssigned {
        if let [only] = reqs {
            // `assign_once` checked its report already.
            let mut released = BTreeSet::new();
            let result = self.serve_alone(only, release_with, &mut released).await;
            return BatchAssigned {
                results: vec![result],
                released: released.into_iter().collect(),
            };
        }
        let mut results: Vec<Option<Result<Assigned, IpamError>>> =
            reqs.iter().map(|_| None).collect();
        let mut touched: BTreeSet<String> = BTreeSet::new();
        // No request's own handle is released by a write of this batch, whichever writes it.
        let batch = Batch {
            reqs,
            release_with,
            assigning: reqs.iter().map(|r| r.handle_id.as_str()).collect(),
        };
        for fam in [4u8, 6u8] {
            let mut left = group_of(reqs, fam);
            // Every round serves at least one request: bounded by the batch's size.
            while left.len() >= 2 {
                match self.commit_group(&batch, &left, fam).await {
                    Ok(Some(group)) => {
                        touched.extend(group.released);
                        for (i, r) in group.done {
                            results[i] = Some(r);
                        }
                        // Members that did not get theirs here (a retried ADD) go one by one.
                        left.retain(|i| !group.tried.contains(i));
                        continue;
                    }
                    Ok(None) => debug!(fam, n = left.len(), "no room to commit together"),
                    // A write of unknown outcome: the members' handles stay and count what
                    // landed, which the one-by-one path returns; members whose create failed
                    // had their new addresses given back.
                    Err(e) => {
                        debug!(fam, n = left.len(), "group commit failed ({e}); one by one");
                        break;
                    }
                }
                // No affine block with room: the first one on its own (it claims a block or
                // borrows), then the others try together again.
                let i = left.remove(0);
                results[i] = Some(self.serve_alone(&reqs[i], release_with, &mut touched).await);
            }
        }
        for (i, slot) in results.iter_mut().enumerate() {
            if slot.is_none() {
                *slot = Some(self.serve_alone(&reqs[i], release_with, &mut touched).await);
            }
        }
        let released = self.fully_released(touched).await;
        BatchAssigned {
            results: results
                .into_iter()
                .map(|r| r.unwrap_or_else(|| Err(IpamError::InvalidRequest("not served".into()))))
                .collect(),
            released,
        }
    }

    /// [`Ipam::assign_once`] for one request of a batch, noting the releases it carried.
    async fn serve_alone(
        &self,
        req: &AutoAssignRequest,
        release_with: &[String],
        touched: &mut BTreeSet<String>,
    ) -> Result<Assigned, IpamError> {
        let req = AutoAssignRequest {
            release_with: release_with.to_vec(),
            ..req.clone()
        };
        let r = self.assign_once(&req).await;
        if let Ok(a) = &r {
            touched.extend(a.released.iter().cloned());
        }
        r
    }

    /// Writes the group's addresses into the first of the node's affine blocks with room for
    /// at least its first member (as many members as fit, in order; the rest are left to the
    /// one-by-one path); `None` if none has.
    async fn commit_group(
        &self,
        batch: &Batch<'_>,
        group: &[usize],
        fam: u8,
    ) -> Result<Option<GroupWrite>, IpamError> {
        let first = &batch.reqs[group[0]];
        let pools = self.pools().await?;
        let in_candidates = |cidr: &IpNet| {
            pools.valid.iter().any(|p| {
                p.family() == fam
                    && p.usable_for(AllowedUse::Workload, &first.node_labels)
                    && p.cidr.contains(&cidr.network())
            })
        };
        let affine = self.host_affinities(&first.node, fam).await?;
        for cidr in affine
            .iter()
            .filter(|(_, st)| *st == AffinityState::Confirmed)
            .map(|(c, _)| c)
            .filter(|c| in_candidates(c))
        {
            if let Some(done) = self.write_group(cidr, batch, group, fam).await? {
                return Ok(Some(done));
            }
        }
        Ok(None)
    }

    /// One block write for as many members of the group as the block has room for (CAS loop),
    /// their handles created beside it; `None` if the block is gone, no longer the node's,
    /// corrupt, or has no room for the first member.
    async fn write_group(
        &self,
        cidr: &IpNet,
        batch: &Batch<'_>,
        group: &[usize],
        fam: u8,
    ) -> Result<Option<GroupWrite>, IpamError> {
        let name = block_name(cidr);
        let node = &batch.reqs[group[0]].node;
        let mut cas = self.cas_retry::<IpamBlock>(&name);
        loop {
            cas.attempt()?;
            let mut block = match self.store.get::<IpamBlock>(&name).await {
                Ok(b) if !b.spec.is_deleted() => b,
                Ok(_) | Err(StoreError::NotFound { .. }) => return Ok(None),
                Err(e) => return Err(e.into()),
            };
            if block.spec.affine_node() != Some(node.as_str()) {
                return Ok(None);
            }
            if let Err(e) = block.spec.check_invariants() {
                warn!(block = %name, "skipping corrupt block: {e}");
                return Ok(None);
            }
            let releasing = block
                .spec
                .release_carried(batch.release_with, |h| batch.assigning.contains(h));
            let mut room = block.spec.free_count();
            let mut members: Vec<Member<'_>> = group
                .iter()
                .map(|i| {
                    let req = &batch.reqs[*i];
                    let want = if fam == 4 { req.num_v4 } else { req.num_v6 };
                    Member {
                        index: *i,
                        req,
                        want,
                        ordinals: Vec::new(),
                    }
                })
                .take_while(|m| {
                    let fits = m.want <= room;
                    room = room.saturating_sub(m.want);
                    fits
                })
                .collect();
            if members.is_empty() {
                return Ok(None);
            }
            for m in &mut members {
                m.ordinals = block
                    .spec
                    .assign(m.want, &m.req.handle_id, &m.req.attributes);
            }
            let creates = futures_util::future::join_all(
                members
                    .iter()
                    .map(|m| self.create_handle(&m.req.handle_id, cidr, m.ordinals.len() as i64)),
            );
            let (written, created) =
                futures_util::future::join(self.store.update(&block), creates).await;
            match written {
                Ok(_) => {
                    let tried = members.iter().map(|m| m.index).collect();
                    let done = self.finish_group(cidr, fam, members, created).await;
                    return Ok(Some(GroupWrite {
                        done,
                        tried,
                        released: releasing,
                    }));
                }
                Err(e @ (StoreError::Conflict { .. } | StoreError::NotFound { .. })) => {
                    // The block write definitely failed: the handles just made go again.
                    self.drop_new_handles(&members, &created).await?;
                    if matches!(e, StoreError::NotFound { .. }) {
                        return Ok(None);
                    }
                    cas.back_off().await;
                }
                // The write may have landed: the handles created stay and count it (the
                // one-by-one path returns what they hold); a member whose create failed
                // (a retried ADD's existing handle) gets its new addresses given back, which
                // changes nothing if the write did not land.
                Err(other) => {
                    let undo = members
                        .into_iter()
                        .zip(&created)
                        .filter(|(_, c)| c.is_err())
                        .map(|(m, _)| (m.req.handle_id.clone(), m.ordinals.into_iter().collect()))
                        .collect();
                    self.give_back(cidr, undo).await;
                    return Err(other.into());
                }
            }
        }
    }

    /// After the group's block write landed: members whose handle was created have their
    /// addresses; a member whose handle existed already (a retried ADD) or failed gives its
    /// new addresses back and is left out (served one by one) or fails.
    async fn finish_group(
        &self,
        cidr: &IpNet,
        fam: u8,
        members: Vec<Member<'_>>,
        created: Vec<Result<(), IpamError>>,
    ) -> Vec<(usize, Result<Assigned, IpamError>)> {
        let mut done = Vec::new();
        let mut undo: BTreeMap<String, BTreeSet<u32>> = BTreeMap::new();
        for (m, c) in members.into_iter().zip(created) {
            match c {
                Ok(()) => {
                    let ips: Vec<IpAddr> =
                        m.ordinals.iter().map(|o| ordinal_to_ip(cidr, *o)).collect();
                    let assigned = if fam == 4 {
                        Assigned {
                            ipv4: ips,
                            ..Assigned::default()
                        }
                    } else {
                        Assigned {
                            ipv6: ips,
                            ..Assigned::default()
                        }
                    };
                    done.push((m.index, Ok(assigned)));
                }
                Err(e) => {
                    undo.insert(m.req.handle_id.clone(), m.ordinals.into_iter().collect());
                    if !matches!(e, IpamError::HandleExists { .. }) {
                        done.push((m.index, Err(e)));
                    }
                }
            }
        }
        self.give_back(cidr, undo).await;
        done
    }

    /// Releases exactly the ordinals just written under each handle (it may hold others), best
    /// effort: what stays is under its handle's ID in the block, where a release by handle
    /// (the pod's DEL) finds it.
    async fn give_back(&self, cidr: &IpNet, undo: BTreeMap<String, BTreeSet<u32>>) {
        if undo.is_empty() {
            return;
        }
        let undone = self
            .release_in_block(
                cidr,
                |b| {
                    undo.iter()
                        .flat_map(|(h, ords)| {
                            ords.iter()
                                .copied()
                                .filter(|o| b.handle_at(*o) == Some(h.as_str()))
                        })
                        .collect()
                },
                true,
            )
            .await;
        if let Err(e) = undone {
            warn!(
                block = %cidr,
                handles = ?undo.keys().collect::<Vec<_>>(),
                "could not give back addresses of a group write ({e}); \
                 the pods' DELs or the leak collector will free them"
            );
        }
    }

    /// Deletes the handles a failed group write created.
    async fn drop_new_handles(
        &self,
        members: &[Member<'_>],
        created: &[Result<(), IpamError>],
    ) -> Result<(), IpamError> {
        let names: Vec<String> = members
            .iter()
            .zip(created)
            .filter(|(_, c)| c.is_ok())
            .map(|(m, _)| handle_name(&m.req.handle_id))
            .collect();
        let takes =
            futures_util::future::join_all(names.iter().map(|n| self.store.take::<IpamHandle>(n)));
        for taken in takes.await {
            match taken {
                Ok(_) | Err(StoreError::NotFound { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }
}

/// Indices of the requests that can be committed together for family `fam`: one family only,
/// the first request's node and labels, any workload pool, each handle once.
fn group_of(reqs: &[AutoAssignRequest], fam: u8) -> Vec<usize> {
    let Some(first) = reqs.first() else {
        return Vec::new();
    };
    let mut seen = BTreeSet::new();
    let duplicated: BTreeSet<&str> = reqs
        .iter()
        .filter(|r| !seen.insert(r.handle_id.as_str()))
        .map(|r| r.handle_id.as_str())
        .collect();
    reqs.iter()
        .enumerate()
        .filter(|(_, r)| {
            let (this, other) = if fam == 4 {
                (r.num_v4, r.num_v6)
            } else {
                (r.num_v6, r.num_v4)
            };
            this > 0
                && other == 0
                && !r.handle_id.is_empty()
                && !r.node.is_empty()
                && r.node == first.node
                && r.node_labels == first.node_labels
                && r.pools.is_empty()
                && matches!(r.use_, None | Some(AllowedUse::Workload))
                && !duplicated.contains(r.handle_id.as_str())
        })
        .map(|(i, _)| i)
        .collect()
}
