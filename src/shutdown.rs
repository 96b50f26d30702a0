//! The shutdown signal, as a value: `main` cancels a token on SIGTERM/SIGINT, tests cancel it
//! themselves, and everything that must stop watches the same token.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// The exit code of a shutdown the watchdog forced. Not 0: the process did not stop in order
/// (something hung), and the orchestrator's record should say so.
const FORCED_EXIT: i32 = 1;

/// Cancels `token` on SIGTERM or SIGINT. After the signal, a watchdog ends the process once
/// `grace` + 4 s have passed, so an orchestrator never has to SIGKILL us: whatever is still
/// unacked then is requeued by the broker, so exiting loses nothing.
pub fn on_signal(token: CancellationToken, grace: Duration) {
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!(grace_secs = grace.as_secs(), "shutdown requested");
        token.cancel();
        std::thread::spawn(move || {
            std::thread::sleep(grace + Duration::from_secs(4));
            tracing::error!(
                exit_code = FORCED_EXIT,
                "grace period exceeded; exiting without a clean shutdown"
            );
            std::process::exit(FORCED_EXIT);
        });
    });
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing a SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
