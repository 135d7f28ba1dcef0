//! Graceful shutdown: SIGTERM/SIGINT start a drain — readiness and new requests get 503 at once,
//! in-flight requests finish, and after `--shutdown-timeout` whatever is left is aborted.
//!
//! Invariants: [`drain`] returns only once no request is in flight or the timeout (plus a short
//! grace period for aborted streams to send their last events) has passed; it never blocks the
//! engine thread.

use std::time::Duration;

use crate::state::AppState;

/// Time aborted requests get to send their final events after `abort_all`.
pub const ABORT_GRACE: Duration = Duration::from_secs(5);

/// Resolves on the first SIGTERM or SIGINT (Ctrl-C).
pub async fn signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for SIGINT");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => tracing::info!("SIGINT received: draining"),
        _ = term => tracing::info!("SIGTERM received: draining"),
    }
}

/// Stops admitting work, waits up to `timeout` for in-flight requests, then aborts the rest.
pub async fn drain(state: &AppState, timeout: Duration) {
    state.start_draining();
    let inflight = state.inflight();
    tracing::info!(
        inflight,
        timeout_s = timeout.as_secs_f64(),
        "draining: new requests get 503"
    );
    if tokio::time::timeout(timeout, state.wait_idle())
        .await
        .is_ok()
    {
        tracing::info!("drained: all requests finished");
        return;
    }
    tracing::warn!(
        inflight = state.inflight(),
        "shutdown timeout reached: aborting remaining requests"
    );
    if let Some(engine) = state.engine() {
        engine.abort_all();
    }
    if tokio::time::timeout(ABORT_GRACE, state.wait_idle())
        .await
        .is_err()
    {
        tracing::warn!(
            inflight = state.inflight(),
            "aborted requests did not finish in time"
        );
    }
}
