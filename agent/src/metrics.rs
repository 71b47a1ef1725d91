//! Renders the agent's Prometheus metrics text (names `tortie_*`, small label sets) and keeps
//! what the text needs between scrapes: BGP flap counts and the reconcile latency histogram.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;

use tortie_dataplane::Counters;
use tortie_dataplane::model::RouteKind;

use crate::cluster::ClusterView;
use crate::releases::ReleaseFigures;

/// Upper bounds (seconds) of the reconcile latency histogram: a single route write takes tens of
/// microseconds, a full table of 100k routes takes seconds.
pub const APPLY_SECONDS_BUCKETS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// FSM states in RFC 4271 order, for the `tortie_bgp_peer_fsm_state` state set.
const BGP_STATES: [&str; 6] = [
    "Idle",
    "Connect",
    "Active",
    "OpenSent",
    "OpenConfirm",
    "Established",
];

/// The agent's one metrics memory: it lives with the renderer so the agent loop only hands
/// over its figures once a tick.
static MEMORY: Mutex<Metrics> = Mutex::new(Metrics::new());

/// Renders the metrics text from the agent's current figures, remembering what the next render
/// needs (flaps, histogram).
pub fn render(
    view: &ClusterView,
    dp: &Counters,
    peers: &serde_json::Value,
    bgp_refused_connections: u64,
    workloads: usize,
    releases: ReleaseFigures,
    ready: bool,
) -> String {
    let snapshot = Snapshot {
        view,
        dataplane: dp,
        peers: &PeerFigures::from_status(peers),
        bgp_refused_connections,
        workloads,
        releases,
        ready,
        datastore_ready: crate::datastore::watch::datastore_healthy(),
        watch_restarts: crate::datastore::watch::WATCH_RESTARTS
            .load(std::sync::atomic::Ordering::Relaxed),
    };
    // A poisoned lock only means an earlier render panicked; its memory is still usable.
    let mut memory = MEMORY.lock().unwrap_or_else(|p| p.into_inner());
    memory.render(&snapshot)
}

/// Everything one render reads.
pub struct Snapshot<'a> {
    pub view: &'a ClusterView,
    pub dataplane: &'a Counters,
    pub peers: &'a [PeerFigures],
    /// BGP connections refused: from an address that is no configured peer.
    pub bgp_refused_connections: u64,
    pub workloads: usize,
    /// Pod address releases answered to the CNI: pending, and how the written ones went.
    pub releases: ReleaseFigures,
    /// The agent's readiness (`/readiness`).
    pub ready: bool,
    /// Every datastore watch is currently healthy.
    pub datastore_ready: bool,
    pub watch_restarts: u64,
}

/// One BGP peer as `Routing::status()` describes it.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerFigures {
    pub address: String,
    /// `mesh` or `bgppeer`.
    pub kind: &'static str,
    /// FSM state name (`Idle` … `Established`).
    pub state: String,
    pub uptime_seconds: f64,
    pub prefixes_received: u64,
    pub prefixes_accepted: u64,
    pub prefixes_advertised: u64,
    pub messages_in: u64,
    pub messages_out: u64,
}

impl PeerFigures {
    /// Reads the peer list of `Routing::status()`; entries without an address are skipped and
    /// absent figures (no session yet) count as zero.
    pub fn from_status(status: &serde_json::Value) -> Vec<PeerFigures> {
        let Some(peers) = status.as_array() else {
            return Vec::new();
        };
        let count = |p: &serde_json::Value, field: &str| p[field].as_u64().unwrap_or(0);
        peers
            .iter()
            .filter_map(|p| {
                let address = p["address"].as_str()?.to_owned();
                let kind = match p["type"].as_str() {
                    Some(t) if t.starts_with("BGPPeer") => "bgppeer",
                    _ => "mesh",
                };
                Some(PeerFigures {
                    address,
                    kind,
                    state: p["state"].as_str().unwrap_or("Idle").to_owned(),
                    uptime_seconds: p["uptime_seconds"].as_f64().unwrap_or(0.0),
                    prefixes_received: count(p, "prefixes_received"),
                    prefixes_accepted: count(p, "prefixes_accepted"),
                    prefixes_advertised: count(p, "prefixes_advertised"),
                    messages_in: count(p, "messages_in"),
                    messages_out: count(p, "messages_out"),
                })
            })
            .collect()
    }

    fn established(&self) -> bool {
        self.state == "Established"
    }
}

/// What a peer looked like at the previous render.
#[derive(Debug, Clone, Copy)]
struct PeerMemory {
    established: bool,
    uptime_seconds: f64,
    flaps: u64,
}

/// A histogram fed from the dataplane's running totals (it exposes the count, the sum and the
/// latest latency, not each pass).
#[derive(Debug, Clone)]
struct ApplyHistogram {
    /// Non-cumulative counts per bucket of [`APPLY_SECONDS_BUCKETS`], then `+Inf`.
    buckets: [u64; APPLY_SECONDS_BUCKETS.len() + 1],
    count: u64,
    sum: f64,
    /// The dataplane's running maximum at the last render.
    max: f64,
}

impl ApplyHistogram {
    const fn new() -> Self {
        ApplyHistogram {
            buckets: [0; APPLY_SECONDS_BUCKETS.len() + 1],
            count: 0,
            sum: 0.0,
            max: 0.0,
        }
    }

    fn observe(&mut self, seconds: f64, times: u64) {
        let idx = APPLY_SECONDS_BUCKETS
            .iter()
            .position(|b| seconds <= *b)
            .unwrap_or(APPLY_SECONDS_BUCKETS.len());
        self.buckets[idx] += times;
    }

