//! The segmentation service.
#![forbid(unsafe_code)]

pub mod domain;
