//! tortie-bgp: a BGP-4 speaker as a library (codec, FSM, RIBs, best path, sessions).
//!
//! The BIRD half of tortie: no Kubernetes, no netlink. The agent adds peers and prefixes
//! and consumes best-path changes; everything below is plain BGP.
//!
//! # Layers
//! - [`wire`]: hand-written codec for the five message types and the path attributes
//!   tortie understands; every decode error maps to its RFC 4271 §6 NOTIFICATION and
//!   UPDATE errors carry their RFC 7606 outcome ([`wire::UpdateOutcome`]).
//! - [`fsm`]: the RFC 4271 §8 state machine without I/O (`on_event(event) -> Vec<Action>`).
//! - [`rib`]: Adj-RIB-In / Loc-RIB / Adj-RIB-Out without I/O: decision process, iBGP split
//!   horizon, route reflection (RFC 4456), graceful-restart stale handling (RFC 4724).
//! - [`speaker`]: the tokio runtime: listener, one task per peer, one RIB task, TCP-MD5.
//!
//! # Using the speaker
//! ```no_run
//! # async fn demo() -> Result<(), tortie_bgp::SpeakerError> {
//! use std::net::{IpAddr, Ipv4Addr};
//! use tortie_bgp::{PeerConfig, Speaker, SpeakerConfig};
//!
//! let speaker = Speaker::start(SpeakerConfig::new(Ipv4Addr::new(10, 0, 0, 1), 64512)).await?;
//! speaker.add_peer(PeerConfig::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2)), 64512))?;
//! speaker.originate("10.65.0.0/26".parse().expect("valid prefix"))?;
//! let mut changes = speaker.subscribe();
//! while let Ok(change) = changes.recv().await {
//!     match change.best {
//!         Some(best) => println!("{} via {:?}", change.prefix, best.attrs.next_hop),
//!         None => println!("{} withdrawn", change.prefix),
//!     }
//! }
//! # Ok(())
//! # }
//! ```
//!
//! The public surface is [`Speaker`] and its config/status types, plus the sans-IO
//! modules for tests and tools that need to speak BGP byte by byte.

pub mod fsm;
pub mod rib;
pub mod speaker;
pub mod wire;

pub use fsm::State as SessionState;
pub use rib::{BestChange, BestPath, RouteAttrs};
pub use speaker::{
    BGP_PORT, GracefulRestartConfig, PeerConfig, PeerStatus, Speaker, SpeakerConfig, SpeakerError,
};
pub use wire::NextHop;
