//! tortie agents speak BGP: the node-to-node mesh, a BIRD top-of-rack router configured by
//! BGPPeer objects, and plain routed pools (ipipMode/vxlanMode Never) across segments.

use std::time::Duration;

use tortie_e2e::cluster::{ClusterSpec, TestCluster};
use tortie_e2e::daemons::Bird;
use tortie_e2e::{TopologySpec, require_root, wait_for};

const POOL_NEVER: &str = "apiVersion: crd.projectcalico.org/v1\nkind: IPPool\nmetadata:\n  name: default-ipv4-ippool\n\
                          spec:\n  cidr: 10.244.0.0/16\n  ipipMode: Never\n  vxlanMode: Never\n  natOutgoing: false\n";

/// BIRD in the router namespace as a ToR: AS 65000, a session to every node, routes into
/// the router's kernel so it forwards pod traffic, and one prefix of its own.
fn tor_config(c: &TestCluster) -> String {
    let mut conf = String::from(
        "router id 10.77.0.1;\nprotocol device {}\n\
         protocol kernel { ipv4 { import none; export filter { if source = RTS_BGP then accept; reject; }; }; }\n\
         protocol static { ipv4; route 192.0.2.0/24 blackhole; }\n",
    );
    for n in &c.topo.nodes {
        conf.push_str(&format!(
            "protocol bgp node_{} {{ local 10.77.{}.1 as 65000; neighbor {} as 64512; hold time 9; \
             connect retry time 1; ipv4 {{ import all; export all; }}; }}\n",
            n.name, n.segment, n.addr
        ));
    }
    conf
}

