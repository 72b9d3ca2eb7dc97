//! The flow YAML parser: any text through `parse_flow` and `parse_broadcast` (ApplyFlow,
//! ScheduleBroadcast and `relance flow apply`). Bad input must come back as problems naming
//! a field or a position, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use relance_campaigns::domain::parse;
use relance_kit::yaml::{self, Problem};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match parse::parse_flow(text) {
        Ok(flow) => assert!(parse::check_name(&flow.name).is_ok(), "{:?}", flow.name),
        Err(problems) => explained(&problems),
    }
    match parse::parse_broadcast(text) {
        Ok(broadcast) => {
            assert!(
                parse::check_name(&broadcast.name).is_ok(),
                "{:?}",
                broadcast.name
            );
            // A parsed broadcast passes the checks a structured spec goes through.
            let problems = parse::check_broadcast(&broadcast, "spec.");
            assert!(problems.is_empty(), "{}", yaml::describe(&problems));
        }
        Err(problems) => explained(&problems),
    }
});

fn explained(problems: &[Problem]) {
    assert!(!problems.is_empty(), "a refusal says why");
    for problem in problems {
        assert!(!problem.reason.is_empty());
    }
    let _ = yaml::describe(problems);
}
