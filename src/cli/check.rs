//! `check`: configuration, broker and a token for each tenant profile. Every check that can run
//! runs, and each is reported once — a line each, or one JSON document — so an operator sees at
//! once everything that is wrong with a deployment, not only the first thing.

use std::{path::PathBuf, sync::Arc};

use lapin::{options::QueueDeclareOptions, types::FieldTable};
use serde::Serialize;

use super::{
    CliError,
    output::{OutputArg, print_json},
};
use crate::{
    amqp,
    auth::TokenSource,
    config::{Settings, TenantProfile},
    graph,
    metrics::Metrics,
};

pub const EXIT_CODES: &str = "\
Exit codes: 0 every check passed, 1 the broker or a token failed, 2 the configuration is invalid.";

#[derive(clap::Args, Debug)]
pub struct CheckArgs {
    #[command(flatten)]
    output: OutputArg,
}

/// The JSON document of `check -o json`.
#[derive(Debug, Serialize)]
struct Report {
    /// Every check passed.
    ok: bool,
    checks: Vec<Check>,
}

#[derive(Debug, Serialize)]
struct Check {
    /// `config`, `broker` or `token`.
    check: &'static str,
    /// The tenant profile a `config` or `token` check is about.
    #[serde(skip_serializing_if = "Option::is_none")]
    tenant: Option<String>,
    status: Status,
    detail: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
enum Status {
    Ok,
    Fail,
    /// Could not run: what it needs failed first.
    Skipped,
}

impl Check {
    fn new(check: &'static str, tenant: Option<String>, result: Result<String, String>) -> Self {
        let (status, detail) = match result {
            Ok(detail) => (Status::Ok, detail),
            Err(detail) => (Status::Fail, detail),
        };
        Self {
            check,
            tenant,
            status,
            detail,
        }
    }

    fn skipped(check: &'static str, why: &str) -> Self {
        Self {
            check,
            tenant: None,
            status: Status::Skipped,
            detail: why.to_owned(),
        }
    }

    fn line(&self) -> String {
        let status = match self.status {
            Status::Ok => "ok",
            Status::Fail => "FAIL",
            Status::Skipped => "skip",
        };
        let tenant = self
            .tenant
            .as_deref()
            .map(|t| format!("{t}: "))
            .unwrap_or_default();
        format!("{status:<4} {}: {tenant}{}", self.check, self.detail)
    }
}

/// Runs every check it can; fails (exit 1, or 2 for configuration) unless all pass.
pub async fn check(args: CheckArgs, config: Option<PathBuf>) -> Result<(), CliError> {
    let checks = run_checks(config).await;
    let failed = checks.iter().filter(|c| c.status == Status::Fail).count();
    let report = Report {
        ok: failed == 0,
        checks,
    };
    if args.output.is_json() {
        print_json(&report);
    } else {
        for check in &report.checks {
            println!("{}", check.line());
        }
    }
    if report.ok {
        return Ok(());
    }
    let config_failed = report
        .checks
        .iter()
        .any(|c| c.check == "config" && c.status == Status::Fail);
    Err(CliError::Reported {
        code: if config_failed { 2 } else { 1 },
        summary: format!("{failed} of {} checks failed", report.checks.len()),
    })
}

async fn run_checks(config: Option<PathBuf>) -> Vec<Check> {
    const NO_CONFIG: &str = "needs a valid configuration";
    let settings = match Settings::load(config) {
        Ok(s) => s,
        Err(e) => {
            return vec![
                Check::new("config", None, Err(e.0.to_string())),
                Check::skipped("broker", NO_CONFIG),
                Check::skipped("token", NO_CONFIG),
            ];
        }
    };
    // The broker needs none of the tenants' settings: it is checked even when they are wrong.
    let (profiles, mut checks) = match settings.tenant_profiles() {
        Ok(profiles) => {
            let checks = profiles
                .iter()
                .map(|p| {
                    Check::new(
                        "config",
                        Some(p.name.to_string()),
                        Ok(describe(&settings, p)),
                    )
                })
                .collect();
            (profiles, checks)
        }
        Err(e) => (
            Vec::new(),
            vec![Check::new("config", None, Err(e.0.to_string()))],
        ),
    };
    let broker = async {
        let result = check_broker(&settings)
            .await
            .map_err(|e| format!("{} — {e:#}", settings.amqp.redacted_url()));
        Check::new("broker", None, result)
    };
    let (broker, tokens) = tokio::join!(broker, check_tokens(&settings, profiles));
    checks.push(broker);
    if tokens.is_empty() {
        checks.push(Check::skipped("token", "needs valid tenant settings"));
    }
    checks.extend(tokens);
    checks
}

fn describe(settings: &Settings, p: &TenantProfile) -> String {
    let c = &p.credentials;
    format!(
        "tenant {}, client {}, {}, graph {}",
        c.tenant_id,
        c.client_id,
        c.credential.describe(),
        settings.graph.base_url
    )
}

/// One token per tenant profile, obtained the way the worker obtains it.
async fn check_tokens(settings: &Settings, profiles: Vec<TenantProfile>) -> Vec<Check> {
    let http = graph::http_client(settings.graph.timeout);
    let mut checks = Vec::new();
    for p in profiles {
        let (name, scope, authority) = (
            p.name.to_string(),
            p.credentials.scope.clone(),
            p.credentials.token_url(),
        );
        let metrics = Arc::new(Metrics::new());
        let tokens = TokenSource::new(http.clone(), p.credentials, p.name, metrics);
        let result = match tokens.token().await {
            Ok(_) => Ok(format!("obtained for {scope} from {authority}")),
            Err(e) => Err(e.to_string()),
        };
        checks.push(Check::new("token", Some(name), result));
    }
    checks
}

async fn check_broker(settings: &Settings) -> anyhow::Result<String> {
    let amqp = &settings.amqp;
    let (connection, node) = amqp::connect(amqp, "unassign-worker/check", 0).await?;
    let node = &amqp.url.labels()[node];
    let channel = connection.create_channel().await?;
    let passive = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let detail = match channel
        .queue_declare(amqp.queue.as_str().into(), passive, FieldTable::default())
        .await
    {
        Ok(q) => format!(
            "{node} reachable; queue {} has {} ready, {} consumer(s)",
            amqp.queue,
            q.message_count(),
            q.consumer_count()
        ),
        Err(_) => format!(
            "{node} reachable; queue {} not declared yet (run declares it)",
            amqp.queue
        ),
    };
    let _ = connection.close(200, "done".into()).await;
    Ok(detail)
}
