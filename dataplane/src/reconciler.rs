//! The only code that writes to the kernel: dumps into [`Actual`], applies [`Plan`]s through
//! the batch socket, folds monitor events into the view, and keeps the counters.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipnet::IpNet;
use netlink_packet_core::{NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE};
use netlink_packet_route::neighbour::NeighbourMessage;
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};

use crate::diff::{Actual, DeviceOp, FastSet, Plan, WriteMode, diff, diff_devices};
use crate::messages::{
    IPV6_DEFAULT_METRIC, address_dump_request, address_message, fdb_message, link_create_message,
    link_delete_message, link_dump_request, link_set_message, neighbour_dump_request,
    neighbour_message, parse_address, parse_link, parse_neighbour, parse_route,
    route_delete_message, route_dump_request, route_message,
};
use crate::model::{
    Config, DesiredState, DeviceSpec, FdbEntry, Neighbour, RouteKind, RouteTarget, format_mac,
};
use crate::socket::{BatchSocket, Nack, Request, SocketError};

/// calico-node's BIRD marks its routes with protocol 12.
const CALICO_BIRD_PROTOCOL: u8 = 12;
/// At most this many recent per-object errors are kept for the agent to log or show.
const KEPT_ERRORS: usize = 32;

/// One object the kernel refused, with the operation and errno.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{op} {object}: {nack}")]
pub struct ApplyError {
    pub op: &'static str,
    pub object: String,
    pub nack: Nack,
}

/// Plain counters for the agent's metrics (`tortie_dataplane_*`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Counters {
    /// Desired routes currently in the kernel, by kind.
    pub routes_by_kind: BTreeMap<RouteKind, u64>,
    /// Desired routes waiting for their interface to appear.
    pub routes_waiting: u64,
    /// Reconcile passes that wrote something.
    pub applies: u64,
    /// Kernel objects written (routes, neighbours, FDB entries, device changes).
    pub writes: u64,
    pub failures_by_errno: BTreeMap<i32, u64>,
    /// Full dumps of the kernel state (start, overrun, link change, periodic).
    pub resyncs: u64,
    pub monitor_overruns: u64,
    /// Routes re-written after someone else removed or changed them.
    pub routes_restored: u64,
    /// calico-node routes re-marked as tortie's.
    pub routes_adopted: u64,
    pub apply_seconds_total: f64,
    pub apply_seconds_last: f64,
    pub apply_seconds_max: f64,
    /// Generation of the inputs last applied (see `Dataplane::set_desired`).
    pub generation_applied: u64,
    /// The latest distinct refusals (at most 32), each naming the object and errno.
    pub recent_errors: Vec<String>,
}

/// What a monitor event means for the reconcile loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum EventEffect {
    Nothing,
    /// The kernel now differs from the desired state: reconcile (no dump needed).
    Reconcile,
    /// Something the view cannot follow by events alone (a link went down and the kernel
    /// flushed routes silently): dump everything again.
    Resync,
}

/// Result of one reconcile pass.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub writes: usize,
    pub failures: Vec<ApplyError>,
    pub waiting: usize,
}

/// The reconciler: a batch socket, tortie's view of the kernel, the desired state.
#[derive(Debug)]
pub struct Reconciler {
    config: Config,
    socket: BatchSocket,
    actual: Actual,
    desired: DesiredState,
    desired_ifnames: FastSet<Arc<str>>,
    complete: bool,
    /// The last pass left the kernel matching `desired` and nothing has changed since: the
    /// next pass can return at once (Felix-style change tracking; resyncs still compare all).
    in_sync: bool,
    counters: Counters,
}

impl Reconciler {
    /// Opens the batch socket in the calling thread's network namespace. The view is empty
    /// until [`Reconciler::resync`].
    pub fn new(config: Config) -> Result<Reconciler, SocketError> {
        Ok(Reconciler {
            config,
            socket: BatchSocket::open()?,
            actual: Actual::default(),
            desired: DesiredState::default(),
            desired_ifnames: FastSet::default(),
            complete: false,
            in_sync: false,
            counters: Counters::default(),
        })
    }

    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    pub fn counters_mut(&mut self) -> &mut Counters {
        &mut self.counters
    }

    pub fn actual(&self) -> &Actual {
        &self.actual
    }

    pub fn desired(&self) -> &DesiredState {
        &self.desired
    }

    pub fn is_complete(&self) -> bool {
        self.complete
    }

    /// From now on, kernel objects tortie owns but does not want are deleted.
    pub fn mark_complete(&mut self) {
        if !self.complete {
            self.in_sync = false;
        }
        self.complete = true;
    }

    pub fn set_desired(&mut self, desired: DesiredState) {
        let mut names = FastSet::default();
        let mut last: Option<&Arc<str>> = None;
        for route in desired.routes.values() {
            if let RouteTarget::Device { ifname } | RouteTarget::Gateway { ifname, .. } =
                &route.target
            {
                // Routes share their device name's allocation: skip repeats cheaply.
                if last.is_some_and(|l| Arc::ptr_eq(l, ifname)) {
                    continue;
                }
                last = Some(ifname);
                names.insert(ifname.clone());
            }
        }
        self.desired_ifnames = names;
        if desired != self.desired {
            self.in_sync = false;
        }
        self.desired = desired;
    }

    fn owned_device_names(&self) -> [&str; 3] {
        [
            self.config.ipip_device.as_str(),
            self.config.vxlan_device.as_str(),
            self.config.vxlan_v6_device.as_str(),
        ]
    }

    fn is_owned_device(&self, name: &str) -> bool {
        self.owned_device_names().contains(&name)
    }

