//! The HTTP API: routes, handlers, middleware and the OpenAPI document.
//!
//! `build_app(state)` returns the whole Router so tests drive the real app
//! in-process. Image decoding runs on the blocking pool and inference on the model
//! workers: no handler blocks a tokio worker.

mod admission;
pub mod auth;
pub mod error;
mod feedback;
mod openapi;
mod outbox;
mod predict;
mod routes;
pub mod server;
pub mod types;
mod upload;
pub mod v2;

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::extract::FromRequestParts;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::HeaderMap;
use axum::http::request::Parts;
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};
use tower_http::trace::TraceLayer;

pub use crate::metrics::ServerMetrics;
pub use crate::predict::Asker;
pub use crate::predict::Limits;
pub use crate::predict::Prediction;
pub use crate::predict::explain;
pub use error::{ApiError, ErrorBody, ErrorType};
pub use openapi::{ApiDoc, openapi_yaml};
pub use predict::PredictUpload;

use crate::http::openapi::openapi_json;
use crate::http::predict::predict;
use crate::http::routes::docs;
use crate::http::routes::get_model;
use crate::http::routes::get_plot;
use crate::http::routes::health;
use crate::http::routes::list_models;
use crate::http::routes::metrics_text;
use crate::http::routes::ready;
use crate::http::routes::ui;
use crate::inference::ModelSet;
use crate::predict::Core;
use crate::predict::Traced;
use crate::predict::X_REQUEST_ID;
use auth::{ApiKeys, Caller, Scope};

/// Shared state of the HTTP doors: the prediction core (with the buffered-bytes
/// budget every door shares), and what is HTTP's own (API keys, where `/metrics` is
/// served).
#[derive(Clone)]
pub struct AppState {
    core: Core,
    /// How large a body may be and how long it may take (the door's own budget).
    body: BodyLimits,
    /// Callers and their scopes (`--api-keys-file`); `None`: the API is open.
    api_keys: Option<Arc<ApiKeys>>,
    /// Whether `/metrics` is on the API port (false with `--metrics-port`).
    public_metrics: bool,
    /// When a positive answer is a suspected finding (`--urgent-at`; /models says
    /// each version's threshold).
    urgent_at: crate::delivery::UrgentAt,
    /// The outbox and its channels, when a destination is configured (the DICOM
    /// node's, `--hl7-destination`, `--fhir-url`).
    delivery: Arc<std::sync::OnceLock<Arc<crate::delivery::Delivery>>>,
}

impl AppState {
    /// The HTTP door's state over `core` (built by `main`, shared with the other
    /// doors): the API open, `/metrics` on the API port.
    pub fn with_core(core: Core) -> Self {
        Self {
            core,
            body: BodyLimits::default(),
            api_keys: None,
            public_metrics: true,
            urgent_at: crate::delivery::UrgentAt::default(),
            delivery: Arc::new(std::sync::OnceLock::new()),
        }
    }

    /// A state over a new core with `limits` and `metrics` and nothing else (no
    /// models yet: `/ready` answers 503 until [`AppState::set_models`]).
    pub fn new(limits: Limits, metrics: Arc<ServerMetrics>) -> Self {
        Self::with_core(Core::new(limits, metrics))
    }

    /// Takes bodies within `body` (`--max-body-bytes`, `--body-timeout-s`).
    #[must_use]
    pub fn with_body_limits(mut self, body: BodyLimits) -> Self {
        self.body = body;
        self
    }

    /// How large a body may be and how long it may take.
    pub fn body_limits(&self) -> BodyLimits {
        self.body
    }

    /// Requires API keys on `/predict` and `/models*`.
    #[must_use]
    pub fn with_api_keys(mut self, keys: impl Into<Arc<ApiKeys>>) -> Self {
        self.api_keys = Some(keys.into());
        self
    }

    /// Says suspected findings at `urgent_at` (`--urgent-at`).
    #[must_use]
    pub fn with_urgent_at(mut self, urgent_at: crate::delivery::UrgentAt) -> Self {
        self.urgent_at = urgent_at;
        self
    }

