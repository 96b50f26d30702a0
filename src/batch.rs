//! Requests in bulk (`enqueue --file`): CSV or JSON Lines, every row validated with the worker's
//! own [`contract::parse_request`] before anything is published, then published with pipelined
//! publisher confirms.

use std::{
    collections::HashMap,
    future::ready,
    io::{BufRead, Read},
    path::Path,
};

use futures_util::{StreamExt, TryStreamExt, stream};
use lapin::BasicProperties;
use serde_json::{Map, Value};

use crate::{
    amqp::{PublishError, Publisher},
    config::AmqpSettings,
    contract,
};

/// Publishes awaiting their confirm at once. One at a time would pay a broker round trip (and a
/// quorum-queue commit) per message; a window keeps the pipe full.
pub const PUBLISH_PIPELINE: usize = 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Header row, columns named like the request's JSON fields; empty cells mean absent.
    Csv,
    /// One request object per line (`.jsonl`, `.ndjson`).
    Jsonl,
}

impl Format {
    /// From the file's extension: `.csv`, `.jsonl` or `.ndjson`.
    pub fn from_path(path: &Path) -> Option<Format> {
        let ext = path.extension()?.to_str()?.to_ascii_lowercase();
        match ext.as_str() {
            "csv" => Some(Format::Csv),
            "jsonl" | "ndjson" => Some(Format::Jsonl),
            _ => None,
        }
    }

    /// From the content, for input without a name (stdin): JSON Lines when the first thing in
    /// it is `{`, else CSV (whose header row names fields, so never starts with `{`).
    pub fn sniff(content: &[u8]) -> Format {
        let content = content.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(content);
        match content.trim_ascii_start().first() {
            Some(b'{') => Format::Jsonl,
            _ => Format::Csv,
        }
    }
}

/// A valid request, ready to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub line: u64,
    pub request_id: String,
    pub body: Vec<u8>,
}

/// A row the worker would refuse, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadRow {
    pub line: u64,
    pub reason: String,
}

/// A whole file, validated.
#[derive(Debug, Default)]
pub struct Parsed {
    pub rows: Vec<Row>,
    pub bad: Vec<BadRow>,
    /// CSV columns that name no request field (ignored, as unknown JSON fields are).
    pub ignored_columns: Vec<String>,
}

impl Parsed {
    /// Records one row's verdict; a request id already used in the file is refused, since
    /// consumers de-duplicate outcomes on it and would drop the second one.
    fn push(
        &mut self,
        line: u64,
        row: Result<(String, Vec<u8>), String>,
        seen: &mut HashMap<String, u64>,
    ) {
        let row = row.and_then(|(request_id, body)| match seen.get(&request_id) {
            Some(first) => Err(format!(
                "request_id {request_id} is already used on line {first}"
            )),
            None => {
                seen.insert(request_id.clone(), line);
                Ok(Row {
                    line,
                    request_id,
                    body,
                })
            }
        });
        match row {
            Ok(row) => self.rows.push(row),
            Err(reason) => self.bad.push(BadRow { line, reason }),
        }
    }
}

/// The file as a whole cannot be read (as opposed to a bad row).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct FileError(String);

/// Reads and validates `path` in `format`.
pub fn read(path: &Path, format: Format) -> Result<Parsed, FileError> {
    let file = std::fs::File::open(path)
        .map_err(|e| FileError(format!("cannot read {}: {e}", path.display())))?;
    parse(file, format)
}

/// Validates requests in `format` from any reader (`enqueue --file -` reads stdin).
pub fn parse(reader: impl Read, format: Format) -> Result<Parsed, FileError> {
    match format {
        Format::Csv => parse_csv(reader),
        Format::Jsonl => parse_jsonl(std::io::BufReader::new(reader)),
    }
}

/// JSON Lines: each non-blank line is one request object, published as written (a missing
/// `request_id` is added).
pub fn parse_jsonl(reader: impl BufRead) -> Result<Parsed, FileError> {
    let mut parsed = Parsed::default();
    let mut seen = HashMap::new();
    for (index, line) in reader.split(b'\n').enumerate() {
        let line_no = index as u64 + 1;
        let line = line.map_err(|e| FileError(format!("reading line {line_no}: {e}")))?;
        let line = line.strip_suffix(b"\r").unwrap_or(&line);
        if line.trim_ascii().is_empty() {
            continue;
        }
        parsed.push(line_no, jsonl_row(line), &mut seen);
    }
    Ok(parsed)
}

