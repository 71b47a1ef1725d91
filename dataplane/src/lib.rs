//! tortie-dataplane: the desired-route model and the netlink reconciler that applies it.