    /// When a positive answer is a suspected finding.
    pub fn urgent_at(&self) -> crate::delivery::UrgentAt {
        self.urgent_at
    }

    /// Serves `/metrics` only on the admin listener ([`build_admin_app`]), not on
    /// the API port.
    #[must_use]
    pub fn without_public_metrics(mut self) -> Self {
        self.public_metrics = false;
        self
    }

    /// The prediction core (what other doors share with this one).
    pub fn core(&self) -> &Core {
        &self.core
    }

    /// The outbox and its channels: `/predict` files answers given the order's
    /// identifiers through it, and its dead letters are listed at
    /// `GET /dicom/outbox/dead-letters`. Set once; a second call changes nothing.
    pub fn set_delivery(&self, delivery: Arc<crate::delivery::Delivery>) {
        let _ = self.delivery.set(delivery);
    }

    /// The outbox and its channels, when a destination is configured.
    pub fn delivery(&self) -> Option<Arc<crate::delivery::Delivery>> {
        self.delivery.get().cloned()
    }

    /// The callers, when keys are required.
    pub fn api_keys(&self) -> Option<&ApiKeys> {
        self.api_keys.as_deref()
    }

    /// Installs the loaded models; the service is ready from now on.
    pub fn set_models(&self, models: ModelSet) {
        self.core.set_models(models);
    }

    /// The models, once loaded.
    pub fn models(&self) -> Option<Arc<ModelSet>> {
        self.core.models()
    }

    /// The core's limits.
    pub fn limits(&self) -> &Limits {
        self.core.limits()
    }

    /// The metrics registry.
    pub fn metrics(&self) -> &Arc<ServerMetrics> {
        self.core.metrics()
    }
}

/// The HTTP door's body budget: what a request body may be, and how long it may
/// take to arrive.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimits {
    /// Largest request body (`--max-body-bytes`): 413 over it.
    pub max_body_bytes: usize,
    /// Longest a client may take to send a body (`--body-timeout-s`): 408 after.
    pub body_timeout: std::time::Duration,
}

/// The flags' defaults ([`crate::defaults`]).
impl Default for BodyLimits {
    fn default() -> Self {
        Self {
            max_body_bytes: crate::defaults::MAX_BODY_BYTES,
            body_timeout: std::time::Duration::from_secs(crate::defaults::BODY_TIMEOUT_S),
        }
    }
}

/// Builds the whole application router.
///
/// `/predict` needs the `predict` scope and `/models*` the `models` scope when the
/// state has API keys; `/health`, `/ready`, `/docs`, `/openapi.json` and the page
/// (`/`, `/ui`, which asks for a key itself) stay open.
/// `/metrics` is here unless the state was made [`AppState::without_public_metrics`].
pub fn build_app(state: AppState) -> Router {
    let max_body = state.body_limits().max_body_bytes;
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
    let feedback_routes = Router::new()
        .route("/feedback", post(feedback::feedback))
        .route_layer(guard(Scope::Feedback));
    let mut app = Router::new()
        .merge(predict_routes)
        .merge(feedback_routes)
        .merge(model_routes)
        .merge(v2::routes(&state))
        .merge(outbox::routes(&state))
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/openapi.json", get(openapi_json))
        .route("/docs", get(docs))
        .route("/", get(ui))
        .route("/ui", get(ui));
    if state.public_metrics {
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
            let asker = req.extensions().get::<Asker>();
            let id = asker.map_or("", |a| a.request_id.as_str());
            let client = asker
                .and_then(|a| a.client_request_id.as_deref())
                .unwrap_or("");
            let trace_id = asker
                .and_then(|a| a.trace.as_ref())
                .map(|t| t.trace_id())
                .unwrap_or_default();
            tracing::info_span!("request", method = %req.method(), path, request_id = id, client_request_id = client, trace_id)
        }))
        .layer(middleware::from_fn_with_state(state.clone(), request_ids))
}

pub use crate::predict::MAX_CLIENT_REQUEST_ID;
pub use crate::predict::sanitize_client_request_id;

