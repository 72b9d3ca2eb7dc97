//! Training: popularity, trending, bought-together and the personal item-item model, from a
//! [`Dataset`]. Pure CPU work (callers run it on a blocking thread); `threads` bounds the
//! parallelism.
//!
//! The personal model is EASE (Steck, 2019) made sparse: EASE's column j is exactly the
//! ridge regression of item j's column of the person×item matrix on every other column,
//! `w_j = (G₋ⱼ₋ⱼ + λI)⁻¹ G₋ⱼⱼ` with `G = XᵀX`. Restricting the regressors to j's `k` most
//! co-occurring items turns one n×n inverse (n³, n² memory: 80 GB at 100k items) into n
//! small k×k solves (n·k³, n·k² memory per block). With `k ≥ n − 1` it is EASE.

use std::collections::HashMap;

use super::dataset::{Csr, Dataset, Kind};
use super::linalg::{cholesky_in_place, cholesky_solve};

const DAY: f64 = 86_400.0;

/// Hyper-parameters of the personal model.
#[derive(Debug, Clone, PartialEq)]
pub struct PersonalOptions {
    /// Ridge penalty (EASE's λ).
    pub lambda: f64,
    /// Regressors per item (the neighbourhood size k).
    pub neighbours: usize,
    /// Weights kept per source item, the strongest: serving adds a source's whole row per
    /// history item, and a popular item sits in thousands of neighbourhoods.
    pub max_out: usize,
}

impl Default for PersonalOptions {
    fn default() -> PersonalOptions {
        PersonalOptions {
            lambda: 200.0,
            neighbours: 100,
            max_out: 200,
        }
    }
}

/// Hyper-parameters of every model.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainOptions {
    /// Unix seconds: interactions at or after it are ignored.
    pub cutoff: i64,
    /// Days before the cutoff that are used at all.
    pub lookback_days: f64,
    /// Half-life of trending counts, in days.
    pub trending_half_life_days: f64,
    /// Days of history trending looks at.
    pub trending_window_days: f64,
    pub personal: PersonalOptions,
    /// A pair must share at least this many baskets to be "bought together".
    pub together_min_baskets: u32,
    /// Bought-together items kept per item.
    pub together_per_item: usize,
    /// Threads for the CPU-heavy parts.
    pub threads: usize,
    /// Memory the personal model's neighbourhood matrices may take at once.
    pub memory_budget_bytes: usize,
}

impl Default for TrainOptions {
    fn default() -> TrainOptions {
        TrainOptions {
            cutoff: i64::MAX,
            lookback_days: 365.0,
            trending_half_life_days: 7.0,
            trending_window_days: 30.0,
            personal: PersonalOptions::default(),
            together_min_baskets: 2,
            together_per_item: 50,
            threads: 2,
            memory_budget_bytes: 2 << 30,
        }
    }
}

/// The trained models, indexed like `items`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Trained {
    pub items: Vec<String>,
    /// Distinct buyers over the look-back window.
    pub popularity: Vec<f32>,
    /// Decayed weighted interactions over the trending window.
    pub trending: Vec<f32>,
    /// Share of an item's buyers who bought it again in another order (shrunk towards 0).
    pub repeat_rate: Vec<f32>,
    /// Item → items often in the same basket, scored by log-likelihood ratio, best first.
    pub together: Csr,
    /// Item a → (item j, weight of a in j's regression): a person's score for j is the sum
    /// of the weights of their items.
    pub personal: Csr,
    pub people: u64,
    pub interactions: u64,
    /// The newest interaction used.
    pub data_until: i64,
}

