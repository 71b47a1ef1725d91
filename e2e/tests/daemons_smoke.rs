//! The real BGP daemons start in test namespaces, peer, and exchange prefixes.

use std::time::Duration;

use tortie_e2e::daemons::{Bird, Exabgp, Frr, Gobgp};
use tortie_e2e::{TopologySpec, require_root, wait_for, wait_until};

const SESSION_TIMEOUT: Duration = Duration::from_secs(30);

fn bird_conf(
    router_id: &str,
    local_as: u32,
    peers: &[(&str, &str, u32)],
    originate: &str,
) -> String {
    let mut c = format!(
        "router id {router_id};\nprotocol device {{}}\nprotocol static s4 {{ ipv4; route {originate} blackhole; }}\n"
    );
    for (name, addr, asn) in peers {
        c.push_str(&format!(
            "protocol bgp {name} {{ local as {local_as}; neighbor {addr} as {asn}; hold time 9; \
             connect retry time 1; ipv4 {{ import all; export all; }}; }}\n"
        ));
    }
    c
}

#[test]
fn bird_and_gobgp_establish_and_exchange_prefixes() {
    require_root();
    let topo = TopologySpec::new()
        .segment(["bird", "gobgp"])
        .build()
        .unwrap();
    let (bn, gn) = (topo.node("bird"), topo.node("gobgp"));
    let bird = Bird::start(
        &bn.ns,
        &bird_conf(
            &bn.addr.to_string(),
            65001,
            &[("gobgp", &gn.addr.to_string(), 65002)],
            "10.201.0.0/24",
        ),
    )
    .unwrap();
    let gobgp_conf = format!(
        "[global.config]\n  as = 65002\n  router-id = \"{g}\"\n  local-address-list = [\"{g}\"]\n\
         [[neighbors]]\n  [neighbors.config]\n    neighbor-address = \"{b}\"\n    peer-as = 65001\n\
         [neighbors.timers.config]\n    connect-retry = 1\n",
        g = gn.addr,
        b = bn.addr
    );
    let gobgp = Gobgp::start(&gn.ns, &gobgp_conf, 50051, false).unwrap();
    wait_until("BIRD session to GoBGP established", SESSION_TIMEOUT, || {
        bird.is_established("gobgp")
    })
    .unwrap_or_else(|e| {
        panic!(
            "{e}\nbird: {}",
            bird.protocol_info("gobgp").unwrap_or_default()
        )
    });
    assert_eq!(
        gobgp.neighbor_state(&bn.addr.to_string()).unwrap(),
        "established"
    );

    gobgp
        .cli(&["global", "rib", "add", "10.202.0.0/24"])
        .unwrap();
    let seen = wait_for(
        "BIRD learns 10.202.0.0/24 from GoBGP",
        SESSION_TIMEOUT,
        || {
            let r = bird.routes(None)?;
            Ok(r.contains("10.202.0.0/24").then_some(r))
        },
    )
    .unwrap();
    assert!(
        seen.contains("BGP.as_path: 65002"),
        "BIRD's view of the route: {seen}"
    );
    wait_for(
        "GoBGP learns 10.201.0.0/24 from BIRD",
        SESSION_TIMEOUT,
        || {
            let rib = gobgp.rib(false)?;
            Ok(rib.get("10.201.0.0/24").cloned())
        },
    )
    .unwrap();
}

#[test]
fn frr_and_bird_establish_and_exchange_prefixes() {
    require_root();
    let topo = TopologySpec::new()
        .segment(["bird", "frr"])
        .build()
        .unwrap();
    let (bn, fn_) = (topo.node("bird"), topo.node("frr"));
    let bird = Bird::start(
        &bn.ns,
        &bird_conf(
            &bn.addr.to_string(),
            65001,
            &[("frr", &fn_.addr.to_string(), 65003)],
            "10.201.0.0/24",
        ),
    )
    .unwrap();
    let frr_conf = format!(
        "router bgp 65003\n bgp router-id {f}\n no bgp ebgp-requires-policy\n neighbor {b} remote-as 65001\n \
         no bgp network import-check\n neighbor {b} timers connect 1\n address-family ipv4 unicast\n  network 10.203.0.0/24\n exit-address-family\n\
",
        f = fn_.addr,
        b = bn.addr
    );
    let frr = Frr::start(&fn_.ns, &frr_conf).unwrap();
    wait_until("BIRD session to FRR established", SESSION_TIMEOUT, || {
        bird.is_established("frr")
    })
    .unwrap_or_else(|e| {
        panic!(
            "{e}\nfrr: {}",
            frr.vtysh(&["show bgp summary"]).unwrap_or_default()
        )
    });
    wait_for("FRR learns 10.201.0.0/24", SESSION_TIMEOUT, || {
        let v = frr.json("show bgp ipv4 unicast json")?;
        Ok(v.pointer("/routes/10.201.0.0~124")
            .cloned()
            .or_else(|| v["routes"].get("10.201.0.0/24").cloned()))
    })
    .unwrap();
    // `network` needs the prefix in zebra's RIB; bgpd's blackhole static comes from the config.
    wait_for(
        "BIRD learns 10.203.0.0/24 from FRR",
        SESSION_TIMEOUT,
        || Ok(bird.routes(None)?.contains("10.203.0.0/24").then_some(())),
    )
    .unwrap_or_else(|e| {
        panic!(
            "{e}\nfrr rib: {}",
            frr.vtysh(&["show bgp ipv4 unicast"]).unwrap_or_default()
        )
    });
}

#[test]
fn exabgp_announces_to_bird() {
    require_root();
    let topo = TopologySpec::new()
        .segment(["bird", "exa"])
        .build()
        .unwrap();
    let (bn, en) = (topo.node("bird"), topo.node("exa"));
    let bird = Bird::start(
        &bn.ns,
        &bird_conf(
            &bn.addr.to_string(),
            65001,
            &[("exa", &en.addr.to_string(), 65004)],
            "10.201.0.0/24",
        ),
    )
    .unwrap();
    let exa = Exabgp::start(
        &en.ns,
        &format!(
            "neighbor {b} {{\n  router-id {e};\n  local-address {e};\n  local-as 65004;\n  peer-as 65001;\n  \
             api {{ processes [ ctl ]; }}\n}}\n",
            b = bn.addr,
            e = en.addr
        ),
    )
    .unwrap();
    wait_until(
        "BIRD session to ExaBGP established",
        SESSION_TIMEOUT,
        || bird.is_established("exa"),
    )
    .unwrap_or_else(|e| panic!("{e}\nexabgp: {}", exa.log()));
    exa.send(&format!(
        "announce route 10.204.0.0/24 next-hop {}",
        en.addr
    ))
    .unwrap();
    wait_for(
        "BIRD learns 10.204.0.0/24 from ExaBGP",
        SESSION_TIMEOUT,
        || Ok(bird.routes(None)?.contains("10.204.0.0/24").then_some(())),
    )
    .unwrap_or_else(|e| panic!("{e}\nexabgp: {}", exa.log()));
}