    /// Replaces the view with a full dump: links, addresses, tortie's routes (filtered by
    /// protocol in the kernel), neighbours/FDB on tortie's devices, and adoptable routes.
    pub fn resync(&mut self) -> Result<(), SocketError> {
        self.counters.resyncs += 1;
        self.in_sync = false;
        let mut actual = Actual::default();
        for msg in self.socket.dump("link dump", &link_dump_request())? {
            if let RouteNetlinkMessage::NewLink(l) = msg
                && let Some(link) = parse_link(&l)
            {
                actual.insert_link(link);
            }
        }
        for msg in self.socket.dump("address dump", &address_dump_request())? {
            if let RouteNetlinkMessage::NewAddress(a) = msg
                && let Some((index, net)) = parse_address(&a)
            {
                actual.addrs.entry(index).or_default().insert(net);
            }
        }
        let routes = dump_own_routes(&mut self.socket, self.config.route_protocol, &actual)?;
        actual.routes.extend(routes);
        // Every resync, not only the first: calico-node may still be draining when tortie
        // starts, and the agent may mark the state complete before the first dump.
        if self.config.adopt_calico_routes {
            self.dump_adoptable(&mut actual)?;
        }
        for family in [
            AddressFamily::Inet,
            AddressFamily::Inet6,
            AddressFamily::Bridge,
        ] {
            for msg in self
                .socket
                .dump("neighbour dump", &neighbour_dump_request(family))?
            {
                if let RouteNetlinkMessage::NewNeighbour(n) = msg {
                    self.fold_neighbour(&mut actual, &parse_neighbour(&n), true);
                }
            }
        }
        self.actual = actual;
        Ok(())
    }

    fn dump_adoptable(&mut self, actual: &mut Actual) -> Result<(), SocketError> {
        for v6 in [false, true] {
            for msg in self
                .socket
                .dump("route dump (adoption)", &route_dump_request(v6, None))?
            {
                let RouteNetlinkMessage::NewRoute(r) = msg else {
                    continue;
                };
                let name_of = |i: u32| actual.links.get(&i).map(|l| l.name.clone());
                let Some(route) = parse_route(&r, name_of) else {
                    continue;
                };
                let host = route.dst.prefix_len() == route.dst.max_prefix_len();
                let on_cali = route.target.ifname().is_some_and(|n| n.starts_with("cali"));
                let wanted_priority = if v6 { IPV6_DEFAULT_METRIC } else { 0 };
                if route.protocol != self.config.route_protocol
                    && route.priority == wanted_priority
                    && (route.protocol == CALICO_BIRD_PROTOCOL || (host && on_cali))
                {
                    actual.adoptable.insert(route.dst, route.target);
                }
            }
        }
        Ok(())
    }

    fn fold_neighbour(
        &self,
        actual: &mut Actual,
        n: &crate::messages::KernelNeighbour,
        present: bool,
    ) {
        let Some(link) = actual.links.get(&n.ifindex) else {
            return;
        };
        if !self.is_owned_device(&link.name) {
            return;
        }
        let ifname = link.name.to_string();
        if !present {
            // A deletion may report any state and may omit the other half of the entry:
            // forget whatever tortie had under that key.
            if n.bridge {
                actual
                    .fdb
                    .retain(|f| f.ifname != ifname || n.mac.is_some_and(|m| m != f.mac));
            } else {
                actual
                    .neighbours
                    .retain(|e| e.ifname != ifname || n.ip.is_some_and(|ip| ip != e.ip));
            }
            return;
        }
        if !n.permanent {
            return;
        }
        let (Some(ip), Some(mac)) = (n.ip, n.mac) else {
            return;
        };
        if n.bridge {
            let e = FdbEntry {
                ifname,
                mac,
                dst: ip,
            };
            if present {
                actual.fdb.insert(e);
            } else {
                actual.fdb.remove(&e);
            }
        } else {
            let e = Neighbour { ifname, ip, mac };
            if present {
                actual.neighbours.insert(e);
            } else {
                actual.neighbours.remove(&e);
            }
        }
    }

    /// Folds one monitor message into the view and says what it requires.
    pub fn on_event(&mut self, msg: &RouteNetlinkMessage) -> EventEffect {
        let effect = self.fold_event(msg);
        if effect != EventEffect::Nothing {
            self.in_sync = false;
        }
        effect
    }

