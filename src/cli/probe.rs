//! `probe`: one GET to the worker's own HTTP server, exit 0 on 200 and 1 otherwise. The
//! distroless image has no shell and no curl, so this is its container health check.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use super::CliError;
use crate::config::Settings;

pub const EXAMPLES: &str = "\
Examples:
  unassign-worker probe                  # GET /readyz on http.listen
  unassign-worker probe --healthz        # GET /healthz: alive, even while the broker is away
  unassign-worker probe --path /metrics

Exit codes: 0 answered 200, 1 any other answer or none in time, 2 usage or configuration error.";

/// The most of the answer's body printed (the readiness JSON says why it is not ready).
const SHOWN_BODY: usize = 1024;

#[derive(clap::Args, Debug)]
pub struct ProbeArgs {
    /// GET /healthz (the process is alive) instead of /readyz (ready for work).
    #[arg(long, conflicts_with = "path")]
    healthz: bool,
    /// GET this path instead of /readyz.
    #[arg(long, value_name = "PATH", value_parser = absolute_path)]
    path: Option<String>,
    /// Seconds to wait for the answer, connecting included.
    #[arg(long, value_name = "SECONDS", default_value_t = 2,
          value_parser = clap::value_parser!(u64).range(1..=60))]
    timeout: u64,
}

fn absolute_path(path: &str) -> Result<String, String> {
    if path.starts_with('/') && !path.starts_with("//") {
        Ok(path.to_owned())
    } else {
        Err("must start with a single / (a path on the worker's server, not a URL)".to_owned())
    }
}

pub async fn probe(args: ProbeArgs, config: Option<PathBuf>) -> Result<(), CliError> {
    let settings = Settings::load(config)?;
    let address = target(settings.http.listen)?;
    let path = match (&args.path, args.healthz) {
        (Some(path), _) => path.as_str(),
        (None, true) => "/healthz",
        (None, false) => "/readyz",
    };
    let url = format!("http://{address}{path}");
    // No proxy: the worker is on this host, and an HTTP_PROXY in the environment must not
    // answer for it.
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(args.timeout))
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("the HTTP client builds");
    let mut response = client
        .get(&url)
        .send()
        .await
        .map_err(|e| anyhow::Error::new(e).context(format!("GET {url}")))?;
    let status = response.status();
    // Read no more than is shown: whatever answers on that port cannot make us buffer much.
    let mut body = Vec::new();
    while body.len() < SHOWN_BODY * 4 {
        match response.chunk().await {
            Ok(Some(chunk)) => body.extend_from_slice(&chunk),
            Ok(None) | Err(_) => break,
        }
    }
    let body = String::from_utf8_lossy(&body);
    println!(
        "{} {url} {status}",
        if status == 200 { "ok" } else { "FAIL" }
    );
    if !body.is_empty() {
        println!("{}", shown(&body));
    }
    if status != 200 {
        return Err(CliError::Reported {
            code: 1,
            summary: format!("GET {url} answered {status}"),
        });
    }
    Ok(())
}

/// Where to reach a server listening on `listen`: a wildcard address is reached on loopback.
fn target(listen: SocketAddr) -> Result<SocketAddr, CliError> {
    if listen.port() == 0 {
        return Err(CliError::Usage(
            "`http.listen` has port 0 (any free port): there is no known port to probe".to_owned(),
        ));
    }
    let ip = match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    Ok(SocketAddr::new(ip, listen.port()))
}

/// At most [`SHOWN_BODY`] characters, control characters as spaces: whatever answers on that
/// port, it cannot drive the terminal or flood a container's health log.
fn shown(body: &str) -> String {
    body.trim_end()
        .chars()
        .take(SHOWN_BODY)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wildcard_listen_address_is_probed_on_loopback() {
        let at = |s: &str| target(s.parse().unwrap()).map(|a| a.to_string()).ok();
        assert_eq!(at("0.0.0.0:9464").as_deref(), Some("127.0.0.1:9464"));
        assert_eq!(at("[::]:9464").as_deref(), Some("[::1]:9464"));
        assert_eq!(at("10.1.2.3:80").as_deref(), Some("10.1.2.3:80"));
        assert_eq!(at("127.0.0.1:0"), None);
    }

    #[test]
    fn paths_stay_on_the_worker() {
        assert!(absolute_path("/metrics").is_ok());
        for bad in ["metrics", "//evil.example/x", "http://x/readyz", ""] {
            assert!(absolute_path(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_hostile_body_is_cut_and_cleaned() {
        assert_eq!(shown("{\"ready\":true}\n"), "{\"ready\":true}");
        assert_eq!(shown("a\u{1b}[2Jb"), "a [2Jb");
        assert_eq!(shown(&"x".repeat(5000)).len(), SHOWN_BODY);
    }
}
