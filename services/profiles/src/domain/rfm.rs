//! RFM scores (recency, frequency, monetary), each 1 to 5 by quintile of the workspace's
//! buyers.
//!
//! Thresholds are the 20th, 40th, 60th and 80th percentiles (linear interpolation between
//! closest ranks) of: days since the last purchase, number of orders, and net revenue,
//! over every customer with at least one order. A customer scores one point per threshold
//! passed: frequency and monetary `1 + #{q : value > q}`; recency, where fewer days is
//! better, `5 - #{q : days > q}`. Ties share a score (unlike NTILE, which splits them
//! arbitrarily), so "one order" is one frequency score however many customers have it.

use serde::Serialize;

/// One customer's scores; all 0 until the workspace was first scored.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Scores {
    pub recency: i16,
    pub frequency: i16,
    pub monetary: i16,
}

impl Scores {
    /// The sum of the three scores (3-15), used to rank the best customers.
    pub fn total(&self) -> i16 {
        self.recency + self.frequency + self.monetary
    }
}

/// The quintile thresholds of one workspace.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Thresholds {
    pub recency_days: [f64; 4],
    pub frequency: [f64; 4],
    pub monetary: [f64; 4],
}

/// One buyer's measures.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Measures {
    pub days_since_last: f64,
    pub orders: f64,
    pub revenue: f64,
}

/// Thresholds for a population of buyers; `None` without buyers.
pub fn thresholds(buyers: &[Measures]) -> Option<Thresholds> {
    if buyers.is_empty() {
        return None;
    }
    let quintiles = |mut values: Vec<f64>| -> [f64; 4] {
        values.sort_by(f64::total_cmp);
        [
            percentile(&values, 0.2),
            percentile(&values, 0.4),
            percentile(&values, 0.6),
            percentile(&values, 0.8),
        ]
    };
    Some(Thresholds {
        recency_days: quintiles(buyers.iter().map(|b| b.days_since_last).collect()),
        frequency: quintiles(buyers.iter().map(|b| b.orders).collect()),
        monetary: quintiles(buyers.iter().map(|b| b.revenue).collect()),
    })
}

/// The `p` percentile of sorted `values`, interpolating linearly between closest ranks
/// (as Postgres's `percentile_cont`).
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = p * (sorted.len() - 1) as f64;
    let low = rank.floor() as usize;
    let high = rank.ceil() as usize;
    let weight = rank - low as f64;
    sorted[low] * (1.0 - weight) + sorted[high] * weight
}

/// Scores one buyer against the thresholds.
pub fn score(measures: Measures, thresholds: &Thresholds) -> Scores {
    let passed = |value: f64, qs: &[f64; 4]| qs.iter().filter(|q| value > **q).count() as i16;
    Scores {
        recency: 5 - passed(measures.days_since_last, &thresholds.recency_days),
        frequency: 1 + passed(measures.orders, &thresholds.frequency),
        monetary: 1 + passed(measures.revenue, &thresholds.monetary),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn buyer(days: f64, orders: f64, revenue: f64) -> Measures {
        Measures {
            days_since_last: days,
            orders,
            revenue,
        }
    }

    #[test]
    fn percentiles_interpolate_like_postgres() {
        let values = [1.0, 2.0, 3.0, 4.0, 5.0];
        assert_eq!(percentile(&values, 0.0), 1.0);
        assert_eq!(percentile(&values, 0.5), 3.0);
        assert!((percentile(&values, 0.2) - 1.8).abs() < 1e-9);
        assert_eq!(percentile(&[7.0], 0.8), 7.0);
    }

    #[test]
    fn the_best_buyer_scores_five_five_five_and_the_worst_one_one_one() {
        let buyers: Vec<_> = (1..=10)
            .map(|i| {
                buyer(
                    100.0 - f64::from(i) * 10.0,
                    f64::from(i),
                    f64::from(i) * 100.0,
                )
            })
            .collect();
        let t = thresholds(&buyers).expect("buyers");
        assert_eq!(
            score(buyers[9], &t),
            Scores {
                recency: 5,
                frequency: 5,
                monetary: 5
            }
        );
        assert_eq!(
            score(buyers[0], &t),
            Scores {
                recency: 1,
                frequency: 1,
                monetary: 1
            }
        );
    }

    #[test]
    fn ties_share_a_score() {
        let mut buyers: Vec<_> = (0..8).map(|_| buyer(10.0, 1.0, 50.0)).collect();
        buyers.push(buyer(10.0, 6.0, 50.0));
        buyers.push(buyer(10.0, 9.0, 50.0));
        let t = thresholds(&buyers).expect("buyers");
        let one_order: Vec<_> = buyers[..8]
            .iter()
            .map(|b| score(*b, &t).frequency)
            .collect();
        assert!(
            one_order.iter().all(|s| *s == one_order[0]),
            "{one_order:?}"
        );
        assert!(score(buyers[9], &t).frequency > one_order[0]);
    }

    #[test]
    fn no_buyers_no_thresholds() {
        assert_eq!(thresholds(&[]), None);
    }
}
