//! The HTTP API: routes, handlers, middleware and the OpenAPI document.
//!
//! `build_app(state)` returns the whole Router so tests drive the real app
//! in-process. Image decoding runs on the blocking pool and inference on the model
//! workers: no handler blocks a tokio worker.

mod admission;
mod answer;
pub mod auth;
pub mod error;
mod error_type;
pub mod explain;
pub mod metrics;
mod openapi;
mod predict;
mod routes;
pub mod server;
pub mod types;
mod upload;
pub mod v2;

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::HeaderMap;
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};
use tokio::sync::Semaphore;
use tower_http::trace::TraceLayer;

pub use error::{ApiError, ErrorBody, ErrorType};
pub use metrics::ServerMetrics;
pub use openapi::{ApiDoc, openapi_yaml};
pub use predict::PredictUpload;
use types::Prediction;

use crate::audit::Audit;
use crate::http::admission::caller_of;
use crate::http::predict::predict;
use crate::http::routes::docs;
use crate::http::routes::get_model;
use crate::http::routes::get_plot;
use crate::http::routes::health;
use crate::http::routes::list_models;
use crate::http::routes::metrics_text;
use crate::http::routes::openapi_json;
use crate::http::routes::ready;
use crate::http::routes::ui;
use crate::http::upload::SMALL_BODY_SHARE;
use crate::http::upload::kilo;
use crate::imaging::Geometry;
use crate::imaging::dicom::DicomOptions;
use crate::inference::ModelSet;
use auth::{ApiKeys, Caller, Scope};

/// Request limits.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest request body.
    pub max_body_bytes: usize,
    /// Largest decoded image (width × height).
    pub max_pixels: u64,
    /// Most images in one request.
    pub max_images: usize,
    /// Longest a request may take.
    pub request_timeout: Duration,
    /// Most `/predict` requests in flight; more are refused with 503.
    pub max_inflight: usize,
    /// Most images decoding at once (blocking pool).
    pub max_decodes: usize,
    /// DICOM policy (`--allow-any-modality`).
    pub dicom: DicomOptions,
    /// Sides and aspect ratio a radiograph can have (every upload).
    pub geometry: Geometry,
    /// Request bodies buffered at once, bytes (each request reserves its
    /// Content-Length, or `max_body_bytes` when it declares none, before its body is
    /// read); beyond it, 503 at once.
    pub max_buffered_bytes: usize,
    /// Pixels being decoded at once (each image reserves its declared size, a DICOM
    /// object `max_pixels`); beyond it, decodes wait (within the request timeout).
    pub max_decode_pixels: u64,
    /// Longest a client may take to send a `/predict` body (408 after).
    pub body_timeout: Duration,
    /// What an out-of-distribution image gets (`--ood-action`).
    pub ood_action: crate::ood_score::OodAction,
}

/// The flags' defaults ([`crate::defaults`]).
impl Default for Limits {
    fn default() -> Self {
        use crate::defaults;
        Self {
            max_body_bytes: defaults::MAX_BODY_BYTES,
            max_pixels: defaults::MAX_PIXELS,
            max_images: defaults::MAX_IMAGES,
            request_timeout: Duration::from_secs_f64(defaults::REQUEST_TIMEOUT_S),
            max_inflight: defaults::MAX_INFLIGHT,
            // The flag's default (0) means one per core; a fixed 4 keeps tests alike.
            max_decodes: 4,
            dicom: DicomOptions::default(),
            geometry: Geometry::default(),
            max_buffered_bytes: defaults::MAX_BUFFERED_BYTES,
            max_decode_pixels: defaults::MAX_DECODE_PIXELS,
            body_timeout: Duration::from_secs(defaults::BODY_TIMEOUT_S),
            ood_action: crate::ood_score::OodAction::Refuse,
        }
    }
}

/// Shared state: the models (set once loaded), limits, metrics.
#[derive(Clone)]
pub struct AppState {
    inner: Arc<Inner>,
}

struct Inner {
    models: OnceLock<ModelSet>,
    limits: Limits,
    metrics: Arc<ServerMetrics>,
    decode_permits: Semaphore,
    inflight: Semaphore,
    /// `max_buffered_bytes` in KiB permits.
    body_budget: Semaphore,
    /// The part of it large bodies may use (all but a reserve kept for small ones).
    large_body_budget: Semaphore,
    /// `max_decode_pixels` in kilopixel permits.
    pixel_budget: Semaphore,
    /// Callers and their scopes (`--api-keys-file`); `None`: the API is open.
    api_keys: Option<ApiKeys>,
    /// Where audit records go.
    audit: Audit,
    /// Whether `/metrics` is on the API port (false with `--metrics-port`).
    public_metrics: bool,
    /// Root of the UIDs of Structured Reports (`--uid-root`; none: 2.25 UUID UIDs).
    uid_root: Option<String>,
}

