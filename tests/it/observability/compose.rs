//! The local stack (deploy/compose.yaml and what it mounts): every service and bind-mounted file
//! there, the worker and the intake on their configuration with health checks and stop grace
//! periods that fit it, and Prometheus scraping both under the job names the alerts and the
//! dashboard select.

use super::*;

#[test]
fn the_compose_stack_hangs_together() {
    let compose = yaml("deploy/compose.yaml");
    let services = compose["services"].as_mapping().expect("services");
    for name in [
        "rabbitmq",
        "worker",
        "graph-sim",
        "intake",
        "prometheus",
        "grafana",
    ] {
        assert!(services.contains_key(name), "compose has {name}");
    }
    // Every bind-mounted file exists (relative to deploy/, the compose file's directory).
    for (name, service) in services {
        for volume in service["volumes"].as_sequence().into_iter().flatten() {
            let source = str_of(volume, "volume").split(':').next().unwrap();
            if source.starts_with('.') {
                assert!(
                    repo("deploy").join(source).exists(),
                    "{name:?} mounts {source}, which does not exist"
                );
            }
        }
    }
    let worker = &compose["services"]["worker"];
    assert!(
        worker["command"].is_null() || worker["command"][0].as_str() == Some("run"),
        "the worker runs `run`"
    );
    let config = str_of(&worker["environment"]["UNASSIGN_CONFIG"], "UNASSIGN_CONFIG");
    let mounted = worker["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|v| str_of(v, "volume").split(':').collect::<Vec<_>>())
        .find(|parts| parts[1] == config)
        .expect("the worker's config file is mounted");
    let settings = settings_with(
        &std::fs::read_to_string(repo("deploy").join(mounted[0])).unwrap(),
        mounted[0],
    );
    // Health: the worker's `probe` on its own listen port (a known one, not 0), as the image's
    // HEALTHCHECK does; graph-sim, from the same image, probes a path it serves instead.
    let probe = |service: &Yaml| -> Vec<String> {
        service["healthcheck"]["test"]
            .as_sequence()
            .expect("a healthcheck")
            .iter()
            .map(|v| str_of(v, "test").to_owned())
            .collect()
    };
    assert_eq!(
        probe(worker),
        ["CMD", "/usr/local/bin/unassign-worker", "probe"]
    );
    assert_ne!(settings.http.listen.port(), 0, "probe needs a known port");
    assert!(probe(&compose["services"]["graph-sim"]).contains(&"/_sim/stats".to_owned()));
    let dockerfile = std::fs::read_to_string(repo("deploy/Dockerfile")).unwrap();
    assert!(
        dockerfile.contains(r#"CMD ["/usr/local/bin/unassign-worker", "probe"]"#),
        "the image's HEALTHCHECK probes"
    );
    let stop = str_of(&worker["stop_grace_period"], "stop_grace_period");
    let stop: u64 = stop.strip_suffix('s').expect("seconds").parse().unwrap();
    assert!(
        stop > settings.worker.shutdown_grace.as_secs() + 5,
        "stop_grace_period {stop}s must exceed worker.shutdown_grace_secs + 5"
    );
    // Prometheus scrapes the worker under the job name the alerts select on, with the rules.
    let prometheus = yaml("deploy/compose/prometheus.yml");
    let jobs: Vec<&str> = prometheus["scrape_configs"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|j| str_of(&j["job_name"], "job_name"))
        .collect();
    assert!(jobs.contains(&JOB));
    assert_eq!(
        prometheus["scrape_configs"][0]["static_configs"][0]["targets"][0].as_str(),
        Some(format!("worker:{}", settings.http.listen.port()).as_str())
    );
    // The intake: its command, credentials files, grace, and its scrape job.
    let intake = &compose["services"]["intake"];
    assert_eq!(intake["command"][0].as_str(), Some("intake"));
    let env = &intake["environment"];
    let mounts: Vec<Vec<&str>> = intake["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|v| str_of(v, "volume").split(':').collect())
        .collect();
    for var in [
        "UNASSIGN__INTAKE__BEARER_TOKEN_FILE",
        "UNASSIGN__INTAKE__HMAC_SECRET_FILE",
    ] {
        let path = str_of(&env[var], var);
        assert!(
            mounts.iter().any(|m| m[1] == path),
            "the intake's {var} ({path}) is mounted"
        );
    }
    let stop = str_of(&intake["stop_grace_period"], "stop_grace_period");
    let stop: u64 = stop.strip_suffix('s').expect("seconds").parse().unwrap();
    assert!(stop > settings.intake.shutdown_grace.as_secs() + 5);
    let intake_job = prometheus["scrape_configs"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|j| j["job_name"].as_str() == Some(INTAKE_JOB))
        .expect("Prometheus scrapes the intake as unassign-intake");
    assert_eq!(
        intake_job["static_configs"][0]["targets"][0].as_str(),
        Some(format!("intake:{}", settings.intake.metrics_listen.port()).as_str())
    );
    let datasources = yaml("deploy/compose/grafana/datasources.yaml");
    assert_eq!(
        datasources["datasources"][0]["type"].as_str(),
        Some("prometheus")
    );
}