fn jsonl_row(line: &[u8]) -> Result<(String, Vec<u8>), String> {
    let generated = uuid::Uuid::new_v4().to_string();
    // The original bytes first: a duplicate key must be caught before any re-serialising.
    let request = contract::parse_request(line, Some(&generated)).map_err(|e| e.message)?;
    if request.request_id != generated {
        return Ok((request.request_id, line.to_vec()));
    }
    let mut object: Map<String, Value> =
        serde_json::from_slice(line).map_err(|e| format!("not a JSON object: {e}"))?;
    object.insert("request_id".to_owned(), Value::String(generated));
    validated(object)
}

/// CSV with a header row naming request fields; each row becomes a JSON request object.
pub fn parse_csv(reader: impl Read) -> Result<Parsed, FileError> {
    let mut csv = csv::ReaderBuilder::new().from_reader(reader);
    let header = csv
        .headers()
        .map_err(|e| FileError(format!("reading the CSV header: {e}")))?
        .clone();
    let mut parsed = Parsed::default();
    let columns = csv_columns(&header, &mut parsed.ignored_columns)?;
    let mut seen = HashMap::new();
    for record in csv.records() {
        let (line, row) = match record {
            Ok(record) => {
                let line = record.position().map_or(0, csv::Position::line);
                (line, csv_row(&columns, &record))
            }
            Err(e) if e.is_io_error() => return Err(FileError(format!("reading the CSV: {e}"))),
            Err(e) => (
                e.position().map_or(0, csv::Position::line),
                Err(e.to_string()),
            ),
        };
        parsed.push(line, row, &mut seen);
    }
    Ok(parsed)
}

/// Each header cell's request field, or `None` for a column that names none.
fn csv_columns(
    header: &csv::StringRecord,
    ignored: &mut Vec<String>,
) -> Result<Vec<Option<&'static str>>, FileError> {
    let mut columns = Vec::new();
    for name in header {
        let field = contract::REQUEST_FIELDS
            .iter()
            .copied()
            .find(|c| *c == name);
        if field.is_some() && columns.contains(&field) {
            return Err(FileError(format!(
                "the CSV header names column {name} twice"
            )));
        }
        if field.is_none() {
            ignored.push(name.to_owned());
        }
        columns.push(field);
    }
    Ok(columns)
}

fn csv_row(
    columns: &[Option<&str>],
    record: &csv::StringRecord,
) -> Result<(String, Vec<u8>), String> {
    let mut object = Map::new();
    for (field, cell) in columns.iter().zip(record) {
        if let Some(field) = field
            && !cell.is_empty()
        {
            object.insert((*field).to_owned(), Value::String(cell.to_owned()));
        }
    }
    if !object.contains_key("request_id") {
        let generated = uuid::Uuid::new_v4().to_string();
        object.insert("request_id".to_owned(), Value::String(generated));
    }
    validated(object)
}

/// Serialises `object` and runs the worker's validation on exactly the bytes to be published.
fn validated(object: Map<String, Value>) -> Result<(String, Vec<u8>), String> {
    let body = serde_json::to_vec(&object).expect("a JSON map serialises");
    let request = contract::parse_request(&body, None).map_err(|e| e.message)?;
    Ok((request.request_id, body))
}

/// The properties of a published request (CONTRACT section 4): persistent JSON, message-id =
/// request id.
pub fn request_properties(request_id: &str) -> BasicProperties {
    BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_message_id(request_id.into())
}

/// A publish that was not confirmed, and how many were before the pipeline stopped.
#[derive(Debug, thiserror::Error)]
#[error("request {request_id} (line {line}): {source}; {confirmed} confirmed before it stopped")]
pub struct PublishFailed {
    pub request_id: String,
    pub line: u64,
    pub confirmed: usize,
    pub source: PublishError,
}

