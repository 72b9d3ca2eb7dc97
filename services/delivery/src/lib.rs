//! The delivery service: renders and sends every message, on every channel, exactly once.
#![forbid(unsafe_code)]

pub mod channels;
pub mod domain;
#[cfg(feature = "testing")]
pub mod fake;
