//! cxr-serve: parses the configuration, opens the metrics port at once (`/health`
//! and `/ready` answer there while models load), binds the API port, loads and warms
//! the models, and only then accepts API connections (`--listen-before-ready`: at
//! once, answering 503 until ready). SIGINT/SIGTERM stop accepting, finish the
//! requests in flight within `--shutdown-timeout-s`, drain the model queues and join
//! the workers.

use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use cxr::Core;
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
        // The metrics port answers from the start; the API port once models are loaded.
        let port = args.metrics_port.unwrap_or(args.port);
        std::process::exit(i32::from(!health_check(port)));
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
    quiet_panics();
    // No secrets in this configuration; log it whole.
    tracing::info!(config = %serde_json::to_string(&args).unwrap_or_default(), "starting cxr-serve {}", env!("CARGO_PKG_VERSION"));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    let result = match args.job.clone() {
        Some(dirs) => rt.block_on(job(args, &dirs[0], &dirs[1])),
        None => rt.block_on(serve(args)),
    };
    // A loader still reading models (a stop while loading) is not waited for.
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    result
}

/// Panics are logged as a fixed message with their place in the code, never their
/// message: on a path that handles patient files, a message can quote a value from
/// the file (a byte-offset panic on a DICOM text quotes the text). The request id is
/// on the log line through the request's span.
fn quiet_panics() {
    std::panic::set_hook(Box::new(|info| {
        let location = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        tracing::error!(
            location,
            "a thread panicked (its message is not logged: it may quote patient data)"
        );
    }));
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

/// The API keys from `args` (`--api-keys-file`), for every door that takes keys.
fn api_keys(args: &ServeArgs) -> anyhow::Result<Option<Arc<cxr::access::ApiKeys>>> {
    match &args.api_keys_file {
        Some(path) => {
            let keys = cxr::access::ApiKeys::load(path).map_err(anyhow::Error::msg)?;
            tracing::info!(callers = keys.len(), file = %path.display(), "API keys required on /predict and /models");
            Ok(Some(Arc::new(keys)))
        }
        None => {
            tracing::warn!(
                "no --api-keys-file: /predict and /models are open to anyone who can reach this port"
            );
            Ok(None)
        }
    }
}

/// The HTTP door's state: the core, the keys, and its own limits from `args`.
fn app_state(
    core: Core,
    keys: Option<Arc<cxr::access::ApiKeys>>,
    args: &ServeArgs,
) -> anyhow::Result<AppState> {
    let mut state = AppState::with_core(core)
        .with_body_limits(args.body_limits())
        .with_urgent_at(args.urgent_at().map_err(anyhow::Error::msg)?);
    if let Some(keys) = keys {
        state = state.with_api_keys(keys);
    }
    Ok(state)
}

/// The one prediction core every door shares: limits, metrics, the audit file, the
/// UID root, the outcomes store and the span exporter from `args`.
fn build_core(
    args: &ServeArgs,
    metrics: Arc<ServerMetrics>,
    exporter: Option<cxr::trace::Exporter>,
) -> anyhow::Result<Core> {
    let mut core = Core::builder(args.limits(), metrics);
    if let Some(path) = &args.audit_log {
        let (audit, problem) = cxr::audit::Audit::with_file(path, args.audit_log_max_bytes);
        match problem {
            None => tracing::info!(file = %path.display(), "audit records also go to the file"),
            Some(e) => tracing::error!(
                file = %path.display(), error = %e,
                "cannot open the audit file: every /predict answers 503 audit_unavailable until it can be written"
            ),
        }
        core = core.audit(audit);
    }
    if let Some(root) = &args.uid_root {
        core = core.uid_root(root.clone());
    }
    if let Some(x) = exporter {
        core = core.exporter(x);
    }
    // On a thread of its own: PostgreSQL's blocking client must not run inside the
    // async runtime.
    let outcomes = std::thread::scope(|s| {
        s.spawn(|| match (&args.database_url, &args.outcomes) {
            (Some(url), _) => Some(
                cxr::outcomes::Outcomes::connect(url, args.outcomes_window)
                    .and_then(|o| o.with_retention(args.retention())),
            ),
            (None, Some(path)) => Some(
                cxr::outcomes::Outcomes::open(path, args.outcomes_window)
                    .and_then(|o| o.with_retention(args.retention())),
            ),
            (None, None) => None,
        })
        .join()
        .unwrap_or_else(|_| {
            Some(Err(cxr::outcomes::OutcomesError(
                "the outcomes store panicked while opening".into(),
            )))
        })
    });
    if let Some(o) = outcomes {
        let o = o.map_err(anyhow::Error::msg)?;
        tracing::info!(
            store = o.kind(),
            window = o.window(),
            "answers and confirmed labels are kept (POST /feedback)"
        );
        core = core.outcomes(Arc::new(o));
    }
    Ok(core.build())
}

/// Loads the models on the blocking pool into the model repository; hands it to
/// `state` when ready and says so on `outcome` (or sends the error, which stops the
/// server).
fn spawn_loader(
    args: &ServeArgs,
    state: &AppState,
    metrics: Arc<ServerMetrics>,
    outcome: tokio::sync::oneshot::Sender<Result<(), cxr::inference::LoadError>>,
) -> anyhow::Result<tokio::task::JoinHandle<Option<Arc<cxr::repository::Repository>>>> {
    let load_cfg = args.load_config();
    let shadows = args.shadows().map_err(anyhow::Error::msg)?;
    let share = args.shadow_share;
    let core = state.core().clone();
    Ok(tokio::task::spawn_blocking(
        move || match cxr::repository::Repository::start(
            load_cfg,
            metrics,
            core.live_set(),
            &shadows,
            share,
        ) {
            Ok(repo) => {
                core.set_repository(repo.clone());
                let names: Vec<String> = core
                    .models()
                    .map(|s| {
                        s.every_version()
                            .map(|m| format!("{}@{}", m.card.name, m.card.version))
                            .collect()
                    })
                    .unwrap_or_default();
                tracing::info!(models = ?names, "ready");
                let _ = outcome.send(Ok(()));
                Some(repo)
            }
            Err(e) => {
                let _ = outcome.send(Err(e));
                None
            }
        },
    ))
}

/// Rescans the models folder on each `SIGHUP` (new versions loaded and warmed, then
/// swapped in; removed ones unloaded).
#[cfg(unix)]
fn rescan_on_sighup(core: cxr::predict::Core) {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(mut s) => {
            tokio::spawn(async move {
                while s.recv().await.is_some() {
                    let Some(repo) = core.repository().cloned() else {
                        tracing::warn!("SIGHUP while the models are still loading: ignored");
                        continue;
                    };
                    tracing::info!("SIGHUP: rescanning the models folder");
                    let (outcome, result) = match tokio::task::spawn_blocking(move || repo.rescan())
                        .await
                    {
                        Ok(Ok(change)) => ("ok".to_string(), serde_json::to_value(change).ok()),
                        Ok(Err(e)) => {
                            tracing::error!(error = %e, "rescan failed; what was serving stays");
                            ("repository_refused".to_string(), Some(e.to_string().into()))
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "rescan failed; what was serving stays");
                            ("internal".to_string(), Some(e.to_string().into()))
                        }
                    };
                    core.audit_event(cxr::audit::AuditEvent {
                        time: cxr::audit::now_rfc3339(),
                        event: cxr::audit::EventKind::RepositoryRescan,
                        request_id: uuid::Uuid::new_v4().to_string(),
                        caller: "SIGHUP".into(),
                        door: "signal",
                        route: "SIGHUP".into(),
                        outcome,
                        target: None,
                        detail: Some(serde_json::json!({ "result": result })),
                        suppressed: None,
                    })
                    .await;
                }
            });
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot handle SIGHUP: rescans only by the repository API")
        }
    }
}

