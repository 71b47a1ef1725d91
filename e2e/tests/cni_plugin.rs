//! The tortie CNI plugin, run as a runtime runs it, against real pod namespaces on a node
//! namespace, with a stand-in agent answering its local API (see `cni_support.rs`). Tests made
//! with `FakeAgent::for_node` get an agent that removes host veths after DEL answers, as the
//! real one does; those made with `FakeAgent::start` get one from before that, so the plugin
//! removes the veth itself.

#[path = "cni_support.rs"]
mod support;

use serde_json::{Value, json};
use support::{
    AGENT_MTU, Behaviour, FakeAgent, KERNEL_WAIT, PodRef, links_named, run_plugin, sysctl, tortie,
    tortie_config,
};
use tortie_e2e::{Netns, Topology, TopologySpec, require_root, wait_until};

fn one_node() -> Topology {
    TopologySpec::new().segment(["node"]).build().unwrap()
}

fn with_prev(config: &Value, prev: &Value) -> Value {
    let mut c = config.clone();
    c["prevResult"] = prev.clone();
    c
}

#[test]
fn add_wires_the_pod_like_calico_and_reports_it() {
    require_root();
    let topo = one_node();
    let node = &topo.node("node").ns;
    let agent = FakeAgent::start(true).unwrap();
    let pod_ns = Netns::create("pod-web").unwrap();
    let pod = PodRef::new(&pod_ns, "web-0");
    let config = tortie_config(agent.run_dir(), "1.0.0");

    let run = tortie(node, "ADD", &pod, &config);
    let result = run.result().clone();
    let host_if = pod.host_if();

    // The result: host end, pod end with its sandbox, the /32 on interface 1, routes, DNS.
    assert_eq!(result["cniVersion"], "1.0.0");
    assert_eq!(
        result["interfaces"][0]["name"],
        host_if.as_str(),
        "{result}"
    );
    assert_eq!(result["interfaces"][0]["mac"], "ee:ee:ee:ee:ee:ee");
    assert_eq!(result["interfaces"][1]["name"], "eth0");
    assert_eq!(result["interfaces"][1]["sandbox"], pod.netns.as_str());
    let ip = agent.held()[&pod.container_id][0].clone();
    assert_eq!(result["ips"][0]["address"], format!("{ip}/32"));
    assert_eq!(result["ips"][0]["interface"], 1);
    assert!(
        result["ips"][0].get("version").is_none(),
        "1.0.0 has no ips[].version"
    );
    assert_eq!(result["routes"][0]["dst"], "0.0.0.0/0");
    assert_eq!(result["dns"]["nameservers"][0], "10.96.0.10");

    // Inside the pod.
    let addrs = pod_ns
        .run(&["ip", "-4", "-o", "addr", "show", "dev", "eth0"])
        .unwrap();
    assert!(
        addrs.contains(&format!("inet {ip}/32")),
        "pod eth0 addresses: {addrs}"
    );
    let routes = pod_ns.run(&["ip", "-4", "route", "show"]).unwrap();
    assert!(
        routes.contains("default via 169.254.1.1 dev eth0"),
        "pod routes: {routes}"
    );
    assert!(
        routes.contains("169.254.1.1 dev eth0 scope link"),
        "pod routes: {routes}"
    );
    let link = pod_ns.run(&["ip", "-o", "link", "show", "eth0"]).unwrap();
    assert!(
        link.contains(&format!("mtu {AGENT_MTU}")),
        "pod link: {link}"
    );
    assert!(
        link.contains("state UP") || link.contains(",UP"),
        "pod link: {link}"
    );
    assert_eq!(
        result["interfaces"][1]["mac"].as_str().unwrap(),
        link.split("link/ether ")
            .nth(1)
            .unwrap()
            .split(' ')
            .next()
            .unwrap(),
        "result MAC is the pod end's"
    );

    // On the node.
    let host = node.run(&["ip", "-o", "link", "show", &host_if]).unwrap();
    assert!(
        host.contains("link/ether ee:ee:ee:ee:ee:ee"),
        "host end: {host}"
    );
    assert!(
        host.contains(&format!("mtu {AGENT_MTU}")),
        "host end: {host}"
    );
    assert!(host.contains(",UP"), "host end is up: {host}");
    assert_eq!(
        sysctl(node, &format!("net.ipv4.conf.{host_if}.proxy_arp")).unwrap(),
        "1"
    );
    assert_eq!(
        sysctl(node, &format!("net.ipv4.conf.{host_if}.forwarding")).unwrap(),
        "1"
    );
    assert_eq!(
        sysctl(node, &format!("net.ipv6.conf.{host_if}.disable_ipv6")).unwrap(),
        "1"
    );
    let host_addrs = node
        .run(&["ip", "-o", "addr", "show", "dev", &host_if])
        .unwrap();
    assert!(
        host_addrs.trim().is_empty(),
        "host end has no address: {host_addrs}"
    );

    // The agent heard Assign (with the pod's identity) and WorkloadUp (with the host end).
    let assign = &agent.requests("assign")[0];
    assert_eq!(assign["namespace"], "default");
    assert_eq!(assign["pod"], "web-0");
    assert_eq!(assign["ipv4"], true);
    assert_eq!(assign["ipv6"], false);
    let up = &agent.requests("workload_up")[0];
    assert_eq!(up["container_id"], pod.container_id.as_str());
    assert_eq!(up["host_if"], host_if.as_str());
    assert_eq!(up["ips"], json!([ip]));

    // CHECK agrees with the kernel.
    let check = tortie(node, "CHECK", &pod, &with_prev(&config, &result));
    assert!(check.ok, "CHECK failed: {}", check.stdout);
    assert!(
        check.stdout.trim().is_empty(),
        "CHECK prints nothing: {}",
        check.stdout
    );
}