    fn fold_event(&mut self, msg: &RouteNetlinkMessage) -> EventEffect {
        match msg {
            RouteNetlinkMessage::NewRoute(r) | RouteNetlinkMessage::DelRoute(r) => {
                let added = matches!(msg, RouteNetlinkMessage::NewRoute(_));
                let actual = &self.actual;
                let name_of = |i: u32| actual.links.get(&i).map(|l| l.name.clone());
                let Some(route) = parse_route(r, name_of) else {
                    return EventEffect::Nothing;
                };
                let wanted = self.desired.routes.get(&route.dst).map(|d| &d.target);
                if route.protocol == self.config.route_protocol {
                    if added {
                        self.actual.routes.insert(route.dst, route.target);
                    } else {
                        self.actual.routes.remove(&route.dst);
                    }
                    self.actual.displaced.remove(&route.dst);
                    if self.actual.routes.get(&route.dst) != wanted {
                        if wanted.is_some() {
                            // Somebody removed or changed a route tortie wants: count the repair.
                            self.counters.routes_restored += 1;
                        }
                        return EventEffect::Reconcile;
                    }
                } else if added && wanted.is_some() {
                    let our_priority = if route.dst.addr().is_ipv6() {
                        IPV6_DEFAULT_METRIC
                    } else {
                        0
                    };
                    // Same destination and metric: this route took the slot of ours.
                    if route.priority == our_priority
                        && self.actual.routes.remove(&route.dst).is_some()
                    {
                        self.actual.displaced.insert(route.dst);
                        self.counters.routes_restored += 1;
                        return EventEffect::Reconcile;
                    }
                }
                EventEffect::Nothing
            }
            RouteNetlinkMessage::NewLink(l) => {
                let Some(link) = parse_link(l) else {
                    return EventEffect::Nothing;
                };
                let relevant = self.is_relevant_link(&link.name);
                let before = self.actual.links.get(&link.index).cloned();
                let went_down = before.as_ref().is_some_and(|b| b.up) && !link.up;
                let changed = before.as_ref().is_none_or(|b| {
                    b.name != link.name || b.up != link.up || b.mtu != link.mtu || b.mac != link.mac
                });
                self.actual.insert_link(link);
                match (relevant, went_down, changed) {
                    // Taking a link down flushes routes through it without a notification:
                    // only a dump tells what is left.
                    (true, true, _) => EventEffect::Resync,
                    // A new or re-upped link (a pod's veth): routes waiting for it can go in.
                    (true, false, true) => EventEffect::Reconcile,
                    _ => EventEffect::Nothing,
                }
            }
            RouteNetlinkMessage::DelLink(l) => {
                let index = l.header.index;
                let name = self.actual.links.get(&index).map(|l| l.name.clone());
                self.actual.remove_link(index);
                let Some(name) = name.filter(|n| self.is_relevant_link(n)) else {
                    return EventEffect::Nothing;
                };
                // The kernel removed every route, neighbour and FDB entry on the deleted link
                // (silently): drop them from the view rather than dumping everything again.
                self.actual
                    .routes
                    .retain(|_, t| t.ifname() != Some(name.as_ref()));
                self.actual.neighbours.retain(|n| *n.ifname != *name);
                self.actual.fdb.retain(|f| *f.ifname != *name);
                EventEffect::Reconcile
            }
            RouteNetlinkMessage::NewAddress(a) | RouteNetlinkMessage::DelAddress(a) => {
                let Some((index, net)) = parse_address(a) else {
                    return EventEffect::Nothing;
                };
                let set = self.actual.addrs.entry(index).or_default();
                if matches!(msg, RouteNetlinkMessage::NewAddress(_)) {
                    set.insert(net);
                } else {
                    set.remove(&net);
                }
                let ours = self
                    .actual
                    .links
                    .get(&index)
                    .is_some_and(|l| self.is_owned_device(&l.name));
                if ours {
                    EventEffect::Reconcile
                } else {
                    EventEffect::Nothing
                }
            }
            RouteNetlinkMessage::NewNeighbour(n) | RouteNetlinkMessage::DelNeighbour(n) => {
                let parsed = parse_neighbour(n);
                let ours = self
                    .actual
                    .links
                    .get(&parsed.ifindex)
                    .is_some_and(|l| self.is_owned_device(&l.name));
                if !ours {
                    return EventEffect::Nothing;
                }
                let mut actual = std::mem::take(&mut self.actual);
                let present = matches!(msg, RouteNetlinkMessage::NewNeighbour(_));
                // A replaced entry shows up only as its new value: drop the old one first.
                if present && parsed.permanent {
                    let name = actual
                        .links
                        .get(&parsed.ifindex)
                        .map(|l| l.name.to_string());
                    if parsed.bridge {
                        actual.fdb.retain(|f| {
                            Some(&f.ifname) != name.as_ref() || Some(f.mac) != parsed.mac
                        });
                    } else {
                        actual.neighbours.retain(|e| {
                            Some(&e.ifname) != name.as_ref() || Some(e.ip) != parsed.ip
                        });
                    }
                }
                self.fold_neighbour(&mut actual, &parsed, present);
                self.actual = actual;
                EventEffect::Reconcile
            }
            _ => EventEffect::Nothing,
        }
    }

    fn is_relevant_link(&self, name: &str) -> bool {
        self.is_owned_device(name) || self.desired_ifnames.contains(name)
    }

    /// The pure part of a reconcile pass, exposed so callers (and benchmarks) can see what
    /// would be written without touching the kernel.
    pub fn plan(&self) -> Plan {
        diff(&self.desired, &self.actual, self.complete)
    }

    /// One level-triggered pass: devices first, then neighbours and routes, then deletions.
    pub fn reconcile(&mut self) -> Result<Report, SocketError> {
        if self.in_sync {
            return Ok(Report::default());
        }
        let start = Instant::now();
        let mut report = Report::default();
        let owned = self.owned_device_names().map(str::to_owned);
        let owned: Vec<&str> = owned.iter().map(String::as_str).collect();
        let device_ops = diff_devices(&self.desired, &self.actual, &owned, self.complete);
        // Work on wanted devices (including a delete that is half of a recreate) goes before
        // the routes; tearing down an unwanted one goes after, once no route uses it.
        let (creates, deletes): (Vec<_>, Vec<_>) = device_ops
            .into_iter()
            .partition(|op| self.desired.devices.iter().any(|d| d.name() == op.name()));
        if !creates.is_empty() {
            self.apply_device_ops(creates, &mut report)?;
        }
        let plan = self.plan();
        report.waiting = plan.waiting.len();
        self.counters.routes_waiting = plan.waiting.len() as u64;
        if !plan.is_empty() {
            self.apply_plan(plan, &mut report)?;
        }
        if !deletes.is_empty() {
            self.apply_device_ops(deletes, &mut report)?;
        }
        if report.writes > 0 || !report.failures.is_empty() {
            self.counters.applies += 1;
            let secs = start.elapsed().as_secs_f64();
            self.counters.apply_seconds_last = secs;
            self.counters.apply_seconds_total += secs;
            self.counters.apply_seconds_max = self.counters.apply_seconds_max.max(secs);
            self.recount_routes();
        }
        self.in_sync = report.failures.is_empty() && report.waiting == 0;
        Ok(report)
    }

