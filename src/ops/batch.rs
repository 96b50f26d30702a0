//! Requests in bulk (`enqueue --file`, and the bodies the HTTP intake receives): CSV, JSON Lines
//! or a JSON array, every row validated with the worker's own [`contract::parse_request`] before
//! anything is published, then published with pipelined publisher confirms. One implementation
//! for both doors, so the intake never accepts what `enqueue` would refuse, or the reverse.

use std::{
    collections::HashMap,
    io::{BufRead, Read},
    path::Path,
};

use futures_util::{StreamExt, stream::FuturesUnordered};
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

/// Where a row's AMQP `message-id` comes from, and what a request without `request_id` gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ids<'a> {
    /// `enqueue`: the message-id is the request id; a request without one gets a fresh UUID.
    Generated,
    /// The HTTP intake (CONTRACT section 9): the message-id is the client's `Idempotency-Key`
    /// (`key` for a body holding one object, `key:<line>` for each item of an array or JSON
    /// Lines), else the request id. A request without `request_id` takes its message-id, and
    /// is invalid when there is no key: a random id would make a client's retry a new request.
    Keyed(Option<&'a str>),
}

impl Ids<'_> {
    /// The message-id imposed on row `line` (`None`: its request id), and the request id a
    /// request without one falls back to.
    fn for_row(self, line: u64, single: bool) -> (Option<String>, Option<String>) {
        match self {
            Ids::Generated => (None, Some(uuid::Uuid::new_v4().to_string())),
            Ids::Keyed(None) => (None, None),
            Ids::Keyed(Some(key)) => {
                let id = if single {
                    key.to_owned()
                } else {
                    format!("{key}:{line}")
                };
                (Some(id.clone()), Some(id))
            }
        }
    }
}

/// A valid request, ready to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub line: u64,
    pub request_id: String,
    /// The AMQP `message-id`: the request id unless [`Ids::Keyed`] imposed one.
    pub message_id: String,
    pub body: Vec<u8>,
}

/// A row the worker would refuse, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadRow {
    pub line: u64,
    pub reason: String,
}

impl BadRow {
    /// The request field the reason is about, when it names one: every message of
    /// [`contract::parse_request`] about a single field starts with that field's name.
    pub fn field(&self) -> Option<&'static str> {
        contract::REQUEST_FIELDS.iter().copied().find(|field| {
            self.reason
                .strip_prefix(field)
                .is_some_and(|rest| rest.starts_with(' '))
        })
    }
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
        message_id: Option<String>,
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
                    message_id: message_id.unwrap_or_else(|| request_id.clone()),
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

    /// Validates one JSON request object; `single` when it is the whole body.
    fn push_object(
        &mut self,
        line: u64,
        object: &[u8],
        ids: Ids,
        single: bool,
        seen: &mut HashMap<String, u64>,
    ) {
        let (message_id, fallback) = ids.for_row(line, single);
        let row = object_row(object, fallback.as_deref());
        self.push(line, row, message_id, seen);
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
        Format::Jsonl => parse_jsonl(std::io::BufReader::new(reader), Ids::Generated),
    }
}

/// JSON Lines: each non-blank line is one request object, published as written (a missing
/// `request_id` is added, as `ids` says).
pub fn parse_jsonl(reader: impl BufRead, ids: Ids) -> Result<Parsed, FileError> {
    let mut parsed = Parsed::default();
    let mut seen = HashMap::new();
    for (index, line) in reader.split(b'\n').enumerate() {
        let line_no = index as u64 + 1;
        let line = line.map_err(|e| FileError(format!("reading line {line_no}: {e}")))?;
        let line = line.strip_suffix(b"\r").unwrap_or(&line);
        if line.trim_ascii().is_empty() {
            continue;
        }
        parsed.push_object(line_no, line, ids, false, &mut seen);
    }
    Ok(parsed)
}

