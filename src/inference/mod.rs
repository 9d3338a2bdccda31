//! Inference: the ONNX Runtime environment, sessions on CPU or CUDA, and (in the
//! server) the batching workers that own them.

pub mod runtime;

pub use runtime::{
    Device, Provider, RuntimeError, SessionOptions, create_session, environment, resolve_library,
    run_probabilities,
};
