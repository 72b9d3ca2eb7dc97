//! Offline evaluation: a temporal hold-out. Models are trained on purchases before a cutoff
//! and asked for each customer's top items; the truth is what the customer bought in the
//! following days. Two views: `all` items, and `new` items only (the customer had not
//! bought them before; already-bought items are not recommended either).

use std::collections::{HashMap, HashSet};

use super::dataset::{Dataset, Kind};
use super::linalg::spd_inverse;
use super::model::Snapshot;
use super::serve::{self, Blend, Filter, HistoryEntry, Placement, Request, Rules, Scratch};
use super::train::{self, PersonItem, TrainOptions, Trained};

const DAY: i64 = 86_400;

/// Which items count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum View {
    All,
    New,
}

impl View {
    pub fn name(self) -> &'static str {
        match self {
            View::All => "all",
            View::New => "new items",
        }
    }
}

/// One method's figures in one view.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub method: String,
    pub view: View,
    pub customers: usize,
    pub hr_at_10: f64,
    pub recall_at_20: f64,
    pub ndcg_at_10: f64,
    /// Share of the trained catalog that appears in someone's top 10.
    pub coverage: f64,
}

/// A customer of the hold-out: what they had bought and what they bought next.
#[derive(Debug, Clone)]
pub struct TestCustomer {
    pub person: u32,
    pub history: Vec<HistoryEntry>,
    pub bought_before: HashSet<u32>,
    pub bought_after: HashSet<u32>,
}

/// The split.
#[derive(Debug, Clone)]
pub struct Holdout {
    pub cutoff: i64,
    pub customers: Vec<TestCustomer>,
}

impl Holdout {
    /// Customers with purchases on both sides of `cutoff` (within `horizon_days` after it).
    pub fn new(data: &Dataset, cutoff: i64, horizon_days: i64) -> Holdout {
        let end = cutoff + horizon_days * DAY;
        let mut before: HashMap<u32, Vec<(i64, u32)>> = HashMap::new();
        let mut after: HashMap<u32, HashSet<u32>> = HashMap::new();
        for interaction in &data.interactions {
            if interaction.kind != Kind::Purchase {
                continue;
            }
            if interaction.at < cutoff {
                before
                    .entry(interaction.person)
                    .or_default()
                    .push((interaction.at, interaction.item));
            } else if interaction.at < end {
                after
                    .entry(interaction.person)
                    .or_default()
                    .insert(interaction.item);
            }
        }
        let mut customers = Vec::new();
        for (person, bought_after) in after {
            let Some(mut past) = before.remove(&person) else {
                continue;
            };
            // Newest first, as the serving history is.
            past.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
            let bought_before: HashSet<u32> = past.iter().map(|(_, item)| *item).collect();
            let history = past
                .iter()
                .map(|(at, item)| HistoryEntry {
                    item: data.items.names[*item as usize].clone(),
                    kind: Kind::Purchase,
                    at: *at,
                })
                .collect();
            customers.push(TestCustomer {
                person,
                history,
                bought_before,
                bought_after,
            });
        }
        customers.sort_unstable_by_key(|c| c.person);
        Holdout { cutoff, customers }
    }
}

/// Ranked lists per customer (in the holdout's order): the answer when 10 items are asked
/// for, and when 20 are (a blend's shares apply to each answer, so the first 10 of 20 are
/// not the answer for 10).
#[derive(Debug, Clone, Default)]
pub struct Lists {
    pub top10: Vec<Vec<u32>>,
    pub top20: Vec<Vec<u32>>,
}

impl Lists {
    /// Lists of a ranking that does not depend on `n`.
    pub fn ranked(top20: Vec<Vec<u32>>) -> Lists {
        Lists {
            top10: top20
                .iter()
                .map(|l| l[..l.len().min(10)].to_vec())
                .collect(),
            top20,
        }
    }
}

