//! The worker's Kubernetes manifests as written (deploy/kubernetes and its monitoring component),
//! and every YAML and JSON file under deploy/ parsed: the objects hang together — the mounted
//! configuration, the grace period, probes on the metrics port, workload identity as the one
//! credential, the selectors of the Service, ServiceMonitor and PodDisruptionBudget, spreading
//! over zones and the NetworkPolicy's ports.

use std::process::Stdio;

use super::*;
use crate::common;

const BIN: &str = env!("CARGO_BIN_EXE_unassign-worker");

fn files_under(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files_under(&path, out);
        } else {
            out.push(path);
        }
    }
}

#[test]
fn every_yaml_and_json_file_under_deploy_parses() {
    let mut files = Vec::new();
    files_under(&repo("deploy"), &mut files);
    let mut yaml_files = 0;
    for file in files {
        match file.extension().and_then(|e| e.to_str()) {
            Some("yaml" | "yml") => {
                assert!(
                    !yaml_docs(&file).is_empty(),
                    "{} holds a document",
                    file.display()
                );
                yaml_files += 1;
            }
            Some("json") => {
                let text = std::fs::read_to_string(&file).unwrap();
                serde_json::from_str::<Json>(&text)
                    .unwrap_or_else(|e| panic!("{} is not valid JSON: {e}", file.display()));
            }
            _ => {}
        }
    }
    assert!(yaml_files >= 10, "found only {yaml_files} YAML files");
}

/// The file names a configMap or secret volume lists under `items` (`None`: every key).
fn item_paths(source: &Yaml) -> Option<Vec<String>> {
    let items = source["items"].as_sequence()?;
    Some(
        items
            .iter()
            .map(|i| str_of(&i["path"], "path").to_owned())
            .collect(),
    )
}

/// `check`'s exit code and output with the variables the Azure workload identity webhook injects
/// (asked of the binary, in its own process, with no token endpoint listening): 1 means the
/// configuration was accepted and only the token failed; 2 that the worker refuses to start.
fn check_with_workload_identity() -> (Option<i32>, String) {
    let token = common::TempFile::new("header.claims.signature");
    let output = Command::new(BIN)
        .arg("check")
        .env("AZURE_FEDERATED_TOKEN_FILE", &token.0)
        .env("AZURE_TENANT_ID", common::TENANT)
        .env("AZURE_CLIENT_ID", "00000000-0000-0000-0000-00000000c11e")
        .env("AZURE_AUTHORITY_HOST", "http://127.0.0.1:9")
        .env("UNASSIGN__GRAPH__BASE_URL", "http://127.0.0.1:9/beta")
        .env("UNASSIGN__GRAPH__TIMEOUT_SECS", "1")
        .stdin(Stdio::null())
        .output()
        .expect("the worker binary runs");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.code(), said)
}