/// Trains every model.
pub fn train(data: &Dataset, options: &TrainOptions) -> Trained {
    let from = if options.cutoff == i64::MAX {
        i64::MIN
    } else {
        options.cutoff - (options.lookback_days * DAY) as i64
    };
    let used: Vec<usize> = (0..data.interactions.len())
        .filter(|&i| {
            let at = data.interactions[i].at;
            at < options.cutoff && at >= from
        })
        .collect();
    let n_items = data.items.len();
    let mut data_until = i64::MIN;
    for &i in &used {
        data_until = data_until.max(data.interactions[i].at);
    }
    if used.is_empty() {
        data_until = 0;
    }
    let now = if options.cutoff == i64::MAX {
        data_until
    } else {
        options.cutoff
    };

    let popularity = popularity(data, &used, n_items, from);
    let trending = trending(data, &used, n_items, now, options);
    let repeat_rate = repeat_rate(data, &used, n_items);
    let together = bought_together(data, &used, n_items, options);
    let matrix = PersonItem::build(data, &used);
    let personal = personal_model(&matrix, n_items, &options.personal, options);
    let mut people = vec![false; data.people.len()];
    for &i in &used {
        people[data.interactions[i].person as usize] = true;
    }
    Trained {
        items: data.items.names.clone(),
        popularity,
        trending,
        repeat_rate,
        together,
        personal,
        people: people.iter().filter(|p| **p).count() as u64,
        interactions: used.len() as u64,
        data_until,
    }
}

fn popularity(data: &Dataset, used: &[usize], n_items: usize, from: i64) -> Vec<f32> {
    let mut buyers: Vec<(u32, u32)> = Vec::new();
    for &i in used {
        let interaction = &data.interactions[i];
        if interaction.kind == Kind::Purchase && interaction.at >= from {
            buyers.push((interaction.item, interaction.person));
        }
    }
    buyers.sort_unstable();
    buyers.dedup();
    let mut counts = vec![0.0f32; n_items];
    for (item, _) in buyers {
        counts[item as usize] += 1.0;
    }
    counts
}

/// Distinct buyers per item over the `days` before `now`.
pub fn recent_buyers(data: &Dataset, now: i64, days: f64) -> Vec<f32> {
    let from = now - (days * DAY) as i64;
    let used: Vec<usize> = (0..data.interactions.len())
        .filter(|&i| data.interactions[i].at < now)
        .collect();
    popularity(data, &used, data.items.len(), from)
}

fn trending(
    data: &Dataset,
    used: &[usize],
    n_items: usize,
    now: i64,
    options: &TrainOptions,
) -> Vec<f32> {
    let window = options.trending_window_days * DAY;
    let half_life = options.trending_half_life_days.max(0.01) * DAY;
    let mut scores = vec![0.0f32; n_items];
    for &i in used {
        let interaction = &data.interactions[i];
        let age = (now - interaction.at) as f64;
        if !(0.0..=window).contains(&age) {
            continue;
        }
        let decay = 0.5f64.powf(age / half_life);
        scores[interaction.item as usize] += (decay * interaction.kind.weight() as f64) as f32;
    }
    scores
}

fn repeat_rate(data: &Dataset, used: &[usize], n_items: usize) -> Vec<f32> {
    let mut purchases: Vec<(u32, u32, u32)> = Vec::new();
    for &i in used {
        let interaction = &data.interactions[i];
        if interaction.kind == Kind::Purchase {
            purchases.push((interaction.item, interaction.person, interaction.basket));
        }
    }
    purchases.sort_unstable();
    purchases.dedup();
    let mut buyers = vec![0u32; n_items];
    let mut repeaters = vec![0u32; n_items];
    let mut index = 0;
    while index < purchases.len() {
        let (item, person, _) = purchases[index];
        let mut baskets = 0;
        while index < purchases.len() && purchases[index].0 == item && purchases[index].1 == person
        {
            baskets += 1;
            index += 1;
        }
        buyers[item as usize] += 1;
        if baskets > 1 {
            repeaters[item as usize] += 1;
        }
    }
    // Shrunk towards 0 so that an item bought twice by its only buyer is not "always
    // rebought".
    (0..n_items)
        .map(|item| repeaters[item] as f32 / (buyers[item] as f32 + 5.0))
        .collect()
}

/// Dunning's log-likelihood ratio of a 2×2 contingency table.
pub fn log_likelihood_ratio(k11: f64, k12: f64, k21: f64, k22: f64) -> f64 {
    fn x_log_x(x: f64) -> f64 {
        if x <= 0.0 { 0.0 } else { x * x.ln() }
    }
    fn entropy(values: &[f64]) -> f64 {
        let sum: f64 = values.iter().sum();
        x_log_x(sum) - values.iter().map(|v| x_log_x(*v)).sum::<f64>()
    }
    let row = entropy(&[k11 + k12, k21 + k22]);
    let column = entropy(&[k11 + k21, k12 + k22]);
    let matrix = entropy(&[k11, k12, k21, k22]);
    (2.0 * (row + column - matrix)).max(0.0)
}

