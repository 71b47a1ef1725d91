//! tortie-ipam: Calico-compatible block IPAM over a compare-and-swap store.