    /// Recomputes `routes_by_kind` from the desired routes present in the view.
    pub fn recount_routes(&mut self) {
        let mut by_kind: BTreeMap<RouteKind, u64> =
            RouteKind::ALL.iter().map(|k| (*k, 0)).collect();
        for (dst, route) in &self.desired.routes {
            if self.actual.routes.get(dst) == Some(&route.target) {
                *by_kind.entry(route.kind).or_default() += 1;
            }
        }
        self.counters.routes_by_kind = by_kind;
    }

    fn record_failure(
        &mut self,
        report: &mut Report,
        op: &'static str,
        object: String,
        nack: Nack,
    ) {
        *self
            .counters
            .failures_by_errno
            .entry(nack.errno)
            .or_default() += 1;
        let err = ApplyError { op, object, nack };
        tracing::warn!(error = %err, "kernel refused a dataplane change");
        // A refusal repeated on every retry is listed once.
        let text = err.to_string();
        if !self.counters.recent_errors.contains(&text) {
            if self.counters.recent_errors.len() >= KEPT_ERRORS {
                self.counters.recent_errors.remove(0);
            }
            self.counters.recent_errors.push(text);
        }
        report.failures.push(err);
    }

    fn apply_plan(&mut self, mut plan: Plan, report: &mut Report) -> Result<(), SocketError> {
        let index_of = |actual: &Actual, name: &str| actual.link_index.get(name).copied();
        let protocol = self.config.route_protocol;

        // Neighbours and FDB entries before the routes that resolve through them.
        let adds = NeighbourEntry::all(&plan.neighbour_adds, &plan.fdb_adds);
        for (entry, result) in self.batch_neighbours(adds, NeighbourEntry::add_request)? {
            match result {
                None => {
                    report.writes += 1;
                    self.counters.writes += 1;
                    entry.record_added(&mut self.actual);
                }
                Some(nack) => self.record_failure(report, "add", entry.added_object(), nack),
            }
        }

        // Routes: writes then deletes, all in one pipelined batch. Within each, the order is
        // free (no route of tortie's resolves through another: next hops are node addresses
        // on the uplink or onlink), so it is the one the kernel's FIB trie handles fastest.
        plan.route_writes
            .sort_unstable_by_key(|w| trie_friendly_order(&w.dst));
        plan.route_deletes.sort_unstable_by_key(trie_friendly_order);
        let mut requests = Vec::with_capacity(plan.route_writes.len() + plan.route_deletes.len());
        let mut sent_writes = Vec::with_capacity(plan.route_writes.len());
        for w in plan.route_writes {
            let oif = match w.target.ifname() {
                Some(name) => match index_of(&self.actual, name) {
                    Some(i) => Some(i),
                    None => continue,
                },
                None => None,
            };
            let flags = match w.mode {
                WriteMode::Create => NLM_F_CREATE | NLM_F_EXCL,
                WriteMode::Replace => NLM_F_CREATE | NLM_F_REPLACE,
            };
            requests.push(Request {
                message: RouteNetlinkMessage::NewRoute(route_message(
                    &w.dst, &w.target, oif, protocol,
                )),
                flags,
            });
            sent_writes.push(w);
        }
        for dst in &plan.route_deletes {
            requests.push(Request {
                message: RouteNetlinkMessage::DelRoute(route_delete_message(dst, protocol)),
                flags: 0,
            });
        }
        if !requests.is_empty() {
            let overruns_before = self.socket.overruns();
            let results = self.socket.batch(requests)?;
            // After a receive-buffer overrun the socket sent the requests whose answers were
            // lost again, each with its own ACK: a create whose first copy took effect then
            // answers EEXIST. Re-verify those against a dump of tortie's routes; an EEXIST is
            // a failure only if the route there is not ours as wanted.
            let verified: Option<HashMap<IpNet, RouteTarget>> =
                if self.socket.overruns() != overruns_before {
                    Some(
                        dump_own_routes(&mut self.socket, protocol, &self.actual)?
                            .into_iter()
                            .collect(),
                    )
                } else {
                    None
                };
            let (write_results, delete_results) = results.split_at(sent_writes.len());
            // One growth instead of a rehash at every doubling on a first install.
            self.actual.routes.reserve(sent_writes.len());
            for (w, result) in sent_writes.into_iter().zip(write_results) {
                let ours_already = |nack: &Nack| {
                    nack.errno == libc::EEXIST
                        && w.mode == WriteMode::Create
                        && verified
                            .as_ref()
                            .is_some_and(|v| v.get(&w.dst) == Some(&w.target))
                };
                let result = match result {
                    Some(nack) if ours_already(nack) => &None,
                    other => other,
                };
                match result {
                    None => {
                        report.writes += 1;
                        self.counters.writes += 1;
                        if self.actual.adoptable.remove(&w.dst).is_some() {
                            self.counters.routes_adopted += 1;
                        }
                        self.actual.displaced.remove(&w.dst);
                        self.actual.routes.insert(w.dst, w.target);
                    }
                    Some(nack) => {
                        let op = match w.mode {
                            WriteMode::Create => "add",
                            WriteMode::Replace => "replace",
                        };
                        self.record_failure(
                            report,
                            op,
                            format!("route {} {}", w.dst, w.target),
                            nack.clone(),
                        );
                    }
                }
            }
            for (dst, result) in plan.route_deletes.iter().zip(delete_results) {
                match result {
                    // Already gone is the state we wanted.
                    None => {
                        report.writes += 1;
                        self.counters.writes += 1;
                        self.actual.routes.remove(dst);
                    }
                    Some(nack) if nack.errno == libc::ESRCH => {
                        self.actual.routes.remove(dst);
                    }
                    Some(nack) => {
                        self.record_failure(report, "delete", format!("route {dst}"), nack.clone());
                    }
                }
            }
        }

        // Neighbour and FDB deletions last.
        let dels = NeighbourEntry::all(&plan.neighbour_dels, &plan.fdb_dels);
        let answers = self.batch_neighbours(dels, NeighbourEntry::delete_request)?;
        if !answers.is_empty() {
            for (entry, result) in answers {
                match result {
                    None => {
                        report.writes += 1;
                        self.counters.writes += 1;
                    }
                    Some(nack) if nack.errno == libc::ENOENT => {}
                    Some(nack) => {
                        self.record_failure(report, "delete", entry.deleted_object(), nack)
                    }
                }
            }
            for n in &plan.neighbour_dels {
                self.actual.neighbours.remove(n);
            }
            for f in &plan.fdb_dels {
                self.actual.fdb.remove(f);
            }
        }
        Ok(())
    }

