//! ADD and DEL latency of the tortie CNI plugin against Debian's `bridge` + `host-local`,
//! measured in the same run on the same node: 500 pods one after another, then 50 at once.
//! Prints `BENCH` lines. Each latency is the runtime's view: spawn the plugin, feed stdin,
//! wait for exit. Tortie's agent is the in-test stand-in (answers at once, as the real one
//! does when the node's affine block has room, and, like it, removes the host veth after
//! answering DEL). Those background removals are waited for before anything else is timed, so
//! they never slow the reference down, and how long they ran on is printed as a FIGURE.
//!
//! Run: `cargo bench -p tortie-e2e --bench cni` (about a minute), or `make bench`.

#[path = "../tests/cni_support.rs"]
mod support;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::{FakeAgent, PodRef, tortie_binary, tortie_config};
use tortie_e2e::{TopologySpec, require_root};

const SEQUENTIAL_PODS: usize = 500;
const PARALLEL_PODS: usize = 50;
const REFERENCE: &str = "bridge+host-local";
/// How long the stand-in's background veth removals may run on after the last DEL.
const DRAIN_LIMIT: Duration = Duration::from_secs(60);

/// One plugin run from the calling thread (which is inside the node's namespace), timed.
fn timed_run(
    binary: &Path,
    cni_path: &str,
    command: &str,
    pod: &PodRef,
    config: &[u8],
) -> Duration {
    let start = Instant::now();
    let mut child = Command::new(binary)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", &pod.container_id)
        .env("CNI_NETNS", &pod.netns)
        .env("CNI_IFNAME", &pod.ifname)
        .env("CNI_ARGS", pod.cni_args())
        .env("CNI_PATH", cni_path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning the plugin");
    child.stdin.take().unwrap().write_all(config).unwrap();
    let out = child.wait_with_output().unwrap();
    let elapsed = start.elapsed();
    assert!(
        out.status.success(),
        "{} {command} failed: {} {}",
        binary.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    elapsed
}

/// Many pod namespaces made with one `ip -batch` (`Netns::create` per pod would cost more
/// than the benchmark itself); named like the test bed's so a killed run is swept too.
struct PodNamespaces {
    names: Vec<String>,
}

impl PodNamespaces {
    fn create(count: usize) -> PodNamespaces {
        let names: Vec<String> = (0..count)
            .map(|i| {
                format!(
                    "{}{}-benchpod-{i}",
                    tortie_e2e::netns::PREFIX,
                    std::process::id()
                )
            })
            .collect();
        let pods = PodNamespaces { names };
        pods.batch("add");
        pods
    }

    fn batch(&self, verb: &str) {
        let script: String = self
            .names
            .iter()
            .map(|n| format!("netns {verb} {n}\n"))
            .collect();
        let mut child = Command::new("ip")
            .args(["-force", "-batch", "-"])
            .stdin(Stdio::piped())
            .spawn()
            .expect("running ip -batch");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(script.as_bytes())
            .unwrap();
        let status = child.wait().unwrap();
        assert!(
            status.success() || verb == "del",
            "ip -batch netns {verb} failed"
        );
    }
}

impl Drop for PodNamespaces {
    fn drop(&mut self) {
        self.batch("del");
    }
}

struct Plugin {
    binary: PathBuf,
    cni_path: String,
    config: Vec<u8>,
}

#[derive(Default)]
struct Latencies {
    add: Vec<Duration>,
    del: Vec<Duration>,
}

fn percentile(samples: &[Duration], p: f64) -> f64 {
    let mut ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1000.0).collect();
    ms.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * ms.len() as f64).ceil() as usize;
    ms[rank.clamp(1, ms.len()) - 1]
}

fn sequential(plugin: &Plugin, pods: &[PodRef]) -> Latencies {
    let mut l = Latencies::default();
    for pod in pods {
        l.add.push(timed_run(
            &plugin.binary,
            &plugin.cni_path,
            "ADD",
            pod,
            &plugin.config,
        ));
    }
    for pod in pods {
        l.del.push(timed_run(
            &plugin.binary,
            &plugin.cni_path,
            "DEL",
            pod,
            &plugin.config,
        ));
    }
    l
}

