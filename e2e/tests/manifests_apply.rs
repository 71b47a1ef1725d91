//! `manifests/` against a real kube-apiserver: it installs in one apply, Calico-shaped objects come back unchanged through tortie's CRDs and through Calico v3.26's, and the agent's ServiceAccount can do what the agent needs and nothing it must not.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Instant;

use serde_json::{Value, json};
use tortie_e2e::apiserver::{ApiServerOptions, TestApiServer};

/// Plurals of the seven `crd.projectcalico.org` kinds tortie uses.
const CALICO_PLURALS: [&str; 7] = [
    "ippools",
    "ipamblocks",
    "blockaffinities",
    "ipamhandles",
    "ipamconfigs",
    "bgpconfigurations",
    "bgppeers",
];

const AGENT_NAMESPACE: &str = "kube-system";
const AGENT_SERVICE_ACCOUNT: &str = "tortie-node";
const LEADER_LEASE: &str = "tortie-ipam-gc";
const BGP_PASSWORD_SECRET: &str = "bgp-passwords";

fn repo_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(relative)
}

fn fixture_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(relative)
}

fn path_arg(path: &Path) -> String {
    path.to_str()
        .unwrap_or_else(|| panic!("non-UTF-8 path {}", path.display()))
        .to_owned()
}

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

