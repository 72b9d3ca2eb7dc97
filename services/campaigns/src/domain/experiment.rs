//! Deterministic assignment: the same customer always lands in the same variant or control
//! group of the same campaign, on every replica and every retry.

use super::model::Variant;

/// A number in `0..10_000` from a SHA-256 of the customer, the campaign and the experiment.
pub fn bucket(customer: &str, campaign: &str, experiment: &str) -> u32 {
    let _ = (customer, campaign, experiment);
    unimplemented!()
}

/// True when the customer is held out of the campaign (`percent` of customers, 0–50).
pub fn in_control(customer: &str, campaign: &str, percent: f64) -> bool {
    let _ = (customer, campaign, percent);
    unimplemented!()
}

/// The customer's variant of a step (`step` is the step's id, or `""` for a broadcast),
/// drawn by weight; `None` when there are no variants.
pub fn pick_variant<'a>(
    variants: &'a [Variant],
    customer: &str,
    campaign: &str,
    step: &str,
) -> Option<&'a Variant> {
    let _ = (variants, customer, campaign, step);
    unimplemented!()
}

/// A random split's answer for one journey at one step: true for `percent` of journeys.
pub fn random_branch(journey_id: &str, step: &str, percent: f64) -> bool {
    let _ = (journey_id, step, percent);
    unimplemented!()
}
