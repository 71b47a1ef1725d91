//! Polling with a deadline: the test bed's only way to wait for something to become true.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};

/// Polls `probe` until it returns `Ok(Some(v))` or `timeout` passes. The interval starts at
/// 10 ms and doubles up to 200 ms, so fast conditions are seen fast and slow ones cost little.
/// The error names `what` and carries the probe's last error, so a failure says what was seen.
pub fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut probe: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let start = Instant::now();
    let deadline = start + timeout;
    let mut interval = Duration::from_millis(10);
    let mut last = String::from("condition never held");
    loop {
        match probe() {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last = format!("{e:#}"),
        }
        let now = Instant::now();
        if now >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}: {last}");
        }
        std::thread::sleep(interval.min(deadline - now));
        interval = (interval * 2).min(Duration::from_millis(200));
    }
}

/// Like [`wait_for`] for a boolean condition; returns how long it took.
pub fn wait_until(
    what: &str,
    timeout: Duration,
    mut cond: impl FnMut() -> bool,
) -> Result<Duration> {
    let start = Instant::now();
    wait_for(what, timeout, || Ok(cond().then_some(())))?;
    Ok(start.elapsed())
}
