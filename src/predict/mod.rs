//! The prediction core: one path from an image to an answer, for every door.
//!
//! A door (the HTTP API, the Open Inference Protocol, a DICOM listener, a folder
//! job) turns its wire format into an [`Ask`] and [`Upload`]s, and its answers back
//! into its own format. Everything between is here, with no transport type in it:
//!
//! 1. [`Core::validate`]: the variant (by name or by preference) and the decision
//!    threshold (the card's, the caller's, or an operating point) → a [`Valid`]
//!    request, or a typed refusal.
//! 2. [`Core::answer_files`] (encoded JPEG/PNG/DICOM files) or
//!    [`Core::answer_decoded`] (preprocessed rows): bounded decoding on the blocking
//!    pool with the gates (geometry, content, DICOM policy), the model's batcher, the
//!    out-of-distribution score, the label at the threshold, and one audit record
//!    per image written before any answer is given (a refusal of an image is
//!    recorded too).
//! 3. [`Core::structured_report`]: an answer as a DICOM TID 1500 SR.
//! 4. [`Core::identify`] and [`Core::filing_key`]: what an image's filed results are
//!    of ([`Identity`]), made here for every door that files (the DICOM node, the
//!    folder job, `/predict` with an order); an [`Upload`] is hashed and, when
//!    DICOM, parsed once for its identity, its audit record and its decode.
//!
//! Admission that every door shares (the buffered-bytes budget, a processing slot,
//! the request timeout) is here too ([`Core::reserve_bytes`], [`Core::slot`],
//! [`Core::within_timeout`]); what is the transport's own (reading a body, headers,
//! status codes) stays at the door.
//! Errors are [`PredictError`]s with a transport-neutral [`ErrorType`], naming no
//! transport: each door wraps them in its own error beside its own refusals and
//! maps the type to its status once (`http::error::status`, `grpc::status`, the
//! DICOM node's C-STORE statuses).
//!
//! The core is built once, by `main`, with [`Core::builder`], and handed to every
//! door; the Open Inference Protocol's two transports share [`crate::oip`].

mod answer;
mod ask;
mod budget;
pub mod error;
pub mod explain;
pub mod feedback;
mod identity;
mod request;
mod results;
mod shadow;

pub mod types;
mod upload;

use std::sync::Arc;
use std::sync::OnceLock;
use std::time::Duration;

use tokio::sync::Semaphore;

use crate::audit::Audit;
use crate::imaging::Geometry;
use crate::imaging::dicom::DicomOptions;
use crate::inference::ModelSet;
use crate::metrics::ServerMetrics;

pub use crate::error_type::ErrorType;
pub use answer::UNVERIFIED_MODEL;
pub use ask::Answers;
pub use ask::Ask;
pub use ask::Asker;
pub use ask::Decision;
pub use ask::MAX_CLIENT_REQUEST_ID;
pub use ask::Traced;
pub use ask::Valid;
pub use ask::X_REQUEST_ID;
pub use ask::sanitize_client_request_id;
pub use budget::Buffered;
pub use budget::Reservation;
pub use error::PredictError;
pub use identity::FilingOrder;
pub use identity::Identity;
pub use results::Filed;
pub use results::ResultObject;
pub use types::ModelRef;
pub use types::Prediction;
pub use types::Probabilities;
pub use types::ThresholdKind;
pub use types::ThresholdSource;
pub use types::Timings;
pub use types::Verdict;
pub use upload::Decoded;
pub use upload::Upload;
pub use upload::UploadFacts;
pub use upload::UploadKind;
pub use upload::kilo;

/// Request limits.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest decoded image (width × height).
    pub max_pixels: u64,
    /// Most images in one request.
    pub max_images: usize,
    /// Longest a request may take.
    pub request_timeout: Duration,
    /// Most requests in flight; more are refused with 503.
    pub max_inflight: usize,
    /// Most images decoding at once (blocking pool).
    pub max_decodes: usize,
    /// DICOM policy (`--allow-any-modality`).
    pub dicom: DicomOptions,
    /// Sides and aspect ratio a radiograph can have (every upload).
    pub geometry: Geometry,
    /// Uploads buffered at once, bytes, whichever door reads them (each reserves
    /// what it will hold before reading it: [`Core::reserve_bytes`]); beyond it,
    /// refused at once as `overloaded`.
    pub max_buffered_bytes: usize,
    /// Pixels being decoded at once (each image reserves its declared size, a DICOM
    /// object `max_pixels`); beyond it, decodes wait (within the request timeout).
    pub max_decode_pixels: u64,
    /// What an out-of-distribution image gets (`--ood-action`).
    pub ood_action: crate::ood_score::OodAction,
}

/// The flags' defaults ([`crate::defaults`]).
impl Default for Limits {
    fn default() -> Self {
        use crate::defaults;
        Self {
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
            ood_action: crate::ood_score::OodAction::Refuse,
        }
    }
}

