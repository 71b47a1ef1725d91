//! A real etcd + kube-apiserver pair per test, with its own CA, RBAC, an admin kubeconfig and ServiceAccount kubeconfigs.
//!
//! The binaries come from `e2e/scripts/build-kube.sh` (run by `make deps`). Nothing here fakes
//! the API: objects, watches, admission and RBAC decisions are the real apiserver's.
//!
//! Reachability from node namespaces: by default everything listens on 127.0.0.1 of the
//! namespace the test runs in. To serve node namespaces, either
//! - set [`ApiServerOptions::netns`] to a namespace the nodes can route to (e.g. the router
//!   namespace) and [`ApiServerOptions::bind_address`] to an address of that namespace; etcd,
//!   the apiserver and every `kubectl` call then run inside it (`ip netns exec`), or
//! - bind `0.0.0.0` and set [`ApiServerOptions::advertise_address`] to the address the nodes
//!   use, when the test has given them a route into the namespace the apiserver runs in.
//!
//! Either way the serving certificate carries an IP SAN for the bind and advertise addresses,
//! and every kubeconfig written here points at `https://<advertise address>:<port>`.

use std::fmt::Write as _;
use std::io::{BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

/// Env var naming the directory holding `kube-apiserver`, `kubectl` and `etcd`.
pub const KUBE_BIN_DIR_ENV: &str = "TORTIE_KUBE_BIN_DIR";
/// Env var that turns "binaries missing" from a skip into a failure (CI sets it to 1).
pub const REQUIRE_KUBE_ENV: &str = "TORTIE_REQUIRE_KUBE";
/// Env var that keeps the data dir (certs, kubeconfigs, logs) after the server stops.
pub const KEEP_DIR_ENV: &str = "TORTIE_KEEP_APISERVER_DIR";

/// The issuer written into minted ServiceAccount tokens.
pub const SERVICE_ACCOUNT_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

const BINARIES: [&str; 3] = ["etcd", "kube-apiserver", "kubectl"];
const STOP_GRACE: Duration = Duration::from_secs(5);
/// Debian's nginx (with libnginx-mod-stream), the balancer of [`TestApiServer::serve_behind_balancer`].
const NGINX: &str = "/usr/sbin/nginx";
const READY_POLL_INTERVAL: Duration = Duration::from_millis(200);
const KUBECTL_TIMEOUT: Duration = Duration::from_secs(60);
const LOG_TAIL_LINES: usize = 40;

static INSTANCE_COUNTER: AtomicU32 = AtomicU32::new(0);

/// How to start a [`TestApiServer`].
#[derive(Debug, Clone)]
pub struct ApiServerOptions {
    /// Address kube-apiserver listens on (`--bind-address`). Default 127.0.0.1.
    pub bind_address: IpAddr,
    /// Address written into kubeconfigs and `--advertise-address`. Default: the bind address,
    /// or 127.0.0.1 when binding the unspecified address.
    pub advertise_address: Option<IpAddr>,
    /// Secure port; `None` picks a free one.
    pub port: Option<u16>,
    /// Run etcd, the apiserver and every kubectl call inside this network namespace (its
    /// loopback must be up: etcd listens on 127.0.0.1 there).
    pub netns: Option<String>,
    /// Give up waiting for `/readyz` after this long.
    pub ready_timeout: Duration,
    /// Extra `kube-apiserver` flags, appended last so they override the defaults.
    pub extra_apiserver_args: Vec<String>,
    /// Where the second apiserver of [`TestApiServer::serve_behind_balancer`] listens, on the
    /// first one's port, as master02 beside master01 (both then publish their own address in
    /// the `kubernetes` Service). `None`: the first one's address on another port.
    pub standby_address: Option<IpAddr>,
}

impl Default for ApiServerOptions {
    fn default() -> Self {
        Self {
            bind_address: IpAddr::V4(Ipv4Addr::LOCALHOST),
            advertise_address: None,
            port: None,
            netns: None,
            ready_timeout: Duration::from_secs(90),
            extra_apiserver_args: Vec::new(),
            standby_address: None,
        }
    }
}

impl ApiServerOptions {
    fn effective_advertise_address(&self) -> IpAddr {
        match self.advertise_address {
            Some(address) => address,
            None if self.bind_address.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            None => self.bind_address,
        }
    }
}

/// A running etcd + kube-apiserver owned by one test. Stops its own pids and removes its data
/// dir on drop (the dir, minus etcd's data, is kept when the test panicked or
/// `TORTIE_KEEP_APISERVER_DIR=1`, so its logs can be read).
pub struct TestApiServer {
    dir: PathBuf,
    bin_dir: PathBuf,
    netns: Option<String>,
    server_url: String,
    admin_kubeconfig: PathBuf,
    ca_cert: PathBuf,
    etcd: Option<Child>,
    apiserver: Option<Child>,
    time_to_ready: Duration,
    /// What the apiserver was started with, so [`TestApiServer::start_apiserver_again`] can
    /// bring it back on the same port and etcd.
    restart_with: Option<(ApiServerOptions, u16, u16)>,
    /// A second kube-apiserver on the same etcd and the nginx balancing both
    /// ([`TestApiServer::serve_behind_balancer`]), as two masters behind a VIP.
    standby: Option<Child>,
    balancer: Option<Child>,
}

impl std::fmt::Debug for TestApiServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestApiServer")
            .field("dir", &self.dir)
            .field("server_url", &self.server_url)
            .field("netns", &self.netns)
            .finish_non_exhaustive()
    }
}

