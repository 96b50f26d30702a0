//! End-to-end tests of the simulator over HTTP.

use clap::Parser;
use reqwest::{Client, Response, StatusCode};
use serde_json::Value;
use uuid::Uuid;

use super::*;

mod graph;
mod lists;
mod token;

const TENANT: &str = "11111111-2222-3333-4444-555555555555";
const OTHER_TENANT: &str = "99999999-2222-3333-4444-555555555555";
const DEVICE: &str = "aaaaaaaa-bbbb-cccc-dddd-000000000001";
const UNKNOWN_DEVICE: &str = "aaaaaaaa-bbbb-cccc-dddd-ffffffffffff";

struct Harness {
    sim: Sim,
    http: Client,
}

impl Harness {
    async fn start(opts: SimOptions) -> Harness {
        Harness {
            sim: Sim::start(opts).await.unwrap(),
            http: Client::new(),
        }
    }

    async fn token_request(&self, tenant: &str, overrides: &[(&str, &str)]) -> Response {
        let client_id = SimOptions::default().client_id;
        let mut form = vec![
            ("grant_type", "client_credentials"),
            ("client_id", client_id.as_str()),
            ("client_secret", "sim-secret"),
            ("scope", "https://graph.microsoft.com/.default"),
        ];
        form.retain(|(k, _)| !overrides.iter().any(|(o, _)| o == k));
        form.extend(overrides.iter().filter(|(_, v)| !v.is_empty()));
        let url = format!("{}/{tenant}/oauth2/v2.0/token", self.sim.authority());
        self.http.post(url).form(&form).send().await.unwrap()
    }

    async fn token_for(&self, tenant: &str) -> String {
        let response = self.token_request(tenant, &[]).await;
        assert_eq!(response.status(), StatusCode::OK);
        let body: Value = response.json().await.unwrap();
        body["access_token"].as_str().unwrap().to_owned()
    }

    async fn token(&self) -> String {
        self.token_for(TENANT).await
    }

    async fn unassign(&self, token: &str, id: &str) -> Response {
        let url = format!(
            "{}/deviceManagement/windowsAutopilotDeviceIdentities/{id}/unassignUserFromDevice",
            self.sim.base_url()
        );
        self.http.post(url).bearer_auth(token).send().await.unwrap()
    }

    async fn get(&self, token: &str, url: &str) -> Response {
        self.http.get(url).bearer_auth(token).send().await.unwrap()
    }

    fn list_url(&self, query: &str) -> String {
        format!(
            "{}/deviceManagement/windowsAutopilotDeviceIdentities{query}",
            self.sim.base_url()
        )
    }
}

async fn error_of(response: Response) -> Value {
    response.json::<Value>().await.unwrap()["error"].take()
}

fn retry_after(response: &Response) -> Option<&str> {
    response
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap())
}

fn devices_file(devices: &[Value]) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!("graph-sim-{}.jsonl", Uuid::new_v4()));
    let lines: Vec<String> = devices.iter().map(Value::to_string).collect();
    std::fs::write(&path, lines.join("\n")).unwrap();
    path
}

#[test]
fn cli_parses_repeatable_options() {
    let opts = SimOptions::try_parse_from([
        "graph-sim",
        "--error-rate=503=0.05",
        "--error-rate",
        "429=0.1",
        "--outage=10..40",
        "--outage=50.5..60",
        "--retry-after=http-date",
    ])
    .unwrap();
    assert_eq!(opts.error_rates, [(503, 0.05), (429, 0.1)]);
    assert_eq!(opts.outages, [(10.0, 40.0), (50.5, 60.0)]);
    assert_eq!(opts.retry_after, RetryAfterMode::HttpDate);
    assert_eq!(opts.listen.port(), 8080);
    assert_eq!(SimOptions::default().listen.port(), 0);
    for bad in [
        "--error-rate=200=0.1",
        "--error-rate=503=2",
        "--outage=40..10",
    ] {
        assert!(
            SimOptions::try_parse_from(["graph-sim", bad]).is_err(),
            "{bad}"
        );
    }

    // Usable as a subcommand of the worker's CLI.
    #[derive(Parser)]
    enum Cli {
        GraphSim(SimOptions),
    }
    let Cli::GraphSim(opts) = Cli::parse_from(["worker", "graph-sim", "--forbid"]);
    assert!(opts.forbid);
}

#[tokio::test]
async fn run_serves_until_cancelled() {
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(run(SimOptions::default(), shutdown.clone()));
    shutdown.cancel();
    task.await.unwrap().unwrap();
}
