//! The Open Inference Protocol over gRPC (`inference.GRPCInferenceService`, compiled
//! from `proto/grpc_predict_v2.proto`): a door onto the prediction core beside the
//! HTTP one, with the same inputs (`image` BYTES of encoded files, or `input` FP32
//! `[N, 3, S, S]`, in `contents` or `raw_input_contents`), outputs, parameters,
//! limits, queues, API keys (`authorization: Bearer …` or `x-api-key` metadata, the
//! same scopes), audit records and metrics. Errors map to gRPC status codes once,
//! in [`code`]. Also served: the standard health service and server reflection.
//!
//! Admission (`admission`) comes before any byte of a message is read: the API
//! key from the call's metadata, the message's declared length against its
//! method's limit and the core's buffered-bytes budget, the body timeout. A call in
//! flight keeps its connection open past the idle timeout (`Capped`).

mod admission;

pub use crate::oip::Inputs;
pub use admission::Calls;
pub use admission::ConnInfo;
pub use admission::Framing;
pub use admission::PRE_AUTH_MESSAGE_BYTES;

use std::sync::Arc;
use std::time::Instant;

use tonic::Request;
use tonic::Response;
use tonic::Status;

use crate::access::ApiKeys;
use crate::access::Caller;
use crate::access::Scope;
use crate::access::presented_key;
use crate::error_type::ErrorType;
use crate::oip;
use crate::oip::AskedOutput;
use crate::oip::OutTensor;
use crate::oip::Param;
use crate::oip::Params;
use crate::oip::tensor;
use crate::predict::Ask;
use crate::predict::Asker;
use crate::predict::Core;
use crate::predict::PredictError;
use crate::predict::Traced;

/// The generated protocol types and service.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod pb {
    tonic::include_proto!("inference");
}

/// The protocol's descriptor set, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/inference_descriptor.bin"));

use pb::grpc_inference_service_server::GrpcInferenceService;
use pb::model_infer_response::InferOutputTensor;

/// The gRPC status of each error type (one arm per type, no catch-all).
pub fn code(kind: ErrorType) -> tonic::Code {
    use tonic::Code;
    match kind {
        ErrorType::EmptyImage
        | ErrorType::InvalidImage
        | ErrorType::InvalidDicom
        | ErrorType::InvalidRequest
        | ErrorType::InvalidQuery
        | ErrorType::UnsupportedMediaType
        | ErrorType::UnsupportedTransferSyntax
        | ErrorType::NotAcceptable => Code::InvalidArgument,
        ErrorType::ImplausibleGeometry
        | ErrorType::MissingPixelData
        | ErrorType::UnsupportedDicom
        | ErrorType::OperatingPointUnreachable
        | ErrorType::ColourImage
        | ErrorType::BlankImage
        | ErrorType::WrongBodyPart
        | ErrorType::LateralView
        | ErrorType::SrUnavailable
        | ErrorType::ExplanationUnavailable
        | ErrorType::OutOfDistribution => Code::FailedPrecondition,
        ErrorType::TooManyPixels | ErrorType::PayloadTooLarge | ErrorType::TooManyImages => {
            Code::ResourceExhausted
        }
        ErrorType::ModelNotFound | ErrorType::NotFound | ErrorType::UnknownRequest => {
            Code::NotFound
        }
        ErrorType::FeedbackConflict => Code::AlreadyExists,
        ErrorType::RepositoryRefused => Code::FailedPrecondition,
        ErrorType::MethodNotAllowed => Code::Unimplemented,
        ErrorType::Unauthorized => Code::Unauthenticated,
        ErrorType::Forbidden => Code::PermissionDenied,
        ErrorType::NotReady | ErrorType::AuditUnavailable => Code::Unavailable,
        ErrorType::Overloaded => Code::ResourceExhausted,
        ErrorType::Timeout | ErrorType::BodyTimeout => Code::DeadlineExceeded,
        ErrorType::Internal => Code::Internal,
    }
}

