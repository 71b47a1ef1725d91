//! tortie-e2e: the test bed (network namespaces, real BGP daemons, a real kube-apiserver).
//!
//! Every test builds its own world from these pieces, waits on conditions with deadlines
//! ([`wait::wait_for`]) and removes what it made when the pieces drop. See `e2e/README.md`.

pub mod cluster;
pub mod daemons;
pub mod kubelet_cluster;
pub mod netns;
pub mod topology;
pub mod wait;

pub use netns::Netns;
pub use topology::{Node, Pod, Topology, TopologySpec};
pub use wait::{wait_for, wait_until};

/// True when the test process can create network namespaces (root with CAP_SYS_ADMIN).
/// Tests that need namespaces call [`require_root`] and fail loudly otherwise: the test bed
/// is only meaningful for real.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "tortie's kernel tests need root (run them as root or via `make test`)"
    );
}
pub mod apiserver;
