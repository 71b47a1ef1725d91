//! Renders the agent's Prometheus metrics text (names `tortie_*`, small label sets).

use std::fmt::Write as _;

use tortie_dataplane::Counters;

use crate::cluster::ClusterView;

pub fn render(
    view: &ClusterView,
    dp: &Counters,
    peers: &serde_json::Value,
    workloads: usize,
) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# HELP tortie_build_info tortie version.\n# TYPE tortie_build_info gauge"
    );
    let _ = writeln!(
        out,
        "tortie_build_info{{version=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION")
    );
    let _ = writeln!(
        out,
        "# HELP tortie_routes Routes tortie keeps in the kernel, by kind.\n# TYPE tortie_routes gauge"
    );
    for (kind, n) in &dp.routes_by_kind {
        let _ = writeln!(out, "tortie_routes{{kind=\"{}\"}} {n}", kind.as_str());
    }
    let _ = writeln!(
        out,
        "# TYPE tortie_dataplane_applies_total counter\ntortie_dataplane_applies_total {}",
        dp.applies
    );
    let _ = writeln!(
        out,
        "# TYPE tortie_dataplane_resyncs_total counter\ntortie_dataplane_resyncs_total {}",
        dp.resyncs
    );
    let _ = writeln!(
        out,
        "# TYPE tortie_dataplane_routes_restored_total counter\ntortie_dataplane_routes_restored_total {}",
        dp.routes_restored
    );
    let _ = writeln!(out, "# TYPE tortie_netlink_errors_total counter");
    for (errno, n) in &dp.failures_by_errno {
        let _ = writeln!(out, "tortie_netlink_errors_total{{errno=\"{errno}\"}} {n}");
    }
    let _ = writeln!(
        out,
        "# TYPE tortie_dataplane_apply_seconds_total counter\ntortie_dataplane_apply_seconds_total {}",
        dp.apply_seconds_total
    );
    let _ = writeln!(
        out,
        "# TYPE tortie_dataplane_apply_seconds_max gauge\ntortie_dataplane_apply_seconds_max {}",
        dp.apply_seconds_max
    );
    let _ = writeln!(
        out,
        "# TYPE tortie_ipam_blocks_owned gauge\ntortie_ipam_blocks_owned {}",
        view.my_blocks().len()
    );
    let _ = writeln!(
        out,
        "# TYPE tortie_workloads gauge\ntortie_workloads {workloads}"
    );
    let _ = writeln!(
        out,
        "# TYPE tortie_datastore_watch_restarts_total counter\ntortie_datastore_watch_restarts_total {}",
        crate::datastore::watch::WATCH_RESTARTS.load(std::sync::atomic::Ordering::Relaxed)
    );
    let _ = writeln!(
        out,
        "# HELP tortie_bgp_peer_state 1 when the session is Established.\n# TYPE tortie_bgp_peer_state gauge"
    );
    if let Some(peers) = peers.as_array() {
        for p in peers {
            let addr = p["address"].as_str().unwrap_or("?");
            let up = u8::from(p["state"].as_str() == Some("Established"));
            let _ = writeln!(out, "tortie_bgp_peer_state{{peer=\"{addr}\"}} {up}");
        }
    }
    out
}
