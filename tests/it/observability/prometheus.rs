//! The dashboard and the alert rules against real data: a Prometheus of its own scrapes a worker
//! and an intake that have done throttled, successful, failed and looked-up jobs; every dashboard
//! query and variable then finds a series, and every alert rule evaluates without error.

use std::{
    process::{Child, Stdio},
    time::Duration,
};

use unassign_worker::sim::{Scripted, SimOptions};

use super::*;
use crate::common::{self, Env, device, eventually, sim_options};

const WAIT: Duration = Duration::from_secs(30);

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
