//! The command line (CONTRACT section 1): clap definitions and dispatch; each command lives in
//! its own file, as one `Command` variant and one module. Exit codes: 0 success, 1 runtime
//! failure, 2 usage or configuration error.

mod check;
mod dlq;
mod enqueue;
mod output;
mod probe;
mod progress;

use std::{ffi::OsString, io::Write as _, path::PathBuf, process::ExitCode};

use anyhow::Context as _;
use clap::{CommandFactory, Parser, Subcommand};
use lapin::Connection;
use tokio_util::sync::CancellationToken;

use crate::{
    amqp::{self, TopologyError},
    config::{ConfigError, LogFormat, Settings},
    telemetry,
    worker::{App, RunError},
};

const NAME: &str = "unassign-worker";

/// Shown under every `--help` (and `-h`): how to read the exit code.
const EXIT_CODES: &str =
    "Exit codes: 0 success, 1 runtime failure, 2 usage or configuration error.";

/// The rest of the top-level `--help`: examples and the environment an operator sets.
const LONG_HELP: &str = "\
Examples:
  unassign-worker check
  unassign-worker run --config /etc/unassign-worker/config.toml
  unassign-worker enqueue --device-id 7b7c4c1e-6f5a-4c39-9a43-2b1e5b0c1d2e --reason offboarding
  unassign-worker enqueue --user leaver@contoso.com --requested-by workday
  unassign-worker enqueue --file leavers.csv
  unassign-worker dlq list -o json
  unassign-worker dlq replay --error-kind device_not_found --dry-run
  unassign-worker probe
  unassign-worker completions bash > ~/.local/share/bash-completion/completions/unassign-worker

Exit codes:
  0  success
  1  runtime failure: broker or Graph unreachable, a check failed, a probe not answered 200
  2  usage or configuration error: the message names the flag or the key

Environment:
  UNASSIGN_CONFIG               the configuration file (as --config)
  UNASSIGN__<SECTION>__<KEY>    any setting, e.g. UNASSIGN__WORKER__CONCURRENCY=32
  AMQP_URL                      the broker (amqp:// or amqps://; a comma-separated list for a cluster)
  AZURE_TENANT_ID, AZURE_CLIENT_ID
                                the app registration
  AZURE_CLIENT_SECRET (or AZURE_CLIENT_SECRET_FILE), AZURE_CLIENT_CERTIFICATE_PATH,
  AZURE_FEDERATED_TOKEN_FILE    its credential, one of them
  AZURE_AUTHORITY_HOST          the token authority (a national cloud)
  RUST_LOG                      log filter, overrides log.level

Every command and its output fields: docs/cli.md.";

#[derive(Parser, Debug)]
#[command(
    name = NAME,
    version,
    about = "Unassigns users from Windows Autopilot devices, one RabbitMQ job at a time",
    after_help = EXIT_CODES,
    after_long_help = LONG_HELP,
)]
pub struct Cli {
    /// The configuration file (TOML), layered over the built-in defaults and under the
    /// UNASSIGN__* and standard variables.
    // An OsString, not a PathBuf, whose parser refuses an empty value: an empty UNASSIGN_CONFIG
    // means no file, as it always has (see `config_file`).
    #[arg(
        long,
        global = true,
        env = "UNASSIGN_CONFIG",
        value_name = "PATH",
        value_hint = clap::ValueHint::FilePath
    )]
    config: Option<OsString>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Consume requests, call Graph, publish outcomes, serve /metrics, /healthz, /readyz.
    #[command(after_help = EXIT_CODES)]
    Run,
    /// Publish one request (--device-id, --serial-number or --user) or a file of them (--file),
    /// with publisher confirms.
    #[command(after_help = enqueue::EXAMPLES)]
    Enqueue(enqueue::EnqueueArgs),
    /// Inspect and replay the dead-letter queue.
    #[command(after_help = EXIT_CODES)]
    Dlq {
        #[command(subcommand)]
        command: dlq::DlqCommand,
    },
    /// Serve the HTTP intake: webhooks in, requests published with confirms (docs/intake.md).
    #[command(after_help = EXIT_CODES)]
    Intake,
    /// Validate the configuration, reach the broker, obtain a token for each tenant: every
    /// check runs and is reported.
    #[command(after_help = check::EXIT_CODES)]
    Check(check::CheckArgs),
    /// Ask the worker's HTTP server whether it is ready (or alive): exit 0 on 200, else 1. For
    /// container health checks.
    #[command(after_help = probe::EXAMPLES)]
    Probe(probe::ProbeArgs),
    /// Print a shell completion script.
    #[command(after_help = COMPLETION_HELP)]
    Completions {
        /// The shell to complete for.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// A local Microsoft Graph + token endpoint simulator for demos, tests and load tests.
    #[cfg(feature = "graph-sim")]
    #[command(after_help = EXIT_CODES)]
    GraphSim(crate::sim::SimOptions),
}

