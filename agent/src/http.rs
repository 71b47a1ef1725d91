//! Health (`/liveness`, `/readiness` on :9099 as calico-node) and Prometheus `/metrics` (:9091)
//! over a minimal HTTP/1.1 responder: one GET per connection, no keep-alive.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::warn;

/// The rendered metrics text, replaced by the agent as figures change.
pub type MetricsText = Arc<Mutex<String>>;

pub fn spawn(
    health: SocketAddr,
    metrics: SocketAddr,
    ready: watch::Receiver<bool>,
    text: MetricsText,
) -> Result<()> {
    let health_listener = std::net::TcpListener::bind(health)
        .with_context(|| format!("binding health port {health}"))?;
    let metrics_listener = std::net::TcpListener::bind(metrics)
        .with_context(|| format!("binding metrics port {metrics}"))?;
    for l in [&health_listener, &metrics_listener] {
        l.set_nonblocking(true)?;
    }
    let health_listener = TcpListener::from_std(health_listener)?;
    let metrics_listener = TcpListener::from_std(metrics_listener)?;
    for listener in [health_listener, metrics_listener] {
        let ready = ready.clone();
        let text = text.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    continue;
                };
                let ready = *ready.borrow();
                let text = text.clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    let n = match tokio::time::timeout(
                        std::time::Duration::from_secs(5),
                        stream.read(&mut buf),
                    )
                    .await
                    {
                        Ok(Ok(n)) => n,
                        _ => return,
                    };
                    let request = String::from_utf8_lossy(&buf[..n]);
                    let path = request.split_whitespace().nth(1).unwrap_or("/");
                    let (code, body) = match path {
                        "/liveness" => ("200 OK", "ok\n".to_owned()),
                        "/readiness" if ready => ("200 OK", "ready\n".to_owned()),
                        "/readiness" => ("503 Service Unavailable", "not ready\n".to_owned()),
                        "/metrics" => {
                            ("200 OK", text.lock().map(|t| t.clone()).unwrap_or_default())
                        }
                        _ => ("404 Not Found", "not found\n".to_owned()),
                    };
                    let head = format!(
                        "HTTP/1.1 {code}\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                        body.len()
                    );
                    if let Err(e) = async {
                        stream.write_all(head.as_bytes()).await?;
                        stream.write_all(body.as_bytes()).await
                    }
                    .await
                    {
                        warn!(error = %e, "writing an HTTP reply failed");
                    }
                });
            }
        });
    }
    Ok(())
}
