//! cxr-serve: parses the configuration, starts listening at once (so `/health`
//! answers while models load), loads and warms the models in the background, then
//! turns `/ready` true. SIGINT/SIGTERM stop accepting, finish the requests in
//! flight, drain the model queues and join the workers.

use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use cxr::config::{LogFormat, ServeArgs};
use cxr::http::{AppState, ServerMetrics, build_app, openapi_yaml};
use tracing_subscriber::EnvFilter;

/// Rust's allocations in mimalloc (freed pages go back to the OS within
/// milliseconds), ONNX Runtime's in glibc's malloc (which keeps and reuses them):
/// large uploads do not stay resident after their request, and inference does not
/// page-fault its tensors afresh on every run.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let args = ServeArgs::parse();
    if args.print_openapi {
        print!("{}", openapi_yaml());
        return Ok(());
    }
    if let Some(name) = &args.new_api_key {
        print!(
            "{}",
            cxr::http::auth::new_key_text(name).map_err(anyhow::Error::msg)?
        );
        return Ok(());
    }
    if args.health_check {
        std::process::exit(i32::from(!health_check(args.port)));
    }
    args.validate()
        .map_err(anyhow::Error::msg)
        .context("invalid configuration")?;
    let filter =
        EnvFilter::try_from_env("CXR_LOG").unwrap_or_else(|_| EnvFilter::new("info,ort=warn"));
    match args.log_format {
        LogFormat::Text => tracing_subscriber::fmt()
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
            .with_env_filter(filter)
            .init(),
        LogFormat::Json => tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .init(),
    }
    // No secrets in this configuration; log it whole.
    tracing::info!(config = %serde_json::to_string(&args).unwrap_or_default(), "starting cxr-serve {}", env!("CARGO_PKG_VERSION"));
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?
        .block_on(serve(args))
}

/// `GET /health` on 127.0.0.1:`port` with a plain HTTP/1.1 request and a 3-second
/// budget; true when the status line says 200.
fn health_check(port: u16) -> bool {
    use std::io::{Read, Write};
    use std::net::{SocketAddr, TcpStream};
    use std::time::Duration;
    let timeout = Duration::from_secs(3);
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, timeout) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(timeout));
    let _ = stream.set_write_timeout(Some(timeout));
    let request =
        format!("GET /health HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n");
    if stream.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).is_ok() && head.starts_with(b"HTTP/1.1 200")
}

/// The app's state: limits, metrics, API keys, audit file and UID root from `args`.
fn app_state(args: &ServeArgs, metrics: Arc<ServerMetrics>) -> anyhow::Result<AppState> {
    let mut state = AppState::new(args.limits(), metrics);
    match &args.api_keys_file {
        Some(path) => {
            let keys = cxr::http::auth::ApiKeys::load(path).map_err(anyhow::Error::msg)?;
            tracing::info!(callers = keys.len(), file = %path.display(), "API keys required on /predict and /models");
            state = state.with_api_keys(keys);
        }
        None => tracing::warn!(
            "no --api-keys-file: /predict and /models are open to anyone who can reach this port"
        ),
    }
    if let Some(path) = &args.audit_log {
        let (audit, problem) = cxr::audit::Audit::with_file(path, args.audit_log_max_bytes);
        match problem {
            None => tracing::info!(file = %path.display(), "audit records also go to the file"),
            Some(e) => tracing::error!(
                file = %path.display(), error = %e,
                "cannot open the audit file: every /predict answers 503 audit_unavailable until it can be written"
            ),
        }
        state = state.with_audit(audit);
    }
    if let Some(root) = &args.uid_root {
        state = state.with_uid_root(root.clone());
    }
    Ok(state)
}

/// Loads the models on the blocking pool; hands them to `state` when ready, or the
/// error to `failed` (which stops the server). Returns their worker threads.
fn spawn_loader(
    args: &ServeArgs,
    state: &AppState,
    metrics: Arc<ServerMetrics>,
    failed_tx: tokio::sync::oneshot::Sender<String>,
) -> tokio::task::JoinHandle<Option<Vec<std::thread::JoinHandle<()>>>> {
    let load_cfg = args.load_config();
    let loader_state = state.clone();
    tokio::task::spawn_blocking(move || {
        match cxr::inference::load_models(&load_cfg, |name| metrics.observer(name)) {
            Ok((set, workers)) => {
                let names: Vec<String> = set.all().iter().map(|m| m.card.name.clone()).collect();
                loader_state.set_models(set);
                tracing::info!(models = ?names, "ready");
                Some(workers)
            }
            Err(e) => {
                let _ = failed_tx.send(e.to_string());
                None
            }
        }
    })
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let metrics = Arc::new(ServerMetrics::new());
    let mut state = app_state(&args, metrics.clone())?;
    let admin = match args.metrics_port {
        Some(port) => {
            let addr = format!("{}:{}", args.host, port);
            let l = tokio::net::TcpListener::bind(&addr)
                .await
                .with_context(|| format!("cannot listen on {addr} (--metrics-port)"))?;
            tracing::info!(metrics_addr = %l.local_addr()?, "metrics listener (/metrics is not on the API port)");
            state = state.without_public_metrics();
            Some(l)
        }
        None => None,
    };
    let addr = format!("{}:{}", args.host, args.port);
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))?;
    tracing::info!(addr = %listener.local_addr()?, "listening; loading models");

    // Load in the background: `/health` answers meanwhile, `/ready` says 503.
    let (failed_tx, failed_rx) = tokio::sync::oneshot::channel::<String>();
    let loader = spawn_loader(&args, &state, metrics, failed_tx);
    let app = build_app(state.clone());
    let load_error = Arc::new(std::sync::Mutex::new(None::<String>));
    let le = load_error.clone();
    // One stop signal for both listeners.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let admin_task = admin.map(|l| {
        let app = cxr::build_admin_app(state.clone());
        let mut rx = stop_rx.clone();
        tokio::spawn(cxr::http::server::serve(
            l,
            app,
            args.conn_limits(),
            async move {
                let _ = rx.wait_for(|s| *s).await;
            },
        ))
    });
    cxr::http::server::serve(listener, app, args.conn_limits(), async move {
        tokio::select! {
            () = shutdown_signal() => tracing::info!("shutdown signal: draining"),
            Ok(e) = failed_rx => { *le.lock().unwrap_or_else(|p| p.into_inner()) = Some(e); }
        }
    })
    .await;
    let _ = stop_tx.send(true);
    if let Some(t) = admin_task {
        let _ = t.await;
    }

    // The router's state handles are gone; dropping ours closes the model queues, and
    // each worker answers what is queued before it ends.
    let workers = loader.await.context("model loader")?;
    drop(state);
    for w in workers.into_iter().flatten() {
        let _ = w.join();
    }
    if let Some(e) = load_error.lock().unwrap_or_else(|p| p.into_inner()).take() {
        anyhow::bail!("cannot serve the models: {e}");
    }
    tracing::info!("stopped");
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}