/// Publishes every row to the request exchange, [`PUBLISH_PIPELINE`] awaiting their confirm at
/// once, calling `progress` with the number confirmed so far. Stops at the first refusal.
pub async fn publish_all(
    publisher: &Publisher,
    amqp: &AmqpSettings,
    rows: &[Row],
    mut progress: impl FnMut(usize),
) -> Result<usize, PublishFailed> {
    let mut confirmed = 0;
    let result = stream::iter(rows)
        .map(|row| async move {
            let properties = request_properties(&row.request_id);
            publisher
                .publish(
                    &amqp.exchange,
                    &amqp.routing_key,
                    &row.body,
                    properties,
                    true,
                )
                .await
                .map_err(|e| (row, e))
        })
        .buffer_unordered(PUBLISH_PIPELINE)
        .try_for_each(|()| {
            confirmed += 1;
            progress(confirmed);
            ready(Ok(()))
        })
        .await;
    result
        .map(|()| confirmed)
        .map_err(|(row, source)| PublishFailed {
            request_id: row.request_id.clone(),
            line: row.line,
            confirmed,
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GUID: &str = "7b7c4c1e-6f5a-4c39-9a43-2b1e5b0c1d2e";

    fn json(row: &Row) -> Value {
        serde_json::from_slice(&row.body).unwrap()
    }

    #[test]
    fn format_from_content() {
        assert_eq!(Format::sniff(b"\n  {\"device_id\":1}\n"), Format::Jsonl);
        assert_eq!(Format::sniff(b"\xEF\xBB\xBF{}"), Format::Jsonl);
        assert_eq!(Format::sniff(b"request_id,device_id\n"), Format::Csv);
        assert_eq!(Format::sniff(b""), Format::Csv);
    }

    #[test]
    fn format_from_extension() {
        assert_eq!(Format::from_path(Path::new("a/b.CSV")), Some(Format::Csv));
        assert_eq!(
            Format::from_path(Path::new("b.ndjson")),
            Some(Format::Jsonl)
        );
        assert_eq!(Format::from_path(Path::new("b.jsonl")), Some(Format::Jsonl));
        assert_eq!(Format::from_path(Path::new("b.txt")), None);
        assert_eq!(Format::from_path(Path::new("b")), None);
    }

    #[test]
    fn csv_rows_become_request_objects() {
        let text = format!(
            "\u{feff}request_id,device_id,reason,employee\nr-1,{GUID},left,Ann\n,{GUID},,Bob\nr-3,not-a-guid,,Cy\n"
        );
        let parsed = parse_csv(text.as_bytes()).unwrap();
        assert_eq!(parsed.ignored_columns, ["employee"]);
        assert_eq!(parsed.rows.len(), 2);
        assert_eq!(
            json(&parsed.rows[0]),
            serde_json::json!({"request_id": "r-1", "device_id": GUID, "reason": "left"})
        );
        let generated = &parsed.rows[1];
        assert_eq!(
            json(generated)["request_id"],
            generated.request_id.as_str(),
            "an id is generated"
        );
        assert!(
            json(generated).get("reason").is_none(),
            "an empty cell is absent"
        );
        assert_eq!(parsed.bad.len(), 1);
        assert_eq!(parsed.bad[0].line, 4);
        assert!(parsed.bad[0].reason.contains("GUID"), "{:?}", parsed.bad);
    }

    #[test]
    fn csv_structure_errors() {
        let parsed =
            parse_csv(format!("request_id,device_id\nr-1,{GUID},extra\n").as_bytes()).unwrap();
        assert_eq!(parsed.bad[0].line, 2);
        let err = parse_csv("device_id,device_id\n".as_bytes()).unwrap_err();
        assert!(err.to_string().contains("twice"), "{err}");
    }

    #[test]
    fn jsonl_rows_are_published_as_written() {
        let text = format!(
            "{{\"request_id\":\"j-1\",\"device_id\":\"{GUID}\",\"x\":1}}\r\n\n{{\"device_id\":\"{GUID}\"}}\n[1]\n{{\"request_id\":\"j-1\",\"device_id\":\"{GUID}\"}}\n{{\"request_id\":\"j-5\",\"device_id\":\"{GUID}\",\"device_id\":\"{GUID}\"}}\n"
        );
        let parsed = parse_jsonl(text.as_bytes()).unwrap();
        assert_eq!(parsed.rows.len(), 2);
        assert_eq!(
            parsed.rows[0].body,
            format!("{{\"request_id\":\"j-1\",\"device_id\":\"{GUID}\",\"x\":1}}").into_bytes()
        );
        assert_eq!(
            json(&parsed.rows[1])["request_id"],
            parsed.rows[1].request_id.as_str()
        );
        let lines: Vec<u64> = parsed.bad.iter().map(|b| b.line).collect();
        assert_eq!(lines, [4, 5, 6], "{:?}", parsed.bad);
        assert!(parsed.bad[1].reason.contains("already used on line 1"));
        assert!(parsed.bad[2].reason.contains("duplicate"));
    }
}