    /// Sends one request per entry whose link exists, in one batch; each answer comes back with
    /// the entry it is about.
    fn batch_neighbours<'p>(
        &mut self,
        entries: impl Iterator<Item = NeighbourEntry<'p>>,
        request: fn(NeighbourEntry<'p>, u32) -> Request,
    ) -> Result<Vec<(NeighbourEntry<'p>, Option<Nack>)>, SocketError> {
        let mut requests = Vec::new();
        let mut sent = Vec::new();
        for entry in entries {
            if let Some(i) = self.actual.link_index.get(entry.ifname()).copied() {
                requests.push(request(entry, i));
                sent.push(entry);
            }
        }
        if requests.is_empty() {
            return Ok(Vec::new());
        }
        let results = self.socket.batch(requests)?;
        Ok(sent.into_iter().zip(results).collect())
    }

    fn apply_device_ops(
        &mut self,
        ops: Vec<DeviceOp>,
        report: &mut Report,
    ) -> Result<(), SocketError> {
        for op in ops {
            let (verb, object, result) = match &op {
                DeviceOp::Create(spec) => {
                    let underlay = match spec {
                        DeviceSpec::Vxlan { underlay, .. } => {
                            self.actual.link_index.get(underlay.as_str()).copied()
                        }
                        DeviceSpec::Ipip { .. } => None,
                    };
                    let r = self.socket.request(
                        RouteNetlinkMessage::NewLink(link_create_message(spec, underlay)),
                        NLM_F_CREATE | NLM_F_EXCL,
                    );
                    // tunl0 appears by itself when the ipip module loads.
                    let r = match r {
                        Err(n) if n.errno == libc::EEXIST => Ok(()),
                        other => other,
                    };
                    ("create", format!("device {}", spec.name()), r)
                }
                DeviceOp::Configure(spec) => {
                    let mac = match spec {
                        DeviceSpec::Vxlan { mac, .. } => Some(*mac),
                        DeviceSpec::Ipip { .. } => None,
                    };
                    let r = match self.actual.link_index.get(spec.name()) {
                        Some(&i) => self.socket.request(
                            RouteNetlinkMessage::SetLink(link_set_message(
                                i,
                                spec.mtu(),
                                mac,
                                true,
                            )),
                            0,
                        ),
                        None => continue,
                    };
                    // Routes through the device may go in this same pass: record what the
                    // kernel now holds instead of waiting for the link notification.
                    if r.is_ok()
                        && let Some(link) = self
                            .actual
                            .link_index
                            .get(spec.name())
                            .and_then(|i| self.actual.links.get_mut(i))
                    {
                        link.up = true;
                        link.mtu = spec.mtu();
                        if mac.is_some() {
                            link.mac = mac;
                        }
                    }
                    ("configure", format!("device {}", spec.name()), r)
                }
                DeviceOp::AddAddress { name, addr } | DeviceOp::DelAddress { name, addr } => {
                    let Some(&i) = self.actual.link_index.get(name.as_str()) else {
                        continue;
                    };
                    let add = matches!(op, DeviceOp::AddAddress { .. });
                    let msg = address_message(i, *addr);
                    let r = if add {
                        self.socket.request(
                            RouteNetlinkMessage::NewAddress(msg),
                            NLM_F_CREATE | NLM_F_REPLACE,
                        )
                    } else {
                        self.socket.request(RouteNetlinkMessage::DelAddress(msg), 0)
                    };
                    if r.is_ok() {
                        let set = self.actual.addrs.entry(i).or_default();
                        if add {
                            set.insert(*addr);
                        } else {
                            set.remove(addr);
                        }
                    }
                    (
                        if add { "add" } else { "delete" },
                        format!("address {addr} dev {name}"),
                        r,
                    )
                }
                DeviceOp::Delete { name } => {
                    let Some(&i) = self.actual.link_index.get(name.as_str()) else {
                        continue;
                    };
                    let r = self
                        .socket
                        .request(RouteNetlinkMessage::DelLink(link_delete_message(i)), 0);
                    ("delete", format!("device {name}"), r)
                }
                DeviceOp::Disable { name } => {
                    let Some(link) = self.actual.link(name) else {
                        continue;
                    };
                    let msg = link_set_message(link.index, link.mtu, None, false);
                    let r = self.socket.request(RouteNetlinkMessage::SetLink(msg), 0);
                    if r.is_ok()
                        && let Some(link) = self
                            .actual
                            .link_index
                            .get(name.as_str())
                            .and_then(|i| self.actual.links.get_mut(i))
                    {
                        link.up = false;
                    }
                    ("disable", format!("device {name}"), r)
                }
            };
            match result {
                Ok(()) => {
                    report.writes += 1;
                    self.counters.writes += 1;
                }
                Err(nack) => self.record_failure(report, verb, object, nack),
            }
            if matches!(op, DeviceOp::Create(_) | DeviceOp::Delete { .. }) {
                self.refresh_links()?;
            }
        }
        Ok(())
    }

