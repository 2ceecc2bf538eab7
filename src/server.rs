//! Starting the service: logging, the store, the sweeper, the listener and graceful shutdown.

use std::sync::Arc;
use std::time::Duration;

use oncepay_core::store::Store;
use oncepay_core::time::{Clock, SystemClock};
use tokio::net::TcpListener;

use crate::config::ServeArgs;
use crate::http::auth::{ApiKeys, DEMO_API_KEYS};
use crate::http::{AppState, app};
use crate::metrics::Metrics;
use crate::store;

/// Any error that stops the server from starting.
pub type StartError = Box<dyn std::error::Error + Send + Sync>;

/// Sets up `tracing` output: `text` or `json`, filtered by `ONCEPAY_LOG` (default `info`).
pub fn init_logging(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("ONCEPAY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        "json" => builder.json().try_init(),
        _ => builder.try_init(),
    };
}

/// Runs the service until SIGTERM or Ctrl-C, then lets in-flight requests finish.
///
/// # Errors
///
/// When the API keys are malformed, the store cannot be opened or the address not bound.
pub async fn serve(args: ServeArgs) -> Result<(), StartError> {
    let demo = args.api_keys.is_none();
    if demo {
        tracing::warn!("no --api-keys configured: serving one tenant `demo` with key sk_test_demo");
    }
    if args.enable_fault_injection {
        tracing::warn!(
            "fault injection is enabled: the Oncepay-Fault header can crash this process"
        );
    }
    let api_keys = ApiKeys::parse(args.api_keys.as_deref().unwrap_or(DEMO_API_KEYS))?;
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let store = store::open_database(&args.database, args.policy(), clock.clone()).await?;
    let state = AppState {
        store: store.clone(),
        clock,
        metrics: Arc::new(Metrics::default()),
        api_keys: Arc::new(api_keys),
    };
    let sweeper = tokio::spawn(sweep_forever(store, args.sweep_interval));

    let listener = TcpListener::bind(args.listen).await?;
    let address = listener.local_addr()?;
    tracing::info!(%address, database = %redact_url(&args.database.database), "listening");
    announce(address, demo);
    axum::serve(listener, app(state, args.idempotency()))
        .with_graceful_shutdown(shutdown_signal())
        .await?;
    sweeper.abort();
    tracing::info!("shut down");
    Ok(())
}

/// Prints where the server listens and a first request to try, on stdout.
fn announce(address: std::net::SocketAddr, demo: bool) {
    let key = if demo {
        "sk_test_demo"
    } else {
        "<your API key>"
    };
    println!("oncepay listening on http://{address}");
    if demo {
        println!("demo API key: sk_test_demo");
    }
    println!(
        "try: curl -i -X POST http://{address}/v1/payments -H 'Authorization: Bearer {key}' \
         -H 'Idempotency-Key: first-payment' -H 'Content-Type: application/json' \
         -d '{{\"amount\": 1250, \"currency\": \"EUR\", \"customer_id\": \"cus_001\"}}'"
    );
}

/// Hides a password in a database URL before it is logged.
fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            format!("{}://***{}", &url[..scheme_end], &url[at..])
        }
        _ => url.to_owned(),
    }
}

async fn sweep_forever(store: Arc<dyn Store>, interval: Duration) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        match store.sweep().await {
            Ok(report) if report.tombstoned + report.deleted > 0 => {
                tracing::debug!(
                    tombstoned = report.tombstoned,
                    deleted = report.deleted,
                    "swept"
                );
            }
            Ok(_) => {}
            Err(err) => tracing::warn!(error = %err, "sweep failed; will try again"),
        }
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
    tracing::info!("shutdown requested; finishing in-flight requests");
}