    /// Folds in the passes that happened since the last render. Known exactly: the latest
    /// pass (`last`) and, when the running maximum grew, one pass that took `max`; any others
    /// are each placed at their mean. `_count` and `_sum` are always exact, so only the bucket
    /// placement of bursts between two renders is approximate.
    fn advance(&mut self, applies: u64, seconds_total: f64, last: f64, max: f64) {
        if applies < self.count {
            // The dataplane restarted its counters: start over with it, as Prometheus would.
            *self = ApplyHistogram::new();
        }
        let new = applies - self.count;
        if new == 0 {
            return;
        }
        let mut rest_seconds = (seconds_total - self.sum).max(0.0) - last;
        let mut rest = new - 1;
        self.observe(last, 1);
        if rest > 0 && max > self.max && max > last {
            self.observe(max, 1);
            rest -= 1;
            rest_seconds -= max;
        }
        if rest > 0 {
            self.observe(rest_seconds.max(0.0) / rest as f64, rest);
        }
        self.count = applies;
        self.sum = seconds_total;
        self.max = self.max.max(max);
    }
}

/// Rendering state kept between scrapes.
#[derive(Debug)]
pub struct Metrics {
    peers: BTreeMap<String, PeerMemory>,
    apply: ApplyHistogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub const fn new() -> Self {
        Metrics {
            peers: BTreeMap::new(),
            apply: ApplyHistogram::new(),
        }
    }

    /// Counts a flap when a session left Established since the last render, or is Established
    /// with a shorter uptime than before (it went down and up between renders).
    fn track_peers(&mut self, peers: &[PeerFigures]) {
        let mut next = BTreeMap::new();
        for p in peers {
            let mut memory = self.peers.get(&p.address).copied().unwrap_or(PeerMemory {
                established: false,
                uptime_seconds: 0.0,
                flaps: 0,
            });
            let up = p.established();
            if memory.established && (!up || p.uptime_seconds < memory.uptime_seconds) {
                memory.flaps += 1;
            }
            memory.established = up;
            memory.uptime_seconds = if up { p.uptime_seconds } else { 0.0 };
            next.insert(p.address.clone(), memory);
        }
        // Removed peers are forgotten: their series disappear with them.
        self.peers = next;
    }

    pub fn render(&mut self, s: &Snapshot<'_>) -> String {
        self.track_peers(s.peers);
        let dp = s.dataplane;
        self.apply.advance(
            dp.applies,
            dp.apply_seconds_total,
            dp.apply_seconds_last,
            dp.apply_seconds_max,
        );

        let mut out = Exposition::default();
        out.family(
            "tortie_build_info",
            "gauge",
            "tortie build; the value is always 1.",
        );
        out.sample(
            "tortie_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))],
            1u64,
        );
        out.family(
            "tortie_ready",
            "gauge",
            "1 when the agent reports ready on /readiness.",
        );
        out.sample("tortie_ready", &[], u64::from(s.ready));

        self.render_bgp(&mut out, s.peers);
        out.family(
            "tortie_bgp_refused_connections_total",
            "counter",
            "BGP connections refused because they came from an address that is no configured peer.",
        );
        out.sample(
            "tortie_bgp_refused_connections_total",
            &[],
            s.bgp_refused_connections,
        );
        self.render_dataplane(&mut out, dp);
        render_ipam(&mut out, s.view, s.workloads, s.releases);

        out.family(
            "tortie_datastore_ready",
            "gauge",
            "1 while every datastore watch is healthy (the API server is reachable).",
        );
        out.sample("tortie_datastore_ready", &[], u64::from(s.datastore_ready));
        out.family(
            "tortie_datastore_watch_restarts_total",
            "counter",
            "Datastore watch failures, each followed by a retry with backoff.",
        );
        out.sample(
            "tortie_datastore_watch_restarts_total",
            &[],
            s.watch_restarts,
        );
        out.finish()
    }

    fn render_bgp(&self, out: &mut Exposition, peers: &[PeerFigures]) {
        out.family(
            "tortie_bgp_peer_state",
            "gauge",
            "1 when the BGP session is Established, else 0.",
        );
        for p in peers {
            out.sample(
                "tortie_bgp_peer_state",
                &[("peer", &p.address), ("type", p.kind)],
                u64::from(p.established()),
            );
        }
        out.family(
            "tortie_bgp_peer_fsm_state",
            "gauge",
            "BGP FSM state of each session: 1 for the current state, 0 for the others.",
        );
        for p in peers {
            for state in BGP_STATES {
                out.sample(
                    "tortie_bgp_peer_fsm_state",
                    &[("peer", &p.address), ("type", p.kind), ("state", state)],
                    u64::from(p.state == state),
                );
            }
        }
        out.family(
            "tortie_bgp_peer_uptime_seconds",
            "gauge",
            "Seconds since the session reached Established; 0 while it is not.",
        );
        for p in peers {
            out.sample(
                "tortie_bgp_peer_uptime_seconds",
                &[("peer", &p.address), ("type", p.kind)],
                if p.established() {
                    p.uptime_seconds
                } else {
                    0.0
                },
            );
        }
        out.family(
            "tortie_bgp_peer_flaps_total",
            "counter",
            "Times the session left Established, counted since the peer was configured.",
        );
        for p in peers {
            let flaps = self.peers.get(&p.address).map_or(0, |m| m.flaps);
            out.sample(
                "tortie_bgp_peer_flaps_total",
                &[("peer", &p.address), ("type", p.kind)],
                flaps,
            );
        }
        out.family(
            "tortie_bgp_prefixes",
            "gauge",
            "Prefixes per session: received (Adj-RIB-In), accepted (passed import), advertised (Adj-RIB-Out).",
        );
        for p in peers {
            for (direction, n) in [
                ("received", p.prefixes_received),
                ("accepted", p.prefixes_accepted),
                ("advertised", p.prefixes_advertised),
            ] {
                out.sample(
                    "tortie_bgp_prefixes",
                    &[
                        ("peer", &p.address),
                        ("type", p.kind),
                        ("direction", direction),
                    ],
                    n,
                );
            }
        }
        out.family(
            "tortie_bgp_messages_total",
            "counter",
            "BGP messages (OPEN, UPDATE, KEEPALIVE, NOTIFICATION, ROUTE-REFRESH) per session and direction.",
        );
        for p in peers {
            for (direction, n) in [("in", p.messages_in), ("out", p.messages_out)] {
                out.sample(
                    "tortie_bgp_messages_total",
                    &[
                        ("peer", &p.address),
                        ("type", p.kind),
                        ("direction", direction),
                    ],
                    n,
                );
            }
        }
    }

