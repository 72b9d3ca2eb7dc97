//! Serving: from a snapshot, a customer's recent history and the items in view, the best
//! `n` items for a placement — predicted (personal and bought-together), trending and
//! exploration blended in configurable shares, then the business rules. Pure and
//! deterministic for a given seed; never fails for want of data (fallback chain: trending,
//! popular, newest).

use std::collections::HashMap;

use rand::rngs::SmallRng;
use rand::{Rng as _, SeedableRng as _};

use super::dataset::Kind;
use super::model::{self, Snapshot};

const DAY: f64 = 86_400.0;

/// Where the items will be shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Placement {
    Home,
    Product,
    Cart,
    Checkout,
    Category,
    Email,
    Push,
    InApp,
    WhatsApp,
}

impl Placement {
    pub const ALL: [Placement; 9] = [
        Placement::Home,
        Placement::Product,
        Placement::Cart,
        Placement::Checkout,
        Placement::Category,
        Placement::Email,
        Placement::Push,
        Placement::InApp,
        Placement::WhatsApp,
    ];

    /// The name used in configuration and logs.
    pub fn name(self) -> &'static str {
        match self {
            Placement::Home => "home",
            Placement::Product => "product",
            Placement::Cart => "cart",
            Placement::Checkout => "checkout",
            Placement::Category => "category",
            Placement::Email => "email",
            Placement::Push => "push",
            Placement::InApp => "in_app",
            Placement::WhatsApp => "whatsapp",
        }
    }

    /// Whether the items in view drive the answer (bought together with them).
    fn context_driven(self) -> bool {
        matches!(
            self,
            Placement::Product | Placement::Cart | Placement::Checkout
        )
    }
}

/// Why an item was chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    BoughtTogether,
    Personal,
    Trending,
    Explore,
    Fallback,
    Similar,
}

impl Reason {
    pub fn name(self) -> &'static str {
        match self {
            Reason::BoughtTogether => "bought_together",
            Reason::Personal => "personal",
            Reason::Trending => "trending",
            Reason::Explore => "explore",
            Reason::Fallback => "fallback",
            Reason::Similar => "similar",
        }
    }
}

/// Shares of an answer by source; they need not add up to 1 (they are normalised).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Blend {
    pub predicted: f64,
    pub trending: f64,
    pub explore: f64,
}

impl Blend {
    /// The 70/20/10 mix the personalisation guides recommend.
    pub const DEFAULT: Blend = Blend {
        predicted: 0.7,
        trending: 0.2,
        explore: 0.1,
    };

    pub fn validate(&self) -> Result<(), String> {
        let shares = [self.predicted, self.trending, self.explore];
        if shares.iter().any(|s| !s.is_finite() || *s < 0.0) {
            return Err("shares must be numbers ≥ 0".into());
        }
        if shares.iter().sum::<f64>() <= 0.0 {
            return Err("at least one share must be above 0".into());
        }
        Ok(())
    }
}

/// How history is read and which business rules apply; from configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Rules {
    /// Drop out-of-stock items even when the request does not ask for it.
    pub drop_out_of_stock: bool,
    /// An item bought again by at least this share of its buyers counts as replenishable
    /// (learned), as if the catalog said so.
    pub learned_replenishable_rate: f32,
    /// Most recent history entries used.
    pub history_limit: usize,
    /// Half-life of a history entry's weight, in days; old entries keep `history_floor`.
    pub history_half_life_days: f64,
    pub history_floor: f64,
    /// Weight of a customer's own repeat purchases in the predicted score.
    pub repeat_weight: f64,
    /// Weight of bought-together (from the items in view) against the personal model, on
    /// context-driven placements.
    pub together_weight: f64,
    /// Exploration draws from the popular items ranked between these bounds (not the head
    /// everybody sees, not the dead tail).
    pub explore_band: (usize, usize),
    /// Default "at most k items per leaf category".
    pub max_per_category: usize,
}

impl Default for Rules {
    fn default() -> Rules {
        Rules {
            drop_out_of_stock: true,
            learned_replenishable_rate: 0.2,
            history_limit: 50,
            history_half_life_days: 60.0,
            history_floor: 0.5,
            repeat_weight: 1.0,
            together_weight: 1.0,
            explore_band: (20, 500),
            max_per_category: 2,
        }
    }
}

