//! Real BGP daemons (BIRD 2, FRR bgpd + zebra, GoBGP, ExaBGP) started inside a test's namespace
//! with a generated config, queried for assertions, and stopped by the exact pids we started.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::netns::Netns;
use crate::wait::wait_for;

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A per-daemon scratch directory, removed on drop; logs stay readable until then.
#[derive(Debug)]
pub struct WorkDir(PathBuf);

impl WorkDir {
    pub fn new(kind: &str) -> Result<WorkDir> {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("tortie-{}-{n}-{kind}", std::process::id()));
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(WorkDir(dir))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    fn write(&self, name: &str, content: &str) -> Result<PathBuf> {
        let p = self.file(name);
        fs::write(&p, content).with_context(|| format!("writing {}", p.display()))?;
        Ok(p)
    }

    /// The tail of a log file, for failure messages.
    pub fn tail(&self, name: &str, lines: usize) -> String {
        let text = fs::read_to_string(self.file(name)).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if std::env::var_os("TORTIE_KEEP_LOGS").is_none() {
            let _ = fs::remove_dir_all(&self.0);
        }
    }
}

/// A child process we started; killed and reaped on drop (exactly this pid, nothing else).
#[derive(Debug)]
pub struct Owned(Child);

impl Owned {
    /// Takes ownership of a child started elsewhere, so it is killed and reaped on drop.
    pub fn new(child: Child) -> Owned {
        Owned(child)
    }

    pub fn pid(&self) -> u32 {
        self.0.id()
    }

    /// Sends a signal to exactly this process (e.g. SIGSTOP to freeze a peer, SIGCONT to thaw it).
    pub fn signal(&self, sig: i32) -> Result<()> {
        // SAFETY: kill(2) on the pid of a child we still own (not yet reaped).
        let rc = unsafe { libc::kill(self.0.id() as i32, sig) };
        if rc != 0 {
            bail!(
                "kill({}, {sig}): {}",
                self.0.id(),
                std::io::Error::last_os_error()
            );
        }
        Ok(())
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.0.try_wait(), Ok(None))
    }
}

