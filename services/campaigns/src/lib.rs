//! The campaigns service: durable flows, broadcasts, frequency caps, quiet hours,
//! experiments and reports.
#![forbid(unsafe_code)]

pub mod domain;