/// Where the kube binaries are expected: `$TORTIE_KUBE_BIN_DIR`, else `$TORTIE_CACHE/bin`,
/// else `~/.cache/tortie/bin` (where `e2e/scripts/build-kube.sh` installs them).
pub fn kube_bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os(KUBE_BIN_DIR_ENV) {
        return PathBuf::from(dir);
    }
    if let Some(cache) = std::env::var_os("TORTIE_CACHE") {
        return PathBuf::from(cache).join("bin");
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from);
    home.join(".cache/tortie/bin")
}

/// The binaries missing from [`kube_bin_dir`], by name.
pub fn missing_kube_binaries() -> Vec<&'static str> {
    let dir = kube_bin_dir();
    BINARIES
        .into_iter()
        .filter(|name| !dir.join(name).is_file())
        .collect()
}

fn require_kube() -> bool {
    std::env::var_os(REQUIRE_KUBE_ENV).is_some_and(|value| !value.is_empty() && value != "0")
}

impl TestApiServer {
    /// Starts etcd and kube-apiserver and waits for `/readyz`.
    pub fn start(options: ApiServerOptions) -> Result<Self> {
        let bin_dir = kube_bin_dir();
        let missing = missing_kube_binaries();
        if !missing.is_empty() {
            bail!(
                "kube binaries {missing:?} not found in {} (set {KUBE_BIN_DIR_ENV} or run `make deps`, \
                 which runs e2e/scripts/build-kube.sh)",
                bin_dir.display()
            );
        }
        let dir = create_data_dir()?;
        let advertise = options.effective_advertise_address();
        let mut server = Self {
            server_url: String::new(),
            admin_kubeconfig: dir.join("admin.kubeconfig"),
            ca_cert: dir.join("pki/ca.crt"),
            dir,
            bin_dir,
            netns: options.netns.clone(),
            etcd: None,
            apiserver: None,
            time_to_ready: Duration::ZERO,
            restart_with: None,
            standby: None,
            balancer: None,
        };
        // From here on, Drop cleans up whatever was started if a step fails.
        let started = Instant::now();
        let pki = server.dir.join("pki");
        let mut addresses = vec![options.bind_address, advertise];
        addresses.extend(options.standby_address);
        generate_pki(&pki, &addresses)?;

        let etcd_client_port = free_port()?;
        let etcd_peer_port = free_port()?;
        let port = match options.port {
            Some(port) => port,
            None => free_port()?,
        };
        server.server_url = format!("https://{}", socket_text(advertise, port));
        server.start_etcd(etcd_client_port, etcd_peer_port)?;
        // The apiserver's etcd client backs off for about a second after a refused connect;
        // starting it once etcd listens makes the whole start-up faster.
        server.wait_etcd_listening(etcd_client_port, options.ready_timeout)?;
        server.start_kube_apiserver(&options, etcd_client_port, port, "kube-apiserver.log")?;
        server.restart_with = Some((options.clone(), etcd_client_port, port));
        server.write_admin_kubeconfig()?;
        server.wait_ready(options.ready_timeout)?;
        server.time_to_ready = started.elapsed();
        tracing::info!(
            url = %server.server_url,
            dir = %server.dir.display(),
            ready_after_ms = server.time_to_ready.as_millis() as u64,
            "test kube-apiserver ready"
        );
        Ok(server)
    }

    /// For tests: starts a server, or returns `Ok(None)` after printing a loud SKIP when the
    /// binaries are absent and `TORTIE_REQUIRE_KUBE` is unset. With `TORTIE_REQUIRE_KUBE=1`
    /// missing binaries are an error.
    pub fn start_or_skip(test_name: &str, options: ApiServerOptions) -> Result<Option<Self>> {
        let missing = missing_kube_binaries();
        if !missing.is_empty() && !require_kube() {
            let banner = format!(
                "\n==================== SKIP {test_name} ====================\n\
                 kube binaries {missing:?} not found in {}.\n\
                 Run `make deps` (e2e/scripts/build-kube.sh) to build them; set {REQUIRE_KUBE_ENV}=1 \
                 to make this a failure.\n\
                 =========================================================\n",
                kube_bin_dir().display()
            );
            // Straight to fd 2: the test harness captures eprintln! of passing tests, and a
            // skip must be seen.
            let _ = std::io::stderr().write_all(banner.as_bytes());
            return Ok(None);
        }
        Self::start(options).map(Some)
    }

    /// Issues a client certificate for `subject` (e.g. `/O=system:nodes/CN=system:node:a`) from
    /// this server's CA and writes a kubeconfig using it, pointing at [`Self::server_url`]: the
    /// identities of a cluster built by hand (kubelets, kube-proxy, controllers).
    pub fn issue_client_kubeconfig(&self, name: &str, subject: &str) -> Result<PathBuf> {
        let pki = self.dir.join("pki");
        issue_cert(
            &pki,
            name,
            subject,
            "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n\
             extendedKeyUsage=clientAuth\n",
        )?;
        let path = self.dir.join(format!("{name}.kubeconfig"));
        write_cert_kubeconfig(
            &path,
            &self.server_url,
            &self.ca_cert,
            &pki.join(format!("{name}.crt")),
            &pki.join(format!("{name}.key")),
        )?;
        Ok(path)
    }