/// The prediction core: the models (once loaded), the limits and the budgets every
/// door shares, the metrics and the audit trail. Cheap to clone.
#[derive(Clone)]
pub struct Core {
    inner: Arc<Inner>,
}

struct Inner {
    /// The set answers come from: replaced whole by a load, swap or unload; each
    /// request keeps the set (and the versions) it started with.
    models: crate::repository::LiveSet,
    /// The model repository behind the set, once loaded (live load and unload).
    repository: OnceLock<Arc<crate::repository::Repository>>,
    limits: Limits,
    metrics: Arc<ServerMetrics>,
    decode_permits: Semaphore,
    inflight: Semaphore,
    /// `max_decode_pixels` in kilopixel permits.
    pixel_budget: Semaphore,
    /// Where audit records go.
    audit: Audit,
    /// Root of the UIDs of Structured Reports (`--uid-root`; none: 2.25 UUID UIDs).
    uid_root: Option<String>,
    /// Where answered images are recorded for live outcomes (`--outcomes`,
    /// `--database-url`).
    outcomes: Option<Arc<crate::outcomes::Outcomes>>,
    /// `max_buffered_bytes`, reserved by each body or message before it is read.
    buffered: budget::BufferBudget,
    /// Shadow runs waiting or running ([`shadow::SHADOW_SLOTS`]).
    shadow_slots: Arc<Semaphore>,
    /// Where spans go (`--otlp-endpoint`).
    exporter: Option<crate::trace::Exporter>,
}

/// What a [`Core`] is built from: `main` sets each part (the audit trail, the
/// outcomes store, the span exporter, the UID root), then builds the one core every
/// door shares.
pub struct CoreBuilder {
    limits: Limits,
    metrics: Arc<ServerMetrics>,
    audit: Audit,
    outcomes: Option<Arc<crate::outcomes::Outcomes>>,
    exporter: Option<crate::trace::Exporter>,
    uid_root: Option<String>,
}

impl CoreBuilder {
    /// Sends audit records to `audit` (default: the log only).
    #[must_use]
    pub fn audit(mut self, audit: Audit) -> Self {
        self.audit = audit;
        self
    }

    /// Records answered images in `outcomes` beside the audit trail, for
    /// `POST /feedback` and the live figures.
    #[must_use]
    pub fn outcomes(mut self, outcomes: Arc<crate::outcomes::Outcomes>) -> Self {
        self.outcomes = Some(outcomes);
        self
    }

    /// Exports request spans with `exporter`.
    #[must_use]
    pub fn exporter(mut self, exporter: crate::trace::Exporter) -> Self {
        self.exporter = Some(exporter);
        self
    }

    /// Makes result UIDs under `root` (default: 2.25 UUID UIDs).
    #[must_use]
    pub fn uid_root(mut self, root: String) -> Self {
        self.uid_root = Some(root);
        self
    }

    /// The core, with no models yet ([`Core::models`] is `None` until
    /// [`Core::set_models`]).
    pub fn build(self) -> Core {
        let limits = self.limits;
        let decode_permits = Semaphore::new(limits.max_decodes.max(1));
        let inflight = Semaphore::new(limits.max_inflight.max(1));
        let pixel_budget = Semaphore::new(kilo(limits.max_decode_pixels) as usize);
        let buffered = budget::BufferBudget::new(limits.max_buffered_bytes);
        Core {
            inner: Arc::new(Inner {
                models: Arc::new(std::sync::RwLock::new(None)),
                repository: OnceLock::new(),
                limits,
                metrics: self.metrics,
                decode_permits,
                inflight,
                pixel_budget,
                audit: self.audit,
                uid_root: self.uid_root,
                outcomes: self.outcomes,
                buffered,
                shadow_slots: Arc::new(Semaphore::new(shadow::SHADOW_SLOTS)),
                exporter: self.exporter,
            }),
        }
    }
}

impl Core {
    /// A builder of the core from its limits and metrics registry.
    pub fn builder(limits: Limits, metrics: Arc<ServerMetrics>) -> CoreBuilder {
        CoreBuilder {
            limits,
            metrics,
            audit: Audit::log_only(),
            outcomes: None,
            exporter: None,
            uid_root: None,
        }
    }

    /// A core with nothing but its limits and metrics (the log as audit trail).
    pub fn new(limits: Limits, metrics: Arc<ServerMetrics>) -> Self {
        Self::builder(limits, metrics).build()
    }

    /// Where audit records and events go.
    pub fn audit(&self) -> &Audit {
        &self.inner.audit
    }

    /// Writes `event` to the audit trail; a failure is logged (the change or
    /// confirmation it records is done already, and is answered as done).
    pub async fn audit_event(&self, event: crate::audit::AuditEvent) {
        if let Err(e) = self.inner.audit.record_event(&event).await {
            tracing::error!(error = %e, event = ?event.event, request_id = %event.request_id, "audit event not written");
        }
    }

