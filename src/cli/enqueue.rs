//! `enqueue`: one request from flags, or many from a CSV / JSON Lines file (or stdin). Both are
//! validated with the worker's own rules first and published with confirms, so nothing is put
//! on the queue that the worker would refuse, and nothing is reported sent that the broker did
//! not take.

use std::{
    io::Read,
    path::{Path, PathBuf},
    time::Instant,
};

use anyhow::Context as _;
use serde::Serialize;
use serde_json::{Map, Value};

use super::{
    CliError, connect, declare_topology, disconnect, operator_settings,
    output::{OutputArg, print_json},
    progress::Progress,
};
use crate::{
    amqp::Publisher,
    config::Settings,
    contract,
    ops::batch::{self, BadRow, Format, Parsed, Row},
};

pub const EXAMPLES: &str = "\
Examples:
  unassign-worker enqueue --device-id 7b7c4c1e-6f5a-4c39-9a43-2b1e5b0c1d2e --reason offboarding
  unassign-worker enqueue --serial-number 5CG1234XYZ --requested-by workday
  unassign-worker enqueue --user leaver@contoso.com -o json
  unassign-worker enqueue --file leavers.csv --skip-invalid
  export-leavers | unassign-worker enqueue --file - --format jsonl

Exit codes: 0 published, 1 the broker failed, 2 an invalid request or file (nothing published).";

/// Bad rows printed before the rest are only counted.
const SHOWN_BAD_ROWS: usize = 50;

/// Exactly one of the three targets and `--file`; each one's companions conflict with the
/// other (clap's `requires` would not fire, since a conflicting required arg counts as
/// satisfied).
#[derive(clap::Args, Debug)]
#[command(group(
    clap::ArgGroup::new("source")
        .required(true)
        .args(["device_id", "serial_number", "user", "file"])
))]
pub struct EnqueueArgs {
    /// The windowsAutopilotDeviceIdentity id (a GUID).
    #[arg(long, value_name = "GUID")]
    device_id: Option<String>,
    /// Resolve the device by its serial number (exact, case-insensitive).
    #[arg(long, value_name = "SERIAL")]
    serial_number: Option<String>,
    /// Unassign every Autopilot device assigned to this user principal name.
    #[arg(long, value_name = "UPN")]
    user: Option<String>,
    /// Correlation and idempotency key; a random one when absent.
    #[arg(long, value_name = "ID", conflicts_with = "file")]
    request_id: Option<String>,
    /// Why, for the audit trail: copied into the outcome event (at most 1024 characters).
    #[arg(long, value_name = "TEXT", conflicts_with = "file")]
    reason: Option<String>,
    /// Who asked (a system or a person), copied into the outcome event (at most 256 characters).
    #[arg(long, value_name = "TEXT", conflicts_with = "file")]
    requested_by: Option<String>,
    /// A CSV (header row; columns named like the request's JSON fields) or JSON Lines file;
    /// `-` reads stdin.
    #[arg(long, value_name = "PATH")]
    file: Option<PathBuf>,
    /// The file's format; by default from its extension (.csv, .jsonl, .ndjson), and for stdin
    /// from its first character (`{`: JSON Lines, else CSV).
    #[arg(long, value_enum, conflicts_with_all = ["device_id", "serial_number", "user"])]
    format: Option<Format>,
    /// Publish the valid rows and report the invalid ones, instead of publishing nothing.
    #[arg(long, conflicts_with_all = ["device_id", "serial_number", "user"])]
    skip_invalid: bool,
    #[command(flatten)]
    output: OutputArg,
}

/// The JSON document of `enqueue -o json`.
#[derive(Debug, Serialize)]
struct Report {
    published: usize,
    /// Invalid rows left out (`--skip-invalid`); they are listed on stderr.
    skipped: usize,
    /// The request's id: a single request only.
    #[serde(skip_serializing_if = "Option::is_none")]
    request_id: Option<String>,
    /// Connecting, publishing and every confirm: what the text's rate is computed from.
    seconds: f64,
}

