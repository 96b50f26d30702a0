//! The operator kit under deploy/: the alert rules through promtool, the Grafana dashboard's
//! queries against a real Prometheus scraping a real worker, every YAML file parsed and
//! cross-checked (probes, selectors, grace periods, the PrometheusRule mirroring alerts.yaml), and
//! the Kubernetes kit built by kustomize with and without its monitoring component and validated
//! against the Kubernetes API schemas.
//!
//! Needs `promtool` and `prometheus` (scripts/ensure-prometheus.sh), `kubectl` or `kustomize`, and
//! `kubernetes-validate` (scripts/ensure-k8s-tools.sh) on PATH: scripts/test.sh installs them.

use crate::common;

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use common::{Env, device, eventually, sim_options};
use figment::{
    Figment,
    providers::{Format, Toml},
};
use serde::Deserialize;
use serde_json::Value as Json;
use serde_norway::Value as Yaml;
use unassign_worker::{
    config::Settings,
    sim::{Scripted, SimOptions},
};

const BIN: &str = env!("CARGO_BIN_EXE_unassign-worker");
const WAIT: Duration = Duration::from_secs(30);
/// The scrape job name the alert rules select on (a placeholder an operator may set).
const JOB: &str = "unassign-worker";
/// The runbook base URL deploy/prometheus/alerts.yaml ships with, for operators to set
/// (docs/deploy.md): every runbook_url is this, `#` and the alert's name in lower case.
const RUNBOOK_BASE: &str = "https://runbook.invalid/unassign-worker";
/// The document whose headings the runbook URLs' anchors name.
const RUNBOOK_DOC: &str = "docs/operations.md";
/// The kustomize base, which needs no CRD.
const KUSTOMIZE_BASE: &str = "deploy/kubernetes";
/// The opt-in component with the Prometheus operator's objects.
const MONITORING: &str = "deploy/kubernetes/components/monitoring";
/// The example overlay that adds the component, with its settings.
const OVERLAY: &str = "deploy/overlays/monitoring";
/// The Kubernetes versions whose API schemas the built kit must pass: the oldest one the kit
/// supports and the newest kubernetes-validate ships.
const KUBERNETES_VERSIONS: [&str; 2] = ["1.29.0", "1.37.0"];
/// The intake's scrape job: the intake alert groups by it, the dashboard's intake row selects it.
const INTAKE_JOB: &str = "unassign-intake";
/// The intake's own kustomization, applied beside the worker's…
const INTAKE_KIT: &str = "deploy/kubernetes/intake";
/// …and its opt-in component with the ServiceMonitor, and the overlay that adds it.
const INTAKE_MONITORING: &str = "deploy/kubernetes/intake/components/monitoring";
const INTAKE_OVERLAY: &str = "deploy/overlays/intake-monitoring";

/// Absolute paths only: nothing here depends on the current directory.
fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo(path)).unwrap_or_else(|e| panic!("reading {path}: {e}"))
}

/// Every YAML document in a file.
fn yaml_docs(path: &Path) -> Vec<Yaml> {
    let text = std::fs::read_to_string(path).unwrap();
    serde_norway::Deserializer::from_str(&text)
        .map(|doc| {
            Yaml::deserialize(doc)
                .unwrap_or_else(|e| panic!("{} is not valid YAML: {e}", path.display()))
        })
        .filter(|doc| !doc.is_null())
        .collect()
}

fn yaml(path: &str) -> Yaml {
    let mut docs = yaml_docs(&repo(path));
    assert_eq!(docs.len(), 1, "{path} holds one YAML document");
    docs.remove(0)
}

fn str_of<'a>(value: &'a Yaml, what: &str) -> &'a str {
    value
        .as_str()
        .unwrap_or_else(|| panic!("{what} is a string, found {value:?}"))
}

/// The built-in defaults with a TOML file's keys on top, as the worker reads `--config`: unknown
/// keys and wrong types are refused. (Environment layers are not applied here.)
fn settings_with(toml: &str, what: &str) -> Settings {
    Figment::from(Toml::string(&read("config/default.toml")))
        .merge(Toml::string(toml))
        .extract()
        .unwrap_or_else(|e| panic!("{what} is not a valid worker configuration: {e}"))
}

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

fn on_path(name: &str) -> bool {
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|dir| dir.join(name).is_file()))
        .unwrap_or(false)
}

/// `promtool` or `prometheus`, or a panic that says how to get it.
fn tool(name: &str) -> Command {
    assert!(
        on_path(name),
        "`{name}` is not on PATH: run scripts/ensure-prometheus.sh (scripts/test.sh does)"
    );
    Command::new(name)
}

