//! The Grafana dashboard (deploy/grafana/unassign-worker.json) as written: unique panel ids on
//! the grid, the data source variable, only rates stacked or shown per second, Grafana's own
//! range windows, and a query for every metric, Graph operation and latency quantile it should
//! show.

use super::*;

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
