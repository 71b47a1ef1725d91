//! IPAM per pod through the real API server: the CNI plugin's Assign and Release requests to a
//! running agent (affine block with room), p50/p99 as the runtime sees them, and API writes
//! per pod, beside what the same API server takes in the same run for two IPAMBlock writes
//! (a write-per-operation IPAM's least) and for a ConfigMap create + delete.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use tortie_e2e::TopologySpec;
use tortie_e2e::cluster::{ClusterSpec, TestCluster};

/// Pods measured; `TORTIE_BENCH_PODS` overrides (e.g. a longer run to profile the API server).
fn pods() -> usize {
    std::env::var("TORTIE_BENCH_PODS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300)
}

fn call(socket: &Path, req: &serde_json::Value) -> serde_json::Value {
    let mut s = UnixStream::connect(socket).expect("agent socket");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut line = req.to_string();
    line.push('\n');
    s.write_all(line.as_bytes()).unwrap();
    let mut reply = String::new();
    BufReader::new(&s).read_line(&mut reply).unwrap();
    let v: serde_json::Value = serde_json::from_str(&reply).unwrap();
    assert_eq!(v["ok"], true, "agent refused {req}: {v}");
    v
}

/// CPU seconds (user + system) a process has used so far, from `/proc/<pid>/stat`.
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit(')').next().unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    (ticks(11) + ticks(12)) / 100.0
}

/// Other nodes' blocks in the datastore during the run; `TORTIE_BENCH_FOREIGN_BLOCKS`
/// overrides.
fn foreign_blocks() -> usize {
    std::env::var("TORTIE_BENCH_FOREIGN_BLOCKS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(500)
}

/// Pods assigned at once in the burst phase.
const PARALLEL: usize = 50;

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p / 100.0).round() as usize]
}

