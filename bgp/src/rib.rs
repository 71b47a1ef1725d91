//! Routing information bases without I/O: Adj-RIB-In per peer, Loc-RIB with the decision
//! process, Adj-RIB-Out per peer with iBGP split horizon and route reflection (RFC 4456),
//! and graceful-restart stale handling (RFC 4724).
//!
//! Route attributes are interned: every distinct [`RouteAttrs`] exists once behind an `Arc`,
//! so a route costs a prefix, a peer index and a pointer.

use crate::wire::{Afi, NextHop, Origin, PathAttributes, Update};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use smallvec::SmallVec;
use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

/// LOCAL_PREF assumed when none is carried (RFC 4271 leaves it to policy; 100 is universal).
pub const DEFAULT_LOCAL_PREF: u32 = 100;

/// Attributes of a route as stored: next hop plus path attributes (with `next_hop` unset).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RouteAttrs {
    /// Next hop. Unspecified (0.0.0.0 / ::) for locally originated routes, meaning "self".
    pub next_hop: NextHop,
    /// Path attributes.
    pub path: PathAttributes,
}

/// Speaker-wide settings the RIB needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RibConfig {
    /// Our AS.
    pub local_as: u32,
    /// Our BGP identifier.
    pub router_id: Ipv4Addr,
    /// Cluster ID used when reflecting (RFC 4456 §7); usually the router id.
    pub cluster_id: Ipv4Addr,
}

/// Per-peer settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerSettings {
    /// Peer's AS: equal to ours means iBGP.
    pub remote_as: u32,
    /// The peer is our route-reflector client.
    pub route_reflector_client: bool,
    /// Send this peer only routes we originate: a Kubernetes node is no transit for other
    /// nodes' blocks towards an external router, which learns each block from its owner.
    pub export_local_only: bool,
}

/// Per-session facts the RIB needs while a peer is Established.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerSession {
    /// Peer's BGP identifier (ORIGINATOR_ID when reflecting, tie-breaker in best path).
    pub remote_id: Ipv4Addr,
    /// Families negotiated.
    pub families: Vec<Afi>,
    /// Our IPv4 address for "next hop self".
    pub next_hop_v4: Option<Ipv4Addr>,
    /// Our IPv6 address for "next hop self".
    pub next_hop_v6: Option<Ipv6Addr>,
}

/// A change of best path in the Loc-RIB.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BestChange {
    /// The prefix.
    pub prefix: IpNet,
    /// The new best path, or `None` if the prefix became unreachable.
    pub best: Option<BestPath>,
}

/// The selected route for a prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BestPath {
    /// Peer it was learned from; `None` for locally originated routes.
    pub from: Option<IpAddr>,
    /// Attributes (next hop included).
    pub attrs: Arc<RouteAttrs>,
}

/// One entry for a peer's outbound queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutChange {
    /// Announce `prefix` with these attributes (next hop already resolved for this peer).
    Announce(IpNet, Arc<RouteAttrs>),
    /// Withdraw `prefix`.
    Withdraw(IpNet),
    /// Send End-of-RIB for this family (RFC 4724).
    EndOfRib(Afi),
}

/// Everything an operation changed.
#[derive(Debug, Default)]
pub struct RibOutput {
    /// Loc-RIB best-path changes.
    pub best: Vec<BestChange>,
    /// Per-peer outbound changes, in order.
    pub out: Vec<(IpAddr, Vec<OutChange>)>,
}

/// Counters for one peer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PeerCounts {
    /// Prefixes in Adj-RIB-In.
    pub received: u64,
    /// Of those, prefixes that passed the import checks.
    pub accepted: u64,
    /// Prefixes in Adj-RIB-Out.
    pub advertised: u64,
}

/// What an UPDATE did to a peer's Adj-RIB-In (for the caller's logs and counters).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ImportSummary {
    /// Prefixes announced and accepted.
    pub accepted: usize,
    /// Prefixes announced but rejected by loop checks.
    pub rejected: usize,
    /// Prefixes withdrawn (including treat-as-withdraw).
    pub withdrawn: usize,
}

const LOCAL: u32 = u32::MAX;

#[derive(Debug, Clone)]
struct Candidate {
    source: u32,
    attrs: Arc<RouteAttrs>,
}

