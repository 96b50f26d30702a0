//! `dlq list` and `dlq replay`: the operator's view of the dead-letter queue. The broker work is
//! in [`crate::ops::dlq`]; this file parses flags, asks before moving everything, and prints.

use std::io::{BufRead as _, IsTerminal as _, Write as _};
use std::path::PathBuf;

use clap::builder::PossibleValuesParser;
use lapin::Connection;
use serde::Serialize;
use time::{OffsetDateTime, format_description::well_known::Rfc3339};

use super::{
    CliError, connect, disconnect, operator_settings,
    output::{OutputArg, print_json},
    progress::Progress,
};
use crate::{
    config::Settings,
    contract,
    ops::dlq::{self, DeadLetter, DlqError, Filter, ReplayOptions},
};

/// Widest request id and message shown in the table (`-o json` has them whole).
const ID_WIDTH: usize = 40;
const MESSAGE_WIDTH: usize = 70;

const REPLAY_HELP: &str = "\
Examples:
  unassign-worker dlq replay --error-kind device_not_found --dry-run
  unassign-worker dlq replay --request-id hr-4711
  unassign-worker dlq replay --yes -o json          # everything, from a script

Without --error-kind or --request-id a replay moves every dead letter: it asks first on a
terminal, and elsewhere refuses (exit 2) unless --yes is given.

Exit codes: 0 replayed (or nothing to replay), 1 the broker failed or the prompt was declined,
2 usage or configuration error.";

#[derive(clap::Subcommand, Debug)]
pub enum DlqCommand {
    /// Show dead-lettered requests; every message stays in the queue.
    List {
        /// Read at most this many (from the head of the queue).
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
        limit: Option<u32>,
        /// The same as `-o json` (kept for scripts written against it).
        #[arg(long, conflicts_with = "output")]
        json: bool,
        #[command(flatten)]
        output: OutputArg,
    },
    /// Move matching dead letters back to the request exchange (publish confirmed, then ack).
    #[command(after_help = REPLAY_HELP)]
    Replay(ReplayArgs),
}

#[derive(clap::Args, Debug)]
pub struct ReplayArgs {
    /// Move at most this many.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    limit: Option<u32>,
    /// Only dead letters of this kind (as `dlq list` shows it).
    #[arg(long, value_name = "KIND", value_parser = PossibleValuesParser::new(dlq::known_kinds()))]
    error_kind: Option<String>,
    /// Only the dead letter(s) of this request.
    #[arg(long, value_name = "ID")]
    request_id: Option<String>,
    /// Print what would move; move nothing.
    #[arg(long)]
    dry_run: bool,
    /// Replay without a filter without asking.
    #[arg(long, short = 'y')]
    yes: bool,
    /// One line per message moved (a dry run always lists them).
    #[arg(long, short = 'v')]
    verbose: bool,
    #[command(flatten)]
    output: OutputArg,
}

/// The JSON document of `dlq replay -o json`.
#[derive(Debug, Serialize)]
struct ReplayReport {
    dry_run: bool,
    /// Ready dead letters when the replay began.
    total: u32,
    /// Read and matched against the filter.
    examined: u32,
    /// Moved (in a dry run: would be moved).
    replayed: u32,
    /// Dead letters left in the queue.
    left: u32,
    /// More dead letters than one run examines: run it again for the rest.
    more: bool,
    /// Each replayed dead letter, as `dlq list` shows it, with its new replay count.
    letters: Vec<DeadLetter>,
}

pub async fn dlq(command: DlqCommand, config: Option<PathBuf>) -> Result<(), CliError> {
    match command {
        DlqCommand::List {
            limit,
            json,
            output,
        } => list(&operator_settings(config)?, limit, json || output.is_json()).await,
        DlqCommand::Replay(args) => replay(&operator_settings(config)?, args).await,
    }
}

fn dlq_error(e: DlqError) -> CliError {
    match e {
        DlqError::NoQueue(_) => CliError::Usage(e.to_string()),
        e => CliError::Runtime(e.into()),
    }
}

async fn list(settings: &Settings, limit: Option<u32>, json: bool) -> Result<(), CliError> {
    let connection = connect(settings, "dlq-list").await?;
    let listing = dlq::browse(&connection, &settings.amqp, limit).await;
    disconnect(connection).await;
    let listing = listing.map_err(dlq_error)?;
    if json {
        print_json(&listing.letters);
        return Ok(());
    }
    let queue = &settings.amqp.dead_letter_queue;
    if listing.letters.is_empty() {
        println!("no dead letters in {queue}");
        return Ok(());
    }
    print!("{}", table(&listing.letters));
    let shown = listing.letters.len();
    println!(
        "{shown} of {} dead letter(s) in {queue} shown; all are still in the queue",
        listing.total
    );
    Ok(())
}