fn stdout_of(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr_of(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Runs kubectl as admin and panics with its stderr unless it succeeds.
fn admin_ok(server: &TestApiServer, args: &[&str]) -> String {
    server
        .kubectl_ok(args)
        .unwrap_or_else(|error| panic!("kubectl {}: {error:#}", args.join(" ")))
}

/// Runs kubectl with `kubeconfig` and panics with its stderr unless it succeeds.
fn as_ok(server: &TestApiServer, kubeconfig: &Path, what: &str, args: &[&str]) -> String {
    let output = server
        .kubectl_as(kubeconfig, args)
        .unwrap_or_else(|error| panic!("running kubectl for {what}: {error:#}"));
    assert!(
        output.status.success(),
        "the agent's ServiceAccount must be able to {what}, but `kubectl {}` failed: {}",
        args.join(" "),
        stderr_of(&output)
    );
    stdout_of(&output)
}

/// Runs kubectl with `kubeconfig` and panics unless the API server refuses it as Forbidden.
fn as_forbidden(server: &TestApiServer, kubeconfig: &Path, what: &str, args: &[&str]) {
    let output = server
        .kubectl_as(kubeconfig, args)
        .unwrap_or_else(|error| panic!("running kubectl for {what}: {error:#}"));
    let stderr = stderr_of(&output);
    assert!(
        !output.status.success() && stderr.to_lowercase().contains("forbidden"),
        "the agent's ServiceAccount must not be able to {what}, but `kubectl {}` gave status {:?}, \
         stdout {:?}, stderr {stderr:?}",
        args.join(" "),
        output.status,
        stdout_of(&output)
    );
}

/// Every JSON value kubectl printed (it prints one document per object, or a List), with Lists
/// flattened into their items.
fn json_objects(text: &str) -> Vec<Value> {
    let mut objects = Vec::new();
    for document in serde_json::Deserializer::from_str(text).into_iter::<Value>() {
        let document = document.unwrap_or_else(|error| panic!("kubectl printed bad JSON: {error}"));
        match document["items"].as_array() {
            Some(items) if document["kind"] == "List" => objects.extend(items.iter().cloned()),
            _ => objects.push(document),
        }
    }
    objects
}

fn kind_and_name(object: &Value) -> (String, String) {
    (
        object["kind"].as_str().unwrap_or_default().to_owned(),
        object["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
    )
}

/// The objects in `files` exactly as kubectl sends them (rendered client-side, nothing stored).
fn objects_as_sent(server: &TestApiServer, files: &[PathBuf]) -> BTreeMap<(String, String), Value> {
    let mut sent = BTreeMap::new();
    for file in files {
        let file = path_arg(file);
        let rendered = admin_ok(
            server,
            &["create", "--dry-run=client", "-o", "json", "-f", &file],
        );
        for object in json_objects(&rendered) {
            sent.insert(kind_and_name(&object), object);
        }
    }
    sent
}

fn wait_for_calico_crds_established(server: &TestApiServer) {
    let mut args = vec![
        "wait".to_owned(),
        "--for=condition=Established".to_owned(),
        "--timeout=60s".to_owned(),
    ];
    args.extend(
        CALICO_PLURALS
            .iter()
            .map(|plural| format!("crd/{plural}.crd.projectcalico.org")),
    );
    server
        .kubectl_ok(&args)
        .unwrap_or_else(|error| panic!("the seven Calico CRDs become Established: {error:#}"));
}

/// The Calico-shaped fixture objects plus the example pool from `manifests/examples/`.
fn calico_object_files() -> Vec<PathBuf> {
    let objects_dir = fixture_path("objects");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&objects_dir)
        .unwrap_or_else(|error| panic!("reading {}: {error}", objects_dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "yaml"))
        .collect();
    files.sort();
    files.push(repo_path("manifests/examples/default-ipv4-ippool.yaml"));
    files
}

/// Applies every Calico-shaped object, reads each back and asserts its spec is exactly what was
/// sent: no field pruned, renamed or defaulted, odd values kept as written.
fn assert_calico_objects_round_trip_unchanged(server: &TestApiServer, crd_set: &str) {
    let files = calico_object_files();
    let sent = objects_as_sent(server, &files);
    let kinds: Vec<&str> = sent.keys().map(|(kind, _)| kind.as_str()).collect();
    for kind in [
        "IPPool",
        "IPAMBlock",
        "BlockAffinity",
        "IPAMHandle",
        "IPAMConfig",
        "BGPConfiguration",
        "BGPPeer",
    ] {
        assert!(
            kinds.contains(&kind),
            "the fixtures lack a {kind} object: {kinds:?}"
        );
    }

    let mut apply_args = vec!["apply".to_owned()];
    let mut get_args = vec!["get".to_owned(), "-o".to_owned(), "json".to_owned()];
    for file in &files {
        for args in [&mut apply_args, &mut get_args] {
            args.push("-f".to_owned());
            args.push(path_arg(file));
        }
    }
    server.kubectl_ok(&apply_args).unwrap_or_else(|error| {
        panic!("{crd_set}: the API server must accept every Calico-shaped object: {error:#}")
    });
    let stored: BTreeMap<(String, String), Value> = json_objects(&admin_ok(
        server,
        &get_args.iter().map(String::as_str).collect::<Vec<_>>(),
    ))
    .into_iter()
    .map(|object| (kind_and_name(&object), object))
    .collect();

    for (key, sent_object) in &sent {
        let stored_object = stored
            .get(key)
            .unwrap_or_else(|| panic!("{crd_set}: {key:?} was not stored"));
        assert_eq!(
            stored_object["spec"],
            sent_object["spec"],
            "{crd_set}: {} {} came back changed.\nsent:   {}\nstored: {}",
            key.0,
            key.1,
            serde_json::to_string_pretty(&sent_object["spec"]).unwrap_or_default(),
            serde_json::to_string_pretty(&stored_object["spec"]).unwrap_or_default()
        );
    }

    // The values the agent must be able to see and report, spelled out.
    let odd_pool = &stored[&("IPPool".to_owned(), "odd-pool".to_owned())]["spec"];
    assert_eq!(odd_pool["ipipMode"], "Sometimes", "{crd_set}: {odd_pool}");
    assert_eq!(odd_pool["blockSize"], 40, "{crd_set}: {odd_pool}");
    let block = &stored[&("IPAMBlock".to_owned(), "10-244-1-0-26".to_owned())]["spec"];
    assert_eq!(block["allocations"][2], Value::Null, "{crd_set}: {block}");
    assert_eq!(block["allocations"][5], 2, "{crd_set}: {block}");
    assert_eq!(
        block["attributes"][0]["handle_id"], "vxlan-tunnel-addr-node-1",
        "{crd_set}: {block}"
    );
    let affinity = &stored[&(
        "BlockAffinity".to_owned(),
        "node-1-10-244-1-0-26".to_owned(),
    )]["spec"];
    assert_eq!(affinity["deleted"], "false", "{crd_set}: {affinity}");
}

/// A BlockAffinity without its required `deleted` field is refused: the schema's required fields
/// are enforced, as Calico's are.
fn assert_required_fields_are_enforced(server: &TestApiServer, crd_set: &str) {
    let incomplete = json!({
        "apiVersion": "crd.projectcalico.org/v1",
        "kind": "BlockAffinity",
        "metadata": {"name": "node-2-10-244-2-0-26"},
        "spec": {"cidr": "10.244.2.0/26", "node": "node-2", "state": "pending"},
    });
    let error = server
        .apply(&incomplete.to_string())
        .expect_err("a BlockAffinity without spec.deleted must be refused");
    assert!(
        format!("{error:#}").contains("spec.deleted"),
        "{crd_set}: the refusal should name spec.deleted: {error:#}"
    );
}

fn write_in_data_dir(server: &TestApiServer, name: &str, object: &Value) -> String {
    let path = server.data_dir().join(name);
    std::fs::write(&path, object.to_string())
        .unwrap_or_else(|error| panic!("writing {}: {error}", path.display()));
    path_arg(&path)
}

#[test]
fn kubectl_apply_of_the_manifests_directory_installs_everything_at_the_first_try() {
    let test_name = "kubectl_apply_of_the_manifests_directory_installs_everything_at_the_first_try";
    let Some(server) = start(test_name) else {
        return;
    };
    let started = Instant::now();
    let manifests = path_arg(&repo_path("manifests"));

    let first = server
        .kubectl(["apply", "-f", &manifests])
        .expect("run kubectl apply");
    assert!(
        first.status.success(),
        "kubectl apply -f manifests/ failed on a fresh cluster: {}",
        stderr_of(&first)
    );
    let created: Vec<String> = stdout_of(&first)
        .lines()
        .filter_map(|line| line.strip_suffix(" created").map(str::to_owned))
        .collect();
    let mut expected: Vec<String> = CALICO_PLURALS
        .iter()
        .map(|plural| {
            format!("customresourcedefinition.apiextensions.k8s.io/{plural}.crd.projectcalico.org")
        })
        .collect();
    expected.extend(
        [
            "daemonset.apps/tortie-node",
            "serviceaccount/tortie-node",
            "clusterrole.rbac.authorization.k8s.io/tortie-node",
            "clusterrolebinding.rbac.authorization.k8s.io/tortie-node",
            "role.rbac.authorization.k8s.io/tortie-node",
            "rolebinding.rbac.authorization.k8s.io/tortie-node",
        ]
        .map(str::to_owned),
    );
    let (mut created_sorted, mut expected_sorted) = (created.clone(), expected.clone());
    created_sorted.sort();
    expected_sorted.sort();
    assert_eq!(
        created_sorted, expected_sorted,
        "objects created by kubectl apply -f manifests/"
    );
    wait_for_calico_crds_established(&server);

    let second = admin_ok(&server, &["apply", "-f", &manifests]);
    let changed: Vec<&str> = second
        .lines()
        .filter(|line| !line.ends_with(" unchanged"))
        .collect();
    assert!(
        changed.is_empty(),
        "re-applying manifests/ must change nothing, but: {changed:?}"
    );

    // The README's sequence for the example pool.
    admin_ok(
        &server,
        &[
            "apply",
            "-f",
            &path_arg(&repo_path("manifests/examples/default-ipv4-ippool.yaml")),
        ],
    );
    let pool: Value = serde_json::from_str(&admin_ok(
        &server,
        &[
            "get",
            "ippools.crd.projectcalico.org",
            "default-ipv4-ippool",
            "-o",
            "json",
        ],
    ))
    .expect("IPPool JSON");
    assert_eq!(pool["spec"]["cidr"], "10.244.0.0/16", "{pool}");

    // The DaemonSet as the API server stored it keeps the contract the agent and kubelet rely on.
    let daemonset: Value = serde_json::from_str(&admin_ok(
        &server,
        &[
            "get",
            "daemonset",
            "tortie-node",
            "-n",
            AGENT_NAMESPACE,
            "-o",
            "json",
        ],
    ))
    .expect("DaemonSet JSON");
    let pod_spec = &daemonset["spec"]["template"]["spec"];
    assert_eq!(pod_spec["serviceAccountName"], AGENT_SERVICE_ACCOUNT);
    assert_eq!(pod_spec["hostNetwork"], true);
    assert_eq!(pod_spec["priorityClassName"], "system-node-critical");
    assert_eq!(
        pod_spec["tolerations"],
        json!([{"operator": "Exists"}]),
        "tolerates every taint"
    );
    assert_eq!(
        pod_spec["initContainers"][0]["command"],
        json!(["/usr/local/bin/tortie", "install-cni"])
    );
    let agent = &pod_spec["containers"][0];
    assert_eq!(agent["command"], json!(["/usr/local/bin/tortie", "agent"]));
    assert_eq!(
        agent["lifecycle"]["preStop"]["exec"]["command"],
        json!(["/usr/local/bin/tortie", "shutdown"])
    );
    for (probe, path) in [
        ("livenessProbe", "/liveness"),
        ("readinessProbe", "/readiness"),
    ] {
        assert_eq!(agent[probe]["httpGet"]["path"], path, "{probe}: {agent}");
        assert_eq!(agent[probe]["httpGet"]["port"], 9099, "{probe}: {agent}");
    }
    let container_ports: Vec<&Value> = agent["ports"]
        .as_array()
        .map(|ports| ports.iter().map(|port| &port["containerPort"]).collect())
        .unwrap_or_default();
    assert!(
        container_ports.contains(&&json!(9091)),
        "metrics port: {container_ports:?}"
    );
    let env_names: Vec<&str> = agent["env"]
        .as_array()
        .map(|env| env.iter().filter_map(|var| var["name"].as_str()).collect())
        .unwrap_or_default();
    for name in [
        "NODENAME",
        "IP",
        "IP_AUTODETECTION_METHOD",
        "CALICO_IPV4POOL_CIDR",
        "CALICO_IPV4POOL_IPIP",
        "CALICO_IPV4POOL_VXLAN",
    ] {
        assert!(
            env_names.contains(&name),
            "env {name} missing: {env_names:?}"
        );
    }
    let nodename = agent["env"]
        .as_array()
        .and_then(|env| env.iter().find(|var| var["name"] == "NODENAME"))
        .expect("NODENAME");
    assert_eq!(
        nodename["valueFrom"]["fieldRef"]["fieldPath"],
        "spec.nodeName"
    );
    let netns_mount = agent["volumeMounts"]
        .as_array()
        .and_then(|mounts| mounts.iter().find(|m| m["mountPath"] == "/var/run/netns"))
        .expect("/var/run/netns mount");
    assert_eq!(netns_mount["mountPropagation"], "HostToContainer");

    // The bindings name the ServiceAccount the DaemonSet runs as.
    for binding in [
        vec!["get", "clusterrolebinding", "tortie-node", "-o", "json"],
        vec![
            "get",
            "rolebinding",
            "tortie-node",
            "-n",
            AGENT_NAMESPACE,
            "-o",
            "json",
        ],
    ] {
        let binding: Value =
            serde_json::from_str(&admin_ok(&server, &binding)).expect("binding JSON");
        assert_eq!(
            binding["subjects"],
            json!([{"kind": "ServiceAccount", "name": AGENT_SERVICE_ACCOUNT,
                    "namespace": AGENT_NAMESPACE}]),
            "{binding}"
        );
    }

    // The pod template passes Pod admission (ServiceAccount, priority class resolution) as the
    // DaemonSet controller's pods would; nothing runs it, as no kubelet exists.
    let mut bound_pod_spec = pod_spec.clone();
    bound_pod_spec["nodeName"] = json!("node-1");
    let pod = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "tortie-node-admission-check",
            "namespace": AGENT_NAMESPACE,
            "labels": daemonset["spec"]["template"]["metadata"]["labels"],
        },
        "spec": bound_pod_spec,
    });
    let pod_file = write_in_data_dir(&server, "tortie-node-pod.json", &pod);
    let created_pod: Value = serde_json::from_str(&admin_ok(
        &server,
        &["create", "-f", &pod_file, "-o", "json"],
    ))
    .expect("Pod JSON");
    assert_eq!(
        created_pod["spec"]["priority"], 2_000_001_000,
        "system-node-critical resolves to its priority: {}",
        created_pod["spec"]
    );
    assert_eq!(
        created_pod["spec"]["serviceAccountName"],
        AGENT_SERVICE_ACCOUNT
    );

    eprintln!(
        "{test_name}: assertions took {} ms",
        started.elapsed().as_millis()
    );
}

