//! The delivery service's pure logic: templates, tracking links, HTML rewriting, channel
//! choice and consent rules, address masking. No I/O here.

pub mod html;
pub mod links;
pub mod template;