/// The API socket, bound (so a taken port fails at once and `--port 0` has its
/// number) but not yet listening: until [`tokio::net::TcpSocket::listen`], a
/// connection attempt is refused.
async fn bind_api(host: &str, port: u16) -> anyhow::Result<tokio::net::TcpSocket> {
    let addr = format!("{host}:{port}");
    let resolved = tokio::net::lookup_host(&addr)
        .await
        .with_context(|| format!("cannot resolve {addr}"))?
        .next()
        .with_context(|| format!("{addr} resolves to no address"))?;
    let socket = if resolved.is_ipv4() {
        tokio::net::TcpSocket::new_v4()
    } else {
        tokio::net::TcpSocket::new_v6()
    }
    .context("creating the API socket")?;
    socket
        .set_reuseaddr(true)
        .context("creating the API socket")?;
    socket
        .bind(resolved)
        .with_context(|| format!("cannot listen on {addr}"))?;
    Ok(socket)
}

/// Connections waiting to be accepted.
const BACKLOG: u32 = 1024;

/// A file size limit (`ulimit -f`, RLIMIT_FSIZE) reached by the audit file must fail
/// the write (EFBIG: the request is refused, the file cut back), not kill the
/// process: SIGXFSZ's default action. Handling the signal makes it so.
#[cfg(target_os = "linux")]
fn survive_file_size_limit() {
    // SIGXFSZ is 25 on Linux's x86, Arm and RISC-V ABIs.
    const SIGXFSZ: i32 = 25;
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::from_raw(SIGXFSZ)) {
        Ok(mut s) => {
            tokio::spawn(async move {
                while s.recv().await.is_some() {
                    tracing::warn!(
                        "a write passed the file size limit (SIGXFSZ); it fails instead"
                    );
                }
            });
        }
        Err(e) => tracing::warn!(error = %e, "cannot handle SIGXFSZ"),
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    #[cfg(target_os = "linux")]
    survive_file_size_limit();
    let metrics = Arc::new(ServerMetrics::new());
    let exporter = match &args.otlp_endpoint {
        Some(endpoint) => {
            let (x, task) = cxr::trace::Exporter::start(
                endpoint,
                &args.otlp_service_name,
                metrics.otlp_spans_dropped.clone(),
            )
            .map_err(anyhow::Error::msg)?;
            let x = x.exporting_refused(args.otlp_export_refused);
            tracing::info!(endpoint = %endpoint, "request spans are exported over OTLP/gRPC");
            Some((x, task))
        }
        None => None,
    };
    let core = build_core(
        &args,
        metrics.clone(),
        exporter.as_ref().map(|(x, _)| x.clone()),
    )?;
    let keys = api_keys(&args)?;
    let mut state = app_state(core.clone(), keys.clone(), &args)?;
    let admin = match args.metrics_port {
        Some(port) => {
            let addr = format!("{}:{}", args.host, port);
            let l = tokio::net::TcpListener::bind(&addr)
                .await
                .with_context(|| format!("cannot listen on {addr} (--metrics-port)"))?;
            tracing::info!(metrics_addr = %l.local_addr()?, "metrics listener (/metrics, /health and /ready; open from the start)");
            state = state.without_public_metrics();
            Some(l)
        }
        None => None,
    };
    let socket = bind_api(&args.host, args.port).await?;
    let local = socket.local_addr()?;

    // Load in the background: `/health` answers meanwhile, `/ready` says 503.
    let (outcome_tx, outcome_rx) =
        tokio::sync::oneshot::channel::<Result<(), cxr::inference::LoadError>>();
    let loader = spawn_loader(&args, &state, metrics, outcome_tx)?;
    #[cfg(unix)]
    rescan_on_sighup(core.clone());
    let app = build_app(state.clone());
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
    let mut signal = std::pin::pin!(shutdown_signal());
    let mut outcome_rx = Some(outcome_rx);
    let mut load_error = None::<anyhow::Error>;
    let listener = if args.listen_before_ready {
        let l = socket
            .listen(BACKLOG)
            .context("listening on the API port")?;
        tracing::info!(addr = %local, "listening; loading models (--listen-before-ready: the API answers 503 not_ready until they are)");
        Some(l)
    } else {
        tracing::info!(bound = %local, "loading models; the API port accepts connections once every model is loaded and warmed");
        let outcome = outcome_rx.take().context("model loader")?;
        tokio::select! {
            outcome = outcome => match outcome {
                Ok(Ok(())) => {
                    let l = socket.listen(BACKLOG).context("listening on the API port")?;
                    tracing::info!(addr = %local, "listening");
                    Some(l)
                }
                Ok(Err(e)) => { load_error = Some(e.into()); None }
                Err(_) => { load_error = Some(anyhow::anyhow!("the model loader stopped")); None }
            },
            () = &mut signal => {
                tracing::info!("shutdown signal while loading: stopping");
                None
            }
        }
    };
    let mut grpc_task = None;
    if let Some(listener) = listener {
        if let Some(port) = args.grpc_port {
            let addr = format!("{}:{port}", args.host);
            let l = tokio::net::TcpListener::bind(&addr)
                .await
                .with_context(|| format!("cannot listen on {addr} (--grpc-port)"))?;
            tracing::info!(grpc_addr = %l.local_addr()?, "gRPC listener (Open Inference Protocol)");
            let mut rx = stop_rx.clone();
            let (core, keys, limits) = (core.clone(), keys.clone(), args.grpc_limits());
            grpc_task = Some(tokio::spawn(async move {
                let stop = async move {
                    let _ = rx.wait_for(|s| *s).await;
                };
                if let Err(e) = cxr::grpc::serve(l, core, keys, limits, stop).await {
                    tracing::error!(error = %e, "the gRPC listener failed");
                }
            }));
        }
        let node = args.dicom_node().map_err(anyhow::Error::msg)?;
        if let Some(delivery) = delivery(&args, &core, node.as_ref()).await? {
            state.set_delivery(delivery.clone());
            if let Some(cfg) = node {
                cxr::dicom_node::start(core.clone(), cfg, delivery)
                    .await
                    .map_err(anyhow::Error::msg)?;
            }
        }
        let le = &mut load_error;
        // With --listen-before-ready the loader may still fail while serving.
        let failed = async move {
            match outcome_rx {
                Some(rx) => match rx.await {
                    Ok(Err(e)) => e,
                    _ => std::future::pending().await,
                },
                None => std::future::pending().await,
            }
        };
        let stop_all = &stop_tx;
        cxr::http::server::serve(listener, app, args.conn_limits(), async move {
            tokio::select! {
                () = &mut signal => tracing::info!("shutdown signal: draining"),
                e = failed => { *le = Some(e.into()); }
            }
            // Every listener stops taking connections now (gRPC, metrics), not once
            // this one has drained: a gateway fails over from all of them at once.
            let _ = stop_all.send(true);
        })
        .await;
    } else {
        drop(app);
    }
    let _ = stop_tx.send(true);
    if let Some(t) = admin_task {
        let _ = t.await;
    }
    // The gRPC calls in flight finish too (within the shutdown timeout), before the
    // model queues close.
    if let Some(t) = grpc_task
        && tokio::time::timeout(std::time::Duration::from_secs(args.shutdown_timeout_s), t)
            .await
            .is_err()
    {
        tracing::warn!("gRPC calls still in flight at the shutdown timeout");
    }
    if let Some(e) = load_error {
        anyhow::bail!("cannot serve the models: {e}");
    }
    if !loader.is_finished() {
        // Stopped while loading: the loader thread is left to the runtime's shutdown.
        tracing::info!("stopped");
        return Ok(());
    }

    // The router's state handles are gone; taking every version out closes the
    // model queues, and each worker answers what is queued before it ends.
    let repo = loader.await.context("model loader")?;
    let workers = repo.map(|r| r.close()).unwrap_or_default();
    drop(state);
    for w in workers {
        let _ = w.join();
    }
    if let Some((exporter, task)) = exporter {
        drop(exporter);
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), task).await;
    }
    tracing::info!("stopped");
    Ok(())
}

