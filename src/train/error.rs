//! `TrainError`: what the trainer's own steps fail with, by kind, so that callers
//! (and `?` into `anyhow` at the top of a command) need no string shims.

/// Why a training step failed; each carries the message that says what to fix.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TrainError {
    /// The flags do not make a run.
    #[error("{0}")]
    Flags(String),
    /// The data folder is not the Kermany layout, or a class folder is empty.
    #[error("{0}")]
    Data(String),
    /// Weights that do not fit the network.
    #[error("{0}")]
    Weights(String),
    /// A run trained elsewhere whose history and weights do not belong together.
    #[error("{0}")]
    Import(String),
    /// A file could not be written (or renamed into place).
    #[error("{0}")]
    Write(String),
    /// The model could not be written as a graph (plain, calibration or INT8), or
    /// its calibration failed.
    #[error("{0}")]
    Graph(String),
    /// A plot could not be drawn or written.
    #[error("plot: {0}")]
    Plot(String),
}
