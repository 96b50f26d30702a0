//! The process metrics every Prometheus client exports, under their standard names
//! (`process_cpu_seconds_total`, `process_resident_memory_bytes`, `process_open_fds`,
//! `process_max_fds`, `process_start_time_seconds`), so the usual dashboards and alerts work
//! unchanged. Read from /proc at scrape time; where there is no /proc (not Linux) or a file cannot
//! be read, the metric is left out rather than reported as zero.

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{counter::ConstCounter, gauge::ConstGauge},
};

/// The kernel's clock ticks per second for `/proc/*/stat` (USER_HZ). It is 100 on every Linux
/// architecture still in use; the Go client hard-codes it too, which spares a libc call.
const USER_HZ: f64 = 100.0;

#[derive(Debug)]
pub(super) struct Process;

impl Collector for Process {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let stat = std::fs::read_to_string("/proc/self/stat")
            .ok()
            .and_then(|s| Stat::parse(&s));
        if let Some(stat) = &stat {
            // The encoder appends `_total` to counters.
            let cpu = ConstCounter::new((stat.utime + stat.stime) as f64 / USER_HZ);
            cpu.encode(encoder.encode_descriptor(
                "process_cpu_seconds",
                "Total user and system CPU time spent in seconds",
                None,
                cpu.metric_type(),
            )?)?;
        }
        if let Some(bytes) = resident_bytes() {
            gauge(
                &mut encoder,
                "process_resident_memory_bytes",
                "Resident memory size in bytes",
                bytes,
            )?;
        }
        if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
            // The directory handle read_dir holds is one of the entries: not counted.
            let open = fds.count().saturating_sub(1);
            gauge(
                &mut encoder,
                "process_open_fds",
                "Number of open file descriptors",
                open as f64,
            )?;
        }
        if let Some(max) = max_fds() {
            gauge(
                &mut encoder,
                "process_max_fds",
                "Maximum number of open file descriptors",
                max,
            )?;
        }
        if let (Some(stat), Some(boot)) = (&stat, boot_time()) {
            gauge(
                &mut encoder,
                "process_start_time_seconds",
                "Start time of the process since unix epoch in seconds",
                boot + stat.starttime as f64 / USER_HZ,
            )?;
        }
        Ok(())
    }
}

fn gauge(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: f64,
) -> Result<(), std::fmt::Error> {
    let gauge = ConstGauge::new(value);
    gauge.encode(encoder.encode_descriptor(name, help, None, gauge.metric_type())?)
}

/// The fields of `/proc/self/stat` used here, in clock ticks.
#[derive(Debug, PartialEq)]
struct Stat {
    utime: u64,
    stime: u64,
    /// Since boot.
    starttime: u64,
}

impl Stat {
    /// `pid (comm) state ppid …`: `comm` may hold spaces and parentheses, so fields are counted
    /// from the last `)`. After it, field 3 (state) is index 0: utime (14) is 11, stime (15) 12,
    /// starttime (22) 19.
    fn parse(stat: &str) -> Option<Stat> {
        let (_, rest) = stat.rsplit_once(')')?;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let field = |i: usize| fields.get(i)?.parse().ok();
        Some(Stat {
            utime: field(11)?,
            stime: field(12)?,
            starttime: field(19)?,
        })
    }
}

/// `VmRSS:   12345 kB` in /proc/self/status (in KiB whatever the page size).
fn resident_bytes() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    kib_field(&status, "VmRSS:").map(|kib| kib * 1024.0)
}

fn kib_field(status: &str, name: &str) -> Option<f64> {
    let line = status.lines().find_map(|l| l.strip_prefix(name))?;
    line.trim().strip_suffix("kB")?.trim().parse().ok()
}

/// The soft limit of `Max open files` in /proc/self/limits (`unlimited` reports nothing).
fn max_fds() -> Option<f64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    soft_limit(&limits, "Max open files")
}

fn soft_limit(limits: &str, name: &str) -> Option<f64> {
    let line = limits.lines().find_map(|l| l.strip_prefix(name))?;
    line.split_whitespace().next()?.parse().ok()
}

/// `btime` in /proc/stat: the boot time, in seconds since the epoch.
fn boot_time() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    stat.lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_after_the_command_name() {
        // A command name with spaces and a parenthesis must not shift the fields.
        let line = "4242 (a (b) c) S 1 4242 4242 0 -1 4194560 900 0 0 0 \
                    731 269 0 0 20 0 9 0 12345 3000000 600 18446744073709551615";
        assert_eq!(
            Stat::parse(line),
            Some(Stat {
                utime: 731,
                stime: 269,
                starttime: 12345
            })
        );
        assert_eq!(Stat::parse("4242 (truncated) S 1"), None);
    }

    #[test]
    fn status_and_limits_lines() {
        let status = "Name:\tunassign-worker\nVmRSS:\t   24576 kB\nThreads:\t9\n";
        assert_eq!(kib_field(status, "VmRSS:"), Some(24576.0));
        assert_eq!(kib_field(status, "VmSwap:"), None);
        let limits = "Limit                     Soft Limit           Hard Limit           Units     \n\
                      Max open files            1024                 524288               files     \n\
                      Max locked memory         unlimited            unlimited            bytes     \n";
        assert_eq!(soft_limit(limits, "Max open files"), Some(1024.0));
        assert_eq!(soft_limit(limits, "Max locked memory"), None);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn this_process_reports_every_metric() {
        let m = super::super::Metrics::new();
        let text = m.render();
        for name in [
            "# TYPE process_cpu_seconds counter",
            "process_cpu_seconds_total ",
            "process_resident_memory_bytes ",
            "process_open_fds ",
            "process_max_fds ",
            "process_start_time_seconds ",
        ] {
            assert!(text.contains(name), "missing {name} in\n{text}");
        }
        let value = |name: &str| -> f64 {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
                .unwrap()
                .parse()
                .unwrap()
        };
        assert!(value("process_resident_memory_bytes") > 1_000_000.0);
        assert!(value("process_open_fds") >= 3.0);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        let started = value("process_start_time_seconds");
        assert!(
            started <= now + 1.0 && started > now - 3600.0,
            "started {started}, now {now}"
        );
    }
}
