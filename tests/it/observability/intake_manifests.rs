//! The intake's Kubernetes manifests as written (deploy/kubernetes/intake and its monitoring
//! component), beside the worker's: its pods apart from the worker's, the worker's ConfigMap and
//! broker Secret, its own credentials files, ports and probes as the settings say, the Service
//! named for the scrape job, TLS on the Ingress, and a NetworkPolicy letting in its two ports.

use super::*;

#[test]
fn intake_manifests_hang_together() {
    let m = Manifests::load(&[INTAKE_KIT, INTAKE_MONITORING]);
    let worker = Manifests::load(&[KUSTOMIZE_BASE, MONITORING]);
    let settings = settings_with(
        str_of(
            &worker.get("ConfigMap")["data"]["config.toml"],
            "config.toml",
        ),
        "the worker's ConfigMap",
    );
    let deployment = m.get("Deployment");
    let pod = &deployment["spec"]["template"];
    let spec = &pod["spec"];
    let labels = &pod["metadata"]["labels"];
    assert!(selects(
        &deployment["spec"]["selector"]["matchLabels"],
        labels
    ));
    assert!(
        !selects(
            &worker.get("Deployment")["spec"]["selector"]["matchLabels"],
            labels
        ),
        "the worker's selectors do not pick the intake's pods"
    );
    let c = &spec["containers"][0];
    assert_eq!(c["args"][0].as_str(), Some("intake"));
    let termination = spec["terminationGracePeriodSeconds"].as_u64().unwrap();
    assert!(termination > settings.intake.shutdown_grace.as_secs() + 5);
    restricted(spec, c);

    // It reads the worker's ConfigMap and broker Secret, and its own credentials files.
    let config_path = str_of(
        &env_value(c, "UNASSIGN_CONFIG").expect("UNASSIGN_CONFIG")["value"],
        "UNASSIGN_CONFIG",
    );
    let (volume, _) = mounted(spec, c, config_path).expect("the config file is mounted");
    assert_eq!(
        volume["configMap"]["name"],
        worker.get("ConfigMap")["metadata"]["name"]
    );
    assert!(env_value(c, "AMQP_URL").unwrap()["valueFrom"]["secretKeyRef"].is_mapping());
    let example = yaml("deploy/kubernetes/intake/secret.example.yaml");
    for var in [
        "UNASSIGN__INTAKE__BEARER_TOKEN_FILE",
        "UNASSIGN__INTAKE__HMAC_SECRET_FILE",
    ] {
        let path = str_of(&env_value(c, var).expect(var)["value"], var);
        let (volume, file) = mounted(spec, c, path).unwrap_or_else(|| panic!("{var} is mounted"));
        assert_eq!(
            volume["secret"]["secretName"], example["metadata"]["name"],
            "{var} comes from the intake's Secret"
        );
        assert!(
            example["stringData"][file.as_str()].is_string(),
            "the Secret has {file}"
        );
    }

    // Ports and probes as the settings say; the public port only behind the Service and Ingress.
    let port = |name: &str| {
        c["ports"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|p| p["name"].as_str() == Some(name))
            .unwrap_or_else(|| panic!("a {name} port"))
            .clone()
    };
    let (http, metrics) = (port("http"), port("metrics"));
    assert_eq!(
        http["containerPort"].as_u64(),
        Some(u64::from(settings.intake.listen.port()))
    );
    assert_eq!(
        metrics["containerPort"].as_u64(),
        Some(u64::from(settings.intake.metrics_listen.port()))
    );
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        assert_eq!(c[probe]["httpGet"]["path"].as_str(), Some(path));
        assert_eq!(c[probe]["httpGet"]["port"], metrics["name"], "{probe}");
    }
    let service = m.get("Service");
    assert!(selects(&service["spec"]["selector"], labels));
    assert_eq!(
        str_of(&service["metadata"]["name"], "Service name"),
        INTAKE_JOB,
        "the ServiceMonitor's job label is the Service name, which the intake alert groups by"
    );
    let service_port = |name: &str| {
        service["spec"]["ports"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|p| p["name"].as_str() == Some(name))
            .unwrap_or_else(|| panic!("the Service has a {name} port"))
            .clone()
    };
    assert_eq!(service_port("http")["targetPort"], http["name"]);
    assert_eq!(service_port("metrics")["targetPort"], metrics["name"]);
    let monitor = m.get("ServiceMonitor");
    assert!(selects(
        &monitor["spec"]["selector"]["matchLabels"],
        &service["metadata"]["labels"]
    ));
    assert_eq!(
        monitor["spec"]["endpoints"][0]["port"].as_str(),
        Some("metrics")
    );

    // The Ingress terminates TLS for its host and routes /v1/ to the public port only.
    let ingress = m.get("Ingress");
    let rule = &ingress["spec"]["rules"][0];
    let tls_hosts = &ingress["spec"]["tls"][0]["hosts"];
    assert!(
        tls_hosts.as_sequence().unwrap().contains(&rule["host"]),
        "TLS covers the Ingress host"
    );
    assert!(ingress["spec"]["tls"][0]["secretName"].is_string());
    let paths = rule["http"]["paths"].as_sequence().unwrap();
    assert_eq!(paths.len(), 1);
    assert_eq!(paths[0]["path"].as_str(), Some("/v1/"));
    let backend = &paths[0]["backend"]["service"];
    assert_eq!(backend["name"], service["metadata"]["name"]);
    assert_eq!(backend["port"]["name"].as_str(), Some("http"));

    // The NetworkPolicy covers the pods and lets in only the two ports.
    let policy = m.get("NetworkPolicy");
    assert!(selects(
        &policy["spec"]["podSelector"]["matchLabels"],
        labels
    ));
    let allowed: BTreeSet<&str> = policy["spec"]["ingress"]
        .as_sequence()
        .unwrap()
        .iter()
        .flat_map(|rule| rule["ports"].as_sequence().unwrap())
        .map(|p| str_of(&p["port"], "port"))
        .collect();
    assert_eq!(allowed, BTreeSet::from(["http", "metrics"]));

    let pdb = m.get("PodDisruptionBudget");
    assert!(selects(&pdb["spec"]["selector"]["matchLabels"], labels));
    let replicas = deployment["spec"]["replicas"].as_u64().unwrap_or(1);
    assert!(pdb["spec"]["minAvailable"].as_u64().unwrap() < replicas);
}
