//! cxr: pediatric chest X-ray pneumonia classification.
//!
//! The library does the work; `cxr-serve` and `cxr-train` parse flags and call it.
//! Modules follow a request's path: a door ([`http`], [`grpc`] with [`oip`],
//! [`dicom_node`], [`job`]) translates its wire format into the core's types;
//! [`predict`] answers (validation, decoding through [`imaging`], the model through
//! [`inference`], the OOD score, the audit trail); [`delivery`] sends results on to
//! the PACS, the RIS and the EHR. [`registry`] holds the model cards, [`model`]
//! writes and reads the model files, [`eval`] measures. ARCHITECTURE.md draws the
//! layers, and `tests/architecture.rs` keeps the imports to them.

/// An error that is its message: a newtype over `String` with `Display`, `Error` and
/// `From<String>`, for the areas whose failures are described, not matched on.
#[macro_export]
#[doc(hidden)]
macro_rules! message_error {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
        #[error("{0}")]
        pub struct $name(pub String);

        impl From<String> for $name {
            fn from(message: String) -> Self {
                Self(message)
            }
        }
    };
}

pub mod access;
pub mod audit;
pub mod clock;
pub mod config;
pub mod conn;
pub mod defaults;
pub mod delivery;
pub mod dicom_node;
pub mod digest;
pub mod error_type;
pub mod eval;
pub mod grpc;
pub mod http;
pub mod imaging;
pub mod inference;
pub mod job;
pub mod metrics;
pub mod model;
pub mod oip;
pub mod ood_score;
pub mod outcomes;
pub mod predict;
pub mod registry;
pub mod repository;
pub mod signing;
pub mod sqlite_file;
pub mod store;
pub mod trace;
pub mod validate;

pub use http::{AppState, build_admin_app, build_app};
pub use predict::{Core, Limits};
#[cfg(feature = "train")]
pub mod train;
