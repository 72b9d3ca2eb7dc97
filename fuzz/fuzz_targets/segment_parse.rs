//! The segment YAML parser: any text through `parse_definition` (what UpsertSegment and
//! `relance segment apply` run), then the compilation a stored segment goes through. Bad
//! input must come back as problems naming a field or a position, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use relance_kit::yaml;
use relance_segmentation::domain::{Compiled, parse};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = parse::document_name(text);
    match parse::parse_definition(text) {
        Ok(definition) => {
            let compiled = Compiled::new(definition);
            assert!(parse::valid_name(compiled.name()), "{:?}", compiled.name());
        }
        Err(problems) => {
            assert!(!problems.is_empty(), "a refusal says why");
            for problem in &problems {
                assert!(!problem.reason.is_empty());
            }
            let _ = yaml::describe(&problems);
        }
    }
});