    /// Re-reads links (and their addresses) after a device was created or deleted.
    fn refresh_links(&mut self) -> Result<(), SocketError> {
        let mut links = Vec::new();
        for msg in self.socket.dump("link dump", &link_dump_request())? {
            if let RouteNetlinkMessage::NewLink(l) = msg
                && let Some(link) = parse_link(&l)
            {
                links.push(link);
            }
        }
        let alive: HashSet<u32> = links.iter().map(|l| l.index).collect();
        let gone: Vec<u32> = self
            .actual
            .links
            .keys()
            .filter(|i| !alive.contains(i))
            .copied()
            .collect();
        for i in gone {
            let name = self.actual.links.get(&i).map(|l| l.name.to_string());
            self.actual.remove_link(i);
            if let Some(name) = name {
                self.actual.neighbours.retain(|n| n.ifname != name);
                self.actual.fdb.retain(|f| f.ifname != name);
                // Routes through a deleted device are gone with it.
                self.actual
                    .routes
                    .retain(|_, t| t.ifname() != Some(name.as_str()));
            }
        }
        for link in links {
            self.actual.insert_link(link);
        }
        self.actual.addrs.clear();
        for msg in self.socket.dump("address dump", &address_dump_request())? {
            if let RouteNetlinkMessage::NewAddress(a) = msg
                && let Some((index, net)) = parse_address(&a)
            {
                self.actual.addrs.entry(index).or_default().insert(net);
            }
        }
        Ok(())
    }
}

/// One entry of the kernel's neighbour table in a batch. ARP/NDP neighbours and VXLAN FDB
/// entries are both RTM_NEWNEIGH/RTM_DELNEIGH messages and share a batch; which one a request
/// is decides the part of [`Actual`] its answer updates.
#[derive(Clone, Copy)]
enum NeighbourEntry<'p> {
    /// A next hop's MAC on a tunnel device.
    Neighbour(&'p Neighbour),
    /// A remote VTEP's MAC and underlay address on the VXLAN device.
    Fdb(&'p FdbEntry),
}

impl<'p> NeighbourEntry<'p> {
    /// The neighbours, then the FDB entries: the order they are sent in.
    fn all(
        neighbours: &'p [Neighbour],
        fdb: &'p [FdbEntry],
    ) -> impl Iterator<Item = NeighbourEntry<'p>> {
        let neighbours = neighbours.iter().map(NeighbourEntry::Neighbour);
        neighbours.chain(fdb.iter().map(NeighbourEntry::Fdb))
    }

    fn ifname(self) -> &'p str {
        match self {
            NeighbourEntry::Neighbour(n) => &n.ifname,
            NeighbourEntry::Fdb(f) => &f.ifname,
        }
    }

    fn message(self, ifindex: u32) -> NeighbourMessage {
        match self {
            NeighbourEntry::Neighbour(n) => neighbour_message(ifindex, n.ip, n.mac),
            NeighbourEntry::Fdb(f) => fdb_message(ifindex, f.mac, f.dst),
        }
    }

    /// Creates the entry, or replaces one with the same key (a neighbour's MAC has changed).
    fn add_request(self, ifindex: u32) -> Request {
        Request {
            message: RouteNetlinkMessage::NewNeighbour(self.message(ifindex)),
            flags: NLM_F_CREATE | NLM_F_REPLACE,
        }
    }

    fn delete_request(self, ifindex: u32) -> Request {
        Request {
            message: RouteNetlinkMessage::DelNeighbour(self.message(ifindex)),
            flags: 0,
        }
    }

    /// The entry as a refused add names it.
    fn added_object(self) -> String {
        match self {
            NeighbourEntry::Neighbour(n) => format!(
                "neighbour {} lladdr {} dev {}",
                n.ip,
                format_mac(&n.mac),
                n.ifname
            ),
            NeighbourEntry::Fdb(_) => self.deleted_object(),
        }
    }

    /// The entry as a refused delete names it.
    fn deleted_object(self) -> String {
        match self {
            NeighbourEntry::Neighbour(n) => format!("neighbour {} dev {}", n.ip, n.ifname),
            NeighbourEntry::Fdb(f) => {
                format!("fdb {} dst {} dev {}", format_mac(&f.mac), f.dst, f.ifname)
            }
        }
    }

    /// A successful add in the view: it replaced any entry with the same key.
    fn record_added(self, actual: &mut Actual) {
        match self {
            NeighbourEntry::Neighbour(n) => {
                actual
                    .neighbours
                    .retain(|e| e.ifname != n.ifname || e.ip != n.ip);
                actual.neighbours.insert(n.clone());
            }
            NeighbourEntry::Fdb(f) => {
                actual
                    .fdb
                    .retain(|e| e.ifname != f.ifname || e.mac != f.mac);
                actual.fdb.insert(f.clone());
            }
        }
    }
}