pub async fn enqueue(args: EnqueueArgs, config: Option<PathBuf>) -> Result<(), CliError> {
    let settings = operator_settings(config)?;
    let (report, text) = match &args.file {
        Some(file) => from_file(&settings, file, args.format, args.skip_invalid).await?,
        None => one(&settings, &args).await?,
    };
    if args.output.is_json() {
        print_json(&report);
    } else {
        println!("{text}");
    }
    Ok(())
}

/// The request's target field, as the request names it, and its value.
fn target(args: &EnqueueArgs) -> (&'static str, &str) {
    match (&args.device_id, &args.serial_number, &args.user) {
        (Some(id), _, _) => ("device_id", id),
        (_, Some(serial), _) => ("serial_number", serial),
        (_, _, Some(upn)) => ("user_principal_name", upn),
        _ => unreachable!("clap requires one of --device-id, --serial-number, --user, --file"),
    }
}

/// A single request built from flags; its report and text line.
async fn one(settings: &Settings, args: &EnqueueArgs) -> Result<(Report, String), CliError> {
    let request_id = args
        .request_id
        .clone()
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let (field, value) = target(args);
    let mut request = Map::new();
    request.insert("request_id".into(), request_id.clone().into());
    request.insert(field.into(), value.into());
    for (name, text) in [
        ("reason", &args.reason),
        ("requested_by", &args.requested_by),
    ] {
        if let Some(text) = text {
            request.insert(name.into(), text.clone().into());
        }
    }
    let body = serde_json::to_vec(&Value::Object(request)).expect("a JSON object serialises");
    // The worker's own validation, so nothing is published that it would refuse.
    contract::parse_request(&body, None).map_err(|e| CliError::Usage(e.message))?;
    let row = Row {
        line: 1,
        message_id: request_id.clone(),
        request_id,
        body,
    };
    let started = Instant::now();
    publish(settings, std::slice::from_ref(&row), |_| {}).await?;
    let text = format!("enqueued request_id={} {field}={value}", row.request_id);
    let report = Report {
        published: 1,
        skipped: 0,
        request_id: Some(row.request_id),
        seconds: started.elapsed().as_secs_f64(),
    };
    Ok((report, text))
}

/// `--file`: validate every row, refuse the file (exit 2) if any is bad unless told to skip
/// them, then publish with a progress display; its report and summary line.
async fn from_file(
    settings: &Settings,
    path: &Path,
    format: Option<Format>,
    skip_invalid: bool,
) -> Result<(Report, String), CliError> {
    let (name, parsed) = if path == Path::new("-") {
        let mut content = Vec::new();
        std::io::stdin()
            .read_to_end(&mut content)
            .map_err(|e| CliError::Usage(format!("cannot read stdin: {e}")))?;
        let format = format.unwrap_or_else(|| Format::sniff(&content));
        ("stdin".to_owned(), batch::parse(content.as_slice(), format))
    } else {
        let format = format.or_else(|| Format::from_path(path)).ok_or_else(|| {
            CliError::Usage(format!(
                "cannot tell the format of {} from its extension: name it .csv, .jsonl or .ndjson, or pass --format",
                path.display()
            ))
        })?;
        (path.display().to_string(), batch::read(path, format))
    };
    let parsed = parsed.map_err(|e| CliError::Usage(e.to_string()))?;
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
            "{name} has no valid request to publish"
        )));
    }
    let started = Instant::now();
    let mut progress = Progress::new(Some(parsed.rows.len()), "confirmed");
    let published = publish(settings, &parsed.rows, |n| progress.update(n)).await;
    progress.finish();
    let published = published?;
    let seconds = started.elapsed().as_secs_f64();
    let text = format!(
        "published {published}, skipped {} in {seconds:.2} s ({:.0} requests/s)",
        parsed.bad.len(),
        published as f64 / seconds.max(f64::EPSILON)
    );
    let report = Report {
        published,
        skipped: parsed.bad.len(),
        request_id: None,
        seconds,
    };
    Ok((report, text))
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
        publisher.close().await;
        Ok::<_, CliError>(published.map_err(anyhow::Error::from)?)
    }
    .await;
    disconnect(connection).await;
    published
}