#[test]
fn old_cni_versions_get_results_in_their_shape() {
    require_root();
    let topo = one_node();
    let node = &topo.node("node").ns;
    let agent = FakeAgent::start(true).unwrap();
    for version in ["0.3.0", "0.3.1", "0.4.0"] {
        let pod_ns = Netns::create("pod-old").unwrap();
        let pod = PodRef::new(&pod_ns, &format!("old-{}", version.replace('.', "")));
        let config = tortie_config(agent.run_dir(), version);
        let run = tortie(node, "ADD", &pod, &config);
        let result = run.result();
        assert_eq!(result["cniVersion"], version);
        assert_eq!(result["ips"][0]["version"], "4", "{version}: {result}");
        let del = tortie(node, "DEL", &pod, &with_prev(&config, result));
        assert!(del.ok, "{version} DEL: {}", del.stdout);
    }
}

#[test]
fn dual_stack_pod_routes_ipv6_via_the_host_ends_link_local() {
    require_root();
    let topo = one_node();
    let node = &topo.node("node").ns;
    let agent = FakeAgent::start(true).unwrap();
    let pod_ns = Netns::create("pod-ds").unwrap();
    let pod = PodRef::new(&pod_ns, "ds-0");
    let mut config = tortie_config(agent.run_dir(), "1.0.0");
    config["assign_ipv6"] = json!(true);

    let run = tortie(node, "ADD", &pod, &config);
    let result = run.result().clone();
    let ips = agent.held()[&pod.container_id].clone();
    assert_eq!(ips.len(), 2, "{ips:?}");
    assert_eq!(result["ips"][1]["address"], format!("{}/128", ips[1]));
    assert_eq!(result["routes"][1]["gw"], "fe80::ecee:eeff:feee:eeee");

    let v6 = pod_ns.run(&["ip", "-6", "route", "show"]).unwrap();
    assert!(
        v6.contains("default via fe80::ecee:eeff:feee:eeee dev eth0"),
        "pod IPv6 routes: {v6}"
    );
    let addrs = pod_ns
        .run(&["ip", "-6", "-o", "addr", "show", "dev", "eth0"])
        .unwrap();
    assert!(addrs.contains(&format!("{}/128", ips[1])), "{addrs}");
    assert!(
        !addrs.contains("tentative"),
        "no DAD on the pod's /128: {addrs}"
    );

    let host_if = pod.host_if();
    wait_until("the host end's link-local appears", KERNEL_WAIT, || {
        node.run(&["ip", "-6", "-o", "addr", "show", "dev", &host_if])
            .map(|a| a.contains("fe80::ecee:eeff:feee:eeee/64"))
            .unwrap_or(false)
    })
    .unwrap();
    let host_global = node
        .run(&[
            "ip", "-6", "-o", "addr", "show", "dev", &host_if, "scope", "global",
        ])
        .unwrap();
    assert!(
        host_global.trim().is_empty(),
        "host end has only its link-local: {host_global}"
    );
    assert_eq!(
        sysctl(node, &format!("net.ipv6.conf.{host_if}.accept_ra")).unwrap(),
        "0"
    );
    assert_eq!(
        sysctl(node, &format!("net.ipv6.conf.{host_if}.proxy_ndp")).unwrap(),
        "1"
    );

    let check = tortie(node, "CHECK", &pod, &with_prev(&config, &result));
    assert!(check.ok, "CHECK failed: {}", check.stdout);
}