/// Runs `command` to success and returns its standard output, or panics with everything it said.
fn run(command: &mut Command, what: &str) -> String {
    let output = command.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{what} failed ({}):\n{stdout}{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

// ------------------------------------------------------------------------------ alert rules

#[test]
fn alert_rules_pass_promtool_check_and_their_unit_tests() {
    for (args, file) in [
        (["check", "rules"], "deploy/prometheus/alerts.yaml"),
        (["test", "rules"], "deploy/prometheus/alerts.test.yaml"),
    ] {
        let output = tool("promtool")
            .args(args)
            .arg(repo(file))
            .output()
            .expect("promtool runs");
        assert!(
            output.status.success(),
            "promtool {} {file} failed:\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

fn alert_rules() -> Vec<Yaml> {
    let rules = yaml("deploy/prometheus/alerts.yaml");
    rules["groups"]
        .as_sequence()
        .expect("groups")
        .iter()
        .flat_map(|g| g["rules"].as_sequence().expect("rules").clone())
        .collect()
}

#[test]
fn every_alert_has_a_severity_a_for_and_a_runbook_url_and_is_tested_both_ways() {
    let anchors = crate::docs::anchors(&repo(RUNBOOK_DOC));
    let tests = yaml("deploy/prometheus/alerts.test.yaml");
    let mut fires = BTreeSet::new();
    let mut stays_quiet = BTreeSet::new();
    for test in tests["tests"].as_sequence().unwrap() {
        for case in test["alert_rule_test"].as_sequence().unwrap() {
            let name = str_of(&case["alertname"], "alertname").to_owned();
            match case["exp_alerts"].as_sequence().map(Vec::len) {
                Some(0) => stays_quiet.insert(name),
                Some(_) => fires.insert(name),
                None => panic!("{name}: exp_alerts is a list"),
            };
        }
    }

    let rules = alert_rules();
    assert!(rules.len() >= 7, "the issue asks for at least seven alerts");
    for rule in &rules {
        let name = str_of(&rule["alert"], "alert");
        assert!(
            name.starts_with("UnassignWorker"),
            "{name}: alerts share a prefix"
        );
        assert!(rule["for"].as_str().is_some(), "{name} has a `for:`");
        assert!(
            matches!(
                rule["labels"]["severity"].as_str(),
                Some("warning" | "critical")
            ),
            "{name} has severity warning or critical"
        );
        let annotations = &rule["annotations"];
        for key in ["summary", "description"] {
            assert!(
                annotations[key].as_str().is_some_and(|s| !s.is_empty()),
                "{name} has a {key}"
            );
        }
        // Absolute, from the one base (scripts/render-alerts.sh and the kustomize component
        // replace exactly that part), to a heading of the runbook.
        let url = str_of(&annotations["runbook_url"], "runbook_url");
        let anchor = url
            .strip_prefix(RUNBOOK_BASE)
            .and_then(|rest| rest.strip_prefix('#'))
            .unwrap_or_else(|| panic!("{name}: runbook_url is {RUNBOOK_BASE}#<anchor>, not {url}"));
        assert_eq!(anchor, name.to_lowercase(), "{name}: runbook anchor");
        assert!(
            anchors.contains(anchor),
            "{name}: {RUNBOOK_DOC} has no heading for #{anchor}"
        );
        // Only the rules on `up` need the job; every one of them selects the same job.
        let expr = str_of(&rule["expr"], "expr");
        for selected in expr.split("job=\"").skip(1) {
            assert!(
                selected.starts_with(&format!("{JOB}\"")),
                "{name}: selects job {JOB}: {expr}"
            );
        }
        assert!(
            fires.contains(name),
            "{name}: alerts.test.yaml has no case where it fires"
        );
        assert!(
            stays_quiet.contains(name),
            "{name}: alerts.test.yaml has no case where it stays quiet"
        );
    }
}

#[test]
fn the_prometheus_rule_carries_exactly_the_alert_rules() {
    let rule = yaml(&format!("{MONITORING}/prometheusrule.yaml"));
    assert_eq!(str_of(&rule["kind"], "kind"), "PrometheusRule");
    assert_eq!(
        rule["spec"]["groups"],
        yaml("deploy/prometheus/alerts.yaml")["groups"],
        "{MONITORING}/prometheusrule.yaml differs from deploy/prometheus/alerts.yaml: regenerate it (command in its header)"
    );
}

// ------------------------------------------------------------------------------ YAML and manifests

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

/// The files `dir`'s kustomization.yaml lists under `resources`, checked to be every manifest
/// in `dir` (examples and the kustomization itself excepted): a file added to the directory but
/// not to its list would silently never be applied.
fn listed_manifests(dir: &str) -> Vec<String> {
    let kustomization = yaml(&format!("{dir}/kustomization.yaml"));
    let listed: BTreeSet<String> = kustomization["resources"]
        .as_sequence()
        .unwrap_or_else(|| panic!("{dir}/kustomization.yaml has resources"))
        .iter()
        .map(|r| str_of(r, "resource").to_owned())
        .collect();
    let mut on_disk = BTreeSet::new();
    for entry in std::fs::read_dir(repo(dir)).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        if name.ends_with(".yaml") && name != "kustomization.yaml" && !name.contains(".example.") {
            on_disk.insert(name);
        }
    }
    assert_eq!(
        listed, on_disk,
        "{dir}/kustomization.yaml lists every manifest in {dir} (examples excepted)"
    );
    listed.into_iter().map(|f| format!("{dir}/{f}")).collect()
}

/// The Kubernetes objects of the kustomizations (or components) in `dirs`, as written, by kind
/// (one of each).
struct Manifests(BTreeMap<String, Yaml>);

impl Manifests {
    fn load(dirs: &[&str]) -> Manifests {
        let mut by_kind = BTreeMap::new();
        for file in dirs.iter().flat_map(|dir| listed_manifests(dir)) {
            for doc in yaml_docs(&repo(&file)) {
                let kind = str_of(&doc["kind"], "kind").to_owned();
                assert!(doc["apiVersion"].as_str().is_some(), "{file}: apiVersion");
                assert!(
                    doc["metadata"]["name"].as_str().is_some(),
                    "{file}: metadata.name"
                );
                assert!(by_kind.insert(kind.clone(), doc).is_none(), "one {kind}");
            }
        }
        Manifests(by_kind)
    }

    fn get(&self, kind: &str) -> &Yaml {
        self.0
            .get(kind)
            .unwrap_or_else(|| panic!("the Kubernetes kit has a {kind}"))
    }
}

/// `selector` (a label map) picks `labels`.
fn selects(selector: &Yaml, labels: &Yaml) -> bool {
    let selector = selector.as_mapping().expect("a label selector");
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

fn env_value<'a>(container: &'a Yaml, name: &str) -> Option<&'a Yaml> {
    container["env"]
        .as_sequence()?
        .iter()
        .find(|e| e["name"].as_str() == Some(name))
}

/// The pod volume that `path` lies on in `container`, and the file's path inside it.
fn mounted<'a>(pod: &'a Yaml, container: &Yaml, path: &str) -> Option<(&'a Yaml, String)> {
    container["volumeMounts"]
        .as_sequence()?
        .iter()
        .find_map(|mount| {
            let dir = str_of(&mount["mountPath"], "mountPath");
            let file = path.strip_prefix(dir)?.strip_prefix('/')?;
            let volume = pod["volumes"]
                .as_sequence()?
                .iter()
                .find(|v| v["name"] == mount["name"])?;
            Some((volume, file.to_owned()))
        })
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

/// A restrictive security context for the pod `spec` and its container `c`.
fn restricted(spec: &Yaml, c: &Yaml) {
    assert_eq!(
        spec["securityContext"]["runAsNonRoot"].as_bool(),
        Some(true)
    );
    assert!(
        spec["securityContext"]["runAsUser"]
            .as_u64()
            .is_some_and(|u| u > 0)
    );
    assert_eq!(
        spec["securityContext"]["seccompProfile"]["type"].as_str(),
        Some("RuntimeDefault")
    );
    let sc = &c["securityContext"];
    assert_eq!(sc["allowPrivilegeEscalation"].as_bool(), Some(false));
    assert_eq!(sc["readOnlyRootFilesystem"].as_bool(), Some(true));
    assert_eq!(sc["runAsNonRoot"].as_bool(), Some(true));
    assert_eq!(
        sc["capabilities"]["drop"]
            .as_sequence()
            .map(|d| d.as_slice()),
        Some([Yaml::from("ALL")].as_slice())
    );
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

// ------------------------------------------------------------------------------ kustomize

/// `kustomize build` of a directory (kubectl's built-in kustomize, or a standalone one): its
/// objects.
fn kustomize_build(dir: &Path) -> Vec<Yaml> {
    let built = run(
        &mut kustomize(dir),
        &format!("kustomize build {}", dir.display()),
    );
    serde_norway::Deserializer::from_str(&built)
        .map(|doc| Yaml::deserialize(doc).expect("kustomize writes YAML"))
        .filter(|doc| !doc.is_null())
        .collect()
}

fn kustomize(dir: &Path) -> Command {
    let mut command = if on_path("kubectl") {
        let mut c = Command::new("kubectl");
        c.arg("kustomize");
        c
    } else {
        assert!(
            on_path("kustomize"),
            "neither `kubectl` nor `kustomize` is on PATH: run scripts/ensure-k8s-tools.sh (scripts/test.sh does)"
        );
        let mut c = Command::new("kustomize");
        c.arg("build");
        c
    };
    command.arg(dir).stdin(Stdio::null());
    command
}

fn kind_of(object: &Yaml) -> &str {
    str_of(&object["kind"], "kind")
}

fn find<'a>(objects: &'a [Yaml], kind: &str) -> &'a Yaml {
    objects
        .iter()
        .find(|o| kind_of(o) == kind)
        .unwrap_or_else(|| panic!("the build has a {kind}"))
}

/// A directory of its own under the target directory, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(what: &str) -> Scratch {
        let dir =
            Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{what}-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir.canonicalize().unwrap())
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `to` relative to the directory `from` (kustomize refuses absolute paths to bases).
fn relative(from: &Path, to: &Path) -> PathBuf {
    let to = to.canonicalize().unwrap();
    let (from, to): (Vec<_>, Vec<_>) = (from.components().collect(), to.components().collect());
    let common = from.iter().zip(&to).take_while(|(a, b)| a == b).count();
    let mut path = PathBuf::new();
    (common..from.len()).for_each(|_| path.push(".."));
    to[common..].iter().for_each(|c| path.push(c));
    path
}

/// Validates `objects` with kubernetes-validate against the schemas of every version in
/// [`KUBERNETES_VERSIONS`], strictly (unknown fields fail). It has no schema for the Prometheus
/// operator's CRDs and only warns about them: any other warning fails the test, so a typo in a
/// core object's apiVersion or kind cannot slip through as "no schema".
fn validate(objects: &[Yaml], what: &str) {
    assert!(
        on_path("kubernetes-validate"),
        "`kubernetes-validate` is not on PATH: run scripts/ensure-k8s-tools.sh (scripts/test.sh does)"
    );
    let scratch = Scratch::new("validate");
    let file = scratch.0.join(format!("{what}.yaml"));
    let text: Vec<String> = objects
        .iter()
        .map(|o| serde_norway::to_string(o).unwrap())
        .collect();
    std::fs::write(&file, text.join("---\n")).unwrap();
    for version in KUBERNETES_VERSIONS {
        let output = run(
            Command::new("kubernetes-validate")
                .args(["--strict", "--kubernetes-version", version])
                .arg(&file),
            &format!("kubernetes-validate {what} against {version}"),
        );
        let passed = output.lines().filter(|l| l.starts_with("INFO")).count();
        let crds = objects
            .iter()
            .filter(|o| {
                o["apiVersion"]
                    .as_str()
                    .unwrap()
                    .starts_with("monitoring.coreos.com/")
            })
            .count();
        assert_eq!(
            passed + crds,
            objects.len(),
            "{what}: every object but the CRDs passed against {version}:\n{output}"
        );
        for line in output.lines().filter(|l| !l.starts_with("INFO")) {
            assert!(
                line.contains("Couldn't find schema for kind ServiceMonitor with api version monitoring.coreos.com/v1")
                    || line.contains("Couldn't find schema for kind PrometheusRule with api version monitoring.coreos.com/v1"),
                "{what} against {version}: {line}"
            );
        }
    }
}

/// The recommended `app.kubernetes.io/*` labels on every object, the version the crate's.
fn has_recommended_labels(objects: &[Yaml]) {
    for object in objects {
        let what = format!(
            "{} {}",
            kind_of(object),
            object["metadata"]["name"].as_str().unwrap()
        );
        let labels = &object["metadata"]["labels"];
        for (key, value) in [
            ("app.kubernetes.io/name", "unassign-worker"),
            ("app.kubernetes.io/instance", "unassign-worker"),
            ("app.kubernetes.io/version", env!("CARGO_PKG_VERSION")),
            ("app.kubernetes.io/part-of", "unassign-worker"),
            ("app.kubernetes.io/managed-by", "kustomize"),
        ] {
            assert_eq!(labels[key].as_str(), Some(value), "{what}: {key}");
        }
        if kind_of(object) != "Namespace" {
            assert!(
                labels["app.kubernetes.io/component"].is_string(),
                "{what}: app.kubernetes.io/component"
            );
        }
    }
}

#[test]
fn kustomize_builds_without_and_with_the_monitoring_component_and_the_kubernetes_schemas_pass() {
    // The base: no Prometheus operator object, so it applies on a cluster without its CRDs.
    let base = kustomize_build(&repo(KUSTOMIZE_BASE));
    let kinds: BTreeSet<&str> = base.iter().map(kind_of).collect();
    assert_eq!(
        kinds,
        BTreeSet::from([
            "Namespace",
            "ServiceAccount",
            "ConfigMap",
            "Deployment",
            "Service",
            "PodDisruptionBudget",
            "NetworkPolicy"
        ])
    );
    has_recommended_labels(&base);
    let deployment = find(&base, "Deployment");
    let template = &deployment["spec"]["template"]["metadata"]["labels"];
    assert_eq!(
        template["app.kubernetes.io/version"],
        deployment["metadata"]["labels"]["app.kubernetes.io/version"],
        "pods carry the recommended labels too"
    );
    assert_eq!(
        deployment["spec"]["template"]["spec"]["containers"][0]["image"].as_str(),
        Some(format!("unassign-worker:{}", env!("CARGO_PKG_VERSION")).as_str()),
        "the image tag and app.kubernetes.io/version agree"
    );
    assert!(
        deployment["spec"]["selector"]["matchLabels"]["app.kubernetes.io/version"].is_null(),
        "the version stays out of the (immutable) selector"
    );
    for object in &base {
        if kind_of(object) != "Namespace" {
            assert_eq!(
                object["metadata"]["namespace"].as_str(),
                Some("unassign-worker")
            );
        }
    }
    validate(&base, "base");
    // The Secret is created out of band, but its example must be a valid Secret too.
    validate(
        &yaml_docs(&repo(&format!("{KUSTOMIZE_BASE}/secret.example.yaml"))),
        "secret-example",
    );

    // The example overlay: the base, plus the component's two objects, and not the settings.
    listed_manifests(MONITORING);
    let overlay = yaml(&format!("{OVERLAY}/kustomization.yaml"));
    for path in ["resources", "components"]
        .iter()
        .flat_map(|k| overlay[*k].as_sequence().unwrap().iter())
    {
        let path = repo(OVERLAY).join(str_of(path, "path"));
        assert!(path.exists(), "{} exists", path.display());
    }
    let with = kustomize_build(&repo(OVERLAY));
    let kinds_with: BTreeSet<&str> = with.iter().map(kind_of).collect();
    let added: BTreeSet<&str> = kinds_with.difference(&kinds).copied().collect();
    assert_eq!(added, BTreeSet::from(["PrometheusRule", "ServiceMonitor"]));
    assert_eq!(with.len(), base.len() + 2, "the settings are not applied");
    has_recommended_labels(&with);
    // The example settings are the placeholders: the rule is alerts.yaml's, unchanged.
    assert_eq!(
        find(&with, "PrometheusRule")["spec"]["groups"],
        yaml("deploy/prometheus/alerts.yaml")["groups"]
    );
    validate(&with, "with-monitoring");
}

/// The intake's kit (applied beside the worker's) builds with kustomize, with and without its
/// monitoring component, and what it builds — and its example Secret — passes the Kubernetes
/// schemas.
#[test]
fn the_intake_kit_builds_and_its_objects_pass_the_kubernetes_schemas() {
    // Like the worker's: no Prometheus operator object unless the component is added.
    let built = kustomize_build(&repo(INTAKE_KIT));
    let kinds: BTreeSet<&str> = built.iter().map(kind_of).collect();
    assert!(kinds.contains("Deployment"), "{kinds:?}");
    assert!(!kinds.contains("ServiceMonitor"), "{kinds:?}");
    validate(&built, "intake");
    let with = kustomize_build(&repo(INTAKE_OVERLAY));
    assert_eq!(with.len(), built.len() + 1, "the overlay adds one object…");
    assert!(
        with.iter().any(|o| kind_of(o) == "ServiceMonitor"),
        "…the ServiceMonitor"
    );
    validate(&with, "intake-with-monitoring");
    validate(
        &yaml_docs(&repo(&format!("{INTAKE_KIT}/secret.example.yaml"))),
        "intake-secret-example",
    );
}

/// The runbook base URL and the job, set once, reach every runbook_url and every job selector —
/// through the kustomize component and through scripts/render-alerts.sh alike.
#[test]
fn the_runbook_base_url_and_the_job_are_set_in_one_place_per_route() {
    let base = "https://git.example.com/ops/unassign-worker/-/blob/main/README.md?plain=0&x=1";
    let job = "uw-prod";
    let scratch = Scratch::new("overlay");
    let settings = std::fs::read_to_string(repo(&format!("{OVERLAY}/monitoring-settings.yaml")))
        .unwrap()
        .replace(
            &format!("runbook-base-url: {RUNBOOK_BASE}"),
            &format!("runbook-base-url: \"{base}\""),
        )
        .replace(&format!("job: {JOB}"), &format!("job: {job}"));
    assert!(
        settings.contains(base) && settings.contains(job),
        "{settings}"
    );
    std::fs::write(scratch.0.join("monitoring-settings.yaml"), settings).unwrap();
    let overlay = |settings: &str| {
        format!(
            "resources:\n  - {}\n{settings}components:\n  - {}\n",
            relative(&scratch.0, &repo(KUSTOMIZE_BASE)).display(),
            relative(&scratch.0, &repo(MONITORING)).display(),
        )
    };
    // Without the settings, the component refuses to build rather than ship placeholder links.
    std::fs::write(scratch.0.join("kustomization.yaml"), overlay("")).unwrap();
    let refused = kustomize(&scratch.0).output().unwrap();
    assert!(
        !refused.status.success(),
        "the component builds without its settings"
    );
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("unassign-worker-monitoring"),
        "the error names the settings: {}",
        String::from_utf8_lossy(&refused.stderr)
    );
    std::fs::write(
        scratch.0.join("kustomization.yaml"),
        overlay("  - monitoring-settings.yaml\n"),
    )
    .unwrap();
    let built = kustomize_build(&scratch.0);
    let rule = find(&built, "PrometheusRule");
    let mut selectors = 0;
    for group in rule["spec"]["groups"].as_sequence().unwrap() {
        for r in group["rules"].as_sequence().unwrap() {
            let name = str_of(&r["alert"], "alert");
            assert_eq!(
                r["annotations"]["runbook_url"].as_str(),
                Some(format!("{base}#{}", name.to_lowercase()).as_str())
            );
            let expr = str_of(&r["expr"], "expr");
            for selected in expr.split("job=\"").skip(1) {
                assert!(selected.starts_with(&format!("{job}\"")), "{name}: {expr}");
                selectors += 1;
            }
        }
    }
    assert!(selectors >= 3, "the rules on `up` select the job");
    let monitor = find(&built, "ServiceMonitor");
    assert_eq!(
        monitor["spec"]["endpoints"][0]["relabelings"][0]["replacement"].as_str(),
        Some(job)
    );

    // Rule files: the script prints the same groups, and promtool accepts them.
    let rendered = run(
        Command::new(repo("scripts/render-alerts.sh"))
            .env("RUNBOOK_BASE_URL", base)
            .env("ALERT_JOB", job),
        "scripts/render-alerts.sh",
    );
    let file = scratch.0.join("alerts.yaml");
    std::fs::write(&file, &rendered).unwrap();
    assert_eq!(yaml_docs(&file)[0]["groups"], rule["spec"]["groups"]);
    run(
        tool("promtool").args(["check", "rules"]).arg(&file),
        "promtool check rules on the rendered rules",
    );
    for (variable, bad) in [
        ("RUNBOOK_BASE_URL", "https://wiki.example.com/runbook#top"),
        ("RUNBOOK_BASE_URL", "wiki/runbook"),
        ("ALERT_JOB", "a\"b"),
    ] {
        let output = Command::new(repo("scripts/render-alerts.sh"))
            .env("RUNBOOK_BASE_URL", base)
            .env(variable, bad)
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(2), "{variable}={bad} is refused");
        assert!(String::from_utf8_lossy(&output.stderr).contains(variable));
    }
}