#[test]
fn calico_shaped_objects_round_trip_unchanged_through_tortie_crds() {
    let test_name = "calico_shaped_objects_round_trip_unchanged_through_tortie_crds";
    let Some(server) = start(test_name) else {
        return;
    };
    let started = Instant::now();
    admin_ok(
        &server,
        &["apply", "-f", &path_arg(&repo_path("manifests/crds.yaml"))],
    );
    wait_for_calico_crds_established(&server);

    assert_calico_objects_round_trip_unchanged(&server, "tortie's CRDs");
    assert_required_fields_are_enforced(&server, "tortie's CRDs");

    // The schemas are Calico's, field for field: only descriptions (and printer columns, which
    // are not part of the schema) differ. Anything tortie adds would have to be argued here.
    let tortie = objects_as_sent(&server, &[repo_path("manifests/crds.yaml")]);
    let calico = objects_as_sent(&server, &[fixture_path("calico-v3.26-crds.yaml")]);
    assert_eq!(
        tortie.keys().collect::<Vec<_>>(),
        calico.keys().collect::<Vec<_>>(),
        "the same seven CRDs"
    );
    for (key, tortie_crd) in &tortie {
        let calico_crd = &calico[key];
        for field in ["group", "names", "scope"] {
            assert_eq!(
                tortie_crd["spec"][field], calico_crd["spec"][field],
                "{}: spec.{field}",
                key.1
            );
        }
        let version = |crd: &Value| {
            let version = &crd["spec"]["versions"][0];
            json!({
                "name": version["name"],
                "served": version["served"],
                "storage": version["storage"],
                "schema": without_descriptions(&version["schema"]),
            })
        };
        assert_eq!(
            version(tortie_crd),
            version(calico_crd),
            "{}: tortie's schema differs from Calico v3.26's",
            key.1
        );
    }

    // The comparison above can fail: a field the schema lacks is refused by kubectl's strict
    // validation, and pruned when validation is off.
    let typo = json!({
        "apiVersion": "crd.projectcalico.org/v1",
        "kind": "IPPool",
        "metadata": {"name": "typo-pool"},
        "spec": {"cidr": "10.252.0.0/16", "ipipMod": "Always"},
    });
    let error = server
        .apply(&typo.to_string())
        .expect_err("an IPPool with an unknown field must be refused under strict validation");
    assert!(
        format!("{error:#}").contains("ipipMod"),
        "the refusal names the field: {error:#}"
    );
    let typo_file = write_in_data_dir(&server, "typo-pool.json", &typo);
    admin_ok(&server, &["apply", "--validate=false", "-f", &typo_file]);
    let stored: Value = serde_json::from_str(&admin_ok(
        &server,
        &[
            "get",
            "ippools.crd.projectcalico.org",
            "typo-pool",
            "-o",
            "json",
        ],
    ))
    .expect("IPPool JSON");
    assert_eq!(
        stored["spec"],
        json!({"cidr": "10.252.0.0/16"}),
        "an undeclared field is pruned"
    );
    eprintln!(
        "{test_name}: assertions took {} ms",
        started.elapsed().as_millis()
    );
}