/// Sort key spreading consecutive route writes across the FIB trie: the destination address
/// with its bits reversed, so neighbours in address order are written far apart. Measured
/// with 100k /27s: address order costs the kernel about 12% more time per insert than this
/// order and about 25% more per delete (consecutive writes keep resizing the same nodes).
fn trie_friendly_order(dst: &IpNet) -> u128 {
    match dst.addr() {
        std::net::IpAddr::V4(a) => u128::from(u32::from(a).reverse_bits()),
        std::net::IpAddr::V6(a) => u128::from(a).reverse_bits(),
    }
}

/// tortie's routes (both families) as the kernel holds them, filtered by protocol in the kernel.
fn dump_own_routes(
    socket: &mut BatchSocket,
    protocol: u8,
    links: &Actual,
) -> Result<Vec<(IpNet, RouteTarget)>, SocketError> {
    let name_of = |i: u32| links.links.get(&i).map(|l| l.name.clone());
    let mut all = Vec::new();
    for v6 in [false, true] {
        // An interrupted dump restarts from scratch: forget what the partial one gave.
        let routes = std::cell::RefCell::new(Vec::new());
        socket.dump_raw(
            "route dump",
            &route_dump_request(v6, Some(protocol)),
            |kind, payload| {
                if let RouteNetlinkMessage::NewRoute(r) =
                    crate::socket::parse_message("route dump", kind, payload)?
                    && let Some(route) = parse_route(&r, name_of)
                    && route.protocol == protocol
                {
                    routes.borrow_mut().push((route.dst, route.target));
                }
                Ok(())
            },
            || routes.borrow_mut().clear(),
        )?;
        all.extend(routes.into_inner());
    }
    Ok(all)
}

/// Time a reconcile should wait before retrying after failures: short, bounded.
pub const RETRY_AFTER_FAILURE: Duration = Duration::from_millis(500);

#[cfg(test)]
mod tests {
    //! Event folding, checked against a reconciler whose socket is never written to.
    use super::*;
    use crate::messages::{KernelLink, route_message};
    use crate::model::DesiredRoute;
    use ipnet::IpNet;
    use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn via_eth0(gw: &str) -> RouteTarget {
        RouteTarget::Gateway {
            via: gw.parse().unwrap(),
            ifname: Arc::from("eth0"),
            onlink: false,
        }
    }

    /// A reconciler that wants `10.1.0.0/26 via 10.0.0.2 dev eth0` and believes it is installed.
    fn reconciler() -> Reconciler {
        let mut r = Reconciler::new(Config::default()).unwrap();
        r.actual.insert_link(KernelLink {
            index: 2,
            name: Arc::from("eth0"),
            up: true,
            mtu: 1500,
            mac: None,
            kind: None,
            vxlan: None,
        });
        let mut d = DesiredState::default();
        d.routes.insert(
            net("10.1.0.0/26"),
            DesiredRoute {
                target: via_eth0("10.0.0.2"),
                kind: RouteKind::Direct,
            },
        );
        r.set_desired(d);
        r.actual
            .routes
            .insert(net("10.1.0.0/26"), via_eth0("10.0.0.2"));
        r
    }

    fn route_event(add: bool, gw: &str, protocol: u8) -> RouteNetlinkMessage {
        let msg = route_message(&net("10.1.0.0/26"), &via_eth0(gw), Some(2), protocol);
        if add {
            RouteNetlinkMessage::NewRoute(msg)
        } else {
            RouteNetlinkMessage::DelRoute(msg)
        }
    }

    #[test]
    fn echo_of_tortie_own_write_changes_nothing() {
        let mut r = reconciler();
        assert_eq!(
            r.on_event(&route_event(true, "10.0.0.2", 84)),
            EventEffect::Nothing
        );
        assert_eq!(r.counters().routes_restored, 0);
    }

    #[test]
    fn deleting_a_wanted_route_asks_for_a_reconcile_and_counts_a_repair() {
        let mut r = reconciler();
        assert_eq!(
            r.on_event(&route_event(false, "10.0.0.2", 84)),
            EventEffect::Reconcile
        );
        assert!(r.actual().routes.is_empty());
        assert_eq!(r.counters().routes_restored, 1);
        assert_eq!(r.plan().route_writes[0].mode, WriteMode::Create);
    }

    #[test]
    fn foreign_replace_of_a_wanted_route_is_taken_back_with_replace() {
        let mut r = reconciler();
        assert_eq!(
            r.on_event(&route_event(true, "10.0.0.9", 4)),
            EventEffect::Reconcile
        );
        assert!(r.actual().displaced.contains(&net("10.1.0.0/26")));
        assert_eq!(r.plan().route_writes[0].mode, WriteMode::Replace);
    }

    #[test]
    fn link_going_down_needs_a_dump_but_an_unrelated_link_does_not() {
        let mut r = reconciler();
        let mut down = LinkMessage::default();
        down.header.index = 2;
        down.attributes.push(LinkAttribute::IfName("eth0".into()));
        assert_eq!(
            r.on_event(&RouteNetlinkMessage::NewLink(down)),
            EventEffect::Resync
        );
        let mut other = LinkMessage::default();
        other.header.index = 7;
        other.header.flags = LinkFlags::Up;
        other
            .attributes
            .push(LinkAttribute::IfName("docker0".into()));
        assert_eq!(
            r.on_event(&RouteNetlinkMessage::NewLink(other)),
            EventEffect::Nothing
        );
    }

