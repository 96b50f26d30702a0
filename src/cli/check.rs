//! `check`: configuration, broker and a token for each tenant profile, one line each, so an
//! operator sees at once which part of a deployment is wrong.

use std::{path::PathBuf, time::Duration};

use lapin::{options::QueueDeclareOptions, types::FieldTable};

use super::CliError;
use crate::{amqp, auth::TokenSource, config::Settings, graph, metrics::Metrics};

/// Prints one line per check; fails (exit 1, or 2 for configuration) unless all pass.
pub async fn check(config: Option<PathBuf>) -> Result<(), CliError> {
    let settings = match Settings::load(config) {
        Ok(s) => s,
        Err(e) => {
            println!("FAIL config: {}", e.0);
            return Err(e.into());
        }
    };
    let profiles = match settings.tenant_profiles() {
        Ok(p) => p,
        Err(e) => {
            println!("FAIL config: {}", e.0);
            return Err(e.into());
        }
    };
    for p in &profiles {
        let c = &p.credentials;
        println!(
            "ok   config: tenant {} ({}), client {}, {}, graph {}",
            p.name,
            c.tenant_id,
            c.client_id,
            c.credential.describe(),
            settings.graph.base_url
        );
    }
    let broker = check_broker(&settings).await;
    match &broker {
        Ok(detail) => println!("ok   broker: {detail}"),
        Err(e) => println!("FAIL broker: {} — {e:#}", settings.amqp.redacted_url()),
    }
    let http = graph::http_client(Duration::from_secs(settings.graph.timeout_secs));
    let mut tokens_ok = true;
    for p in profiles {
        let (scope, authority) = (p.credentials.scope.clone(), p.credentials.token_url());
        let metrics = std::sync::Arc::new(Metrics::new());
        let tokens = TokenSource::new(http.clone(), p.credentials, p.name.clone(), metrics);
        match tokens.token().await {
            Ok(_) => println!(
                "ok   token: {} obtained for {scope} from {authority}",
                p.name
            ),
            Err(e) => {
                tokens_ok = false;
                println!("FAIL token: {}: {e}", p.name);
            }
        }
    }
    if broker.is_err() || !tokens_ok {
        return Err(CliError::Runtime(anyhow::anyhow!("some checks failed")));
    }
    Ok(())
}

async fn check_broker(settings: &Settings) -> anyhow::Result<String> {
    let amqp = &settings.amqp;
    let (connection, node) = amqp::connect(amqp, "unassign-worker/check", 0).await?;
    let node = &amqp.url.labels()[node];
    let channel = connection.create_channel().await?;
    let passive = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let detail = match channel
        .queue_declare(amqp.queue.as_str().into(), passive, FieldTable::default())
        .await
    {
        Ok(q) => format!(
            "{node} reachable; queue {} has {} ready, {} consumer(s)",
            amqp.queue,
            q.message_count(),
            q.consumer_count()
        ),
        Err(_) => format!(
            "{node} reachable; queue {} not declared yet (run declares it)",
            amqp.queue
        ),
    };
    let _ = connection.close(200, "done".into()).await;
    Ok(detail)
}
