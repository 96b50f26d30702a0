//! `dlq list` and `dlq replay`: the operator's view of the dead-letter queue. The broker work is
//! in [`crate::dlq`]; this file parses flags and prints.

use std::path::PathBuf;

use time::{OffsetDateTime, format_description::well_known::Rfc3339};

use super::{CliError, connect, disconnect, operator_settings};
use crate::{
    config::Settings,
    contract,
    dlq::{self, DeadLetter, DlqError, Filter, ReplayOptions},
};

/// Widest request id and message shown in the table (`--json` has them whole).
const ID_WIDTH: usize = 40;
const MESSAGE_WIDTH: usize = 70;

#[derive(clap::Subcommand, Debug)]
pub enum DlqCommand {
    /// Show dead-lettered requests; every message stays in the queue.
    List {
        /// Read at most this many (from the head of the queue).
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
        limit: Option<u32>,
        /// One JSON array instead of a table.
        #[arg(long)]
        json: bool,
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Move matching dead letters back to the request exchange (publish confirmed, then ack).
    Replay {
        /// Move at most this many.
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
        limit: Option<u32>,
        /// Only dead letters of this kind (as `dlq list` shows it, e.g. device_not_found).
        #[arg(long)]
        error_kind: Option<String>,
        /// Only the dead letter(s) of this request.
        #[arg(long)]
        request_id: Option<String>,
        /// Print what would move; move nothing.
        #[arg(long)]
        dry_run: bool,
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

pub async fn dlq(command: DlqCommand) -> Result<(), CliError> {
    match command {
        DlqCommand::List {
            limit,
            json,
            config,
        } => list(&operator_settings(config)?, limit, json).await,
        DlqCommand::Replay {
            limit,
            error_kind,
            request_id,
            dry_run,
            config,
        } => {
            if let Some(kind) = &error_kind {
                check_kind(kind)?;
            }
            let options = ReplayOptions {
                filter: Filter {
                    error_kind,
                    request_id,
                },
                limit,
                dry_run,
                before_ack: None,
            };
            replay(&operator_settings(config)?, &options).await
        }
    }
}

/// A typo in `--error-kind` would silently match nothing; refuse it instead.
fn check_kind(kind: &str) -> Result<(), CliError> {
    let known = dlq::known_kinds();
    if known.contains(&kind) {
        return Ok(());
    }
    Err(CliError::Usage(format!(
        "--error-kind {kind} is not a kind; one of: {}",
        known.join(", ")
    )))
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
        let text = serde_json::to_string_pretty(&listing.letters).expect("dead letters serialise");
        println!("{text}");
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

async fn replay(settings: &Settings, options: &ReplayOptions) -> Result<(), CliError> {
    let connection = connect(settings, "dlq-replay").await?;
    let verb = if options.dry_run {
        "would replay"
    } else {
        "replayed"
    };
    let summary = dlq::replay(&connection, &settings.amqp, options, |letter| {
        println!(
            "{verb} {} ({}, replay #{})",
            letter.request_id.as_deref().unwrap_or("<no request id>"),
            letter.error_kind,
            letter.replay_count
        );
    })
    .await;
    disconnect(connection).await;
    let summary = summary.map_err(dlq_error)?;
    let (exchange, queue) = (&settings.amqp.exchange, &settings.amqp.dead_letter_queue);
    let left = summary
        .total
        .saturating_sub(if options.dry_run { 0 } else { summary.moved });
    println!(
        "{verb} {} of {} dead letter(s) to {exchange}; {left} left in {queue}",
        summary.moved, summary.total
    );
    if summary.examined < summary.total && options.limit.is_none_or(|n| summary.moved < n) {
        println!(
            "only the first {} were examined (at most {} per run): run it again for the rest",
            summary.examined,
            dlq::MAX_WINDOW
        );
    }
    Ok(())
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