/// One entry of a customer's recent history.
#[derive(Debug, Clone, PartialEq)]
pub struct HistoryEntry {
    pub item: String,
    pub kind: Kind,
    /// Unix seconds.
    pub at: i64,
}

/// Restrictions from the request.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Filter {
    /// Category path prefixes; empty: any.
    pub categories: Vec<Vec<String>>,
    pub brands: Vec<String>,
    pub min_price: Option<f64>,
    pub max_price: Option<f64>,
    pub in_stock_only: bool,
    pub exclude: Vec<String>,
    /// 0: the rules' default.
    pub max_per_category: usize,
}

/// A request, validated.
#[derive(Debug, Clone)]
pub struct Request<'a> {
    pub placement: Placement,
    pub history: &'a [HistoryEntry],
    pub context: &'a [String],
    pub n: usize,
    pub filter: &'a Filter,
    pub seed: u64,
    /// Unix seconds.
    pub now: i64,
}

/// One chosen item.
#[derive(Debug, Clone, PartialEq)]
pub struct Pick {
    pub item: u32,
    /// Higher is better within one answer: the source's band plus the normalised score in
    /// it (predicted 2–3, trending 1–2, exploration and fallback 0–1).
    pub score: f64,
    pub reason: Reason,
    pub because: Option<u32>,
}

/// One item's accumulators during a request. Kept together (one cache line per item
/// touched) because the scoring loop visits items at random in arrays as long as the
/// catalog: five separate arrays cost five cache misses per visit.
#[derive(Debug, Clone, Copy)]
struct Cell {
    personal: f32,
    together: f32,
    because_personal: (f32, u32),
    because_together: (f32, u32),
    touched: bool,
}

const EMPTY_CELL: Cell = Cell {
    personal: 0.0,
    together: 0.0,
    because_personal: (0.0, u32::MAX),
    because_together: (0.0, u32::MAX),
    touched: false,
};

/// Reusable buffers sized to the snapshot, so that a request allocates little.
#[derive(Debug, Default)]
pub struct Scratch {
    cells: Vec<Cell>,
    touched: Vec<u32>,
}

impl Scratch {
    fn prepare(&mut self, n: usize) {
        if self.cells.len() != n {
            self.cells = vec![EMPTY_CELL; n];
        }
        self.touched.clear();
    }

    fn cell(&mut self, item: u32) -> &mut Cell {
        let cell = &mut self.cells[item as usize];
        if !cell.touched {
            cell.touched = true;
            self.touched.push(item);
        }
        cell
    }

    fn add_personal(&mut self, item: u32, value: f32, because: u32) {
        let cell = self.cell(item);
        cell.personal += value;
        if value > cell.because_personal.0 {
            cell.because_personal = (value, because);
        }
    }

    fn add_together(&mut self, item: u32, value: f32, because: u32) {
        let cell = self.cell(item);
        cell.together += value;
        if value > cell.because_together.0 {
            cell.because_together = (value, because);
        }
    }

    fn reset(&mut self) {
        for &item in &self.touched {
            self.cells[item as usize] = EMPTY_CELL;
        }
        self.touched.clear();
    }
}

/// The customer's history resolved against the snapshot.
struct Known {
    /// item → (weight, times bought, latest purchase)
    items: HashMap<u32, (f64, u32, i64)>,
}

fn resolve_history(snapshot: &Snapshot, request: &Request<'_>, rules: &Rules) -> Known {
    let mut items: HashMap<u32, (f64, u32, i64)> = HashMap::new();
    let half_life = rules.history_half_life_days.max(0.01) * DAY;
    for entry in request.history.iter().take(rules.history_limit) {
        let Some(&item) = snapshot.index.get(&entry.item) else {
            continue;
        };
        let age = (request.now - entry.at).max(0) as f64;
        let recency =
            rules.history_floor + (1.0 - rules.history_floor) * 0.5f64.powf(age / half_life);
        let weight = entry.kind.weight() as f64 * recency;
        let known = items.entry(item).or_insert((0.0, 0, i64::MIN));
        known.0 = known.0.max(weight);
        if entry.kind == Kind::Purchase {
            known.1 += 1;
            known.2 = known.2.max(entry.at);
        }
    }
    Known { items }
}