    /// The CA, ServiceAccount signing key and certificates of this server.
    pub fn pki_dir(&self) -> PathBuf {
        self.dir.join("pki")
    }

    /// `https://<advertise address>:<port>`.
    pub fn server_url(&self) -> &str {
        &self.server_url
    }

    /// Kubeconfig with cluster-admin rights (client cert CN=admin, O=system:masters).
    pub fn admin_kubeconfig(&self) -> &Path {
        &self.admin_kubeconfig
    }

    /// The CA that signed the serving and client certificates.
    pub fn ca_cert(&self) -> &Path {
        &self.ca_cert
    }

    /// Process ids of the running etcd and kube-apiserver, by name (for CPU accounting).
    pub fn pids(&self) -> Vec<(&'static str, u32)> {
        [("etcd", &self.etcd), ("kube-apiserver", &self.apiserver)]
            .into_iter()
            .filter_map(|(name, child)| Some((name, child.as_ref()?.id())))
            .collect()
    }

    /// This run's data dir (certs, kubeconfigs, `etcd.log`, `kube-apiserver.log`).
    pub fn data_dir(&self) -> &Path {
        &self.dir
    }

    /// How long from the start of [`TestApiServer::start`] until `/readyz` answered ok.
    pub fn time_to_ready(&self) -> Duration {
        self.time_to_ready
    }

    /// Directory of the kubectl/etcd/kube-apiserver binaries used.
    pub fn bin_dir(&self) -> &Path {
        &self.bin_dir
    }

    /// A `kubectl` command using the admin kubeconfig (run inside the netns, if any).
    pub fn kubectl_command<I, S>(&self, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        self.kubectl_command_as(&self.admin_kubeconfig, args)
    }

    /// A `kubectl` command using the given kubeconfig (run inside the netns, if any).
    pub fn kubectl_command_as<I, S>(&self, kubeconfig: &Path, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let mut command = self.command_in_netns(&self.bin_dir.join("kubectl"));
        command
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .arg("--request-timeout=30s")
            .args(args);
        command
    }

