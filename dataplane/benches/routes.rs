//! Route reconciler benchmark: install, re-point and delete 100k remote-block routes through
//! tortie's batched netlink socket, against `ip -batch` doing the same in the same run; plus
//! the CPU cost of a no-op reconcile of 100k routes; and BIRD learning the same 100k over BGP
//! and installing them (from Established to all in the kernel, and from withdrawal to none).
//!
//! Needs root: it creates its own network namespace (`tortie-bench-<pid>`) with a veth pair,
//! plus two for BIRD (`tortie-bench-<pid>-bird-feed`/`-recv`, joined by a veth in
//! 172.31.254.0/30), works only inside them and deletes them at the end. Without `bird` the
//! BIRD lines are skipped with a message.

use std::fmt::Write as _;
use std::fs::File;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::time::{Duration, Instant};

use tortie_dataplane::{Config, EncapMode, Inputs, Pool, Reconciler, RemoteBlock, desired};

const ROUTES: u32 = 100_000;
const NEXT_HOP_A: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
const NEXT_HOP_B: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 3);

/// The namespace the benchmark owns; deleted on drop, even after a panic.
struct BenchNetns {
    name: String,
}

impl BenchNetns {
    fn create() -> BenchNetns {
        let name = format!("tortie-bench-{}", std::process::id());
        run(&["ip", "netns", "add", &name]);
        let ns = BenchNetns { name };
        let n = ns.name.as_str();
        run(&["ip", "-n", n, "link", "set", "lo", "up"]);
        run(&[
            "ip", "-n", n, "link", "add", "veth0", "type", "veth", "peer", "name", "veth1",
        ]);
        run(&["ip", "-n", n, "link", "set", "veth0", "up"]);
        run(&["ip", "-n", n, "link", "set", "veth1", "up"]);
        run(&["ip", "-n", n, "addr", "add", "10.0.0.1/24", "dev", "veth0"]);
        ns
    }

    /// Moves the calling thread into the namespace (netlink sockets opened afterwards live there).
    fn enter(&self) {
        let file = File::open(format!("/var/run/netns/{}", self.name)).expect("netns file");
        // SAFETY: setns on the calling thread with a valid namespace fd.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
    }
}

impl Drop for BenchNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn run(argv: &[&str]) {
    let out = Command::new(argv[0])
        .args(&argv[1..])
        .output()
        .expect("spawn");
    assert!(
        out.status.success(),
        "{argv:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `/27` number `k` inside 10.128.0.0/10.
fn block(k: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 128, 0, 0)) + k * 32)
}

fn inputs(next_hop: Ipv4Addr, routes: u32) -> Inputs {
    Inputs {
        node_name: "bench".into(),
        node_addr_v4: Some("10.0.0.1/24".parse().expect("cidr")),
        uplink: "veth0".into(),
        uplink_mtu: 1500,
        pools: vec![Pool {
            cidr: "10.128.0.0/10".parse().expect("cidr"),
            ipip: EncapMode::Never,
            vxlan: EncapMode::Never,
        }],
        remote_blocks: (0..routes)
            .map(|k| RemoteBlock {
                cidr: ipnet::IpNet::new(IpAddr::V4(block(k)), 27).expect("prefix"),
                node_ip: next_hop.into(),
            })
            .collect(),
        ..Inputs::default()
    }
}

/// CPU time (user + system) of the calling thread.
fn thread_cpu() -> Duration {
    let (user, system) = thread_cpu_split();
    user + system
}

/// User and system CPU time of the calling thread.
fn thread_cpu_split() -> (Duration, Duration) {
    // SAFETY: getrusage fills a zeroed rusage for this thread.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut usage) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    (tv(usage.ru_utime), tv(usage.ru_stime))
}