/// Which items the rules and the filter allow, with the per-category cap applied as items
/// are taken. Every candidate goes through it, often thousands per request: the checks read
/// packed per-item arrays and small sorted lists, and the catalog facts only when the
/// filter asks about them.
struct Gate<'a> {
    snapshot: &'a Snapshot,
    filter: &'a Filter,
    rules: &'a Rules,
    /// Sorted.
    excluded: Vec<u32>,
    /// Sorted.
    bought: Vec<u32>,
    taken: Vec<u32>,
    /// (leaf, items taken from it)
    per_category: Vec<(u32, usize)>,
    max_per_category: usize,
    max_price: Option<f64>,
    /// Whether the filter reads catalog facts beyond the packed flags.
    reads_facts: bool,
}

impl<'a> Gate<'a> {
    fn new(
        snapshot: &'a Snapshot,
        filter: &'a Filter,
        rules: &'a Rules,
        context: &[u32],
        bought: Vec<u32>,
        max_price: Option<f64>,
    ) -> Gate<'a> {
        let mut excluded: Vec<u32> = filter
            .exclude
            .iter()
            .filter_map(|id| snapshot.index.get(id).copied())
            .chain(context.iter().copied())
            .collect();
        excluded.sort_unstable();
        let mut bought = bought;
        bought.sort_unstable();
        Gate {
            snapshot,
            filter,
            rules,
            excluded,
            bought,
            taken: Vec::new(),
            per_category: Vec::new(),
            max_per_category: if filter.max_per_category > 0 {
                filter.max_per_category
            } else {
                rules.max_per_category
            },
            max_price,
            reads_facts: !filter.categories.is_empty()
                || !filter.brands.is_empty()
                || filter.min_price.is_some()
                || max_price.is_some(),
        }
    }

    fn allows(&self, item: u32) -> bool {
        let i = item as usize;
        let flags = self.snapshot.flags[i];
        let known = flags & model::KNOWN != 0;
        if flags & model::DELETED != 0 {
            return false;
        }
        if known {
            if flags & model::AVAILABLE == 0
                && (self.filter.in_stock_only || self.rules.drop_out_of_stock)
            {
                return false;
            }
        } else if self.filter.in_stock_only || self.reads_facts {
            // The filter asks about facts the catalog does not have.
            return false;
        }
        let leaf = self.snapshot.leaf[i];
        if leaf != model::NO_LEAF
            && self
                .per_category
                .iter()
                .any(|(l, count)| *l == leaf && *count >= self.max_per_category)
        {
            return false;
        }
        if self.taken.contains(&item) || self.excluded.binary_search(&item).is_ok() {
            return false;
        }
        if self.reads_facts
            && let Some(facts) = self.snapshot.facts[i].as_ref()
        {
            if !self.filter.categories.is_empty()
                && !self
                    .filter
                    .categories
                    .iter()
                    .any(|path| facts.category.starts_with(path))
            {
                return false;
            }
            if !self.filter.brands.is_empty() && !self.filter.brands.contains(&facts.brand) {
                return false;
            }
            if self.filter.min_price.is_some_and(|min| facts.price < min)
                || self.max_price.is_some_and(|max| facts.price > max)
            {
                return false;
            }
        }
        if self.bought.binary_search(&item).is_ok() {
            let replenishable = flags & model::REPLENISHABLE != 0
                || self.snapshot.repeat_rate[i] >= self.rules.learned_replenishable_rate;
            if !replenishable {
                return false;
            }
        }
        true
    }

    fn take(&mut self, item: u32) {
        self.taken.push(item);
        let leaf = self.snapshot.leaf[item as usize];
        if leaf == model::NO_LEAF {
            return;
        }
        match self.per_category.iter_mut().find(|(l, _)| *l == leaf) {
            Some((_, count)) => *count += 1,
            None => self.per_category.push((leaf, 1)),
        }
    }
}

/// Candidates a ranked source (trending, popular, newest) examines before giving up on the
/// per-category cap: in a catalog where the head is a few categories, honouring the cap
/// strictly would scan most of the catalog per request.
fn scan_limit(n: usize) -> usize {
    200 + 50 * n
}