fn bought_together(data: &Dataset, used: &[usize], n_items: usize, options: &TrainOptions) -> Csr {
    let mut pairs: Vec<(u32, u32)> = Vec::new();
    for &i in used {
        let interaction = &data.interactions[i];
        if interaction.kind == Kind::Purchase {
            pairs.push((interaction.basket, interaction.item));
        }
    }
    pairs.sort_unstable();
    pairs.dedup();
    // Baskets are renumbered densely.
    let mut basket_ids: HashMap<u32, u32> = HashMap::new();
    let mut basket_items: Vec<Vec<u32>> = Vec::new();
    for &(basket, item) in &pairs {
        let next = basket_ids.len() as u32;
        let id = *basket_ids.entry(basket).or_insert(next);
        if id as usize == basket_items.len() {
            basket_items.push(Vec::new());
        }
        basket_items[id as usize].push(item);
    }
    let baskets = basket_items.len() as f64;
    let mut item_baskets: Vec<Vec<u32>> = vec![Vec::new(); n_items];
    for (basket, items) in basket_items.iter().enumerate() {
        for &item in items {
            item_baskets[item as usize].push(basket as u32);
        }
    }
    let min = options.together_min_baskets.max(1) as f32;
    let keep = options.together_per_item;
    let rows = parallel_rows(n_items, options.threads, |range| {
        let mut counts = vec![0.0f32; n_items];
        let mut touched: Vec<u32> = Vec::new();
        let mut out = Vec::with_capacity(range.len());
        for j in range {
            for &basket in &item_baskets[j] {
                for &other in &basket_items[basket as usize] {
                    if counts[other as usize] == 0.0 {
                        touched.push(other);
                    }
                    counts[other as usize] += 1.0;
                }
            }
            let n_j = item_baskets[j].len() as f64;
            let mut row: Vec<(u32, f32)> = Vec::new();
            for &other in &touched {
                let together = counts[other as usize];
                if other as usize != j && together >= min {
                    let k11 = together as f64;
                    let n_other = item_baskets[other as usize].len() as f64;
                    // Only pairs seen together more often than chance.
                    if k11 * baskets > n_j * n_other {
                        let llr = log_likelihood_ratio(
                            k11,
                            n_j - k11,
                            n_other - k11,
                            baskets - n_j - n_other + k11,
                        );
                        row.push((other, llr as f32));
                    }
                }
                counts[other as usize] = 0.0;
            }
            touched.clear();
            top_by_value(&mut row, keep);
            out.push(row);
        }
        out
    });
    Csr::from_rows(rows)
}

/// Keeps the `keep` largest values, best first (ties by index for determinism).
fn top_by_value(row: &mut Vec<(u32, f32)>, keep: usize) {
    row.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    row.truncate(keep);
}

/// Runs `work` over `0..n` split into contiguous ranges on up to `threads` threads and
/// concatenates the results in order.
fn parallel_rows<T: Send>(
    n: usize,
    threads: usize,
    work: impl Fn(std::ops::Range<usize>) -> Vec<T> + Sync,
) -> Vec<T> {
    let threads = threads.max(1).min(n.max(1));
    let chunk = n.div_ceil(threads).max(1);
    let work = &work;
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let range = (t * chunk).min(n)..((t + 1) * chunk).min(n);
                scope.spawn(move || work(range))
            })
            .collect();
        let mut out = Vec::with_capacity(n);
        for handle in handles {
            match handle.join() {
                Ok(part) => out.extend(part),
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
        out
    })
}

/// The person×item matrix X (each cell the strongest kind's weight) in both orientations.
pub struct PersonItem {
    /// person → (item, weight)
    pub by_person: Csr,
    /// item → (person, weight)
    pub by_item: Csr,
}