/// Scores HR@10, Recall@20, NDCG@10 and coverage of ranked lists.
pub fn score(
    method: &str,
    view: View,
    holdout: &Holdout,
    lists: &Lists,
    catalog_size: usize,
) -> Row {
    let mut customers = 0usize;
    let (mut hits, mut recall, mut ndcg) = (0.0, 0.0, 0.0);
    let mut shown: HashSet<u32> = HashSet::new();
    for (customer, (list10, list20)) in holdout
        .customers
        .iter()
        .zip(lists.top10.iter().zip(&lists.top20))
    {
        let truth: HashSet<u32> = match view {
            View::All => customer.bought_after.clone(),
            View::New => customer
                .bought_after
                .difference(&customer.bought_before)
                .copied()
                .collect(),
        };
        if truth.is_empty() {
            continue;
        }
        customers += 1;
        let top10 = &list10[..list10.len().min(10)];
        let top20 = &list20[..list20.len().min(20)];
        shown.extend(top10.iter().copied());
        if top10.iter().any(|i| truth.contains(i)) {
            hits += 1.0;
        }
        recall +=
            top20.iter().filter(|i| truth.contains(i)).count() as f64 / truth.len().min(20) as f64;
        let mut dcg = 0.0;
        for (rank, item) in top10.iter().enumerate() {
            if truth.contains(item) {
                dcg += 1.0 / ((rank + 2) as f64).log2();
            }
        }
        let ideal: f64 = (0..truth.len().min(10))
            .map(|rank| 1.0 / ((rank + 2) as f64).log2())
            .sum();
        ndcg += dcg / ideal;
    }
    let divide = |value: f64| {
        if customers == 0 {
            0.0
        } else {
            value / customers as f64
        }
    };
    Row {
        method: method.to_owned(),
        view,
        customers,
        hr_at_10: divide(hits),
        recall_at_20: divide(recall),
        ndcg_at_10: divide(ndcg),
        coverage: if catalog_size == 0 {
            0.0
        } else {
            shown.len() as f64 / catalog_size as f64
        },
    }
}

/// Top `n` of dense scores, skipping `skip`.
fn top_n(scores: &[f64], n: usize, skip: &HashSet<u32>) -> Vec<u32> {
    let mut order: Vec<u32> = (0..scores.len() as u32)
        .filter(|i| !skip.contains(i) && scores[*i as usize] > f64::MIN)
        .collect();
    let cmp = |a: &u32, b: &u32| {
        scores[*b as usize]
            .total_cmp(&scores[*a as usize])
            .then(a.cmp(b))
    };
    if order.len() > n {
        order.select_nth_unstable_by(n, cmp);
        order.truncate(n);
    }
    order.sort_unstable_by(cmp);
    order
}

/// Everything a baseline needs from the training side.
pub struct TrainingSide {
    pub matrix: PersonItem,
    pub n_items: usize,
}

impl TrainingSide {
    pub fn new(data: &Dataset, cutoff: i64) -> TrainingSide {
        let used: Vec<usize> = (0..data.interactions.len())
            .filter(|&i| {
                let interaction = &data.interactions[i];
                interaction.at < cutoff && interaction.kind == Kind::Purchase
            })
            .collect();
        TrainingSide {
            matrix: PersonItem::build(data, &used),
            n_items: data.items.len(),
        }
    }

    /// Items with at least one training purchase: the catalog coverage is measured on.
    pub fn trained_items(&self) -> usize {
        (0..self.n_items)
            .filter(|&i| !self.matrix.by_item.row(i).0.is_empty())
            .count()
    }
}

fn skip_for(view: View, customer: &TestCustomer) -> HashSet<u32> {
    match view {
        View::All => HashSet::new(),
        View::New => customer.bought_before.clone(),
    }
}

/// Popularity: distinct buyers over the `days` before the cutoff.
pub fn popularity_lists(data: &Dataset, holdout: &Holdout, days: f64, view: View) -> Lists {
    let counts: Vec<f64> = train::recent_buyers(data, holdout.cutoff, days)
        .iter()
        .map(|c| *c as f64)
        .collect();
    Lists::ranked(
        holdout
            .customers
            .iter()
            .map(|c| top_n(&counts, 20, &skip_for(view, c)))
            .collect(),
    )
}

/// A dense item×item matrix `b` scored as `Σ_{a ∈ history} b[a][·]`.
fn dense_lists(b: &[f64], n: usize, holdout: &Holdout, view: View) -> Lists {
    let mut scores = vec![0.0f64; n];
    let lists = holdout
        .customers
        .iter()
        .map(|customer| {
            scores.fill(0.0);
            for &a in &customer.bought_before {
                let row = &b[a as usize * n..(a as usize + 1) * n];
                for (score, weight) in scores.iter_mut().zip(row) {
                    *score += weight;
                }
            }
            top_n(&scores, 20, &skip_for(view, customer))
        })
        .collect();
    Lists::ranked(lists)
}

