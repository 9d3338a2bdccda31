//! The backend boundary: what a batching worker (and a measurement) runs its
//! batches on. Only `inference` knows that the backend is ONNX Runtime.

use std::sync::Arc;

use ort::session::Session;

use super::runtime::{ModelOutput, RunError, run_outputs};

/// What a worker runs its batches on: the boundary between the batching (queues,
/// replies, restarts) and the runtime. The server's backend is an ONNX Runtime
/// [`Session`]; tests run the worker on anything that answers.
pub trait Backend: Send + 'static {
    /// Runs `n` inputs of `[3, s, s]`, concatenated in `batch`; one output per input,
    /// in order.
    fn run(&mut self, batch: Vec<f32>, n: usize, s: usize) -> Result<Vec<ModelOutput>, RunError>;
}

impl Backend for Session {
    fn run(&mut self, batch: Vec<f32>, n: usize, s: usize) -> Result<Vec<ModelOutput>, RunError> {
        run_outputs(self, batch, n, s)
    }
}

/// Makes a fresh backend for a restarted worker.
pub type SessionFactory = Arc<dyn Fn() -> Result<Box<dyn Backend>, RestartError> + Send + Sync>;

/// Why a restarted worker got no backend.
#[derive(Debug, thiserror::Error)]
pub enum RestartError {
    /// The session could not be made.
    #[error(transparent)]
    Session(#[from] super::runtime::RuntimeError),
    /// The new session failed its warm-up run.
    #[error(transparent)]
    Warmup(#[from] RunError),
}

/// A boxed backend (what a model's chosen backend is kept as) is a backend.
impl Backend for Box<dyn Backend> {
    fn run(&mut self, batch: Vec<f32>, n: usize, s: usize) -> Result<Vec<ModelOutput>, RunError> {
        (**self).run(batch, n, s)
    }
}
