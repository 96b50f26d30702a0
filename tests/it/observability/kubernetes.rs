//! The Kubernetes kit built: `kustomize build` of the worker's base, of the example overlay with
//! the monitoring component and of the intake's kit, each validated against the Kubernetes API
//! schemas of the oldest and newest supported versions, with the recommended labels; and the
//! runbook base URL and the scrape job, set once, reaching every rule through the component and
//! through scripts/render-alerts.sh alike.

use std::process::Stdio;

use super::*;

/// The Kubernetes versions whose API schemas the built kit must pass: the oldest one the kit
/// supports and the newest kubernetes-validate ships.
const KUBERNETES_VERSIONS: [&str; 2] = ["1.29.0", "1.37.0"];

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
