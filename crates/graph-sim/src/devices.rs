//! The loaded Autopilot device list and the subset of OData the Graph list endpoint answers.

use std::collections::HashMap;
use std::path::Path;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// A `windowsAutopilotDeviceIdentity`; fields beyond the three the simulator uses are kept and echoed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Device {
    pub id: String,
    #[serde(default)]
    pub serial_number: String,
    #[serde(default)]
    pub user_principal_name: String,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl Device {
    pub fn new(id: &str, serial_number: &str, user_principal_name: &str) -> Device {
        Device {
            id: id.to_owned(),
            serial_number: serial_number.to_owned(),
            user_principal_name: user_principal_name.to_owned(),
            extra: Map::new(),
        }
    }
}

/// Devices in file order, indexed by lower-cased id (Graph ids are case-insensitive).
#[derive(Debug, Default)]
pub(super) struct Devices {
    list: Vec<Device>,
    index: HashMap<String, usize>,
}

impl Devices {
    /// Reads a CSV file (`.csv`: a header row naming `id`, `serialNumber`, `userPrincipalName`
    /// and any other properties), a JSON array or JSON Lines.
    pub fn load(path: &Path) -> anyhow::Result<Devices> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read devices file {}", path.display()))?;
        let csv = path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("csv"));
        let list: Vec<Device> = if csv {
            csv::Reader::from_reader(text.as_bytes())
                .deserialize::<std::collections::BTreeMap<String, String>>()
                .enumerate()
                .map(|(n, row)| {
                    // Every cell is text: a serial of digits stays a string.
                    let row = row.map_err(anyhow::Error::from).and_then(|row| {
                        let object = row.into_iter().map(|(k, v)| (k, Value::String(v)));
                        Ok(serde_json::from_value(Value::Object(object.collect()))?)
                    });
                    row.with_context(|| format!("devices file row {}: not a device", n + 1))
                })
                .collect::<anyhow::Result<_>>()?
        } else if text.trim_start().starts_with('[') {
            serde_json::from_str(&text).context("devices file is not a JSON array of devices")?
        } else {
            text.lines()
                .enumerate()
                .filter(|(_, line)| !line.trim().is_empty())
                .map(|(n, line)| {
                    serde_json::from_str(line)
                        .with_context(|| format!("devices file line {}: not a device", n + 1))
                })
                .collect::<anyhow::Result<_>>()?
        };
        Ok(Devices::from_list(list))
    }

    pub fn from_list(list: Vec<Device>) -> Devices {
        let index = list
            .iter()
            .enumerate()
            .map(|(i, d)| (d.id.to_ascii_lowercase(), i))
            .collect();
        Devices { list, index }
    }

    pub fn list(&self) -> &[Device] {
        &self.list
    }

    pub fn contains(&self, id: &str) -> bool {
        self.index.contains_key(&id.to_ascii_lowercase())
    }

    /// Takes the user off a device, as `unassignUserFromDevice` does; false if the id is unknown.
    pub fn unassign(&mut self, id: &str) -> bool {
        let Some(&i) = self.index.get(&id.to_ascii_lowercase()) else {
            return false;
        };
        let device = &mut self.list[i];
        device.user_principal_name.clear();
        if let Some(name) = device.extra.get_mut("addressableUserName") {
            *name = Value::String(String::new());
        }
        true
    }

    /// The page of devices `query` asks for, and whether more follow.
    pub fn page(&self, query: &ListQuery, page_size: usize) -> (Vec<Device>, bool) {
        let size = query.top.map_or(page_size, |top| top.min(page_size));
        let mut page: Vec<Device> = self
            .list
            .iter()
            .filter(|d| query.filter.matches(d))
            .skip(query.skip)
            .take(size + 1)
            .cloned()
            .collect();
        let more = page.len() > size;
        page.truncate(size);
        (page, more)
    }
}

/// The `$filter` forms Graph is known to answer on this resource.
#[derive(Debug, PartialEq)]
pub(super) enum Filter {
    All,
    /// `contains(serialNumber,'X')`, case-insensitive.
    SerialContains(String),
    /// `userPrincipalName eq 'X'`, case-insensitive.
    UpnEquals(String),
}

impl Filter {
    fn matches(&self, d: &Device) -> bool {
        match self {
            Filter::All => true,
            Filter::SerialContains(s) => d.serial_number.to_lowercase().contains(s),
            Filter::UpnEquals(u) => d.user_principal_name.to_lowercase() == *u,
        }
    }