/// `value` with every `description` key removed, at any depth.
fn without_descriptions(value: &Value) -> Value {
    match value {
        Value::Object(map) => Value::Object(
            map.iter()
                .filter(|(key, _)| key.as_str() != "description")
                .map(|(key, value)| (key.clone(), without_descriptions(value)))
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(without_descriptions).collect()),
        other => other.clone(),
    }
}

#[test]
fn calico_shaped_objects_round_trip_unchanged_through_calico_v3_26_crds() {
    let test_name = "calico_shaped_objects_round_trip_unchanged_through_calico_v3_26_crds";
    let Some(server) = start(test_name) else {
        return;
    };
    let started = Instant::now();
    admin_ok(
        &server,
        &[
            "apply",
            "-f",
            &path_arg(&fixture_path("calico-v3.26-crds.yaml")),
        ],
    );
    wait_for_calico_crds_established(&server);

    assert_calico_objects_round_trip_unchanged(&server, "Calico v3.26's CRDs");
    assert_required_fields_are_enforced(&server, "Calico v3.26's CRDs");

    // Switching a Calico cluster to tortie's CRDs keeps every stored object as it was.
    admin_ok(
        &server,
        &["apply", "-f", &path_arg(&repo_path("manifests/crds.yaml"))],
    );
    wait_for_calico_crds_established(&server);
    assert_calico_objects_round_trip_unchanged(&server, "tortie's CRDs applied over Calico's");
    eprintln!(
        "{test_name}: assertions took {} ms",
        started.elapsed().as_millis()
    );
}

