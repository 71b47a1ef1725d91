//! The agent's background removal of pods' host veths after CNI DEL: the kernel's veth
//! teardown (RTNL plus an RCU grace period, ~20 ms) stays off the runtime's critical path,
//! and removals still in progress are tracked by name so an ADD reusing the name waits.

use std::collections::BTreeMap;
use std::sync::{Arc, LazyLock, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::watch;
use tortie_dataplane::workload_iface::{self, WorkloadIfaceError};
use tracing::{debug, error, warn};

/// Attempts per interface before the failure is logged and the name given up.
const ATTEMPTS: u32 = 5;
/// Doubles after each failed attempt: 20, 40, 80, 160 ms.
const FIRST_RETRY_DELAY: Duration = Duration::from_millis(20);
/// Every pod's host end is `cali` + 11 hex digits; nothing else is the agent's to remove.
const HOST_IF_PREFIX: &str = "cali";
/// How long an ADD waits for an earlier DEL's removal of the same host veth name.
pub const ADD_WAIT_LIMIT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ReaperError {
    #[error("host interface name {name:?} is not a pod's (\"cali\" + 11 hex digits): {reason}")]
    NotAPodInterface { name: String, reason: String },
    #[error("host interface {name} is still being removed after {waited:?}; retry the ADD")]
    StillRemoving { name: String, waited: Duration },
}

/// What [`VethReaper::remove`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Removal {
    /// No interface of that name exists.
    Absent,
    /// A removal of this very interface was already under way.
    AlreadyPending,
    /// A background removal started.
    Started,
}

/// One removal in flight: the interface index seen when it was asked for (so a newer
/// interface that took the name is never the one removed) and a flag set when it is over.
struct Pending {
    index: u32,
    done: watch::Receiver<bool>,
}

#[derive(Clone, Default)]
pub struct VethReaper {
    pending: Arc<Mutex<BTreeMap<String, Pending>>>,
}

