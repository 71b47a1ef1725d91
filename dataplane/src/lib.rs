//! tortie-dataplane: the desired-route model and the netlink reconciler that applies it.

pub mod desired;
pub mod model;

pub use desired::desired;
pub use model::*;