impl AppState {
    /// A state with no models yet (`/ready` answers 503 until [`AppState::set_models`]).
    pub fn new(limits: Limits, metrics: Arc<ServerMetrics>) -> Self {
        let decode_permits = Semaphore::new(limits.max_decodes.max(1));
        let inflight = Semaphore::new(limits.max_inflight.max(1));
        let body_budget = Semaphore::new(kilo(limits.max_buffered_bytes as u64) as usize);
        let large_body_budget = Semaphore::new(kilo(
            (limits.max_buffered_bytes - limits.max_buffered_bytes / SMALL_BODY_SHARE) as u64,
        ) as usize);
        let pixel_budget = Semaphore::new(kilo(limits.max_decode_pixels) as usize);
        Self {
            inner: Arc::new(Inner {
                models: OnceLock::new(),
                limits,
                metrics,
                decode_permits,
                inflight,
                body_budget,
                large_body_budget,
                pixel_budget,
                api_keys: None,
                audit: Audit::log_only(),
                public_metrics: true,
                uid_root: None,
            }),
        }
    }

    fn configure(&mut self) -> &mut Inner {
        Arc::get_mut(&mut self.inner).expect("configure the state before sharing it")
    }

    /// Requires API keys on `/predict` and `/models*` (call before sharing the state).
    #[must_use]
    pub fn with_api_keys(mut self, keys: ApiKeys) -> Self {
        self.configure().api_keys = Some(keys);
        self
    }

    /// Sends audit records to `audit` (call before sharing the state).
    #[must_use]
    pub fn with_audit(mut self, audit: Audit) -> Self {
        self.configure().audit = audit;
        self
    }

    /// Serves `/metrics` only on the admin listener ([`build_admin_app`]), not on
    /// the API port (call before sharing the state).
    #[must_use]
    pub fn without_public_metrics(mut self) -> Self {
        self.configure().public_metrics = false;
        self
    }

    /// Makes Structured Report UIDs under `root` (call before sharing the state).
    #[must_use]
    pub fn with_uid_root(mut self, root: String) -> Self {
        self.configure().uid_root = Some(root);
        self
    }

    /// The callers, when keys are required.
    pub fn api_keys(&self) -> Option<&ApiKeys> {
        self.inner.api_keys.as_ref()
    }

    /// Installs the loaded models; the service is ready from now on.
    pub fn set_models(&self, models: ModelSet) {
        if self.inner.models.set(models).is_err() {
            tracing::warn!("models were already set; keeping the first set");
        }
    }

    /// The models, once loaded.
    pub fn models(&self) -> Option<&ModelSet> {
        self.inner.models.get()
    }

    /// The metrics registry.
    pub fn metrics(&self) -> &Arc<ServerMetrics> {
        &self.inner.metrics
    }
}

/// Builds the whole application router.
///
/// `/predict` needs the `predict` scope and `/models*` the `models` scope when the
/// state has API keys; `/health`, `/ready`, `/docs`, `/openapi.json` and the page
/// (`/`, `/ui`, which asks for a key itself) stay open.
/// `/metrics` is here unless the state was made [`AppState::without_public_metrics`].
pub fn build_app(state: AppState) -> Router {
    let max_body = state.inner.limits.max_body_bytes;
    let guard =
        |scope: Scope| middleware::from_fn_with_state((state.clone(), scope), auth::require);
    let predict_routes = Router::new()
        .route("/predict", post(predict))
        .route_layer(guard(Scope::Predict));
    let model_routes = Router::new()
        .route("/models", get(list_models))
        .route("/models/{name}", get(get_model))
        .route("/models/{name}/plots/{kind}", get(get_plot))
        .route_layer(guard(Scope::Models));
    let mut app = Router::new()
        .merge(predict_routes)
        .merge(model_routes)
        .merge(v2::routes(&state))
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/openapi.json", get(openapi_json))
        .route("/docs", get(docs))
        .route("/", get(ui))
        .route("/ui", get(ui));
    if state.inner.public_metrics {
        app = app.route("/metrics", get(metrics_text));
    }
    with_common_layers(app, &state)
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(state)
}

