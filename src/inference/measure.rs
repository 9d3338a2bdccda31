//! Measuring a model file: a CPU session run synchronously, batch by batch. The
//! trainer's export, `quantize`, `fit-ood`, `test-scores` and the registry's rewrite
//! check measure through this, with the same output reading as the serving workers
//! (it is a [`Backend`]), so that no `ort` type leaves `inference`. It has no queue:
//! a measurement is one caller with its own batches, nothing to batch against.

use std::path::Path;

use image::GrayImage;
use ort::session::Session;

use super::backend::Backend;
use super::runtime::{
    Device, ModelOutput, RunError, RuntimeError, SessionOptions, create_session, environment,
    ort_error, run_batch, run_outputs,
};
use crate::imaging::Preprocessor;

/// Images per batch when measuring a whole split.
pub const MEASURE_BATCH: usize = 8;

/// A model file on a CPU session with ONNX Runtime's default threads, no memory arena
/// and spinning threads: the settings every card's figures were measured with.
pub struct CpuModel {
    session: Session,
}

impl CpuModel {
    /// Loads `onnx` (the file's bytes) with the ONNX Runtime library at `library`.
    pub fn load(library: &Path, onnx: &[u8]) -> Result<Self, RuntimeError> {
        let env = environment(library)?;
        let opts = SessionOptions {
            device: Device::Cpu,
            intra_threads: 0,
            cpu_arena: false,
            intra_spinning: true,
        };
        let (session, _, _) = create_session(env, onnx, opts)?;
        Ok(Self { session })
    }

    /// Each row's outputs for `n` inputs of `[3, s, s]` concatenated in `batch`.
    pub fn run(
        &mut self,
        batch: Vec<f32>,
        n: usize,
        s: usize,
    ) -> Result<Vec<ModelOutput>, RunError> {
        run_outputs(&mut self.session, batch, n, s)
    }

    /// Every image's outputs (images already resized to `pre`'s size; batches of
    /// [`MEASURE_BATCH`]).
    pub fn run_images(
        &mut self,
        pre: &Preprocessor,
        imgs: &[GrayImage],
    ) -> Result<Vec<ModelOutput>, RunError> {
        let s = pre.size() as usize;
        let mut out = Vec::with_capacity(imgs.len());
        for chunk in imgs.chunks(MEASURE_BATCH) {
            let batch: Vec<f32> = chunk.iter().flat_map(|g| pre.normalize(g)).collect();
            out.extend(self.run(batch, chunk.len(), s)?);
        }
        Ok(out)
    }

    /// Every float output of the graph by name, flattened, for `n` inputs: what a
    /// calibration graph (intermediate tensors exposed as outputs) is read with.
    pub fn run_named(
        &mut self,
        batch: Vec<f32>,
        n: usize,
        s: usize,
    ) -> Result<Vec<(String, Vec<f32>)>, RunError> {
        let outputs = run_batch(&mut self.session, batch, n, s)?;
        let mut named = Vec::with_capacity(outputs.len());
        for (name, value) in outputs.iter() {
            let (_, data) = value.try_extract_tensor::<f32>().map_err(ort_error)?;
            named.push((name.to_string(), data.to_vec()));
        }
        Ok(named)
    }
}

impl Backend for CpuModel {
    fn run(&mut self, batch: Vec<f32>, n: usize, s: usize) -> Result<Vec<ModelOutput>, RunError> {
        CpuModel::run(self, batch, n, s)
    }
}
