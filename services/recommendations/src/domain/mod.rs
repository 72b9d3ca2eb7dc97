//! The recommendations domain, pure: the training data ([`dataset`]), the models
//! ([`train`], with the dense algebra in [`linalg`]), what serving reads ([`model`]), the
//! ranking with its blend and business rules ([`serve`]) and the offline evaluation
//! ([`eval`]).

pub mod catalog;
pub mod dataset;
pub mod eval;
pub mod linalg;
pub mod model;
pub mod serve;
pub mod train;
