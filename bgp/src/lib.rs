//! tortie-bgp: a BGP-4 speaker as a library (codec, FSM, RIBs, best path, sessions).

pub mod fsm;
pub mod rib;
pub mod speaker;
pub mod wire;