/// Routes for one prefix. Invariant: when non-empty, `candidates[0]` is the best path
/// (kept there after each decision), which saves storing the best separately.
#[derive(Debug, Default)]
struct LocEntry {
    candidates: SmallVec<[Candidate; 1]>,
}

impl LocEntry {
    fn best(&self) -> Option<&Candidate> {
        self.candidates.first()
    }
}

/// Multiply-rotate hasher for prefix-keyed tables. Keys come from configured peers, not
/// from anonymous clients, so speed matters more here than hash-flooding resistance.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct PrefixHasher(u64);

const HASH_K: u64 = 0x517c_c1b7_2722_0a95;

impl PrefixHasher {
    #[inline]
    fn add(&mut self, v: u64) {
        self.0 = (self.0.rotate_left(5) ^ v).wrapping_mul(HASH_K);
    }
}

impl std::hash::Hasher for PrefixHasher {
    #[inline]
    fn finish(&self) -> u64 {
        let x = self.0 ^ (self.0 >> 29);
        x.wrapping_mul(0xbf58_476d_1ce4_e5b9) ^ (x >> 32)
    }
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let mut word = [0u8; 8];
            word.copy_from_slice(c);
            self.add(u64::from_le_bytes(word));
        }
        for b in chunks.remainder() {
            self.add(u64::from(*b));
        }
    }
    #[inline]
    fn write_u8(&mut self, i: u8) {
        self.add(i.into());
    }
    #[inline]
    fn write_u16(&mut self, i: u16) {
        self.add(i.into());
    }
    #[inline]
    fn write_u32(&mut self, i: u32) {
        self.add(i.into());
    }
    #[inline]
    fn write_u64(&mut self, i: u64) {
        self.add(i);
    }
    #[inline]
    fn write_u128(&mut self, i: u128) {
        self.add(i as u64);
        self.add((i >> 64) as u64);
    }
    #[inline]
    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }
}

type FastMap<K, V> = HashMap<K, V, std::hash::BuildHasherDefault<PrefixHasher>>;

/// A prefix-keyed map split by family: an IPv4 key takes 5 octets instead of the 18 of
/// `IpNet`, which is most of the per-route memory in IPv4-heavy tables.
#[derive(Debug)]
struct PrefixMap<V> {
    v4: FastMap<Ipv4Net, V>,
    v6: FastMap<Ipv6Net, V>,
}

impl<V> Default for PrefixMap<V> {
    fn default() -> Self {
        PrefixMap {
            v4: FastMap::default(),
            v6: FastMap::default(),
        }
    }
}

impl<V> PrefixMap<V> {
    fn len(&self) -> usize {
        self.v4.len() + self.v6.len()
    }
    fn get(&self, prefix: &IpNet) -> Option<&V> {
        match prefix {
            IpNet::V4(p) => self.v4.get(p),
            IpNet::V6(p) => self.v6.get(p),
        }
    }
    fn get_mut(&mut self, prefix: &IpNet) -> Option<&mut V> {
        match prefix {
            IpNet::V4(p) => self.v4.get_mut(p),
            IpNet::V6(p) => self.v6.get_mut(p),
        }
    }
    fn insert(&mut self, prefix: IpNet, value: V) -> Option<V> {
        match prefix {
            IpNet::V4(p) => self.v4.insert(p, value),
            IpNet::V6(p) => self.v6.insert(p, value),
        }
    }
    fn remove(&mut self, prefix: &IpNet) -> Option<V> {
        match prefix {
            IpNet::V4(p) => self.v4.remove(p),
            IpNet::V6(p) => self.v6.remove(p),
        }
    }
    fn get_or_default(&mut self, prefix: IpNet) -> &mut V
    where
        V: Default,
    {
        match prefix {
            IpNet::V4(p) => self.v4.entry(p).or_default(),
            IpNet::V6(p) => self.v6.entry(p).or_default(),
        }
    }
    fn clear(&mut self) {
        self.v4.clear();
        self.v6.clear();
    }
    fn values(&self) -> impl Iterator<Item = &V> {
        self.v4.values().chain(self.v6.values())
    }
    fn iter(&self) -> impl Iterator<Item = (IpNet, &V)> {
        self.v4
            .iter()
            .map(|(p, v)| (IpNet::V4(*p), v))
            .chain(self.v6.iter().map(|(p, v)| (IpNet::V6(*p), v)))
    }
    fn retain(&mut self, mut keep: impl FnMut(&IpNet, &mut V) -> bool) {
        self.v4.retain(|p, v| keep(&IpNet::V4(*p), v));
        self.v6.retain(|p, v| keep(&IpNet::V6(*p), v));
    }
}