    /// Runs kubectl as admin; returns its output whatever the exit status.
    pub fn kubectl<I, S>(&self, args: I) -> Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        run_with_timeout(self.kubectl_command(args), None, KUBECTL_TIMEOUT)
    }

    /// Runs kubectl with the given kubeconfig; returns its output whatever the exit status.
    pub fn kubectl_as<I, S>(&self, kubeconfig: &Path, args: I) -> Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        run_with_timeout(
            self.kubectl_command_as(kubeconfig, args),
            None,
            KUBECTL_TIMEOUT,
        )
    }

    /// Runs kubectl as admin, failing unless it exits 0; returns stdout.
    pub fn kubectl_ok<I, S>(&self, args: I) -> Result<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let command = self.kubectl_command(args);
        let described = describe(&command);
        checked_stdout(
            run_with_timeout(command, None, KUBECTL_TIMEOUT)?,
            &described,
        )
    }

    /// `kubectl apply -f -` as admin with the given manifest (YAML or JSON).
    pub fn apply(&self, manifest: &str) -> Result<String> {
        let command = self.kubectl_command(["apply", "-f", "-"]);
        let described = describe(&command);
        checked_stdout(
            run_with_timeout(command, Some(manifest.as_bytes()), KUBECTL_TIMEOUT)?,
            &described,
        )
    }

    /// Starts `kubectl get <args> --watch --output-watch-events -o json` as admin and returns
    /// a handle yielding each watch event (`{"type": ..., "object": ...}`).
    pub fn watch<I, S>(&self, args: I) -> Result<KubectlWatch>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let mut command = self.kubectl_command(["get"]);
        command
            .args(args)
            .args(["--watch", "--output-watch-events", "-o", "json"]);
        KubectlWatch::spawn(command)
    }

    /// Ensures namespace + ServiceAccount exist, requests a token for it through the
    /// TokenRequest API (`kubectl create token`) and writes a kubeconfig using that token.
    /// The kubeconfig carries only the token, so its rights are exactly what RBAC grants the
    /// ServiceAccount `system:serviceaccount:<namespace>:<name>`.
    pub fn mint_service_account_kubeconfig(&self, namespace: &str, name: &str) -> Result<PathBuf> {
        let manifest = serde_json::json!({
            "apiVersion": "v1",
            "kind": "List",
            "items": [
                {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}},
                {"apiVersion": "v1", "kind": "ServiceAccount",
                 "metadata": {"name": name, "namespace": namespace}},
            ],
        });
        self.apply(&manifest.to_string())
            .with_context(|| format!("creating ServiceAccount {namespace}/{name}"))?;
        let token = self
            .kubectl_ok(["create", "token", name, "-n", namespace, "--duration=6h"])
            .with_context(|| format!("requesting a token for ServiceAccount {namespace}/{name}"))?;
        let token = token.trim();
        if token.is_empty() {
            bail!("TokenRequest for ServiceAccount {namespace}/{name} returned an empty token");
        }
        let path = self.dir.join(format!("sa-{namespace}-{name}.kubeconfig"));
        write_token_kubeconfig(
            &path,
            &self.server_url,
            &self.ca_cert,
            &format!("{namespace}-{name}"),
            token,
        )?;
        Ok(path)
    }

    fn command_in_netns(&self, program: &Path) -> Command {
        match &self.netns {
            Some(netns) => {
                let mut command = Command::new("ip");
                command.args(["netns", "exec", netns.as_str()]).arg(program);
                command
            }
            None => Command::new(program),
        }
    }

    fn spawn_logged(&self, mut command: Command, log_name: &str) -> Result<Child> {
        let log_path = self.dir.join(log_name);
        let log = std::fs::File::create(&log_path)
            .with_context(|| format!("creating {}", log_path.display()))?;
        let log_err = log
            .try_clone()
            .with_context(|| format!("duplicating {}", log_path.display()))?;
        command
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log_err));
        let described = describe(&command);
        command
            .spawn()
            .with_context(|| format!("spawning {described}"))
    }

    fn start_etcd(&mut self, client_port: u16, peer_port: u16) -> Result<()> {
        let client_url = format!("http://127.0.0.1:{client_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let mut command = self.command_in_netns(&self.bin_dir.join("etcd"));
        command
            .arg("--name=tortie-test")
            .arg(format!(
                "--data-dir={}",
                self.dir.join("etcd-data").display()
            ))
            .arg(format!("--listen-client-urls={client_url}"))
            .arg(format!("--advertise-client-urls={client_url}"))
            .arg(format!("--listen-peer-urls={peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={peer_url}"))
            .arg(format!("--initial-cluster=tortie-test={peer_url}"))
            .arg("--initial-cluster-state=new")
            // A throwaway store: durability buys nothing and fsync dominates start-up on slow disks.
            .arg("--unsafe-no-fsync")
            .arg("--log-level=warn");
        self.etcd = Some(self.spawn_logged(command, "etcd.log")?);
        Ok(())
    }

    fn wait_etcd_listening(&mut self, port: u16, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let netns = self.netns.clone();
        // Bounded by the deadline; each probe is one loopback connect.
        while Instant::now() < deadline {
            self.ensure_children_running()?;
            if loopback_port_open(netns.as_deref(), port)? {
                return Ok(());
            }
            thread::sleep(Duration::from_millis(20));
        }
        bail!(
            "etcd not listening on 127.0.0.1:{port} after {timeout:?}\n{}",
            self.log_tails()
        )
    }

    fn start_kube_apiserver(
        &mut self,
        options: &ApiServerOptions,
        etcd_port: u16,
        port: u16,
        log_name: &str,
    ) -> Result<()> {
        let pki = self.dir.join("pki");
        let file = |name: &str| pki.join(name).display().to_string();
        let mut command = self.command_in_netns(&self.bin_dir.join("kube-apiserver"));
        command
            .arg(format!("--etcd-servers=http://127.0.0.1:{etcd_port}"))
            .arg(format!("--bind-address={}", options.bind_address))
            .arg(format!(
                "--advertise-address={}",
                options.effective_advertise_address()
            ))
            .arg(format!("--secure-port={port}"))
            .arg(format!("--cert-dir={}", pki.display()))
            .arg(format!("--tls-cert-file={}", file("apiserver.crt")))
            .arg(format!("--tls-private-key-file={}", file("apiserver.key")))
            .arg(format!("--client-ca-file={}", file("ca.crt")))
            // How it proves itself to kubelets (exec, logs, port-forward) where there are any.
            .arg(format!(
                "--kubelet-client-certificate={}",
                file("admin.crt")
            ))
            .arg(format!("--kubelet-client-key={}", file("admin.key")))
            .arg("--authorization-mode=Node,RBAC")
            .arg(format!("--service-account-issuer={SERVICE_ACCOUNT_ISSUER}"))
            .arg(format!(
                "--service-account-signing-key-file={}",
                file("sa.key")
            ))
            .arg(format!("--service-account-key-file={}", file("sa.pub")))
            // A logical range only: no Service traffic flows in the test bed.
            .arg("--service-cluster-ip-range=10.96.0.0/16")
            .arg("--allow-privileged=true")
            // TORTIE_APISERVER_PROFILING=1 serves /debug/pprof, to see where a bench spends
            // the API server's CPU.
            .arg(format!(
                "--profiling={}",
                std::env::var("TORTIE_APISERVER_PROFILING").is_ok_and(|v| v == "1")
            ))
            // Loopback advertise addresses are invalid Endpoints: without this the apiserver
            // logs an error every few seconds trying to publish the `kubernetes` Service.
            .arg("--endpoint-reconciler-type=none")
            .arg("--v=1")
            .args(&options.extra_apiserver_args);
        self.apiserver = Some(self.spawn_logged(command, log_name)?);
        Ok(())
    }

    /// The admin kubeconfig, pointing at `server_url` (the API server, or the balancer in
    /// front of it).
    fn write_admin_kubeconfig(&self) -> Result<()> {
        let pki = self.dir.join("pki");
        write_cert_kubeconfig(
            &self.admin_kubeconfig,
            &self.server_url,
            &self.ca_cert,
            &pki.join("admin.crt"),
            &pki.join("admin.key"),
        )
    }

    fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut last_answer = String::from("no answer yet");
        // Bounded by the deadline; each probe is one short kubectl call.
        while Instant::now() < deadline {
            self.ensure_children_running()?;
            let mut probe = self.kubectl_command(["get", "--raw", "/readyz"]);
            probe.arg("--request-timeout=5s");
            match run_with_timeout(probe, None, Duration::from_secs(10)) {
                Ok(output) if output.status.success() => return Ok(()),
                Ok(output) => {
                    last_answer = format!(
                        "{}{}",
                        String::from_utf8_lossy(&output.stdout),
                        String::from_utf8_lossy(&output.stderr)
                    )
                }
                Err(error) => last_answer = format!("{error:#}"),
            }
            thread::sleep(READY_POLL_INTERVAL);
        }
        bail!(
            "kube-apiserver at {} not ready after {timeout:?}; last /readyz answer: {}\n{}",
            self.server_url,
            last_answer.trim(),
            self.log_tails()
        )
    }

    fn ensure_children_running(&mut self) -> Result<()> {
        let mut exited = None;
        for (name, child) in [
            ("etcd", &mut self.etcd),
            ("kube-apiserver", &mut self.apiserver),
        ] {
            if let Some(process) = child
                && let Some(status) = process
                    .try_wait()
                    .with_context(|| format!("checking {name}"))?
            {
                // Reaped: Drop must not signal this pid again.
                *child = None;
                exited = Some((name, status));
                break;
            }
        }
        match exited {
            Some((name, status)) => {
                bail!("{name} exited early with {status}\n{}", self.log_tails())
            }
            None => Ok(()),
        }
    }

    /// The last lines of etcd.log and kube-apiserver.log, for error messages.
    pub fn log_tails(&self) -> String {
        let mut text = String::new();
        for name in [
            "etcd.log",
            "kube-apiserver.log",
            "kube-apiserver-standby.log",
            "nginx.log",
        ] {
            let path = self.dir.join(name);
            // The standby and nginx logs exist only behind a balancer.
            let Ok(content) = std::fs::read_to_string(&path) else {
                continue;
            };
            let lines: Vec<&str> = content.lines().collect();
            let tail = &lines[lines.len().saturating_sub(LOG_TAIL_LINES)..];
            let _ = writeln!(
                text,
                "--- last {} lines of {} ---",
                tail.len(),
                path.display()
            );
            for line in tail {
                let _ = writeln!(text, "{line}");
            }
        }
        text
    }

    /// Stops kube-apiserver only (etcd keeps the data): clients see the API go away, as in an
    /// outage of the control plane.
    pub fn stop_apiserver(&mut self) {
        if let Some(child) = self.apiserver.take() {
            stop_child(child);
        }
    }

    /// Kills kube-apiserver with SIGKILL, as a master whose machine dies: connections reset,
    /// no graceful shutdown.
    pub fn kill_apiserver(&mut self) {
        if let Some(mut child) = self.apiserver.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts kube-apiserver again on the same address, port and etcd after
    /// [`TestApiServer::stop_apiserver`], and waits for `/readyz`.
    pub fn start_apiserver_again(&mut self) -> Result<()> {
        let (options, etcd_port, port) = self
            .restart_with
            .clone()
            .context("apiserver was never started")?;
        if self.apiserver.is_some() {
            bail!("apiserver is still running");
        }
        self.start_kube_apiserver(&options, etcd_port, port, "kube-apiserver.log")?;
        self.wait_ready(options.ready_timeout)
    }

    /// Puts the API behind a TCP balancer, as a cluster with two masters behind nginx: starts a
    /// second kube-apiserver on the same etcd and certificates, and nginx (stream module) on
    /// the advertise address sending every connection to the first while it answers and to
    /// the second (`backup`) after; every kubeconfig written from now on, and the admin one,
    /// points at nginx. Stopping or killing the first master is then a failover that every
    /// client connection goes through.
    pub fn serve_behind_balancer(&mut self) -> Result<()> {
        let (options, etcd_port, primary_port) = self
            .restart_with
            .clone()
            .context("apiserver was never started")?;
        // The same flags as the first, on its own address and the same port (master02), or on
        // another port; its own log either way.
        let mut standby_options = options.clone();
        let standby_port = match options.standby_address {
            Some(address) => {
                standby_options.bind_address = address;
                standby_options.advertise_address = Some(address);
                primary_port
            }
            None => free_port()?,
        };
        let standby_address = standby_options.effective_advertise_address();
        let first = self.apiserver.take();
        let started = self.start_kube_apiserver(
            &standby_options,
            etcd_port,
            standby_port,
            "kube-apiserver-standby.log",
        );
        self.standby = std::mem::replace(&mut self.apiserver, first);
        started?;
        if let Some(standby) = &self.standby {
            tracing::info!(
                pid = standby.id(),
                port = standby_port,
                "standby kube-apiserver started"
            );
        }
        let address = options.effective_advertise_address();
        let vip_port = free_port()?;
        let conf = format!(
            "load_module /usr/lib/nginx/modules/ngx_stream_module.so;\n\
             daemon off;\nmaster_process off;\nworker_processes 1;\n\
             pid {dir}/nginx.pid;\nerror_log {dir}/nginx.log info;\n\
             events {{ worker_connections 1024; }}\n\
             stream {{\n\
               upstream apiservers {{\n\
                 server {primary} max_fails=1 fail_timeout=5s;\n\
                 server {standby} backup;\n\
               }}\n\
               server {{\n\
                 listen {vip};\n\
                 proxy_pass apiservers;\n\
                 proxy_connect_timeout 1s;\n\
                 proxy_next_upstream on;\n\
               }}\n\
             }}\n",
            dir = self.dir.display(),
            primary = socket_text(address, primary_port),
            standby = socket_text(standby_address, standby_port),
            vip = socket_text(address, vip_port),
        );
        let conf_path = self.dir.join("nginx.conf");
        std::fs::write(&conf_path, conf).context("writing nginx.conf")?;
        let mut nginx = self.command_in_netns(Path::new(NGINX));
        nginx
            .arg("-e")
            .arg(self.dir.join("nginx.log"))
            .arg("-p")
            .arg(&self.dir)
            .arg("-c")
            .arg(&conf_path);
        self.balancer = Some(self.spawn_logged(nginx, "nginx.out")?);
        self.server_url = format!("https://{}", socket_text(address, vip_port));
        self.write_admin_kubeconfig()?;
        // Ready through nginx, and the standby itself ready: a failover must find it serving.
        self.wait_ready(options.ready_timeout)?;
        let standby_url = format!("https://{}", socket_text(standby_address, standby_port));
        let deadline = Instant::now() + options.ready_timeout;
        loop {
            let mut probe = self.kubectl_command(["get", "--raw", "/readyz"]);
            probe
                .arg(format!("--server={standby_url}"))
                .arg("--request-timeout=5s");
            if run_with_timeout(probe, None, Duration::from_secs(10))
                .is_ok_and(|o| o.status.success())
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "standby kube-apiserver at {standby_url} not ready\n{}",
                    self.log_tails()
                );
            }
            thread::sleep(READY_POLL_INTERVAL);
        }
    }

    fn stop_children(&mut self) {
        // The balancer and apiservers first, so they do not log a storm of etcd errors.
        for child in [
            self.balancer.take(),
            self.standby.take(),
            self.apiserver.take(),
            self.etcd.take(),
        ]
        .into_iter()
        .flatten()
        {
            stop_child(child);
        }
    }
}