/// What the gRPC door refuses: the core's refusals, and its own (the key, the
/// message's size, the body's time).
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// The core's.
    #[error(transparent)]
    Core(#[from] PredictError),
    /// No valid key, or a key without the method's scope.
    #[error(transparent)]
    Auth(#[from] crate::access::AuthError),
    /// A message larger than `--max-body-bytes`.
    #[error("request body exceeds the limit of {0} bytes")]
    MessageTooLarge(usize),
    /// The message did not arrive within `--body-timeout-s`.
    #[error("the request body did not arrive within {0} s")]
    BodyTimeout(u64),
}

impl Refusal {
    /// Its `error_type`.
    pub fn error_type(&self) -> ErrorType {
        match self {
            Refusal::Core(e) => e.error_type(),
            Refusal::Auth(e) => e.error_type(),
            Refusal::MessageTooLarge(_) => ErrorType::PayloadTooLarge,
            Refusal::BodyTimeout(_) => ErrorType::BodyTimeout,
        }
    }
}

/// An error as a gRPC status: its code, its message, and its `error_type` (and a
/// retry delay when it is about the server's state) in the trailers.
pub fn status(e: &PredictError) -> Status {
    if let PredictError::Internal(detail) = e {
        tracing::error!(detail = %detail, "internal error");
    }
    status_of(e.error_type(), e.to_string())
}

/// A refusal, the door's own or the core's, as a gRPC status ([`status`]).
pub fn door_status(r: &Refusal) -> Status {
    match r {
        Refusal::Core(e) => status(e),
        r => status_of(r.error_type(), r.to_string()),
    }
}

fn status_of(kind: ErrorType, message: String) -> Status {
    // The refusals about the server's state carry google.rpc.RetryInfo (and a
    // retry-after header, for clients that read only metadata).
    let retry_after = kind.retry_after().map(u64::from);
    let mut s = match retry_after {
        Some(after) => <Status as tonic_types::StatusExt>::with_error_details(
            code(kind),
            message,
            tonic_types::ErrorDetails::with_retry_info(Some(std::time::Duration::from_secs(after))),
        ),
        None => Status::new(code(kind), message),
    };
    let md = s.metadata_mut();
    if let Ok(v) = kind.as_str().parse() {
        md.insert("error-type", v);
    }
    if let Some(after) = retry_after
        && let Ok(v) = after.to_string().parse()
    {
        md.insert("retry-after", v);
    }
    s
}

/// The service.
pub struct Inference {
    core: Core,
    keys: Option<Arc<ApiKeys>>,
}

impl Inference {
    /// The service over `core`, requiring `keys` when given.
    pub fn new(core: Core, keys: Option<Arc<ApiKeys>>) -> Self {
        Self { core, keys }
    }

    /// Who calls, if its key has `scope`: the caller [`admission`] let in (it
    /// checked the key before the message was read), or the key checked here when
    /// the service runs without that layer.
    fn caller<T>(&self, req: &Request<T>, scope: Scope) -> Result<Caller, Status> {
        let Some(keys) = &self.keys else {
            return Ok(Caller::anonymous());
        };
        if let Some(c) = req.extensions().get::<Caller>() {
            return Ok(c.clone());
        }
        let headers = req.metadata().clone().into_headers();
        keys.authorize(presented_key(&headers), scope).map_err(|e| {
            let reason = e.reason();
            self.core
                .metrics()
                .auth_refused
                .with_label_values(&[reason])
                .inc();
            door_status(&Refusal::Auth(e))
        })
    }

    /// Counts a call by method and status code.
    fn count<T>(&self, method: &str, r: Result<T, Status>) -> Result<T, Status> {
        let code = match &r {
            Ok(_) => tonic::Code::Ok,
            Err(s) => s.code(),
        };
        self.core
            .metrics()
            .grpc_requests
            .with_label_values(&[method, &format!("{code:?}")])
            .inc();
        r
    }

    async fn infer(
        &self,
        req: Request<pb::ModelInferRequest>,
    ) -> Result<Response<pb::ModelInferResponse>, Status> {
        let started = Instant::now();
        let caller = self.caller(&req, Scope::Predict)?;
        // The request's ids and the caller's W3C trace context (or a trace of its
        // own), from the call's metadata as the HTTP door reads its headers: the
        // stages become spans, exported with the HTTP door's.
        let md = req.metadata();
        let asker = Asker::from_headers(
            caller,
            |n| crate::trace::single(md.get_all(n).iter().map(|v| v.as_bytes())),
            self.core.exporter().is_some(),
            Traced::Always,
        );
        let trace = asker
            .trace
            .clone()
            .expect("Traced::Always gives every request a trace");
        let deadline = req
            .metadata()
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .and_then(grpc_timeout);
        let core = &self.core;
        let _slot = core.slot().map_err(|e| status(&e))?;
        trace.stage("admission", trace.started(), Instant::now(), &[]);
        let r = req.into_inner();
        let job = core.within_timeout(infer_inner(core, r, asker, started));
        // The client's deadline, when it is sooner than the server's own.
        let out = match deadline {
            Some(d) => tokio::time::timeout(d, job)
                .await
                .unwrap_or(Err(PredictError::Timeout(d.as_secs_f64()))),
            None => job.await,
        }
        .map_err(|e| status(&e));
        let code = out.as_ref().err().map_or(tonic::Code::Ok, Status::code);
        // Server errors, as OpenTelemetry's gRPC conventions count them.
        let error = matches!(
            code,
            tonic::Code::Unknown
                | tonic::Code::DeadlineExceeded
                | tonic::Code::Unimplemented
                | tonic::Code::Internal
                | tonic::Code::Unavailable
                | tonic::Code::DataLoss
        );
        // Refused calls are not exported unless asked (--otlp-export-refused).
        let refused = matches!(
            code,
            tonic::Code::Unauthenticated | tonic::Code::PermissionDenied | tonic::Code::NotFound
        );
        trace.finish(
            "inference.GRPCInferenceService/ModelInfer",
            &[
                ("rpc.system", "grpc".into()),
                ("rpc.grpc.status_code", (code as i32).to_string()),
            ],
            error.then(|| format!("{code:?}")),
            core.exporter().and_then(|x| x.unless_refused(refused)),
        );
        out.map(|r| {
            let mut resp = Response::new(r);
            if let Ok(v) = trace.traceparent().parse() {
                resp.metadata_mut().insert(crate::trace::TRACEPARENT, v);
            }
            // The caller's tracestate back, unchanged (as the HTTP door answers it).
            if let Some(Ok(v)) = trace
                .context()
                .tracestate
                .as_deref()
                .map(str::parse::<tonic::metadata::MetadataValue<_>>)
            {
                resp.metadata_mut().insert(crate::trace::TRACESTATE, v);
            }
            resp
        })
    }
}

/// A `grpc-timeout` header's duration (gRPC over HTTP/2: up to 8 digits and a unit,
/// H M S m u n).
pub fn grpc_timeout(v: &str) -> Option<std::time::Duration> {
    use std::time::Duration;
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// A request's parameters in the protocol's terms.
fn params(p: &std::collections::HashMap<String, pb::InferParameter>) -> Params {
    use pb::infer_parameter::ParameterChoice;
    p.iter()
        .map(|(k, v)| {
            let v = match &v.parameter_choice {
                Some(ParameterChoice::BoolParam(b)) => Some(Param::Bool(*b)),
                Some(ParameterChoice::Int64Param(i)) => Some(Param::Int(*i)),
                Some(ParameterChoice::Uint64Param(u)) => Some(Param::Uint(*u)),
                Some(ParameterChoice::DoubleParam(f)) => Some(Param::Double(*f)),
                Some(ParameterChoice::StringParam(s)) => Some(Param::Str(s.clone())),
                None => None,
            };
            (k.clone(), v)
        })
        .collect()
}

/// A response parameter in gRPC's terms.
fn parameter(p: Param) -> pb::InferParameter {
    use pb::infer_parameter::ParameterChoice;
    pb::InferParameter {
        parameter_choice: Some(match p {
            Param::Bool(b) => ParameterChoice::BoolParam(b),
            Param::Int(i) => ParameterChoice::Int64Param(i),
            Param::Uint(u) => ParameterChoice::Uint64Param(u),
            Param::Double(f) => ParameterChoice::DoubleParam(f),
            Param::Str(s) => ParameterChoice::StringParam(s),
        }),
    }
}

async fn infer_inner(
    core: &Core,
    r: pb::ModelInferRequest,
    asker: Asker,
    started: Instant,
) -> Result<pb::ModelInferResponse, PredictError> {
    let version = (!r.model_version.is_empty()).then_some(r.model_version.as_str());
    let model = core.served(&r.model_name, version)?.clone();
    let (ask, outputs) = ask_and_outputs(&r)?;
    let valid = core.validate_for(asker, model, &ask, started)?;
    let card = &valid.model.card;
    let inputs = inputs_of(&r, &card.name, card.input_size, core.limits().max_images)?;
    let answer = oip::infer(core, &valid, &outputs, inputs).await?;
    Ok(pb::ModelInferResponse {
        model_name: answer.model_name,
        model_version: answer.model_version,
        id: r.id.clone(),
        parameters: answer
            .parameters
            .into_iter()
            .map(|(k, v)| (k.to_string(), parameter(v)))
            .collect(),
        // gRPC answers every output in raw_output_contents, as Triton does.
        outputs: answer
            .outputs
            .iter()
            .map(|t| InferOutputTensor {
                name: t.output.name().to_string(),
                datatype: t.datatype().into(),
                shape: t.shape.clone(),
                parameters: Default::default(),
                contents: None,
            })
            .collect(),
        raw_output_contents: answer.outputs.iter().map(OutTensor::raw).collect(),
    })
}

/// The request's parameters and asked outputs, in the protocol's terms.
fn ask_and_outputs(r: &pb::ModelInferRequest) -> Result<(Ask, Vec<oip::Selected>), PredictError> {
    let parameters = params(&r.parameters);
    let asked: Vec<AskedOutput> = r
        .outputs
        .iter()
        .map(|o| AskedOutput {
            name: o.name.clone(),
            parameters: params(&o.parameters),
        })
        .collect();
    Ok((
        oip::ask_of(&parameters)?,
        oip::selected_outputs(&parameters, Some(&asked))?,
    ))
}

/// The door's translation of a request's input for model `model` (input size
/// `size`, at most `max` images): every count a shape declares is checked against
/// `max` and against the bytes sent before anything is allocated for it.
pub fn inputs_of(
    r: &pb::ModelInferRequest,
    model: &str,
    size: u32,
    max: usize,
) -> Result<Inputs, PredictError> {
    let input = oip::one_input(r.inputs.iter().collect(), size)?;
    let raw = match r.raw_input_contents.as_slice() {
        [] => None,
        [one] => Some(one.as_slice()),
        more => {
            return Err(PredictError::InvalidRequest(format!(
                "{} raw_input_contents for one input",
                more.len()
            )));
        }
    };
    if raw.is_some() && input.contents.is_some() {
        return Err(PredictError::InvalidRequest(
            "input has both `contents` and raw_input_contents; send one".into(),
        ));
    }
    Ok(match input.name.as_str() {
        "image" => {
            oip::check_datatype(&input.name, &input.datatype, "BYTES")?;
            let n = tensor::image_batch(&input.shape, max)?;
            let files = match raw {
                Some(b) => tensor::length_prefixed(b, n)?,
                None => {
                    let c = input
                        .contents
                        .as_ref()
                        .map_or(&[][..], |c| &c.bytes_contents[..]);
                    tensor::check_count(c.len(), n)?;
                    c.iter().map(|f| bytes::Bytes::copy_from_slice(f)).collect()
                }
            };
            Inputs::Files(files)
        }
        "input" => {
            oip::check_datatype(&input.name, &input.datatype, "FP32")?;
            let n = tensor::tensor_batch(&input.shape, size, max)?;
            let row = 3 * (size as usize) * (size as usize);
            // The values are counted before they are copied: `rows` refuses a count
            // the shape does not declare.
            let decoded;
            let values = match raw {
                Some(b) => {
                    decoded = tensor::le_f32(b, n * row, &input.shape)?;
                    &decoded[..]
                }
                None => input
                    .contents
                    .as_ref()
                    .map_or(&[][..], |c| &c.fp32_contents[..]),
            };
            Inputs::Rows(tensor::rows(values, n, row, &input.shape)?)
        }
        other => return Err(oip::unknown_input(other, model)),
    })
}

/// The whole translation of a request (its parameters, outputs and input), as
/// [`Inference`] does it before the core: for tests and tools that check it
/// without a model.
pub fn translate(
    r: &pb::ModelInferRequest,
    model: &str,
    size: u32,
    max: usize,
) -> Result<(Ask, Vec<oip::Selected>, Inputs), PredictError> {
    let (ask, outputs) = ask_and_outputs(r)?;
    Ok((ask, outputs, inputs_of(r, model, size, max)?))
}

#[tonic::async_trait]
impl GrpcInferenceService for Inference {
    async fn server_live(
        &self,
        _: Request<pb::ServerLiveRequest>,
    ) -> Result<Response<pb::ServerLiveResponse>, Status> {
        self.count(
            "ServerLive",
            Ok(Response::new(pb::ServerLiveResponse { live: true })),
        )
    }

    async fn server_ready(
        &self,
        _: Request<pb::ServerReadyRequest>,
    ) -> Result<Response<pb::ServerReadyResponse>, Status> {
        let ready = self
            .core
            .models()
            .is_some_and(|m| m.all().iter().all(|m| m.is_alive()));
        self.count(
            "ServerReady",
            Ok(Response::new(pb::ServerReadyResponse { ready })),
        )
    }

    async fn model_ready(
        &self,
        req: Request<pb::ModelReadyRequest>,
    ) -> Result<Response<pb::ModelReadyResponse>, Status> {
        let r = req.into_inner();
        let out = if self.core.models().is_none() {
            Ok(Response::new(pb::ModelReadyResponse { ready: false }))
        } else {
            let version = (!r.version.is_empty()).then_some(r.version.as_str());
            self.core
                .served(&r.name, version)
                .map(|m| {
                    Response::new(pb::ModelReadyResponse {
                        ready: m.is_alive(),
                    })
                })
                .map_err(|e| status(&e))
        };
        self.count("ModelReady", out)
    }

    async fn server_metadata(
        &self,
        _: Request<pb::ServerMetadataRequest>,
    ) -> Result<Response<pb::ServerMetadataResponse>, Status> {
        let (name, version, extensions) = tensor::server_metadata();
        self.count(
            "ServerMetadata",
            Ok(Response::new(pb::ServerMetadataResponse {
                name: name.into(),
                version: version.into(),
                extensions: extensions.into_iter().map(str::to_string).collect(),
            })),
        )
    }

    async fn model_metadata(
        &self,
        req: Request<pb::ModelMetadataRequest>,
    ) -> Result<Response<pb::ModelMetadataResponse>, Status> {
        let out = (|| {
            self.caller(&req, Scope::Models)?;
            let r = req.get_ref();
            let version = (!r.version.is_empty()).then_some(r.version.as_str());
            let m = self.core.served(&r.name, version).map_err(|e| status(&e))?;
            let (platform, inputs, outputs) = tensor::model_tensors(&m);
            let t = |(name, datatype, shape): tensor::TensorSpec| {
                pb::model_metadata_response::TensorMetadata {
                    name: name.into(),
                    datatype: datatype.into(),
                    shape,
                }
            };
            Ok(Response::new(pb::ModelMetadataResponse {
                name: m.card.name.clone(),
                // Every loaded version, as the REST metadata lists them.
                versions: self.core.models().map_or_else(
                    || vec![m.card.version.clone()],
                    |set| set.version_names(&m.card.name),
                ),
                platform: platform.into(),
                inputs: inputs.into_iter().map(t).collect(),
                outputs: outputs.into_iter().map(t).collect(),
            }))
        })();
        self.count("ModelMetadata", out)
    }

    async fn model_infer(
        &self,
        req: Request<pb::ModelInferRequest>,
    ) -> Result<Response<pb::ModelInferResponse>, Status> {
        let out = self.infer(req).await;
        self.count("ModelInfer", out)
    }
}

/// Limits of the gRPC listener (the HTTP listener's, in gRPC's terms).
#[derive(Debug, Clone)]
pub struct GrpcLimits {
    /// Largest request message (`--max-body-bytes`).
    pub max_message_bytes: usize,
    /// Longest an inference message may take to arrive (`--body-timeout-s`).
    pub body_timeout: std::time::Duration,
    /// Most concurrent streams per connection.
    pub max_concurrent_streams: u32,
    /// Longest a request may take, whatever the client's deadline.
    pub request_timeout: std::time::Duration,
    /// Most connections open at once (`--max-connections`); beyond it a new
    /// connection is closed at once.
    pub max_connections: usize,
    /// Longest a new connection may take to send its first bytes.
    pub first_bytes_timeout: std::time::Duration,
    /// Longest a connection may send nothing before it is closed.
    pub idle_timeout: std::time::Duration,
}

/// A connection holding its place under the connection cap ([`crate::conn::Slot`]),
/// closed when its peer sends nothing ([`crate::conn::Quiet`]): no first bytes
/// within the header-read timeout, or nothing more for the idle timeout (the HTTP
/// listener's limits), unless a call on it is in flight or ended less than the
/// idle timeout ago (the answer is what the peer waits for, not silence:
/// [`Calls`] keeps it).
type Capped = crate::conn::Quiet<tokio::net::TcpStream, admission::Calls>;

impl tonic::transport::server::Connected for Capped {
    type ConnectInfo = admission::ConnInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        admission::ConnInfo {
            tcp: self.get_ref().connect_info(),
            calls: self.keep().clone(),
        }
    }
}

/// Serves the protocol, the health service (`grpc.health.v1.Health`, SERVING once
/// the models are loaded) and reflection (v1 and v1alpha) on `listener` until
/// `shutdown` completes, then drains the calls in flight.
pub async fn serve(
    listener: tokio::net::TcpListener,
    core: Core,
    keys: Option<Arc<ApiKeys>>,
    limits: GrpcLimits,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    use pb::grpc_inference_service_server::GrpcInferenceServiceServer;
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_not_serving::<GrpcInferenceServiceServer<Inference>>()
        .await;
    // SERVING once every model is loaded (at once, unless the listener opened
    // before them: --listen-before-ready).
    let watched = core.clone();
    tokio::spawn(async move {
        while watched.models().is_none() {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        reporter
            .set_serving::<GrpcInferenceServiceServer<Inference>>()
            .await;
    });
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .expect("the protocol's descriptor set is valid");
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .expect("the protocol's descriptor set is valid");
    let admission = admission::Admission::new(
        core.clone(),
        keys.clone(),
        limits.max_message_bytes,
        limits.body_timeout,
    );
    let service = GrpcInferenceServiceServer::new(Inference::new(core, keys))
        .max_decoding_message_size(limits.max_message_bytes)
        .max_encoding_message_size(limits.max_message_bytes);
    // Connections beyond the cap are closed as they come.
    let slots = crate::conn::Slots::new(limits.max_connections);
    let incoming = async_stream_of(listener, slots, &limits);
    tonic::transport::Server::builder()
        // A backstop: the core answers DEADLINE_EXCEEDED itself, sooner.
        .timeout(limits.request_timeout + std::time::Duration::from_secs(5))
        .max_concurrent_streams(limits.max_concurrent_streams)
        // Pings find dead peers of connections with calls in flight; longer than the
        // idle timeout, so that they do not keep an idle connection open.
        .http2_keepalive_interval(Some(limits.idle_timeout * 2))
        .http2_keepalive_timeout(Some(std::time::Duration::from_secs(20)))
        // The key, the message's size and the budget, before the message is read.
        .layer(admission)
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(service)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
}

/// The accepted connections, each holding a slot of `slots` (those over the cap
/// are dropped, closing them).
fn async_stream_of(
    listener: tokio::net::TcpListener,
    slots: crate::conn::Slots,
    limits: &GrpcLimits,
) -> impl tokio_stream::Stream<Item = std::io::Result<Capped>> {
    let (first, idle) = (limits.first_bytes_timeout, limits.idle_timeout);
    let accepted = tokio_stream::wrappers::TcpListenerStream::new(listener);
    tokio_stream::StreamExt::filter_map(accepted, move |conn| match conn {
        Err(e) => Some(Err(e)),
        Ok(io) => match slots.take() {
            Some(slot) => {
                let _ = io.set_nodelay(true);
                Some(Ok(
                    Capped::new(io, first, idle, Arc::default()).holding(slot)
                ))
            }
            None => {
                tracing::warn!("gRPC connection refused: --max-connections reached");
                None
            }
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn grpc_timeouts_parse_as_the_protocol_writes_them() {
        assert_eq!(grpc_timeout("3S"), Some(Duration::from_secs(3)));
        assert_eq!(grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(grpc_timeout("2M"), Some(Duration::from_secs(120)));
        assert_eq!(
            grpc_timeout("99999999u"),
            Some(Duration::from_micros(99_999_999))
        );
        for bad in ["", "S", "123456789S", "1x", "-1S", "1.5S"] {
            assert_eq!(grpc_timeout(bad), None, "{bad}");
        }
    }

    #[test]
    fn refusals_map_to_their_grpc_codes_and_transient_ones_carry_retry_info() {
        use tonic_types::StatusExt as _;
        let s = status(&PredictError::Overloaded("m".into()));
        assert_eq!(s.code(), tonic::Code::ResourceExhausted);
        assert_eq!(
            s.get_details_retry_info().and_then(|r| r.retry_delay),
            Some(Duration::from_secs(1))
        );
        assert_eq!(s.metadata().get("error-type").unwrap(), "overloaded");
        let s = status(&PredictError::InvalidRequest("x".into()));
        assert_eq!(s.code(), tonic::Code::InvalidArgument);
        assert!(s.get_details_retry_info().is_none());
        assert_eq!(
            status(&PredictError::Timeout(1.0)).code(),
            tonic::Code::DeadlineExceeded
        );
        assert_eq!(
            status(&PredictError::NotReady).code(),
            tonic::Code::Unavailable
        );
        for k in ErrorType::ALL {
            // Every transient refusal tells the client to come back; no other does.
            let transient = matches!(
                code(k),
                tonic::Code::Unavailable
                    | tonic::Code::ResourceExhausted
                    | tonic::Code::DeadlineExceeded
            );
            if k.is_transient() {
                assert!(transient, "{k:?}");
            }
        }
    }
}
