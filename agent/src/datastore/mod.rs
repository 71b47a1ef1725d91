//! The agent's view of the Kubernetes API: Calico's kinds, Nodes, and the IPAM store over them.

pub mod calico;
pub mod ipam_store;
pub mod watch;
