//! The operator kit under deploy/: the alert rules through promtool, the Grafana dashboard's
//! queries against a real Prometheus scraping a real worker, every YAML file parsed and
//! cross-checked (probes, selectors, grace periods, the PrometheusRule mirroring alerts.yaml), and
//! the Kubernetes kit built by kustomize with and without its monitoring component and validated
//! against the Kubernetes API schemas.
//!
//! Needs `promtool` and `prometheus` (scripts/ensure-prometheus.sh), `kubectl` or `kustomize`, and
//! `kubernetes-validate` (scripts/ensure-k8s-tools.sh) on PATH: scripts/test.sh installs them.
//!
//! This file holds what the files below share: where the kit lives and the names it uses, the
//! readers of its files (YAML, the worker's settings, the Kubernetes objects as written, the
//! dashboard's queries) and the external tools.

mod alerts;
mod compose;
mod dashboard;
mod intake_manifests;
mod kubernetes;
mod manifests;
mod prometheus;

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::Command,
};

use figment::{
    Figment,
    providers::{Format, Toml},
};
use serde::Deserialize;
use serde_json::Value as Json;
use serde_norway::Value as Yaml;
use unassign_worker::config::Settings;

/// The scrape job name the alert rules select on (a placeholder an operator may set).
const JOB: &str = "unassign-worker";
/// The runbook base URL deploy/prometheus/alerts.yaml ships with, for operators to set
/// (docs/deploy.md): every runbook_url is this, `#` and the alert's name in lower case.
const RUNBOOK_BASE: &str = "https://runbook.invalid/unassign-worker";
/// The kustomize base, which needs no CRD.
const KUSTOMIZE_BASE: &str = "deploy/kubernetes";
/// The opt-in component with the Prometheus operator's objects.
const MONITORING: &str = "deploy/kubernetes/components/monitoring";
/// The example overlay that adds the component, with its settings.
const OVERLAY: &str = "deploy/overlays/monitoring";
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

fn alert_rules() -> Vec<Yaml> {
    let rules = yaml("deploy/prometheus/alerts.yaml");
    rules["groups"]
        .as_sequence()
        .expect("groups")
        .iter()
        .flat_map(|g| g["rules"].as_sequence().expect("rules").clone())
        .collect()
}

// ------------------------------------------------------------------------------ manifests

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