/// The admin listener's router (`--metrics-port`): `/metrics` and `/health` only.
pub fn build_admin_app(state: AppState) -> Router {
    with_common_layers(
        Router::new()
            .route("/metrics", get(metrics_text))
            .route("/health", get(health))
            .route("/ready", get(ready)),
        &state,
    )
    .with_state(state)
}

fn with_common_layers(app: Router<AppState>, state: &AppState) -> Router<AppState> {
    app.fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), track))
        .layer(TraceLayer::new_for_http().make_span_with(|req: &Request| {
            let path = req
                .extensions()
                .get::<MatchedPath>()
                .map_or("unmatched", |p| p.as_str());
            let ids = req.extensions().get::<RequestIds>();
            let id = ids.map_or("", |i| i.server.as_str());
            let client = ids.and_then(|i| i.client.as_deref()).unwrap_or("");
            tracing::info_span!("request", method = %req.method(), path, request_id = id, client_request_id = client)
        }))
        .layer(middleware::from_fn(request_ids))
}

/// A request's ids: the server's own (a UUID, the `request_id` of answers, logs and
/// audit records) and the caller's `x-request-id`, bounded and sanitised.
#[derive(Debug, Clone)]
pub struct RequestIds {
    /// The server's id.
    pub server: String,
    /// The caller's id, if it sent a usable one.
    pub client: Option<String>,
}

/// Longest `x-request-id` kept from a caller.
pub const MAX_CLIENT_REQUEST_ID: usize = 128;

/// A caller's `x-request-id` as kept: at most [`MAX_CLIENT_REQUEST_ID`] characters
/// of `A-Z a-z 0-9 - _ . : / + = @`, others dropped; `None` if nothing is left.
pub fn sanitize_client_request_id(raw: &[u8]) -> Option<String> {
    let kept: String = raw
        .iter()
        .filter(|b| b.is_ascii_alphanumeric() || b"-_.:/+=@".contains(b))
        .take(MAX_CLIENT_REQUEST_ID)
        .map(|&b| char::from(b))
        .collect();
    (!kept.is_empty()).then_some(kept)
}

/// Gives every request the server's own id (in the `x-request-id` the handlers
/// read) and keeps the caller's; the answer's `x-request-id` echoes the caller's,
/// or carries the server's when the caller sent none.
async fn request_ids(mut req: Request, next: Next) -> Response {
    let client = req
        .headers()
        .get("x-request-id")
        .and_then(|v| sanitize_client_request_id(v.as_bytes()));
    let server = uuid::Uuid::new_v4().to_string();
    if let Ok(v) = axum::http::HeaderValue::from_str(&server) {
        req.headers_mut().insert("x-request-id", v);
    }
    req.extensions_mut().insert(RequestIds {
        server: server.clone(),
        client: client.clone(),
    });
    let mut resp = next.run(req).await;
    if let Ok(v) = axum::http::HeaderValue::from_str(client.as_deref().unwrap_or(&server)) {
        resp.headers_mut().insert("x-request-id", v);
    }
    resp
}

/// Who asked, and the request's ids: what answers and audit records name.
#[derive(Debug, Clone)]
pub(crate) struct Asker {
    /// The caller (API key name, or anonymous).
    pub caller: Caller,
    /// The server's request id.
    pub request_id: String,
    /// The caller's own id, sanitised.
    pub client_request_id: Option<String>,
}

impl Asker {
    fn of(req: &Request) -> Self {
        let ids = req.extensions().get::<RequestIds>();
        Self {
            caller: caller_of(req),
            request_id: ids.map_or_else(|| request_id(req.headers()), |i| i.server.clone()),
            client_request_id: ids.and_then(|i| i.client.clone()),
        }
    }
}

/// Counts requests and their latency by matched route, and logs every error answer
/// (the [`error::Refusal`] its `ApiError` left on the response).
async fn track(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let path = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    let start = Instant::now();
    let resp = next.run(req).await;
    if let Some(r) = resp.extensions().get::<error::Refusal>() {
        r.log();
    }
    let m = state.metrics();
    m.requests
        .with_label_values(&[&path, resp.status().as_str()])
        .inc();
    m.request_duration
        .with_label_values(&[&path])
        .observe(start.elapsed().as_secs_f64());
    resp
}

async fn not_found(req: Request) -> ApiError {
    ApiError::NoRoute(format!("{} {}", req.method(), req.uri().path()))
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

fn request_id(headers: &HeaderMap) -> String {
    headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string()
}