/// How many of `n` slots each source gets: the expected counts equal the shares; the
/// fractional parts are drawn with the request's seed.
fn quotas(n: usize, blend: &Blend, rng: &mut SmallRng) -> (usize, usize, usize) {
    let total = blend.predicted + blend.trending + blend.explore;
    let mut draw = |share: f64| {
        let expected = n as f64 * share / total;
        let whole = expected.floor();
        whole as usize + usize::from(rng.random::<f64>() < expected - whole)
    };
    let explore = draw(blend.explore).min(n);
    let trending = draw(blend.trending).min(n - explore);
    (n - explore - trending, trending, explore)
}

/// The best `request.n` items.
pub fn recommend(
    snapshot: &Snapshot,
    request: &Request<'_>,
    rules: &Rules,
    blend: &Blend,
    scratch: &mut Scratch,
) -> Vec<Pick> {
    let mut rng = SmallRng::seed_from_u64(request.seed);
    let n = request.n;
    if n == 0 || snapshot.is_empty() {
        return Vec::new();
    }
    scratch.prepare(snapshot.len());
    let known = resolve_history(snapshot, request, rules);
    let context: Vec<u32> = request
        .context
        .iter()
        .filter_map(|id| snapshot.index.get(id).copied())
        .collect();

    // Predicted: the personal model over history and context, the customer's repeat
    // purchases, and items bought together with the context.
    let mut sources: Vec<(u32, f64)> = known.items.iter().map(|(i, k)| (*i, k.0)).collect();
    for &item in &context {
        sources.push((item, 1.0));
    }
    sources.sort_unstable_by_key(|(item, _)| *item);
    for &(source, weight) in &sources {
        let (targets, weights) = snapshot.personal_row(source);
        for (&target, &w) in targets.iter().zip(weights) {
            scratch.add_personal(target, w * weight as f32, source);
        }
    }
    for (&item, &(weight, times, _)) in &known.items {
        if times > 0 {
            let repeat = rules.repeat_weight
                * snapshot.repeat_rate[item as usize] as f64
                * weight
                * (times as f64).sqrt();
            scratch.add_personal(item, repeat as f32, item);
        }
    }
    let together_weight = if request.placement.context_driven() {
        rules.together_weight
    } else {
        rules.together_weight * 0.25
    };
    for &source in &context {
        let (targets, values) = snapshot.together_row(source);
        let top = values
            .first()
            .copied()
            .unwrap_or(1.0)
            .max(f32::MIN_POSITIVE);
        for (&target, &value) in targets.iter().zip(values) {
            scratch.add_together(target, (together_weight as f32) * value / top, source);
        }
    }

    let mut predicted: Vec<(f32, u32)> = Vec::with_capacity(scratch.touched.len());
    for &item in &scratch.touched {
        let cell = &scratch.cells[item as usize];
        let score = cell.personal + cell.together;
        if score > 0.0 {
            predicted.push((score, item));
        }
    }
    // Only the head is needed, unless the rules turn most of it down (then the rest is
    // sorted too, below).
    let by_score = |a: &(f32, u32), b: &(f32, u32)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
    let head = (8 * n + 64).min(predicted.len());
    if head > 0 && head < predicted.len() {
        predicted.select_nth_unstable_by(head - 1, by_score);
    }
    predicted[..head].sort_unstable_by(by_score);

    let bought: Vec<u32> = known
        .items
        .iter()
        .filter(|(_, k)| k.1 > 0)
        .map(|(i, _)| *i)
        .collect();
    let max_price = match (request.placement, request.filter.max_price) {
        // The checkout's last offer is a small add-on: at most the average price in the
        // cart.
        (Placement::Checkout, limit) => {
            let prices: Vec<f64> = context
                .iter()
                .filter_map(|i| snapshot.facts[*i as usize].as_ref().map(|f| f.price))
                .collect();
            let average =
                (!prices.is_empty()).then(|| prices.iter().sum::<f64>() / prices.len() as f64);
            match (average, limit) {
                (Some(a), Some(l)) => Some(a.min(l)),
                (a, l) => a.or(l),
            }
        }
        (_, limit) => limit,
    };
    let mut gate = Gate::new(snapshot, request.filter, rules, &context, bought, max_price);

    let (want_predicted, want_trending, want_explore) = quotas(n, blend, &mut rng);
    let mut picks: Vec<Pick> = Vec::with_capacity(n);
    let top_predicted = predicted.first().map(|p| p.0).unwrap_or(1.0);
    for index in 0..predicted.len() {
        if picks.len() >= want_predicted {
            break;
        }
        if index == head {
            predicted[head..].sort_unstable_by(by_score);
        }
        let (score, item) = predicted[index];
        if !gate.allows(item) {
            continue;
        }
        gate.take(item);
        let cell = &scratch.cells[item as usize];
        let (reason, because) = if cell.together > cell.personal {
            (Reason::BoughtTogether, cell.because_together.1)
        } else {
            (Reason::Personal, cell.because_personal.1)
        };
        picks.push(Pick {
            item,
            score: 2.0 + (score / top_predicted) as f64,
            reason,
            because: (because != u32::MAX).then_some(because),
        });
    }
    scratch.reset();

    // Trending takes its share plus whatever predicted could not fill.
    let trending_target = (want_trending + want_predicted - picks.len()).min(n - picks.len());
    let top_trending = snapshot
        .by_trending
        .first()
        .map(|i| snapshot.trending[*i as usize])
        .unwrap_or(1.0);
    let mut trending_taken = 0;
    for &item in snapshot.by_trending.iter().take(scan_limit(n)) {
        if trending_taken >= trending_target {
            break;
        }
        if gate.allows(item) {
            gate.take(item);
            trending_taken += 1;
            picks.push(Pick {
                item,
                score: 1.0 + (snapshot.trending[item as usize] / top_trending) as f64,
                reason: Reason::Trending,
                because: None,
            });
        }
    }

    // Exploration: random draws from the popular band below the head.
    let (band_start, band_end) = rules.explore_band;
    let band: &[u32] = {
        let end = band_end.min(snapshot.by_popularity.len());
        let start = band_start.min(end);
        &snapshot.by_popularity[start..end]
    };
    let mut explore_taken = 0;
    let mut attempts = 0;
    while explore_taken < want_explore && !band.is_empty() && attempts < 8 * want_explore + 16 {
        attempts += 1;
        let item = band[rng.random_range(0..band.len())];
        if gate.allows(item) {
            gate.take(item);
            explore_taken += 1;
            picks.push(Pick {
                item,
                score: 0.5,
                reason: Reason::Explore,
                because: None,
            });
        }
    }

    // Fallback chain for what is still missing: popular, then newest.
    fill_fallback(snapshot, n, &mut gate, &mut picks);
    picks
}