impl Drop for TestApiServer {
    fn drop(&mut self) {
        self.stop_children();
        let keep = thread::panicking()
            || std::env::var_os(KEEP_DIR_ENV)
                .is_some_and(|value| !value.is_empty() && value != "0");
        if keep {
            // etcd preallocates a large WAL; the logs and certs are what a debugger needs.
            let _ = std::fs::remove_dir_all(self.dir.join("etcd-data"));
            // Straight to fd 2 so the path shows even when the harness captures output.
            let _ = writeln!(
                std::io::stderr(),
                "tortie-e2e: kept test apiserver dir {} (logs: etcd.log, kube-apiserver.log)",
                self.dir.display()
            );
        } else if let Err(error) = std::fs::remove_dir_all(&self.dir) {
            eprintln!(
                "tortie-e2e: could not remove {}: {error}",
                self.dir.display()
            );
        }
    }
}

/// A running `kubectl get --watch` whose JSON events arrive on a channel; killed on drop.
pub struct KubectlWatch {
    child: Option<Child>,
    events: Receiver<Result<serde_json::Value, String>>,
}

impl KubectlWatch {
    fn spawn(mut command: Command) -> Result<Self> {
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let described = describe(&command);
        let mut child = command
            .spawn()
            .with_context(|| format!("spawning {described}"))?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| anyhow!("{described}: stdout was not captured"))?;
        let stderr = child.stderr.take();
        let (sender, events) = channel();
        thread::spawn(move || forward_json_stream(stdout, stderr, sender));
        Ok(Self {
            child: Some(child),
            events,
        })
    }

    /// The next watch event, or an error once `deadline` passes or the watch ends.
    pub fn next_event(&self, deadline: Instant) -> Result<serde_json::Value> {
        let remaining = deadline.saturating_duration_since(Instant::now());
        match self.events.recv_timeout(remaining) {
            Ok(Ok(event)) => Ok(event),
            Ok(Err(reason)) => bail!("kubectl watch ended: {reason}"),
            Err(RecvTimeoutError::Timeout) => bail!("no watch event before the deadline"),
            Err(RecvTimeoutError::Disconnected) => bail!("kubectl watch ended"),
        }
    }

    /// Reads events until one satisfies `predicate`; errors at `deadline`.
    pub fn wait_for(
        &self,
        deadline: Instant,
        mut predicate: impl FnMut(&serde_json::Value) -> bool,
    ) -> Result<serde_json::Value> {
        // Bounded by the deadline: next_event never waits past it.
        loop {
            let event = self.next_event(deadline)?;
            if predicate(&event) {
                return Ok(event);
            }
        }
    }
}

