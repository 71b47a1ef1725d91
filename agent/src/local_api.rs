//! The agent's root-only unix socket: the CNI plugin asks it for addresses and reports
//! workloads; `tortie status` reads the node's state. One JSON request per line, one JSON
//! reply per line.

use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};
use tracing::warn;

pub const SOCKET_NAME: &str = "tortie.sock";

pub fn socket_path(run_dir: &Path) -> PathBuf {
    run_dir.join(SOCKET_NAME)
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Assign addresses to `k8s-pod-network.<container_id>` (idempotent per handle).
    Assign {
        container_id: String,
        namespace: String,
        pod: String,
        ipv4: bool,
        ipv6: bool,
        /// The host veth the plugin is about to create: the agent answers only once an
        /// earlier DEL's background removal of that name is over. Absent from older plugins.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        host_if: Option<String>,
    },
    /// The pod's veth is wired: install its `/32` route(s) now.
    WorkloadUp {
        container_id: String,
        host_if: String,
        ips: Vec<IpAddr>,
    },
    /// Forget the workload and release its handle (idempotent). With `host_if`, the agent
    /// also removes that host veth after answering, and says so in
    /// [`Reply::host_if_handled`]; older plugins omit it and remove the veth themselves.
    Release {
        container_id: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        host_if: Option<String>,
    },
    /// Whether the agent can serve pods (CNI STATUS).
    Ready,
    /// Node state for `tortie status`.
    Status,
    /// preStop: mark the node's network unavailable before the agent stops.
    Shutdown,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct Reply {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ips: Vec<IpAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<serde_json::Value>,
    /// On `release`: the agent took charge of the host veth named in the request (removing
    /// it in the background, or keeping it because a newer sandbox of the pod owns it). An
    /// older agent never sets it, and the plugin then removes the veth itself.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub host_if_handled: bool,
}

impl Reply {
    pub fn ok() -> Reply {
        Reply {
            ok: true,
            ..Reply::default()
        }
    }

    pub fn err(e: impl std::fmt::Display) -> Reply {
        Reply {
            ok: false,
            error: Some(e.to_string()),
            ..Reply::default()
        }
    }
}

/// A request with the channel its reply goes back on.
pub type Call = (Request, oneshot::Sender<Reply>);

/// Listens on `path` (mode 0600) and forwards each request to `calls`.
pub async fn serve(path: PathBuf, calls: mpsc::Sender<Call>) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let _ = std::fs::remove_file(&path);
    let listener =
        UnixListener::bind(&path).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    loop {
        let (stream, _) = listener.accept().await?;
        let calls = calls.clone();
        tokio::spawn(async move {
            if let Err(e) = handle(stream, calls).await {
                warn!(error = %e, "local API connection failed");
            }
        });
    }
}

async fn handle(stream: UnixStream, calls: mpsc::Sender<Call>) -> Result<()> {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    while let Some(line) = lines.next_line().await? {
        let reply = match serde_json::from_str::<Request>(&line) {
            Ok(req) => {
                let (tx, rx) = oneshot::channel();
                calls
                    .send((req, tx))
                    .await
                    .context("agent is shutting down")?;
                rx.await
                    .unwrap_or_else(|_| Reply::err("agent dropped the request"))
            }
            Err(e) => Reply::err(format!("bad request: {e}")),
        };
        let mut out = serde_json::to_vec(&reply)?;
        out.push(b'\n');
        write.write_all(&out).await?;
    }
    Ok(())
}

/// Client side (CNI plugin, `tortie status`): one request, one reply, bounded in time.
pub fn call(path: &Path, req: &Request, timeout: Duration) -> Result<Reply> {
    Connection::open(path)?.call(req, timeout)
}

/// Client side, several requests on one connection (the plugin's ADD sends two or three;
/// each connection costs the agent an accept and a task). After an error, open a new one.
pub struct Connection {
    stream: std::io::BufReader<std::os::unix::net::UnixStream>,
}

impl Connection {
    pub fn open(path: &Path) -> Result<Connection> {
        let stream = std::os::unix::net::UnixStream::connect(path).with_context(|| {
            format!(
                "cannot reach the tortie agent at {} (is the tortie-node pod running on this node?)",
                path.display()
            )
        })?;
        Ok(Connection {
            stream: std::io::BufReader::new(stream),
        })
    }

    /// One request, one reply, bounded in time.
    pub fn call(&mut self, req: &Request, timeout: Duration) -> Result<Reply> {
        use std::io::{BufRead, Write};
        let stream = self.stream.get_mut();
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        let mut line = serde_json::to_vec(req)?;
        line.push(b'\n');
        stream.write_all(&line)?;
        let mut reply = String::new();
        self.stream
            .read_line(&mut reply)
            .context("reading the agent's reply")?;
        if reply.is_empty() {
            bail!("the tortie agent closed the connection without replying");
        }
        Ok(serde_json::from_str(&reply)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_from_older_plugins_still_parse() {
        let release: Request =
            serde_json::from_str(r#"{"op":"release","container_id":"c1"}"#).unwrap();
        assert!(matches!(
            release,
            Request::Release { ref container_id, host_if: None } if container_id == "c1"
        ));
        let assign: Request = serde_json::from_str(
            r#"{"op":"assign","container_id":"c1","namespace":"n","pod":"p","ipv4":true,"ipv6":false}"#,
        )
        .unwrap();
        assert!(matches!(assign, Request::Assign { host_if: None, .. }));
    }

    #[test]
    fn older_agents_ignore_the_host_interface_and_never_claim_it() {
        // What an agent from before `host_if` existed would read: the field is simply unknown.
        let line = serde_json::to_string(&Request::Release {
            container_id: "c1".into(),
            host_if: Some("cali0123456789a".into()),
        })
        .unwrap();
        assert_eq!(
            line,
            r#"{"op":"release","container_id":"c1","host_if":"cali0123456789a"}"#
        );
        // And its reply, without `host_if_handled`, means "not handled".
        let reply: Reply = serde_json::from_str(r#"{"ok":true}"#).unwrap();
        assert!(!reply.host_if_handled);
        let handled = serde_json::to_string(&Reply {
            host_if_handled: true,
            ..Reply::ok()
        })
        .unwrap();
        assert_eq!(handled, r#"{"ok":true,"host_if_handled":true}"#);
        assert_eq!(
            serde_json::to_string(&Reply::ok()).unwrap(),
            r#"{"ok":true}"#
        );
    }
}
