//! cxr: pediatric chest X-ray pneumonia classification.
//!
//! The library does the work; `cxr-serve` and `cxr-train` parse flags and call it.
//! Modules follow a request's path: [`imaging`] turns bytes into tensors,
//! [`inference`] runs them through ONNX Runtime, [`registry`] holds the model cards,
//! [`onnx`] writes the model files, [`arch`] describes the network, [`eval`] measures.

pub mod audit;
pub mod clock;
pub mod config;
pub mod defaults;
pub mod digest;
pub mod eval;
pub mod http;
pub mod imaging;
pub mod inference;
pub mod model;
pub mod ood_score;
pub mod registry;

pub use http::{AppState, Limits, build_admin_app, build_app};
#[cfg(feature = "train")]
pub mod train;