/// One question to the API server's authorizer: may the caller do `verb` on this resource?
struct Access {
    verb: &'static str,
    group: &'static str,
    resource: &'static str,
    subresource: &'static str,
    /// Empty: all namespaces (namespaced resources) or cluster-scoped.
    namespace: &'static str,
    name: &'static str,
}

impl Access {
    const fn new(verb: &'static str, group: &'static str, resource: &'static str) -> Self {
        Self {
            verb,
            group,
            resource,
            subresource: "",
            namespace: "",
            name: "",
        }
    }

    const fn in_namespace(mut self, namespace: &'static str) -> Self {
        self.namespace = namespace;
        self
    }

    const fn named(mut self, name: &'static str) -> Self {
        self.name = name;
        self
    }

    const fn subresource(mut self, subresource: &'static str) -> Self {
        self.subresource = subresource;
        self
    }

    fn describe(&self) -> String {
        let mut resource = if self.group.is_empty() {
            self.resource.to_owned()
        } else {
            format!("{}.{}", self.resource, self.group)
        };
        if !self.subresource.is_empty() {
            resource = format!("{resource}/{}", self.subresource);
        }
        if !self.name.is_empty() {
            resource = format!("{resource} {}", self.name);
        }
        let scope = if self.namespace.is_empty() {
            "cluster-wide".to_owned()
        } else {
            format!("in {}", self.namespace)
        };
        format!("{} {resource} {scope}", self.verb)
    }

    fn review(&self) -> Value {
        json!({
            "apiVersion": "authorization.k8s.io/v1",
            "kind": "SelfSubjectAccessReview",
            "spec": {"resourceAttributes": {
                "verb": self.verb,
                "group": self.group,
                "resource": self.resource,
                "subresource": self.subresource,
                "namespace": self.namespace,
                "name": self.name,
            }},
        })
    }
}

