//! tortie-e2e: the test bed (network namespaces, real BGP daemons, a real kube-apiserver).