    /// Parses an OData filter; anything else (e.g. `serialNumber eq 'X'`, which Graph rejects) is an error.
    fn parse(text: &str) -> Result<Filter, String> {
        let text = text.trim();
        let unsupported = || format!("Unsupported filter: {text}");
        if let Some(args) = strip_prefix_ci(text, "contains(") {
            let (prop, rest) = args.split_once(',').ok_or_else(unsupported)?;
            let literal = rest.trim_end().strip_suffix(')').ok_or_else(unsupported)?;
            if prop.trim().eq_ignore_ascii_case("serialNumber") {
                return Ok(Filter::SerialContains(
                    string_literal(literal).ok_or_else(unsupported)?,
                ));
            }
        } else if let Some((prop, rest)) = text.split_once(char::is_whitespace) {
            let literal = rest
                .trim_start()
                .strip_prefix("eq ")
                .ok_or_else(unsupported)?;
            if prop.eq_ignore_ascii_case("userPrincipalName") {
                return Ok(Filter::UpnEquals(
                    string_literal(literal).ok_or_else(unsupported)?,
                ));
            }
        }
        Err(unsupported())
    }
}

/// A parsed list request: `$filter`, `$top` and the `$skiptoken` of a previous page.
#[derive(Debug)]
pub(super) struct ListQuery {
    pub filter: Filter,
    pub top: Option<usize>,
    pub skip: usize,
    /// The query parameters to carry into `@odata.nextLink`.
    pub raw_filter: Option<String>,
}

impl ListQuery {
    /// Parses a raw query string; the error is the message for Graph's 400 body.
    pub fn parse(raw: Option<&str>) -> Result<ListQuery, String> {
        let mut query = ListQuery {
            filter: Filter::All,
            top: None,
            skip: 0,
            raw_filter: None,
        };
        for (key, value) in url::form_urlencoded::parse(raw.unwrap_or_default().as_bytes()) {
            match &*key {
                "$filter" => {
                    query.filter = Filter::parse(&value)?;
                    query.raw_filter = Some(value.into_owned());
                }
                "$top" => {
                    let top = value.parse().ok().filter(|&t: &usize| t > 0);
                    query.top = Some(top.ok_or(format!("Invalid $top value: {value}"))?);
                }
                "$skiptoken" => {
                    query.skip = value
                        .parse()
                        .map_err(|_| format!("Invalid $skiptoken: {value}"))?;
                }
                _ => {}
            }
        }
        Ok(query)
    }

    /// The query string of the page after this one (whose page held `taken` devices).
    pub fn next_query(&self, taken: usize) -> String {
        let mut out = url::form_urlencoded::Serializer::new(String::new());
        if let Some(filter) = &self.raw_filter {
            out.append_pair("$filter", filter);
        }
        if let Some(top) = self.top {
            out.append_pair("$top", &top.to_string());
        }
        out.append_pair("$skiptoken", &(self.skip + taken).to_string());
        // Graph writes the `$` of system query options literally.
        out.finish().replace("%24", "$")
    }
}

fn strip_prefix_ci<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
    let head = text.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &text[prefix.len()..])
}

/// An OData string literal `'...'` (a quote inside is doubled), lower-cased for matching.
fn string_literal(text: &str) -> Option<String> {
    let inner = text.trim().strip_prefix('\'')?.strip_suffix('\'')?;
    (!inner.replace("''", "").contains('\'')).then(|| inner.replace("''", "'").to_lowercase())
}

/// Graph ids are GUIDs in 8-4-4-4-12 hex form.
pub(crate) fn is_guid(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, len)| g.len() == len && g.bytes().all(|b| b.is_ascii_hexdigit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_supported_filters() {
        assert_eq!(
            Filter::parse("contains(serialNumber,'AB''C')"),
            Ok(Filter::SerialContains("ab'c".into()))
        );
        assert_eq!(
            Filter::parse(" contains( serialNumber , 'x,)' ) "),
            Ok(Filter::SerialContains("x,)".into()))
        );
        assert_eq!(
            Filter::parse("userPrincipalName eq 'Ann@Contoso.com'"),
            Ok(Filter::UpnEquals("ann@contoso.com".into()))
        );
    }

    #[test]
    fn rejects_what_graph_rejects() {
        for f in [
            "serialNumber eq 'X'",
            "contains(serialNumber,'a'b')",
            "contains(serialNumber,'a'b'c')",
            "contains(userPrincipalName,'a')",
            "userPrincipalName ne 'a'",
            "startswith(serialNumber,'a')",
            "",
        ] {
            assert!(Filter::parse(f).is_err(), "{f}");
        }
    }
}
