//! `enqueue`: one request from flags, or many from a CSV / JSON Lines file. Both are validated
//! with the worker's own rules first and published with confirms, so nothing is put on the
//! queue that the worker would refuse, and nothing is reported sent that the broker did not take.

use std::{
    io::IsTerminal,
    path::{Path, PathBuf},
    time::Instant,
};

use anyhow::Context as _;
use indicatif::{ProgressBar, ProgressState, ProgressStyle};

use super::{CliError, connect, declare_topology, disconnect, operator_settings};
use crate::{
    amqp::Publisher,
    batch::{self, BadRow, Format, Parsed, Row},
    config::Settings,
    contract,
};

/// Bad rows printed before the rest are only counted.
const SHOWN_BAD_ROWS: usize = 50;

/// Exactly one of `--device-id` and `--file`; each one's companions conflict with the other
/// (clap's `requires` would not fire, since a conflicting required arg counts as satisfied).
#[derive(clap::Args, Debug)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["device_id", "file"])))]
pub struct EnqueueArgs {
    /// The windowsAutopilotDeviceIdentity id (a GUID).
    #[arg(long)]
    device_id: Option<String>,
    /// Correlation and idempotency key; a random one when absent.
    #[arg(long, conflicts_with = "file")]
    request_id: Option<String>,
    #[arg(long, conflicts_with = "file")]
    reason: Option<String>,
    #[arg(long, conflicts_with = "file")]
    requested_by: Option<String>,
    /// A CSV (header row; columns named like the request's JSON fields) or JSON Lines file.
    #[arg(long)]
    file: Option<PathBuf>,
    /// The file's format; by default from its extension (.csv, .jsonl, .ndjson).
    #[arg(long, value_enum, conflicts_with = "device_id")]
    format: Option<Format>,
    /// Publish the valid rows and report the invalid ones, instead of publishing nothing.
    #[arg(long, conflicts_with = "device_id")]
    skip_invalid: bool,
    #[arg(long)]
    config: Option<PathBuf>,
}

pub async fn enqueue(args: EnqueueArgs) -> Result<(), CliError> {
    let settings = operator_settings(args.config.clone())?;
    match (&args.device_id, &args.file) {
        (Some(device_id), None) => one(&settings, &args, device_id).await,
        (None, Some(file)) => from_file(&settings, file, args.format, args.skip_invalid).await,
        _ => unreachable!("clap requires exactly one of --device-id and --file"),
    }
}

/// `--device-id`: the request built from flags.
async fn one(settings: &Settings, args: &EnqueueArgs, device_id: &str) -> Result<(), CliError> {
    let request_id = args
        .request_id
        .clone()
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let body = serde_json::to_vec(&serde_json::json!({
        "request_id": request_id,
        "device_id": device_id,
        "reason": args.reason,
        "requested_by": args.requested_by,
    }))
    .expect("a JSON object serialises");
    // The worker's own validation, so nothing is published that it would refuse.
    contract::parse_request(&body, None).map_err(|e| CliError::Usage(e.message))?;
    let row = Row {
        line: 1,
        message_id: request_id.clone(),
        request_id,
        body,
    };
    publish(settings, std::slice::from_ref(&row), |_| {}).await?;
    println!(
        "enqueued request_id={} device_id={device_id}",
        row.request_id
    );
    Ok(())
}

