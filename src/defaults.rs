//! The flags' defaults that more than one module reads (the server's limits, the
//! trainer's decode limit): one place, so that they cannot drift apart. A leaf: it
//! imports nothing of the crate.

/// `--max-body-bytes`.
pub const MAX_BODY_BYTES: usize = 32 << 20;
/// `--max-pixels` (also what `cxr-train` decodes at most per image).
pub const MAX_PIXELS: u64 = 40_000_000;
/// `--max-images-per-request`.
pub const MAX_IMAGES: usize = 16;
/// `--max-inflight`.
pub const MAX_INFLIGHT: usize = 256;
/// `--body-timeout-s`.
pub const BODY_TIMEOUT_S: u64 = 30;
/// `--max-buffered-bytes`.
pub const MAX_BUFFERED_BYTES: usize = 1 << 30;
/// `--max-decode-pixels`.
pub const MAX_DECODE_PIXELS: u64 = 160_000_000;
/// `--min-image-side`.
pub const MIN_IMAGE_SIDE: u32 = 64;
/// `--max-aspect-ratio`.
pub const MAX_ASPECT_RATIO: f64 = 4.0;
/// `--request-timeout-s`.
pub const REQUEST_TIMEOUT_S: f64 = 60.0;
/// `--idle-timeout-s`.
pub const IDLE_TIMEOUT_S: u64 = 75;
/// `--shutdown-timeout-s`: the body and request timeouts, plus 10 s.
pub const SHUTDOWN_TIMEOUT_S: u64 = 100;
/// `--dicom-max-attempts`: refusals by a destination before a result object is a
/// dead letter.
pub const DICOM_MAX_ATTEMPTS: u32 = 5;
/// `--dicom-give-up-after-hours`: how long a result object that keeps failing
/// without a refusal (destination unreachable) is tried.
pub const DICOM_GIVE_UP_AFTER_HOURS: u64 = 72;
/// `--retention-days`: how long the records of sent results, the dead letters, the
/// answers and the confirmed labels are kept.
pub const RETENTION_DAYS: u64 = 90;
/// `--urgent-at`'s default operating point: a positive result at or above the card's
/// threshold for this validation sensitivity is flagged urgent.
pub const URGENT_SENSITIVITY: f64 = 0.95;
/// `--outbox`: the SQLite outbox's file.
pub const OUTBOX: &str = "cxr-outbox.sqlite";