/// Gives every request the server's own id (in the `x-request-id` the handlers
/// read) and keeps the caller's; the answer's `x-request-id` echoes the caller's,
/// or carries the server's when the caller sent none.
///
/// Traces it too ([`crate::trace`]): a request with a valid `traceparent`, and
/// every inference request, gets a trace (the caller's, or a new one); its answer
/// carries `traceparent` (the server's span) and `tracestate`, and its spans are
/// exported once it is answered.
///
/// The ids and the trace are made by [`Asker::from_headers`], as the gRPC door
/// makes them; the [`Asker`] (anonymous until the auth middleware names its
/// caller) waits in the request's extensions for its extractor.
async fn request_ids(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    use crate::trace::{TRACEPARENT, TRACESTATE};
    // The route's template, never the path the client sent (which may carry
    // anything, a patient's name among it): unmatched requests have none.
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string());
    let inference = route
        .as_deref()
        .is_some_and(|r| r == "/predict" || r.ends_with("/infer"));
    let headers = req.headers();
    let asker = Asker::from_headers(
        Caller::anonymous(),
        |n| crate::trace::single(headers.get_all(n).iter().map(|v| v.as_bytes())),
        state.core().exporter().is_some(),
        if inference {
            Traced::Always
        } else {
            Traced::WhenSent
        },
    );
    let trace = asker.trace.clone();
    // The server span's name, for a traced request only: the method and the route
    // (OpenTelemetry's HTTP conventions), or the method alone when none matched.
    let method = req.method().clone();
    let span_name = trace.as_ref().map(|_| match &route {
        Some(r) => format!("{method} {r}"),
        None => method.to_string(),
    });
    if let Ok(v) = axum::http::HeaderValue::from_str(&asker.request_id) {
        req.headers_mut().insert(X_REQUEST_ID, v);
    }
    let echoed = axum::http::HeaderValue::from_str(asker.echoed_request_id());
    req.extensions_mut().insert(asker);
    let mut resp = next.run(req).await;
    if let Ok(v) = echoed {
        resp.headers_mut().insert(X_REQUEST_ID, v);
    }
    if let (Some(t), Some(span_name)) = (trace, span_name) {
        if let Ok(v) = axum::http::HeaderValue::from_str(&t.traceparent()) {
            resp.headers_mut().insert(TRACEPARENT, v);
        }
        if let Some(Ok(v)) = t
            .context()
            .tracestate
            .as_deref()
            .map(axum::http::HeaderValue::from_str)
        {
            resp.headers_mut().insert(TRACESTATE, v);
        }
        let status = resp.status();
        // Refused requests are not exported unless asked (--otlp-export-refused).
        let refused = matches!(status.as_u16(), 401 | 403 | 404);
        let mut attributes = vec![
            ("http.request.method", method.to_string()),
            ("http.response.status_code", status.as_u16().to_string()),
        ];
        if let Some(r) = route {
            attributes.push(("http.route", r));
        }
        t.finish(
            &span_name,
            &attributes,
            status
                .is_server_error()
                .then(|| status.as_str().to_string()),
            state
                .core()
                .exporter()
                .and_then(|x| x.unless_refused(refused)),
        );
    }
    resp
}

/// Who asked, read from the request: the caller the auth middleware let in, and
/// the ids and trace `request_ids` gave it.
impl<S: Send + Sync> FromRequestParts<S> for Asker {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let caller = parts
            .extensions
            .get::<Caller>()
            .cloned()
            .unwrap_or_else(Caller::anonymous);
        Ok(match parts.extensions.get::<Asker>() {
            Some(asker) => Asker {
                caller,
                ..asker.clone()
            },
            None => Asker {
                caller,
                request_id: request_id(&parts.headers),
                client_request_id: None,
                trace: None,
            },
        })
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

/// 404 for a path no route matches. The path is not named back: it can carry an
/// identifier (a patient's name, an MRN), and the refusal's message is logged.
async fn not_found(req: Request) -> ApiError {
    ApiError::NoRoute(format!(
        "{}: no such route on this server (see /docs)",
        req.method()
    ))
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

fn request_id(headers: &HeaderMap) -> String {
    headers
        .get(X_REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string()
}