    /// The outcomes store, when configured.
    pub fn outcomes(&self) -> Option<&Arc<crate::outcomes::Outcomes>> {
        self.inner.outcomes.as_ref()
    }

    /// Where spans go, when exported.
    pub fn exporter(&self) -> Option<&crate::trace::Exporter> {
        self.inner.exporter.as_ref()
    }

    /// Installs the loaded models; the core answers from now on.
    pub fn set_models(&self, models: ModelSet) {
        self.install(Arc::new(models));
    }

    /// Replaces the set answers come from, at once: requests already validated
    /// finish on the versions they chose; the versions no set holds any more are
    /// unloaded once those requests are done.
    pub fn install(&self, models: Arc<ModelSet>) {
        *self.inner.models.write().unwrap_or_else(|p| p.into_inner()) = Some(models);
    }

    /// The models now, once loaded.
    pub fn models(&self) -> Option<Arc<ModelSet>> {
        self.inner
            .models
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The cell the models are installed in (the repository fills it).
    pub fn live_set(&self) -> crate::repository::LiveSet {
        self.inner.models.clone()
    }

    /// Attaches the model repository (the server's live loads and unloads).
    pub fn set_repository(&self, repository: Arc<crate::repository::Repository>) {
        let _ = self.inner.repository.set(repository);
    }

    /// The model repository, when the server has one.
    pub fn repository(&self) -> Option<&Arc<crate::repository::Repository>> {
        self.inner.repository.get()
    }

    /// Requests holding one of the `--max-inflight` processing slots now.
    pub fn inflight(&self) -> usize {
        self.inner
            .limits
            .max_inflight
            .max(1)
            .saturating_sub(self.inner.inflight.available_permits())
    }

    /// The root of new DICOM UIDs (`--uid-root`; none: `2.25` UUID UIDs).
    pub fn uid_root(&self) -> Option<&str> {
        self.inner.uid_root.as_deref()
    }

    /// The limits.
    pub fn limits(&self) -> &Limits {
        &self.inner.limits
    }

    /// The metrics registry.
    pub fn metrics(&self) -> &Arc<ServerMetrics> {
        &self.inner.metrics
    }

    /// One of the `--max-inflight` processing slots, or 503 `overloaded` at once.
    pub fn slot(&self) -> Result<tokio::sync::SemaphorePermit<'_>, PredictError> {
        self.inner.inflight.try_acquire().map_err(|_| {
            self.metrics().overloaded.with_label_values(&["all"]).inc();
            PredictError::Overloaded("any".into())
        })
    }

    /// Reserves `n` bytes of the `--max-buffered-bytes` budget before a door reads
    /// them (an HTTP body, a gRPC message), held until the reservation is dropped;
    /// or 503 / RESOURCE_EXHAUSTED `overloaded` ([`PredictError::BufferFull`]) at once.
    /// More than 4 MiB comes from all but an eighth of the budget, kept for small
    /// uploads.
    pub fn reserve_bytes(&self, n: u64) -> Result<Reservation, PredictError> {
        self.inner.buffered.try_reserve(n).ok_or_else(|| {
            self.metrics().overloaded.with_label_values(&["all"]).inc();
            PredictError::BufferFull(self.inner.limits.max_buffered_bytes)
        })
    }

    /// An empty reservation in the same budget, for a door that cannot know a
    /// request's size before it arrives (a DICOM data set, in fragments): it
    /// [`Buffered::grow`]s before keeping more, and gives it all back when dropped.
    pub fn reserve_growing(&self) -> Buffered {
        self.inner.buffered.growing()
    }

    /// `job` under `--request-timeout-s` (the core's `timeout` past it), whatever
    /// the door's error that wraps the core's.
    pub async fn within_timeout<T, E: From<PredictError>>(
        &self,
        job: impl std::future::Future<Output = Result<T, E>>,
    ) -> Result<T, E> {
        let timeout = self.inner.limits.request_timeout;
        tokio::time::timeout(timeout, job)
            .await
            .unwrap_or_else(|_| Err(PredictError::Timeout(timeout.as_secs_f64()).into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffered_bytes_grow_within_the_budget_and_come_back_when_dropped() {
        let limits = Limits {
            max_buffered_bytes: 8 * 1024,
            ..Limits::default()
        };
        let core = Core::new(limits, Arc::new(ServerMetrics::new()));
        let mut a = core.reserve_growing();
        // Fragments of any size take whole KiB only as they cross one.
        for _ in 0..10 {
            assert!(a.grow(500));
        }
        assert_eq!(a.bytes(), 5000);
        let mut b = core.reserve_growing();
        assert!(b.grow(3 * 1024));
        assert!(!b.grow(1), "the budget is spent");
        assert_eq!(b.bytes(), 3 * 1024);
        drop(a);
        assert!(b.grow(5 * 1024));
        assert!(!core.reserve_growing().grow(1));
        drop(b);
        assert!(core.reserve_growing().grow(8 * 1024));
    }
}
