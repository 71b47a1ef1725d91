//! Smoke tests of the real kube-apiserver test bed: Calico CRDs, watches and RBAC.

use std::time::{Duration, Instant};

use serde_json::Value;
use tortie_e2e::apiserver::{ApiServerOptions, TestApiServer};

const IPPOOL_CRD: &str = r#"{
  "apiVersion": "apiextensions.k8s.io/v1",
  "kind": "CustomResourceDefinition",
  "metadata": {"name": "ippools.crd.projectcalico.org"},
  "spec": {
    "group": "crd.projectcalico.org",
    "names": {"kind": "IPPool", "listKind": "IPPoolList", "plural": "ippools", "singular": "ippool"},
    "scope": "Cluster",
    "versions": [{
      "name": "v1",
      "served": true,
      "storage": true,
      "schema": {"openAPIV3Schema": {
        "type": "object",
        "properties": {
          "apiVersion": {"type": "string"},
          "kind": {"type": "string"},
          "metadata": {"type": "object"},
          "spec": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}
        }
      }}
    }]
  }
}"#;

fn start(test_name: &str) -> Option<TestApiServer> {
    let server = TestApiServer::start_or_skip(test_name, ApiServerOptions::default())
        .unwrap_or_else(|error| panic!("starting the test apiserver: {error:#}"))?;
    eprintln!(
        "{test_name}: apiserver {} ready in {} ms (dir {})",
        server.server_url(),
        server.time_to_ready().as_millis(),
        server.data_dir().display()
    );
    Some(server)
}

fn install_ippool_crd(server: &TestApiServer) {
    server.apply(IPPOOL_CRD).expect("create IPPool CRD");
    server
        .kubectl_ok([
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd/ippools.crd.projectcalico.org",
        ])
        .expect("IPPool CRD becomes Established");
}

fn ippool(name: &str, cidr: &str) -> String {
    serde_json::json!({
        "apiVersion": "crd.projectcalico.org/v1",
        "kind": "IPPool",
        "metadata": {"name": name},
        "spec": {"cidr": cidr, "ipipMode": "Never", "natOutgoing": true, "blockSize": 26},
    })
    .to_string()
}

#[test]
fn calico_ippool_crd_object_is_created_watched_patched_and_deleted() {
    let Some(server) = start("calico_ippool_crd_object_is_created_watched_patched_and_deleted")
    else {
        return;
    };
    install_ippool_crd(&server);
    server
        .apply(&ippool("pool-a", "10.244.0.0/16"))
        .expect("create IPPool pool-a");

    let stored: Value = serde_json::from_str(
        &server
            .kubectl_ok([
                "get",
                "ippools.crd.projectcalico.org",
                "pool-a",
                "-o",
                "json",
            ])
            .expect("get pool-a"),
    )
    .expect("pool-a JSON");
    assert_eq!(stored["spec"]["cidr"], "10.244.0.0/16");
    assert_eq!(
        stored["spec"]["blockSize"], 26,
        "unknown fields are preserved"
    );

    let watch = server
        .watch(["ippools.crd.projectcalico.org", "pool-a"])
        .expect("start watch");
    let deadline = Instant::now() + Duration::from_secs(30);
    // The watch opens with the current state; only then is the patch guaranteed to be seen.
    let initial = watch.next_event(deadline).expect("initial watch event");
    assert_eq!(initial["type"], "ADDED", "first event: {initial}");
    assert_eq!(initial["object"]["spec"]["natOutgoing"], true);

    server
        .kubectl_ok([
            "patch",
            "ippools.crd.projectcalico.org",
            "pool-a",
            "--type=merge",
            "-p",
            r#"{"spec":{"natOutgoing":false,"disabled":true}}"#,
        ])
        .expect("patch pool-a");
    let modified = watch
        .wait_for(deadline, |event| event["type"] == "MODIFIED")
        .expect("watch sees the patch");
    assert_eq!(modified["object"]["metadata"]["name"], "pool-a");
    assert_eq!(modified["object"]["spec"]["natOutgoing"], false);
    assert_eq!(modified["object"]["spec"]["disabled"], true);
    assert_eq!(modified["object"]["spec"]["cidr"], "10.244.0.0/16");

    server
        .kubectl_ok(["delete", "ippools.crd.projectcalico.org", "pool-a"])
        .expect("delete pool-a");
    let deleted = watch
        .wait_for(deadline, |event| event["type"] == "DELETED")
        .expect("watch sees the delete");
    assert_eq!(deleted["object"]["metadata"]["name"], "pool-a");
    let after = server
        .kubectl(["get", "ippools.crd.projectcalico.org", "pool-a"])
        .expect("run kubectl get");
    assert!(!after.status.success(), "pool-a still exists after delete");
    assert!(
        String::from_utf8_lossy(&after.stderr).contains("NotFound"),
        "expected NotFound, got: {}",
        String::from_utf8_lossy(&after.stderr)
    );
}

