//! `cxr-serve`'s configuration: one clap struct, every flag with a `CXR_*`
//! environment fallback, validated at start with messages that say what to fix.

use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

use crate::imaging::dicom::DicomOptions;
use crate::inference::decision::DecisionConfig;
use crate::inference::{
    BatchConfig, CPU_MAX_BATCH, CUDA_MAX_BATCH, Device, LoadConfig, resolve_library,
};
use crate::predict::Limits;

/// The flags' defaults, from the leaf module they live in.
pub use crate::defaults;

crate::message_error!(
    /// What is wrong with the configuration, and what to fix.
    ConfigError
);

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Serves the pneumonia classifiers in `--models-dir` over HTTP.
#[derive(Debug, Clone, Serialize, clap::Parser)]
#[command(name = "cxr-serve", version, about)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "CXR_HOST", default_value = "0.0.0.0")]
    pub host: String,
    /// Port to listen on (0 picks a free one).
    #[arg(long, env = "CXR_PORT", default_value_t = 8080)]
    pub port: u16,
    /// Folder of `<name>.onnx` + `<name>.json` model cards.
    #[arg(long, env = "CXR_MODELS_DIR", default_value = "models")]
    pub models_dir: PathBuf,
    /// Variant used when a request names none (default: `weighted` if present, else
    /// the first by name).
    #[arg(long, env = "CXR_DEFAULT_MODEL")]
    pub default_model: Option<String>,
    /// Execution provider: `auto` tries CUDA and falls back to the CPU, `cuda`
    /// refuses to start without it.
    #[arg(long, env = "CXR_DEVICE", value_enum, default_value = "auto")]
    pub device: Device,
    /// Path of libonnxruntime.so (default: .ort/lib/libonnxruntime.so, made by
    /// scripts/setup.sh).
    #[arg(long, env = "ORT_DYLIB_PATH")]
    pub ort_lib: Option<PathBuf>,
    /// ONNX Runtime intra-op threads: of the shared pool, or per model with
    /// `--shared-pool false` (0 = one per core).
    #[arg(long, env = "CXR_INTRA_THREADS", default_value_t = 0)]
    pub intra_threads: usize,
    /// ONNX Runtime's CPU memory arena: it keeps the most it ever grew to, and is about
    /// as fast as glibc reusing ONNX Runtime's memory, the default (bench/RESULTS.md).
    #[arg(long, env = "CXR_CPU_MEM_ARENA")]
    pub cpu_mem_arena: bool,
    /// Whether ONNX Runtime's intra-op threads spin while waiting for work (ONNX
    /// Runtime's default). With `--shared-pool false` and several models, one model's
    /// spinning threads take the cores from the next model's run (bench/RESULTS.md).
    #[arg(long, env = "CXR_INTRA_OP_SPINNING", default_value_t = true, action = clap::ArgAction::Set)]
    pub intra_op_spinning: bool,
    /// One intra-op thread pool for every model (`--intra-threads` threads,
    /// `--intra-op-spinning`) instead of one per model's session. Per-session pools
    /// compete for the same cores: FP32 right after INT8 ran 24–26 % slower with
    /// them, as fast as alone with the shared pool (bench/RESULTS.md).
    #[arg(long, env = "CXR_SHARED_POOL", default_value_t = true, action = clap::ArgAction::Set)]
    pub shared_pool: bool,
    /// Largest inference batch [default: 2 on the CPU, 8 on CUDA]. On the CPU the
    /// intra-op threads already fill the cores at batch 2, and larger batches outgrow
    /// the caches: served at saturation ran 7-14 % faster with 2 than with 8
    /// (bench/RESULTS.md). Measure with bench/max_batch.py before raising it.
    #[arg(long, env = "CXR_MAX_BATCH")]
    pub max_batch: Option<usize>,
    /// How long a worker waits for more requests to fill a batch, microseconds. 0
    /// (as Triton's dynamic batcher by default): a batch is what queued while the
    /// previous one ran, so under load batches form anyway and a lone request does
    /// not wait (bench/RESULTS.md).
    #[arg(long, env = "CXR_BATCH_WAIT_US", default_value_t = 0)]
    pub batch_wait_us: u64,
    /// How long a batch that is not full waits for requests already being decoded
    /// for the same model, microseconds (0: never). Under a closed loop of clients a
    /// batch's answers come back as one burst of requests, and without the wait the
    /// first of them runs alone, the dearest batch per image; a lone request has
    /// nobody behind it and never waits (bench/RESULTS.md).
    #[arg(long, env = "CXR_ARRIVAL_WAIT_US", default_value_t = 20_000)]
    pub arrival_wait_us: u64,
    /// Requests each model's queue holds; beyond it requests get 503 + Retry-After.
    #[arg(long, env = "CXR_QUEUE_CAPACITY", default_value_t = 64)]
    pub queue_capacity: usize,
    /// Largest request body, bytes.
    #[arg(long, env = "CXR_MAX_BODY_BYTES", default_value_t = defaults::MAX_BODY_BYTES)]
    pub max_body_bytes: usize,
    /// Largest image, in pixels (width × height), checked before decoding.
    #[arg(long, env = "CXR_MAX_PIXELS", default_value_t = defaults::MAX_PIXELS)]
    pub max_pixels: u64,
    /// Most images in one multipart request.
    #[arg(long, env = "CXR_MAX_IMAGES", default_value_t = defaults::MAX_IMAGES)]
    pub max_images_per_request: usize,
    /// Most /predict requests in flight; beyond it requests get 503 + Retry-After.
    #[arg(long, env = "CXR_MAX_INFLIGHT", default_value_t = defaults::MAX_INFLIGHT)]
    pub max_inflight: usize,
    /// Images decoded at once on the blocking pool (0 = one per core).
    #[arg(long, env = "CXR_DECODE_THREADS", default_value_t = 0)]
    pub decode_threads: usize,
    /// Longest a client may take to send its request head, seconds.
    #[arg(long, env = "CXR_HEADER_READ_TIMEOUT_S", default_value_t = 10)]
    pub header_read_timeout_s: u64,
    /// Longest a client may take to send a `/predict` body, seconds (408 after).
    #[arg(long, env = "CXR_BODY_TIMEOUT_S", default_value_t = defaults::BODY_TIMEOUT_S)]
    pub body_timeout_s: u64,
    /// Most open connections per listener (the API port, the gRPC port and the
    /// metrics port each: a flood of one does not lock out the others); a new one
    /// beyond is closed at once.
    #[arg(long, env = "CXR_MAX_CONNECTIONS", default_value_t = 1024)]
    pub max_connections: usize,
    /// Longest a connection (HTTP/1 keep-alive or HTTP/2) stays open with no request
    /// in flight, seconds. Longer than a gateway's own upstream keep-alive (nginx: 60
    /// s), so that the gateway, not cxr, closes an idle connection it might reuse.
    #[arg(long, env = "CXR_IDLE_TIMEOUT_S", default_value_t = defaults::IDLE_TIMEOUT_S)]
    pub idle_timeout_s: u64,
    /// Longest the drain after SIGTERM may take, seconds: requests in flight finish
    /// within it, connections still open after it are dropped. At least
    /// --body-timeout-s + --request-timeout-s, so that no accepted request is cut.
    #[arg(long, env = "CXR_SHUTDOWN_TIMEOUT_S", default_value_t = defaults::SHUTDOWN_TIMEOUT_S)]
    pub shutdown_timeout_s: u64,
    /// Accept API connections while the models load (answering 503 `not_ready`), as
    /// before 0.2. By default the API port refuses connections until every model is
    /// loaded and warmed, so a gateway without health checks fails over instead of
    /// sending requests that cannot be served; `/health` and `/ready` answer on
    /// --metrics-port from the start.
    #[arg(long, env = "CXR_LISTEN_BEFORE_READY")]
    pub listen_before_ready: bool,
    /// Request bodies buffered at once, bytes; a request that would exceed it is
    /// answered 503 before its body is read.
    #[arg(long, env = "CXR_MAX_BUFFERED_BYTES", default_value_t = defaults::MAX_BUFFERED_BYTES)]
    pub max_buffered_bytes: usize,
    /// Pixels decoded at once (declared sizes; a DICOM object counts --max-pixels);
    /// beyond it, decodes wait their turn (within the request timeout).
    #[arg(long, env = "CXR_MAX_DECODE_PIXELS", default_value_t = defaults::MAX_DECODE_PIXELS)]
    pub max_decode_pixels: u64,
    /// Shortest image side accepted (pixels), checked from the header before
    /// decoding; shorter is answered 422 `implausible_geometry`.
    #[arg(long, env = "CXR_MIN_IMAGE_SIDE", default_value_t = defaults::MIN_IMAGE_SIDE)]
    pub min_image_side: u32,
    /// Largest aspect ratio accepted (long side / short side), checked from the
    /// header before decoding.
    #[arg(long, env = "CXR_MAX_ASPECT_RATIO", default_value_t = defaults::MAX_ASPECT_RATIO)]
    pub max_aspect_ratio: f64,
    /// Classify DICOM objects of any Modality (default: only CR, DX and DR).
    #[arg(long, env = "CXR_ALLOW_ANY_MODALITY")]
    pub allow_any_modality: bool,
    /// Classify lateral DICOM views (ViewPosition LL, RL) with a warning instead of
    /// refusing them (422 lateral_view).
    #[arg(long, env = "CXR_ALLOW_LATERAL")]
    pub allow_lateral: bool,
    /// What to do with an image whose out-of-distribution score is above its model's
    /// threshold: refuse it (422 out_of_distribution), answer it with a warning, or
    /// neither score nor refuse (off).
    #[arg(long, env = "CXR_OOD_ACTION", value_enum, default_value_t = crate::ood_score::OodAction::Refuse)]
    pub ood_action: crate::ood_score::OodAction,
    /// Longest a /predict request may take, seconds, fractions allowed (then 503
    /// timeout).
    #[arg(long, env = "CXR_REQUEST_TIMEOUT_S", default_value_t = defaults::REQUEST_TIMEOUT_S)]
    pub request_timeout_s: f64,
    /// TOML or JSON file of API callers (name, SHA-256 of the key, scopes); when set,
    /// `/predict` and `/models*` need `Authorization: Bearer <key>` or `x-api-key`.
    #[arg(long, env = "CXR_API_KEYS_FILE")]
    pub api_keys_file: Option<PathBuf>,
    /// Serve `/metrics` on this port only (a second listener on --host), not on the
    /// API port.
    #[arg(long, env = "CXR_METRICS_PORT")]
    pub metrics_port: Option<u16>,
    /// Also append every audit record as a JSON line to this file (the records are
    /// always logged at INFO, target `cxr::audit`).
    #[arg(long, env = "CXR_AUDIT_LOG")]
    pub audit_log: Option<PathBuf>,
    /// Rotate the audit file when it would grow past this many bytes (to PATH.1,
    /// PATH.2, …; none is deleted); 0 never rotates.
    #[arg(long, env = "CXR_AUDIT_LOG_MAX_BYTES", default_value_t = 100 << 20)]
    pub audit_log_max_bytes: u64,
    /// Root of the UIDs given to DICOM Structured Reports (Series and SOP Instance
    /// UIDs); default: `2.25.<random UUID>` UIDs.
    #[arg(long, env = "CXR_UID_ROOT")]
    pub uid_root: Option<String>,
    /// Print a new API key for caller NAME, and the keys-file entry with its hash,
    /// then exit.
    #[arg(long, value_name = "NAME")]
    #[serde(skip)]
    pub new_api_key: Option<String>,
    /// The CPU backend: `ort` (ONNX Runtime), `openvino` (OpenVINO, when it loads the
    /// file and agrees with ONNX Runtime on a probe; else ONNX Runtime, logged), or
    /// `auto` (the deployment's decision for each model file and CPU, read from
    /// --backend-decision, or both measured once, the faster kept and the decision
    /// written there). CUDA always runs ONNX Runtime.
    #[arg(long, env = "CXR_BACKEND", value_enum, default_value = "ort")]
    pub backend: crate::inference::BackendChoice,
    /// A site card (`cxr-train validate … --choose …`): the thresholds (and OOD
    /// acceptance) the site chose on its own films, applied to the models whose files
    /// it validated; answers then say `threshold_source.kind: site`.
    #[arg(long, env = "CXR_SITE_CARD", value_name = "FILE")]
    pub site_card: Option<PathBuf>,
    /// The signers whose model signatures are accepted (TOML: `[[signer]]` entries
    /// with `name`, `public_key_file` or `public_key` (PEM, ECDSA P-256/P-384) and an
    /// optional `expires = "YYYY-MM-DD"`; docs/security.md). Each version's
    /// `<name>.sig` (an OpenSSF Model Signing bundle) is verified against them,
    /// offline, before it answers anything.
    #[arg(long, env = "CXR_TRUSTED_SIGNERS", value_name = "FILE")]
    pub trusted_signers: Option<PathBuf>,
    /// Refuse any model version without a signature verified by --trusted-signers
    /// (off: an unsigned version loads with a warning in the log, /models and each
    /// answer).
    #[arg(long, env = "CXR_REQUIRE_SIGNED_MODELS")]
    pub require_signed_models: bool,
    /// The CPU backend of one model, over `--backend`: `NAME=ort|openvino|auto`
    /// (repeat the flag, or separate by commas in `CXR_MODEL_BACKENDS`).
    #[arg(long = "model-backend", env = "CXR_MODEL_BACKENDS", value_name = "NAME=BACKEND",
          value_delimiter = ',', value_parser = parse_model_backend)]
    pub model_backends: Vec<(String, crate::inference::BackendChoice)>,
    /// The deployment's backend decision (`--backend auto`): which CPU backend serves
    /// each model file on each CPU, read by every replica. The first replica that
    /// finds no entry for its model file, CPU and runtimes measures and adds one (the
    /// others take it as is); put it where every replica reads and writes, e.g. a
    /// volume. Default: `backend.decision.json` in --models-dir.
    #[arg(long, env = "CXR_BACKEND_DECISION", value_name = "FILE")]
    pub backend_decision: Option<PathBuf>,
    /// OpenVINO's compiled-model cache (its CACHE_DIR), so a model is compiled once
    /// per CPU and runtime, not at every start. Default: `openvino-cache` beside the
    /// --backend-decision file.
    #[arg(long, env = "CXR_OPENVINO_CACHE_DIR", value_name = "DIR")]
    pub openvino_cache_dir: Option<PathBuf>,
    /// Run a candidate version in the shadow of its variant's default: `NAME@VERSION`
    /// (a version loaded beside the default, e.g. `models/weighted/2.1.0/`). It runs
    /// on `--shadow-share` of the variant's requests after each answer is sent; its
    /// agreement goes to metrics, `/models/{name}` and audit records marked `shadow`.
    /// Repeat for several variants (or separate by commas in `CXR_SHADOW`).
    #[arg(
        long = "shadow",
        env = "CXR_SHADOW",
        value_name = "NAME@VERSION",
        value_delimiter = ','
    )]
    pub shadow: Vec<String>,
    /// The share of a variant's requests its shadow candidate runs on, in (0, 1].
    #[arg(long, env = "CXR_SHADOW_SHARE", default_value_t = 1.0)]
    pub shadow_share: f64,
    /// Export each request's spans (OpenTelemetry, OTLP over gRPC) to this
    /// collector, e.g. `http://otel-collector:4317`; off by default. The W3C
    /// `traceparent` is read and answered with either way.
    #[arg(long, env = "CXR_OTLP_ENDPOINT", value_name = "URL")]
    pub otlp_endpoint: Option<String>,
    /// The `service.name` of the exported spans.
    #[arg(long, env = "CXR_OTLP_SERVICE_NAME", default_value = "cxr")]
    pub otlp_service_name: String,
    /// Also export the spans of refused requests (401, 403, 404; gRPC
    /// UNAUTHENTICATED, PERMISSION_DENIED, NOT_FOUND): off by default, so that
    /// anyone who can reach the port cannot fill the collector.
    #[arg(long, env = "CXR_OTLP_EXPORT_REFUSED")]
    pub otlp_export_refused: bool,
    /// Also serve the Open Inference Protocol over gRPC on this port
    /// (`inference.GRPCInferenceService`, with the health service and reflection);
    /// off by default.
    #[arg(long, env = "CXR_GRPC_PORT")]
    pub grpc_port: Option<u16>,
    /// Also serve as a DICOM node on this port (C-ECHO, C-STORE of CR and DX
    /// radiographs; results filed back into the study); off by default.
    #[arg(long, env = "CXR_DICOM_PORT")]
    pub dicom_port: Option<u16>,
    /// The DICOM node's AE title (the called AE title peers must use).
    #[arg(long, env = "CXR_DICOM_AE_TITLE", default_value = "CXR")]
    pub dicom_ae_title: String,
    /// The calling AE titles (and hosts) that may associate (TOML; required with
    /// --dicom-port): see docs/dicom.md.
    #[arg(long, env = "CXR_DICOM_PEERS_FILE")]
    pub dicom_peers_file: Option<PathBuf>,
    /// Where the DICOM node sends results by C-STORE: AE@host:port (repeatable, or
    /// comma-separated in the environment).
    #[arg(long, env = "CXR_DICOM_DESTINATION", value_delimiter = ',')]
    pub dicom_destination: Vec<String>,
    /// Where the DICOM node sends results by DICOMweb STOW-RS (the service's base
    /// URL, e.g. http://pacs:8042/dicom-web; http only).
    #[arg(long, env = "CXR_STOW_URL")]
    pub stow_url: Option<String>,
    /// A bearer token for --stow-url (from the environment; never logged).
    #[arg(long, env = "CXR_STOW_TOKEN", hide_env_values = true)]
    #[serde(skip)]
    pub stow_token: Option<String>,
    /// The outbox (SQLite): results waiting to be sent (DICOM objects, HL7
    /// messages), and the record of what was sent; used by every door that files
    /// results (the DICOM node, the folder job, `/predict` with order identifiers)
    /// when a destination is configured. `--dicom-outbox` is its older name.
    /// [default: cxr-outbox.sqlite]
    #[arg(long, env = "CXR_OUTBOX", conflicts_with = "dicom_outbox")]
    pub outbox: Option<PathBuf>,
    /// The older name of --outbox (and of CXR_OUTBOX: CXR_DICOM_OUTBOX), still
    /// accepted.
    #[arg(long, env = "CXR_DICOM_OUTBOX", hide = true)]
    pub dicom_outbox: Option<PathBuf>,
    /// Where results go as HL7 v2.5.1 ORU^R01 over MLLP: host:port (repeatable, or
    /// comma-separated in the environment). Every analysed or refused image of the
    /// DICOM node and the folder job, and `/predict` answers given the order's
    /// identifiers, are sent through the outbox.
    #[arg(long, env = "CXR_HL7_DESTINATION", value_delimiter = ',')]
    pub hl7_destination: Vec<String>,
    /// Where results go as FHIR R4 (a transaction Bundle: DiagnosticReport,
    /// Observation, Device), the server's base URL (http only, e.g.
    /// http://ehr:8080/fhir/R4). The same results as --hl7-destination, through the
    /// outbox.
    #[arg(long, env = "CXR_FHIR_URL")]
    pub fhir_url: Option<String>,
    /// A bearer token for --fhir-url (from the environment; never logged).
    #[arg(long, env = "CXR_FHIR_TOKEN", hide_env_values = true)]
    #[serde(skip)]
    pub fhir_token: Option<String>,
    /// OBR-5 (priority) of an urgent result's ORU (HL7 table 0027: S stat, A ASAP).
    #[arg(long, env = "CXR_HL7_URGENT_PRIORITY", default_value = crate::delivery::hl7::DEFAULT_URGENT_PRIORITY)]
    pub hl7_urgent_priority: String,
    /// A positive result at or above this P(PNEUMONIA) is flagged urgent in its
    /// reports (passive: nothing is reordered): a probability, or an operating
    /// point on the card's validation ROC (`sensitivity:0.95`, the default; the
    /// card's threshold when it has no ROC).
    #[arg(long, env = "CXR_URGENT_AT", default_value = "sensitivity:0.95")]
    pub urgent_at: String,
    /// Keep every answered image and the labels radiologists confirm for them
    /// (`POST /feedback`) in this SQLite file, for the live figures of each model
    /// (with --database-url they go to PostgreSQL instead, shared by replicas).
    #[arg(long, env = "CXR_OUTCOMES", value_name = "FILE")]
    pub outcomes: Option<PathBuf>,
    /// The live figures count each model file's most recent confirmed answers, up
    /// to this many.
    #[arg(long, env = "CXR_OUTCOMES_WINDOW", default_value_t = 500)]
    pub outcomes_window: u64,
    /// A PostgreSQL database (`postgres://user:password@host:port/db`) for state
    /// replicas share: the DICOM node's outbox and record of what was sent (instead
    /// of --outbox), and the outcomes (instead of --outcomes). Never logged.
    #[arg(long, env = "CXR_DATABASE_URL", hide_env_values = true)]
    #[serde(skip)]
    pub database_url: Option<String>,
    /// Most result objects waiting in the outbox; beyond it, C-STOREs are refused
    /// (out of resources) until the destinations catch up.
    #[arg(long, env = "CXR_DICOM_OUTBOX_CAPACITY", default_value_t = 10_000)]
    pub dicom_outbox_capacity: usize,
    /// Times a destination may refuse a result object (a C-STORE failure status, a
    /// presentation context it did not accept, a 4xx from STOW-RS) before it is set
    /// aside as a dead letter (`GET /dicom/outbox/dead-letters`; not counted against
    /// --dicom-outbox-capacity).
    #[arg(long, env = "CXR_DICOM_MAX_ATTEMPTS", default_value_t = crate::defaults::DICOM_MAX_ATTEMPTS)]
    pub dicom_max_attempts: u32,
    /// Hours a result object that keeps failing without a refusal (destination
    /// unreachable, timing out, a 5xx) is retried before it is a dead letter.
    #[arg(long, env = "CXR_DICOM_GIVE_UP_AFTER_HOURS", default_value_t = crate::defaults::DICOM_GIVE_UP_AFTER_HOURS)]
    pub dicom_give_up_after_hours: u64,
    /// Days the records of sent results and the dead letters (outbox), and the
    /// answers and confirmed labels (outcomes) are kept; pruned at start and hourly.
    /// 0 keeps them forever.
    #[arg(long, env = "CXR_RETENTION_DAYS", default_value_t = crate::defaults::RETENTION_DAYS)]
    pub retention_days: u64,
    /// The variant that answers DICOM C-STOREs (default: --default-model).
    #[arg(long, env = "CXR_DICOM_MODEL")]
    pub dicom_model: Option<String>,
    /// Most DICOM associations at once: listed peers, once their A-ASSOCIATE-RQ is
    /// accepted; beyond it, a transient A-ASSOCIATE-RJ (local limit exceeded).
    #[arg(long, env = "CXR_DICOM_MAX_ASSOCIATIONS", default_value_t = 16)]
    pub dicom_max_associations: usize,
    /// Most DICOM connections still negotiating (their A-ASSOCIATE-RQ not yet in),
    /// a quarter of them from one host, kept apart from the associations so that
    /// unknown callers never hold a listed peer's slot; beyond it, a transient
    /// A-ASSOCIATE-RJ at once.
    #[arg(long, env = "CXR_DICOM_MAX_NEGOTIATING", default_value_t = 32)]
    pub dicom_max_negotiating: usize,
    /// Longest a DICOM connection may take to send its whole A-ASSOCIATE-RQ (then an
    /// A-ABORT), seconds.
    #[arg(long, env = "CXR_DICOM_NEGOTIATION_TIMEOUT_S", default_value_t = 10)]
    pub dicom_negotiation_timeout_s: u64,
    /// Longest a DICOM association may last (then an A-ABORT; the sender associates
    /// again for the rest), seconds. Each read also idles out after 60 s.
    #[arg(long, env = "CXR_DICOM_ASSOCIATION_TIMEOUT_S", default_value_t = 600)]
    pub dicom_association_timeout_s: u64,
    /// Run as a folder job and exit: classify every DICOM, JPEG and PNG file under
    /// IN and write, per image, its JSON answer and (for DICOM) its SR and Secondary
    /// Capture under OUT (for orchestrators that run AI containers as jobs: mercure,
    /// MONAI Deploy).
    #[arg(long, num_args = 2, value_names = ["IN", "OUT"])]
    pub job: Option<Vec<PathBuf>>,
    /// Log format.
    #[arg(long, env = "CXR_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// Print the OpenAPI document (YAML) and exit.
    #[arg(long)]
    pub print_openapi: bool,
    /// Probe `GET /health` on this machine's `--port` and exit 0 if it answers 200,
    /// 1 otherwise (the container HEALTHCHECK: no curl in the image).
    #[arg(long)]
    #[serde(skip)]
    pub health_check: bool,
}