/// Items like `item`: bought together with it, similar to it (the personal model's
/// neighbours), or both, after the filter; popular items when the item is unknown.
pub fn similar(
    snapshot: &Snapshot,
    item: &str,
    together: bool,
    alike: bool,
    n: usize,
    filter: &Filter,
    rules: &Rules,
) -> Vec<Pick> {
    let Some(&source) = snapshot.index.get(item) else {
        return fallback_only(snapshot, n, filter, rules, &[]);
    };
    let mut scores: HashMap<u32, (f32, Reason)> = HashMap::new();
    if together {
        let (targets, values) = snapshot.together_row(source);
        let top = values
            .first()
            .copied()
            .unwrap_or(1.0)
            .max(f32::MIN_POSITIVE);
        for (&target, &value) in targets.iter().zip(values) {
            scores.insert(target, (value / top, Reason::BoughtTogether));
        }
    }
    if alike {
        let (targets, weights) = snapshot.personal_row(source);
        let top = weights.iter().copied().fold(f32::MIN_POSITIVE, f32::max);
        for (&target, &weight) in targets.iter().zip(weights) {
            if weight <= 0.0 {
                continue;
            }
            let value = weight / top;
            let entry = scores.entry(target).or_insert((0.0, Reason::Similar));
            if value > entry.0 {
                entry.1 = Reason::Similar;
            }
            entry.0 += value;
        }
    }
    let mut ranked: Vec<(f32, u32, Reason)> =
        scores.into_iter().map(|(i, (s, r))| (s, i, r)).collect();
    ranked.sort_unstable_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    let context = [source];
    let mut gate = fallback_gate(snapshot, filter, rules, &context);
    let mut picks = Vec::with_capacity(n);
    let top = ranked.first().map(|r| r.0).unwrap_or(1.0);
    for (score, item, reason) in ranked {
        if picks.len() >= n {
            break;
        }
        if gate.allows(item) {
            gate.take(item);
            picks.push(Pick {
                item,
                score: 1.0 + (score / top) as f64,
                reason,
                because: Some(source),
            });
        }
    }
    fill_fallback(snapshot, n, &mut gate, &mut picks);
    picks
}