#[derive(Debug, Clone)]
struct InRoute {
    attrs: Arc<RouteAttrs>,
    accepted: bool,
    stale: bool,
}

#[derive(Debug)]
struct PeerState {
    address: IpAddr,
    settings: PeerSettings,
    session: Option<PeerSession>,
    adj_in: PrefixMap<InRoute>,
    accepted: u64,
    adj_out: PrefixMap<Arc<RouteAttrs>>,
}

/// The speaker's RIBs.
#[derive(Debug)]
pub struct Rib {
    config: RibConfig,
    peers: Vec<Option<PeerState>>,
    index: HashMap<IpAddr, u32>,
    loc: PrefixMap<LocEntry>,
    interned: HashSet<Arc<RouteAttrs>>,
    interned_after_gc: usize,
}

fn family(prefix: &IpNet) -> Afi {
    match prefix {
        IpNet::V4(_) => Afi::Ipv4,
        IpNet::V6(_) => Afi::Ipv6,
    }
}

/// Output being collected during one operation, plus a memo of export results: within one
/// operation sessions do not change, so equal (target, source, attributes, family) export
/// to equal attributes. The memo holds the source `Arc`, so its address cannot be reused.
struct Pending {
    best: Vec<BestChange>,
    out: FastMap<u32, Vec<OutChange>>,
    order: Vec<u32>,
    export_memo: ExportMemo,
}

/// (target, source, source attributes address, family) → (source attributes, export result).
type ExportMemo = FastMap<(u32, u32, usize, Afi), (Arc<RouteAttrs>, Option<Arc<RouteAttrs>>)>;

impl Pending {
    fn new() -> Self {
        Pending {
            best: Vec::new(),
            out: FastMap::default(),
            order: Vec::new(),
            export_memo: ExportMemo::default(),
        }
    }
    fn push(&mut self, peer: u32, change: OutChange) {
        self.out
            .entry(peer)
            .or_insert_with(|| {
                self.order.push(peer);
                Vec::new()
            })
            .push(change);
    }
}

impl Rib {
    /// An empty RIB.
    pub fn new(config: RibConfig) -> Self {
        Rib {
            config,
            peers: Vec::new(),
            index: HashMap::new(),
            loc: PrefixMap::default(),
            interned: HashSet::new(),
            interned_after_gc: 0,
        }
    }

    /// Settings.
    pub fn config(&self) -> &RibConfig {
        &self.config
    }

    /// Intern attributes: equal attributes share one allocation.
    pub fn intern(&mut self, attrs: RouteAttrs) -> Arc<RouteAttrs> {
        if let Some(existing) = self.interned.get(&attrs) {
            return existing.clone();
        }
        let arc = Arc::new(attrs);
        self.interned.insert(arc.clone());
        arc
    }

    /// Number of distinct attribute sets held.
    pub fn interned_count(&self) -> usize {
        self.interned.len()
    }

    fn maybe_gc(&mut self) {
        if self.interned.len() > 2 * self.interned_after_gc + 64 {
            self.interned.retain(|a| Arc::strong_count(a) > 1);
            self.interned_after_gc = self.interned.len();
        }
    }

    /// Register a peer (no routes until it comes up).
    pub fn add_peer(&mut self, address: IpAddr, settings: PeerSettings) {
        if let Some(idx) = self.index.get(&address)
            && let Some(Some(p)) = self.peers.get_mut(*idx as usize)
        {
            p.settings = settings;
            return;
        }
        let state = PeerState {
            address,
            settings,
            session: None,
            adj_in: PrefixMap::default(),
            accepted: 0,
            adj_out: PrefixMap::default(),
        };
        let idx = match self.peers.iter().position(Option::is_none) {
            Some(free) => {
                self.peers[free] = Some(state);
                free
            }
            None => {
                self.peers.push(Some(state));
                self.peers.len() - 1
            }
        };
        self.index.insert(address, idx as u32);
    }

    /// Forget a peer and every route learned from it.
    pub fn remove_peer(&mut self, address: IpAddr) -> RibOutput {
        let out = self.peer_down(address, &[]);
        if let Some(idx) = self.index.remove(&address) {
            self.peers[idx as usize] = None;
        }
        out
    }

