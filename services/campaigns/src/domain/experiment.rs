//! Deterministic assignment: the same customer always lands in the same variant or control
//! group of the same campaign, on every replica and every retry.

use sha2::{Digest, Sha256};

use super::model::Variant;

/// The number of buckets: a bucket is a hundredth of a percent.
const BUCKETS: u64 = 10_000;

/// A number in `0..10_000` from a SHA-256 of the customer, the campaign and the experiment
/// (joined by the unit separator `\x1f`): the first 8 bytes as a big-endian integer,
/// modulo 10,000.
pub fn bucket(customer: &str, campaign: &str, experiment: &str) -> u32 {
    let mut hasher = Sha256::new();
    hasher.update(customer.as_bytes());
    hasher.update([0x1f]);
    hasher.update(campaign.as_bytes());
    hasher.update([0x1f]);
    hasher.update(experiment.as_bytes());
    let digest = hasher.finalize();
    let mut value = 0u64;
    for byte in digest.iter().take(8) {
        value = (value << 8) | u64::from(*byte);
    }
    (value % BUCKETS) as u32
}

/// The number of buckets below which a draw falls in `percent` of cases (0 to 10,000).
fn threshold(percent: f64) -> u32 {
    // `as` saturates (and NaN is 0); the clamp keeps percentages over 100 at 100 %.
    ((percent * 100.0).round() as u32).min(BUCKETS as u32)
}

/// True when the customer is held out of the campaign (`percent` of customers, 0–50).
pub fn in_control(customer: &str, campaign: &str, percent: f64) -> bool {
    bucket(customer, campaign, "control") < threshold(percent)
}

/// The customer's variant of a step (`step` is the step's id, or `""` for a broadcast),
/// drawn by weight; `None` when there are no variants. When every weight is 0, the
/// variants are equally likely.
pub fn pick_variant<'a>(
    variants: &'a [Variant],
    customer: &str,
    campaign: &str,
    step: &str,
) -> Option<&'a Variant> {
    if variants.is_empty() {
        return None;
    }
    let mut total = 0u64;
    for variant in variants {
        total += u64::from(variant.weight);
    }
    let draw = u64::from(bucket(customer, campaign, &format!("variant:{step}")));
    if total == 0 {
        let index = (draw * variants.len() as u64 / BUCKETS) as usize;
        return variants.get(index);
    }
    // `draw` in 0..10_000 scaled to 0..total.
    let point = draw * total / BUCKETS;
    let mut cumulative = 0u64;
    for variant in variants {
        cumulative += u64::from(variant.weight);
        if point < cumulative {
            return Some(variant);
        }
    }
    variants.last()
}