/// A JSON body (the HTTP intake's `application/json`): one request object (line 1), or an
/// array of them, each item's "line" being its position from 1. Items are validated on their
/// own bytes, so a duplicate key inside one is caught as it is in JSON Lines.
pub fn parse_json(body: &[u8], ids: Ids) -> Result<Parsed, FileError> {
    let mut parsed = Parsed::default();
    let mut seen = HashMap::new();
    if body.trim_ascii_start().first() != Some(&b'[') {
        parsed.push_object(1, body, ids, true, &mut seen);
        return Ok(parsed);
    }
    let items: Vec<&serde_json::value::RawValue> = serde_json::from_slice(body)
        .map_err(|e| FileError(format!("the body is not a JSON array of objects: {e}")))?;
    for (index, item) in items.into_iter().enumerate() {
        parsed.push_object(
            index as u64 + 1,
            item.get().as_bytes(),
            ids,
            false,
            &mut seen,
        );
    }
    Ok(parsed)
}

/// A request object published as written, with `fallback` added as its `request_id` when it
/// has none.
fn object_row(object: &[u8], fallback: Option<&str>) -> Result<(String, Vec<u8>), String> {
    // The original bytes first: a duplicate key must be caught before any re-serialising.
    let request = contract::parse_request(object, fallback).map_err(|e| e.message)?;
    let Some(fallback) = fallback.filter(|id| *id == request.request_id) else {
        return Ok((request.request_id, object.to_vec()));
    };
    let mut map: Map<String, Value> =
        serde_json::from_slice(object).map_err(|e| format!("not a JSON object: {e}"))?;
    map.insert("request_id".to_owned(), Value::String(fallback.to_owned()));
    validated(map)
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
        parsed.push(line, row, None, &mut seen);
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

/// The properties of a published request (CONTRACT section 4): persistent JSON, with the
/// message-id (the request id, unless the intake's idempotency key replaces it).
pub fn request_properties(message_id: &str) -> BasicProperties {
    BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_message_id(message_id.into())
}

/// One row, confirmed.
async fn publish_one<'a>(
    publisher: &Publisher,
    amqp: &AmqpSettings,
    row: &'a Row,
) -> Result<&'a Row, (&'a Row, PublishError)> {
    let properties = request_properties(&row.message_id);
    publisher
        .publish(
            &amqp.exchange,
            &amqp.routing_key,
            &row.body,
            properties,
            true,
        )
        .await
        .map(|()| row)
        .map_err(|e| (row, e))
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
/// once, calling `on_confirm` with each row the broker confirmed and the number so far. After the
/// first refusal no further row is sent, but every publish already in flight is still awaited, so
/// that `on_confirm` has seen every row the broker took (the intake remembers them, and the
/// client's retry does not publish them again); then the first refusal is returned.
pub async fn publish_all(
    publisher: &Publisher,
    amqp: &AmqpSettings,
    rows: &[Row],
    mut on_confirm: impl FnMut(&Row, usize),
) -> Result<usize, PublishFailed> {
    // A hand-written window rather than `buffer_unordered` over a closure: the closure's
    // future is not general over the row's lifetime, which a `Send` task (the HTTP intake's)
    // needs.
    let mut pending = FuturesUnordered::new();
    let mut next = rows.iter();
    let mut confirmed = 0;
    let mut refused = None;
    loop {
        while refused.is_none() && pending.len() < PUBLISH_PIPELINE {
            let Some(row) = next.next() else { break };
            pending.push(publish_one(publisher, amqp, row));
        }
        match pending.next().await {
            None => break,
            Some(Ok(row)) => {
                confirmed += 1;
                on_confirm(row, confirmed);
            }
            Some(Err((row, source))) => {
                refused.get_or_insert((row, source));
            }
        }
    }
    match refused {
        None => Ok(confirmed),
        Some((row, source)) => Err(PublishFailed {
            request_id: row.request_id.clone(),
            line: row.line,
            confirmed,
            source,
        }),
    }
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
        let parsed = parse_jsonl(text.as_bytes(), Ids::Generated).unwrap();
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

    #[test]
    fn json_bodies_one_object_or_an_array_keyed_by_the_idempotency_key() {
        let one = format!("{{\"device_id\":\"{GUID}\"}}");
        let parsed = parse_json(one.as_bytes(), Ids::Keyed(Some("k-1"))).unwrap();
        let row = &parsed.rows[0];
        assert_eq!((row.line, row.message_id.as_str()), (1, "k-1"));
        assert_eq!(row.request_id, "k-1", "the key is the missing request id");
        assert_eq!(json(row)["request_id"], "k-1");

        let array = format!(
            "[{{\"request_id\":\"a\",\"device_id\":\"{GUID}\"}}, {{\"device_id\":\"{GUID}\"}}]"
        );
        let parsed = parse_json(array.as_bytes(), Ids::Keyed(Some("k"))).unwrap();
        let ids: Vec<_> = parsed
            .rows
            .iter()
            .map(|r| (r.request_id.as_str(), r.message_id.as_str()))
            .collect();
        assert_eq!(ids, [("a", "k:1"), ("k:2", "k:2")]);
        assert_eq!(
            parsed.rows[0].body,
            format!("{{\"request_id\":\"a\",\"device_id\":\"{GUID}\"}}").into_bytes(),
            "an item is published as written"
        );

        let parsed = parse_json(array.as_bytes(), Ids::Keyed(None)).unwrap();
        assert_eq!(parsed.rows[0].message_id, "a", "no key: the request id");
        assert_eq!(parsed.bad.len(), 1, "no key and no request_id: invalid");
        assert_eq!(parsed.bad[0].line, 2);
        assert_eq!(parsed.bad[0].field(), Some("request_id"));
    }

    #[test]
    fn json_bodies_name_the_bad_item_and_its_field() {
        let body = format!(
            "[{{\"request_id\":\"a\",\"device_id\":\"{GUID}\"}},{{\"request_id\":\"b\",\"device_id\":\"nope\"}},{{\"request_id\":\"c\",\"device_id\":\"{GUID}\",\"device_id\":\"{GUID}\"}},7]"
        );
        let parsed = parse_json(body.as_bytes(), Ids::Keyed(None)).unwrap();
        let bad: Vec<_> = parsed.bad.iter().map(|b| (b.line, b.field())).collect();
        assert_eq!(bad, [(2, Some("device_id")), (3, None), (4, None)]);
        assert!(
            parsed.bad[1].reason.contains("duplicate"),
            "{:?}",
            parsed.bad
        );
        assert!(parse_json(b"[1,", Ids::Keyed(None)).is_err());
        assert!(parse_json(b"[]", Ids::Keyed(None)).unwrap().rows.is_empty());
    }

    proptest::proptest! {
        /// Hostile bodies never panic; whatever is accepted passes the worker's own validation
        /// on exactly the bytes to be published, under the message-id it will carry.
        #[test]
        fn hostile_json_bodies(body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300),
                               key in proptest::option::of("[a-z0-9]{1,8}")) {
            let ids = Ids::Keyed(key.as_deref());
            for parsed in [parse_json(&body, ids), parse_jsonl(&body[..], ids)].into_iter().flatten() {
                for row in &parsed.rows {
                    let request = contract::parse_request(&row.body, Some(&row.message_id)).unwrap();
                    proptest::prop_assert_eq!(&request.request_id, &row.request_id);
                }
            }
        }

        /// Structured hostile items: objects with random fields and values.
        #[test]
        fn hostile_request_items(items in proptest::collection::vec(
            proptest::collection::btree_map(
                proptest::sample::select(&contract::REQUEST_FIELDS[..]),
                proptest::prop_oneof!["[ -~]{0,40}", proptest::strategy::Just(GUID.to_owned())],
                0..5),
            0..6)) {
            let body = serde_json::to_vec(&items).unwrap();
            let parsed = parse_json(&body, Ids::Keyed(Some("k"))).unwrap();
            proptest::prop_assert_eq!(parsed.rows.len() + parsed.bad.len(), items.len());
            for row in &parsed.rows {
                proptest::prop_assert!(contract::parse_request(&row.body, None).is_ok());
            }
        }
    }
}