impl PersonItem {
    pub fn build(data: &Dataset, used: &[usize]) -> PersonItem {
        let mut cells: HashMap<(u32, u32), f32> = HashMap::with_capacity(used.len());
        for &i in used {
            let interaction = &data.interactions[i];
            let cell = cells
                .entry((interaction.person, interaction.item))
                .or_insert(0.0);
            *cell = cell.max(interaction.kind.weight());
        }
        let mut by_person: Vec<Vec<(u32, f32)>> = vec![Vec::new(); data.people.len()];
        let mut by_item: Vec<Vec<(u32, f32)>> = vec![Vec::new(); data.items.len()];
        for (&(person, item), &weight) in &cells {
            by_person[person as usize].push((item, weight));
            by_item[item as usize].push((person, weight));
        }
        for row in by_person.iter_mut().chain(by_item.iter_mut()) {
            row.sort_unstable_by_key(|(col, _)| *col);
        }
        PersonItem {
            by_person: Csr::from_rows(by_person),
            by_item: Csr::from_rows(by_item),
        }
    }

    /// Row `j` of G = XᵀX into `acc` (dense, must be zero), listing touched columns.
    fn gram_row(&self, j: usize, acc: &mut [f32], touched: &mut Vec<u32>) {
        let (people, weights) = self.by_item.row(j);
        for (&person, &w_j) in people.iter().zip(weights) {
            let (items, item_weights) = self.by_person.row(person as usize);
            for (&item, &w_a) in items.iter().zip(item_weights) {
                if acc[item as usize] == 0.0 {
                    touched.push(item);
                }
                acc[item as usize] += w_j * w_a;
            }
        }
    }
}

/// The dense Gram matrix XᵀX (n×n, row-major), for the exact baselines on small catalogs.
pub fn dense_gram(matrix: &PersonItem, n: usize) -> Vec<f64> {
    let mut gram = vec![0.0f64; n * n];
    let mut acc = vec![0.0f32; n];
    let mut touched = Vec::new();
    for j in 0..n {
        matrix.gram_row(j, &mut acc, &mut touched);
        for &a in &touched {
            gram[j * n + a as usize] = acc[a as usize] as f64;
            acc[a as usize] = 0.0;
        }
        touched.clear();
    }
    gram
}

/// The sparse EASE model: for each item j, a ridge regression on its `k` most co-occurring
/// items. Returns the weights by source item (a → j).
pub fn personal_model(
    matrix: &PersonItem,
    n_items: usize,
    personal: &PersonalOptions,
    options: &TrainOptions,
) -> Csr {
    let k = personal.neighbours.max(1);
    // Items by their Gram diagonal (Σ x²), to complete neighbourhoods of rare items: EASE
    // regresses on every item, co-occurring or not, and uncorrelated popular items still
    // take weight through their correlations with the others.
    let mut by_mass: Vec<(f32, u32)> = (0..n_items)
        .map(|j| {
            let (_, weights) = matrix.by_item.row(j);
            (weights.iter().map(|w| w * w).sum::<f32>(), j as u32)
        })
        .filter(|(mass, _)| *mass > 0.0)
        .collect();
    by_mass.sort_unstable_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    // 1. Each item's neighbourhood and its Gram column there.
    let neighbourhoods: Vec<(Vec<u32>, Vec<f32>)> =
        parallel_rows(n_items, options.threads, |range| {
            let mut acc = vec![0.0f32; n_items];
            let mut touched = Vec::new();
            let mut out = Vec::with_capacity(range.len());
            for j in range {
                matrix.gram_row(j, &mut acc, &mut touched);
                let mut row: Vec<(u32, f32)> = Vec::with_capacity(touched.len());
                for &a in &touched {
                    if a as usize != j {
                        row.push((a, acc[a as usize]));
                    }
                    acc[a as usize] = 0.0;
                }
                touched.clear();
                top_by_value(&mut row, k);
                if row.len() < k && !row.is_empty() {
                    let present: std::collections::HashSet<u32> =
                        row.iter().map(|(a, _)| *a).collect();
                    for &(_, a) in &by_mass {
                        if row.len() >= k {
                            break;
                        }
                        if a as usize != j && !present.contains(&a) {
                            row.push((a, 0.0));
                        }
                    }
                }
                row.sort_unstable_by_key(|(a, _)| *a);
                out.push(row.into_iter().unzip());
            }
            out
        });

    // 2. Blocks of items whose k×k neighbourhood Gram matrices fit the memory budget.
    let per_item = k * k * 4;
    let block = (options.memory_budget_bytes / per_item.max(1)).clamp(1, n_items.max(1));
    let mut columns: Vec<Vec<f32>> = Vec::with_capacity(n_items);
    let mut start = 0;
    while start < n_items {
        let end = (start + block).min(n_items);
        let solved = parallel_rows(end - start, options.threads, |range| {
            solve_block(
                matrix,
                n_items,
                &neighbourhoods,
                start + range.start..start + range.end,
                personal.lambda,
            )
        });
        columns.extend(solved);
        start = end;
    }

    // 3. Transpose to source-major for serving: score(j) = Σ_{a ∈ history} B[a][j].
    let mut by_source: Vec<Vec<(u32, f32)>> = vec![Vec::new(); n_items];
    for (j, weights) in columns.iter().enumerate() {
        for (&a, &w) in neighbourhoods[j].0.iter().zip(weights) {
            if w != 0.0 {
                by_source[a as usize].push((j as u32, w));
            }
        }
    }
    for row in &mut by_source {
        if row.len() > personal.max_out {
            row.sort_unstable_by(|a, b| b.1.abs().total_cmp(&a.1.abs()).then(a.0.cmp(&b.0)));
            row.truncate(personal.max_out);
        }
        row.sort_unstable_by_key(|(j, _)| *j);
    }
    Csr::from_rows(by_source)
}