impl ServeArgs {
    /// Checks the values and says what to fix.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let positive = [
            ("--max-batch", self.max_batch.unwrap_or(1) as u64),
            ("--queue-capacity", self.queue_capacity as u64),
            ("--max-body-bytes", self.max_body_bytes as u64),
            ("--max-pixels", self.max_pixels),
            (
                "--max-images-per-request",
                self.max_images_per_request as u64,
            ),
            ("--max-inflight", self.max_inflight as u64),
            ("--max-buffered-bytes", self.max_buffered_bytes as u64),
            ("--header-read-timeout-s", self.header_read_timeout_s),
            ("--body-timeout-s", self.body_timeout_s),
            ("--max-connections", self.max_connections as u64),
            ("--max-decode-pixels", self.max_decode_pixels),
            ("--idle-timeout-s", self.idle_timeout_s),
            ("--shutdown-timeout-s", self.shutdown_timeout_s),
            (
                "--dicom-max-associations",
                self.dicom_max_associations as u64,
            ),
            ("--dicom-max-negotiating", self.dicom_max_negotiating as u64),
            (
                "--dicom-negotiation-timeout-s",
                self.dicom_negotiation_timeout_s,
            ),
            (
                "--dicom-association-timeout-s",
                self.dicom_association_timeout_s,
            ),
        ];
        if !(self.request_timeout_s.is_finite()
            && (0.001..=86_400.0).contains(&self.request_timeout_s))
        {
            return Err(ConfigError(
                "--request-timeout-s must be between 0.001 and 86400".into(),
            ));
        }
        for (flag, v) in positive {
            if v == 0 {
                return Err(ConfigError(format!("{flag} must be at least 1")));
            }
        }
        if self.max_batch.is_some_and(|b| b > 256) {
            return Err(ConfigError("--max-batch must be at most 256".into()));
        }
        if self.max_buffered_bytes < self.max_body_bytes {
            return Err(ConfigError(
                "--max-buffered-bytes must be at least --max-body-bytes".into(),
            ));
        }
        if self.max_decode_pixels < self.max_pixels {
            return Err(ConfigError(
                "--max-decode-pixels must be at least --max-pixels".into(),
            ));
        }
        if !(self.max_aspect_ratio.is_finite() && self.max_aspect_ratio >= 1.0) {
            return Err(ConfigError(
                "--max-aspect-ratio must be a number >= 1".into(),
            ));
        }
        if (self.shutdown_timeout_s as f64) < self.body_timeout_s as f64 + self.request_timeout_s {
            return Err(ConfigError(format!(
                "--shutdown-timeout-s ({}) must be at least --body-timeout-s + --request-timeout-s ({}), or the drain would cut requests it accepted",
                self.shutdown_timeout_s,
                self.body_timeout_s as f64 + self.request_timeout_s
            )));
        }
        if self.metrics_port.is_some_and(|p| p != 0 && p == self.port) {
            return Err(ConfigError("--metrics-port must differ from --port".into()));
        }
        if let Some(r) = &self.uid_root {
            crate::imaging::sr::check_uid_root(r).map_err(|e| ConfigError(e.0))?;
        }
        if self.dicom_max_attempts == 0 {
            return Err(ConfigError(
                "--dicom-max-attempts must be at least 1 (the first refusal)".into(),
            ));
        }
        if self.dicom_port.is_some() {
            self.dicom_node()?;
        }
        if self.batch_wait_us > 1_000_000 {
            return Err(ConfigError(
                "--batch-wait-us must be at most 1000000 (1 s)".into(),
            ));
        }
        if self.arrival_wait_us > 1_000_000 {
            return Err(ConfigError(
                "--arrival-wait-us must be at most 1000000 (1 s)".into(),
            ));
        }
        Ok(())
    }

    /// The DICOM node's configuration (`--dicom-port`), if it is on.
    pub fn dicom_node(&self) -> Result<Option<crate::dicom_node::NodeConfig>, ConfigError> {
        use crate::dicom_node::{Destination, NodeConfig, peers::Peers};
        let Some(port) = self.dicom_port else {
            return Ok(None);
        };
        let peers_file = self.dicom_peers_file.as_ref().ok_or_else(|| {
            ConfigError(
                "--dicom-port needs --dicom-peers-file: the calling AE titles that may associate"
                    .into(),
            )
        })?;
        let peers = Peers::load(peers_file).map_err(|e| ConfigError(e.0))?;
        crate::dicom_node::peers::check_ae_title(&self.dicom_ae_title)
            .map_err(|e| ConfigError(format!("--dicom-ae-title: {}", e.0)))?;
        let mut destinations = Vec::new();
        for d in &self.dicom_destination {
            destinations.push(Destination::parse_store(d).map_err(|e| ConfigError(e.0))?);
        }
        if let Some(url) = &self.stow_url {
            destinations.push(
                Destination::stow(url, self.stow_token.clone()).map_err(|e| ConfigError(e.0))?,
            );
        }
        if destinations.is_empty() {
            return Err(ConfigError(
                "--dicom-port needs somewhere to send results: --dicom-destination AE@host:port and/or --stow-url".into(),
            ));
        }
        let host: std::net::IpAddr = self.host.parse().map_err(|_| {
            ConfigError(format!(
                "--host `{}` must be an IP address with --dicom-port",
                self.host
            ))
        })?;
        Ok(Some(NodeConfig {
            bind: std::net::SocketAddr::new(host, port),
            ae_title: self.dicom_ae_title.clone(),
            peers,
            destinations,
            model: self.dicom_model.clone(),
            max_object_bytes: self.max_body_bytes,
            max_associations: self.dicom_max_associations,
            max_negotiating: self.dicom_max_negotiating,
            negotiation_timeout: Duration::from_secs(self.dicom_negotiation_timeout_s),
            association_timeout: Duration::from_secs(self.dicom_association_timeout_s),
        }))
    }

    /// Where the outbox is, and its policy.
    pub fn outbox_config(&self) -> crate::delivery::OutboxConfig {
        crate::delivery::OutboxConfig {
            path: self
                .outbox
                .clone()
                .or_else(|| self.dicom_outbox.clone())
                .unwrap_or_else(|| PathBuf::from(crate::defaults::OUTBOX)),
            database_url: self.database_url.clone(),
            policy: crate::delivery::outbox::Policy {
                capacity: self.dicom_outbox_capacity,
                max_attempts: self.dicom_max_attempts,
                give_up_after: Duration::from_secs(self.dicom_give_up_after_hours * 3600),
                retention: self.retention(),
            },
        }
    }

    /// The HL7 channels (`--hl7-destination`).
    pub fn hl7_channels(&self) -> Result<Vec<crate::delivery::hl7::Hl7Channel>, ConfigError> {
        let p = self.hl7_urgent_priority.trim();
        if p.is_empty() || p.len() > 2 || !p.chars().all(|c| c.is_ascii_alphabetic()) {
            return Err(ConfigError(format!(
                "--hl7-urgent-priority `{p}` must be a code of HL7 table 0027 (S, A, R, P, C, T)"
            )));
        }
        self.hl7_destination
            .iter()
            .map(|d| crate::delivery::hl7::Hl7Channel::parse(d, p).map_err(ConfigError))
            .collect()
    }

    /// The FHIR channel (`--fhir-url`).
    pub fn fhir_channel(&self) -> Result<Option<crate::delivery::fhir::FhirChannel>, ConfigError> {
        self.fhir_url
            .as_deref()
            .map(|url| {
                crate::delivery::fhir::FhirTarget::new(url, self.fhir_token.clone())
                    .map(crate::delivery::fhir::FhirChannel::new)
                    .map_err(ConfigError)
            })
            .transpose()
    }

    /// `--urgent-at`.
    pub fn urgent_at(&self) -> Result<crate::delivery::UrgentAt, ConfigError> {
        self.urgent_at.parse().map_err(ConfigError)
    }

    /// `--retention-days` (none: kept forever).
    pub fn retention(&self) -> Option<Duration> {
        (self.retention_days > 0).then(|| Duration::from_secs(self.retention_days * 86_400))
    }

    /// The gRPC listener's limits.
    pub fn grpc_limits(&self) -> crate::grpc::GrpcLimits {
        crate::grpc::GrpcLimits {
            max_message_bytes: self.max_body_bytes,
            body_timeout: Duration::from_secs(self.body_timeout_s),
            max_concurrent_streams: 100,
            request_timeout: Duration::from_secs_f64(
                self.body_timeout_s as f64 + self.request_timeout_s,
            ),
            max_connections: self.max_connections,
            first_bytes_timeout: Duration::from_secs(self.header_read_timeout_s.max(1)),
            idle_timeout: Duration::from_secs(self.idle_timeout_s.max(1)),
        }
    }

    /// The HTTP door's body limits.
    pub fn body_limits(&self) -> crate::http::BodyLimits {
        crate::http::BodyLimits {
            max_body_bytes: self.max_body_bytes,
            body_timeout: Duration::from_secs(self.body_timeout_s),
        }
    }

    /// The core's limits (every door's).
    pub fn limits(&self) -> Limits {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        Limits {
            max_pixels: self.max_pixels,
            max_images: self.max_images_per_request,
            request_timeout: Duration::from_secs_f64(self.request_timeout_s),
            max_inflight: self.max_inflight,
            max_decodes: if self.decode_threads == 0 {
                cores
            } else {
                self.decode_threads
            },
            dicom: DicomOptions {
                allow_any_modality: self.allow_any_modality,
                allow_lateral: self.allow_lateral,
                ..DicomOptions::default()
            },
            geometry: crate::imaging::Geometry {
                min_side: self.min_image_side,
                max_aspect: self.max_aspect_ratio,
            },
            max_buffered_bytes: self.max_buffered_bytes,
            max_decode_pixels: self.max_decode_pixels,
            ood_action: self.ood_action,
        }
    }

    /// Connection limits (slow and idle clients).
    pub fn conn_limits(&self) -> crate::http::server::ConnLimits {
        crate::http::server::ConnLimits {
            header_read_timeout: std::time::Duration::from_secs(self.header_read_timeout_s),
            idle_timeout: std::time::Duration::from_secs(self.idle_timeout_s),
            max_connections: self.max_connections,
            shutdown_timeout: std::time::Duration::from_secs(self.shutdown_timeout_s),
        }
    }

    /// The shadows asked for (`--shadow`, `--shadow-share`).
    pub fn shadows(
        &self,
    ) -> Result<Vec<crate::repository::ShadowSpec>, crate::repository::ShadowError> {
        self.shadow
            .iter()
            .filter(|s| !s.trim().is_empty())
            .map(|s| crate::repository::ShadowSpec::parse(s.trim(), self.shadow_share))
            .collect()
    }

    /// What model loading needs.
    pub fn load_config(&self) -> LoadConfig {
        LoadConfig {
            models_dir: self.models_dir.clone(),
            default_model: self.default_model.clone(),
            // The DICOM node's model answers every C-STORE: unloading it would
            // refuse them all (A700, which PACSes retry forever).
            door_models: self
                .dicom_model
                .iter()
                .filter(|_| self.dicom_port.is_some())
                .cloned()
                .collect(),
            ort_lib: resolve_library(self.ort_lib.as_deref()),
            device: self.device,
            intra_threads: self.intra_threads,
            cpu_mem_arena: self.cpu_mem_arena,
            intra_spinning: self.intra_op_spinning,
            shared_pool: self.shared_pool,
            cuda_max_batch: self.max_batch.unwrap_or(CUDA_MAX_BATCH),
            backend: self.backend,
            model_backends: self.model_backends.iter().cloned().collect(),
            decision: self.decision_config(),
            site_card: self.site_card.clone(),
            trusted_signers: self.trusted_signers.clone(),
            require_signed: self.require_signed_models,
            batch: BatchConfig {
                max_batch: self.max_batch.unwrap_or(CPU_MAX_BATCH),
                batch_wait: Duration::from_micros(self.batch_wait_us),
                arrival_wait: Duration::from_micros(self.arrival_wait_us),
                capacity: self.queue_capacity,
            },
        }
    }
}