/// Item-kNN: cosine similarity of the items' buyer vectors (self-similarity 0).
pub fn cosine_matrix(side: &TrainingSide) -> Vec<f64> {
    let n = side.n_items;
    let mut gram = train::dense_gram(&side.matrix, n);
    let norms: Vec<f64> = (0..n).map(|i| gram[i * n + i].sqrt()).collect();
    for a in 0..n {
        for b in 0..n {
            let denominator = norms[a] * norms[b];
            gram[a * n + b] = if a == b || denominator == 0.0 {
                0.0
            } else {
                gram[a * n + b] / denominator
            };
        }
    }
    gram
}

/// Dense EASE: `B = I − P · diag(1/diag(P))`, `P = (G + λI)⁻¹`, with B's diagonal 0.
pub fn ease_matrix(side: &TrainingSide, lambda: f64, threads: usize) -> Option<Vec<f64>> {
    let n = side.n_items;
    let mut gram = train::dense_gram(&side.matrix, n);
    for d in 0..n {
        gram[d * n + d] += lambda;
    }
    let p = spd_inverse(gram, n, threads)?;
    let mut b = vec![0.0f64; n * n];
    for a in 0..n {
        for j in 0..n {
            if a != j {
                b[a * n + j] = -p[a * n + j] / p[j * n + j];
            }
        }
    }
    Some(b)
}

pub fn matrix_lists(b: &[f64], n: usize, holdout: &Holdout, view: View) -> Lists {
    dense_lists(b, n, holdout, view)
}

/// The served path: [`serve::recommend`] on a snapshot of `trained` (no catalog), with the
/// customer's purchases as history, for the home placement's blend.
pub fn served_lists(
    trained: &Trained,
    holdout: &Holdout,
    view: View,
    rules: &Rules,
    blend: &Blend,
) -> Lists {
    let snapshot = Snapshot::new(1, Some(std::sync::Arc::new(trained.clone())), Vec::new());
    let mut scratch = Scratch::default();
    let mut lists = Lists::default();
    for customer in &holdout.customers {
        let exclude: Vec<String> = match view {
            View::All => Vec::new(),
            View::New => customer.history.iter().map(|h| h.item.clone()).collect(),
        };
        let filter = Filter {
            exclude,
            max_per_category: usize::MAX,
            ..Filter::default()
        };
        for n in [10, 20] {
            let request = Request {
                placement: Placement::Home,
                history: &customer.history,
                context: &[],
                n,
                filter: &filter,
                seed: customer.person as u64,
                now: holdout.cutoff,
            };
            let picks = serve::recommend(&snapshot, &request, rules, blend, &mut scratch);
            // Snapshot indices are the training items' indices (no catalog was joined).
            let list = picks.into_iter().map(|p| p.item).collect();
            if n == 10 {
                lists.top10.push(list);
            } else {
                lists.top20.push(list);
            }
        }
    }
    lists
}

/// Training options for a back-test at `cutoff`.
pub fn options_at(cutoff: i64, base: &TrainOptions) -> TrainOptions {
    TrainOptions {
        cutoff,
        ..base.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_on_a_known_list() {
        let mut data = Dataset::default();
        let b = data.new_basket();
        data.add("c", "old", b, 10, Kind::Purchase);
        let b = data.new_basket();
        data.add("c", "x", b, 200, Kind::Purchase);
        data.add("c", "old", b, 200, Kind::Purchase);
        let holdout = Holdout::new(&data, 100, 30);
        assert_eq!(holdout.customers.len(), 1);
        let old = data.items.get("old").expect("old");
        let x = data.items.get("x").expect("x");
        // `x` second: NDCG = (1/log2 3) / (1 + 1/log2 3) in `all` (two relevant items, one
        // found at rank 2); in `new`, only x is relevant: 1/log2 3.
        let lists = Lists::ranked(vec![vec![99, x]]);
        let all = score("m", View::All, &holdout, &lists, 2);
        assert_eq!(all.hr_at_10, 1.0);
        let expected = (1.0 / 3f64.log2()) / (1.0 + 1.0 / 3f64.log2());
        assert!((all.ndcg_at_10 - expected).abs() < 1e-12);
        assert!((all.recall_at_20 - 0.5).abs() < 1e-12);
        let new = score("m", View::New, &holdout, &lists, 2);
        assert!((new.ndcg_at_10 - 1.0 / 3f64.log2()).abs() < 1e-12);
        let miss = score("m", View::All, &holdout, &Lists::ranked(vec![vec![]]), 2);
        assert_eq!(miss.hr_at_10, 0.0);
        assert!(holdout.customers[0].bought_before.contains(&old));
    }
}
