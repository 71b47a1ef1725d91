//! Network namespaces owned by one test: unique names, exec helpers, deletion on drop.

use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context, Result, bail};

/// Every namespace the test bed makes starts with this, so `make clean-netns` can find
/// leftovers without touching anybody else's namespaces.
pub const PREFIX: &str = "tortie-";

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A network namespace created by this process; deleted (with every process still in it) on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates `tortie-<pid>-<counter>-<role>`. Sweeps namespaces left by dead test processes first.
    pub fn create(role: &str) -> Result<Netns> {
        sweep_dead_owners();
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let name = format!("{PREFIX}{}-{n}-{role}", std::process::id());
        run_host(&["ip", "netns", "add", &name])
            .with_context(|| format!("creating netns {name}"))?;
        let ns = Netns { name };
        ns.run(&["ip", "link", "set", "lo", "up"])?;
        // Routers and nodes forward; a pod namespace ignores it.
        ns.run(&["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
        ns.run(&["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// A `Command` that runs `program` inside this namespace.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    /// Runs `argv` inside the namespace and returns its output whatever the exit status.
    pub fn exec(&self, argv: &[&str]) -> Result<Output> {
        let (program, args) = argv.split_first().context("empty argv")?;
        self.command(program)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {argv:?} in {}", self.name))
    }

    /// Runs `argv` inside the namespace; a non-zero exit is an error carrying stderr.
    pub fn run(&self, argv: &[&str]) -> Result<String> {
        let out = self.exec(argv)?;
        if !out.status.success() {
            bail!(
                "{argv:?} in netns {} exited with {}: {}",
                self.name,
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs a shell script inside the namespace.
    pub fn sh(&self, script: &str) -> Result<String> {
        self.run(&["sh", "-c", script])
    }

    /// Starts `argv` in the background inside the namespace.
    pub fn spawn(&self, argv: &[&str]) -> Result<Child> {
        let (program, args) = argv.split_first().context("empty argv")?;
        self.command(program)
            .args(args)
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("spawning {argv:?} in {}", self.name))
    }

    /// True when `ping -c1` to `addr` from this namespace gets a reply within `timeout_ms`.
    pub fn ping_once(&self, addr: &str, timeout_ms: u32) -> bool {
        let w = format!("{:.3}", f64::from(timeout_ms) / 1000.0);
        self.exec(&["ping", "-n", "-q", "-c", "1", "-W", &w, addr])
            .map(|o| o.status.success())
            .unwrap_or(false)
    }

    /// Runs `f` on a fresh thread whose network namespace is this one, so sockets it opens
    /// (netlink, TCP) live here. The calling thread is untouched.
    pub fn enter<R, F>(&self, f: F) -> Result<R>
    where
        F: FnOnce() -> R + Send,
        R: Send,
    {
        let path = format!("/var/run/netns/{}", self.name);
        let file = File::open(&path).with_context(|| format!("opening {path}"))?;
        std::thread::scope(|scope| {
            scope
                .spawn(move || -> Result<R> {
                    // SAFETY: setns on the current thread only; `file` outlives the call.
                    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                    if rc != 0 {
                        bail!("setns into {path}: {}", std::io::Error::last_os_error());
                    }
                    Ok(f())
                })
                .join()
                .map_err(|_| anyhow::anyhow!("thread inside netns panicked"))?
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        kill_pids_in(&self.name);
        let _ = run_host(&["ip", "netns", "del", &self.name]);
    }
}

fn kill_pids_in(name: &str) {
    let Ok(out) = Command::new("ip").args(["netns", "pids", name]).output() else {
        return;
    };
    for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
        if let Ok(pid) = pid.parse::<i32>() {
            // SAFETY: plain kill(2) on a pid that lives in a namespace this test owns.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// `(transmitted, received)` from ping's summary line
/// ("49 packets transmitted, 45 received, 8.2% packet loss, time 778ms"); `None` without one.
pub fn ping_counts(output: &str) -> Option<(u32, u32)> {
    let line = output.lines().find(|l| l.contains("packets transmitted"))?;
    let field = |suffix: &str| -> Option<u32> {
        line.split(',').find_map(|part| {
            part.trim()
                .strip_suffix(suffix)
                .and_then(|n| n.trim().parse().ok())
        })
    };
    Some((field(" packets transmitted")?, field(" received")?))
}

/// Runs a command in the root namespace; non-zero exit is an error carrying stderr.
pub fn run_host(argv: &[&str]) -> Result<String> {
    let (program, args) = argv.split_first().context("empty argv")?;
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {argv:?}"))?;
    if !out.status.success() {
        bail!(
            "{argv:?} exited with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Lists the test bed's namespaces (those with [`PREFIX`]).
pub fn list_ours() -> Vec<String> {
    let out = run_host(&["ip", "netns", "list"]).unwrap_or_default();
    out.lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(PREFIX))
        .map(str::to_owned)
        .collect()
}

/// Deletes namespaces whose creating process is gone (a test killed by SIGKILL cannot run Drop).
fn sweep_dead_owners() {
    for name in list_ours() {
        let owner = name[PREFIX.len()..]
            .split('-')
            .next()
            .and_then(|p| p.parse::<u32>().ok());
        if let Some(pid) = owner
            && pid != std::process::id()
            && !std::path::Path::new(&format!("/proc/{pid}")).exists()
        {
            kill_pids_in(&name);
            let _ = run_host(&["ip", "netns", "del", &name]);
        }
    }
}

/// Deletes every namespace with the test bed's prefix (for `make clean-netns`).
pub fn remove_all_ours() -> usize {
    let names = list_ours();
    for name in &names {
        kill_pids_in(name);
        let _ = run_host(&["ip", "netns", "del", name]);
    }
    names.len()
}

#[cfg(test)]
mod tests {
    #[test]
    fn ping_counts_reads_the_summary_line() {
        let out = "PING 10.0.0.1 (10.0.0.1) 56(84) bytes of data.\n\n--- 10.0.0.1 ping statistics ---\n\
                   49 packets transmitted, 45 received, 8.16327% packet loss, time 778ms\n";
        assert_eq!(super::ping_counts(out), Some((49, 45)));
        let with_errors =
            "3 packets transmitted, 1 received, +2 errors, 66.7% packet loss, time 2003ms\n";
        assert_eq!(super::ping_counts(with_errors), Some((3, 1)));
        assert_eq!(
            super::ping_counts("PING 10.0.0.1 (10.0.0.1) 56(84) bytes of data.\n"),
            None
        );
    }
}
