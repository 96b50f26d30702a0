//! The command line (CONTRACT section 1): clap definitions and dispatch; each command lives in
//! its own file. Exit codes: 0 success, 1 runtime failure, 2 usage or configuration error.

mod check;
mod dlq;
mod enqueue;

use std::{path::PathBuf, process::ExitCode, time::Duration};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use lapin::Connection;
use tokio_util::sync::CancellationToken;

use crate::{
    amqp::{self, TopologyError},
    config::{ConfigError, LogFormat, Settings},
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
    /// Publish one request (--device-id) or a file of them (--file), with publisher confirms.
    Enqueue(enqueue::EnqueueArgs),
    /// Inspect and replay the dead-letter queue.
    Dlq {
        #[command(subcommand)]
        command: dlq::DlqCommand,
    },
    /// Serve the HTTP intake: webhooks in, requests published with confirms (docs/intake.md).
    Intake {
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Validate the configuration, reach the broker, obtain a token.
    Check {
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// A local Microsoft Graph + token endpoint simulator for demos, tests and load tests.
    GraphSim(sim::SimOptions),
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

impl From<TopologyError> for CliError {
    fn from(e: TopologyError) -> Self {
        RunError::Topology(e).into()
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
        Command::Enqueue(args) => enqueue::enqueue(args).await,
        Command::Dlq { command } => dlq::dlq(command).await,
        Command::Intake { config } => intake(config).await,
        Command::Check { config } => check::check(config).await,
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

async fn intake(config: Option<PathBuf>) -> Result<(), CliError> {
    let settings = Settings::load(config)?;
    telemetry::init(settings.log.format, &settings.log.level)?;
    let grace = Duration::from_secs(settings.intake.shutdown_grace_secs);
    let server = crate::intake::Server::build(&settings).await?;
    tracing::info!(http = %server.metrics_addr(), "serving /metrics, /healthz, /readyz");
    let shutdown = CancellationToken::new();
    crate::shutdown::on_signal(shutdown.clone(), grace);
    Ok(server.run(shutdown).await?)
}

/// Settings for the operator commands, which need the broker but no credentials. Logs are
/// quiet so the output is the command's own: lapin's logs are off, because every broker error
/// reaches the operator as the command's error anyway (`RUST_LOG` still overrides).
fn operator_settings(config: Option<PathBuf>) -> Result<Settings, CliError> {
    let settings = Settings::load(config)?;
    telemetry::init(LogFormat::Text, "warn,lapin=off")?;
    Ok(settings)
}

/// Connects as `unassign-worker/<command>` (the name operators see in the broker UI).
async fn connect(settings: &Settings, command: &str) -> Result<Connection, CliError> {
    let name = format!("unassign-worker/{command}");
    let connected = amqp::connect(&settings.amqp, &name, 0).await;
    let broker = settings.amqp.redacted_url();
    let (connection, _) =
        connected.with_context(|| format!("connecting to the broker at {broker}"))?;
    Ok(connection)
}

/// Declares the topology unless `amqp.declare_topology` is off, as `run` does.
async fn declare_topology(connection: &Connection, settings: &Settings) -> Result<(), CliError> {
    if settings.amqp.declare_topology {
        let channel = connection
            .create_channel()
            .await
            .context("opening a channel")?;
        amqp::declare(&channel, &settings.amqp).await?;
        let _ = channel.close(200, "declared".into()).await;
    }
    Ok(())
}

/// Closes the connection politely; a failure here changes nothing already done.
async fn disconnect(connection: Connection) {
    let _ = connection.close(200, "done".into()).await;
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser, error::ErrorKind};

    use super::Cli;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(["unassign-worker"].iter().chain(args))
    }

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn enqueue_takes_one_source_and_only_its_own_options() {
        let guid = "7b7c4c1e-6f5a-4c39-9a43-2b1e5b0c1d2e";
        parse(&["enqueue", "--device-id", guid, "--reason", "left"]).unwrap();
        parse(&[
            "enqueue",
            "--file",
            "a.csv",
            "--format",
            "csv",
            "--skip-invalid",
        ])
        .unwrap();
        for bad in [
            &["enqueue"][..],
            &["enqueue", "--device-id", guid, "--file", "a.csv"],
            &["enqueue", "--file", "a.csv", "--reason", "x"],
            &["enqueue", "--file", "a.csv", "--request-id", "x"],
            &["enqueue", "--device-id", guid, "--skip-invalid"],
            &["enqueue", "--device-id", guid, "--format", "csv"],
            &["dlq", "list", "--limit", "0"],
        ] {
            let e = parse(bad).err().unwrap_or_else(|| panic!("{bad:?} parsed"));
            assert_ne!(e.kind(), ErrorKind::DisplayHelp, "{bad:?}");
            assert_eq!(e.exit_code(), 2, "{bad:?}");
        }
    }
}