    fn render_dataplane(&self, out: &mut Exposition, dp: &Counters) {
        out.family(
            "tortie_routes",
            "gauge",
            "Routes tortie keeps in the kernel, by kind.",
        );
        for kind in RouteKind::ALL {
            let n = dp.routes_by_kind.get(&kind).copied().unwrap_or(0);
            out.sample("tortie_routes", &[("kind", kind.as_str())], n);
        }
        out.family(
            "tortie_routes_waiting",
            "gauge",
            "Desired routes waiting for their interface to appear.",
        );
        out.sample("tortie_routes_waiting", &[], dp.routes_waiting);
        let counters = [
            (
                "tortie_dataplane_applies_total",
                "Reconcile passes that wrote to the kernel.",
                dp.applies,
            ),
            (
                "tortie_dataplane_writes_total",
                "Kernel objects written (routes, neighbours, FDB entries, device changes).",
                dp.writes,
            ),
            (
                "tortie_dataplane_resyncs_total",
                "Full dumps of the kernel state (start, overrun, link change, periodic).",
                dp.resyncs,
            ),
            (
                "tortie_dataplane_overruns_total",
                "Netlink monitor overruns (each forces a resync).",
                dp.monitor_overruns,
            ),
            (
                "tortie_dataplane_routes_restored_total",
                "Routes re-written after something else removed or changed them.",
                dp.routes_restored,
            ),
            (
                "tortie_dataplane_routes_adopted_total",
                "calico-node routes re-marked as tortie's.",
                dp.routes_adopted,
            ),
        ];
        for (name, help, value) in counters {
            out.family(name, "counter", help);
            out.sample(name, &[], value);
        }
        out.family(
            "tortie_netlink_errors_total",
            "counter",
            "Kernel refusals of dataplane changes, by errno.",
        );
        for (errno, n) in &dp.failures_by_errno {
            out.sample(
                "tortie_netlink_errors_total",
                &[("errno", &errno_name(*errno))],
                *n,
            );
        }
        out.family(
            "tortie_dataplane_apply_seconds",
            "histogram",
            "Duration of reconcile passes that wrote to the kernel (bursts between scrapes are bucketed at their mean).",
        );
        let mut cumulative = 0u64;
        for (i, bound) in APPLY_SECONDS_BUCKETS.iter().enumerate() {
            cumulative += self.apply.buckets[i];
            out.sample(
                "tortie_dataplane_apply_seconds_bucket",
                &[("le", &format_float(*bound))],
                cumulative,
            );
        }
        cumulative += self.apply.buckets[APPLY_SECONDS_BUCKETS.len()];
        out.sample(
            "tortie_dataplane_apply_seconds_bucket",
            &[("le", "+Inf")],
            cumulative,
        );
        out.sample("tortie_dataplane_apply_seconds_sum", &[], self.apply.sum);
        out.sample(
            "tortie_dataplane_apply_seconds_count",
            &[],
            self.apply.count,
        );
        out.family(
            "tortie_dataplane_apply_max_seconds",
            "gauge",
            "Longest reconcile pass since the agent started.",
        );
        out.sample(
            "tortie_dataplane_apply_max_seconds",
            &[],
            dp.apply_seconds_max,
        );
        out.family(
            "tortie_dataplane_apply_last_seconds",
            "gauge",
            "Duration of the latest reconcile pass that wrote to the kernel.",
        );
        out.sample(
            "tortie_dataplane_apply_last_seconds",
            &[],
            dp.apply_seconds_last,
        );
    }
}

fn render_ipam(
    out: &mut Exposition,
    view: &ClusterView,
    workloads: usize,
    releases: ReleaseFigures,
) {
    out.family(
        "tortie_ipam_blocks_owned",
        "gauge",
        "IPAM blocks affine to this node.",
    );
    out.sample(
        "tortie_ipam_blocks_owned",
        &[],
        view.my_blocks().len() as u64,
    );
    let usage = view.pools.usage(&view.blocks);
    out.family(
        "tortie_ipam_blocks",
        "gauge",
        "IPAM blocks carved out of each pool, cluster-wide (every node reports the same).",
    );
    for u in &usage {
        out.sample("tortie_ipam_blocks", &[("pool", &u.pool)], u.blocks);
    }
    out.family(
        "tortie_ipam_addresses",
        "gauge",
        "Addresses of each pool in use or free (inside blocks or not yet in one), cluster-wide (every node reports the same).",
    );
    for u in &usage {
        out.sample(
            "tortie_ipam_addresses",
            &[("pool", &u.pool), ("state", "in_use")],
            u.in_use,
        );
        out.sample(
            "tortie_ipam_addresses",
            &[("pool", &u.pool), ("state", "free")],
            u.free_in_blocks.saturating_add(u.unclaimed),
        );
    }
    out.family("tortie_workloads", "gauge", "Pods networked on this node.");
    out.sample("tortie_workloads", &[], workloads as u64);
    out.family(
        "tortie_ipam_pending_releases",
        "gauge",
        "Pod address releases the CNI DEL was answered for, not yet written to the API server.",
    );
    out.sample("tortie_ipam_pending_releases", &[], releases.pending as u64);
    out.family(
        "tortie_ipam_releases_total",
        "counter",
        "Pod address releases written: carried by the next assignment's block write, batched with others, or alone.",
    );
    for (written, n) in [
        ("with_assignment", releases.carried),
        ("batched", releases.batched),
        ("alone", releases.alone),
    ] {
        out.sample("tortie_ipam_releases_total", &[("written", written)], n);
    }
}

