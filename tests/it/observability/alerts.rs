//! The alert rules (deploy/prometheus/alerts.yaml): promtool checks them and runs their unit
//! tests; each has a severity, a `for:` and a runbook link to a heading of docs/operations.md, and
//! a test case where it fires and one where it stays quiet; the monitoring component's
//! PrometheusRule carries them unchanged.

use super::*;

/// The document whose headings the runbook URLs' anchors name.
const RUNBOOK_DOC: &str = "docs/operations.md";

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