#[test]
fn two_pods_on_one_node_ping_each_other() {
    require_root();
    let topo = one_node();
    let node = &topo.node("node").ns;
    let agent = FakeAgent::start(true).unwrap();
    let ns_a = Netns::create("pod-a").unwrap();
    let ns_b = Netns::create("pod-b").unwrap();
    let a = PodRef::new(&ns_a, "a");
    let b = PodRef::new(&ns_b, "b");
    let config = tortie_config(agent.run_dir(), "1.0.0");
    tortie(node, "ADD", &a, &config).result();
    tortie(node, "ADD", &b, &config).result();

    // What the agent's dataplane does on WorkloadUp: a /32 per pod towards its host end.
    for up in agent.requests("workload_up") {
        let host_if = up["host_if"].as_str().unwrap();
        for ip in up["ips"].as_array().unwrap() {
            let dst = format!("{}/32", ip.as_str().unwrap());
            node.run(&["ip", "route", "add", &dst, "dev", host_if, "scope", "link"])
                .unwrap();
        }
    }
    let held = agent.held();
    let ip_a = held[&a.container_id][0].clone();
    let ip_b = held[&b.container_id][0].clone();
    wait_until("pod a pings pod b", KERNEL_WAIT, || {
        ns_a.ping_once(&ip_b, 500)
    })
    .unwrap();
    wait_until("pod b pings pod a", KERNEL_WAIT, || {
        ns_b.ping_once(&ip_a, 500)
    })
    .unwrap();
    // Pod to node works through the same gateway.
    let node_addr = topo.node("node").addr.to_string();
    wait_until("pod a pings its node", KERNEL_WAIT, || {
        ns_a.ping_once(&node_addr, 500)
    })
    .unwrap();
}

/// The host end and (with it) the pod end are gone within `KERNEL_WAIT`.
fn wait_veth_gone(node: &Netns, pod_ns: &Netns) {
    wait_until("the host end is removed", KERNEL_WAIT, || {
        links_named(node, "cali").unwrap().is_empty()
    })
    .unwrap();
    wait_until("the pod end is removed", KERNEL_WAIT, || {
        links_named(pod_ns, "eth0").unwrap().is_empty()
    })
    .unwrap();
}

#[test]
fn del_then_add_again_gives_a_working_pod() {
    require_root();
    let topo = one_node();
    let node = &topo.node("node").ns;
    let agent = FakeAgent::for_node(node).unwrap();
    let pod_ns = Netns::create("pod-re").unwrap();
    let pod = PodRef::new(&pod_ns, "re-0");
    let config = tortie_config(agent.run_dir(), "1.0.0");
    let first = tortie(node, "ADD", &pod, &config).result().clone();

    let del = tortie(node, "DEL", &pod, &with_prev(&config, &first));
    assert!(del.ok, "DEL failed: {}", del.stdout);
    wait_veth_gone(node, &pod_ns);
    let release = agent.requests("release");
    assert_eq!(release.len(), 1);
    assert_eq!(
        release[0]["host_if"],
        pod.host_if().as_str(),
        "DEL hands the host end to the agent"
    );
    assert!(agent.held().is_empty(), "addresses released");

    let second = tortie(node, "ADD", &pod, &config).result().clone();
    let check = tortie(node, "CHECK", &pod, &with_prev(&config, &second));
    assert!(check.ok, "CHECK after re-ADD failed: {}", check.stdout);
    assert_eq!(links_named(node, "cali").unwrap(), vec![pod.host_if()]);
}