fn fallback_gate<'a>(
    snapshot: &'a Snapshot,
    filter: &'a Filter,
    rules: &'a Rules,
    context: &[u32],
) -> Gate<'a> {
    Gate::new(
        snapshot,
        filter,
        rules,
        context,
        Vec::new(),
        filter.max_price,
    )
}

/// Fills what is still missing from popular, then newest items: first within the
/// per-category cap (a bounded scan), then without it — diversity is a preference, an
/// answer short of items is not.
fn fill_fallback(snapshot: &Snapshot, n: usize, gate: &mut Gate<'_>, picks: &mut Vec<Pick>) {
    let mut rank = 0usize;
    for relaxed in [false, true] {
        if relaxed {
            gate.max_per_category = usize::MAX;
        }
        let limit = if relaxed { usize::MAX } else { scan_limit(n) };
        for &item in snapshot
            .by_popularity
            .iter()
            .chain(&snapshot.by_newest)
            .take(limit)
        {
            if picks.len() >= n {
                return;
            }
            if gate.allows(item) {
                gate.take(item);
                rank += 1;
                picks.push(Pick {
                    item,
                    score: 0.4 / rank as f64,
                    reason: Reason::Fallback,
                    because: None,
                });
            }
        }
    }
}

fn fallback_only(
    snapshot: &Snapshot,
    n: usize,
    filter: &Filter,
    rules: &Rules,
    context: &[u32],
) -> Vec<Pick> {
    let mut gate = fallback_gate(snapshot, filter, rules, context);
    let mut picks = Vec::with_capacity(n);
    fill_fallback(snapshot, n, &mut gate, &mut picks);
    picks
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::domain::dataset::Csr;
    use crate::domain::model::ItemFacts;
    use crate::domain::train::Trained;

    /// Items 0..8: "h" (in history) predicts every other item with weight 1 − i/10.
    fn snapshot(facts: Vec<(&str, &str, bool, bool)>) -> Snapshot {
        let ids: Vec<String> = facts.iter().map(|f| f.0.to_owned()).collect();
        let n = ids.len();
        let mut rows = vec![Vec::new(); n];
        rows[0] = (1..n as u32).map(|j| (j, 1.0 - j as f32 / 10.0)).collect();
        let trained = Trained {
            items: ids.clone(),
            popularity: (0..n).map(|i| (n - i) as f32).collect(),
            trending: (0..n).map(|i| (n - i) as f32).collect(),
            repeat_rate: vec![0.0; n],
            together: Csr::from_rows(vec![Vec::new(); n]),
            personal: Csr::from_rows(rows),
            people: 1,
            interactions: 1,
            data_until: 0,
        };
        let catalog = facts
            .iter()
            .map(|(id, leaf, in_stock, replenishable)| {
                (
                    (*id).to_owned(),
                    ItemFacts {
                        category: vec!["Root".into(), (*leaf).into()],
                        brand: String::new(),
                        price: 1.0,
                        in_stock: *in_stock,
                        replenishable: *replenishable,
                        created_at: 0,
                        deleted: false,
                    },
                )
            })
            .collect();
        Snapshot::new(1, Some(Arc::new(trained)), catalog)
    }

    fn bought(item: &str) -> HistoryEntry {
        HistoryEntry {
            item: item.into(),
            kind: Kind::Purchase,
            at: 0,
        }
    }

    fn names(snapshot: &Snapshot, picks: &[Pick]) -> Vec<String> {
        picks
            .iter()
            .map(|p| snapshot.ids[p.item as usize].clone())
            .collect()
    }

    const PREDICTED_ONLY: Blend = Blend {
        predicted: 1.0,
        trending: 0.0,
        explore: 0.0,
    };

    #[test]
    fn business_rules_shape_the_answer() {
        let snapshot = snapshot(vec![
            ("h", "x", true, false),
            ("sold-out", "a", false, false),
            ("owned", "b", true, false),
            ("tea", "c", true, true),
            ("mug1", "mugs", true, false),
            ("mug2", "mugs", true, false),
            ("mug3", "mugs", true, false),
            ("lamp", "d", true, false),
        ]);
        let history = vec![bought("h"), bought("owned"), bought("tea")];
        let filter = Filter::default();
        let request = Request {
            placement: Placement::Home,
            history: &history,
            context: &[],
            n: 5,
            filter: &filter,
            seed: 1,
            now: 0,
        };
        let picks = recommend(
            &snapshot,
            &request,
            &Rules::default(),
            &PREDICTED_ONLY,
            &mut Scratch::default(),
        );
        // Out of stock and already bought are dropped, replenishable tea stays, at most two
        // mugs while other items can fill the answer; the fifth slot can only be the third
        // mug (h is bought and not replenishable): the cap gives way rather than leave the
        // answer short.
        assert_eq!(
            names(&snapshot, &picks),
            ["tea", "mug1", "mug2", "lamp", "mug3"]
        );
        assert!(picks[..4].iter().all(|p| p.reason == Reason::Personal));
        assert_eq!(picks[4].reason, Reason::Fallback);
        assert_eq!(
            snapshot.ids[picks[1].because.expect("because") as usize],
            "h"
        );
        // Scores decrease along the answer.
        for pair in picks.windows(2) {
            assert!(pair[0].score >= pair[1].score);
        }
    }

    #[test]
    fn the_same_seed_gives_the_same_answer_and_shares_hold_on_average() {
        let snapshot = snapshot(
            [
                "h", "a", "b", "c", "d", "e", "f", "g", "i", "j", "k", "l", "m", "n", "o", "p",
            ]
            .iter()
            .map(|id| (*id, *id, true, false))
            .collect(),
        );
        let history = vec![bought("h")];
        let filter = Filter::default();
        let rules = Rules {
            explore_band: (0, 16),
            ..Rules::default()
        };
        let mut scratch = Scratch::default();
        let ask = |seed: u64, scratch: &mut Scratch| {
            let request = Request {
                placement: Placement::Home,
                history: &history,
                context: &[],
                n: 5,
                filter: &filter,
                seed,
                now: 0,
            };
            recommend(&snapshot, &request, &rules, &Blend::DEFAULT, scratch)
        };
        assert_eq!(ask(42, &mut scratch), ask(42, &mut scratch));
        let mut by_reason: HashMap<&'static str, usize> = HashMap::new();
        let runs = 2_000;
        for seed in 0..runs {
            for pick in ask(seed, &mut scratch) {
                *by_reason.entry(pick.reason.name()).or_insert(0) += 1;
            }
        }
        let share =
            |reason: &str| by_reason.get(reason).copied().unwrap_or(0) as f64 / (5 * runs) as f64;
        assert!((share("personal") - 0.7).abs() < 0.03, "{by_reason:?}");
        assert!((share("trending") - 0.2).abs() < 0.03, "{by_reason:?}");
        assert!((share("explore") - 0.1).abs() < 0.03, "{by_reason:?}");
    }

    #[test]
    fn nothing_known_falls_back_to_popular_then_newest() {
        let snapshot = snapshot(vec![("a", "x", true, false), ("b", "y", true, false)]);
        let filter = Filter {
            exclude: vec!["a".into()],
            ..Filter::default()
        };
        let request = Request {
            placement: Placement::Cart,
            history: &[],
            context: &["unknown".to_string()],
            n: 5,
            filter: &filter,
            seed: 0,
            now: 0,
        };
        let picks = recommend(
            &snapshot,
            &request,
            &Rules::default(),
            &Blend::DEFAULT,
            &mut Scratch::default(),
        );
        assert_eq!(names(&snapshot, &picks), vec!["b"]);
    }
}