#[test]
fn intake_manifests_hang_together() {
    let m = Manifests::load(&[INTAKE_KIT, INTAKE_MONITORING]);
    let worker = Manifests::load(&[KUSTOMIZE_BASE, MONITORING]);
    let settings = settings_with(
        str_of(
            &worker.get("ConfigMap")["data"]["config.toml"],
            "config.toml",
        ),
        "the worker's ConfigMap",
    );
    let deployment = m.get("Deployment");
    let pod = &deployment["spec"]["template"];
    let spec = &pod["spec"];
    let labels = &pod["metadata"]["labels"];
    assert!(selects(
        &deployment["spec"]["selector"]["matchLabels"],
        labels
    ));
    assert!(
        !selects(
            &worker.get("Deployment")["spec"]["selector"]["matchLabels"],
            labels
        ),
        "the worker's selectors do not pick the intake's pods"
    );
    let c = &spec["containers"][0];
    assert_eq!(c["args"][0].as_str(), Some("intake"));
    let termination = spec["terminationGracePeriodSeconds"].as_u64().unwrap();
    assert!(termination > settings.intake.shutdown_grace.as_secs() + 5);
    restricted(spec, c);

    // It reads the worker's ConfigMap and broker Secret, and its own credentials files.
    let config_path = str_of(
        &env_value(c, "UNASSIGN_CONFIG").expect("UNASSIGN_CONFIG")["value"],
        "UNASSIGN_CONFIG",
    );
    let (volume, _) = mounted(spec, c, config_path).expect("the config file is mounted");
    assert_eq!(
        volume["configMap"]["name"],
        worker.get("ConfigMap")["metadata"]["name"]
    );
    assert!(env_value(c, "AMQP_URL").unwrap()["valueFrom"]["secretKeyRef"].is_mapping());
    let example = yaml("deploy/kubernetes/intake/secret.example.yaml");
    for var in [
        "UNASSIGN__INTAKE__BEARER_TOKEN_FILE",
        "UNASSIGN__INTAKE__HMAC_SECRET_FILE",
    ] {
        let path = str_of(&env_value(c, var).expect(var)["value"], var);
        let (volume, file) = mounted(spec, c, path).unwrap_or_else(|| panic!("{var} is mounted"));
        assert_eq!(
            volume["secret"]["secretName"], example["metadata"]["name"],
            "{var} comes from the intake's Secret"
        );
        assert!(
            example["stringData"][file.as_str()].is_string(),
            "the Secret has {file}"
        );
    }

    // Ports and probes as the settings say; the public port only behind the Service and Ingress.
    let port = |name: &str| {
        c["ports"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|p| p["name"].as_str() == Some(name))
            .unwrap_or_else(|| panic!("a {name} port"))
            .clone()
    };
    let (http, metrics) = (port("http"), port("metrics"));
    assert_eq!(
        http["containerPort"].as_u64(),
        Some(u64::from(settings.intake.listen.port()))
    );
    assert_eq!(
        metrics["containerPort"].as_u64(),
        Some(u64::from(settings.intake.metrics_listen.port()))
    );
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        assert_eq!(c[probe]["httpGet"]["path"].as_str(), Some(path));
        assert_eq!(c[probe]["httpGet"]["port"], metrics["name"], "{probe}");
    }
    let service = m.get("Service");
    assert!(selects(&service["spec"]["selector"], labels));
    assert_eq!(
        str_of(&service["metadata"]["name"], "Service name"),
        INTAKE_JOB,
        "the ServiceMonitor's job label is the Service name, which the intake alert groups by"
    );
    let service_port = |name: &str| {
        service["spec"]["ports"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|p| p["name"].as_str() == Some(name))
            .unwrap_or_else(|| panic!("the Service has a {name} port"))
            .clone()
    };
    assert_eq!(service_port("http")["targetPort"], http["name"]);
    assert_eq!(service_port("metrics")["targetPort"], metrics["name"]);
    let monitor = m.get("ServiceMonitor");
    assert!(selects(
        &monitor["spec"]["selector"]["matchLabels"],
        &service["metadata"]["labels"]
    ));
    assert_eq!(
        monitor["spec"]["endpoints"][0]["port"].as_str(),
        Some("metrics")
    );

    // The Ingress terminates TLS for its host and routes /v1/ to the public port only.
    let ingress = m.get("Ingress");
    let rule = &ingress["spec"]["rules"][0];
    let tls_hosts = &ingress["spec"]["tls"][0]["hosts"];
    assert!(
        tls_hosts.as_sequence().unwrap().contains(&rule["host"]),
        "TLS covers the Ingress host"
    );
    assert!(ingress["spec"]["tls"][0]["secretName"].is_string());
    let paths = rule["http"]["paths"].as_sequence().unwrap();
    assert_eq!(paths.len(), 1);
    assert_eq!(paths[0]["path"].as_str(), Some("/v1/"));
    let backend = &paths[0]["backend"]["service"];
    assert_eq!(backend["name"], service["metadata"]["name"]);
    assert_eq!(backend["port"]["name"].as_str(), Some("http"));

    // The NetworkPolicy covers the pods and lets in only the two ports.
    let policy = m.get("NetworkPolicy");
    assert!(selects(
        &policy["spec"]["podSelector"]["matchLabels"],
        labels
    ));
    let allowed: BTreeSet<&str> = policy["spec"]["ingress"]
        .as_sequence()
        .unwrap()
        .iter()
        .flat_map(|rule| rule["ports"].as_sequence().unwrap())
        .map(|p| str_of(&p["port"], "port"))
        .collect();
    assert_eq!(allowed, BTreeSet::from(["http", "metrics"]));

    let pdb = m.get("PodDisruptionBudget");
    assert!(selects(&pdb["spec"]["selector"]["matchLabels"], labels));
    let replicas = deployment["spec"]["replicas"].as_u64().unwrap_or(1);
    assert!(pdb["spec"]["minAvailable"].as_u64().unwrap() < replicas);
}

