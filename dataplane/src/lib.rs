//! tortie-dataplane: the desired-route model and the netlink reconciler that applies it.
//!
//! Layers, from pure to kernel-facing:
//! - [`model`] and [`desired()`]: inputs → [`DesiredState`] (routes, tunnel devices, VXLAN
//!   neighbours/FDB), pure and unit-tested.
//! - [`diff`]: desired vs tortie's view of the kernel → a [`diff::Plan`], pure.
//! - [`socket`]: the batched rtnetlink socket; [`monitor`]: the multicast listener.
//! - [`reconciler`]: dumps, applies plans, folds events, counts.
//! - [`Dataplane`]: the running thread and the handle the agent holds.
//!
//! All of tortie's routes live in the main table with route protocol
//! [`DEFAULT_ROUTE_PROTOCOL`] (84) unless [`Config::route_protocol`] says otherwise.
//!
//! The agent needs only [`Dataplane`], [`Config`], [`Inputs`] (and its parts) and
//! [`Counters`]; the lower modules are public for the benchmark, the kernel tests and the CNI
//! code. See `dataplane/README.md` for the rules the reconciler follows.

pub mod dataplane;
pub mod desired;
pub mod diff;
pub mod messages;
pub mod model;
pub mod monitor;
pub mod nat;
pub mod reconciler;
pub mod socket;
pub mod workload_iface;

pub use dataplane::{Dataplane, DataplaneError};
pub use desired::desired;
pub use model::*;
pub use reconciler::{ApplyError, Counters, Reconciler};
