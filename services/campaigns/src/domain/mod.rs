//! The campaigns domain: pure code, no I/O.
//!
//! - [`model`]: what a flow or broadcast says
//! - [`parse`]: YAML documents → model, with every problem's path, line and column
//! - [`matcher`]: `where:` conditions on event properties and profile attributes
//! - [`journey`]: the journey state machine (what a due journey does next)
//! - [`guard`]: frequency caps and quiet hours
//! - [`besttime`]: the hour a customer is most likely to act
//! - [`schedule`]: cron expressions and local-time waves
//! - [`experiment`]: deterministic assignment to variants and the control group
//! - [`report`]: attribution, rates and uplift with its confidence interval

pub mod besttime;
pub mod experiment;
pub mod guard;
pub mod journey;
pub mod matcher;
pub mod model;
pub mod parse;
pub mod report;
pub mod schedule;