/// CPU time (user + system) of waited-for children so far.
fn children_cpu() -> Duration {
    // SAFETY: as above, for RUSAGE_CHILDREN.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// Applies `inputs` (desired-state computation included) and returns the wall time.
fn apply(
    reconciler: &mut Reconciler,
    config: &Config,
    inputs: &Inputs,
    want_writes: usize,
) -> Duration {
    let start = Instant::now();
    let state = desired(inputs, config).expect("inputs");
    reconciler.set_desired(state);
    let report = reconciler.reconcile().expect("reconcile");
    let took = start.elapsed();
    assert!(
        report.failures.is_empty(),
        "kernel refused {} writes, first: {}",
        report.failures.len(),
        report.failures[0]
    );
    assert_eq!(report.writes, want_writes, "writes");
    took
}

fn ip_batch(ns: &str, verb: &str, next_hop: Ipv4Addr, proto: u8) -> Duration {
    let mut script = String::with_capacity(ROUTES as usize * 64);
    for k in 0..ROUTES {
        match verb {
            "del" => writeln!(script, "route del {}/27 proto {proto}", block(k)),
            _ => writeln!(
                script,
                "route {verb} {}/27 via {next_hop} dev veth0 proto {proto}",
                block(k)
            ),
        }
        .expect("write to string");
    }
    let path =
        std::env::temp_dir().join(format!("tortie-bench-{}-{verb}.batch", std::process::id()));
    std::fs::write(&path, script).expect("batch file");
    let start = Instant::now();
    run(&["ip", "-n", ns, "-batch", path.to_str().expect("utf-8 path")]);
    let took = start.elapsed();
    let _ = std::fs::remove_file(&path);
    took
}

fn count_routes(ns: &str, proto: u8) -> usize {
    let out = Command::new("ip")
        .args(["-n", ns, "route", "show", "proto", &proto.to_string()])
        .output()
        .expect("ip route show");
    String::from_utf8_lossy(&out.stdout).lines().count()
}

const ROUNDS: usize = 3;

/// The shortest wall and CPU time seen for one measurement.
#[derive(Debug, Clone, Copy)]
struct Fastest {
    wall: Duration,
    cpu: Duration,
}

impl Default for Fastest {
    fn default() -> Self {
        Fastest {
            wall: Duration::MAX,
            cpu: Duration::MAX,
        }
    }
}

impl Fastest {
    fn keep(&mut self, wall: Duration, cpu: Duration) {
        self.wall = self.wall.min(wall);
        self.cpu = self.cpu.min(cpu);
    }
}

#[derive(Debug, Default)]
struct Best {
    install: Fastest,
    /// User-space share of the fastest install's CPU time (the rest is the kernel's).
    install_user: Duration,
    noop: Fastest,
    resync: Fastest,
    listing: Fastest,
    replace: Fastest,
    delete: Fastest,
    ip_add: Fastest,
    ip_replace: Fastest,
    ip_del: Fastest,
}

fn rate(routes: u32, took: Duration) -> u64 {
    (f64::from(routes) / took.as_secs_f64()) as u64
}

fn main() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIP: the routes benchmark needs root (network namespaces)");
        return;
    }
    let ns = BenchNetns::create();
    ns.enter();
    let config = Config::default();
    let proto = config.route_protocol;
    let mut reconciler = Reconciler::new(config.clone()).expect("netlink socket");
    reconciler.resync().expect("initial dump");
    reconciler.mark_complete();

    let install_inputs = inputs(NEXT_HOP_A, ROUTES);
    let replace_inputs = inputs(NEXT_HOP_B, ROUTES);
    let empty_inputs = inputs(NEXT_HOP_A, 0);

    // Three rounds, tortie and `ip -batch` interleaved, keeping each side's best: other work on
    // a shared machine (and RTNL held by other processes) only ever slows a round down.
    let mut best = Best::default();
    for _ in 0..ROUNDS {
        let (user_before, system_before) = thread_cpu_split();
        let install = apply(&mut reconciler, &config, &install_inputs, ROUTES as usize);
        let (user_after, system_after) = thread_cpu_split();
        let install_cpu = (user_after - user_before) + (system_after - system_before);
        if install_cpu < best.install.cpu {
            best.install_user = user_after - user_before;
        }
        best.install.keep(install, install_cpu);
        assert_eq!(count_routes(&ns.name, proto), ROUTES as usize);

        // No-op reconcile: the inputs arrive again unchanged; desired state and diff, no writes.
        let cpu_before = thread_cpu();
        let noop = apply(&mut reconciler, &config, &install_inputs, 0);
        best.noop.keep(noop, thread_cpu() - cpu_before);
        // A full resync (dump and parse 100k routes, then diff) for comparison.
        let cpu_before = thread_cpu();
        reconciler.resync().expect("resync");
        assert!(reconciler.plan().is_empty(), "resync found differences");
        best.resync.keep(Duration::ZERO, thread_cpu() - cpu_before);
        let child_before = children_cpu();
        let _ = count_routes(&ns.name, proto);
        best.listing
            .keep(Duration::ZERO, children_cpu() - child_before);

        let cpu_before = thread_cpu();
        let replace = apply(&mut reconciler, &config, &replace_inputs, ROUTES as usize);
        best.replace.keep(replace, thread_cpu() - cpu_before);
        let cpu_before = thread_cpu();
        let delete = apply(&mut reconciler, &config, &empty_inputs, ROUTES as usize);
        best.delete.keep(delete, thread_cpu() - cpu_before);
        assert_eq!(count_routes(&ns.name, proto), 0);

        best.ip_add
            .keep(ip_batch(&ns.name, "add", NEXT_HOP_A, proto), Duration::ZERO);
        assert_eq!(count_routes(&ns.name, proto), ROUTES as usize);
        best.ip_replace.keep(
            ip_batch(&ns.name, "replace", NEXT_HOP_B, proto),
            Duration::ZERO,
        );
        best.ip_del
            .keep(ip_batch(&ns.name, "del", NEXT_HOP_B, proto), Duration::ZERO);
        assert_eq!(count_routes(&ns.name, proto), 0);
    }
    let (install, install_cpu) = (best.install.wall, best.install.cpu);
    let (replace, replace_cpu) = (best.replace.wall, best.replace.cpu);
    let (delete, delete_cpu) = (best.delete.wall, best.delete.cpu);
    let (noop, noop_cpu) = (best.noop.wall, best.noop.cpu);
    let resync_cpu = best.resync.cpu;
    let listing_cpu = best.listing.cpu;
    let (ip_add, ip_replace, ip_del) = (best.ip_add.wall, best.ip_replace.wall, best.ip_del.wall);
    // Once, after the rounds: BIRD's run is seconds long and its own figure varies far more
    // than the rounds would smooth out.
    let bird = bird_reference();

    eprintln!(
        "100k routes: install {install:?} ({install_cpu:?} CPU, of which user {:?}), replace {replace:?}, delete {delete:?}, no-op {noop:?} wall; \
         ip -batch add {ip_add:?}, replace {ip_replace:?}, del {ip_del:?}",
        best.install_user
    );
    // On a shared machine wall time includes waiting for a CPU; the CPU-time rate shows what
    // one uncontended core does (the kernel's share dominates: ~4 µs per route).
    eprintln!(
        "per CPU-second: install {} replace {} delete {} routes/s",
        rate(ROUTES, install_cpu),
        rate(ROUTES, replace_cpu),
        rate(ROUTES, delete_cpu)
    );
    println!(
        "BENCH name=dataplane_install_100k unit=routes_per_s tortie={} ref=ip_batch:{} better=higher",
        rate(ROUTES, install),
        rate(ROUTES, ip_add)
    );
    println!(
        "BENCH name=dataplane_replace_100k unit=routes_per_s tortie={} ref=ip_batch:{} better=higher",
        rate(ROUTES, replace),
        rate(ROUTES, ip_replace)
    );
    println!(
        "BENCH name=dataplane_delete_100k unit=routes_per_s tortie={} ref=ip_batch:{} better=higher",
        rate(ROUTES, delete),
        rate(ROUTES, ip_del)
    );
    if let Some(bird) = &bird {
        eprintln!(
            "BIRD over eBGP: Established to {ROUTES} routes in the kernel {:?}, static disabled to 0 routes {:?}",
            bird.install, bird.delete
        );
        println!(
            "BENCH name=dataplane_install_100k_vs_bird unit=routes_per_s tortie={} ref=bird:{} better=higher",
            rate(ROUTES, install),
            rate(ROUTES, bird.install)
        );
        println!(
            "BENCH name=dataplane_delete_100k_vs_bird unit=routes_per_s tortie={} ref=bird:{} better=higher",
            rate(ROUTES, delete),
            rate(ROUTES, bird.delete)
        );
    }
    println!(
        "BENCH name=dataplane_noop_reconcile_100k unit=cpu_ms tortie={:.1} ref=ip_route_show:{:.1} better=lower",
        noop_cpu.as_secs_f64() * 1000.0,
        listing_cpu.as_secs_f64() * 1000.0
    );
    println!(
        "BENCH name=dataplane_full_resync_100k unit=cpu_ms tortie={:.1} ref=ip_route_show:{:.1} better=lower",
        resync_cpu.as_secs_f64() * 1000.0,
        listing_cpu.as_secs_f64() * 1000.0
    );
}