#[test]
fn the_compose_stack_hangs_together() {
    let compose = yaml("deploy/compose.yaml");
    let services = compose["services"].as_mapping().expect("services");
    for name in [
        "rabbitmq",
        "worker",
        "graph-sim",
        "intake",
        "prometheus",
        "grafana",
    ] {
        assert!(services.contains_key(name), "compose has {name}");
    }
    // Every bind-mounted file exists (relative to deploy/, the compose file's directory).
    for (name, service) in services {
        for volume in service["volumes"].as_sequence().into_iter().flatten() {
            let source = str_of(volume, "volume").split(':').next().unwrap();
            if source.starts_with('.') {
                assert!(
                    repo("deploy").join(source).exists(),
                    "{name:?} mounts {source}, which does not exist"
                );
            }
        }
    }
    let worker = &compose["services"]["worker"];
    assert!(
        worker["command"].is_null() || worker["command"][0].as_str() == Some("run"),
        "the worker runs `run`"
    );
    let config = str_of(&worker["environment"]["UNASSIGN_CONFIG"], "UNASSIGN_CONFIG");
    let mounted = worker["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|v| str_of(v, "volume").split(':').collect::<Vec<_>>())
        .find(|parts| parts[1] == config)
        .expect("the worker's config file is mounted");
    let settings = settings_with(
        &std::fs::read_to_string(repo("deploy").join(mounted[0])).unwrap(),
        mounted[0],
    );
    // Health: the worker's `probe` on its own listen port (a known one, not 0), as the image's
    // HEALTHCHECK does; graph-sim, from the same image, probes a path it serves instead.
    let probe = |service: &Yaml| -> Vec<String> {
        service["healthcheck"]["test"]
            .as_sequence()
            .expect("a healthcheck")
            .iter()
            .map(|v| str_of(v, "test").to_owned())
            .collect()
    };
    assert_eq!(
        probe(worker),
        ["CMD", "/usr/local/bin/unassign-worker", "probe"]
    );
    assert_ne!(settings.http.listen.port(), 0, "probe needs a known port");
    assert!(probe(&compose["services"]["graph-sim"]).contains(&"/_sim/stats".to_owned()));
    let dockerfile = std::fs::read_to_string(repo("deploy/Dockerfile")).unwrap();
    assert!(
        dockerfile.contains(r#"CMD ["/usr/local/bin/unassign-worker", "probe"]"#),
        "the image's HEALTHCHECK probes"
    );
    let stop = str_of(&worker["stop_grace_period"], "stop_grace_period");
    let stop: u64 = stop.strip_suffix('s').expect("seconds").parse().unwrap();
    assert!(
        stop > settings.worker.shutdown_grace.as_secs() + 5,
        "stop_grace_period {stop}s must exceed worker.shutdown_grace_secs + 5"
    );
    // Prometheus scrapes the worker under the job name the alerts select on, with the rules.
    let prometheus = yaml("deploy/compose/prometheus.yml");
    let jobs: Vec<&str> = prometheus["scrape_configs"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|j| str_of(&j["job_name"], "job_name"))
        .collect();
    assert!(jobs.contains(&JOB));
    assert_eq!(
        prometheus["scrape_configs"][0]["static_configs"][0]["targets"][0].as_str(),
        Some(format!("worker:{}", settings.http.listen.port()).as_str())
    );
    // The intake: its command, credentials files, grace, and its scrape job.
    let intake = &compose["services"]["intake"];
    assert_eq!(intake["command"][0].as_str(), Some("intake"));
    let env = &intake["environment"];
    let mounts: Vec<Vec<&str>> = intake["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|v| str_of(v, "volume").split(':').collect())
        .collect();
    for var in [
        "UNASSIGN__INTAKE__BEARER_TOKEN_FILE",
        "UNASSIGN__INTAKE__HMAC_SECRET_FILE",
    ] {
        let path = str_of(&env[var], var);
        assert!(
            mounts.iter().any(|m| m[1] == path),
            "the intake's {var} ({path}) is mounted"
        );
    }
    let stop = str_of(&intake["stop_grace_period"], "stop_grace_period");
    let stop: u64 = stop.strip_suffix('s').expect("seconds").parse().unwrap();
    assert!(stop > settings.intake.shutdown_grace.as_secs() + 5);
    let intake_job = prometheus["scrape_configs"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|j| j["job_name"].as_str() == Some(INTAKE_JOB))
        .expect("Prometheus scrapes the intake as unassign-intake");
    assert_eq!(
        intake_job["static_configs"][0]["targets"][0].as_str(),
        Some(format!("intake:{}", settings.intake.metrics_listen.port()).as_str())
    );
    let datasources = yaml("deploy/compose/grafana/datasources.yaml");
    assert_eq!(
        datasources["datasources"][0]["type"].as_str(),
        Some("prometheus")
    );
}

// ------------------------------------------------------------------------------ dashboard

fn dashboard() -> Json {
    serde_json::from_str(&read("deploy/grafana/unassign-worker.json")).expect("dashboard JSON")
}

/// Every `expr` in the dashboard (panel targets, variables, annotations), in document order.
fn exprs(value: &Json, out: &mut Vec<String>) {
    match value {
        Json::Object(map) => {
            for (key, v) in map {
                match (key.as_str(), v) {
                    ("expr", Json::String(expr)) => out.push(expr.clone()),
                    _ => exprs(v, out),
                }
            }
        }
        Json::Array(items) => items.iter().for_each(|v| exprs(v, out)),
        _ => {}
    }
}

/// What Grafana would send for an `expr`: its macros and the template variables filled in.
fn as_sent(expr: &str) -> String {
    let sent = expr
        .replace("$__rate_interval", "1m")
        .replace("$__interval", "15s")
        .replace("$__range", "1h")
        .replace("$intake_job", INTAKE_JOB)
        .replace("$job", JOB)
        .replace("$instance", ".*")
        .replace("$tenant", ".*");
    assert!(!sent.contains('$'), "an unknown variable is left in {sent}");
    sent
}

#[test]
fn the_dashboard_is_well_formed() {
    let d = dashboard();
    let panels = d["panels"].as_array().expect("panels");
    let mut ids = BTreeSet::new();
    for panel in panels {
        assert!(
            ids.insert(panel["id"].as_u64().expect("panel id")),
            "panel ids are unique"
        );
        let pos = &panel["gridPos"];
        assert!(
            pos["x"].as_u64().unwrap() + pos["w"].as_u64().unwrap() <= 24,
            "{} fits the grid",
            panel["title"]
        );
        if panel["type"] != "row" {
            assert_eq!(
                panel["datasource"]["uid"], "${DS_PROMETHEUS}",
                "{}: panels use the data source variable",
                panel["title"]
            );
            assert!(panel["targets"].as_array().is_some_and(|t| !t.is_empty()));
            // Only rates and counts may be stacked, and only rates shown per second (a budget is
            // a rate too): a gauge such as paused (0/1) drawn as stacked requests per second
            // misleads. A gauge beside rates needs an override of its own unit, matched by its
            // query.
            let defaults = &panel["fieldConfig"]["defaults"];
            let stacked = defaults["custom"]["stacking"]["mode"] == "normal";
            for target in panel["targets"].as_array().unwrap() {
                let expr = target["expr"].as_str().unwrap();
                if expr.contains("rate(") || expr.contains("_per_second") {
                    continue;
                }
                assert!(
                    !stacked || expr.contains("increase("),
                    "{}: stacks a gauge: {expr}",
                    panel["title"]
                );
                let own_unit = panel["fieldConfig"]["overrides"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|o| {
                        o["matcher"]["id"] == "byFrameRefID"
                            && o["matcher"]["options"] == target["refId"]
                    })
                    .flat_map(|o| o["properties"].as_array().unwrap())
                    .any(|p| p["id"] == "unit");
                assert!(
                    defaults["unit"] != "reqps" || own_unit,
                    "{}: shows the gauge {expr} per second",
                    panel["title"]
                );
            }
        }
    }
    let variables = d["templating"]["list"].as_array().unwrap();
    assert!(
        variables
            .iter()
            .any(|v| v["name"] == "DS_PROMETHEUS" && v["type"] == "datasource"),
        "a DS_PROMETHEUS data source variable"
    );
    let mut all = Vec::new();
    exprs(&d, &mut all);
    assert!(all.len() >= 20, "found only {} queries", all.len());
    for expr in &all {
        as_sent(expr);
        // Range vectors use Grafana's intervals, never a fixed window that breaks at other scrape
        // intervals.
        for window in expr.split('[').skip(1) {
            let window = window.split(']').next().unwrap();
            assert!(
                window == "$__rate_interval" || window == "$__range" || window == "$__interval",
                "{expr}: use $__rate_interval, not [{window}]"
            );
        }
    }
    for metric in [
        "unassign_jobs_total",
        "unassign_dead_letters_total",
        "unassign_graph_requests_total",
        "unassign_graph_request_duration_seconds_bucket",
        "unassign_job_duration_seconds_bucket",
        "unassign_retries_total",
        "unassign_throttled",
        "unassign_rate_limit_per_second",
        "unassign_read_rate_limit_per_second",
        "unassign_inflight_jobs",
        "unassign_amqp_connected",
        "unassign_amqp_reconnects_total",
        "unassign_token_requests_total",
        "unassign_queue_messages",
        "unassign_build_info",
        "unassign_tenant_paused",
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
        "unassign_intake_requests_total",
        "unassign_intake_request_duration_seconds_bucket",
        "unassign_intake_messages_published_total",
        "unassign_intake_amqp_connected",
    ] {
        assert!(
            all.iter().any(|e| e.contains(metric)),
            "the dashboard shows {metric}"
        );
    }
    // Lookups and unassigns apart: calls, budgets and latency.
    for operation in [
        "operation=\"unassign\"",
        "operation=\"list\"",
        "by (operation, le)",
    ] {
        assert!(
            all.iter().any(|e| e.contains(operation)),
            "the dashboard separates Graph operations: {operation}"
        );
    }
    for q in [
        "histogram_quantile(0.5,",
        "histogram_quantile(0.95,",
        "histogram_quantile(0.99,",
    ] {
        assert!(all.iter().any(|e| e.contains(q)), "the dashboard has {q}");
    }
}

/// A Prometheus server of its own: free loopback port, temporary storage, killed when dropped
/// (a failing assertion included).
struct Prometheus {
    child: Child,
    dir: PathBuf,
    url: String,
}

impl Prometheus {
    /// Scrapes the worker at `worker` as job `unassign-worker` and the intake at `intake` as
    /// `unassign-intake`.
    fn start(worker: std::net::SocketAddr, intake: std::net::SocketAddr) -> Prometheus {
        let dir = std::env::temp_dir().join(format!("unassign-prom-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
                 rule_files:\n  - {rules}\n\
                 scrape_configs:\n  - job_name: {JOB}\n    static_configs:\n      - targets: ['{worker}']\n\
                 \x20 - job_name: {INTAKE_JOB}\n    static_configs:\n      - targets: ['{intake}']\n",
                rules = repo("deploy/prometheus/alerts.yaml").display(),
            ),
        )
        .unwrap();
        let port = common::free_port();
        let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
        let child = tool("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("prometheus starts");
        Prometheus {
            child,
            dir,
            url: format!("http://127.0.0.1:{port}"),
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }

    async fn wait_ready(&mut self) {
        let client = reqwest::Client::new();
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("prometheus exited ({status}):\n{}", self.log());
            }
            if let Ok(r) = client.get(format!("{}/-/ready", self.url)).send().await
                && r.status().is_success()
            {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "prometheus not ready:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// An instant query's result vector (an empty one on any error, so callers can poll).
    async fn query(&self, query: &str) -> Vec<Json> {
        let response = reqwest::Client::new()
            .get(format!("{}/api/v1/query", self.url))
            .query(&[("query", query)])
            .send()
            .await;
        let Ok(response) = response else {
            return Vec::new();
        };
        let body: Json = response.json().await.unwrap_or_default();
        assert_ne!(
            body["errorType"], "bad_data",
            "Prometheus refuses the query {query}: {}",
            body["error"]
        );
        body["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// The one sample value of an instant query, once it has one.
    async fn value(&self, query: &str) -> Option<f64> {
        let result = self.query(query).await;
        result.first()?["value"][1].as_str()?.parse().ok()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test]
async fn every_dashboard_query_returns_data_from_prometheus_scraping_a_worker() {
    // A device list makes graph-sim answer 404 for any other id.
    let known = [device(), device(), device()];
    let devices = std::env::temp_dir().join(format!("devices-{}.json", uuid::Uuid::new_v4()));
    let list: Vec<Json> = known
        .iter()
        .map(|id| serde_json::json!({"id": id, "serialNumber": format!("SN-{id}"), "userPrincipalName": "a@contoso.com"}))
        .collect();
    std::fs::write(&devices, Json::from(list).to_string()).unwrap();
    let sim = SimOptions {
        devices: Some(devices.clone()),
        ..sim_options()
    };
    let env = Env::start_with("observe", sim, |_| {}).await;
    // An intake beside the worker, for the dashboard's intake row.
    let tokens = common::TempFile::new("observability-intake-token-0123456789\n");
    let mut intake_settings = env.settings().clone();
    intake_settings.intake.listen = "127.0.0.1:0".parse().unwrap();
    intake_settings.intake.metrics_listen = "127.0.0.1:0".parse().unwrap();
    intake_settings.intake.bearer_token_file = Some(tokens.0.clone());
    let intake = unassign_worker::intake::Server::build(&intake_settings)
        .await
        .expect("the intake builds");
    let (intake_url, intake_metrics) = (intake.addr(), intake.metrics_addr());
    let intake_stop = tokio_util::sync::CancellationToken::new();
    let intake = tokio::spawn(intake.run(intake_stop.clone()));
    let mut prometheus = Prometheus::start(env.worker.http, intake_metrics);
    prometheus.wait_ready().await;

    // One throttled call (429, Retry-After 1 s) and its retry, then successes and a 404.
    env.sim.push_script([Scripted {
        status: 429,
        retry_after: Some("1".into()),
        delay_ms: 0,
    }]);
    env.broker.publish_request("obs-throttled", &known[0]).await;
    env.events.wait_for(1, WAIT).await;
    env.broker.publish_request("obs-ok-1", &known[1]).await;
    env.broker.publish_request("obs-ok-2", &known[2]).await;
    env.broker.publish_request("obs-gone", &device()).await;
    // A request by serial number: a lookup (`operation="list"`) before its unassign.
    let by_serial = serde_json::json!({"request_id": "obs-serial", "serial_number": format!("SN-{}", known[1])});
    env.broker
        .publish(by_serial.to_string().as_bytes(), Default::default())
        .await;
    env.events.wait_for(5, WAIT).await;
    env.dead.wait_for(1, WAIT).await;
    // After the worker's own jobs, so that the scripted 429 is theirs.
    let posted = eventually("a post through the intake", WAIT, || async {
        let response = reqwest::Client::new()
            .post(format!("http://{intake_url}/v1/requests"))
            .bearer_auth("observability-intake-token-0123456789")
            .header("content-type", "application/json")
            .body(
                serde_json::json!({"request_id": "obs-intake", "device_id": known[1]}).to_string(),
            )
            .send()
            .await
            .ok()?;
        (response.status() == 202).then_some(())
    });
    posted.await;

    // Prometheus has scraped what the worker counted.
    let selector = format!("job=\"{JOB}\"");
    for (query, at_least) in [
        (
            format!("sum(unassign_jobs_total{{{selector}, outcome=\"succeeded\"}})"),
            3.0,
        ),
        (
            format!("sum(unassign_jobs_total{{{selector}, outcome=\"failed\"}})"),
            1.0,
        ),
        (
            format!("sum(unassign_dead_letters_total{{{selector}, kind=\"device_not_found\"}})"),
            1.0,
        ),
        (
            format!("sum(unassign_graph_requests_total{{{selector}, status=\"429\"}})"),
            1.0,
        ),
        (
            format!("sum(unassign_graph_requests_total{{{selector}, status=\"404\"}})"),
            1.0,
        ),
        (
            format!("sum(unassign_graph_requests_total{{{selector}, operation=\"list\"}})"),
            1.0,
        ),
        (
            format!("max(process_resident_memory_bytes{{{selector}}})"),
            1.0,
        ),
        (
            format!("sum(unassign_retries_total{{{selector}, reason=\"throttled\"}})"),
            1.0,
        ),
        (
            format!("sum(unassign_token_requests_total{{{selector}, result=\"ok\"}})"),
            1.0,
        ),
        (
            format!("sum(unassign_job_duration_seconds_count{{{selector}}})"),
            5.0,
        ),
        (format!("max(up{{{selector}}})"), 1.0),
        (
            format!("sum(unassign_intake_messages_published_total{{job=\"{INTAKE_JOB}\"}})"),
            1.0,
        ),
    ] {
        eventually(&format!("{query} >= {at_least}"), WAIT, || async {
            prometheus
                .value(&query)
                .await
                .filter(|v| *v >= at_least)
                .map(|_| ())
        })
        .await;
    }

    // Every dashboard query answers with at least one series.
    let mut all = Vec::new();
    exprs(&dashboard(), &mut all);
    for expr in &all {
        let sent = as_sent(expr);
        eventually(&format!("a series from `{sent}`"), WAIT, || async {
            (!prometheus.query(&sent).await.is_empty()).then_some(())
        })
        .await;
    }
    // The dashboard's variables find the worker too.
    for (label, query) in [
        ("job", "unassign_build_info"),
        ("instance", "unassign_build_info"),
        ("tenant", "unassign_jobs_total"),
    ] {
        let result = prometheus.query(query).await;
        assert!(
            result.iter().any(|s| s["metric"][label].is_string()),
            "label_values({query}, {label}) finds a value"
        );
    }

    // Every alert rule evaluates without error against the real series.
    let client = reqwest::Client::new();
    eventually("every rule evaluated with health ok", WAIT, || async {
        let body: Json = client
            .get(format!("{}/api/v1/rules", prometheus.url))
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        let rules: Vec<&Json> = body["data"]["groups"]
            .as_array()?
            .iter()
            .flat_map(|g| g["rules"].as_array().into_iter().flatten())
            .collect();
        if rules.len() != alert_rules().len() {
            return None;
        }
        for rule in &rules {
            match rule["health"].as_str() {
                Some("ok") => {}
                Some("unknown") => return None,
                _ => panic!(
                    "rule {} fails to evaluate: {}",
                    rule["name"], rule["lastError"]
                ),
            }
        }
        Some(())
    })
    .await;

    drop(prometheus);
    intake_stop.cancel();
    intake.await.unwrap().expect("the intake stops cleanly");
    env.finish().await;
    let _ = std::fs::remove_file(devices);
}