#[test]
fn add_twice_replaces_the_first_wiring() {
    require_root();
    let topo = one_node();
    let node = &topo.node("node").ns;
    let agent = FakeAgent::start(true).unwrap();
    let pod_ns = Netns::create("pod-twice").unwrap();
    let pod = PodRef::new(&pod_ns, "twice-0");
    let config = tortie_config(agent.run_dir(), "1.0.0");
    let first = tortie(node, "ADD", &pod, &config).result().clone();
    let second = tortie(node, "ADD", &pod, &config).result().clone();
    assert_eq!(first["ips"], second["ips"], "same handle, same address");
    assert_eq!(links_named(node, "cali").unwrap().len(), 1);
}

#[test]
fn del_twice_succeeds_both_times() {
    require_root();
    let topo = one_node();
    let node = &topo.node("node").ns;
    let agent = FakeAgent::start(true).unwrap();
    let pod_ns = Netns::create("pod-del2").unwrap();
    let pod = PodRef::new(&pod_ns, "del2-0");
    let config = tortie_config(agent.run_dir(), "1.0.0");
    tortie(node, "ADD", &pod, &config).result();
    for attempt in 1..=2 {
        let del = tortie(node, "DEL", &pod, &config);
        assert!(
            del.ok,
            "DEL #{attempt} failed: {} {}",
            del.stdout, del.stderr
        );
    }
    assert_eq!(agent.requests("release").len(), 2);
}

#[test]
fn del_after_the_pod_namespace_is_gone_succeeds() {
    require_root();
    let topo = one_node();
    let node = &topo.node("node").ns;
    let agent = FakeAgent::for_node(node).unwrap();
    let pod_ns = Netns::create("pod-gone").unwrap();
    let pod = PodRef::new(&pod_ns, "gone-0");
    let config = tortie_config(agent.run_dir(), "1.0.0");
    tortie(node, "ADD", &pod, &config).result();
    drop(pod_ns);

    let del = tortie(node, "DEL", &pod, &config);
    assert!(del.ok, "DEL failed: {} {}", del.stdout, del.stderr);
    wait_until("the host end is gone", KERNEL_WAIT, || {
        links_named(node, "cali").unwrap().is_empty()
    })
    .unwrap();
    assert!(agent.held().is_empty(), "addresses released");
}

#[test]
fn del_for_an_add_that_never_happened_succeeds() {
    require_root();
    let topo = one_node();
    let node = &topo.node("node").ns;
    let agent = FakeAgent::start(true).unwrap();
    let pod_ns = Netns::create("pod-never").unwrap();
    let pod = PodRef::new(&pod_ns, "never-0");
    let del = tortie(node, "DEL", &pod, &tortie_config(agent.run_dir(), "1.0.0"));
    assert!(del.ok, "DEL failed: {}", del.stdout);
}

#[test]
fn add_with_the_agent_down_fails_cleanly_and_leaves_nothing() {
    require_root();
    let topo = one_node();
    let node = &topo.node("node").ns;
    let agent = FakeAgent::start(true).unwrap();
    let run_dir = agent.run_dir().to_owned();
    drop(agent);
    let pod_ns = Netns::create("pod-down").unwrap();
    let pod = PodRef::new(&pod_ns, "down-0");

    let run = tortie(node, "ADD", &pod, &tortie_config(&run_dir, "1.0.0"));
    let err = run.error();
    assert_eq!(err["code"], 11, "try again later: {err}");
    assert_eq!(err["cniVersion"], "1.0.0");
    let msg = err["msg"].as_str().unwrap();
    assert!(
        msg.contains("tortie.sock") && msg.contains("agent"),
        "{msg}"
    );
    assert!(
        links_named(node, "cali").unwrap().is_empty(),
        "no stray host veth"
    );
    assert!(
        links_named(&pod_ns, "eth").unwrap().is_empty(),
        "no pod interface"
    );
}

