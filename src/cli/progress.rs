//! Progress of a long command on stderr: a bar (or, with no known total, a spinner) on a
//! terminal; elsewhere (logs, CI) a plain line every 10 % of a known total, and nothing else.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressState, ProgressStyle};

pub enum Progress {
    Bar(ProgressBar),
    Lines {
        total: usize,
        reported: usize,
        verb: &'static str,
    },
    Silent,
}

impl Progress {
    /// `verb` names what each step did ("confirmed", "replayed").
    pub fn new(total: Option<usize>, verb: &'static str) -> Self {
        if !std::io::stderr().is_terminal() {
            return match total {
                Some(total) => Self::Lines {
                    total,
                    reported: 0,
                    verb,
                },
                None => Self::Silent,
            };
        }
        let rate = |state: &ProgressState, w: &mut dyn std::fmt::Write| {
            let _ = write!(w, "{:.0}/s", state.per_sec());
        };
        let (bar, template) = match total {
            Some(total) => (
                ProgressBar::new(total as u64),
                format!("{{bar:40}} {{pos}}/{{len}} {verb}  {{rate}}  eta {{eta}}"),
            ),
            None => (
                ProgressBar::new_spinner(),
                format!("{{spinner}} {{pos}} {verb}  {{rate}}"),
            ),
        };
        let style = ProgressStyle::with_template(&template)
            .expect("a valid progress template")
            .with_key("rate", rate);
        bar.set_style(style);
        Self::Bar(bar)
    }

    pub fn update(&mut self, done: usize) {
        match self {
            Self::Bar(bar) => bar.set_position(done as u64),
            Self::Lines {
                total,
                reported,
                verb,
            } => {
                let tenth = done * 10 / (*total).max(1);
                if tenth > *reported {
                    *reported = tenth;
                    eprintln!("{verb} {done}/{total} ({}%)", tenth.min(10) * 10);
                }
            }
            Self::Silent => {}
        }
    }

    /// A line on stdout that does not tear the bar.
    pub fn println(&self, line: &str) {
        match self {
            Self::Bar(bar) => bar.suspend(|| println!("{line}")),
            _ => println!("{line}"),
        }
    }

    pub fn finish(&self) {
        if let Self::Bar(bar) = self {
            bar.finish_and_clear();
        }
    }
}