/// `--file`: validate every row, refuse the file (exit 2) if any is bad unless told to skip
/// them, then publish with a progress display and a summary.
async fn from_file(
    settings: &Settings,
    path: &Path,
    format: Option<Format>,
    skip_invalid: bool,
) -> Result<(), CliError> {
    let format = format.or_else(|| Format::from_path(path)).ok_or_else(|| {
        CliError::Usage(format!(
            "cannot tell the format of {} from its extension: name it .csv, .jsonl or .ndjson, or pass --format",
            path.display()
        ))
    })?;
    let parsed = batch::read(path, format).map_err(|e| CliError::Usage(e.to_string()))?;
    report_parsed(&parsed, skip_invalid);
    if !parsed.bad.is_empty() && !skip_invalid {
        return Err(CliError::Usage(format!(
            "{} of {} rows are invalid; nothing was published (fix them, or pass --skip-invalid)",
            parsed.bad.len(),
            parsed.bad.len() + parsed.rows.len()
        )));
    }
    if parsed.rows.is_empty() {
        return Err(CliError::Usage(format!(
            "{} has no valid request to publish",
            path.display()
        )));
    }
    let started = Instant::now();
    let mut progress = Progress::new(parsed.rows.len());
    let published = publish(settings, &parsed.rows, |n| progress.update(n)).await;
    progress.finish();
    let published = published?;
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "published {published}, skipped {} in {seconds:.2} s ({:.0} requests/s)",
        parsed.bad.len(),
        published as f64 / seconds.max(f64::EPSILON)
    );
    Ok(())
}

/// Bad rows on stderr by line number (the first [`SHOWN_BAD_ROWS`]), and ignored columns.
fn report_parsed(parsed: &Parsed, skip_invalid: bool) {
    if !parsed.ignored_columns.is_empty() {
        eprintln!(
            "ignoring CSV column(s) that name no request field: {}",
            parsed.ignored_columns.join(", ")
        );
    }
    let verb = if skip_invalid { "skipped " } else { "" };
    for BadRow { line, reason } in parsed.bad.iter().take(SHOWN_BAD_ROWS) {
        eprintln!("{verb}line {line}: {reason}");
    }
    if parsed.bad.len() > SHOWN_BAD_ROWS {
        eprintln!(
            "… and {} more invalid rows",
            parsed.bad.len() - SHOWN_BAD_ROWS
        );
    }
}

/// Connects, declares the topology (as `run` would), and publishes `rows` with confirms.
async fn publish(
    settings: &Settings,
    rows: &[Row],
    mut progress: impl FnMut(usize),
) -> Result<usize, CliError> {
    let connection = connect(settings, "enqueue").await?;
    let published = async {
        declare_topology(&connection, settings).await?;
        let publisher = Publisher::open(&connection)
            .await
            .context("opening a confirm channel")?;
        let published =
            batch::publish_all(&publisher, &settings.amqp, rows, |_, n| progress(n)).await;
        // Closed here, not on drop, where it would race the connection's close.
        let _ = publisher.channel().close(200, "done".into()).await;
        Ok::<_, CliError>(published.map_err(anyhow::Error::from)?)
    }
    .await;
    disconnect(connection).await;
    published
}

/// A bar on a terminal; elsewhere (logs, CI) a plain line every 10 %.
enum Progress {
    Bar(ProgressBar),
    Lines { total: usize, reported: usize },
}

impl Progress {
    fn new(total: usize) -> Self {
        if !std::io::stderr().is_terminal() {
            return Self::Lines { total, reported: 0 };
        }
        let bar = ProgressBar::new(total as u64);
        let style =
            ProgressStyle::with_template("{bar:40} {pos}/{len} confirmed  {rate}  eta {eta}")
                .expect("a valid progress template")
                .with_key(
                    "rate",
                    |state: &ProgressState, w: &mut dyn std::fmt::Write| {
                        let _ = write!(w, "{:.0}/s", state.per_sec());
                    },
                );
        bar.set_style(style);
        Self::Bar(bar)
    }

    fn update(&mut self, confirmed: usize) {
        match self {
            Self::Bar(bar) => bar.set_position(confirmed as u64),
            Self::Lines { total, reported } => {
                let tenth = confirmed * 10 / (*total).max(1);
                if tenth > *reported {
                    *reported = tenth;
                    eprintln!("confirmed {confirmed}/{total} ({}%)", tenth * 10);
                }
            }
        }
    }

    fn finish(&self) {
        if let Self::Bar(bar) = self {
            bar.finish_and_clear();
        }
    }
}
