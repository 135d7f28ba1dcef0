//! mpt-server: the OpenAI-compatible HTTP API over the MPT engine.
//!
//! [`app`] builds the router from an [`AppState`] (tests can drive it without a socket);
//! [`run`] binds, loads the model in the background (probes answer meanwhile), serves, and on
//! SIGTERM/SIGINT drains and returns; [`start`] does the same for tests and embedders, handing
//! back the bound address and a shutdown trigger.
//!
//! Invariants: the engine runs on its own thread, never on a tokio worker; the listener keeps
//! accepting while draining so late requests get a 503 instead of a refused connection; `run`
//! returns `Ok` after a clean drain.

pub mod chat_template;
pub mod config;
pub mod error;
pub mod generation;
pub mod metrics;
pub mod openai;
pub mod openapi;
mod progress;
pub mod routes;
pub mod shutdown;
pub mod sse;
pub mod state;

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::http::HeaderValue;
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Router};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use mpt_engine::{EngineError, EngineHandle};
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::cors::{AllowOrigin, Any, CorsLayer};
use utoipa_axum::router::OpenApiRouter;

use crate::chat_template::ChatTemplate;
use crate::config::{ConfigError, LogFormat, ServerConfig};
use crate::error::ApiError;
use crate::openapi::ApiDocument;
use crate::state::{AppState, Loaded, StateConfig};

/// How long open connections get to finish after the drain before the server exits.
pub const CONNECTION_CLOSE_GRACE: Duration = Duration::from_secs(5);
/// How often the server checks that the engine thread is alive; once it is dead the server
/// exits with an error, so that a supervisor (Kubernetes) restarts it.
pub const ENGINE_WATCH_INTERVAL: Duration = Duration::from_millis(500);

/// Why the server could not start or stopped abnormally.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Bad configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The address could not be bound.
    #[error("cannot bind {addr}: {source}")]
    Bind {
        /// The address.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
    /// The model failed to load.
    #[error("cannot start the engine: {0}")]
    Engine(#[from] EngineError),
    /// The model's chat template does not compile.
    #[error("invalid chat_template in tokenizer_config.json: {0}")]
    ChatTemplate(String),
    /// The engine loader thread panicked.
    #[error("the engine loader panicked")]
    LoaderPanicked,
    /// The engine thread died while serving; the process should be restarted.
    #[error("the engine thread died; exiting so that the server is restarted")]
    EngineDied,
}

fn panic_response(panic: Box<dyn std::any::Any + Send + 'static>) -> Response {
    let detail = panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "unknown panic".to_string());
    ApiError::Internal(format!("handler panicked: {detail}")).into_response()
}

fn cors_layer(origins: &[String]) -> CorsLayer {
    let layer = CorsLayer::new().allow_methods(Any).allow_headers(Any);
    if origins.iter().any(|o| o == "*") {
        layer.allow_origin(Any)
    } else {
        let list: Vec<HeaderValue> = origins
            .iter()
            .filter_map(|o| HeaderValue::from_str(o).ok())
            .collect();
        layer.allow_origin(AllowOrigin::list(list))
    }
}