async fn replay(settings: &Settings, args: ReplayArgs) -> Result<(), CliError> {
    let options = ReplayOptions {
        filter: Filter {
            error_kind: args.error_kind.clone(),
            request_id: args.request_id.clone(),
        },
        limit: args.limit,
        dry_run: args.dry_run,
        before_ack: None,
    };
    let everything = options.filter.error_kind.is_none() && options.filter.request_id.is_none();
    let ask = everything && !args.dry_run && !args.yes;
    // Refused before connecting: a script must never hang on a prompt nobody reads.
    if ask && !std::io::stdin().is_terminal() {
        return Err(CliError::Usage(
            "a replay without --error-kind or --request-id moves every dead letter: pass --yes \
             to confirm (stdin is not a terminal, so there is no prompt)"
                .to_owned(),
        ));
    }
    let connection = connect(settings, "dlq-replay").await?;
    let result = replay_on(&connection, settings, &options, &args, everything, ask).await;
    disconnect(connection).await;
    let (summary, letters) = result?;
    let (exchange, queue) = (&settings.amqp.exchange, &settings.amqp.dead_letter_queue);
    let moved = if options.dry_run { 0 } else { summary.moved };
    let report = ReplayReport {
        dry_run: options.dry_run,
        total: summary.total,
        examined: summary.examined,
        replayed: summary.moved,
        left: summary.total.saturating_sub(moved),
        more: summary.examined < summary.total && options.limit.is_none_or(|n| summary.moved < n),
        letters,
    };
    if args.output.is_json() {
        print_json(&report);
        return Ok(());
    }
    println!(
        "{} {} of {} dead letter(s) to {exchange}; {} left in {queue}",
        verb(options.dry_run),
        report.replayed,
        report.total,
        report.left
    );
    if report.more {
        println!(
            "only the first {} were examined (at most {} per run): run it again for the rest",
            report.examined,
            dlq::MAX_WINDOW
        );
    }
    Ok(())
}

fn verb(dry_run: bool) -> &'static str {
    if dry_run { "would replay" } else { "replayed" }
}

/// The replay on an open connection, after the prompt if one is due: a bar on a terminal, a
/// line per message when asked for (or in a dry run), and every replayed letter for the report.
async fn replay_on(
    connection: &Connection,
    settings: &Settings,
    options: &ReplayOptions,
    args: &ReplayArgs,
    everything: bool,
    ask: bool,
) -> Result<(dlq::ReplaySummary, Vec<DeadLetter>), CliError> {
    // Without a filter every message examined moves, so the count is the bar's length.
    let expected = if everything {
        let ready = dlq::ready_count(connection, &settings.amqp)
            .await
            .map_err(dlq_error)?;
        let expected = ready
            .min(options.limit.unwrap_or(u32::MAX))
            .min(dlq::MAX_WINDOW);
        if ask && expected > 0 {
            confirm(settings, ready, expected).await?;
        }
        Some(expected as usize)
    } else {
        None
    };
    let lines = !args.output.is_json() && (args.verbose || options.dry_run);
    let mut progress = Progress::new(expected, verb(options.dry_run));
    let mut letters = Vec::new();
    let summary = dlq::replay(connection, &settings.amqp, options, |letter| {
        if lines {
            progress.println(&format!(
                "{} {} ({}, replay #{})",
                verb(options.dry_run),
                letter.request_id.as_deref().unwrap_or("<no request id>"),
                letter.error_kind,
                letter.replay_count
            ));
        }
        letters.push(letter.clone());
        progress.update(letters.len());
    })
    .await;
    progress.finish();
    Ok((summary.map_err(dlq_error)?, letters))
}