impl Drop for KubectlWatch {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn forward_json_stream(
    stdout: ChildStdout,
    stderr: Option<std::process::ChildStderr>,
    sender: std::sync::mpsc::Sender<Result<serde_json::Value, String>>,
) {
    let stream = serde_json::Deserializer::from_reader(BufReader::new(stdout)).into_iter();
    for item in stream {
        let message = item.map_err(|error| format!("bad JSON from kubectl: {error}"));
        let failed = message.is_err();
        if sender.send(message).is_err() || failed {
            return;
        }
    }
    let mut stderr_text = String::new();
    if let Some(mut stderr) = stderr {
        let _ = stderr.read_to_string(&mut stderr_text);
    }
    let _ = sender.send(Err(format!(
        "stdout closed; stderr: {}",
        stderr_text.trim()
    )));
}

fn stop_child(mut child: Child) {
    let Ok(pid) = libc::pid_t::try_from(child.id()) else {
        let _ = child.kill();
        let _ = child.wait();
        return;
    };
    // SIGTERM lets etcd and the apiserver shut down cleanly; SIGKILL after the grace period.
    // SAFETY: kill(2) on the pid of a child we spawned and have not yet reaped.
    unsafe {
        libc::kill(pid, libc::SIGTERM);
    }
    let deadline = Instant::now() + STOP_GRACE;
    while Instant::now() < deadline {
        match child.try_wait() {
            Ok(Some(_)) => return,
            Ok(None) => thread::sleep(Duration::from_millis(50)),
            Err(_) => break,
        }
    }
    let _ = child.kill();
    let _ = child.wait();
}

fn create_data_dir() -> Result<PathBuf> {
    // tmpfs when available: etcd writes a lot and the data is thrown away.
    let base = std::env::var_os("TORTIE_APISERVER_DIR_BASE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let shm = PathBuf::from("/dev/shm");
            if shm.is_dir() {
                shm
            } else {
                std::env::temp_dir()
            }
        });
    let dir = base.join(format!(
        "tortie-apiserver-{}-{}",
        std::process::id(),
        INSTANCE_COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    if dir.exists() {
        std::fs::remove_dir_all(&dir)
            .with_context(|| format!("removing stale {}", dir.display()))?;
    }
    std::fs::create_dir_all(dir.join("pki"))
        .with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// True when something accepts TCP on 127.0.0.1:`port` of `netns` (or of this namespace).
fn loopback_port_open(netns: Option<&str>, port: u16) -> Result<bool> {
    let connect = move || {
        std::net::TcpStream::connect_timeout(
            &std::net::SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
            Duration::from_millis(200),
        )
        .is_ok()
    };
    let Some(netns) = netns else {
        return Ok(connect());
    };
    let path = format!("/var/run/netns/{netns}");
    let file = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
    // setns affects only the calling thread, so a short-lived thread does the connect.
    thread::scope(|scope| {
        scope
            .spawn(move || -> Result<bool> {
                use std::os::fd::AsRawFd as _;
                // SAFETY: setns on this thread only; `file` stays open for the call.
                let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                if rc != 0 {
                    bail!("setns into {path}: {}", std::io::Error::last_os_error());
                }
                Ok(connect())
            })
            .join()
            .map_err(|_| anyhow!("netns probe thread panicked"))?
    })
}

fn free_port() -> Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("binding a free port")?;
    Ok(listener
        .local_addr()
        .context("reading the free port")?
        .port())
}

fn socket_text(address: IpAddr, port: u16) -> String {
    match address {
        IpAddr::V4(v4) => format!("{v4}:{port}"),
        IpAddr::V6(v6) => format!("[{v6}]:{port}"),
    }
}

/// CA, serving cert (SANs for loopback, the given addresses and the in-cluster names),
/// admin client cert (O=system:masters) and the ServiceAccount signing key pair.
fn generate_pki(pki: &Path, addresses: &[IpAddr]) -> Result<()> {
    let path = |name: &str| pki.join(name).display().to_string();
    let ec_key = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    openssl(
        pki,
        &[
            &["req", "-x509"][..],
            &ec_key,
            &[
                "-keyout",
                &path("ca.key"),
                "-out",
                &path("ca.crt"),
                "-days",
                "7",
            ],
            &["-subj", "/CN=tortie-test-ca"],
            &["-addext", "basicConstraints=critical,CA:TRUE"],
            &[
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign,digitalSignature",
            ],
        ]
        .concat(),
    )?;

    let mut sans: Vec<String> = [
        "DNS:localhost",
        "DNS:kubernetes",
        "DNS:kubernetes.default",
        "DNS:kubernetes.default.svc",
        "DNS:kubernetes.default.svc.cluster.local",
        "IP:127.0.0.1",
        "IP:::1",
        "IP:10.96.0.1",
    ]
    .map(String::from)
    .to_vec();
    for address in addresses {
        let san = format!("IP:{address}");
        if !address.is_unspecified() && !sans.contains(&san) {
            sans.push(san);
        }
    }
    issue_cert(
        pki,
        "apiserver",
        "/CN=kube-apiserver",
        &format!(
            "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n\
             extendedKeyUsage=serverAuth\nsubjectAltName={}\n",
            sans.join(",")
        ),
    )?;
    issue_cert(
        pki,
        "admin",
        "/O=system:masters/CN=admin",
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n\
         extendedKeyUsage=clientAuth\n",
    )?;

    openssl(
        pki,
        &[
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
            &path("sa.key"),
        ],
    )?;
    openssl(
        pki,
        &[
            "ec",
            "-in",
            &path("sa.key"),
            "-pubout",
            "-out",
            &path("sa.pub"),
        ],
    )?;
    Ok(())
}

fn issue_cert(pki: &Path, name: &str, subject: &str, extensions: &str) -> Result<()> {
    let path = |suffix: &str| pki.join(format!("{name}{suffix}")).display().to_string();
    std::fs::write(path(".ext"), extensions)
        .with_context(|| format!("writing {}", path(".ext")))?;
    openssl(
        pki,
        &[
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &path(".key"),
            "-out",
            &path(".csr"),
            "-subj",
            subject,
        ],
    )?;
    let ca_cert = pki.join("ca.crt").display().to_string();
    let ca_key = pki.join("ca.key").display().to_string();
    openssl(
        pki,
        &[
            "x509",
            "-req",
            "-in",
            &path(".csr"),
            "-CA",
            &ca_cert,
            "-CAkey",
            &ca_key,
            "-CAcreateserial",
            "-days",
            "7",
            "-sha256",
            "-extfile",
            &path(".ext"),
            "-out",
            &path(".crt"),
        ],
    )?;
    Ok(())
}

fn openssl(dir: &Path, args: &[&str]) -> Result<()> {
    let mut command = Command::new("openssl");
    command.current_dir(dir).args(args);
    let described = describe(&command);
    let output = run_with_timeout(command, None, Duration::from_secs(30))
        .context("running openssl (is the openssl CLI installed? `make deps` installs it)")?;
    checked_stdout(output, &described).map(drop)
}

fn write_cert_kubeconfig(
    path: &Path,
    server: &str,
    ca: &Path,
    cert: &Path,
    key: &Path,
) -> Result<()> {
    let user = serde_json::json!({
        "client-certificate": cert,
        "client-key": key,
    });
    write_kubeconfig(path, server, ca, "admin", user)
}

fn write_token_kubeconfig(
    path: &Path,
    server: &str,
    ca: &Path,
    user_name: &str,
    token: &str,
) -> Result<()> {
    write_kubeconfig(
        path,
        server,
        ca,
        user_name,
        serde_json::json!({ "token": token }),
    )
}

/// Kubeconfig is YAML, and JSON is YAML: serde_json keeps quoting right.
fn write_kubeconfig(
    path: &Path,
    server: &str,
    ca: &Path,
    user_name: &str,
    user: serde_json::Value,
) -> Result<()> {
    let config = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "tortie-test", "cluster": {"server": server, "certificate-authority": ca}}],
        "users": [{"name": user_name, "user": user}],
        "contexts": [{"name": "tortie-test", "context": {"cluster": "tortie-test", "user": user_name}}],
        "current-context": "tortie-test",
    });
    let text = serde_json::to_string_pretty(&config).context("encoding kubeconfig")?;
    std::fs::write(path, text).with_context(|| format!("writing kubeconfig {}", path.display()))
}