/// Sum of mutating requests the API server has served (its own counter).
fn api_writes(c: &TestCluster) -> f64 {
    let m = c.kubectl(&["get", "--raw", "/metrics"]).unwrap();
    m.lines()
        .filter(|l| l.starts_with("apiserver_request_total{"))
        .filter(|l| {
            [
                "verb=\"POST\"",
                "verb=\"PUT\"",
                "verb=\"PATCH\"",
                "verb=\"DELETE\"",
            ]
            .iter()
            .any(|v| l.contains(v))
        })
        .filter(|l| l.contains("group=\"crd.projectcalico.org\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Seconds the API server spent serving Calico's kinds, and how many requests: its own
/// `apiserver_request_duration_seconds` sum and count (watches excluded).
fn api_server_time(c: &TestCluster) -> (f64, f64) {
    let m = c.kubectl(&["get", "--raw", "/metrics"]).unwrap();
    let total = |metric: &str| -> f64 {
        m.lines()
            .filter(|l| l.starts_with(metric))
            .filter(|l| {
                l.contains("group=\"crd.projectcalico.org\"") && !l.contains("verb=\"WATCH\"")
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    (
        total("apiserver_request_duration_seconds_sum{"),
        total("apiserver_request_duration_seconds_count{"),
    )
}

/// Requests per verb+resource for Calico's kinds, for the breakdown printed with the figures.
fn api_requests(c: &TestCluster) -> std::collections::BTreeMap<String, f64> {
    let m = c.kubectl(&["get", "--raw", "/metrics"]).unwrap();
    let mut out = std::collections::BTreeMap::new();
    for l in m.lines().filter(|l| {
        l.starts_with("apiserver_request_total{") && l.contains("crd.projectcalico.org")
    }) {
        let label = |k: &str| {
            l.split(&format!("{k}=\""))
                .nth(1)
                .and_then(|r| r.split('"').next())
                .unwrap_or("")
                .to_owned()
        };
        let n: f64 = l
            .rsplit(' ')
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        *out.entry(format!(
            "{} {} {}",
            label("verb"),
            label("resource"),
            label("code")
        ))
        .or_insert(0.0) += n;
    }
    out
}

fn main() {
    let spec = ClusterSpec {
        topology: TopologySpec::new().segment(["n1"]),
        pool_yaml: Some(
            "apiVersion: crd.projectcalico.org/v1\nkind: IPPool\nmetadata:\n  name: p\nspec:\n  cidr: 10.244.0.0/16\n"
                .into(),
        ),
        ..Default::default()
    };
    let c = TestCluster::start("ipam_api_bench", spec)
        .unwrap()
        .expect("kube binaries (make deps)");
    c.wait_ready(Duration::from_secs(60)).unwrap();
    // Other nodes' blocks, as in a large cluster: the agent's caches, its release scan and
    // its recompute on every block event all see them.
    let foreign = foreign_blocks();
    // The pool is a /16: 1024 blocks of /26. With all 1024 taken by other nodes the measured
    // node has no block of its own and borrows every address (Calico's behaviour without
    // strictAffinity), which measures the borrowing path instead.
    assert!(
        foreign <= 1024,
        "TORTIE_BENCH_FOREIGN_BLOCKS={foreign}: the bench pool holds 1024 blocks"
    );
    if foreign > 0 {
        let t = Instant::now();
        let mut items = Vec::new();
        for i in 0..foreign {
            let cidr = format!("10.244.{}.{}/26", i / 4, (i % 4) * 64);
            let name = cidr.replace(['.', '/'], "-");
            let node = format!("ghost-{i}");
            items.push(serde_json::json!({
                "apiVersion": "crd.projectcalico.org/v1", "kind": "IPAMBlock",
                "metadata": {"name": name},
                "spec": {"cidr": cidr, "affinity": format!("host:{node}"),
                         "allocations": vec![serde_json::Value::Null; 64],
                         "unallocated": (0..64).collect::<Vec<u32>>(),
                         "attributes": [], "strictAffinity": false}
            }));
            items.push(serde_json::json!({
                "apiVersion": "crd.projectcalico.org/v1", "kind": "BlockAffinity",
                "metadata": {"name": format!("{node}-{name}")},
                "spec": {"cidr": cidr, "node": node, "state": "confirmed", "deleted": "false"}
            }));
        }
        // kubectl's client-side schema check rejects the null allocations the API server takes.
        let file =
            std::env::temp_dir().join(format!("tortie-bench-blocks-{}.json", std::process::id()));
        std::fs::write(
            &file,
            serde_json::json!({"apiVersion": "v1", "kind": "List", "items": items}).to_string(),
        )
        .unwrap();
        c.kubectl(&["create", "--validate=false", "-f", &file.to_string_lossy()])
            .expect("create the other nodes' blocks");
        let _ = std::fs::remove_file(&file);
        eprintln!(
            "{foreign} other nodes' blocks and affinities created in {:?}",
            t.elapsed()
        );
    }
    let socket = c.agent("n1").run_dir().join("tortie.sock");
    // Warm-up claims the node's block, so every measured pod finds an affine block with room.
    let warm = serde_json::json!({"op":"assign","container_id":"warm","namespace":"default","pod":"warm","ipv4":true,"ipv6":false});
    call(&socket, &warm);
    let writes_before = api_writes(&c);
    let requests_before = api_requests(&c);
    let server_before = api_server_time(&c);
    let mut processes: Vec<(&str, u32)> = c.api.pids();
    if let Some(p) = &c.agent("n1").proc {
        processes.push(("tortie agent", p.pid()));
    }
    let cpu_before: Vec<f64> = processes.iter().map(|(_, pid)| cpu_secs(*pid)).collect();
    let mut samples = Vec::with_capacity(pods());
    // (wall-clock start, assign ms, release ms) per pod, to match the slowest against the
    // agent's log (TORTIE_AGENT_LOG=tortie=debug prints each API call's latency).
    let mut per_pod = Vec::with_capacity(pods());
    for i in 0..pods() {
        let id = format!("bench-{i}");
        let wall = std::time::SystemTime::now();
        let t = Instant::now();
        call(
            &socket,
            &serde_json::json!({"op":"assign","container_id":id,"namespace":"default","pod":id,"ipv4":true,"ipv6":false}),
        );
        let assigned = t.elapsed().as_secs_f64() * 1000.0;
        call(
            &socket,
            &serde_json::json!({"op":"release","container_id":id}),
        );
        let total = t.elapsed().as_secs_f64() * 1000.0;
        samples.push(total);
        per_pod.push((wall, assigned, total - assigned));
    }
    assert_only_the_warm_pod_is_left(&c, &socket);
    for ((name, pid), before) in processes.iter().zip(&cpu_before) {
        eprintln!(
            "CPU per pod: {name} {:.2} ms",
            (cpu_secs(*pid) - before) * 1000.0 / pods() as f64
        );
    }
    let mut assign_ms: Vec<f64> = per_pod.iter().map(|p| p.1).collect();
    let mut release_ms: Vec<f64> = per_pod.iter().map(|p| p.2).collect();
    assign_ms.sort_by(f64::total_cmp);
    release_ms.sort_by(f64::total_cmp);
    eprintln!(
        "assign p50 {:.2} ms p99 {:.2} ms; release p50 {:.2} ms p99 {:.2} ms",
        percentile(&assign_ms, 50.0),
        percentile(&assign_ms, 99.0),
        percentile(&release_ms, 50.0),
        percentile(&release_ms, 99.0)
    );
    per_pod.sort_by(|a, b| (b.1 + b.2).total_cmp(&(a.1 + a.2)));
    for (wall, a, r) in per_pod.iter().take(5) {
        let since_epoch = wall
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        eprintln!(
            "slow pod: started {}.{:06} s since the epoch, assign {a:.2} ms, release {r:.2} ms",
            since_epoch.as_secs(),
            since_epoch.subsec_micros()
        );
    }
    if let Ok(path) = std::env::var("TORTIE_BENCH_AGENT_LOG") {
        // With TORTIE_AGENT_LOG=tortie=debug the log has every API call's latency.
        std::fs::write(&path, c.agent("n1").log()).expect("writing the agent log");
        eprintln!("agent log: {path}");
    }
    let writes = (api_writes(&c) - writes_before) / pods() as f64;
    let server_after = api_server_time(&c);
    let server_secs = server_after.0 - server_before.0;
    let server_requests = server_after.1 - server_before.1;
    // How much of a pod's time is the API server's own handling (the rest: network, the agent,
    // the socket round trips).
    eprintln!(
        "API server time per pod: {:.2} ms of {:.2} ms (mean), over {:.1} requests ({:.2} ms each)",
        server_secs * 1000.0 / pods() as f64,
        samples.iter().sum::<f64>() / pods() as f64,
        server_requests / pods() as f64,
        server_secs * 1000.0 / server_requests.max(1.0)
    );
    for (k, v) in api_requests(&c) {
        let d = v - requests_before.get(&k).copied().unwrap_or(0.0);
        if d > 0.0 {
            eprintln!("per pod: {:>5.2} {k}", d / pods() as f64);
        }
    }
    samples.sort_by(f64::total_cmp);

    // A burst: PARALLEL pods at once (a node's pods restarting after a reboot, a scale-up).
    let requests_before = api_requests(&c);
    let writes_before = api_writes(&c);
    let burst = std::time::Instant::now();
    let mut burst_ms: Vec<f64> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..PARALLEL)
            .map(|i| {
                let socket = &socket;
                s.spawn(move || {
                    let id = format!("burst-{i}");
                    let t = Instant::now();
                    call(
                        socket,
                        &serde_json::json!({"op":"assign","container_id":id,"namespace":"default","pod":id,"ipv4":true,"ipv6":false}),
                    );
                    t.elapsed().as_secs_f64() * 1000.0
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let burst_total = burst.elapsed();
    burst_ms.sort_by(f64::total_cmp);
    eprintln!(
        "burst of {PARALLEL} assigns: p50 {:.2} ms p99 {:.2} ms, all done in {:.2} ms",
        percentile(&burst_ms, 50.0),
        percentile(&burst_ms, 99.0),
        burst_total.as_secs_f64() * 1000.0
    );
    let burst_writes = (api_writes(&c) - writes_before) / PARALLEL as f64;
    for (k, v) in api_requests(&c) {
        let d = v - requests_before.get(&k).copied().unwrap_or(0.0);
        if d > 0.0 {
            eprintln!("burst, per pod: {:>5.2} {k}", d / PARALLEL as f64);
        }
    }
    std::thread::scope(|s| {
        for i in 0..PARALLEL {
            let socket = &socket;
            s.spawn(move || {
                call(
                    socket,
                    &serde_json::json!({"op":"release","container_id":format!("burst-{i}")}),
                );
            });
        }
    });
    assert_only_the_warm_pod_is_left(&c, &socket);

    // The floor: two writes of one small object straight to the same API server, from a
    // thread inside the router namespace where it listens.
    let router = &c.topo.router.as_ref().unwrap().ns;
    let kubeconfig_path = c.api.admin_kubeconfig().to_path_buf();
    let (floor, block_floor): (Vec<f64>, Vec<f64>) = router
        .enter(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let kubeconfig = kube::config::Kubeconfig::read_from(&kubeconfig_path).unwrap();
                let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
                    .await
                    .unwrap();
                let client = kube::Client::try_from(config).unwrap();
                let api: kube::Api<k8s_openapi::api::core::v1::ConfigMap> =
                    kube::Api::namespaced(client.clone(), "default");
                let mut v = Vec::new();
                for i in 0..pods() {
                    let cm: k8s_openapi::api::core::v1::ConfigMap = serde_json::from_value(
                        serde_json::json!({"metadata": {"name": format!("floor-{i}")}}),
                    )
                    .unwrap();
                    let t = Instant::now();
                    api.create(&Default::default(), &cm).await.unwrap();
                    api.delete(&format!("floor-{i}"), &Default::default())
                        .await
                        .unwrap();
                    v.push(t.elapsed().as_secs_f64() * 1000.0);
                }
                v.sort_by(f64::total_cmp);
                (v, two_block_writes(client).await)
            })
        })
        .unwrap();
    eprintln!(
        "API server floors: ConfigMap create+delete p50 {:.2} p99 {:.2} ms; two IPAMBlock replaces p50 {:.2} p99 {:.2} ms",
        percentile(&floor, 50.0),
        percentile(&floor, 99.0),
        percentile(&block_floor, 50.0),
        percentile(&block_floor, 99.0)
    );
    for (name, p) in [("p50", 50.0), ("p99", 99.0)] {
        println!(
            "BENCH name=ipam_assign_release_api_{name} unit=ms tortie={:.2} ref=apiserver_two_block_replaces:{:.2} better=lower",
            percentile(&samples, p),
            percentile(&block_floor, p)
        );
    }
    println!(
        "BENCH name=ipam_api_writes_per_pod unit=writes tortie={writes:.1} ref=apiserver_create_delete:2 better=lower"
    );
    // The burst's reference: the block written once per pod, one write after another, as an
    // IPAM serialized per host needs at least (25 × the mean of the two-write samples).
    let in_a_row =
        block_floor.iter().sum::<f64>() / block_floor.len() as f64 * PARALLEL as f64 / 2.0;
    println!(
        "BENCH name=ipam_assign_burst_{PARALLEL}_all_done unit=ms tortie={:.1} ref=apiserver_{PARALLEL}_block_replaces_in_a_row:{in_a_row:.1} better=lower",
        burst_total.as_secs_f64() * 1000.0
    );
    println!(
        "BENCH name=ipam_assign_burst_{PARALLEL}_writes_per_pod unit=writes tortie={burst_writes:.1} ref=apiserver_create:1 better=lower"
    );
}

/// Waits for the agent's pending releases to drain, then checks exactly the warm-up pod's
/// address is left allocated.
fn assert_only_the_warm_pod_is_left(c: &TestCluster, socket: &Path) {
    // DEL is answered once its release is recorded; the next ADD's block write carries it, and
    // the last one is written when its window closes. None may be left behind.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = call(socket, &serde_json::json!({"op":"status"}));
        if status["status"]["pending_releases"] == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "releases still pending 10 s after the bench: {status}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Exactly the warm-up pod's address is left allocated (in n1's block, or borrowed from
    // another's when the pool is full; the other nodes' blocks start empty).
    let blocks = c
        .kubectl(&["get", "ipamblocks.crd.projectcalico.org", "-o", "json"])
        .unwrap();
    let blocks: serde_json::Value = serde_json::from_str(&blocks).unwrap();
    let held: usize = blocks["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            b["spec"]["allocations"]
                .as_array()
                .map_or(0, |a| a.iter().filter(|x| !x.is_null()).count())
        })
        .sum();
    assert_eq!(held, 1, "addresses left allocated after the bench");
}

/// What an IPAM that writes the block at every assignment and every release (as Calico's CNI
/// plugin does) needs at least per pod: two block writes. Measured as two replaces of a copy of
/// the agent's block (outside every pool, no affinity), each changing one allocation, from a
/// client beside the API server. tortie writes the block once per pod (the release rides on the
/// next assignment's write), so it can come in under this.
async fn two_block_writes(client: kube::Client) -> Vec<f64> {
    use kube::api::{Api, DynamicObject, PostParams};
    let resource = kube::discovery::ApiResource {
        group: "crd.projectcalico.org".into(),
        version: "v1".into(),
        api_version: "crd.projectcalico.org/v1".into(),
        kind: "IPAMBlock".into(),
        plural: "ipamblocks".into(),
    };
    let api: Api<DynamicObject> = Api::all_with(client, &resource);
    let real = api
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .next()
        .expect("the agent's block");
    let mut spec = real.data["spec"].clone();
    spec["cidr"] = serde_json::json!("192.0.2.0/26");
    spec["affinity"] = serde_json::Value::Null;
    let scratch: DynamicObject = serde_json::from_value(serde_json::json!({
        "apiVersion": "crd.projectcalico.org/v1",
        "kind": "IPAMBlock",
        "metadata": {"name": "192-0-2-0-26"},
        "spec": spec,
    }))
    .unwrap();
    let mut current = api.create(&PostParams::default(), &scratch).await.unwrap();
    let mut v = Vec::new();
    for i in 0..pods() {
        let t = Instant::now();
        for taken in [true, false] {
            current.data["spec"]["allocations"][1] = if taken {
                serde_json::json!(0)
            } else {
                serde_json::Value::Null
            };
            current.data["spec"]["sequenceNumber"] = serde_json::json!(2 * i + usize::from(taken));
            current = api
                .replace("192-0-2-0-26", &PostParams::default(), &current)
                .await
                .unwrap();
        }
        v.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    api.delete("192-0-2-0-26", &Default::default())
        .await
        .unwrap();
    v.sort_by(f64::total_cmp);
    v
}