#[test]
fn add_failing_half_way_removes_the_veth_and_releases_the_address() {
    require_root();
    let topo = one_node();
    let node = &topo.node("node").ns;
    let agent = FakeAgent::start(true).unwrap();
    let pod_ns = Netns::create("pod-half").unwrap();
    // Something already holds the pod's interface name: the veth cannot be created.
    pod_ns
        .run(&[
            "ip", "link", "add", "eth0", "type", "veth", "peer", "name", "squat0",
        ])
        .unwrap();
    let pod = PodRef::new(&pod_ns, "half-0");

    let run = tortie(node, "ADD", &pod, &tortie_config(agent.run_dir(), "1.0.0"));
    let err = run.error();
    let msg = err["msg"].as_str().unwrap();
    assert!(msg.contains("veth") && msg.contains("File exists"), "{err}");
    assert!(
        links_named(node, "cali").unwrap().is_empty(),
        "no stray host veth"
    );
    assert_eq!(agent.requests("release").len(), 1, "address released");
    assert!(agent.held().is_empty());
}

#[test]
fn add_for_a_missing_namespace_is_container_unknown() {
    require_root();
    let topo = one_node();
    let node = &topo.node("node").ns;
    let agent = FakeAgent::start(true).unwrap();
    let pod_ns = Netns::create("pod-missing").unwrap();
    let mut pod = PodRef::new(&pod_ns, "missing-0");
    pod.netns = "/var/run/netns/tortie-does-not-exist".into();
    let run = tortie(node, "ADD", &pod, &tortie_config(agent.run_dir(), "1.0.0"));
    assert_eq!(run.error()["code"], 3);
    assert!(agent.requests("assign").is_empty(), "no address taken");
}

#[test]
fn malformed_config_and_bad_fields_are_clear_errors() {
    require_root();
    let topo = one_node();
    let node = &topo.node("node").ns;
    let agent = FakeAgent::start(true).unwrap();
    let pod_ns = Netns::create("pod-bad").unwrap();
    let pod = PodRef::new(&pod_ns, "bad-0");

    // Not JSON at all: run the binary by hand to send raw bytes.
    let mut child = node
        .command(support::tortie_binary())
        .env("CNI_COMMAND", "ADD")
        .env("CNI_CONTAINERID", &pod.container_id)
        .env("CNI_NETNS", &pod.netns)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/usr/lib/cni")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"{\"cniVersion\": \"1.0.0\", ")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());
    let err: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(err["code"], 6, "{err}");

    let mut config = tortie_config(agent.run_dir(), "1.0.0");
    config["mtu"] = json!("jumbo");
    let err = tortie(node, "ADD", &pod, &config).error().clone();
    assert_eq!(err["code"], 7, "{err}");
    assert!(err["msg"].as_str().unwrap().contains("\"mtu\""), "{err}");

    let mut config = tortie_config(agent.run_dir(), "1.0.0");
    config.as_object_mut().unwrap().remove("name");
    let err = tortie(node, "ADD", &pod, &config).error().clone();
    assert_eq!(err["code"], 7, "{err}");
    assert!(err["msg"].as_str().unwrap().contains("\"name\""), "{err}");

    assert!(
        agent.requests("assign").is_empty(),
        "no address taken for a bad config"
    );
    assert!(links_named(node, "cali").unwrap().is_empty());
}

#[test]
fn unsupported_cni_version_is_code_1_naming_the_supported_ones() {
    require_root();
    let topo = one_node();
    let node = &topo.node("node").ns;
    let agent = FakeAgent::start(true).unwrap();
    let pod_ns = Netns::create("pod-ver").unwrap();
    let pod = PodRef::new(&pod_ns, "ver-0");
    let run = tortie(node, "ADD", &pod, &tortie_config(agent.run_dir(), "0.2.0"));
    let err = run.error();
    assert_eq!(err["code"], 1, "{err}");
    assert!(err["msg"].as_str().unwrap().contains("0.2.0"), "{err}");
    assert!(err["details"].as_str().unwrap().contains("1.0.0"), "{err}");
    assert!(agent.requests("assign").is_empty());
}