const CALICO_GROUP: &str = "crd.projectcalico.org";
const IPAM_PLURALS: [&str; 5] = [
    "ippools",
    "ipamblocks",
    "blockaffinities",
    "ipamhandles",
    "ipamconfigs",
];
const IPAM_VERBS: [&str; 7] = [
    "get", "list", "watch", "create", "update", "patch", "delete",
];
const READ_VERBS: [&str; 3] = ["get", "list", "watch"];

/// Everything the agent does against the API (issue 6): removing any of it from rbac.yaml must
/// fail this test.
fn accesses_the_agent_needs() -> Vec<Access> {
    let mut needed = Vec::new();
    for plural in IPAM_PLURALS {
        for verb in IPAM_VERBS {
            needed.push(Access::new(verb, CALICO_GROUP, plural));
        }
    }
    for plural in ["bgpconfigurations", "bgppeers"] {
        for verb in READ_VERBS {
            needed.push(Access::new(verb, CALICO_GROUP, plural));
        }
    }
    for verb in ["get", "list", "watch", "patch"] {
        needed.push(Access::new(verb, "", "nodes"));
    }
    for verb in ["patch", "update"] {
        needed.push(Access::new(verb, "", "nodes").subresource("status"));
    }
    for verb in READ_VERBS {
        needed.push(Access::new(verb, "", "pods"));
    }
    needed.push(Access::new("get", "", "secrets").in_namespace(AGENT_NAMESPACE));
    needed
        .push(Access::new("create", "coordination.k8s.io", "leases").in_namespace(AGENT_NAMESPACE));
    for verb in ["get", "update"] {
        needed.push(
            Access::new(verb, "coordination.k8s.io", "leases")
                .in_namespace(AGENT_NAMESPACE)
                .named(LEADER_LEASE),
        );
    }
    for group in ["", "events.k8s.io"] {
        for verb in ["create", "patch"] {
            needed.push(Access::new(verb, group, "events"));
        }
    }
    needed
}

/// Rights the agent has no use for; holding them would widen what a compromised node can do.
fn accesses_the_agent_must_not_have() -> Vec<Access> {
    vec![
        Access::new("delete", "", "nodes"),
        Access::new("create", "", "nodes"),
        Access::new("update", "", "nodes"),
        Access::new("delete", "", "pods"),
        Access::new("create", "", "pods").in_namespace("default"),
        Access::new("list", "", "secrets"),
        Access::new("get", "", "secrets"),
        Access::new("get", "", "secrets").in_namespace("default"),
        Access::new("list", "", "secrets").in_namespace(AGENT_NAMESPACE),
        Access::new("watch", "", "secrets").in_namespace(AGENT_NAMESPACE),
        Access::new("update", "", "secrets").in_namespace(AGENT_NAMESPACE),
        Access::new("create", CALICO_GROUP, "bgppeers"),
        Access::new("update", CALICO_GROUP, "bgpconfigurations"),
        Access::new("delete", CALICO_GROUP, "bgppeers"),
        Access::new("get", CALICO_GROUP, "felixconfigurations"),
        Access::new("create", "coordination.k8s.io", "leases").in_namespace("default"),
        Access::new("get", "coordination.k8s.io", "leases")
            .in_namespace(AGENT_NAMESPACE)
            .named("kube-controller-manager"),
        Access::new("update", "coordination.k8s.io", "leases")
            .in_namespace(AGENT_NAMESPACE)
            .named("kube-scheduler"),
        Access::new("delete", "coordination.k8s.io", "leases")
            .in_namespace(AGENT_NAMESPACE)
            .named(LEADER_LEASE),
        Access::new("get", "", "configmaps").in_namespace(AGENT_NAMESPACE),
        Access::new("patch", "apps", "daemonsets").in_namespace(AGENT_NAMESPACE),
        Access::new(
            "create",
            "apiextensions.k8s.io",
            "customresourcedefinitions",
        ),
        Access::new("create", "rbac.authorization.k8s.io", "clusterrolebindings"),
        Access::new("create", "", "serviceaccounts/token").in_namespace(AGENT_NAMESPACE),
    ]
}

/// Asks the API server about every access in one `kubectl create` of SelfSubjectAccessReviews
/// (what `kubectl auth can-i` sends), as the ServiceAccount itself; returns each answer.
fn review_accesses(server: &TestApiServer, kubeconfig: &Path, accesses: &[Access]) -> Vec<bool> {
    let list = json!({
        "apiVersion": "v1",
        "kind": "List",
        "items": accesses.iter().map(Access::review).collect::<Vec<_>>(),
    });
    let file = write_in_data_dir(server, "access-reviews.json", &list);
    let answers = json_objects(&as_ok(
        server,
        kubeconfig,
        "ask the authorizer about itself",
        &["create", "-f", &file, "-o", "json"],
    ));
    assert_eq!(answers.len(), accesses.len(), "one answer per review");
    answers
        .iter()
        .zip(accesses)
        .map(|(answer, access)| {
            let attributes = &answer["spec"]["resourceAttributes"];
            assert_eq!(
                (&attributes["verb"], &attributes["resource"]),
                (&json!(access.verb), &json!(access.resource)),
                "answers come in the order asked"
            );
            answer["status"]["allowed"] == true
        })
        .collect()
}

