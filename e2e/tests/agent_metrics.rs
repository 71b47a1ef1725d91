//! The agent's Prometheus `/metrics` on a real cluster: valid exposition text whose key series
//! (BGP peers, routes by kind, reconcile latency, IPAM per pool) carry plausible values, a flap
//! counted when the other node's agent is killed, and a Grafana dashboard that queries only
//! series the agent serves.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use tortie_e2e::cluster::{ClusterSpec, TestCluster, workspace_root};
use tortie_e2e::{TopologySpec, require_root, wait_for};

const POOL_VXLAN: &str = "apiVersion: crd.projectcalico.org/v1\nkind: IPPool\nmetadata:\n  name: default-ipv4-ippool\n\
                          spec:\n  cidr: 10.244.0.0/16\n  ipipMode: Never\n  vxlanMode: Always\n  natOutgoing: false\n";

/// One scrape: family types and samples keyed by name, then sorted labels.
#[derive(Debug, Default)]
struct Scrape {
    types: BTreeMap<String, String>,
    samples: BTreeMap<(String, BTreeMap<String, String>), f64>,
    text: String,
}

impl Scrape {
    /// The value of the one sample named `name` whose labels include `labels`.
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let mut hits = self.samples.iter().filter(|((n, l), _)| {
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
        });
        let (_, value) = hits.next()?;
        hits.next().is_none().then_some(*value)
    }
}

/// Splits `name{a="x",b="y"} 1` into its parts, unescaping label values.
fn parse_sample(line: &str) -> Result<(String, BTreeMap<String, String>, f64)> {
    let name_end = line
        .find(['{', ' '])
        .with_context(|| format!("no value: {line}"))?;
    let name = line[..name_end].to_owned();
    let mut labels = BTreeMap::new();
    let mut rest = &line[name_end..];
    if let Some(mut r) = rest.strip_prefix('{') {
        loop {
            let eq = r
                .find("=\"")
                .with_context(|| format!("bad labels: {line}"))?;
            let key = r[..eq].to_owned();
            let mut value = String::new();
            let mut chars = r[eq + 2..].char_indices();
            let close = loop {
                match chars.next() {
                    Some((_, '\\')) => match chars.next() {
                        Some((_, '\\')) => value.push('\\'),
                        Some((_, '"')) => value.push('"'),
                        Some((_, 'n')) => value.push('\n'),
                        _ => bail!("bad escape in {line}"),
                    },
                    Some((i, '"')) => break eq + 2 + i,
                    Some((_, c)) => value.push(c),
                    None => bail!("unterminated label value in {line}"),
                }
            };
            ensure!(
                labels.insert(key.clone(), value).is_none(),
                "label {key} twice in {line}"
            );
            r = &r[close + 1..];
            if let Some(more) = r.strip_prefix(',') {
                r = more;
            } else if let Some(after) = r.strip_prefix('}') {
                rest = after;
                break;
            } else {
                bail!("bad label list in {line}");
            }
        }
    }
    let value = rest
        .strip_prefix(' ')
        .with_context(|| format!("no value: {line}"))?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        v => v.parse().with_context(|| format!("bad value in {line}"))?,
    };
    Ok((name, labels, value))
}

/// Parses the HTTP reply of `/metrics`, checking the exposition rules a Prometheus server
/// enforces: one HELP and one TYPE per family before its samples, no sample outside a family,
/// no duplicate series.
fn parse_reply(reply: &str) -> Result<Scrape> {
    let (head, body) = reply
        .split_once("\r\n\r\n")
        .context("no end of HTTP headers")?;
    ensure!(head.starts_with("HTTP/1.1 200"), "metrics reply: {head}");
    ensure!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "metrics content type: {head}"
    );
    let mut scrape = Scrape {
        text: body.to_owned(),
        ..Scrape::default()
    };
    let mut helps = BTreeSet::new();
    for line in body.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let name = rest.split(' ').next().unwrap_or_default();
            ensure!(helps.insert(name.to_owned()), "second HELP for {name}");
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').context("TYPE without a type")?;
            ensure!(helps.contains(name), "TYPE before HELP for {name}");
            ensure!(
                scrape
                    .types
                    .insert(name.to_owned(), kind.to_owned())
                    .is_none(),
                "second TYPE for {name}"
            );
        } else {
            let (name, labels, value) = parse_sample(line)?;
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .filter_map(|s| name.strip_suffix(s))
                .find(|base| scrape.types.get(*base).map(String::as_str) == Some("histogram"))
                .unwrap_or(&name)
                .to_owned();
            ensure!(
                scrape.types.contains_key(&family),
                "{name} has no TYPE before it"
            );
            ensure!(
                scrape
                    .samples
                    .insert((name.clone(), labels), value)
                    .is_none(),
                "duplicate series of {name}"
            );
        }
    }
    Ok(scrape)
}

fn scrape(c: &TestCluster, node: &str) -> Result<Scrape> {
    parse_reply(&c.metrics(node)?)
}