/// A random split's answer for one journey at one step: true for `percent` of journeys.
pub fn random_branch(journey_id: &str, step: &str, percent: f64) -> bool {
    bucket(journey_id, step, "random") < threshold(percent)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn variant(name: &str, weight: u32) -> Variant {
        Variant {
            name: name.to_owned(),
            weight,
            template: format!("tpl-{name}"),
            channels: Vec::new(),
        }
    }

    fn share<F: Fn(&str) -> bool>(count: usize, test: F) -> f64 {
        let mut hits = 0usize;
        for index in 0..count {
            if test(&format!("customer-{index}")) {
                hits += 1;
            }
        }
        hits as f64 * 100.0 / count as f64
    }

    #[test]
    fn bucket_is_the_first_8_bytes_of_sha256_mod_10000() {
        // SHA-256("a\x1fb\x1fc") computed independently; its first 8 bytes as a big-endian
        // integer, mod 10,000.
        let digest = Sha256::digest(b"a\x1fb\x1fc");
        let mut value = 0u64;
        for byte in &digest[..8] {
            value = value * 256 + u64::from(*byte);
        }
        assert_eq!(u64::from(bucket("a", "b", "c")), value % 10_000);
        assert_eq!(bucket("a", "b", "c"), EXPECTED_ABC);
        // The separator keeps the parts apart.
        assert_ne!(bucket("ab", "", "c"), bucket("a", "b", "c"));
    }

    /// `bucket("a", "b", "c")`, computed apart (Python: `int.from_bytes(sha256(b"a\x1fb\x1fc")
    /// .digest()[:8], "big") % 10000`).
    const EXPECTED_ABC: u32 = 7682;

    #[test]
    fn deterministic() {
        for index in 0..100 {
            let customer = format!("customer-{index}");
            assert_eq!(
                bucket(&customer, "welcome", "control"),
                bucket(&customer, "welcome", "control")
            );
            assert!(bucket(&customer, "welcome", "control") < 10_000);
            assert_eq!(
                in_control(&customer, "welcome", 10.0),
                in_control(&customer, "welcome", 10.0)
            );
        }
        let variants = [variant("a", 1), variant("b", 1)];
        let first = pick_variant(&variants, "c-1", "welcome", "s1").map(|v| v.name.clone());
        for _ in 0..10 {
            let again = pick_variant(&variants, "c-1", "welcome", "s1").map(|v| v.name.clone());
            assert_eq!(again, first);
        }
    }

    #[test]
    fn control_share_is_the_percent() {
        let ten = share(100_000, |customer| in_control(customer, "winback", 10.0));
        assert!((ten - 10.0).abs() <= 0.5, "{ten}");
        let zero = share(10_000, |customer| in_control(customer, "winback", 0.0));
        assert_eq!(zero, 0.0);
        // A customer in a 10 % control group is in the 20 % one too (same bucket).
        for index in 0..1_000 {
            let customer = format!("customer-{index}");
            if in_control(&customer, "winback", 10.0) {
                assert!(in_control(&customer, "winback", 20.0));
            }
        }
    }

    #[test]
    fn variant_shares_follow_weights() {
        let even = [variant("a", 1), variant("b", 1)];
        let a = share(100_000, |customer| {
            pick_variant(&even, customer, "promo", "").map(|v| v.name.as_str()) == Some("a")
        });
        assert!((a - 50.0).abs() <= 1.0, "{a}");

        let uneven = [variant("a", 70), variant("b", 30)];
        let a = share(100_000, |customer| {
            pick_variant(&uneven, customer, "promo", "").map(|v| v.name.as_str()) == Some("a")
        });
        assert!((a - 70.0).abs() <= 1.0, "{a}");

        // A zero weight is never drawn.
        let never_b = [variant("a", 1), variant("b", 0)];
        let b = share(10_000, |customer| {
            pick_variant(&never_b, customer, "promo", "").map(|v| v.name.as_str()) == Some("b")
        });
        assert_eq!(b, 0.0);
    }

    #[test]
    fn no_variants_none_all_zero_weights_uniform() {
        assert_eq!(pick_variant(&[], "c", "promo", ""), None);
        let zeros = [variant("a", 0), variant("b", 0)];
        let a = share(10_000, |customer| {
            pick_variant(&zeros, customer, "promo", "").map(|v| v.name.as_str()) == Some("a")
        });
        assert!((a - 50.0).abs() <= 2.0, "{a}");
    }

    #[test]
    fn steps_draw_independently() {
        let even = [variant("a", 1), variant("b", 1)];
        let mut same = 0usize;
        let count = 100_000;
        for index in 0..count {
            let customer = format!("customer-{index}");
            let first = pick_variant(&even, &customer, "flow", "step-1").map(|v| v.name.as_str());
            let second = pick_variant(&even, &customer, "flow", "step-2").map(|v| v.name.as_str());
            if first == second {
                same += 1;
            }
        }
        // Independent 50/50 draws agree half the time (identical draws: always).
        let agree = same as f64 * 100.0 / count as f64;
        assert!((agree - 50.0).abs() <= 1.0, "{agree}");
        // The control draw is independent of the variant draw too: among the control
        // group, variant "a" is still about half.
        let mut control = 0usize;
        let mut control_a = 0usize;
        for index in 0..count {
            let customer = format!("customer-{index}");
            if in_control(&customer, "flow", 10.0) {
                control += 1;
                if pick_variant(&even, &customer, "flow", "").map(|v| v.name.as_str()) == Some("a")
                {
                    control_a += 1;
                }
            }
        }
        let a = control_a as f64 * 100.0 / control as f64;
        assert!((a - 50.0).abs() <= 3.0, "{a}");
    }

    #[test]
    fn random_branch_share_and_independence() {
        let thirty = share(100_000, |journey| random_branch(journey, "split", 30.0));
        assert!((thirty - 30.0).abs() <= 1.0, "{thirty}");
        assert!(!random_branch("j-1", "split", 0.0));
        assert!(random_branch("j-1", "split", 100.0));
        // The same journey at two steps: independent answers.
        let mut both = 0usize;
        for index in 0..100_000 {
            let journey = format!("journey-{index}");
            if random_branch(&journey, "split-1", 50.0) && random_branch(&journey, "split-2", 50.0)
            {
                both += 1;
            }
        }
        let both = both as f64 / 1_000.0;
        assert!((both - 25.0).abs() <= 1.0, "{both}");
    }
}