fn parallel(plugin: &Plugin, pods: &[PodRef]) -> Latencies {
    let run_all = |command: &str| -> Vec<Duration> {
        std::thread::scope(|s| {
            let handles: Vec<_> = pods
                .iter()
                .map(|pod| {
                    s.spawn(move || {
                        timed_run(
                            &plugin.binary,
                            &plugin.cni_path,
                            command,
                            pod,
                            &plugin.config,
                        )
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    };
    Latencies {
        add: run_all("ADD"),
        del: run_all("DEL"),
    }
}

fn print_bench(name: &str, tortie: &[Duration], reference: &[Duration], p: f64) {
    println!(
        "BENCH name={name} unit=ms tortie={:.2} ref={REFERENCE}:{:.2} better=lower",
        percentile(tortie, p),
        percentile(reference, p)
    );
}

fn run_bench() {
    require_root();
    let bridge = Path::new("/usr/lib/cni/bridge");
    assert!(
        bridge.exists(),
        "Debian's containernetworking-plugins is needed (e2e/scripts/deps.sh installs it)"
    );
    let topo = TopologySpec::new().segment(["node"]).build().unwrap();
    let node = &topo.node("node").ns;
    let agent = FakeAgent::for_node(node).unwrap();
    let host_local_dir = agent.run_dir().join("host-local");

    let tortie = Plugin {
        binary: tortie_binary(),
        cni_path: "/usr/lib/cni".into(),
        config: serde_json::to_vec(&{
            let mut c: Value = tortie_config(agent.run_dir(), "1.0.0");
            c["log_level"] = json!("warn");
            c
        })
        .unwrap(),
    };
    let reference = Plugin {
        binary: bridge.to_owned(),
        cni_path: "/usr/lib/cni".into(),
        config: serde_json::to_vec(&json!({
            "cniVersion": "1.0.0",
            "name": "bench",
            "type": "bridge",
            "bridge": "cnibench0",
            "isGateway": true,
            "ipMasq": false,
            "ipam": {
                "type": "host-local",
                "ranges": [[{"subnet": "10.250.0.0/16"}]],
                "dataDir": host_local_dir.display().to_string(),
            },
        }))
        .unwrap(),
    };

    let namespaces = PodNamespaces::create(SEQUENTIAL_PODS);
    let pods: Vec<PodRef> = namespaces
        .names
        .iter()
        .enumerate()
        .map(|(i, ns)| PodRef::in_netns_named(ns, &format!("bench-{i}")))
        .collect();

    let drain = || agent.drain_removals(DRAIN_LIMIT).unwrap();
    let (seq_t, seq_r, par_t, par_r, seq_drain, par_drain) = node
        .enter(|| {
            // Warm both binaries' pages so the first sample is not a cold start.
            let warm = &pods[..1];
            sequential(&tortie, warm);
            drain();
            sequential(&reference, warm);
            let seq_t = sequential(&tortie, &pods);
            let seq_drain = drain();
            let seq_r = sequential(&reference, &pods);
            let par_t = parallel(&tortie, &pods[..PARALLEL_PODS]);
            let par_drain = drain();
            let par_r = parallel(&reference, &pods[..PARALLEL_PODS]);
            (seq_t, seq_r, par_t, par_r, seq_drain, par_drain)
        })
        .unwrap();
    assert!(
        agent.held().is_empty(),
        "every tortie DEL released its address"
    );

    print_bench("cni_add_p50_sequential_500", &seq_t.add, &seq_r.add, 50.0);
    print_bench("cni_add_p99_sequential_500", &seq_t.add, &seq_r.add, 99.0);
    print_bench("cni_del_p50_sequential_500", &seq_t.del, &seq_r.del, 50.0);
    print_bench("cni_del_p99_sequential_500", &seq_t.del, &seq_r.del, 99.0);
    print_bench("cni_add_p50_parallel_50", &par_t.add, &par_r.add, 50.0);
    print_bench("cni_add_p99_parallel_50", &par_t.add, &par_r.add, 99.0);
    print_bench("cni_del_p50_parallel_50", &par_t.del, &par_r.del, 50.0);
    print_bench("cni_del_p99_parallel_50", &par_t.del, &par_r.del, 99.0);
    let total_ms = |d: &[Duration]| d.iter().sum::<Duration>().as_secs_f64() * 1e3;
    println!(
        "FIGURE {SEQUENTIAL_PODS} sequential tortie DELs: runtime waited {:.0} ms in all, host veth \
         removals ended {:.0} ms after the last DEL returned ({REFERENCE}: {:.0} ms in all)",
        total_ms(&seq_t.del),
        seq_drain.as_secs_f64() * 1e3,
        total_ms(&seq_r.del)
    );
    println!(
        "FIGURE {PARALLEL_PODS} parallel tortie DELs: host veth removals ended {:.0} ms after the \
         last DEL returned",
        par_drain.as_secs_f64() * 1e3
    );
}

fn main() {
    run_bench();
}