/// The router with every route and middleware, and `/openapi.json` describing exactly those
/// routes; CORS only when origins are configured.
///
/// Every route is registered with `routes!`, which takes its path and methods from the
/// handler's `#[utoipa::path]` attribute and adds the operation to the document: a route added
/// any other way would be missing from the document (a test walks the router to check).
pub fn app(state: AppState) -> Router {
    let config = state.config();
    let cors_allow_origin = config.cors_allow_origin.clone();
    use routes::*;
    // The API proper, behind the API key; probes, metrics and the document stay open.
    let mut api = OpenApiRouter::new()
        .routes(utoipa_axum::routes!(completions::completions))
        .routes(utoipa_axum::routes!(chat::chat_completions))
        .routes(utoipa_axum::routes!(models::list_models))
        .routes(utoipa_axum::routes!(tokenize::tokenize))
        .routes(utoipa_axum::routes!(tokenize::detokenize));
    crate::openapi::protect(api.get_openapi_mut(), config.api_key.is_some());
    let api = api.route_layer(middleware::from_fn_with_state(
        state.clone(),
        require_api_key,
    ));
    let (router, document) = OpenApiRouter::with_openapi(crate::openapi::base())
        .merge(api)
        .routes(utoipa_axum::routes!(health::health))
        .routes(utoipa_axum::routes!(health::ready))
        .routes(utoipa_axum::routes!(health::metrics))
        .routes(utoipa_axum::routes!(openapi::openapi_json))
        .split_for_parts();
    let document = ApiDocument::new(&crate::openapi::finish(document, config));
    let router = router
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(Extension(document))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(CatchPanicLayer::custom(panic_response))
        .layer(middleware::from_fn_with_state(state.clone(), track))
        .with_state(state);
    if cors_allow_origin.is_empty() {
        router
    } else {
        router.layer(cors_layer(&cors_allow_origin))
    }
}

/// Sets up `tracing` output (text or JSON), filtered by `RUST_LOG` (default `info`).
pub fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only on a terminal: log files and collectors get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout())
        && std::env::var_os("NO_COLOR").is_none();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// Loads the engine (blocking; call on a blocking thread) and prepares what the routes need.
fn load(config: &ServerConfig) -> Result<Loaded, ServerError> {
    let engine = EngineHandle::start_reporting(config.engine_config(), progress::loading_bar())?;
    let info = engine.model_info().clone();
    let chat_template = ChatTemplate::new(info.chat_template.as_deref())
        .map_err(|e| ServerError::ChatTemplate(e.to_string()))?;
    let im_end_id = engine.tokenizer().token_to_id(chat_template::IM_END);
    tracing::info!(
        max_model_len = info.max_model_len,
        vocab_size = info.vocab_size,
        chat_template = if chat_template.is_custom() {
            "model"
        } else {
            "chatml"
        },
        "model loaded"
    );
    Ok(Loaded {
        engine,
        chat_template,
        im_end_id,
    })
}

/// A server started by [`start`].
pub struct RunningServer {
    addr: SocketAddr,
    state: AppState,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), ServerError>>,
}

impl RunningServer {
    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The shared state (metrics, in-flight count).
    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Waits until the server stops by itself (the engine died), without triggering a drain.
    pub async fn stopped(mut self) -> Result<(), ServerError> {
        let result = (&mut self.task)
            .await
            .map_err(|_| ServerError::LoaderPanicked)?;
        self.stop.take();
        result
    }

    /// Triggers the same drain as SIGTERM and waits for the server to stop.
    pub async fn shutdown(mut self) -> Result<(), ServerError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.await.map_err(|_| ServerError::LoaderPanicked)?
    }
}

/// Binds `host:port` (port 0 picks one), loads the model and waits until it is ready to serve.
pub async fn start(config: ServerConfig) -> Result<RunningServer, ServerError> {
    let listener = bind(&config).await?;
    let addr = listener.local_addr().map_err(|source| ServerError::Bind {
        addr: format!("{}:{}", config.host, config.port),
        source,
    })?;
    let (stop, stopped) = oneshot::channel::<()>();
    let (ready_tx, mut ready_rx) = watch::channel(false);
    let state = new_state(&config);
    let task = tokio::spawn(serve(
        config,
        listener,
        state.clone(),
        Some(ready_tx),
        async {
            let _ = stopped.await;
        },
    ));
    let mut server = RunningServer {
        addr,
        state,
        stop: Some(stop),
        task,
    };
    // Wait for the model (or for the server task to fail).
    if ready_rx.wait_for(|ready| *ready).await.is_err() {
        let task = std::mem::replace(&mut server.task, tokio::spawn(async { Ok(()) }));
        return match task.await {
            Ok(Err(e)) => Err(e),
            _ => Err(ServerError::LoaderPanicked),
        };
    }
    Ok(server)
}