/// Asks on the terminal before a replay that moves everything; anything but yes declines. The
/// answer is awaited off the runtime's threads, which keep the broker connection alive meanwhile.
async fn confirm(settings: &Settings, ready: u32, expected: u32) -> Result<(), CliError> {
    let (exchange, queue) = (&settings.amqp.exchange, &settings.amqp.dead_letter_queue);
    let how_many = if expected < ready {
        format!("{expected} of the {ready}")
    } else {
        format!("all {ready}")
    };
    eprint!("Replay {how_many} dead letter(s) in {queue} to {exchange}? [y/N] ");
    let _ = std::io::stderr().flush();
    let answer = tokio::task::spawn_blocking(|| {
        let mut answer = String::new();
        std::io::stdin()
            .lock()
            .read_line(&mut answer)
            .map(|_| answer)
    })
    .await
    .expect("reading stdin does not panic")
    .map_err(|e| CliError::Usage(format!("reading the answer: {e}")))?;
    if matches!(answer.trim().to_ascii_lowercase().as_str(), "y" | "yes") {
        return Ok(());
    }
    Err(CliError::Reported {
        code: 1,
        summary: "not confirmed; nothing was replayed".to_owned(),
    })
}

/// A plain text table, columns padded to their widest cell.
fn table(letters: &[DeadLetter]) -> String {
    let header = [
        "REQUEST ID",
        "KIND",
        "HTTP",
        "ATTEMPTS",
        "FAILED AT",
        "REPLAYS",
        "MESSAGE",
    ];
    let rows: Vec<[String; 7]> = letters.iter().map(row).collect();
    let mut widths = header.map(|h| h.chars().count());
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let header = header.map(str::to_owned);
    let mut out = String::new();
    for row in std::iter::once(&header).chain(&rows) {
        let cells: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

fn row(letter: &DeadLetter) -> [String; 7] {
    let optional = |v: Option<String>| v.unwrap_or_else(|| "-".to_owned());
    [
        clip(letter.request_id.as_deref().unwrap_or("-"), ID_WIDTH),
        clip(&letter.error_kind, ID_WIDTH),
        optional(letter.http_status.map(|s| s.to_string())),
        optional(letter.attempts.map(|n| n.to_string())),
        optional(letter.failed_at.as_deref().map(to_seconds)),
        letter.replay_count.to_string(),
        clip(letter.message.as_deref().unwrap_or("-"), MESSAGE_WIDTH),
    ]
}

/// An RFC 3339 time without its fraction of a second, which only widens the table.
fn to_seconds(time: &str) -> String {
    match OffsetDateTime::parse(time, &Rfc3339) {
        Ok(t) => contract::rfc3339(t.replace_nanosecond(0).unwrap_or(t)),
        Err(_) => time.to_owned(),
    }
}

/// At most `width` characters on one line: control characters (a newline in an error message,
/// an escape sequence in a hostile body) become spaces, and a cut is marked with `…`.
fn clip(text: &str, width: usize) -> String {
    let clean = text.chars().map(|c| if c.is_control() { ' ' } else { c });
    if text.chars().count() <= width {
        return clean.collect();
    }
    clean.take(width - 1).chain(['…']).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clip_cuts_and_cleans() {
        assert_eq!(clip("short", 10), "short");
        assert_eq!(clip("line\nbreak\u{1b}[2J", 40), "line break [2J");
        assert_eq!(clip("abcdefghij", 5), "abcd…");
        assert_eq!(clip("ääääää", 3).chars().count(), 3);
    }

    #[test]
    fn times_are_shown_to_the_second() {
        assert_eq!(
            to_seconds("2026-11-28T12:03:28.998774026Z"),
            "2026-11-28T12:03:28Z"
        );
        assert_eq!(to_seconds("yesterday"), "yesterday");
    }

    #[test]
    fn the_table_aligns_its_columns() {
        let letter = DeadLetter {
            request_id: Some("hr-1".into()),
            error_kind: "device_not_found".into(),
            http_status: Some(404),
            attempts: Some(1),
            failed_at: Some("2026-11-28T10:00:00Z".into()),
            message: Some("x".repeat(200)),
            replay_count: 0,
        };
        let broker = DeadLetter {
            request_id: None,
            error_kind: "delivery_limit".into(),
            http_status: None,
            attempts: None,
            ..letter.clone()
        };
        let text = table(&[letter, broker]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        let kind_at = lines[0].find("KIND").unwrap();
        assert_eq!(lines[1].find("device_not_found"), Some(kind_at));
        assert_eq!(lines[2].find("delivery_limit"), Some(kind_at));
        assert!(lines[2].starts_with("- "), "{text}");
        assert!(
            lines[1].ends_with('…') && lines[1].chars().count() < 160,
            "{text}"
        );
    }
}
