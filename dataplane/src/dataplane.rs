//! The running dataplane: a dedicated thread that owns the netlink sockets and keeps the
//! kernel matching the latest inputs; the agent talks to it through a cheap handle.
//!
//! Why a thread and not a tokio task: every netlink call here is a short blocking system call
//! on a socket bound to the namespace the dataplane was started in, and a 100k-route apply is
//! CPU work best kept off the async runtime. The handle's methods never block for long (a
//! mutex and an eventfd write), so a tokio agent calls them directly from async code.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::desired::desired;
use crate::model::{Config, ConfigError, InputError, Inputs};
use crate::monitor::Monitor;
use crate::reconciler::{Counters, EventEffect, RETRY_AFTER_FAILURE, Reconciler};
use crate::socket::SocketError;

/// Datagrams read from the monitor per loop turn; the rest waits for the next turn.
const MONITOR_BATCH: usize = 4096;
/// After a failed dump (kernel busy, namespace going away) the loop waits this long.
const RESYNC_RETRY: Duration = Duration::from_secs(1);
/// Longest wait between retries of writes the kernel keeps refusing.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(30);

/// 0.5 s, 1 s, 2 s, … up to [`MAX_RETRY_DELAY`].
fn retry_delay(streak: u32) -> Duration {
    RETRY_AFTER_FAILURE
        .saturating_mul(1u32 << streak.min(16))
        .min(MAX_RETRY_DELAY)
}

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Socket(#[from] SocketError),
    #[error("starting the dataplane thread: {0}")]
    Thread(#[source] std::io::Error),
}

#[derive(Debug, Default)]
struct Commands {
    inputs: Option<Inputs>,
    generation: u64,
    complete: bool,
    resync: bool,
    stop: bool,
}

#[derive(Debug)]
struct Shared {
    commands: Mutex<Commands>,
    counters: Mutex<Counters>,
    wake: OwnedFd,
}

impl Shared {
    fn commands(&self) -> MutexGuard<'_, Commands> {
        // A panic on the worker thread must not take the agent down with a poisoned lock.
        self.commands.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn wake(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to our eventfd. A full counter cannot happen
        // (it would need 2^64 wakes), and a failed wake only delays work to the next timeout.
        unsafe { libc::write(self.wake.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }
}

/// Handle to the running dataplane. Dropping it stops the thread and leaves the kernel as it
/// is (no flush), so a restarted agent picks up without a gap.
#[derive(Debug)]
pub struct Dataplane {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Dataplane {
    /// Opens the netlink sockets in the calling thread's network namespace and starts the
    /// dataplane thread. It first learns the kernel state; nothing is written before the first
    /// [`Dataplane::set_desired`] and nothing deleted before [`Dataplane::mark_complete`].
    pub fn start(config: Config) -> Result<Dataplane, DataplaneError> {
        config.validate()?;
        let reconciler = Reconciler::new(config.clone())?;
        let monitor = Monitor::open(config.monitor_rcvbuf)?;
        // SAFETY: eventfd has no memory preconditions; the fd is checked before being owned.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(DataplaneError::Thread(std::io::Error::last_os_error()));
        }
        // SAFETY: fd is a fresh descriptor this function exclusively owns.
        let wake = unsafe { OwnedFd::from_raw_fd(fd) };
        let shared = Arc::new(Shared {
            commands: Mutex::new(Commands::default()),
            counters: Mutex::new(Counters::default()),
            wake,
        });
        let worker = Worker {
            shared: shared.clone(),
            config,
            reconciler,
            monitor,
        };
        let thread = std::thread::Builder::new()
            .name("tortie-dataplane".into())
            .spawn(move || worker.run())
            .map_err(DataplaneError::Thread)?;
        Ok(Dataplane {
            shared,
            thread: Some(thread),
        })
    }

    /// Hands over a complete new set of inputs (level-triggered: the latest wins). Returns the
    /// generation number that [`Counters::generation_applied`] reaches once it is applied.
    pub fn set_desired(&self, inputs: Inputs) -> Result<u64, InputError> {
        inputs.validate()?;
        let generation = {
            let mut c = self.shared.commands();
            c.generation += 1;
            c.inputs = Some(inputs);
            c.generation
        };
        self.shared.wake();
        Ok(generation)
    }

    /// The inputs are now complete (BGP End-of-RIB or graceful-restart timer): routes, entries
    /// and devices tortie owns but does not want may be deleted from now on.
    pub fn mark_complete(&self) {
        self.shared.commands().complete = true;
        self.shared.wake();
    }

    /// Asks for a full dump-and-compare now instead of at the next periodic resync.
    pub fn resync_now(&self) {
        self.shared.commands().resync = true;
        self.shared.wake();
    }

    /// A snapshot of the counters.
    pub fn counters(&self) -> Counters {
        self.shared
            .counters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl Drop for Dataplane {
    fn drop(&mut self) {
        self.shared.commands().stop = true;
        self.shared.wake();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Worker {
    shared: Arc<Shared>,
    config: Config,
    reconciler: Reconciler,
    monitor: Monitor,
}

impl Worker {
    fn run(mut self) {
        let span = tracing::info_span!("dataplane", protocol = self.config.route_protocol);
        let _guard = span.enter();
        let mut need_resync = true;
        let mut dirty = false;
        let mut have_inputs = false;
        let mut next_periodic = Instant::now() + self.config.resync_interval;
        let mut retry_at: Option<Instant> = None;
        let mut resync_not_before: Option<Instant> = None;
        let mut failure_streak: u32 = 0;
        let mut applied_generation = 0;
        let mut pending_generation = 0;
        loop {
            {
                let mut c = self.shared.commands();
                if c.stop {
                    break;
                }
                if let Some(inputs) = c.inputs.take() {
                    pending_generation = c.generation;
                    match desired(&inputs, &self.config) {
                        Ok(d) => {
                            for s in &d.skipped {
                                tracing::debug!(cidr = %s.cidr, reason = %s.reason, "route not built yet");
                            }
                            self.reconciler.set_desired(d);
                            have_inputs = true;
                            dirty = true;
                        }
                        Err(e) => tracing::error!(error = %e, "inputs rejected"),
                    }
                }
                if c.complete && !self.reconciler.is_complete() {
                    self.reconciler.mark_complete();
                    dirty = true;
                }
                if std::mem::take(&mut c.resync) {
                    need_resync = true;
                }
            }

            match self.drain_monitor() {
                Ok(EventEffect::Resync) => need_resync = true,
                Ok(EventEffect::Reconcile) => dirty = true,
                Ok(EventEffect::Nothing) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "monitor failed; resyncing");
                    need_resync = true;
                }
            }

            let now = Instant::now();
            if now >= next_periodic {
                need_resync = true;
                next_periodic = now + self.config.resync_interval;
            }
            if retry_at.is_some_and(|t| now >= t) {
                retry_at = None;
                dirty = true;
            }
            let resync_allowed = resync_not_before.is_none_or(|t| now >= t);
            if need_resync && resync_allowed {
                match self.reconciler.resync() {
                    Ok(()) => {
                        need_resync = false;
                        resync_not_before = None;
                        dirty = true;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "resync failed; retrying in {RESYNC_RETRY:?}");
                        resync_not_before = Some(now + RESYNC_RETRY);
                    }
                }
            }
            if dirty && have_inputs && !need_resync {
                dirty = false;
                match self.reconciler.reconcile() {
                    Ok(report) => {
                        applied_generation = pending_generation;
                        if report.failures.is_empty() {
                            failure_streak = 0;
                        } else {
                            // Refused writes are retried, ever less often; kernel events
                            // (a link appearing, a route removed) still trigger a pass at once.
                            let delay = retry_delay(failure_streak);
                            failure_streak = failure_streak.saturating_add(1);
                            retry_at = Some(Instant::now() + delay);
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "reconcile failed; resyncing");
                        need_resync = true;
                        resync_not_before = Some(Instant::now() + RESYNC_RETRY);
                    }
                }
            }
            self.publish_counters(applied_generation);
            let runnable = (dirty && have_inputs && !need_resync)
                || (need_resync && resync_not_before.is_none_or(|t| Instant::now() >= t));
            let deadline = [Some(next_periodic), retry_at, resync_not_before]
                .into_iter()
                .flatten()
                .min()
                .unwrap_or(next_periodic);
            self.wait(deadline, runnable);
        }
    }

    fn drain_monitor(&mut self) -> Result<EventEffect, SocketError> {
        let mut effect = EventEffect::Nothing;
        let reconciler = &mut self.reconciler;
        let drain = self.monitor.drain(MONITOR_BATCH, |msg| {
            effect = effect.max(reconciler.on_event(msg));
        })?;
        if drain.overrun {
            reconciler.counters_mut().monitor_overruns += 1;
            tracing::info!("monitor overrun (ENOBUFS): full resync");
            effect = EventEffect::Resync;
        }
        Ok(effect)
    }

    fn publish_counters(&self, generation: u64) {
        let mut out = self
            .shared
            .counters
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        *out = self.reconciler.counters().clone();
        out.generation_applied = generation;
    }

    /// Sleeps until the monitor or the handle has something, or `deadline`; does not sleep
    /// when work is already runnable.
    fn wait(&self, deadline: Instant, runnable: bool) {
        let timeout = if runnable {
            Duration::ZERO
        } else {
            deadline.saturating_duration_since(Instant::now())
        };
        let mut fds = [
            libc::pollfd {
                fd: self.shared.wake.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: self.monitor.fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        let ms = timeout.as_millis().min(i32::MAX as u128) as libc::c_int;
        // SAFETY: fds is a live array of two pollfd.
        unsafe { libc::poll(fds.as_mut_ptr(), 2, ms) };
        if fds[0].revents & libc::POLLIN != 0 {
            let mut value: u64 = 0;
            // SAFETY: reads 8 bytes into a live u64 from our nonblocking eventfd.
            unsafe {
                libc::read(
                    self.shared.wake.as_raw_fd(),
                    (&mut value as *mut u64).cast(),
                    8,
                )
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_delay_doubles_from_half_a_second_up_to_thirty() {
        assert_eq!(retry_delay(0), Duration::from_millis(500));
        assert_eq!(retry_delay(1), Duration::from_secs(1));
        assert_eq!(retry_delay(3), Duration::from_secs(4));
        assert_eq!(retry_delay(40), MAX_RETRY_DELAY);
    }
}