    fn peer(&self, idx: u32) -> Option<&PeerState> {
        self.peers.get(idx as usize).and_then(Option::as_ref)
    }

    /// Counters for a peer.
    pub fn peer_counts(&self, address: IpAddr) -> Option<PeerCounts> {
        let p = self.peer(*self.index.get(&address)?)?;
        Some(PeerCounts {
            received: p.adj_in.len() as u64,
            accepted: p.accepted,
            advertised: p.adj_out.len() as u64,
        })
    }

    /// Number of prefixes with a best path.
    pub fn loc_rib_len(&self) -> usize {
        self.loc.values().filter(|e| e.best().is_some()).count()
    }

    /// Best path for a prefix.
    pub fn best(&self, prefix: &IpNet) -> Option<BestPath> {
        let best = self.loc.get(prefix)?.best()?;
        Some(self.best_path(best))
    }

    /// Every prefix with its best path.
    pub fn best_paths(&self) -> Vec<(IpNet, BestPath)> {
        self.loc
            .iter()
            .filter_map(|(p, e)| Some((p, self.best_path(e.best()?))))
            .collect()
    }

    /// A peer's Adj-RIB-In: prefix, attributes, accepted by import checks, stale.
    pub fn adj_rib_in(&self, address: IpAddr) -> Vec<(IpNet, Arc<RouteAttrs>, bool, bool)> {
        self.index
            .get(&address)
            .and_then(|i| self.peer(*i))
            .map(|p| {
                p.adj_in
                    .iter()
                    .map(|(prefix, r)| (prefix, r.attrs.clone(), r.accepted, r.stale))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// A peer's Adj-RIB-Out.
    pub fn adj_rib_out(&self, address: IpAddr) -> Vec<(IpNet, Arc<RouteAttrs>)> {
        self.index
            .get(&address)
            .and_then(|i| self.peer(*i))
            .map(|p| p.adj_out.iter().map(|(k, v)| (k, v.clone())).collect())
            .unwrap_or_default()
    }

    /// Prefixes a peer has marked stale (graceful restart).
    pub fn stale_count(&self, address: IpAddr) -> usize {
        self.index
            .get(&address)
            .and_then(|i| self.peer(*i))
            .map_or(0, |p| p.adj_in.values().filter(|r| r.stale).count())
    }

    fn best_path(&self, c: &Candidate) -> BestPath {
        BestPath {
            from: (c.source != LOCAL)
                .then(|| self.peer(c.source).map(|p| p.address))
                .flatten(),
            attrs: c.attrs.clone(),
        }
    }

    fn finish(&mut self, pending: Pending) -> RibOutput {
        let mut out_map = pending.out;
        let out = pending
            .order
            .into_iter()
            .filter_map(|idx| {
                let changes = out_map.remove(&idx)?;
                Some((self.peer(idx)?.address, changes))
            })
            .collect();
        self.maybe_gc();
        RibOutput {
            best: pending.best,
            out,
        }
    }

    /// Originate a prefix locally (next hop self towards every peer).
    pub fn originate(&mut self, prefix: IpNet) -> RibOutput {
        let next_hop = match prefix {
            IpNet::V4(_) => NextHop::V4(Ipv4Addr::UNSPECIFIED),
            IpNet::V6(_) => NextHop::V6 {
                global: Ipv6Addr::UNSPECIFIED,
                link_local: None,
            },
        };
        let attrs = self.intern(RouteAttrs {
            next_hop,
            path: PathAttributes {
                origin: Some(Origin::Igp),
                ..PathAttributes::default()
            },
        });
        let mut pending = Pending::new();
        self.set_candidate(prefix, LOCAL, Some(attrs), &mut pending);
        self.finish(pending)
    }

    /// Stop originating a prefix.
    pub fn withdraw_local(&mut self, prefix: IpNet) -> RibOutput {
        let mut pending = Pending::new();
        self.set_candidate(prefix, LOCAL, None, &mut pending);
        self.finish(pending)
    }

    /// A peer reached Established: dump the Loc-RIB to it, followed by End-of-RIB per family.
    pub fn peer_up(&mut self, address: IpAddr, session: PeerSession) -> RibOutput {
        let mut pending = Pending::new();
        let Some(&idx) = self.index.get(&address) else {
            return self.finish(pending);
        };
        let families = session.families.clone();
        if let Some(Some(p)) = self.peers.get_mut(idx as usize) {
            p.session = Some(session);
            p.adj_out.clear();
        }
        let bests: Vec<(IpNet, Candidate)> = self
            .loc
            .iter()
            .filter_map(|(p, e)| Some((p, e.best()?.clone())))
            .collect();
        for (prefix, best) in bests {
            self.export_to(idx, prefix, Some(&best), &mut pending);
        }
        for afi in families {
            pending.push(idx, OutChange::EndOfRib(afi));
        }
        self.finish(pending)
    }

    /// A peer left Established. Routes of `keep_stale` families are kept and marked stale
    /// (graceful restart helper); all others are removed.
    pub fn peer_down(&mut self, address: IpAddr, keep_stale: &[Afi]) -> RibOutput {
        let mut pending = Pending::new();
        let Some(&idx) = self.index.get(&address) else {
            return self.finish(pending);
        };
        let mut removed = Vec::new();
        if let Some(Some(p)) = self.peers.get_mut(idx as usize) {
            p.session = None;
            p.adj_out.clear();
            let mut accepted_removed = 0;
            p.adj_in.retain(|prefix, route| {
                if keep_stale.contains(&family(prefix)) {
                    route.stale = true;
                    true
                } else {
                    removed.push(*prefix);
                    accepted_removed += u64::from(route.accepted);
                    false
                }
            });
            p.accepted -= accepted_removed;
        }
        for prefix in removed {
            self.set_candidate(prefix, idx, None, &mut pending);
        }
        self.finish(pending)
    }

    /// Remove a peer's stale routes (of one family, or all): on End-of-RIB or when the
    /// restart timer runs out.
    pub fn sweep_stale(&mut self, address: IpAddr, only: Option<Afi>) -> RibOutput {
        let mut pending = Pending::new();
        let Some(&idx) = self.index.get(&address) else {
            return self.finish(pending);
        };
        let mut removed = Vec::new();
        if let Some(Some(p)) = self.peers.get_mut(idx as usize) {
            let mut accepted_removed = 0;
            p.adj_in.retain(|prefix, route| {
                let sweep = route.stale && only.is_none_or(|afi| afi == family(prefix));
                if sweep {
                    removed.push(*prefix);
                    accepted_removed += u64::from(route.accepted);
                }
                !sweep
            });
            p.accepted -= accepted_removed;
        }
        for prefix in removed {
            self.set_candidate(prefix, idx, None, &mut pending);
        }
        self.finish(pending)
    }

    /// The whole Adj-RIB-Out of a peer, for a ROUTE-REFRESH request.
    pub fn refresh(&self, address: IpAddr, afi: Afi) -> Vec<OutChange> {
        let Some(p) = self.index.get(&address).and_then(|i| self.peer(*i)) else {
            return Vec::new();
        };
        p.adj_out
            .iter()
            .filter(|(prefix, _)| family(prefix) == afi)
            .map(|(prefix, attrs)| OutChange::Announce(prefix, attrs.clone()))
            .collect()
    }

    /// Apply a received UPDATE (already decoded, RFC 7606 outcome included).
    pub fn apply_update(&mut self, address: IpAddr, update: &Update) -> (RibOutput, ImportSummary) {
        let mut pending = Pending::new();
        let mut summary = ImportSummary::default();
        let Some(&idx) = self.index.get(&address) else {
            return (self.finish(pending), summary);
        };
        let Some(peer) = self.peer(idx) else {
            return (self.finish(pending), summary);
        };
        let peer_as = peer.settings.remote_as;
        let ebgp = peer_as != self.config.local_as;

        let mut withdrawn: Vec<IpNet> = update.withdrawn.iter().map(|p| IpNet::V4(*p)).collect();
        if let Some(u) = &update.mp_unreach {
            withdrawn.extend(u.withdrawn.iter().copied());
        }
        let treat_as_withdraw = update.outcome.treat_as_withdraw.is_some();
        let mut announced: Vec<(IpNet, NextHop)> = Vec::new();
        if let Some(nh) = update.attributes.next_hop {
            announced.extend(update.nlri.iter().map(|p| (IpNet::V4(*p), NextHop::V4(nh))));
        } else {
            withdrawn.extend(update.nlri.iter().map(|p| IpNet::V4(*p)));
        }
        if let Some(r) = &update.mp_reach {
            announced.extend(r.nlri.iter().map(|p| (*p, r.next_hop)));
        }
        if treat_as_withdraw {
            withdrawn.extend(announced.drain(..).map(|(p, _)| p));
        }
        for prefix in withdrawn {
            let removed = self.peers[idx as usize]
                .as_mut()
                .and_then(|p| {
                    let r = p.adj_in.remove(&prefix)?;
                    p.accepted -= u64::from(r.accepted);
                    Some(r)
                })
                .is_some();
            if removed {
                summary.withdrawn += 1;
                self.set_candidate(prefix, idx, None, &mut pending);
            }
        }
        if announced.is_empty() {
            return (self.finish(pending), summary);
        }

        let mut path = update.attributes.clone();
        path.next_hop = None;
        if ebgp {
            // RFC 7606 §7.5: LOCAL_PREF from an external peer is discarded.
            path.local_pref = None;
        }
        let accepted = self.import_allowed(&path, ebgp, peer_as);
        let mut last: Option<(NextHop, Arc<RouteAttrs>)> = None;
        for (prefix, next_hop) in announced {
            let attrs = match &last {
                Some((nh, a)) if *nh == next_hop => a.clone(),
                _ => {
                    let a = self.intern(RouteAttrs {
                        next_hop,
                        path: path.clone(),
                    });
                    last = Some((next_hop, a.clone()));
                    a
                }
            };
            if let Some(p) = self.peers[idx as usize].as_mut() {
                let previous = p.adj_in.insert(
                    prefix,
                    InRoute {
                        attrs: attrs.clone(),
                        accepted,
                        stale: false,
                    },
                );
                p.accepted = p.accepted + u64::from(accepted)
                    - previous.map_or(0, |r| u64::from(r.accepted));
            }
            if accepted {
                summary.accepted += 1;
                self.set_candidate(prefix, idx, Some(attrs), &mut pending);
            } else {
                summary.rejected += 1;
                self.set_candidate(prefix, idx, None, &mut pending);
            }
        }
        (self.finish(pending), summary)
    }

    /// Import checks. eBGP: the path must start with the peer's AS and carry no
    /// confederation segments (RFC 4271 §6.3, RFC 7606 §7.2) and must not contain our AS
    /// (loop). iBGP: our router id as ORIGINATOR_ID or our cluster id in CLUSTER_LIST is a
    /// reflection loop (RFC 4456 §8).
    fn import_allowed(&self, path: &PathAttributes, ebgp: bool, remote_as: u32) -> bool {
        if ebgp {
            path.as_path.neighbour_as() == Some(remote_as)
                && !path.as_path.has_confed_segment()
                && !path.as_path.contains(self.config.local_as)
        } else {
            path.originator_id != Some(self.config.router_id)
                && !path.cluster_list.contains(&self.config.cluster_id)
        }
    }

    /// Replace (or remove, with `None`) the candidate from `source` for `prefix`, rerun the
    /// decision process and propagate a changed best path.
    fn set_candidate(
        &mut self,
        prefix: IpNet,
        source: u32,
        attrs: Option<Arc<RouteAttrs>>,
        pending: &mut Pending,
    ) {
        let peers = &self.peers;
        let config = &self.config;
        let entry = if attrs.is_some() {
            self.loc.get_or_default(prefix)
        } else {
            match self.loc.get_mut(&prefix) {
                Some(e) => e,
                None => return,
            }
        };
        let old = entry.best().map(|c| (c.source, Arc::as_ptr(&c.attrs)));
        let pos = entry.candidates.iter().position(|c| c.source == source);
        match (pos, attrs) {
            (Some(i), Some(a)) => {
                if Arc::ptr_eq(&entry.candidates[i].attrs, &a) {
                    return;
                }
                entry.candidates[i].attrs = a;
            }
            (None, Some(a)) => entry.candidates.push(Candidate { source, attrs: a }),
            (Some(i), None) => {
                entry.candidates.remove(i);
            }
            (None, None) => return,
        }
        if let Some(b) = select_best(&entry.candidates, |s| peer_view(peers, config, s), config) {
            entry.candidates.swap(0, b);
        }
        let new_best = entry.best().cloned();
        if new_best.is_none() {
            self.loc.remove(&prefix);
        }
        if old == new_best.as_ref().map(|c| (c.source, Arc::as_ptr(&c.attrs))) {
            return;
        }
        pending.best.push(BestChange {
            prefix,
            best: new_best.as_ref().map(|c| self.best_path(c)),
        });
        for idx in 0..self.peers.len() as u32 {
            if self.peer(idx).is_some_and(|p| p.session.is_some()) {
                self.export_to(idx, prefix, new_best.as_ref(), pending);
            }
        }
    }

    /// Compute what `target` should have for `prefix` (whose best is `best`) and queue the difference.
    fn export_to(
        &mut self,
        target: u32,
        prefix: IpNet,
        best: Option<&Candidate>,
        pending: &mut Pending,
    ) {
        let wanted = match best {
            None => None,
            Some(b) if !self.export_allowed(b, target, &prefix) => None,
            Some(b) => {
                let key = (
                    target,
                    b.source,
                    Arc::as_ptr(&b.attrs) as usize,
                    family(&prefix),
                );
                match pending.export_memo.get(&key) {
                    Some((_, result)) => result.clone(),
                    None => {
                        let result = self
                            .export_attrs(b, target, &prefix)
                            .map(|a| self.intern(a));
                        pending
                            .export_memo
                            .insert(key, (b.attrs.clone(), result.clone()));
                        result
                    }
                }
            }
        };
        let Some(Some(p)) = self.peers.get_mut(target as usize) else {
            return;
        };
        match wanted {
            Some(a) => {
                if p.adj_out
                    .get(&prefix)
                    .is_some_and(|old| Arc::ptr_eq(old, &a))
                {
                    return;
                }
                p.adj_out.insert(prefix, a.clone());
                pending.push(target, OutChange::Announce(prefix, a));
            }
            None => {
                if p.adj_out.remove(&prefix).is_some() {
                    pending.push(target, OutChange::Withdraw(prefix));
                }
            }
        }
    }

    /// Export policy: split horizon, route reflection and next-hop/AS_PATH rewriting.
    /// The cheap part of the export policy: may `best` go to `target` at all?
    fn export_allowed(&self, best: &Candidate, target: u32, prefix: &IpNet) -> bool {
        if best.source == target {
            return false;
        }
        let Some(t) = self.peer(target) else {
            return false;
        };
        if t.settings.export_local_only && best.source != LOCAL {
            return false;
        }
        let Some(session) = t.session.as_ref() else {
            return false;
        };
        if !session.families.contains(&family(prefix)) {
            return false;
        }
        let target_ebgp = t.settings.remote_as != self.config.local_as;
        let source = (best.source != LOCAL)
            .then(|| self.peer(best.source))
            .flatten();
        match source {
            Some(s) if !target_ebgp && s.settings.remote_as == self.config.local_as => {
                // iBGP split horizon, relaxed only by route reflection (RFC 4456 §6).
                s.settings.route_reflector_client || t.settings.route_reflector_client
            }
            _ => true,
        }
    }

    fn export_attrs(&self, best: &Candidate, target: u32, prefix: &IpNet) -> Option<RouteAttrs> {
        if !self.export_allowed(best, target, prefix) {
            return None;
        }
        let t = self.peer(target)?;
        let session = t.session.as_ref()?;
        let target_ebgp = t.settings.remote_as != self.config.local_as;
        let source = (best.source != LOCAL)
            .then(|| self.peer(best.source))
            .flatten();
        let source_ibgp = source.is_some_and(|s| s.settings.remote_as == self.config.local_as);
        let mut attrs = (*best.attrs).clone();
        // Without an address of the prefix's family there is no valid "next hop self":
        // the route is not exported (an IPv4-mapped IPv6 next hop is rejected by BIRD).
        let next_hop_self = || -> Option<NextHop> {
            match prefix {
                IpNet::V4(_) => session.next_hop_v4.map(NextHop::V4),
                IpNet::V6(_) => session.next_hop_v6.map(|global| NextHop::V6 {
                    global,
                    link_local: None,
                }),
            }
        };
        if target_ebgp {
            attrs.path.as_path.prepend(self.config.local_as);
            attrs.path.local_pref = None;
            attrs.path.originator_id = None;
            attrs.path.cluster_list.clear();
            if source.is_some() {
                // MED is not passed on to other ASes (RFC 4271 §5.1.4).
                attrs.path.med = None;
            }
            attrs.next_hop = next_hop_self()?;
            return Some(attrs);
        }
        // iBGP target.
        if source_ibgp {
            let source = source?;
            let source_id = source.session.as_ref().map(|s| s.remote_id)?;
            if attrs.path.originator_id.is_none() {
                attrs.path.originator_id = Some(source_id);
            }
            // Never reflect a route back to the router that originated it.
            if attrs.path.originator_id == Some(session.remote_id) {
                return None;
            }
            attrs.path.cluster_list.insert(0, self.config.cluster_id);
        }
        if attrs.path.local_pref.is_none() {
            attrs.path.local_pref = Some(DEFAULT_LOCAL_PREF);
        }
        if source.is_none() {
            attrs.next_hop = next_hop_self()?;
        }
        Some(attrs)
    }
}

fn peer_view(peers: &[Option<PeerState>], config: &RibConfig, source: u32) -> Option<PeerView> {
    let p = peers.get(source as usize)?.as_ref()?;
    Some(PeerView {
        address: p.address,
        ebgp: p.settings.remote_as != config.local_as,
        remote_id: p
            .session
            .as_ref()
            .map_or(Ipv4Addr::BROADCAST, |s| s.remote_id),
        remote_as: p.settings.remote_as,
    })
}

#[derive(Clone, Copy)]
struct PeerView {
    address: IpAddr,
    ebgp: bool,
    remote_id: Ipv4Addr,
    remote_as: u32,
}

/// RFC 4271 §9.1.2.2 decision process by elimination, with RFC 4456 §9 tie-breakers.
/// Locally originated routes win outright.
fn select_best(
    candidates: &[Candidate],
    peer: impl Fn(u32) -> Option<PeerView>,
    config: &RibConfig,
) -> Option<usize> {
    if candidates.is_empty() {
        return None;
    }
    if candidates.len() == 1 {
        return Some(0);
    }
    if let Some(i) = candidates.iter().position(|c| c.source == LOCAL) {
        return Some(i);
    }
    let views: Vec<Option<PeerView>> = candidates.iter().map(|c| peer(c.source)).collect();
    let mut alive: SmallVec<[usize; 8]> = (0..candidates.len()).collect();
    let path = |i: usize| &candidates[i].attrs.path;
    let keep_min = |alive: &mut SmallVec<[usize; 8]>, key: &dyn Fn(usize) -> u64| {
        let min = alive.iter().map(|&i| key(i)).min().unwrap_or(0);
        alive.retain(|i| key(*i) == min);
    };
    // 1. Highest LOCAL_PREF.
    keep_min(&mut alive, &|i| {
        u64::from(u32::MAX - path(i).local_pref.unwrap_or(DEFAULT_LOCAL_PREF))
    });
    // 2. Shortest AS_PATH.
    keep_min(&mut alive, &|i| path(i).as_path.length() as u64);
    // 3. Lowest ORIGIN.
    keep_min(&mut alive, &|i| path(i).origin.map_or(3, |o| o as u64));
    // 4. Lowest MED among routes from the same neighbouring AS.
    let neighbour = |i: usize| {
        path(i)
            .as_path
            .neighbour_as()
            .unwrap_or_else(|| views[i].map_or(config.local_as, |v| v.remote_as))
    };
    let med = |i: usize| path(i).med.unwrap_or(0);
    let snapshot = alive.clone();
    alive.retain(|i| {
        !snapshot
            .iter()
            .any(|j| neighbour(*j) == neighbour(*i) && med(*j) < med(*i))
    });
    // 5. eBGP over iBGP.
    if alive.iter().any(|&i| views[i].is_some_and(|v| v.ebgp)) {
        alive.retain(|i| views[*i].is_some_and(|v| v.ebgp));
    }
    // 6. Lowest router id (ORIGINATOR_ID when reflected).
    keep_min(&mut alive, &|i| {
        u64::from(u32::from(path(i).originator_id.unwrap_or_else(|| {
            views[i].map_or(Ipv4Addr::BROADCAST, |v| v.remote_id)
        })))
    });
    // 7. Shortest CLUSTER_LIST.
    keep_min(&mut alive, &|i| path(i).cluster_list.len() as u64);
    // 8. Lowest peer address.
    alive
        .iter()
        .copied()
        .min_by_key(|&i| views[i].map(|v| v.address))
}

#[cfg(test)]
mod tests;
