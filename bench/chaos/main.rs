//! Chaos bench: faults injected while a worker process drains jobs against graph-sim; every
//! request id must end with an outcome event, and no fault may cause a dead letter. Prints one
//! table row per scenario (for RELIABILITY.md).
//!
//!     bench/run.sh chaos                          # every scenario
//!     bench/run.sh chaos --only kill,graph-outage # some of them (names: `--only list`)
//!     bench/run.sh chaos --outage-secs 120        # length of the Graph outages
//!
//! The worker reaches the broker through a TCP relay of the bench's own (network faults), and the
//! broker scenarios stop, start and kill the broker node named by `CHAOS_RABBITMQ_NODE`, which
//! `bench/run.sh` points at a private node so that nothing else on the machine is disturbed.

mod faults;
mod stage;

use test_support::bench as common;

use std::time::Duration;

use stage::Row;

/// A scenario: its name for `--only`, and how to run it.
struct Scenario {
    name: &'static str,
    run: fn(&Flags) -> futures_util::future::BoxFuture<'_, anyhow::Result<Row>>,
}

/// The bench's command line.
pub struct Flags {
    pub jobs: usize,
    pub outage: Duration,
}

const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "kill",
        run: |f| Box::pin(faults::kill(f)),
    },
    Scenario {
        name: "sigterm",
        run: |f| Box::pin(faults::sigterm(f)),
    },
    Scenario {
        name: "sigterm-throttled",
        run: |f| Box::pin(faults::sigterm_throttled(f)),
    },
    Scenario {
        name: "broker-restart",
        run: |f| Box::pin(faults::broker_restart(f)),
    },
    Scenario {
        name: "broker-kill",
        run: |f| Box::pin(faults::broker_kill(f)),
    },
    Scenario {
        name: "net-drop",
        run: |f| Box::pin(faults::net_drop(f)),
    },
    Scenario {
        name: "net-stall",
        run: |f| Box::pin(faults::net_stall(f)),
    },
    Scenario {
        name: "net-slow",
        run: |f| Box::pin(faults::net_slow(f)),
    },
    Scenario {
        name: "graph-outage",
        run: |f| Box::pin(faults::graph_outage(f, false)),
    },
    Scenario {
        name: "graph-outage-ra",
        run: |f| Box::pin(faults::graph_outage(f, true)),
    },
    Scenario {
        name: "graph-slow",
        run: |f| Box::pin(faults::graph_slow(f)),
    },
    Scenario {
        name: "credentials",
        run: |f| Box::pin(faults::credentials_revoked(f)),
    },
    Scenario {
        name: "replicas",
        run: |f| Box::pin(faults::replicas(f)),
    },
];

fn flags() -> anyhow::Result<(Flags, Option<String>)> {
    let mut flags = Flags {
        jobs: 5000,
        outage: Duration::from_secs(120),
    };
    let mut only = None;
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let Some(value) = it.next() else {
            anyhow::bail!("{flag} needs a value")
        };
        match flag.as_str() {
            "--jobs" => flags.jobs = value.parse()?,
            "--outage-secs" => flags.outage = Duration::from_secs(value.parse()?),
            "--only" => only = Some(value),
            other => anyhow::bail!("unknown flag {other}"),
        }
    }
    Ok((flags, only))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let (flags, only) = flags()?;
    let names: Vec<_> = SCENARIOS.iter().map(|s| s.name).collect();
    let only: Option<Vec<String>> = only.map(|o| o.split(',').map(str::to_owned).collect());
    for name in only.iter().flatten() {
        anyhow::ensure!(names.contains(&name.as_str()), "scenarios: {names:?}");
    }
    let mut rows = Vec::new();
    for scenario in SCENARIOS {
        if only
            .as_ref()
            .is_none_or(|o| o.iter().any(|n| n == scenario.name))
        {
            eprintln!("chaos: {} …", scenario.name);
            let row = (scenario.run)(&flags).await?;
            eprintln!("{}", row.line());
            rows.push(row);
        }
    }
    println!("{}", Row::HEADER);
    for row in &rows {
        println!("{}", row.line());
    }
    println!();
    for row in &rows {
        println!("- {}: {}", row.scenario, row.notes.join("; "));
    }
    Ok(())
}