impl Drop for Owned {
    fn drop(&mut self) {
        // SIGCONT first so a frozen daemon can die.
        // SAFETY: signals to our own unreaped child.
        unsafe {
            libc::kill(self.0.id() as i32, libc::SIGCONT);
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_logged(ns: &Netns, argv: &[&str], log: &Path) -> Result<Owned> {
    let (program, args) = argv.split_first().context("empty argv")?;
    let out = fs::File::create(log)?;
    let err = out.try_clone()?;
    let child = ns
        .command(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .with_context(|| format!("starting {argv:?} in {}", ns.name()))?;
    Ok(Owned(child))
}

const START_TIMEOUT: Duration = Duration::from_secs(15);

// ───────────────────────────── BIRD 2 ─────────────────────────────

/// BIRD 2 running in a namespace with the given config; `birdc` talks to its own control socket.
#[derive(Debug)]
pub struct Bird {
    pub dir: WorkDir,
    socket: PathBuf,
    proc: Owned,
}

impl Bird {
    /// Starts `bird -f` with `config` (a complete bird.conf) inside `ns`.
    pub fn start(ns: &Netns, config: &str) -> Result<Bird> {
        let dir = WorkDir::new("bird")?;
        let conf = dir.write("bird.conf", config)?;
        let socket = dir.file("bird.ctl");
        let log = dir.file("bird.log");
        let proc = spawn_logged(
            ns,
            &[
                "bird",
                "-f",
                "-c",
                path_str(&conf)?,
                "-s",
                path_str(&socket)?,
                "-P",
                path_str(&dir.file("bird.pid"))?,
            ],
            &log,
        )?;
        let mut bird = Bird { dir, socket, proc };
        let ready = wait_for("bird control socket", START_TIMEOUT, || {
            if !bird.proc.alive() {
                bail!("bird exited: {}", bird.dir.tail("bird.log", 20));
            }
            Ok(bird
                .birdc(&["show", "status"])
                .ok()
                .filter(|s| s.contains("Daemon is up")))
        });
        ready?;
        Ok(bird)
    }

    pub fn proc(&self) -> &Owned {
        &self.proc
    }

    /// Runs a birdc command and returns its output.
    pub fn birdc(&self, args: &[&str]) -> Result<String> {
        let out = std::process::Command::new("birdc")
            .arg("-s")
            .arg(&self.socket)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .context("running birdc")?;
        if !out.status.success() {
            bail!("birdc {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The state column of `show protocols <name>` (e.g. "Established").
    pub fn protocol_info(&self, name: &str) -> Result<String> {
        self.birdc(&["show", "protocols", "all", name])
    }

    pub fn is_established(&self, name: &str) -> bool {
        self.protocol_info(name)
            .map(|s| s.contains("BGP state:          Established"))
            .unwrap_or(false)
    }

    /// `show route all` output (optionally for one table, e.g. "master6").
    pub fn routes(&self, table: Option<&str>) -> Result<String> {
        match table {
            Some(t) => self.birdc(&["show", "route", "all", "table", t]),
            None => self.birdc(&["show", "route", "all"]),
        }
    }

    pub fn configure(&self, config: &str) -> Result<()> {
        fs::write(self.dir.file("bird.conf"), config)?;
        let out = self.birdc(&["configure"])?;
        if !out.contains("Reconfigured") && !out.contains("Reconfiguration in progress") {
            bail!("bird configure: {out}");
        }
        Ok(())
    }
}

// ───────────────────────────── GoBGP ─────────────────────────────

/// gobgpd running in a namespace; `gobgp` talks to its gRPC port on that namespace's loopback.
#[derive(Debug)]
pub struct Gobgp {
    pub dir: WorkDir,
    api_port: u16,
    proc: Owned,
    ns_name: String,
}

impl Gobgp {
    /// Starts gobgpd with `config_toml`; the API listens on 127.0.0.1:`api_port` inside `ns`.
    pub fn start(
        ns: &Netns,
        config_toml: &str,
        api_port: u16,
        graceful_restart: bool,
    ) -> Result<Gobgp> {
        let dir = WorkDir::new("gobgp")?;
        let conf = dir.write("gobgpd.toml", config_toml)?;
        let api = format!("127.0.0.1:{api_port}");
        let mut argv = vec![
            "gobgpd",
            "-f",
            path_str(&conf)?,
            "--api-hosts",
            &api,
            "-p",
            "--pprof-disable",
        ];
        if graceful_restart {
            argv.push("-r");
        }
        let proc = spawn_logged(ns, &argv, &dir.file("gobgpd.log"))?;
        let mut g = Gobgp {
            dir,
            api_port,
            proc,
            ns_name: ns.name().to_owned(),
        };
        wait_for("gobgpd API", START_TIMEOUT, || {
            if !g.proc.alive() {
                bail!("gobgpd exited: {}", g.dir.tail("gobgpd.log", 20));
            }
            g.cli(&["global"]).map(Some)
        })?;
        Ok(g)
    }

    pub fn proc(&self) -> &Owned {
        &self.proc
    }

    /// Runs `gobgp <args>` against this daemon.
    pub fn cli(&self, args: &[&str]) -> Result<String> {
        let port = self.api_port.to_string();
        let out = std::process::Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.ns_name,
                "gobgp",
                "--host",
                "127.0.0.1",
                "--port",
                &port,
            ])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .context("running gobgp")?;
        if !out.status.success() {
            bail!(
                "gobgp {args:?}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `gobgp -j neighbor` parsed.
    pub fn neighbors(&self) -> Result<Value> {
        Ok(serde_json::from_str(&self.cli(&["-j", "neighbor"])?)?)
    }

    /// Session state of neighbor `addr`, by its RFC name in lower case ("established", "active", …).
    /// GoBGP's JSON gives the gRPC enum number; this maps it back.
    pub fn neighbor_state(&self, addr: &str) -> Result<String> {
        let v: Value = serde_json::from_str(&self.cli(&["-j", "neighbor", addr])?)?;
        let state = v.pointer("/state/session_state");
        let name = match state.and_then(Value::as_i64) {
            Some(1) => "idle",
            Some(2) => "connect",
            Some(3) => "active",
            Some(4) => "opensent",
            Some(5) => "openconfirm",
            Some(6) => "established",
            _ => {
                return Ok(state
                    .and_then(Value::as_str)
                    .unwrap_or("unknown")
                    .to_lowercase());
            }
        };
        Ok(name.to_owned())
    }

    /// `gobgp -j global rib [-a ipv6]` parsed: an object keyed by prefix.
    pub fn rib(&self, ipv6: bool) -> Result<Value> {
        let out = if ipv6 {
            self.cli(&["-j", "global", "rib", "-a", "ipv6"])?
        } else {
            self.cli(&["-j", "global", "rib"])?
        };
        if out.trim().is_empty() {
            return Ok(Value::Object(Default::default()));
        }
        Ok(serde_json::from_str(&out)?)
    }
}

// ───────────────────────────── FRR ─────────────────────────────

/// FRR's zebra and bgpd in a namespace, isolated by their own socket directory; `vtysh` attaches to it.
#[derive(Debug)]
pub struct Frr {
    pub dir: WorkDir,
    bgpd: Owned,
    zebra: Owned,
}

impl Frr {
    /// Starts zebra and bgpd; `bgpd_config` is the `frr.conf`-style text for bgpd (router bgp …).
    pub fn start(ns: &Netns, bgpd_config: &str) -> Result<Frr> {
        let dir = WorkDir::new("frr")?;
        // FRR drops privileges to frr:frr; its directory must be theirs.
        std::process::Command::new("chown")
            .args(["-R", "frr:frr", path_str(dir.path())?])
            .status()?;
        let zconf = dir.write("zebra.conf", "hostname zebra\n")?;
        let bconf = dir.write("bgpd.conf", bgpd_config)?;
        let zsock = dir.file("zserv.api");
        let vty = path_str(dir.path())?.to_owned();
        let zebra = spawn_logged(
            ns,
            &[
                "/usr/lib/frr/zebra",
                "-f",
                path_str(&zconf)?,
                "-i",
                path_str(&dir.file("zebra.pid"))?,
                "-z",
                path_str(&zsock)?,
                "--vty_socket",
                &vty,
                "-P",
                "0",
                "-u",
                "frr",
                "-g",
                "frr",
                "--log",
                "stdout",
            ],
            &dir.file("zebra.log"),
        )?;
        let zsock_ready = zsock.clone();
        wait_for("zebra socket", START_TIMEOUT, || {
            Ok(zsock_ready.exists().then_some(()))
        })
        .with_context(|| dir.tail("zebra.log", 20))?;
        let bgpd = spawn_logged(
            ns,
            &[
                "/usr/lib/frr/bgpd",
                "-f",
                path_str(&bconf)?,
                "-i",
                path_str(&dir.file("bgpd.pid"))?,
                "-z",
                path_str(&zsock)?,
                "--vty_socket",
                &vty,
                "-P",
                "0",
                "-u",
                "frr",
                "-g",
                "frr",
                "--log",
                "stdout",
            ],
            &dir.file("bgpd.log"),
        )?;
        let mut frr = Frr { dir, bgpd, zebra };
        wait_for("bgpd vty", START_TIMEOUT, || {
            if !frr.bgpd.alive() {
                bail!("bgpd exited: {}", frr.dir.tail("bgpd.log", 20));
            }
            Ok(frr.vtysh(&["show bgp summary json"]).ok())
        })?;
        Ok(frr)
    }

    pub fn bgpd(&self) -> &Owned {
        &self.bgpd
    }

    pub fn zebra(&self) -> &Owned {
        &self.zebra
    }

    /// Runs vtysh commands (each a separate `-c`) against this instance.
    pub fn vtysh(&self, commands: &[&str]) -> Result<String> {
        let mut cmd = std::process::Command::new("vtysh");
        cmd.arg("--vty_socket").arg(self.dir.path());
        for c in commands {
            cmd.arg("-c").arg(c);
        }
        let out = cmd.stdin(Stdio::null()).output().context("running vtysh")?;
        if !out.status.success() {
            bail!(
                "vtysh {commands:?}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs a `... json` show command and parses it.
    pub fn json(&self, command: &str) -> Result<Value> {
        Ok(serde_json::from_str(&self.vtysh(&[command])?)?)
    }
}

// ───────────────────────────── ExaBGP ─────────────────────────────

/// ExaBGP in a namespace; [`Exabgp::send`] feeds API commands (e.g. `announce route …`) to it.
#[derive(Debug)]
pub struct Exabgp {
    pub dir: WorkDir,
    commands: PathBuf,
    proc: Owned,
}

impl Exabgp {
    /// Starts ExaBGP with the `neighbor { … }` blocks in `neighbors`; a `process` that replays
    /// the command file is added and bound to every neighbor by `api { processes [ ctl ]; }`
    /// inside each neighbor block — the caller includes that line.
    pub fn start(ns: &Netns, neighbors: &str) -> Result<Exabgp> {
        let dir = WorkDir::new("exabgp")?;
        let commands = dir.file("commands");
        fs::write(&commands, "")?;
        let config = format!(
            "process ctl {{\n    run /usr/bin/tail -n +1 -F {};\n    encoder text;\n}}\n{neighbors}\n",
            path_str(&commands)?
        );
        let conf = dir.write("exabgp.conf", &config)?;
        let mut cmd = ns.command("exabgp");
        cmd.arg(&conf)
            .env("exabgp.daemon.user", "root")
            .env("exabgp.daemon.drop", "false")
            .env("exabgp.log.destination", "stdout")
            .env("exabgp.log.level", "INFO")
            .env("exabgp.api.ack", "false")
            .env("exabgp.cache.attributes", "false")
            .env("exabgp.tcp.bind", "")
            .env("exabgp.daemon.pid", "")
            .stdin(Stdio::null());
        let log = fs::File::create(dir.file("exabgp.log"))?;
        cmd.stdout(log.try_clone()?).stderr(log);
        let child = cmd.spawn().context("starting exabgp")?;
        let mut exa = Exabgp {
            dir,
            commands,
            proc: Owned(child),
        };
        // ExaBGP has no query socket; the peer's view is what tests assert on. Here we only
        // make sure it got past config parsing.
        wait_for("exabgp to load its config", START_TIMEOUT, || {
            if !exa.proc.alive() {
                bail!("exabgp exited: {}", exa.dir.tail("exabgp.log", 30));
            }
            Ok(exa
                .log()
                .contains("loaded new configuration successfully")
                .then_some(()))
        })?;
        Ok(exa)
    }

    /// Appends one API command; ExaBGP reads it through `tail -F`.
    pub fn send(&self, command: &str) -> Result<()> {
        let mut f = fs::OpenOptions::new().append(true).open(&self.commands)?;
        writeln!(f, "{command}")?;
        Ok(())
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.file("exabgp.log")).unwrap_or_default()
    }

    pub fn proc(&self) -> &Owned {
        &self.proc
    }
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str()
        .with_context(|| format!("non-UTF-8 path {}", p.display()))
}
