//! The model definition, in one room: the network's architecture and weights
//! ([`arch`]), its ONNX files (our writer and reader, [`onnx`]), and its INT8 form
//! ([`int8`]: the QDQ graph from calibration ranges). Below the runtime: nothing here
//! runs a model (calibration takes the runner as an argument).

pub mod arch;
pub mod int8;
pub mod onnx;