/// BIRD's route protocol number in the kernel (`proto bird`).
const BIRD_KERNEL_PROTO: &str = "12";
/// How long BIRD gets for each step before the reference is given up.
const BIRD_DEADLINE: Duration = Duration::from_secs(30);
const FEEDER_ADDR: &str = "172.31.254.1";
const RECEIVER_ADDR: &str = "172.31.254.2";

/// The BIRD reference: a feeder BIRD originating the same 100k blocks as static blackholes and
/// a receiver BIRD learning them over eBGP and installing them in its namespace's kernel.
/// Its namespaces, BIRD processes and files are removed on drop, even after a panic.
struct BirdReference {
    feeder_ns: String,
    receiver_ns: String,
    namespaces: Vec<String>,
    birds: Vec<std::process::Child>,
    files: Vec<std::path::PathBuf>,
}

/// Wall time BIRD took to put the routes into the receiver's kernel and to take them out.
struct BirdTimes {
    install: Duration,
    delete: Duration,
}

impl BirdReference {
    fn new() -> BirdReference {
        let base = format!("tortie-bench-{}-bird", std::process::id());
        BirdReference {
            feeder_ns: format!("{base}-feed"),
            receiver_ns: format!("{base}-recv"),
            namespaces: Vec::new(),
            birds: Vec::new(),
            files: Vec::new(),
        }
    }