/// Binds, serves and drains on SIGTERM/SIGINT; `Ok` after a clean shutdown.
pub async fn run(config: ServerConfig) -> Result<(), ServerError> {
    let listener = bind(&config).await?;
    let state = new_state(&config);
    serve(config, listener, state, None, shutdown::signal()).await
}

fn new_state(config: &ServerConfig) -> AppState {
    AppState::new(StateConfig {
        model_name: config.served_model_name.clone(),
        api_key: config.api_key.clone(),
        max_inflight: config.max_num_seqs.saturating_add(config.max_queue_size),
        cors_allow_origin: config.cors_allow_origin.clone(),
        timeouts: config.timeouts,
        allow_unknown_fields: config.allow_unknown_fields,
    })
}

async fn bind(config: &ServerConfig) -> Result<TcpListener, ServerError> {
    let addr = format!("{}:{}", config.host, config.port);
    TcpListener::bind(&addr)
        .await
        .map_err(|source| ServerError::Bind { addr, source })
}

async fn serve(
    config: ServerConfig,
    listener: TcpListener,
    state: AppState,
    ready: Option<watch::Sender<bool>>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    tracing::info!(config = %config.redacted(), "starting mpt-server");
    if config.model.is_none() {
        tracing::warn!(
            "no --model given: serving the bundled demo model `{}` (a tiny MPT trained on Shakespeare: it writes nothing else)",
            config.served_model_name
        );
    }
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "listening (the model is loading; /ready turns 200 when it is loaded)");
    }
    let router = app(state.clone());
    let load_config = config.clone();
    let mut loader = tokio::task::spawn_blocking(move || load(&load_config));
    let mut loading = true;
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(config.timeouts.header_read);
    let graceful = GracefulShutdown::new();
    let drain_state = state.clone();
    let shutdown_timeout = config.shutdown_timeout;
    let drained = async move {
        shutdown.await;
        shutdown::drain(&drain_state, shutdown_timeout).await;
    };
    tokio::pin!(drained);
    let mut watch = tokio::time::interval(ENGINE_WATCH_INTERVAL);
    let mut outcome = Ok(());
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, _) = match accepted {
                    Ok(conn) => conn,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                // Streamed tokens are small writes: with Nagle's algorithm one written while
                // the previous is unacknowledged waits for the client's delayed ACK (~40 ms).
                if let Err(e) = stream.set_nodelay(true) {
                    tracing::debug!(error = %e, "cannot set TCP_NODELAY");
                }
                let service = TowerToHyperService::new(router.clone());
                let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
                let connection = graceful.watch(connection.into_owned());
                tokio::spawn(async move {
                    if let Err(e) = connection.await {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                });
            }
            loaded = &mut loader, if loading => {
                loading = false;
                match loaded {
                    Ok(Ok(loaded)) => {
                        state.set_loaded(loaded);
                        if let Some(ready) = &ready {
                            let _ = ready.send(true);
                        }
                        tracing::info!("ready");
                    }
                    Ok(Err(e)) => {
                        tracing::error!(error = %e, "model failed to load");
                        return Err(e);
                    }
                    Err(_) => return Err(ServerError::LoaderPanicked),
                }
            }
            _ = watch.tick(), if !loading => {
                if state.loaded().is_ok_and(|l| !l.engine.is_alive()) {
                    tracing::error!("the engine thread died: failing what is in flight and exiting");
                    outcome = Err(ServerError::EngineDied);
                    break;
                }
            }
            _ = &mut drained => break,
        }
    }
    drop(listener);
    if tokio::time::timeout(CONNECTION_CLOSE_GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("some connections were still open at exit");
    }
    if outcome.is_ok() {
        tracing::info!("shut down cleanly");
    }
    outcome
}