#[test]
fn check_reports_an_address_removed_from_the_pod() {
    require_root();
    let topo = one_node();
    let node = &topo.node("node").ns;
    let agent = FakeAgent::start(true).unwrap();
    let pod_ns = Netns::create("pod-chk").unwrap();
    let pod = PodRef::new(&pod_ns, "chk-0");
    let config = tortie_config(agent.run_dir(), "1.0.0");
    let result = tortie(node, "ADD", &pod, &config).result().clone();
    let ip = agent.held()[&pod.container_id][0].clone();
    pod_ns
        .run(&["ip", "addr", "del", &format!("{ip}/32"), "dev", "eth0"])
        .unwrap();
    let run = tortie(node, "CHECK", &pod, &with_prev(&config, &result));
    let err = run.error();
    assert!(err["msg"].as_str().unwrap().contains(&ip), "{err}");
}

#[test]
fn version_and_status_answer_as_cni_1_1_says() {
    require_root();
    let topo = one_node();
    let node = &topo.node("node").ns;
    let pod_ns = Netns::create("pod-status").unwrap();
    let pod = PodRef::new(&pod_ns, "status-0");

    let version = tortie(node, "VERSION", &pod, &json!({"cniVersion": "1.0.0"}));
    let v = version.result();
    assert_eq!(v["cniVersion"], "1.0.0");
    assert!(
        v["supportedVersions"]
            .as_array()
            .unwrap()
            .contains(&json!("0.3.1")),
        "{v}"
    );

    let ready = FakeAgent::start(true).unwrap();
    let run = tortie(
        node,
        "STATUS",
        &pod,
        &tortie_config(ready.run_dir(), "1.1.0"),
    );
    assert!(run.ok, "STATUS with a ready agent: {}", run.stdout);

    let not_ready = FakeAgent::start(false).unwrap();
    let run = tortie(
        node,
        "STATUS",
        &pod,
        &tortie_config(not_ready.run_dir(), "1.1.0"),
    );
    let err = run.error();
    assert_eq!(err["code"], 50, "{err}");
    assert!(err["msg"].as_str().unwrap().contains("not ready"), "{err}");
}

#[test]
fn portmap_chained_after_tortie_accepts_its_result() {
    require_root();
    let portmap = std::path::Path::new("/usr/lib/cni/portmap");
    assert!(
        portmap.exists(),
        "Debian's containernetworking-plugins is needed (e2e/scripts/deps.sh installs it)"
    );
    let topo = one_node();
    let node = &topo.node("node").ns;
    let agent = FakeAgent::start(true).unwrap();
    let pod_ns = Netns::create("pod-pm").unwrap();
    let pod = PodRef::new(&pod_ns, "pm-0");
    let config = tortie_config(agent.run_dir(), "1.0.0");
    let result = tortie(node, "ADD", &pod, &config).result().clone();

    let portmap_config = json!({
        "cniVersion": "1.0.0",
        "name": "k8s-pod-network",
        "type": "portmap",
        "snat": true,
        "capabilities": {"portMappings": true},
        "runtimeConfig": {"portMappings": [
            {"hostPort": 30080, "containerPort": 80, "protocol": "tcp"}
        ]},
        "prevResult": result,
    });
    let run = run_plugin(node, portmap, "ADD", &pod, &portmap_config);
    let chained = run.result();
    assert_eq!(
        chained["ips"], result["ips"],
        "portmap passes tortie's result through"
    );
    let ip = agent.held()[&pod.container_id][0].clone();
    let rules = node.run(&["iptables-save", "-t", "nat"]).unwrap();
    assert!(
        rules.contains("30080") && rules.contains(&format!("{ip}:80")),
        "portmap's DNAT to the pod: {rules}"
    );

    // Not portmap's CHECK: version 1.1.1 also looks for its IPv6 DNAT chain, which its own
    // ADD does not create for an IPv4-only prevResult, whichever plugin produced it.
    let del = run_plugin(node, portmap, "DEL", &pod, &portmap_config);
    assert!(del.ok, "portmap DEL: {} {}", del.stdout, del.stderr);
    let del = tortie(node, "DEL", &pod, &with_prev(&config, &result));
    assert!(del.ok, "tortie DEL: {}", del.stdout);
}