    fn file(&mut self, suffix: &str) -> std::path::PathBuf {
        let path =
            std::env::temp_dir().join(format!("tortie-bench-{}-bird-{suffix}", std::process::id()));
        self.files.push(path.clone());
        path
    }

    fn try_run(argv: &[&str]) -> Result<String, String> {
        let out = Command::new(argv[0])
            .args(&argv[1..])
            .stdin(std::process::Stdio::null())
            .output()
            .map_err(|e| format!("{argv:?}: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "{argv:?}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn create_namespaces(&mut self) -> Result<(), String> {
        for name in [self.feeder_ns.clone(), self.receiver_ns.clone()] {
            Self::try_run(&["ip", "netns", "add", &name])?;
            self.namespaces.push(name.clone());
            Self::try_run(&["ip", "-n", &name, "link", "set", "lo", "up"])?;
        }
        let (feed, recv) = (self.feeder_ns.as_str(), self.receiver_ns.as_str());
        Self::try_run(&[
            "ip", "-n", feed, "link", "add", "bird0", "type", "veth", "peer", "name", "bird1",
            "netns", recv,
        ])?;
        Self::try_run(&[
            "ip",
            "-n",
            feed,
            "addr",
            "add",
            &format!("{FEEDER_ADDR}/30"),
            "dev",
            "bird0",
        ])?;
        Self::try_run(&[
            "ip",
            "-n",
            recv,
            "addr",
            "add",
            &format!("{RECEIVER_ADDR}/30"),
            "dev",
            "bird1",
        ])?;
        Self::try_run(&["ip", "-n", feed, "link", "set", "bird0", "up"])?;
        Self::try_run(&["ip", "-n", recv, "link", "set", "bird1", "up"])?;
        Ok(())
    }

    /// Starts `bird -f` in `ns` with `config`; returns its control socket once it answers.
    fn start_bird(&mut self, ns: &str, role: &str, config: &str) -> Result<String, String> {
        let conf = self.file(&format!("{role}.conf"));
        let socket = self.file(&format!("{role}.ctl"));
        let pid_file = self.file(&format!("{role}.pid"));
        let log = self.file(&format!("{role}.log"));
        std::fs::write(&conf, config).map_err(|e| format!("{}: {e}", conf.display()))?;
        let log_file = File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
        let path = |p: &std::path::Path| p.to_string_lossy().into_owned();
        // `ip netns exec` execs bird, so the child's pid is BIRD's own.
        let child = Command::new("ip")
            .args(["netns", "exec", ns, "bird", "-f", "-c"])
            .arg(path(&conf))
            .arg("-s")
            .arg(path(&socket))
            .arg("-P")
            .arg(path(&pid_file))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(log_file)
            .spawn()
            .map_err(|e| format!("spawning bird: {e}"))?;
        self.birds.push(child);
        let socket = path(&socket);
        let deadline = Instant::now() + BIRD_DEADLINE;
        loop {
            if let Ok(out) = Self::try_run(&["birdc", "-s", &socket, "show", "status"])
                && out.contains("Daemon is up")
            {
                return Ok(socket);
            }
            let exited = self
                .birds
                .last_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if exited.is_some() || Instant::now() > deadline {
                let tail = std::fs::read_to_string(&log).unwrap_or_default();
                return Err(format!("{role} bird did not come up: {tail}"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn kernel_routes(&self) -> Result<usize, String> {
        let out = Self::try_run(&[
            "ip",
            "-n",
            &self.receiver_ns,
            "-4",
            "route",
            "show",
            "proto",
            BIRD_KERNEL_PROTO,
        ])?;
        Ok(out.lines().count())
    }

    /// Polls the receiver's kernel until it holds `want` BIRD routes; returns when it did.
    fn wait_for_kernel_routes(&self, want: usize) -> Result<Instant, String> {
        let deadline = Instant::now() + BIRD_DEADLINE;
        loop {
            let have = self.kernel_routes()?;
            if have == want {
                return Ok(Instant::now());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "receiver kernel has {have} BIRD routes, want {want}"
                ));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn measure(&mut self) -> Result<BirdTimes, String> {
        self.create_namespaces()?;
        let mut feeder = format!(
            "router id {FEEDER_ADDR};\nprotocol device {{ }}\nprotocol static blocks {{\n  ipv4;\n"
        );
        for k in 0..ROUTES {
            writeln!(feeder, "  route {}/27 blackhole;", block(k)).expect("write to string");
        }
        feeder.push_str(&format!(
            "}}\nprotocol bgp receiver {{\n  local {FEEDER_ADDR} as 65001;\n  neighbor {RECEIVER_ADDR} as 65002;\n  \
             connect delay time 1; connect retry time 1;\n  ipv4 {{ import none; export all; next hop self; }};\n}}\n"
        ));
        let receiver = format!(
            "router id {RECEIVER_ADDR};\nprotocol device {{ }}\n\
             protocol kernel {{ ipv4 {{ import none; export all; }}; merge paths off; }}\n\
             protocol bgp feeder {{\n  local {RECEIVER_ADDR} as 65002;\n  neighbor {FEEDER_ADDR} as 65001;\n  \
             connect delay time 1; connect retry time 1;\n  ipv4 {{ import all; export none; }};\n}}\n"
        );
        let (feed_ns, recv_ns) = (self.feeder_ns.clone(), self.receiver_ns.clone());
        let feeder_socket = self.start_bird(&feed_ns, "feed", &feeder)?;
        // The feeder holds all 100k routes before the receiver exists, so the receiver's
        // clock starts at Established with everything ready to send.
        let deadline = Instant::now() + BIRD_DEADLINE;
        loop {
            let out = Self::try_run(&["birdc", "-s", &feeder_socket, "show", "route", "count"])?;
            if out.contains(&format!("{ROUTES} of {ROUTES} routes")) {
                break;
            }
            if Instant::now() > deadline {
                return Err(format!("feeder never held {ROUTES} routes: {out}"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let receiver_socket = self.start_bird(&recv_ns, "recv", &receiver)?;
        let deadline = Instant::now() + BIRD_DEADLINE;
        let established = loop {
            let out = Self::try_run(&["birdc", "-s", &receiver_socket, "show", "protocols"])?;
            if out
                .lines()
                .any(|l| l.starts_with("feeder") && l.contains("Established"))
            {
                break Instant::now();
            }
            if Instant::now() > deadline {
                return Err(format!("receiver session never Established: {out}"));
            }
            std::thread::sleep(Duration::from_millis(2));
        };
        let installed = self.wait_for_kernel_routes(ROUTES as usize)?;
        // The routes must be the BGP-learned ones towards the feeder, not something else.
        let first = format!("{}/27", block(0));
        let sample = Self::try_run(&[
            "ip",
            "-n",
            &self.receiver_ns,
            "-4",
            "route",
            "show",
            &first,
            "proto",
            BIRD_KERNEL_PROTO,
        ])?;
        if !sample.contains(&format!("via {FEEDER_ADDR} dev bird1")) {
            return Err(format!(
                "unexpected route in the receiver's kernel: {sample}"
            ));
        }
        let disabled = Instant::now();
        Self::try_run(&["birdc", "-s", &feeder_socket, "disable", "blocks"])?;
        let removed = self.wait_for_kernel_routes(0)?;
        Ok(BirdTimes {
            install: installed - established,
            delete: removed - disabled,
        })
    }
}

impl Drop for BirdReference {
    fn drop(&mut self) {
        for bird in &mut self.birds {
            // SAFETY: kill with a pid of our own still-unwaited child and a valid signal.
            unsafe { libc::kill(bird.id() as libc::pid_t, libc::SIGTERM) };
        }
        for bird in &mut self.birds {
            let deadline = Instant::now() + Duration::from_secs(3);
            while matches!(bird.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            if matches!(bird.try_wait(), Ok(None)) {
                let _ = bird.kill();
                let _ = bird.wait();
            }
        }
        for ns in &self.namespaces {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        for file in &self.files {
            let _ = std::fs::remove_file(file);
        }
    }
}

/// Runs the BIRD reference once; `None` (with the reason on stderr) when BIRD is missing or fails.
fn bird_reference() -> Option<BirdTimes> {
    let installed = ["bird", "birdc"]
        .iter()
        .all(|bin| Command::new(bin).arg("--version").output().is_ok());
    if !installed {
        println!("SKIP: BIRD reference skipped: `bird`/`birdc` not installed");
        return None;
    }
    let mut reference = BirdReference::new();
    match reference.measure() {
        Ok(times) => Some(times),
        Err(reason) => {
            println!("SKIP: BIRD reference skipped: {reason}");
            None
        }
    }
}
