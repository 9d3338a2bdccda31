//! Inference: the ONNX Runtime environment and sessions on CPU or CUDA, the
//! batching workers that own them, and the set of served variants.

pub mod backend;
pub mod batcher;
pub mod decision;
pub mod measure;
pub mod models;
pub mod openvino;
pub mod runtime;
pub mod shadow;

pub use backend::RestartError;
pub use batcher::{
    Arrival, Backend, BatchConfig, BatchObserver, Batcher, JobOutput, SessionFactory, SubmitError,
};
pub use measure::{CpuModel, MEASURE_BATCH};
pub use models::{
    CPU_MAX_BATCH, CUDA_MAX_BATCH, InferError, LoadConfig, LoadContext, LoadError, ModelSet,
    Pending, Prefer, SelectError, ServedModel, Shadow, classify_on, load_models,
};
pub use runtime::{
    BackendChoice, ClassMaps, CudaError, Device, ModelOutput, Provider, RunError, RuntimeError,
    SessionOptions, SharedPool, create_session, create_session_via, environment, environment_with,
    resolve_library, run_outputs, run_probabilities,
};