#[test]
fn agent_service_account_can_do_what_the_agent_needs_and_no_more() {
    let test_name = "agent_service_account_can_do_what_the_agent_needs_and_no_more";
    let Some(server) = start(test_name) else {
        return;
    };
    let started = Instant::now();
    admin_ok(
        &server,
        &[
            "apply",
            "-f",
            &path_arg(&repo_path("manifests/crds.yaml")),
            "-f",
            &path_arg(&repo_path("manifests/rbac.yaml")),
        ],
    );
    wait_for_calico_crds_established(&server);
    let agent = server
        .mint_service_account_kubeconfig(AGENT_NAMESPACE, AGENT_SERVICE_ACCOUNT)
        .expect("mint the agent's ServiceAccount kubeconfig");

    // The authorizer's answers for the whole matrix.
    let needed = accesses_the_agent_needs();
    let refused: Vec<String> = review_accesses(&server, &agent, &needed)
        .into_iter()
        .zip(&needed)
        .filter(|(allowed, _)| !allowed)
        .map(|(_, access)| access.describe())
        .collect();
    assert!(
        refused.is_empty(),
        "rbac.yaml does not let the agent: {refused:#?}"
    );
    let forbidden = accesses_the_agent_must_not_have();
    let granted: Vec<String> = review_accesses(&server, &agent, &forbidden)
        .into_iter()
        .zip(&forbidden)
        .filter(|(allowed, _)| *allowed)
        .map(|(_, access)| access.describe())
        .collect();
    assert!(
        granted.is_empty(),
        "rbac.yaml grants more than the agent needs: {granted:#?}"
    );

    // The IPAM store's compare-and-swap contract, through the agent's own store code and
    // identity (including the one-request delete that returns the object).
    let check =
        std::process::Command::new(tortie_e2e::cluster::tortie_binary().expect("tortie binary"))
            .arg("check-datastore")
            .env("KUBECONFIG", &agent)
            .output()
            .expect("run tortie check-datastore");
    assert!(
        check.status.success(),
        "tortie check-datastore failed: {}{}",
        stdout_of(&check),
        stderr_of(&check)
    );

    // Real calls, as the agent makes them. World set up by the admin: a Node, the BGP password
    // Secret in the agent's namespace and one elsewhere, a BGPPeer.
    server
        .apply(
            &json!({"apiVersion": "v1", "kind": "List", "items": [
                {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-1"}},
                {"apiVersion": "v1", "kind": "Secret",
                 "metadata": {"name": BGP_PASSWORD_SECRET, "namespace": AGENT_NAMESPACE},
                 "stringData": {"tor-1": "s3cret"}},
                {"apiVersion": "v1", "kind": "Secret",
                 "metadata": {"name": BGP_PASSWORD_SECRET, "namespace": "default"},
                 "stringData": {"tor-1": "not-for-tortie"}},
            ]})
            .to_string(),
        )
        .expect("admin creates the Node and Secrets");
    admin_ok(
        &server,
        &[
            "apply",
            "-f",
            &path_arg(&fixture_path("objects/bgppeer.yaml")),
        ],
    );

    let peers = as_ok(
        &server,
        &agent,
        "list BGPPeers",
        &["get", "bgppeers.crd.projectcalico.org", "-o", "name"],
    );
    assert!(peers.contains("tor-1"), "BGPPeer list: {peers}");
    as_ok(
        &server,
        &agent,
        "list Nodes and Pods",
        &["get", "nodes,pods", "--all-namespaces", "-o", "name"],
    );
    let password = as_ok(
        &server,
        &agent,
        "read the BGP password Secret in its namespace",
        &[
            "get",
            "secret",
            BGP_PASSWORD_SECRET,
            "-n",
            AGENT_NAMESPACE,
            "-o",
            "jsonpath={.data.tor-1}",
        ],
    );
    assert_eq!(password, "czNjcmV0", "base64 of s3cret");

    // IPAM writes: create a block, compare-and-swap update, patch, delete.
    let block_file = path_arg(&fixture_path("objects/ipamblock.yaml"));
    as_ok(
        &server,
        &agent,
        "create an IPAMBlock",
        &["create", "-f", &block_file],
    );
    let mut block: Value = serde_json::from_str(&as_ok(
        &server,
        &agent,
        "get an IPAMBlock",
        &["get", "-f", &block_file, "-o", "json"],
    ))
    .expect("IPAMBlock JSON");
    block["spec"]["sequenceNumber"] = json!(5);
    let updated_file = write_in_data_dir(&server, "ipamblock-update.json", &block);
    as_ok(
        &server,
        &agent,
        "update an IPAMBlock at its resourceVersion",
        &["replace", "-f", &updated_file],
    );
    as_ok(
        &server,
        &agent,
        "patch an IPAMBlock",
        &[
            "patch",
            "-f",
            &block_file,
            "--type=merge",
            "-p",
            r#"{"spec":{"strictAffinity":true}}"#,
        ],
    );
    as_ok(
        &server,
        &agent,
        "delete an IPAMBlock",
        &["delete", "-f", &block_file],
    );

    // Node: annotations and the NetworkUnavailable condition.
    as_ok(
        &server,
        &agent,
        "annotate its Node",
        &[
            "annotate",
            "node",
            "node-1",
            "projectcalico.org/IPv4Address=192.0.2.11/24",
        ],
    );
    // A real status write as an update (PUT): `kubectl patch --subresource=status` would first
    // GET nodes/status, which the agent never does (its client PATCHes directly); the access
    // reviews above cover patch.
    let mut node: Value = serde_json::from_str(&as_ok(
        &server,
        &agent,
        "read its Node",
        &["get", "node", "node-1", "-o", "json"],
    ))
    .expect("Node JSON");
    node["status"]["conditions"] = json!([{
        "type": "NetworkUnavailable",
        "status": "False",
        "reason": "TortieIsUp",
        "message": "tortie is running on this node",
        "lastTransitionTime": "2026-01-01T00:00:00Z",
        "lastHeartbeatTime": "2026-01-01T00:00:00Z",
    }]);
    let node_file = write_in_data_dir(&server, "node-status.json", &node);
    as_ok(
        &server,
        &agent,
        "set its Node's NetworkUnavailable condition",
        &["replace", "--subresource=status", "-f", &node_file],
    );
    let condition = admin_ok(
        &server,
        &[
            "get",
            "node",
            "node-1",
            "-o",
            r#"jsonpath={.status.conditions[?(@.type=="NetworkUnavailable")].status}"#,
        ],
    );
    assert_eq!(condition, "False");

    // The leak collector's Lease: create, read, renew.
    let lease = json!({
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": LEADER_LEASE, "namespace": AGENT_NAMESPACE},
        "spec": {"holderIdentity": "node-1", "leaseDurationSeconds": 15},
    });
    let lease_file = write_in_data_dir(&server, "lease.json", &lease);
    as_ok(
        &server,
        &agent,
        "create the leader Lease",
        &["create", "-f", &lease_file],
    );
    let mut lease: Value = serde_json::from_str(&as_ok(
        &server,
        &agent,
        "read the leader Lease",
        &[
            "get",
            "lease",
            LEADER_LEASE,
            "-n",
            AGENT_NAMESPACE,
            "-o",
            "json",
        ],
    ))
    .expect("Lease JSON");
    lease["spec"]["holderIdentity"] = json!("node-2");
    let renewed_file = write_in_data_dir(&server, "lease-renew.json", &lease);
    as_ok(
        &server,
        &agent,
        "take over the leader Lease",
        &["replace", "-f", &renewed_file],
    );

    // An Event about a bad object.
    let event = json!({
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": "odd-pool.tortie-1", "namespace": "default"},
        "involvedObject": {"apiVersion": "crd.projectcalico.org/v1", "kind": "IPPool",
                           "name": "odd-pool"},
        "reason": "InvalidIPPool",
        "message": "spec.ipipMode: Sometimes is not one of Never, Always, CrossSubnet",
        "type": "Warning",
        "source": {"component": "tortie-node", "host": "node-1"},
    });
    let event_file = write_in_data_dir(&server, "event.json", &event);
    as_ok(
        &server,
        &agent,
        "record an Event",
        &["create", "-f", &event_file],
    );

    // And what it must not do, refused by the real API.
    as_forbidden(
        &server,
        &agent,
        "delete a Node",
        &["delete", "node", "node-1"],
    );
    as_forbidden(
        &server,
        &agent,
        "list Secrets cluster-wide",
        &["get", "secrets", "--all-namespaces"],
    );
    as_forbidden(
        &server,
        &agent,
        "read a Secret outside its namespace",
        &["get", "secret", BGP_PASSWORD_SECRET, "-n", "default"],
    );
    as_forbidden(
        &server,
        &agent,
        "delete a BGPPeer",
        &["delete", "bgppeers.crd.projectcalico.org", "tor-1"],
    );
    eprintln!(
        "{test_name}: assertions took {} ms",
        started.elapsed().as_millis()
    );
}