    #[test]
    fn vxlan_neighbours_and_fdb_entries_are_written_then_deleted_and_tracked_in_the_view() {
        let vxlan = "vxlan.calico";
        let neighbour = Neighbour {
            ifname: vxlan.into(),
            ip: "10.244.1.0".parse().unwrap(),
            mac: [0x66, 0, 0, 0, 0, 2],
        };
        let fdb = FdbEntry {
            ifname: vxlan.into(),
            mac: [0x66, 0, 0, 0, 0, 2],
            dst: "192.0.2.2".parse().unwrap(),
        };
        let outcome = crate::socket::in_fresh_netns(|| {
            let mut r = Reconciler::new(Config::default()).unwrap();
            r.resync().unwrap();
            r.mark_complete();
            let mut d = DesiredState::default();
            d.devices.push(DeviceSpec::Vxlan {
                name: vxlan.into(),
                vni: 4096,
                port: 4789,
                local: "127.0.0.1".parse().unwrap(),
                underlay: "lo".into(),
                mtu: 1450,
                mac: [0x66, 0, 0, 0, 0, 1],
                addr: "10.244.0.0".parse().unwrap(),
            });
            d.neighbours.insert(neighbour.clone());
            d.fdb.insert(fdb.clone());
            r.set_desired(d.clone());
            let added = r.reconcile().unwrap();
            // What the kernel holds, not what the reconciler believes it wrote.
            r.resync().unwrap();
            let after_add = (r.actual.neighbours.clone(), r.actual.fdb.clone());
            d.neighbours.clear();
            d.fdb.clear();
            r.set_desired(d);
            let deleted = r.reconcile().unwrap();
            let view_after_delete = (r.actual.neighbours.clone(), r.actual.fdb.clone());
            r.resync().unwrap();
            let after_delete = (r.actual.neighbours.clone(), r.actual.fdb.clone());
            (added, after_add, deleted, view_after_delete, after_delete)
        });
        let Some((added, after_add, deleted, view_after_delete, after_delete)) = outcome else {
            return;
        };
        assert!(added.failures.is_empty(), "add: {:?}", added.failures);
        assert!(
            deleted.failures.is_empty(),
            "delete: {:?}",
            deleted.failures
        );
        assert!(
            after_add.0.contains(&neighbour),
            "kernel neighbours: {:?}",
            after_add.0
        );
        assert!(after_add.1.contains(&fdb), "kernel FDB: {:?}", after_add.1);
        assert_eq!(deleted.writes, 2, "one neighbour and one FDB entry deleted");
        assert!(
            view_after_delete.0.is_empty() && view_after_delete.1.is_empty(),
            "view after delete: {view_after_delete:?}"
        );
        assert!(
            after_delete.0.is_empty() && after_delete.1.is_empty(),
            "kernel after delete: {after_delete:?}"
        );
    }

    #[test]
    fn creates_repeated_after_an_overrun_are_verified_so_only_foreign_conflicts_fail() {
        let dst = |k: usize| {
            let base = u32::from(std::net::Ipv4Addr::new(10, 128, 0, 0));
            IpNet::new(
                std::net::Ipv4Addr::from(base + ((k as u32) << 8)).into(),
                24,
            )
            .unwrap()
        };
        let foreign: Vec<usize> = (0..1200).step_by(3).collect();
        let outcome = crate::socket::in_fresh_netns(|| {
            let mut other = BatchSocket::open().unwrap();
            let static_routes = foreign.iter().map(|k| Request {
                message: RouteNetlinkMessage::NewRoute(route_message(
                    &dst(*k),
                    &RouteTarget::Blackhole,
                    None,
                    4,
                )),
                flags: NLM_F_CREATE | NLM_F_EXCL,
            });
            assert!(
                other
                    .batch(static_routes)
                    .unwrap()
                    .iter()
                    .all(Option::is_none)
            );

            let mut r = Reconciler::new(Config::default()).unwrap();
            r.resync().unwrap();
            r.mark_complete();
            // 400 EEXIST answers cannot fit: the socket must repeat the unanswered creates.
            r.socket.shrink_receive_buffer(4096);
            let mut d = DesiredState::default();
            for k in 0..1200 {
                let route = DesiredRoute {
                    target: RouteTarget::Blackhole,
                    kind: RouteKind::Blackhole,
                };
                d.routes.insert(dst(k), route);
            }
            r.set_desired(d);
            let report = r.reconcile().unwrap();
            let ours = dump_own_routes(&mut r.socket, 84, &r.actual).unwrap().len();
            (report, r.socket.overruns(), ours)
        });
        let Some((report, overruns, ours)) = outcome else {
            return;
        };
        assert!(
            overruns > 0,
            "the answers were meant to overflow the buffer"
        );
        let failed: std::collections::BTreeSet<(&str, String, i32)> = report
            .failures
            .iter()
            .map(|f| (f.op, f.object.clone(), f.nack.errno))
            .collect();
        let want: std::collections::BTreeSet<(&str, String, i32)> = foreign
            .iter()
            .map(|k| ("add", format!("route {} blackhole", dst(*k)), libc::EEXIST))
            .collect();
        assert_eq!(
            report.failures.len(),
            want.len(),
            "first refusals: {:?}",
            &report.failures[..report.failures.len().min(3)]
        );
        assert_eq!(failed, want);
        assert_eq!(report.writes, 800);
        assert_eq!(ours, 800);
    }

    #[test]
    fn deleted_link_takes_its_routes_out_of_the_view() {
        let mut r = reconciler();
        let mut gone = LinkMessage::default();
        gone.header.index = 2;
        assert_eq!(
            r.on_event(&RouteNetlinkMessage::DelLink(gone)),
            EventEffect::Reconcile
        );
        assert!(r.actual().routes.is_empty());
        assert_eq!(r.plan().waiting, vec![net("10.1.0.0/26")]);
    }
}