/// Symbolic name of the errnos a netlink write can meet; others as their number.
fn errno_name(errno: i32) -> String {
    let name = match errno {
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::ESRCH => "ESRCH",
        libc::EIO => "EIO",
        libc::ENOMEM => "ENOMEM",
        libc::EBUSY => "EBUSY",
        libc::EEXIST => "EEXIST",
        libc::ENODEV => "ENODEV",
        libc::EINVAL => "EINVAL",
        libc::ENOSPC => "ENOSPC",
        libc::ERANGE => "ERANGE",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        libc::EAFNOSUPPORT => "EAFNOSUPPORT",
        libc::EADDRNOTAVAIL => "EADDRNOTAVAIL",
        libc::ENETDOWN => "ENETDOWN",
        libc::ENETUNREACH => "ENETUNREACH",
        libc::ENOBUFS => "ENOBUFS",
        libc::EHOSTUNREACH => "EHOSTUNREACH",
        _ => return errno.to_string(),
    };
    name.to_owned()
}

/// A sample value: counters stay exact integers, gauges may be fractional.
enum Value {
    Int(u64),
    Float(f64),
}

impl From<u64> for Value {
    fn from(v: u64) -> Self {
        Value::Int(v)
    }
}

impl From<f64> for Value {
    fn from(v: f64) -> Self {
        Value::Float(v)
    }
}

/// Prometheus float text: `NaN`, `+Inf` and `-Inf` are spelled its way; Rust's `Display`
/// never uses exponents, which the format allows but does not need.
fn format_float(v: f64) -> String {
    if v.is_nan() {
        "NaN".to_owned()
    } else if v == f64::INFINITY {
        "+Inf".to_owned()
    } else if v == f64::NEG_INFINITY {
        "-Inf".to_owned()
    } else {
        v.to_string()
    }
}