const COMPLETION_HELP: &str = "\
Install:
  bash  unassign-worker completions bash > ~/.local/share/bash-completion/completions/unassign-worker
  zsh   unassign-worker completions zsh > ~/.zfunc/_unassign-worker   (with fpath+=~/.zfunc before compinit)
  fish  unassign-worker completions fish > ~/.config/fish/completions/unassign-worker.fish";

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
    /// The command has already reported the failure itself (on stdout, in the chosen format);
    /// only this one-line summary follows on stderr, so nothing is said twice.
    #[error("{summary}")]
    Reported { code: u8, summary: String },
}

impl CliError {
    fn exit_code(&self) -> u8 {
        match self {
            Self::Usage(_) | Self::Config(_) => 2,
            Self::Run(e) => e.exit_code(),
            Self::Runtime(_) => 1,
            Self::Reported { code, .. } => *code,
        }
    }
}

impl From<TopologyError> for CliError {
    fn from(e: TopologyError) -> Self {
        RunError::Topology(e).into()
    }
}

impl Cli {
    fn config_file(&self) -> Option<PathBuf> {
        self.config
            .as_ref()
            .filter(|path| !path.is_empty())
            .map(PathBuf::from)
    }
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = cli.config_file();
    let runtime = tokio::runtime::Runtime::new().expect("starting the tokio runtime");
    match runtime.block_on(dispatch(cli.command, config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{NAME}: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

async fn dispatch(command: Command, config: Option<PathBuf>) -> Result<(), CliError> {
    match command {
        Command::Run => run(config).await,
        Command::Enqueue(args) => enqueue::enqueue(args, config).await,
        Command::Dlq { command } => dlq::dlq(command, config).await,
        Command::Check(args) => check::check(args, config).await,
        Command::Probe(args) => probe::probe(args, config).await,
        Command::Intake => intake(config).await,
        Command::Completions { shell } => {
            // Into a buffer first: clap_complete panics on a failed write (`| head`).
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), NAME, &mut script);
            std::io::stdout()
                .write_all(&script)
                .context("writing the completion script")?;
            Ok(())
        }
        #[cfg(feature = "graph-sim")]
        Command::GraphSim(options) => {
            telemetry::init(LogFormat::Text, "info")?;
            let shutdown = CancellationToken::new();
            crate::shutdown::on_signal(shutdown.clone(), std::time::Duration::from_secs(5));
            Ok(crate::sim::run(options, shutdown).await?)
        }
    }
}

async fn run(config: Option<PathBuf>) -> Result<(), CliError> {
    let settings = Settings::load(config)?;
    telemetry::init(settings.log.format, &settings.log.level)?;
    let grace = settings.worker.shutdown_grace;
    let app = App::build(settings).await?;
    tracing::info!(http = %app.http_addr(), "serving /metrics, /healthz, /readyz");
    let shutdown = CancellationToken::new();
    crate::shutdown::on_signal(shutdown.clone(), grace);
    Ok(app.run(shutdown).await?)
}

async fn intake(config: Option<PathBuf>) -> Result<(), CliError> {
    let settings = Settings::load(config)?;
    telemetry::init(settings.log.format, &settings.log.level)?;
    let grace = settings.intake.shutdown_grace;
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
    let name = format!("{NAME}/{command}");
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

    /// Every flag and positional of every command says what it is for in `--help`.
    #[test]
    fn every_argument_has_help() {
        fn walk(command: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in command.get_arguments() {
                let builtin = ["help", "version"].contains(&arg.get_id().as_str());
                if !builtin && arg.get_help().is_none() && !arg.is_hide_set() {
                    missing.push(format!("{path} {}", arg.get_id()));
                }
            }
            for sub in command.get_subcommands() {
                if sub.get_about().is_none() {
                    missing.push(format!("{path} {} (about)", sub.get_name()));
                }
                walk(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let mut missing = Vec::new();
        walk(&Cli::command(), "unassign-worker", &mut missing);
        assert!(missing.is_empty(), "no help text: {missing:#?}");
    }

    #[test]
    fn config_is_global() {
        for args in [
            &["--config", "a.toml", "run"][..],
            &["run", "--config", "a.toml"],
            &["dlq", "list", "--config", "a.toml"],
        ] {
            let cli = parse(args).unwrap();
            assert_eq!(cli.config_file(), Some("a.toml".into()), "{args:?}");
        }
        // As an empty UNASSIGN_CONFIG always has: no file.
        assert_eq!(parse(&["--config", "", "run"]).unwrap().config_file(), None);
    }

    #[test]
    fn enqueue_takes_one_source_and_only_its_own_options() {
        let guid = "7b7c4c1e-6f5a-4c39-9a43-2b1e5b0c1d2e";
        parse(&["enqueue", "--device-id", guid, "--reason", "left"]).unwrap();
        parse(&["enqueue", "--serial-number", "SN-1", "-o", "json"]).unwrap();
        parse(&["enqueue", "--user", "a@contoso.com", "--requested-by", "hr"]).unwrap();
        parse(&[
            "enqueue",
            "--file",
            "a.csv",
            "--format",
            "csv",
            "--skip-invalid",
        ])
        .unwrap();
        parse(&["enqueue", "--file", "-"]).unwrap();
        for bad in [
            &["enqueue"][..],
            &["enqueue", "--device-id", guid, "--file", "a.csv"],
            &["enqueue", "--device-id", guid, "--serial-number", "SN-1"],
            &[
                "enqueue",
                "--user",
                "a@contoso.com",
                "--serial-number",
                "SN-1",
            ],
            &["enqueue", "--file", "a.csv", "--reason", "x"],
            &["enqueue", "--file", "a.csv", "--request-id", "x"],
            &["enqueue", "--device-id", guid, "--skip-invalid"],
            &["enqueue", "--device-id", guid, "--format", "csv"],
            &["enqueue", "--user", "a@contoso.com", "--format", "csv"],
            &["enqueue", "--device-id", guid, "-o", "yaml"],
            &["dlq", "list", "--limit", "0"],
            &["dlq", "list", "--json", "-o", "text"],
            &["dlq", "replay", "--error-kind", "device_not_fund"],
            &["probe", "--healthz", "--path", "/metrics"],
            &["probe", "--path", "metrics"],
            &["completions", "tcsh"],
        ] {
            let e = parse(bad).err().unwrap_or_else(|| panic!("{bad:?} parsed"));
            assert_ne!(e.kind(), ErrorKind::DisplayHelp, "{bad:?}");
            assert_eq!(e.exit_code(), 2, "{bad:?}");
        }
    }

    /// `--error-kind` offers exactly the kinds `dlq list` can show.
    #[test]
    fn error_kinds_are_listed_by_clap() {
        let command = Cli::command();
        let replay = command
            .find_subcommand("dlq")
            .and_then(|dlq| dlq.find_subcommand("replay"))
            .unwrap();
        let kind = replay
            .get_arguments()
            .find(|a| a.get_id() == "error_kind")
            .unwrap();
        let offered: Vec<String> = kind
            .get_possible_values()
            .iter()
            .map(|v| v.get_name().to_owned())
            .collect();
        assert_eq!(offered, crate::ops::dlq::known_kinds());
    }
}