/// Solves the regressions of items `range`, returning each one's weights (in the order of
/// its neighbourhood).
fn solve_block(
    matrix: &PersonItem,
    n_items: usize,
    neighbourhoods: &[(Vec<u32>, Vec<f32>)],
    range: std::ops::Range<usize>,
    lambda: f64,
) -> Vec<Vec<f32>> {
    // Which neighbourhood slots each needed row fills: a → [(j - start, position of a)].
    let start = range.start;
    let mut needed: HashMap<u32, Vec<(u32, u32)>> = HashMap::new();
    for j in range.clone() {
        for (position, &a) in neighbourhoods[j].0.iter().enumerate() {
            needed
                .entry(a)
                .or_default()
                .push(((j - start) as u32, position as u32));
        }
    }
    let mut grams: Vec<Vec<f32>> = range
        .clone()
        .map(|j| {
            let size = neighbourhoods[j].0.len();
            vec![0.0f32; size * size]
        })
        .collect();
    let mut acc = vec![0.0f32; n_items];
    let mut touched = Vec::new();
    let mut sources: Vec<u32> = needed.keys().copied().collect();
    sources.sort_unstable();
    for a in sources {
        matrix.gram_row(a as usize, &mut acc, &mut touched);
        for &(slot, position) in &needed[&a] {
            let neighbours = &neighbourhoods[start + slot as usize].0;
            let size = neighbours.len();
            let gram = &mut grams[slot as usize];
            let row = position as usize * size;
            for (column, &b) in neighbours.iter().enumerate() {
                gram[row + column] = acc[b as usize];
            }
        }
        for &b in &touched {
            acc[b as usize] = 0.0;
        }
        touched.clear();
    }
    let mut out = Vec::with_capacity(range.len());
    for (slot, j) in range.enumerate() {
        let (neighbours, column) = &neighbourhoods[j];
        let size = neighbours.len();
        if size == 0 {
            out.push(Vec::new());
            continue;
        }
        let mut a: Vec<f64> = grams[slot].iter().map(|v| *v as f64).collect();
        for d in 0..size {
            a[d * size + d] += lambda;
        }
        let mut rhs: Vec<f64> = column.iter().map(|v| *v as f64).collect();
        if !cholesky_in_place(&mut a, size) {
            out.push(vec![0.0; size]);
            continue;
        }
        cholesky_solve(&a, size, &mut rhs);
        out.push(rhs.iter().map(|v| *v as f32).collect());
        grams[slot] = Vec::new();
    }
    out
}

/// The models a version can hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelKind {
    Popularity,
    Trending,
    BoughtTogether,
    Personal,
}

