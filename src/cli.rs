//! The command line (CONTRACT section 1). Exit codes: 0 success, 1 runtime failure,
//! 2 usage or configuration error.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use lapin::{BasicProperties, options::QueueDeclareOptions, types::FieldTable};
use tokio_util::sync::CancellationToken;

use crate::{
    amqp::{self, Publisher, TopologyError},
    auth::TokenSource,
    config::{ConfigError, LogFormat, Settings},
    contract, graph,
    metrics::Metrics,
    sim, telemetry,
    worker::{App, RunError},
};

#[derive(Parser, Debug)]
#[command(
    name = "unassign-worker",
    version,
    about = "Unassigns users from Windows Autopilot devices, one RabbitMQ job at a time"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Consume requests, call Graph, publish outcomes, serve /metrics, /healthz, /readyz.
    Run {
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Publish one request, with publisher confirm.
    Enqueue(EnqueueArgs),
    /// Validate the configuration, reach the broker, obtain a token.
    Check {
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// A local Microsoft Graph + token endpoint simulator for demos, tests and load tests.
    GraphSim(sim::SimOptions),
}

#[derive(clap::Args, Debug)]
struct EnqueueArgs {
    /// The windowsAutopilotDeviceIdentity id (a GUID).
    #[arg(long)]
    device_id: String,
    /// Correlation and idempotency key; a random one when absent.
    #[arg(long)]
    request_id: Option<String>,
    #[arg(long)]
    reason: Option<String>,
    #[arg(long)]
    requested_by: Option<String>,
    #[arg(long)]
    config: Option<PathBuf>,
}

/// A command's failure and its exit code.
#[derive(Debug, thiserror::Error)]
enum CliError {
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Run(#[from] RunError),
    #[error("{0:#}")]
    Runtime(#[from] anyhow::Error),
}

impl CliError {
    fn exit_code(&self) -> u8 {
        match self {
            Self::Usage(_) | Self::Config(_) => 2,
            Self::Run(e) => e.exit_code(),
            Self::Runtime(_) => 1,
        }
    }
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Runtime::new().expect("starting the tokio runtime");
    match runtime.block_on(dispatch(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("unassign-worker: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

async fn dispatch(command: Command) -> Result<(), CliError> {
    match command {
        Command::Run { config } => run(config).await,
        Command::Enqueue(args) => enqueue(args).await,
        Command::Check { config } => check(config).await,
        Command::GraphSim(options) => {
            telemetry::init(LogFormat::Text, "info")?;
            let shutdown = CancellationToken::new();
            crate::shutdown::on_signal(shutdown.clone(), Duration::from_secs(5));
            Ok(sim::run(options, shutdown).await?)
        }
    }
}

async fn run(config: Option<PathBuf>) -> Result<(), CliError> {
    let settings = Settings::load(config)?;
    telemetry::init(settings.log.format, &settings.log.level)?;
    let grace = Duration::from_secs(settings.worker.shutdown_grace_secs);
    let app = App::build(settings).await?;
    tracing::info!(http = %app.http_addr(), "serving /metrics, /healthz, /readyz");
    let shutdown = CancellationToken::new();
    crate::shutdown::on_signal(shutdown.clone(), grace);
    Ok(app.run(shutdown).await?)
}

async fn enqueue(args: EnqueueArgs) -> Result<(), CliError> {
    let settings = Settings::load(args.config)?;
    telemetry::init(LogFormat::Text, "warn")?;
    let request_id = args
        .request_id
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let body = serde_json::to_vec(&serde_json::json!({
        "request_id": request_id,
        "device_id": args.device_id,
        "reason": args.reason,
        "requested_by": args.requested_by,
    }))
    .expect("a JSON object serialises");
    // The worker's own validation, so nothing is published that it would refuse.
    contract::parse_request(&body, None).map_err(|e| CliError::Usage(e.message))?;
    let amqp = &settings.amqp;
    let connection = amqp::connect(amqp, "unassign-worker/enqueue")
        .await
        .context("connecting to the broker")?;
    if amqp.declare_topology {
        let channel = connection
            .create_channel()
            .await
            .context("opening a channel")?;
        amqp::declare(&channel, amqp)
            .await
            .map_err(topology_error)?;
    }
    let publisher = Publisher::open(&connection)
        .await
        .context("opening a confirm channel")?;
    let properties = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_message_id(request_id.as_str().into());
    publisher
        .publish(&amqp.exchange, &amqp.routing_key, &body, properties, true)
        .await
        .context("publishing the request")?;
    let _ = connection.close(200, "done".into()).await;
    println!(
        "enqueued request_id={request_id} device_id={}",
        args.device_id
    );
    Ok(())
}

fn topology_error(e: TopologyError) -> CliError {
    RunError::Topology(e).into()
}

/// Prints one line per check; fails (exit 1, or 2 for configuration) unless all pass.
async fn check(config: Option<PathBuf>) -> Result<(), CliError> {
    let settings = match Settings::load(config) {
        Ok(s) => s,
        Err(e) => {
            println!("FAIL config: {}", e.0);
            return Err(e.into());
        }
    };
    let credentials = match settings.credentials() {
        Ok(c) => c,
        Err(e) => {
            println!("FAIL config: {}", e.0);
            return Err(e.into());
        }
    };
    println!(
        "ok   config: tenant {}, client {}, graph {}",
        credentials.tenant_id, credentials.client_id, settings.graph.base_url
    );
    let broker = check_broker(&settings).await;
    match &broker {
        Ok(detail) => println!("ok   broker: {detail}"),
        Err(e) => println!("FAIL broker: {} — {e:#}", settings.amqp.redacted_url()),
    }
    let http = graph::http_client(Duration::from_secs(settings.graph.timeout_secs));
    let scope = credentials.scope.clone();
    let tokens = TokenSource::new(http, credentials, std::sync::Arc::new(Metrics::new()));
    let token = tokens.token().await;
    match &token {
        Ok(_) => println!(
            "ok   token: obtained for {scope} from {}",
            settings.auth.authority_host
        ),
        Err(e) => println!("FAIL token: {e}"),
    }
    if broker.is_err() || token.is_err() {
        return Err(CliError::Runtime(anyhow::anyhow!("some checks failed")));
    }
    Ok(())
}

async fn check_broker(settings: &Settings) -> anyhow::Result<String> {
    let amqp = &settings.amqp;
    let connection = amqp::connect(amqp, "unassign-worker/check").await?;
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
            "{} reachable; queue {} has {} ready, {} consumer(s)",
            amqp.redacted_url(),
            amqp.queue,
            q.message_count(),
            q.consumer_count()
        ),
        Err(_) => format!(
            "{} reachable; queue {} not declared yet (run declares it)",
            amqp.redacted_url(),
            amqp.queue
        ),
    };
    let _ = connection.close(200, "done".into()).await;
    Ok(detail)
}