impl ServeArgs {
    /// Where `auto`'s decision and OpenVINO's compiled models are kept: the flags,
    /// else beside the models.
    pub fn decision_config(&self) -> DecisionConfig {
        use crate::inference::decision::{DEFAULT_CACHE_DIR, DEFAULT_FILE};
        let file = self
            .backend_decision
            .clone()
            .unwrap_or_else(|| self.models_dir.join(DEFAULT_FILE));
        let openvino_cache = self.openvino_cache_dir.clone().unwrap_or_else(|| {
            file.parent().map_or_else(
                || PathBuf::from(DEFAULT_CACHE_DIR),
                |d| d.join(DEFAULT_CACHE_DIR),
            )
        });
        DecisionConfig {
            file: Some(file),
            openvino_cache: Some(openvino_cache),
        }
    }
}

crate::message_error!(
    /// A `--model-backend` value that is not `NAME=ort|openvino|auto`.
    ModelBackendError
);

/// `NAME=ort|openvino|auto` (`--model-backend`).
fn parse_model_backend(
    s: &str,
) -> Result<(String, crate::inference::BackendChoice), ModelBackendError> {
    use clap::ValueEnum;
    let (name, choice) = s
        .split_once('=')
        .ok_or_else(|| ModelBackendError(format!("`{s}`: expected NAME=ort|openvino|auto")))?;
    let choice = crate::inference::BackendChoice::from_str(choice.trim(), true)
        .map_err(|_| ModelBackendError(format!("`{choice}`: expected ort, openvino or auto")))?;
    Ok((name.trim().to_string(), choice))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn flag_defaults_are_the_limits_defaults() {
        let from_flags = ServeArgs::parse_from(["cxr-serve"]).limits();
        let mut from_flags = format!("{from_flags:?}");
        let mut default = format!("{:?}", Limits::default());
        // The decode threads' flag default is one per core, the struct's a fixed 4.
        for s in [&mut from_flags, &mut default] {
            let start = s.find("max_decodes: ").unwrap();
            let end = start + s[start..].find(',').unwrap();
            s.replace_range(start..end, "max_decodes: _");
        }
        assert_eq!(from_flags, default);
    }

    #[test]
    fn models_share_one_spinning_pool_by_default() {
        // Per-session pools of idle models slow the model that runs (bench/RESULTS.md).
        let cfg = ServeArgs::parse_from(["cxr-serve"]).load_config();
        assert!(cfg.shared_pool && cfg.intra_spinning);
        let own = ServeArgs::parse_from(["cxr-serve", "--shared-pool", "false"]);
        assert!(!own.load_config().shared_pool);
    }

    #[test]
    fn cpu_batches_of_two_unless_told() {
        // Larger batches outgrow the caches on the CPU (bench/RESULTS.md); a GPU
        // wants them.
        let cfg = ServeArgs::parse_from(["cxr-serve"]).load_config();
        assert_eq!((cfg.batch.max_batch, cfg.cuda_max_batch), (2, 8));
        let told = ServeArgs::parse_from(["cxr-serve", "--max-batch", "16"]).load_config();
        assert_eq!((told.batch.max_batch, told.cuda_max_batch), (16, 16));
        let big = ServeArgs::parse_from(["cxr-serve", "--max-batch", "257"]);
        assert!(big.validate().unwrap_err().0.contains("--max-batch"));
        let zero = ServeArgs::parse_from(["cxr-serve", "--max-batch", "0"]);
        assert!(zero.validate().unwrap_err().0.contains("--max-batch"));
    }

    #[test]
    fn the_backend_decision_lives_beside_the_models_unless_told() {
        let beside = ServeArgs::parse_from(["cxr-serve", "--models-dir", "/m"]).load_config();
        assert_eq!(
            beside.decision.file.as_deref(),
            Some(std::path::Path::new("/m/backend.decision.json"))
        );
        assert_eq!(
            beside.decision.openvino_cache.as_deref(),
            Some(std::path::Path::new("/m/openvino-cache"))
        );
        // The cache follows the decision onto its volume.
        let told = ServeArgs::parse_from(["cxr-serve", "--backend-decision", "/v/d.json"]);
        let told = told.load_config().decision;
        assert_eq!(
            told.file.as_deref(),
            Some(std::path::Path::new("/v/d.json"))
        );
        assert_eq!(
            told.openvino_cache.as_deref(),
            Some(std::path::Path::new("/v/openvino-cache"))
        );
    }

    #[test]
    fn lone_requests_do_not_wait_for_a_batch() {
        // A batch is what queued while the previous one ran (bench/RESULTS.md).
        let cfg = ServeArgs::parse_from(["cxr-serve"]).load_config();
        assert_eq!(cfg.batch.batch_wait, std::time::Duration::ZERO);
        // ...but a batch waits for requests already being decoded behind it.
        assert_eq!(cfg.batch.arrival_wait, std::time::Duration::from_millis(20));
    }
}
