//! natOutgoing through the agent: `kubectl patch` of the pool turns masquerading on and off.

use std::time::Duration;

use tortie_e2e::cluster::{ClusterSpec, TestCluster};
use tortie_e2e::{TopologySpec, require_root, wait_for};

#[test]
fn nat_outgoing_follows_the_pool_live() {
    require_root();
    let spec = ClusterSpec {
        topology: TopologySpec::new().segment(["a1"]).segment(["b1"]),
        pool_yaml: Some(
            "apiVersion: crd.projectcalico.org/v1\nkind: IPPool\nmetadata:\n  name: p\nspec:\n  cidr: 10.244.0.0/16\n  \
             vxlanMode: Always\n  natOutgoing: true\n"
                .to_owned(),
        ),
        ..Default::default()
    };
    let Some(c) = TestCluster::start("nat_outgoing_follows_the_pool_live", spec).unwrap() else {
        return;
    };
    c.wait_ready(Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e:#}\n{}", c.logs()));
    let pod = c.add_pod("a1", "client").unwrap();
    // The router knows nothing of 10.244.0.0/16: only a masqueraded ping can come back.
    let outside = "10.77.1.1";
    wait_for(
        "masqueraded pod reaches a host outside every pool",
        Duration::from_secs(10),
        || Ok(pod.ns.ping_once(outside, 300).then_some(())),
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", c.logs()));
    let table = c
        .topo
        .node("a1")
        .ns
        .run(&["nft", "list", "table", "inet", "tortie-nat"])
        .unwrap();
    assert!(
        table.contains("10.244.0.0/16") && table.contains("masquerade"),
        "{table}"
    );

    c.kubectl(&[
        "patch",
        "ippool",
        "p",
        "--type=merge",
        "-p",
        r#"{"spec":{"natOutgoing":false}}"#,
    ])
    .unwrap();
    wait_for(
        "natOutgoing off: the table goes and the outside host is unreachable",
        Duration::from_secs(10),
        || {
            let gone = c
                .topo
                .node("a1")
                .ns
                .exec(&["nft", "list", "table", "inet", "tortie-nat"])?
                .status
                .code()
                != Some(0);
            Ok((gone && !pod.ns.ping_once(outside, 300)).then_some(()))
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", c.logs()));
    c.del_pod(&pod).unwrap();
}
