//! `-o json|text`: every command that reports something prints either lines for people or one
//! JSON document for scripts, whose field names are stable (docs/cli.md lists them).

use serde::Serialize;

#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Format {
    /// Lines and tables for people.
    #[default]
    Text,
    /// One JSON document on stdout; progress and diagnostics stay on stderr.
    Json,
}

/// The `-o` / `--output` flag, flattened into each reporting command.
#[derive(clap::Args, Debug, Clone, Copy)]
pub struct OutputArg {
    /// Output format: text for people, json for scripts (field names in docs/cli.md).
    #[arg(
        id = "output",
        short = 'o',
        long = "output",
        value_name = "FORMAT",
        value_enum,
        default_value_t
    )]
    pub format: Format,
}

impl OutputArg {
    pub fn is_json(self) -> bool {
        self.format == Format::Json
    }
}

/// Prints `value` as pretty JSON on stdout.
pub fn print_json(value: &impl Serialize) {
    let text = serde_json::to_string_pretty(value).expect("a report serialises");
    println!("{text}");
}