#[test]
fn install_cni_puts_a_working_plugin_in_the_bin_dir() {
    require_root();
    let dir = std::env::temp_dir().join(format!("tortie-{}-cni-bin", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let out = std::process::Command::new(support::tortie_binary())
        .args(["install-cni", "--cni-bin-dir"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let installed = dir.join("tortie");
    let version = std::process::Command::new(&installed)
        .env("CNI_COMMAND", "VERSION")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(version.status.success());
    let v: Value = serde_json::from_slice(&version.stdout).unwrap();
    assert!(
        v["supportedVersions"]
            .as_array()
            .unwrap()
            .contains(&json!("1.0.0")),
        "{v}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn add_whose_workload_up_is_refused_undoes_the_veth_and_the_address() {
    require_root();
    let topo = one_node();
    let node = &topo.node("node").ns;
    let agent = FakeAgent::start_with(Behaviour {
        ready: true,
        refuse: Some("workload_up"),
        ..Behaviour::default()
    })
    .unwrap();
    let pod_ns = Netns::create("pod-refused").unwrap();
    let pod = PodRef::new(&pod_ns, "refused-0");
    let run = tortie(node, "ADD", &pod, &tortie_config(agent.run_dir(), "1.0.0"));
    let err = run.error();
    assert_eq!(err["code"], 100, "{err}");
    assert!(
        err["msg"].as_str().unwrap().contains("workload_up refused"),
        "{err}"
    );
    assert!(
        links_named(node, "cali").unwrap().is_empty(),
        "host end removed"
    );
    assert!(
        links_named(&pod_ns, "eth0").unwrap().is_empty(),
        "pod end removed"
    );
    assert!(agent.held().is_empty(), "address released");
}

#[test]
fn del_after_the_agent_restarted_succeeds() {
    require_root();
    let topo = one_node();
    let node = &topo.node("node").ns;
    let agent = FakeAgent::start(true).unwrap();
    let run_dir = agent.run_dir().to_owned();
    let pod_ns = Netns::create("pod-restart").unwrap();
    let pod = PodRef::new(&pod_ns, "restart-0");
    let config = tortie_config(&run_dir, "1.0.0");
    tortie(node, "ADD", &pod, &config).result();
    drop(agent);

    // A new agent on the same socket that never heard of the pod.
    let restarted = FakeAgent::start_with(Behaviour {
        ready: true,
        run_dir: Some(run_dir),
        ..Behaviour::default()
    })
    .unwrap();
    let del = tortie(node, "DEL", &pod, &config);
    assert!(del.ok, "DEL failed: {} {}", del.stdout, del.stderr);
    assert!(links_named(node, "cali").unwrap().is_empty());
    assert_eq!(restarted.requests("release").len(), 1);
}

#[test]
fn dual_stack_pods_ping_each_other_over_ipv6() {
    require_root();
    let topo = one_node();
    let node = &topo.node("node").ns;
    let agent = FakeAgent::start(true).unwrap();
    let ns_a = Netns::create("pod-6a").unwrap();
    let ns_b = Netns::create("pod-6b").unwrap();
    let a = PodRef::new(&ns_a, "six-a");
    let b = PodRef::new(&ns_b, "six-b");
    let mut config = tortie_config(agent.run_dir(), "1.0.0");
    config["assign_ipv6"] = json!(true);
    tortie(node, "ADD", &a, &config).result();
    tortie(node, "ADD", &b, &config).result();
    for up in agent.requests("workload_up") {
        let host_if = up["host_if"].as_str().unwrap();
        for ip in up["ips"].as_array().unwrap() {
            let ip = ip.as_str().unwrap();
            let (family, dst) = if ip.contains(':') {
                ("-6", format!("{ip}/128"))
            } else {
                ("-4", format!("{ip}/32"))
            };
            node.run(&["ip", family, "route", "add", &dst, "dev", host_if])
                .unwrap();
        }
    }
    let held = agent.held();
    let (a6, b6) = (
        held[&a.container_id][1].clone(),
        held[&b.container_id][1].clone(),
    );
    wait_until("pod a pings pod b over IPv6", KERNEL_WAIT, || {
        ns_a.ping_once(&b6, 500)
    })
    .unwrap();
    wait_until("pod b pings pod a over IPv6", KERNEL_WAIT, || {
        ns_b.ping_once(&a6, 500)
    })
    .unwrap();
}

#[test]
fn del_then_immediate_add_of_the_same_pod_name_keeps_the_new_veth() {
    require_root();
    let topo = one_node();
    let node = &topo.node("node").ns;
    let agent = FakeAgent::for_node(node).unwrap();
    let config = tortie_config(agent.run_dir(), "1.0.0");
    let host_if = PodRef::in_netns_named("unused", "same-0").host_if();
    // Several rounds, each a new sandbox (new container, new namespace) of the same pod; the
    // old namespaces stay, as a runtime's may, so only the DEL removes their veths.
    let mut sandboxes: Vec<(Netns, PodRef, Value)> = Vec::new();
    for round in 0..5 {
        let ns = Netns::create("pod-same").unwrap();
        let pod = PodRef::new(&ns, "same-0");
        assert_eq!(pod.host_if(), host_if, "one pod name, one host veth name");
        if let Some((_, old_pod, old_result)) = sandboxes.last() {
            let del = tortie(node, "DEL", old_pod, &with_prev(&config, old_result));
            assert!(del.ok, "round {round} DEL: {} {}", del.stdout, del.stderr);
        }
        let result = tortie(node, "ADD", &pod, &config).result().clone();
        sandboxes.push((ns, pod, result));
    }
    agent.drain_removals(KERNEL_WAIT).unwrap();

    // The last sandbox's veth survived every earlier removal and is wired correctly; the
    // earlier sandboxes lost theirs.
    for (ns, _, _) in &sandboxes[..sandboxes.len() - 1] {
        assert!(links_named(ns, "eth0").unwrap().is_empty(), "{}", ns.name());
    }
    let (_, pod, result) = sandboxes.last().unwrap();
    assert_eq!(links_named(node, "cali").unwrap(), vec![host_if.clone()]);
    let check = tortie(node, "CHECK", pod, &with_prev(&config, result));
    assert!(
        check.ok,
        "CHECK of the newest sandbox: {} {}",
        check.stdout, check.stderr
    );
    let releases = agent.requests("release");
    assert_eq!(releases.len(), 4);
    assert!(releases.iter().all(|r| r["host_if"] == host_if.as_str()));
    assert_eq!(
        agent.held().len(),
        1,
        "only the newest sandbox holds an address"
    );
}

#[test]
fn del_with_an_agent_that_does_not_take_the_veth_removes_it_itself() {
    require_root();
    let topo = one_node();
    let node = &topo.node("node").ns;
    // An agent from before `host_if`: it ignores the field and never claims the veth.
    let agent = FakeAgent::start(true).unwrap();
    let pod_ns = Netns::create("pod-oldagent").unwrap();
    let pod = PodRef::new(&pod_ns, "oldagent-0");
    let config = tortie_config(agent.run_dir(), "1.0.0");
    tortie(node, "ADD", &pod, &config).result();
    let del = tortie(node, "DEL", &pod, &config);
    assert!(del.ok, "DEL failed: {} {}", del.stdout, del.stderr);
    assert!(
        links_named(node, "cali").unwrap().is_empty(),
        "the plugin removed the host end before exiting"
    );
    assert!(agent.held().is_empty());
}

#[test]
fn del_with_the_agent_down_removes_the_veth_and_asks_to_retry() {
    require_root();
    let topo = one_node();
    let node = &topo.node("node").ns;
    let agent = FakeAgent::for_node(node).unwrap();
    let run_dir = agent.run_dir().to_owned();
    let pod_ns = Netns::create("pod-deldown").unwrap();
    let pod = PodRef::new(&pod_ns, "deldown-0");
    let config = tortie_config(&run_dir, "1.0.0");
    tortie(node, "ADD", &pod, &config).result();
    drop(agent);

    let del = tortie(node, "DEL", &pod, &config);
    let err = del.error();
    assert_eq!(err["code"], 11, "try again later: {err}");
    assert!(
        links_named(node, "cali").unwrap().is_empty(),
        "the plugin removed the host end itself"
    );
}