#[test]
fn kubernetes_manifests_hang_together() {
    let m = Manifests::load(&[KUSTOMIZE_BASE, MONITORING]);
    let deployment = m.get("Deployment");
    let pod = &deployment["spec"]["template"];
    let spec = &pod["spec"];
    let labels = &pod["metadata"]["labels"];
    assert!(selects(
        &deployment["spec"]["selector"]["matchLabels"],
        labels
    ));

    // The configuration the pod reads, and the grace period it gets.
    let configmap = m.get("ConfigMap");
    let toml = str_of(&configmap["data"]["config.toml"], "config.toml");
    let settings = settings_with(toml, "the ConfigMap's config.toml");
    let containers = spec["containers"].as_sequence().unwrap();
    assert_eq!(containers.len(), 1);
    let c = &containers[0];
    let grace = env_value(c, "UNASSIGN__WORKER__SHUTDOWN_GRACE_SECS")
        .map(|e| str_of(&e["value"], "grace").parse::<u64>().unwrap())
        .unwrap_or(settings.worker.shutdown_grace.as_secs());
    let termination = spec["terminationGracePeriodSeconds"]
        .as_u64()
        .expect("terminationGracePeriodSeconds is set");
    assert!(
        termination > grace + 5,
        "terminationGracePeriodSeconds {termination} must exceed worker.shutdown_grace_secs {grace} + 5"
    );

    // The config file named by UNASSIGN_CONFIG (or --config) is the ConfigMap, mounted.
    let args: Vec<&str> = c["args"]
        .as_sequence()
        .map(|a| a.iter().map(|v| v.as_str().unwrap()).collect())
        .unwrap_or_default();
    let config_path = args
        .iter()
        .position(|a| *a == "--config")
        .map(|i| args[i + 1].to_owned())
        .or_else(|| {
            env_value(c, "UNASSIGN_CONFIG")
                .map(|e| str_of(&e["value"], "UNASSIGN_CONFIG").to_owned())
        })
        .expect("the config file is named by --config or UNASSIGN_CONFIG");
    let configmap_name = str_of(&configmap["metadata"]["name"], "ConfigMap name");
    let (volume, file) = mounted(spec, c, &config_path)
        .unwrap_or_else(|| panic!("{config_path} is on a mounted volume"));
    assert_eq!(
        volume["configMap"]["name"].as_str(),
        Some(configmap_name),
        "{config_path} comes from the ConfigMap"
    );
    assert!(
        item_paths(&volume["configMap"]).is_none_or(|paths| paths.contains(&file)),
        "{config_path}: the ConfigMap volume provides {file}"
    );
    assert!(
        configmap["data"][file.as_str()].is_string(),
        "the ConfigMap has {file}"
    );

    // Graph credentials come from workload identity (below); the broker URL from the Secret.
    let amqp = env_value(c, "AMQP_URL").expect("AMQP_URL");
    assert!(
        amqp["valueFrom"]["secretKeyRef"].is_mapping(),
        "AMQP_URL (it holds a password) comes from a Secret"
    );

    // Probes on the port the worker listens on.
    let port = &c["ports"][0];
    assert_eq!(
        port["containerPort"].as_u64(),
        Some(u64::from(settings.http.listen.port())),
        "containerPort is http.listen's port"
    );
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        let get = &c[probe]["httpGet"];
        assert_eq!(get["path"].as_str(), Some(path), "{probe}");
        assert!(
            get["port"] == port["name"] || get["port"] == port["containerPort"],
            "{probe} targets the metrics port"
        );
    }
    assert!(c["resources"]["requests"]["memory"].is_string());
    assert!(c["resources"]["limits"]["memory"].is_string());

    restricted(spec, c);

    // Azure workload identity: the service account names the app, the pods opt in.
    let sa = m.get("ServiceAccount");
    assert_eq!(spec["serviceAccountName"], sa["metadata"]["name"]);
    assert_eq!(
        sa["metadata"]["annotations"]["azure.workload.identity/client-id"].as_str(),
        Some(settings.auth.client_id.as_str()),
        "the workload identity client id is the configured auth.client_id"
    );
    assert_eq!(
        labels["azure.workload.identity/use"].as_str(),
        Some("true"),
        "pods opt in to workload identity, so the webhook injects AZURE_FEDERATED_TOKEN_FILE"
    );
    // Exactly one credential source: any other next to the webhook's token exits 2.
    for other in [
        "AZURE_CLIENT_SECRET",
        "AZURE_CLIENT_SECRET_FILE",
        "AZURE_CLIENT_CERTIFICATE_PATH",
    ] {
        assert!(
            env_value(c, other).is_none(),
            "{other} next to workload identity makes the worker refuse to start"
        );
    }
    let (code, said) = check_with_workload_identity();
    assert_eq!(
        code,
        Some(1),
        "the worker accepts the webhook's variables (only the token fails here): {said}"
    );

    // The Service, the ServiceMonitor and the PodDisruptionBudget find the pods.
    let service = m.get("Service");
    assert!(
        selects(&service["spec"]["selector"], labels),
        "Service selects the pods"
    );
    let service_port = &service["spec"]["ports"][0];
    assert!(
        service_port["targetPort"] == port["name"]
            || service_port["targetPort"] == port["containerPort"]
    );
    assert_eq!(
        service["spec"]["publishNotReadyAddresses"].as_bool(),
        Some(true),
        "a paused (not ready) worker is still scraped"
    );
    let monitor = m.get("ServiceMonitor");
    assert!(selects(
        &monitor["spec"]["selector"]["matchLabels"],
        &service["metadata"]["labels"]
    ));
    let endpoint = &monitor["spec"]["endpoints"][0];
    assert_eq!(endpoint["port"], service_port["name"]);
    // The job label the alerts select on is set, not taken from the Service's name, which an
    // overlay's namePrefix would change.
    let job = endpoint["relabelings"]
        .as_sequence()
        .into_iter()
        .flatten()
        .find(|r| r["targetLabel"] == "job")
        .expect("the ServiceMonitor sets the job label");
    assert!(job["sourceLabels"].is_null(), "{job:?}");
    assert_eq!(job["replacement"].as_str(), Some(JOB));

    // Spread over zones and nodes, softly, selecting the pods.
    let spread = spec["topologySpreadConstraints"]
        .as_sequence()
        .expect("topologySpreadConstraints");
    let keys: BTreeSet<&str> = spread
        .iter()
        .map(|c| {
            assert!(selects(&c["labelSelector"]["matchLabels"], labels), "{c:?}");
            assert_eq!(c["whenUnsatisfiable"].as_str(), Some("ScheduleAnyway"));
            str_of(&c["topologyKey"], "topologyKey")
        })
        .collect();
    assert_eq!(
        keys,
        BTreeSet::from(["topology.kubernetes.io/zone", "kubernetes.io/hostname"])
    );

    // The NetworkPolicy: the metrics port in; DNS, the broker and HTTPS (token endpoint, Graph)
    // out, and nothing else.
    let policy = &m.get("NetworkPolicy")["spec"];
    assert!(selects(&policy["podSelector"]["matchLabels"], labels));
    assert_eq!(
        policy["policyTypes"],
        Yaml::from(vec![Yaml::from("Ingress"), Yaml::from("Egress")])
    );
    let ingress = policy["ingress"].as_sequence().expect("ingress rules");
    assert_eq!(ingress.len(), 1, "one ingress rule");
    let port_of = |p: &Yaml| {
        let number = p["port"].as_u64().map(|n| n.to_string());
        (
            number.unwrap_or_else(|| str_of(&p["port"], "port").to_owned()),
            p["protocol"].as_str().unwrap_or("TCP").to_owned(),
        )
    };
    let ports_in: Vec<_> = ingress[0]["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(port_of)
        .collect();
    assert!(
        ports_in
            .iter()
            .all(|(p, _)| *p == port["name"].as_str().unwrap()
                || *p == port["containerPort"].as_u64().unwrap().to_string()),
        "ingress only to the metrics port: {ports_in:?}"
    );
    let ports_out: BTreeSet<_> = policy["egress"]
        .as_sequence()
        .expect("egress rules")
        .iter()
        .flat_map(|rule| {
            assert!(
                rule["to"].is_sequence(),
                "every egress rule names where to: {rule:?}"
            );
            rule["ports"]
                .as_sequence()
                .expect("egress rule ports")
                .clone()
        })
        .map(|p| port_of(&p))
        .collect();
    let expected: BTreeSet<(String, String)> = [
        ("53", "UDP"),
        ("53", "TCP"),
        ("5671", "TCP"),
        ("5672", "TCP"),
        ("443", "TCP"),
    ]
    .map(|(p, proto)| (p.to_owned(), proto.to_owned()))
    .into();
    assert_eq!(ports_out, expected);
    // HTTPS goes outside the cluster's private ranges only.
    let https = policy["egress"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|r| r["ports"][0]["port"].as_u64() == Some(443))
        .unwrap();
    for block in https["to"].as_sequence().unwrap() {
        assert!(
            block["ipBlock"]["except"]
                .as_sequence()
                .is_some_and(|e| !e.is_empty()),
            "443 is allowed outside private ranges only: {block:?}"
        );
    }
    let pdb = m.get("PodDisruptionBudget");
    assert!(selects(&pdb["spec"]["selector"]["matchLabels"], labels));
    let replicas = deployment["spec"]["replicas"].as_u64().unwrap_or(1);
    if let Some(min) = pdb["spec"]["minAvailable"].as_u64() {
        assert!(
            min < replicas,
            "minAvailable {min} < replicas {replicas}: drains can proceed"
        );
    }
}