/// `--job IN OUT`: loads the models, runs the folder job, and fails only on a
/// failure of the job's own (an image it could not process for its own reasons).
async fn job(
    args: ServeArgs,
    input: &std::path::Path,
    output: &std::path::Path,
) -> anyhow::Result<()> {
    let metrics = Arc::new(ServerMetrics::new());
    let core = build_core(&args, metrics.clone(), None)?;
    let load_cfg = args.load_config();
    let (set, workers) = tokio::task::spawn_blocking(move || {
        cxr::inference::load_models(&load_cfg, |name| metrics.observer(name))
    })
    .await
    .context("model loader")?
    .context("cannot load the models")?;
    core.set_models(set);
    let delivery = delivery(&args, &core, None).await?;
    let summary = cxr::job::run(
        &core,
        input,
        output,
        args.dicom_model.clone(),
        args.max_body_bytes,
        delivery,
    )
    .await
    .map_err(anyhow::Error::msg)?;
    drop(core);
    for w in workers {
        let _ = w.join();
    }
    if summary.failed > 0 {
        anyhow::bail!("{} image(s) could not be processed", summary.failed);
    }
    Ok(())
}

/// The outbox and its sending loop, when results go somewhere: the DICOM node's
/// destinations (`node`), `--hl7-destination` and `--fhir-url`.
async fn delivery(
    args: &ServeArgs,
    core: &cxr::predict::Core,
    node: Option<&cxr::dicom_node::NodeConfig>,
) -> anyhow::Result<Option<Arc<cxr::delivery::Delivery>>> {
    let mut channels = node.map(cxr::dicom_node::channels).unwrap_or_default();
    for c in args.hl7_channels().map_err(anyhow::Error::msg)? {
        channels.push(Arc::new(c));
    }
    if let Some(c) = args.fhir_channel().map_err(anyhow::Error::msg)? {
        channels.push(Arc::new(c));
    }
    if channels.is_empty() {
        return Ok(None);
    }
    let urgent_at = args.urgent_at().map_err(anyhow::Error::msg)?;
    let d = cxr::delivery::Delivery::start(core, args.outbox_config(), channels, urgent_at)
        .await
        .map_err(anyhow::Error::msg)?;
    Ok(Some(d))
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