impl ModelKind {
    pub const ALL: [ModelKind; 4] = [
        ModelKind::Popularity,
        ModelKind::Trending,
        ModelKind::BoughtTogether,
        ModelKind::Personal,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ModelKind::Popularity => "popularity",
            ModelKind::Trending => "trending",
            ModelKind::BoughtTogether => "bought_together",
            ModelKind::Personal => "personal",
        }
    }

    pub fn parse(name: &str) -> Option<ModelKind> {
        ModelKind::ALL.into_iter().find(|k| k.name() == name)
    }
}

/// Replaces the parts of `fresh` that were not retrained (`kinds` lacks them) with the
/// previous version's, matched by item id; items only the previous version knew are
/// appended.
pub fn carry_over(fresh: &mut Trained, previous: &Trained, kinds: &[ModelKind]) {
    let mut index: HashMap<String, u32> = HashMap::with_capacity(fresh.items.len());
    for (position, id) in fresh.items.iter().enumerate() {
        index.insert(id.clone(), position as u32);
    }
    let mut mapping: Vec<u32> = Vec::with_capacity(previous.items.len());
    for id in &previous.items {
        let next = fresh.items.len() as u32;
        let position = *index.entry(id.clone()).or_insert_with(|| {
            fresh.items.push(id.clone());
            next
        });
        mapping.push(position);
    }
    let n = fresh.items.len();
    for scores in [
        &mut fresh.popularity,
        &mut fresh.trending,
        &mut fresh.repeat_rate,
    ] {
        scores.resize(n, 0.0);
    }
    let remap_scores = |scores: &[f32]| {
        let mut out = vec![0.0f32; n];
        for (old, value) in scores.iter().enumerate() {
            out[mapping[old] as usize] = *value;
        }
        out
    };
    let remap_csr = |csr: &Csr| {
        let mut rows: Vec<Vec<(u32, f32)>> = vec![Vec::new(); n];
        for old in 0..csr.rows() {
            let (cols, values) = csr.row(old);
            rows[mapping[old] as usize] = cols
                .iter()
                .zip(values)
                .map(|(c, v)| (mapping[*c as usize], *v))
                .collect();
        }
        Csr::from_rows(rows)
    };
    let extend_csr = |csr: &mut Csr| {
        while csr.rows() < n {
            csr.offsets.push(csr.cols.len() as u32);
        }
    };
    extend_csr(&mut fresh.together);
    extend_csr(&mut fresh.personal);
    if !kinds.contains(&ModelKind::Popularity) {
        fresh.popularity = remap_scores(&previous.popularity);
        fresh.repeat_rate = remap_scores(&previous.repeat_rate);
    }
    if !kinds.contains(&ModelKind::Trending) {
        fresh.trending = remap_scores(&previous.trending);
    }
    if !kinds.contains(&ModelKind::BoughtTogether) {
        fresh.together = remap_csr(&previous.together);
    }
    if !kinds.contains(&ModelKind::Personal) {
        fresh.personal = remap_csr(&previous.personal);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::linalg::spd_inverse;

    /// Ten people buying from two clusters of items; item 5 belongs to no cluster.
    fn clustered() -> Dataset {
        let mut data = Dataset::default();
        for person in 0..10 {
            let basket = data.new_basket();
            let cluster: &[&str] = if person % 2 == 0 {
                &["a", "b", "c"]
            } else {
                &["x", "y", "z"]
            };
            for (i, item) in cluster.iter().enumerate() {
                if (person + i) % 4 != 0 {
                    data.add(
                        &format!("p{person}"),
                        item,
                        basket,
                        1_000 + person as i64,
                        Kind::Purchase,
                    );
                }
            }
        }
        let basket = data.new_basket();
        data.add("p0", "lonely", basket, 5_000, Kind::View);
        data
    }

    #[test]
    fn sparse_ease_with_full_neighbourhoods_is_ease() {
        let data = clustered();
        let used: Vec<usize> = (0..data.interactions.len()).collect();
        let matrix = PersonItem::build(&data, &used);
        let n = data.items.len();
        let lambda = 2.0;
        let options = TrainOptions {
            threads: 2,
            ..TrainOptions::default()
        };
        let personal = PersonalOptions {
            lambda,
            neighbours: n,
            max_out: n,
        };
        let sparse = personal_model(&matrix, n, &personal, &options);
        // Dense EASE: B = I − P / diag(P).
        let mut gram = dense_gram(&matrix, n);
        for d in 0..n {
            gram[d * n + d] += lambda;
        }
        let p = spd_inverse(gram, n, 1).expect("spd");
        for a in 0..n {
            let (targets, weights) = sparse.row(a);
            for j in 0..n {
                let dense = if a == j {
                    0.0
                } else {
                    -p[a * n + j] / p[j * n + j]
                };
                let found = targets
                    .iter()
                    .position(|t| *t as usize == j)
                    .map(|i| weights[i] as f64)
                    .unwrap_or(0.0);
                assert!(
                    (dense - found).abs() < 1e-4,
                    "B[{a}][{j}]: dense {dense}, sparse {found}"
                );
            }
        }
    }

    #[test]
    fn learns_clusters_and_baskets() {
        let data = clustered();
        let trained = train(&data, &TrainOptions::default());
        let index = |name: &str| data.items.get(name).expect("item") as usize;
        // Personal: a → b positive, a → x (the other cluster) nothing.
        let (targets, weights) = trained.personal.row(index("a"));
        let weight_of = |j: usize| {
            targets
                .iter()
                .position(|t| *t as usize == j)
                .map(|i| weights[i])
                .unwrap_or(0.0)
        };
        assert!(weight_of(index("b")) > 0.0);
        assert!(weight_of(index("x")).abs() < 1e-6);
        // Bought together: a's only partner is b.
        let (partners, _) = trained.together.row(index("a"));
        let mut names: Vec<&str> = partners
            .iter()
            .map(|p| data.items.names[*p as usize].as_str())
            .collect();
        names.sort();
        // (a and c are never in the same basket: whoever buys a skips c.)
        assert_eq!(names, vec!["b"]);
        // Views count in trending but not as purchases in popularity.
        assert!(trained.trending[index("lonely")] > 0.0);
        assert_eq!(trained.popularity[index("lonely")], 0.0);
        assert_eq!(trained.popularity[index("a")], 2.0);
        assert_eq!(trained.people, 10);
    }

    #[test]
    fn carries_over_what_was_not_retrained() {
        let data = clustered();
        let previous = train(&data, &TrainOptions::default());
        let mut fewer = Dataset::default();
        let basket = fewer.new_basket();
        fewer.add("p", "new-item", basket, 10, Kind::Purchase);
        fewer.add("p", "a", basket, 10, Kind::Purchase);
        let mut fresh = train(&fewer, &TrainOptions::default());
        carry_over(&mut fresh, &previous, &[ModelKind::Popularity]);
        // Popularity is the fresh one; the personal model is the previous one, remapped.
        let a = fresh.items.iter().position(|i| i == "a").expect("a");
        let b = fresh.items.iter().position(|i| i == "b").expect("b");
        assert_eq!(fresh.popularity[a], 1.0);
        assert_eq!(fresh.popularity[b], 0.0);
        let (targets, _) = fresh.personal.row(a);
        assert!(targets.contains(&(b as u32)));
        assert_eq!(fresh.personal.rows(), fresh.items.len());
        assert_eq!(fresh.trending.len(), fresh.items.len());
    }

    #[test]
    fn llr_is_zero_for_independence_and_grows_with_association() {
        assert!(log_likelihood_ratio(10.0, 10.0, 10.0, 10.0) < 1e-9);
        assert!(log_likelihood_ratio(20.0, 1.0, 1.0, 100.0) > 30.0);
    }

    #[test]
    fn repeat_rate_counts_buyers_who_came_back() {
        let mut data = Dataset::default();
        for basket_number in 0..3 {
            let basket = data.new_basket();
            data.add("p", "tea", basket, basket_number, Kind::Purchase);
        }
        let basket = data.new_basket();
        data.add("q", "mug", basket, 1, Kind::Purchase);
        let trained = train(&data, &TrainOptions::default());
        let tea = data.items.get("tea").expect("tea") as usize;
        let mug = data.items.get("mug").expect("mug") as usize;
        assert!(trained.repeat_rate[tea] > 0.0);
        assert_eq!(trained.repeat_rate[mug], 0.0);
    }
}
