//! The delivery service's pure logic: templates, tracking links, HTML rewriting, channel
//! choice and consent rules, address masking, request rules and the retry schedule. No
//! I/O here.

pub mod choose;
pub mod html;
pub mod links;
pub mod receipts;
pub mod request;
pub mod template;