/// Escapes a label value: backslash, double quote and line feed.
fn escape_label(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

/// Escapes HELP text: backslash and line feed.
fn escape_help(v: &str) -> String {
    v.replace('\\', "\\\\").replace('\n', "\\n")
}

/// Text exposition format 0.0.4 writer: each family's `# HELP` and `# TYPE` once, then its
/// samples.
#[derive(Default)]
struct Exposition {
    text: String,
}

impl Exposition {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.text, "# HELP {name} {}", escape_help(help));
        let _ = writeln!(self.text, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl Into<Value>) {
        self.text.push_str(name);
        if !labels.is_empty() {
            self.text.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.text.push(',');
                }
                let _ = write!(self.text, "{k}=\"{}\"", escape_label(v));
            }
            self.text.push('}');
        }
        let _ = match value.into() {
            Value::Int(v) => writeln!(self.text, " {v}"),
            Value::Float(v) => writeln!(self.text, " {}", format_float(v)),
        };
    }

    fn finish(self) -> String {
        self.text
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use tortie_ipam::{IpPool, IpPoolSpec, new_block, validate_pools};

    use super::*;

    fn peer(address: &str, state: &str, uptime: f64) -> PeerFigures {
        PeerFigures {
            address: address.to_owned(),
            kind: "mesh",
            state: state.to_owned(),
            uptime_seconds: uptime,
            prefixes_received: 3,
            prefixes_accepted: 2,
            prefixes_advertised: 1,
            messages_in: 40,
            messages_out: 41,
        }
    }

    /// Two pools; node `a` owns one block of `pool-a` with two addresses in use.
    fn view() -> ClusterView {
        let pool = |name: &str, cidr: &str| {
            IpPool::new(
                name,
                IpPoolSpec {
                    cidr: cidr.into(),
                    block_size: Some(26),
                    ..Default::default()
                },
            )
        };
        let mut v = ClusterView {
            me: "a".into(),
            pools: validate_pools(&[
                pool("pool-a", "10.244.0.0/24"),
                pool("pool-b", "10.245.0.0/24"),
            ]),
            ..ClusterView::default()
        };
        let mut block = new_block("10.244.0.0/26".parse().unwrap(), Some("a"));
        for ordinal in [0u32, 1] {
            block.spec.allocations[ordinal as usize] = Some(0);
            block.spec.unallocated.retain(|o| *o != ordinal);
        }
        v.blocks.push(block.into());
        v.blocks
            .push(new_block("10.244.0.64/26".parse().unwrap(), Some("b")).into());
        v
    }

    fn counters() -> Counters {
        let mut c = Counters::default();
        c.routes_by_kind.insert(RouteKind::Workload, 2);
        c.routes_by_kind.insert(RouteKind::Vxlan, 1);
        c.routes_waiting = 1;
        c.applies = 1;
        c.writes = 5;
        c.apply_seconds_total = 0.003;
        c.apply_seconds_last = 0.003;
        c.apply_seconds_max = 0.003;
        c.failures_by_errno.insert(libc::EEXIST, 2);
        c.failures_by_errno.insert(4242, 1);
        c
    }

    fn render_with(
        m: &mut Metrics,
        view: &ClusterView,
        dp: &Counters,
        peers: &[PeerFigures],
    ) -> String {
        m.render(&Snapshot {
            view,
            dataplane: dp,
            peers,
            bgp_refused_connections: 4,
            workloads: 2,
            releases: ReleaseFigures {
                pending: 3,
                carried: 5,
                batched: 6,
                alone: 1,
            },
            ready: true,
            datastore_ready: true,
            watch_restarts: 7,
        })
    }

    /// One parsed sample line.
    #[derive(Debug, Clone, PartialEq)]
    struct Sample {
        name: String,
        labels: BTreeMap<String, String>,
        value: f64,
    }

    /// Parses exposition text strictly: every sample's family has exactly one `# HELP` and one
    /// `# TYPE` before its first sample, families are contiguous, label values unescape, values
    /// parse as floats. Returns the samples and each family's type.
    fn parse(text: &str) -> (Vec<Sample>, BTreeMap<String, String>) {
        let mut helps = BTreeSet::new();
        let mut types: BTreeMap<String, String> = BTreeMap::new();
        let mut closed = BTreeSet::new();
        let mut current: Option<String> = None;
        let mut samples = Vec::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let name = rest.split(' ').next().unwrap().to_owned();
                assert!(helps.insert(name.clone()), "second HELP for {name}");
                if let Some(c) = current.replace(name.clone())
                    && c != name
                {
                    closed.insert(c);
                }
                continue;
            }
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let mut it = rest.split(' ');
                let name = it.next().unwrap().to_owned();
                let kind = it.next().unwrap().to_owned();
                assert!(
                    ["counter", "gauge", "histogram", "summary", "untyped"]
                        .contains(&kind.as_str()),
                    "bad type {kind}"
                );
                assert!(
                    types.insert(name.clone(), kind).is_none(),
                    "second TYPE for {name}"
                );
                assert_eq!(
                    current.as_deref(),
                    Some(name.as_str()),
                    "TYPE without HELP first"
                );
                continue;
            }
            assert!(!line.starts_with('#'), "unexpected comment {line}");
            let (name, labels, value) = parse_sample(line);
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| {
                    let base = name.strip_suffix(s)?;
                    (types.get(base).map(String::as_str) == Some("histogram"))
                        .then(|| base.to_owned())
                })
                .unwrap_or_else(|| name.clone());
            assert!(helps.contains(&family), "{name} has no HELP");
            assert!(types.contains_key(&family), "{name} has no TYPE");
            assert!(
                !closed.contains(&family),
                "{family}'s samples are not contiguous"
            );
            assert_eq!(
                current.as_deref(),
                Some(family.as_str()),
                "{name} outside its family"
            );
            if types[&family] == "counter" {
                assert!(
                    family.ends_with("_total"),
                    "counter {family} must end in _total"
                );
            }
            samples.push(Sample {
                name,
                labels,
                value,
            });
        }
        assert!(text.ends_with('\n'), "the text ends with a line feed");
        (samples, types)
    }

    fn parse_sample(line: &str) -> (String, BTreeMap<String, String>, f64) {
        let name_end = line.find(['{', ' ']).unwrap();
        let name = &line[..name_end];
        assert!(
            name.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad metric name {name}"
        );
        let mut labels = BTreeMap::new();
        let mut rest = &line[name_end..];
        if let Some(r) = rest.strip_prefix('{') {
            let mut chars = r.char_indices().peekable();
            loop {
                let start = chars.peek().unwrap().0;
                let eq = r[start..].find('=').unwrap() + start;
                let key = &r[start..eq];
                assert!(
                    key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                    "bad label {key}"
                );
                while chars.peek().unwrap().0 <= eq {
                    chars.next();
                }
                assert_eq!(
                    chars.next().unwrap().1,
                    '"',
                    "label value must be quoted in {line}"
                );
                let mut value = String::new();
                loop {
                    match chars.next().unwrap().1 {
                        '\\' => match chars.next().unwrap().1 {
                            '\\' => value.push('\\'),
                            '"' => value.push('"'),
                            'n' => value.push('\n'),
                            c => panic!("bad escape \\{c} in {line}"),
                        },
                        '"' => break,
                        '\n' => panic!("raw line feed in {line}"),
                        c => value.push(c),
                    }
                }
                assert!(
                    labels.insert(key.to_owned(), value).is_none(),
                    "label {key} twice"
                );
                match chars.next().unwrap() {
                    (_, ',') => continue,
                    (i, '}') => {
                        rest = &r[i + 1..];
                        break;
                    }
                    (_, c) => panic!("unexpected {c} in {line}"),
                }
            }
        }
        let value = rest
            .strip_prefix(' ')
            .unwrap_or_else(|| panic!("no value in {line}"));
        let value = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            "NaN" => f64::NAN,
            v => v
                .parse()
                .unwrap_or_else(|_| panic!("bad value {v} in {line}")),
        };
        (name.to_owned(), labels, value)
    }

    fn find(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        samples
            .iter()
            .find(|s| {
                s.name == name
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|s| s.value)
    }

    #[test]
    fn every_family_has_help_and_type_once_and_every_sample_parses() {
        let v = view();
        let peers = [
            peer("10.0.0.2", "Established", 12.5),
            peer("10.0.0.3", "Active", 0.0),
        ];
        let text = render_with(&mut Metrics::new(), &v, &counters(), &peers);
        let (samples, types) = parse(&text);
        for family in [
            "tortie_build_info",
            "tortie_ready",
            "tortie_bgp_peer_state",
            "tortie_bgp_peer_fsm_state",
            "tortie_bgp_peer_uptime_seconds",
            "tortie_bgp_peer_flaps_total",
            "tortie_bgp_prefixes",
            "tortie_bgp_messages_total",
            "tortie_routes",
            "tortie_routes_waiting",
            "tortie_dataplane_applies_total",
            "tortie_dataplane_writes_total",
            "tortie_dataplane_resyncs_total",
            "tortie_dataplane_overruns_total",
            "tortie_dataplane_routes_restored_total",
            "tortie_netlink_errors_total",
            "tortie_dataplane_apply_seconds",
            "tortie_ipam_blocks_owned",
            "tortie_ipam_addresses",
            "tortie_workloads",
            "tortie_datastore_ready",
            "tortie_datastore_watch_restarts_total",
        ] {
            assert!(types.contains_key(family), "{family} missing from\n{text}");
        }
        assert_eq!(types["tortie_dataplane_apply_seconds"], "histogram");
        assert_eq!(
            find(
                &samples,
                "tortie_build_info",
                &[("version", env!("CARGO_PKG_VERSION"))]
            ),
            Some(1.0)
        );
        assert_eq!(find(&samples, "tortie_workloads", &[]), Some(2.0));
        assert_eq!(
            find(&samples, "tortie_bgp_refused_connections_total", &[]),
            Some(4.0)
        );
        assert_eq!(
            find(&samples, "tortie_ipam_pending_releases", &[]),
            Some(3.0)
        );
        assert_eq!(
            find(
                &samples,
                "tortie_ipam_releases_total",
                &[("written", "with_assignment")]
            ),
            Some(5.0)
        );
        assert_eq!(
            find(
                &samples,
                "tortie_ipam_releases_total",
                &[("written", "batched")]
            ),
            Some(6.0)
        );
        assert_eq!(
            find(&samples, "tortie_datastore_watch_restarts_total", &[]),
            Some(7.0)
        );
        assert_eq!(find(&samples, "tortie_routes_waiting", &[]), Some(1.0));
        assert_eq!(
            find(&samples, "tortie_dataplane_writes_total", &[]),
            Some(5.0)
        );
    }

    #[test]
    fn peer_series_carry_state_uptime_prefixes_and_messages() {
        let v = view();
        let peers = [
            peer("10.0.0.2", "Established", 12.5),
            peer("10.0.0.3", "Active", 99.0),
        ];
        let (s, _) = parse(&render_with(&mut Metrics::new(), &v, &counters(), &peers));
        let up = [("peer", "10.0.0.2"), ("type", "mesh")];
        let down = [("peer", "10.0.0.3"), ("type", "mesh")];
        assert_eq!(find(&s, "tortie_bgp_peer_state", &up), Some(1.0));
        assert_eq!(find(&s, "tortie_bgp_peer_state", &down), Some(0.0));
        assert_eq!(find(&s, "tortie_bgp_peer_uptime_seconds", &up), Some(12.5));
        assert_eq!(
            find(&s, "tortie_bgp_peer_uptime_seconds", &down),
            Some(0.0),
            "no uptime while down"
        );
        assert_eq!(
            find(
                &s,
                "tortie_bgp_peer_fsm_state",
                &[("peer", "10.0.0.3"), ("state", "Active")]
            ),
            Some(1.0)
        );
        assert_eq!(
            find(
                &s,
                "tortie_bgp_peer_fsm_state",
                &[("peer", "10.0.0.3"), ("state", "Established")]
            ),
            Some(0.0)
        );
        let one_hot: f64 = s
            .iter()
            .filter(|x| x.name == "tortie_bgp_peer_fsm_state" && x.labels["peer"] == "10.0.0.2")
            .map(|x| x.value)
            .sum();
        assert_eq!(one_hot, 1.0, "exactly one FSM state is current");
        for (direction, n) in [("received", 3.0), ("accepted", 2.0), ("advertised", 1.0)] {
            assert_eq!(
                find(
                    &s,
                    "tortie_bgp_prefixes",
                    &[("peer", "10.0.0.2"), ("direction", direction)]
                ),
                Some(n)
            );
        }
        assert_eq!(
            find(
                &s,
                "tortie_bgp_messages_total",
                &[("peer", "10.0.0.2"), ("direction", "in")]
            ),
            Some(40.0)
        );
        assert_eq!(
            find(
                &s,
                "tortie_bgp_messages_total",
                &[("peer", "10.0.0.2"), ("direction", "out")]
            ),
            Some(41.0)
        );
    }

    #[test]
    fn peer_type_and_figures_come_from_the_routing_status_json() {
        let status = serde_json::json!([
            {"address": "10.0.0.2", "type": "node-to-node mesh (b)", "state": "Established",
             "uptime_seconds": 3.5, "prefixes_received": 4, "prefixes_accepted": 4,
             "prefixes_advertised": 1, "messages_in": 9, "messages_out": 8, "last_error": null},
            {"address": "192.0.2.1", "type": "BGPPeer tor", "state": "Connect",
             "uptime_seconds": null, "prefixes_received": null, "prefixes_accepted": null,
             "prefixes_advertised": null, "messages_in": null, "messages_out": null},
            {"type": "BGPPeer broken"}
        ]);
        let peers = PeerFigures::from_status(&status);
        assert_eq!(peers.len(), 2, "an entry without an address is skipped");
        assert_eq!(peers[0].kind, "mesh");
        assert_eq!(peers[0].uptime_seconds, 3.5);
        assert_eq!(peers[0].messages_in, 9);
        assert_eq!(peers[1].kind, "bgppeer");
        assert_eq!(peers[1].state, "Connect");
        assert_eq!(peers[1].prefixes_received, 0);
        assert!(PeerFigures::from_status(&serde_json::json!({})).is_empty());
    }

    #[test]
    fn flap_is_counted_when_an_established_session_goes_down() {
        let v = view();
        let dp = counters();
        let mut m = Metrics::new();
        let flaps = |m: &mut Metrics, state: &str, uptime: f64| {
            let (s, _) = parse(&render_with(m, &v, &dp, &[peer("10.0.0.2", state, uptime)]));
            find(&s, "tortie_bgp_peer_flaps_total", &[("peer", "10.0.0.2")]).unwrap()
        };
        assert_eq!(flaps(&mut m, "Active", 0.0), 0.0);
        assert_eq!(
            flaps(&mut m, "Established", 1.0),
            0.0,
            "coming up is not a flap"
        );
        assert_eq!(flaps(&mut m, "Established", 2.0), 0.0);
        assert_eq!(flaps(&mut m, "Idle", 0.0), 1.0);
        assert_eq!(
            flaps(&mut m, "Connect", 0.0),
            1.0,
            "staying down is one flap"
        );
        assert_eq!(flaps(&mut m, "Established", 1.0), 1.0);
        assert_eq!(flaps(&mut m, "OpenSent", 0.0), 2.0);
    }

    #[test]
    fn flap_is_counted_when_uptime_restarts_between_renders() {
        let v = view();
        let dp = counters();
        let mut m = Metrics::new();
        let flaps = |m: &mut Metrics, uptime: f64| {
            let (s, _) = parse(&render_with(
                m,
                &v,
                &dp,
                &[peer("10.0.0.2", "Established", uptime)],
            ));
            find(&s, "tortie_bgp_peer_flaps_total", &[("peer", "10.0.0.2")]).unwrap()
        };
        assert_eq!(flaps(&mut m, 30.0), 0.0);
        assert_eq!(flaps(&mut m, 31.0), 0.0);
        assert_eq!(
            flaps(&mut m, 0.4),
            1.0,
            "down and up again within one scrape interval"
        );
    }

    #[test]
    fn removed_peer_series_disappear_and_its_flaps_start_over() {
        let v = view();
        let dp = counters();
        let mut m = Metrics::new();
        render_with(&mut m, &v, &dp, &[peer("10.0.0.2", "Established", 5.0)]);
        render_with(&mut m, &v, &dp, &[peer("10.0.0.2", "Idle", 0.0)]);
        let (s, types) = parse(&render_with(&mut m, &v, &dp, &[]));
        assert!(
            s.iter()
                .all(|x| !x.name.starts_with("tortie_bgp") || !x.labels.contains_key("peer")),
            "no peer series left"
        );
        assert!(
            types.contains_key("tortie_bgp_peer_state"),
            "the family stays declared"
        );
        let (s, _) = parse(&render_with(
            &mut m,
            &v,
            &dp,
            &[peer("10.0.0.2", "Idle", 0.0)],
        ));
        assert_eq!(
            find(&s, "tortie_bgp_peer_flaps_total", &[("peer", "10.0.0.2")]),
            Some(0.0)
        );
    }

    #[test]
    fn routes_are_rendered_for_every_kind_including_absent_ones() {
        let v = view();
        let (s, _) = parse(&render_with(&mut Metrics::new(), &v, &counters(), &[]));
        for (kind, n) in [
            ("workload", 2.0),
            ("vxlan", 1.0),
            ("blackhole", 0.0),
            ("direct", 0.0),
            ("ipip", 0.0),
        ] {
            assert_eq!(
                find(&s, "tortie_routes", &[("kind", kind)]),
                Some(n),
                "{kind}"
            );
        }
    }

    #[test]
    fn netlink_errors_are_labelled_by_errno_name_or_number() {
        let v = view();
        let (s, _) = parse(&render_with(&mut Metrics::new(), &v, &counters(), &[]));
        assert_eq!(
            find(&s, "tortie_netlink_errors_total", &[("errno", "EEXIST")]),
            Some(2.0)
        );
        assert_eq!(
            find(&s, "tortie_netlink_errors_total", &[("errno", "4242")]),
            Some(1.0)
        );
    }

    fn histogram(s: &[Sample]) -> (Vec<(f64, f64)>, f64, f64) {
        let buckets: Vec<(f64, f64)> = s
            .iter()
            .filter(|x| x.name == "tortie_dataplane_apply_seconds_bucket")
            .map(|x| {
                let le = match x.labels["le"].as_str() {
                    "+Inf" => f64::INFINITY,
                    b => b.parse().unwrap(),
                };
                (le, x.value)
            })
            .collect();
        for w in buckets.windows(2) {
            assert!(w[0].0 < w[1].0, "bounds ascend");
            assert!(w[0].1 <= w[1].1, "bucket counts are cumulative");
        }
        let count = find(s, "tortie_dataplane_apply_seconds_count", &[]).unwrap();
        assert_eq!(
            buckets.last().unwrap(),
            &(f64::INFINITY, count),
            "+Inf bucket equals _count"
        );
        (
            buckets,
            count,
            find(s, "tortie_dataplane_apply_seconds_sum", &[]).unwrap(),
        )
    }

    #[test]
    fn a_single_apply_lands_in_its_exact_bucket() {
        let v = view();
        let (s, _) = parse(&render_with(&mut Metrics::new(), &v, &counters(), &[]));
        let (buckets, count, sum) = histogram(&s);
        assert_eq!(count, 1.0);
        assert!((sum - 0.003).abs() < 1e-12);
        let at = |le: f64| buckets.iter().find(|b| b.0 == le).unwrap().1;
        assert_eq!(at(0.0025), 0.0, "3 ms is above the 2.5 ms bound");
        assert_eq!(at(0.005), 1.0);
    }

    #[test]
    fn a_burst_between_scrapes_keeps_count_and_sum_exact() {
        let v = view();
        let mut dp = counters();
        let mut m = Metrics::new();
        render_with(&mut m, &v, &dp, &[]);
        // Four more passes, 2 s in total: the latest took 0.5 ms, the longest 1.2 s (the running
        // maximum grew), so the other two are placed at their mean of ~0.4 s.
        dp.applies = 5;
        dp.apply_seconds_total = 0.003 + 2.0;
        dp.apply_seconds_last = 0.0005;
        dp.apply_seconds_max = 1.2;
        let (s, _) = parse(&render_with(&mut m, &v, &dp, &[]));
        let (buckets, count, sum) = histogram(&s);
        assert_eq!(count, 5.0);
        assert!((sum - 2.003).abs() < 1e-9);
        let at = |le: f64| buckets.iter().find(|b| b.0 == le).unwrap().1;
        assert_eq!(at(0.0005), 1.0, "the latest pass is placed exactly");
        assert_eq!(at(0.005), 2.0, "the first pass stays where it was");
        assert_eq!(at(0.25), 2.0);
        assert_eq!(at(0.5), 4.0, "the other two at their mean");
        assert_eq!(at(1.0), 4.0);
        assert_eq!(at(2.5), 5.0, "the longest pass is placed exactly");
        // No new pass: nothing moves.
        let (s2, _) = parse(&render_with(&mut m, &v, &dp, &[]));
        assert_eq!(histogram(&s2), (buckets, count, sum));
    }

    #[test]
    fn ipam_addresses_are_counted_per_pool_in_use_and_free() {
        let v = view();
        let (s, _) = parse(&render_with(&mut Metrics::new(), &v, &counters(), &[]));
        assert_eq!(find(&s, "tortie_ipam_blocks_owned", &[]), Some(1.0));
        assert_eq!(
            find(&s, "tortie_ipam_blocks", &[("pool", "pool-a")]),
            Some(2.0)
        );
        assert_eq!(
            find(&s, "tortie_ipam_blocks", &[("pool", "pool-b")]),
            Some(0.0)
        );
        assert_eq!(
            find(
                &s,
                "tortie_ipam_addresses",
                &[("pool", "pool-a"), ("state", "in_use")]
            ),
            Some(2.0)
        );
        assert_eq!(
            find(
                &s,
                "tortie_ipam_addresses",
                &[("pool", "pool-a"), ("state", "free")]
            ),
            Some(254.0)
        );
        assert_eq!(
            find(
                &s,
                "tortie_ipam_addresses",
                &[("pool", "pool-b"), ("state", "in_use")]
            ),
            Some(0.0)
        );
        assert_eq!(
            find(
                &s,
                "tortie_ipam_addresses",
                &[("pool", "pool-b"), ("state", "free")]
            ),
            Some(256.0)
        );
    }

    #[test]
    fn label_values_with_quotes_backslashes_and_line_feeds_round_trip() {
        let v = view();
        let odd = "a\"b\\c\nd";
        let (s, _) = parse(&render_with(
            &mut Metrics::new(),
            &v,
            &counters(),
            &[peer(odd, "Established", 1.0)],
        ));
        assert_eq!(
            find(&s, "tortie_bgp_peer_state", &[("peer", odd)]),
            Some(1.0)
        );
        assert_eq!(escape_label(odd), "a\\\"b\\\\c\\nd");
        assert_eq!(escape_help("x\\y\nz"), "x\\\\y\\nz");
    }

    #[test]
    fn special_floats_use_prometheus_spelling() {
        assert_eq!(format_float(f64::NAN), "NaN");
        assert_eq!(format_float(f64::INFINITY), "+Inf");
        assert_eq!(format_float(f64::NEG_INFINITY), "-Inf");
        assert_eq!(format_float(0.00025), "0.00025");
        assert_eq!(format_float(2.0), "2");
    }

    #[test]
    fn readiness_and_datastore_state_are_rendered_as_zero_or_one() {
        let v = view();
        let dp = counters();
        let text = Metrics::new().render(&Snapshot {
            view: &v,
            dataplane: &dp,
            peers: &[],
            bgp_refused_connections: 0,
            workloads: 0,
            releases: ReleaseFigures::default(),
            ready: false,
            datastore_ready: false,
            watch_restarts: 0,
        });
        let (s, _) = parse(&text);
        assert_eq!(find(&s, "tortie_ready", &[]), Some(0.0));
        assert_eq!(find(&s, "tortie_datastore_ready", &[]), Some(0.0));
    }
    /// Metric names a PromQL expression mentions (`tortie_…` identifiers).
    fn metric_names(expr: &str) -> BTreeSet<String> {
        let mut names = BTreeSet::new();
        let mut rest = expr;
        while let Some(i) = rest.find("tortie_") {
            let tail = &rest[i..];
            let end = tail
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(tail.len());
            names.insert(tail[..end].to_owned());
            rest = &tail[end..];
        }
        names
    }

    #[test]
    fn grafana_dashboard_queries_only_metrics_the_agent_renders() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../manifests/grafana/tortie-dashboard.json");
        let dashboard: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert!(dashboard["schemaVersion"].as_u64().unwrap() >= 36);
        let variables: Vec<&str> = dashboard["templating"]["list"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["name"].as_str().unwrap())
            .collect();
        assert_eq!(variables, ["DS_PROMETHEUS", "node"]);

        let v = view();
        let peers = [peer("10.0.0.2", "Established", 1.0)];
        let (_, types) = parse(&render_with(&mut Metrics::new(), &v, &counters(), &peers));
        let series_names: BTreeSet<String> = types
            .iter()
            .flat_map(|(family, kind)| {
                if kind == "histogram" {
                    ["_bucket", "_sum", "_count"]
                        .iter()
                        .map(|s| format!("{family}{s}"))
                        .collect::<Vec<_>>()
                } else {
                    vec![family.clone()]
                }
            })
            .collect();
        let mut ids = BTreeSet::new();
        let mut queried = BTreeSet::new();
        for panel in dashboard["panels"].as_array().unwrap() {
            let title = panel["title"].as_str().unwrap();
            assert!(
                ids.insert(panel["id"].as_u64().unwrap()),
                "panel id of {title} repeats"
            );
            if panel["type"] == "row" {
                continue;
            }
            assert_eq!(panel["datasource"]["uid"], "${DS_PROMETHEUS}", "{title}");
            let targets = panel["targets"].as_array().unwrap();
            assert!(!targets.is_empty(), "{title} has no query");
            for t in targets {
                assert_eq!(t["datasource"]["uid"], "${DS_PROMETHEUS}", "{title}");
                let expr = t["expr"].as_str().unwrap();
                assert!(
                    expr.contains("instance=~\"$node\""),
                    "{title} ignores $node: {expr}"
                );
                for name in metric_names(expr) {
                    assert!(
                        series_names.contains(&name),
                        "{title} queries unknown {name}"
                    );
                    queried.insert(name);
                }
            }
        }
        for must in [
            "tortie_bgp_peer_state",
            "tortie_bgp_peer_flaps_total",
            "tortie_bgp_prefixes",
            "tortie_routes",
            "tortie_dataplane_apply_seconds_bucket",
            "tortie_netlink_errors_total",
            "tortie_ipam_addresses",
        ] {
            assert!(
                queried.contains(must),
                "the dashboard has no panel on {must}"
            );
        }
    }
}