/// Waits for a scrape of `node` where `check` passes; the error shows the last failure and text.
fn wait_scrape(
    c: &TestCluster,
    node: &str,
    what: &str,
    timeout: Duration,
    check: impl Fn(&Scrape) -> Result<()>,
) -> Scrape {
    wait_for(what, timeout, || {
        let s = scrape(c, node)?;
        match check(&s) {
            Ok(()) => Ok(Some(s)),
            Err(e) => Err(e.context(format!("scrape of {node}:\n{}", s.text))),
        }
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", c.logs()))
}

fn at_least(s: &Scrape, name: &str, labels: &[(&str, &str)], min: f64) -> Result<()> {
    match s.get(name, labels) {
        Some(v) if v >= min => Ok(()),
        Some(v) => bail!("{name}{labels:?} = {v}, want ≥ {min}"),
        None => bail!("no single series {name}{labels:?}"),
    }
}

fn equals(s: &Scrape, name: &str, labels: &[(&str, &str)], want: f64) -> Result<()> {
    match s.get(name, labels) {
        Some(v) if v == want => Ok(()),
        Some(v) => bail!("{name}{labels:?} = {v}, want {want}"),
        None => bail!("no single series {name}{labels:?}"),
    }
}

/// Metric names a PromQL expression mentions.
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
fn metrics_report_peers_routes_latency_and_ipam_of_a_live_cluster() {
    require_root();
    let spec = ClusterSpec {
        topology: TopologySpec::new().segment(["m1", "m2"]),
        pool_yaml: Some(POOL_VXLAN.to_owned()),
        ..Default::default()
    };
    let Some(mut c) = TestCluster::start(
        "metrics_report_peers_routes_latency_and_ipam_of_a_live_cluster",
        spec,
    )
    .unwrap() else {
        return;
    };
    c.wait_ready(Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e:#}\n{}", c.logs()));
    let pod = c
        .add_pod("m1", "metrics-pod")
        .unwrap_or_else(|e| panic!("{e:#}\n{}", c.logs()));
    let m2 = c.topo.node("m2").addr.to_string();
    let peer = [("peer", m2.as_str()), ("type", "mesh")];

    let s = wait_scrape(
        &c,
        "m1",
        "m1's metrics show the pod, the session to m2 and its routes",
        Duration::from_secs(30),
        |s| {
            equals(s, "tortie_ready", &[], 1.0)?;
            equals(s, "tortie_datastore_ready", &[], 1.0)?;
            equals(s, "tortie_workloads", &[], 1.0)?;
            equals(s, "tortie_bgp_peer_state", &peer, 1.0)?;
            // m2's block, learned over the mesh; m1's own block(s), advertised to it.
            at_least(
                s,
                "tortie_bgp_prefixes",
                &[("peer", &m2), ("direction", "received")],
                1.0,
            )?;
            at_least(
                s,
                "tortie_bgp_prefixes",
                &[("peer", &m2), ("direction", "accepted")],
                1.0,
            )?;
            at_least(
                s,
                "tortie_bgp_prefixes",
                &[("peer", &m2), ("direction", "advertised")],
                1.0,
            )?;
            at_least(s, "tortie_routes", &[("kind", "workload")], 1.0)?;
            at_least(s, "tortie_routes", &[("kind", "blackhole")], 1.0)?;
            at_least(s, "tortie_routes", &[("kind", "vxlan")], 1.0)?;
            // The pod and both nodes' VXLAN tunnel addresses come from the pool.
            at_least(
                s,
                "tortie_ipam_addresses",
                &[("pool", "default-ipv4-ippool"), ("state", "in_use")],
                3.0,
            )?;
            at_least(s, "tortie_dataplane_apply_seconds_count", &[], 1.0)?;
            Ok(())
        },
    );

    // A BGP connection from an address that is no peer (the router): refused and counted.
    equals(&s, "tortie_bgp_refused_connections_total", &[], 0.0).unwrap();
    let m1 = std::net::SocketAddr::from((c.topo.node("m1").addr, 179));
    c.topo
        .router
        .as_ref()
        .expect("the cluster's router")
        .ns
        .enter(move || std::net::TcpStream::connect_timeout(&m1, Duration::from_secs(2)))
        .unwrap()
        .expect("TCP connect to m1:179 (accepted, then closed as no peer)");
    wait_scrape(
        &c,
        "m1",
        "m1 counts the refused BGP connection",
        Duration::from_secs(10),
        |s| equals(s, "tortie_bgp_refused_connections_total", &[], 1.0),
    );
    equals(
        &s,
        "tortie_build_info",
        &[("version", env!("CARGO_PKG_VERSION"))],
        1.0,
    )
    .unwrap();
    for (kind, want) in [("direct", 0.0), ("ipip", 0.0)] {
        equals(&s, "tortie_routes", &[("kind", kind)], want)
            .unwrap_or_else(|e| panic!("{e:#} (a VXLAN-only pool)\n{}", s.text));
    }
    equals(&s, "tortie_bgp_peer_flaps_total", &peer, 0.0).unwrap();
    at_least(&s, "tortie_bgp_peer_uptime_seconds", &peer, 0.001).unwrap();
    for direction in ["in", "out"] {
        // OPEN, KEEPALIVE and at least one UPDATE each way.
        at_least(
            &s,
            "tortie_bgp_messages_total",
            &[("peer", &m2), ("direction", direction)],
            3.0,
        )
        .unwrap_or_else(|e| panic!("{e:#}\n{}", s.text));
    }
    equals(
        &s,
        "tortie_bgp_peer_fsm_state",
        &[("peer", &m2), ("state", "Established")],
        1.0,
    )
    .unwrap();
    at_least(&s, "tortie_ipam_blocks_owned", &[], 1.0).unwrap();
    let in_use = s
        .get(
            "tortie_ipam_addresses",
            &[("pool", "default-ipv4-ippool"), ("state", "in_use")],
        )
        .unwrap();
    let free = s
        .get(
            "tortie_ipam_addresses",
            &[("pool", "default-ipv4-ippool"), ("state", "free")],
        )
        .unwrap();
    assert_eq!(in_use + free, 65536.0, "a /16 pool: in use + free");
    let count = s.get("tortie_dataplane_apply_seconds_count", &[]).unwrap();
    assert_eq!(
        s.get("tortie_dataplane_apply_seconds_bucket", &[("le", "+Inf")]),
        Some(count),
        "+Inf bucket equals _count"
    );
    let sum = s.get("tortie_dataplane_apply_seconds_sum", &[]).unwrap();
    assert!(
        sum > 0.0 && sum < 60.0 * count,
        "apply seconds sum {sum} over {count} passes"
    );
    // The longest pass is placed exactly and no pass is placed above it.
    let max = s.get("tortie_dataplane_apply_max_seconds", &[]).unwrap();
    let mut buckets: Vec<(f64, f64)> = s
        .samples
        .iter()
        .filter(|((n, _), _)| n == "tortie_dataplane_apply_seconds_bucket")
        .map(|((_, l), v)| (l["le"].parse::<f64>().unwrap_or(f64::INFINITY), *v))
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let holding_max = buckets.iter().find(|(le, _)| *le >= max).unwrap();
    assert_eq!(
        holding_max.1, count,
        "every pass ≤ the max {max}: {buckets:?}"
    );
    let below_max = buckets.iter().rev().find(|(le, _)| *le < max);
    assert!(
        below_max.is_none_or(|(_, n)| *n < count),
        "the max pass {max} sits above the bucket below it: {buckets:?}"
    );
    for (name, kind) in [
        ("tortie_dataplane_apply_seconds", "histogram"),
        ("tortie_bgp_peer_flaps_total", "counter"),
        ("tortie_netlink_errors_total", "counter"),
        ("tortie_datastore_watch_restarts_total", "counter"),
        ("tortie_ipam_addresses", "gauge"),
    ] {
        assert_eq!(
            s.types.get(name).map(String::as_str),
            Some(kind),
            "{name}'s TYPE"
        );
    }

    // Every metric the dashboard queries is served by a live agent.
    let path = workspace_root().join("manifests/grafana/tortie-dashboard.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap())
            .unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()));
    let served: BTreeSet<&str> = s.samples.keys().map(|(n, _)| n.as_str()).collect();
    let mut queried = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        for t in panel["targets"].as_array().into_iter().flatten() {
            for name in metric_names(t["expr"].as_str().unwrap()) {
                // Families that may legitimately have no series yet (no netlink error so far).
                let family_declared = s.types.contains_key(&name);
                assert!(
                    served.contains(name.as_str()) || family_declared,
                    "panel {} queries {name}, which the agent does not serve",
                    panel["title"]
                );
                queried += 1;
            }
        }
    }
    assert!(queried >= 20, "the dashboard queries {queried} metrics");

    // Killing m2's agent drops the session: m1 counts a flap and shows it down; once m2 is back
    // the session is Established again and the flap stays counted.
    c.kill_agent("m2").unwrap();
    wait_scrape(
        &c,
        "m1",
        "m1 counts a flap of the session to m2",
        Duration::from_secs(30),
        |s| {
            at_least(s, "tortie_bgp_peer_flaps_total", &peer, 1.0)?;
            equals(s, "tortie_bgp_peer_state", &peer, 0.0)?;
            equals(s, "tortie_bgp_peer_uptime_seconds", &peer, 0.0)
        },
    );
    c.restart_agent("m2").unwrap();
    wait_scrape(
        &c,
        "m1",
        "m1's session to m2 is back with the flap still counted",
        Duration::from_secs(60),
        |s| {
            equals(s, "tortie_bgp_peer_state", &peer, 1.0)?;
            at_least(s, "tortie_bgp_peer_flaps_total", &peer, 1.0)
        },
    );
    c.del_pod(&pod).unwrap();
    wait_scrape(
        &c,
        "m1",
        "m1's metrics drop the deleted pod",
        Duration::from_secs(30),
        |s| equals(s, "tortie_workloads", &[], 0.0),
    );
}