impl VethReaper {
    /// The agent's reaper. One per process: the host namespace the agent runs in is
    /// process-wide, and so is the set of its interfaces being removed.
    pub fn shared() -> &'static VethReaper {
        static SHARED: LazyLock<VethReaper> = LazyLock::new(VethReaper::default);
        &SHARED
    }

    /// Starts removing host interface `name` on a blocking thread and returns at once; must
    /// run inside a tokio runtime. Failures are retried, then logged naming the interface.
    pub fn remove(&self, name: &str) -> Result<Removal, ReaperError> {
        validate_pod_host_if(name)?;
        let Some(index) = index_of(name) else {
            return Ok(Removal::Absent);
        };
        let (done_tx, done_rx) = watch::channel(false);
        {
            let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
            if pending.get(name).is_some_and(|p| p.index == index) {
                return Ok(Removal::AlreadyPending);
            }
            pending.insert(
                name.to_owned(),
                Pending {
                    index,
                    done: done_rx,
                },
            );
        }
        let reaper = self.clone();
        let name = name.to_owned();
        tokio::task::spawn_blocking(move || {
            remove_with_retries(&name, index);
            let mut pending = reaper
                .pending
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if pending.get(&name).is_some_and(|p| p.index == index) {
                pending.remove(&name);
            }
            drop(pending);
            let _ = done_tx.send(true);
        });
        Ok(Removal::Started)
    }

    /// Waits (at most `limit`) until no removal of `name` is in progress.
    pub async fn wait_removed(&self, name: &str, limit: Duration) -> Result<(), ReaperError> {
        let done = self
            .pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(name)
            .map(|p| p.done.clone());
        let Some(mut done) = done else {
            return Ok(());
        };
        match tokio::time::timeout(limit, done.wait_for(|over| *over)).await {
            // A closed channel means the removal task ended (it cannot outlive its sender).
            Ok(_) => Ok(()),
            Err(_) => Err(ReaperError::StillRemoving {
                name: name.to_owned(),
                waited: limit,
            }),
        }
    }

    #[cfg(test)]
    fn pending(&self) -> usize {
        self.pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

fn validate_pod_host_if(name: &str) -> Result<(), ReaperError> {
    let refuse = |reason: String| ReaperError::NotAPodInterface {
        name: name.to_owned(),
        reason,
    };
    workload_iface::validate_ifname(name).map_err(|e| refuse(e.to_string()))?;
    if !name.starts_with(HOST_IF_PREFIX) {
        return Err(refuse(format!("does not start with {HOST_IF_PREFIX:?}")));
    }
    Ok(())
}

/// The index of `name` in this process's namespace, `None` when there is no such link.
fn index_of(name: &str) -> Option<u32> {
    let c_name = std::ffi::CString::new(name).ok()?;
    // SAFETY: if_nametoindex reads a NUL-terminated string that lives across the call.
    let index = unsafe { libc::if_nametoindex(c_name.as_ptr()) };
    (index != 0).then_some(index)
}

/// Removes `name` as long as it is still the interface with `index`, retrying with backoff.
fn remove_with_retries(name: &str, index: u32) {
    let mut delay = FIRST_RETRY_DELAY;
    for attempt in 1..=ATTEMPTS {
        // A different index means the old interface is gone and a new pod owns the name.
        if index_of(name) != Some(index) {
            debug!(host_if = name, index, "host interface already gone");
            return;
        }
        match workload_iface::delete_host_iface(name) {
            Ok(existed) => {
                debug!(host_if = name, index, existed, "host interface removed");
                return;
            }
            Err(e) if attempt < ATTEMPTS => {
                warn!(host_if = name, attempt, error = %e, "removing the pod's host interface failed; retrying");
                std::thread::sleep(delay);
                delay *= 2;
            }
            Err(e) => log_given_up(name, &e),
        }
    }
}

fn log_given_up(name: &str, e: &WorkloadIfaceError) {
    error!(
        host_if = name,
        attempts = ATTEMPTS,
        error = %e,
        "removing the pod's host interface failed; it stays until the pod's namespace is deleted \
         or the pod is added again"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_pod_host_interfaces_may_be_removed() {
        assert!(validate_pod_host_if("cali0123456789a").is_ok());
        let err = validate_pod_host_if("eth0").unwrap_err();
        assert!(err.to_string().contains("\"eth0\""), "{err}");
        assert!(validate_pod_host_if("cali/../../x").is_err());
        assert!(validate_pod_host_if("cali0123456789abc").is_err());
    }

    #[tokio::test]
    async fn a_missing_interface_needs_no_removal_and_no_wait() {
        let reaper = VethReaper::default();
        assert_eq!(reaper.remove("cali_no_such_if").unwrap(), Removal::Absent);
        assert_eq!(reaper.pending(), 0);
        reaper
            .wait_removed("cali_no_such_if", Duration::from_millis(1))
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn waiting_on_a_removal_that_does_not_finish_times_out_naming_the_interface() {
        let reaper = VethReaper::default();
        let (_done_tx, done_rx) = watch::channel(false);
        reaper.pending.lock().unwrap().insert(
            "cali0123456789a".into(),
            Pending {
                index: 7,
                done: done_rx,
            },
        );
        let err = reaper
            .wait_removed("cali0123456789a", Duration::from_millis(10))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("cali0123456789a"), "{err}");
    }

    #[tokio::test]
    async fn a_finished_removal_releases_its_waiters() {
        let reaper = VethReaper::default();
        let (done_tx, done_rx) = watch::channel(false);
        reaper.pending.lock().unwrap().insert(
            "cali0123456789a".into(),
            Pending {
                index: 7,
                done: done_rx,
            },
        );
        let waiter = {
            let reaper = reaper.clone();
            tokio::spawn(async move {
                reaper
                    .wait_removed("cali0123456789a", Duration::from_secs(5))
                    .await
            })
        };
        done_tx.send(true).unwrap();
        waiter.await.unwrap().unwrap();
    }
}