fn peer_states(c: &TestCluster, node: &str) -> anyhow::Result<Vec<(String, String)>> {
    let s = c.status(node)?;
    Ok(s["peers"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            (
                p["address"].as_str().unwrap_or("").to_owned(),
                p["state"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect())
}

#[test]
fn mesh_and_bird_tor_route_blocks_and_tor_prefixes() {
    require_root();
    let spec = ClusterSpec {
        topology: TopologySpec::new().segment(["a1", "a2"]).segment(["b1"]),
        pool_yaml: Some(POOL_NEVER.to_owned()),
        ..Default::default()
    };
    let Some(c) =
        TestCluster::start("mesh_and_bird_tor_route_blocks_and_tor_prefixes", spec).unwrap()
    else {
        return;
    };
    // The full mesh: every node has an Established session to each other node.
    for n in ["a1", "a2", "b1"] {
        wait_for(
            &format!("{n}'s mesh sessions established"),
            Duration::from_secs(30),
            || {
                let st = peer_states(&c, n)?;
                Ok((st.len() == 2 && st.iter().all(|(_, s)| s == "Established")).then_some(st))
            },
        )
        .unwrap_or_else(|e| panic!("{e:#}\n{}", c.logs()));
    }
    c.wait_ready(Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e:#}\n{}", c.logs()));

    // A BIRD ToR, configured on the tortie side only through BGPPeer objects.
    let router = c.topo.router.as_ref().unwrap();
    let bird = Bird::start(&router.ns, &tor_config(&c)).unwrap();
    for seg in 0..2 {
        c.api
            .apply(&format!(
                "apiVersion: crd.projectcalico.org/v1\nkind: BGPPeer\nmetadata:\n  name: tor-seg{seg}\nspec:\n  \
                 nodeSelector: tortie.test/segment == '{seg}'\n  peerIP: 10.77.{seg}.1\n  asNumber: 65000\n"
            ))
            .unwrap();
    }
    for n in &c.topo.nodes {
        let proto = format!("node_{}", n.name);
        wait_for(
            &format!("ToR session to {} established", n.name),
            Duration::from_secs(30),
            || Ok(bird.is_established(&proto).then_some(())),
        )
        .unwrap_or_else(|e| {
            panic!(
                "{e:#}\n{}\n{}",
                bird.protocol_info(&proto).unwrap_or_default(),
                c.logs()
            )
        });
    }
    // Every node's block reaches the ToR from the node that owns it (never through another
    // node: nodes are no transit towards external peers).
    let pods: Vec<_> = c
        .topo
        .nodes
        .iter()
        .map(|n| c.add_pod(&n.name, &format!("p-{}", n.name)).unwrap())
        .collect();
    for n in &c.topo.nodes {
        let blocks = c.status(&n.name).unwrap()["blocks"].clone();
        let block = blocks[0]
            .as_str()
            .unwrap_or_else(|| panic!("{} owns no block: {blocks}", n.name))
            .to_owned();
        wait_for(
            &format!("ToR learns {block} from {}", n.name),
            Duration::from_secs(20),
            || {
                let r = bird.birdc(&["show", "route", "for", &block, "all"])?;
                let from_owner = r.contains(&format!("BGP.next_hop: {}", n.addr));
                let from_others =
                    c.topo.nodes.iter().any(|o| {
                        o.name != n.name && r.contains(&format!("BGP.next_hop: {}", o.addr))
                    });
                Ok((from_owner && !from_others).then_some(()))
            },
        )
        .unwrap_or_else(|e| panic!("{e:#}\n{}", bird.routes(None).unwrap_or_default()));
    }
    drop(pods);
    // A prefix the ToR originates is installed on every node, via the ToR on the node's segment.
    for n in &c.topo.nodes {
        let want = format!("192.0.2.0/24 via 10.77.{}.1 dev eth0", n.segment);
        wait_for(
            &format!("{} installs the ToR's prefix", n.name),
            Duration::from_secs(20),
            || {
                let t = n.ns.run(&["ip", "route", "show", "proto", "84"])?;
                Ok(t.contains(&want).then_some(()))
            },
        )
        .unwrap_or_else(|e| panic!("{e:#}\n{}", c.logs()));
    }
    // Removing the BGPPeer drops the session (live, no restart).
    c.kubectl(&["delete", "bgppeer", "tor-seg1"]).unwrap();
    wait_for("b1's ToR session removed", Duration::from_secs(20), || {
        Ok((!peer_states(&c, "b1")?.iter().any(|(a, _)| a == "10.77.1.1")).then_some(()))
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", c.logs()));
}

#[test]
fn bgp_configuration_as_number_and_mesh_switch_live() {
    require_root();
    let spec = ClusterSpec {
        topology: TopologySpec::new().segment(["a1", "a2"]),
        pool_yaml: Some(POOL_NEVER.to_owned()),
        ..Default::default()
    };
    let Some(c) =
        TestCluster::start("bgp_configuration_as_number_and_mesh_switch_live", spec).unwrap()
    else {
        return;
    };
    let established = |n: &str| -> anyhow::Result<bool> {
        let st = peer_states(&c, n)?;
        Ok(!st.is_empty() && st.iter().all(|(_, s)| s == "Established"))
    };
    wait_for("mesh up", Duration::from_secs(30), || {
        Ok(established("a1")?.then_some(()))
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", c.logs()));
    c.api
        .apply(
            "apiVersion: crd.projectcalico.org/v1\nkind: BGPConfiguration\nmetadata:\n  name: default\nspec:\n  \
             asNumber: 65100\n  nodeToNodeMeshEnabled: true\n",
        )
        .unwrap();
    wait_for(
        "both nodes speak AS 65100 and the mesh is back",
        Duration::from_secs(30),
        || {
            let s = c.status("a1")?;
            let peer_as = s["peers"][0]["as"].as_u64();
            Ok((s["as_number"] == 65100
                && peer_as == Some(65100)
                && established("a1")?
                && established("a2")?)
            .then_some(()))
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", c.logs()));
    c.kubectl(&[
        "patch",
        "bgpconfiguration",
        "default",
        "--type=merge",
        "-p",
        r#"{"spec":{"nodeToNodeMeshEnabled":false}}"#,
    ])
    .unwrap();
    wait_for(
        "mesh off: no sessions left",
        Duration::from_secs(20),
        || {
            Ok(
                (peer_states(&c, "a1")?.is_empty() && peer_states(&c, "a2")?.is_empty())
                    .then_some(()),
            )
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", c.logs()));
}