fn describe(command: &Command) -> String {
    let mut text = command.get_program().to_string_lossy().into_owned();
    for arg in command.get_args() {
        text.push(' ');
        text.push_str(&arg.to_string_lossy());
    }
    text
}

fn checked_stdout(output: Output, described: &str) -> Result<String> {
    if !output.status.success() {
        bail!(
            "`{described}` failed with {}: {}{}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim(),
            String::from_utf8_lossy(&output.stdout).trim()
        );
    }
    String::from_utf8(output.stdout).with_context(|| format!("`{described}` printed non-UTF-8"))
}

/// Runs a command to completion, killing it at `timeout`; optional stdin.
fn run_with_timeout(
    mut command: Command,
    stdin: Option<&[u8]>,
    timeout: Duration,
) -> Result<Output> {
    let described = describe(&command);
    command
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command
        .spawn()
        .with_context(|| format!("spawning `{described}`"))?;
    if let Some(input) = stdin {
        let mut pipe = child
            .stdin
            .take()
            .ok_or_else(|| anyhow!("`{described}`: stdin was not captured"))?;
        let input = input.to_vec();
        // A writer thread so a large manifest cannot deadlock against unread output.
        thread::spawn(move || {
            let _ = pipe.write_all(&input);
        });
    }
    let pid = child.id();
    let (done_sender, done) = channel::<()>();
    let watchdog = thread::spawn(move || {
        if done.recv_timeout(timeout) == Err(RecvTimeoutError::Timeout) {
            if let Ok(pid) = libc::pid_t::try_from(pid) {
                // SAFETY: kill(2) on our own child, which wait_with_output has not reaped yet
                // (it is still blocked reading the child's pipes).
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
            true
        } else {
            false
        }
    });
    let output = child.wait_with_output();
    let _ = done_sender.send(());
    let timed_out = watchdog.join().unwrap_or(false);
    let output = output.with_context(|| format!("waiting for `{described}`"))?;
    if timed_out {
        bail!("`{described}` timed out after {timeout:?}");
    }
    Ok(output)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unspecified_bind_address_advertises_loopback() {
        let options = ApiServerOptions {
            bind_address: "0.0.0.0".parse().unwrap(),
            ..ApiServerOptions::default()
        };
        assert_eq!(
            options.effective_advertise_address(),
            IpAddr::V4(Ipv4Addr::LOCALHOST)
        );
    }

    #[test]
    fn explicit_advertise_address_wins_over_bind_address() {
        let options = ApiServerOptions {
            bind_address: "0.0.0.0".parse().unwrap(),
            advertise_address: Some("10.250.0.1".parse().unwrap()),
            ..ApiServerOptions::default()
        };
        assert_eq!(
            options.effective_advertise_address().to_string(),
            "10.250.0.1"
        );
    }

    #[test]
    fn ipv6_server_url_brackets_the_address() {
        assert_eq!(
            socket_text("fd00::1".parse().unwrap(), 6443),
            "[fd00::1]:6443"
        );
        assert_eq!(
            socket_text("127.0.0.1".parse().unwrap(), 6443),
            "127.0.0.1:6443"
        );
    }

    #[test]
    fn command_that_outlives_its_timeout_is_killed_and_reported() {
        let mut command = Command::new("sleep");
        command.arg("30");
        let started = Instant::now();
        let error = run_with_timeout(command, None, Duration::from_millis(200)).unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(10));
        assert!(format!("{error:#}").contains("timed out"), "{error:#}");
    }
}