#[test]
fn service_account_is_forbidden_until_rbac_grants_ippool_access() {
    let Some(server) = start("service_account_is_forbidden_until_rbac_grants_ippool_access") else {
        return;
    };
    install_ippool_crd(&server);
    server
        .apply(&ippool("pool-rbac", "10.245.0.0/16"))
        .expect("create IPPool pool-rbac");
    let kubeconfig = server
        .mint_service_account_kubeconfig("tortie-system", "tortie")
        .expect("mint ServiceAccount kubeconfig");

    let whoami = server
        .kubectl_as(&kubeconfig, ["auth", "whoami", "-o", "json"])
        .expect("run kubectl auth whoami");
    assert!(
        whoami.status.success(),
        "token authenticates: {}",
        String::from_utf8_lossy(&whoami.stderr)
    );
    let review: Value = serde_json::from_slice(&whoami.stdout).expect("SelfSubjectReview JSON");
    assert_eq!(
        review["status"]["userInfo"]["username"],
        "system:serviceaccount:tortie-system:tortie"
    );

    let denied = server
        .kubectl_as(&kubeconfig, ["get", "ippools.crd.projectcalico.org"])
        .expect("run kubectl get as the ServiceAccount");
    let denied_stderr = String::from_utf8_lossy(&denied.stderr);
    assert!(
        !denied.status.success(),
        "listing ippools without RBAC must fail"
    );
    assert!(
        denied_stderr.contains("Forbidden") || denied_stderr.contains("forbidden"),
        "expected Forbidden, got: {denied_stderr}"
    );

    server
        .apply(
            &serde_json::json!({
                "apiVersion": "v1",
                "kind": "List",
                "items": [
                    {
                        "apiVersion": "rbac.authorization.k8s.io/v1",
                        "kind": "ClusterRole",
                        "metadata": {"name": "tortie-ippool-reader"},
                        "rules": [{
                            "apiGroups": ["crd.projectcalico.org"],
                            "resources": ["ippools"],
                            "verbs": ["get", "list", "watch"],
                        }],
                    },
                    {
                        "apiVersion": "rbac.authorization.k8s.io/v1",
                        "kind": "ClusterRoleBinding",
                        "metadata": {"name": "tortie-ippool-reader"},
                        "roleRef": {
                            "apiGroup": "rbac.authorization.k8s.io",
                            "kind": "ClusterRole",
                            "name": "tortie-ippool-reader",
                        },
                        "subjects": [{
                            "kind": "ServiceAccount",
                            "name": "tortie",
                            "namespace": "tortie-system",
                        }],
                    },
                ],
            })
            .to_string(),
        )
        .expect("grant ippool read access");

    // The RBAC authorizer's informer picks the binding up asynchronously: poll with a deadline.
    let deadline = Instant::now() + Duration::from_secs(30);
    let listed = loop {
        let output = server
            .kubectl_as(
                &kubeconfig,
                ["get", "ippools.crd.projectcalico.org", "-o", "json"],
            )
            .expect("run kubectl get as the ServiceAccount");
        if output.status.success() {
            break output;
        }
        assert!(
            Instant::now() < deadline,
            "still denied after the ClusterRoleBinding: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let list: Value = serde_json::from_slice(&listed.stdout).expect("IPPoolList JSON");
    let names: Vec<&str> = list["items"]
        .as_array()
        .expect("items array")
        .iter()
        .filter_map(|item| item["metadata"]["name"].as_str())
        .collect();
    assert_eq!(names, ["pool-rbac"]);

    // The grant is read-only: writing stays forbidden.
    let write = server
        .kubectl_as(
            &kubeconfig,
            ["delete", "ippools.crd.projectcalico.org", "pool-rbac"],
        )
        .expect("run kubectl delete as the ServiceAccount");
    assert!(
        !write.status.success(),
        "read-only grant must not allow delete"
    );
    assert!(
        String::from_utf8_lossy(&write.stderr).contains("forbidden"),
        "expected forbidden, got: {}",
        String::from_utf8_lossy(&write.stderr)
    );
}

#[test]
fn node_namespace_reaches_apiserver_running_in_another_namespace() {
    if tortie_e2e::apiserver::missing_kube_binaries().is_empty() {
        tortie_e2e::require_root();
    }
    // Declared before the server so they are deleted after it has stopped.
    let control_plane = tortie_e2e::Netns::create("apisrv").expect("create control-plane netns");
    let node = tortie_e2e::Netns::create("apinode").expect("create node netns");
    let control_end = format!("tac{}", std::process::id() % 100_000);
    let node_end = format!("tan{}", std::process::id() % 100_000);
    tortie_e2e::netns::run_host(&[
        "ip",
        "link",
        "add",
        &control_end,
        "netns",
        control_plane.name(),
        "type",
        "veth",
        "peer",
        "name",
        &node_end,
        "netns",
        node.name(),
    ])
    .expect("veth between the namespaces");
    control_plane
        .sh(&format!(
            "ip addr add 10.250.0.1/30 dev {control_end} && ip link set {control_end} up"
        ))
        .expect("address control-plane end");
    node.sh(&format!(
        "ip addr add 10.250.0.2/30 dev {node_end} && ip link set {node_end} up"
    ))
    .expect("address node end");

    let options = ApiServerOptions {
        bind_address: "10.250.0.1".parse().expect("address"),
        netns: Some(control_plane.name().to_owned()),
        ..ApiServerOptions::default()
    };
    let Some(server) = TestApiServer::start_or_skip(
        "node_namespace_reaches_apiserver_running_in_another_namespace",
        options,
    )
    .unwrap_or_else(|error| panic!("starting the test apiserver: {error:#}")) else {
        return;
    };
    assert_eq!(
        server.server_url(),
        format!("https://10.250.0.1:{}", port_of(&server))
    );
    let kubeconfig = server
        .mint_service_account_kubeconfig("tortie-system", "tortie-node")
        .expect("mint ServiceAccount kubeconfig");

    // kubectl from the node namespace, over the veth, verifying the serving cert's IP SAN.
    let output = node
        .command(server.bin_dir().join("kubectl"))
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .args([
            "auth",
            "whoami",
            "-o",
            "jsonpath={.status.userInfo.username}",
        ])
        .output()
        .expect("run kubectl in the node namespace");
    assert!(
        output.status.success(),
        "kubectl from the node namespace failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        "system:serviceaccount:tortie-system:tortie-node"
    );
}

fn port_of(server: &TestApiServer) -> u16 {
    server
        .server_url()
        .rsplit(':')
        .next()
        .and_then(|port| port.parse().ok())
        .expect("port in server URL")
}
