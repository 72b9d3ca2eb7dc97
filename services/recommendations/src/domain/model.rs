//! What serving reads: a trained model joined with the catalog ([`Snapshot`]), and the
//! binary form model versions are stored in.

use std::collections::HashMap;
use std::sync::Arc;

use super::dataset::Csr;
use super::train::Trained;

/// What the catalog says about an item, as far as ranking and rules need it.
#[derive(Debug, Clone, PartialEq)]
pub struct ItemFacts {
    /// Category path from the root.
    pub category: Vec<String>,
    pub brand: String,
    pub price: f64,
    pub in_stock: bool,
    pub replenishable: bool,
    /// Unix seconds.
    pub created_at: i64,
    /// Removed from the catalog: never recommended, even by a model that knows it.
    pub deleted: bool,
}

impl ItemFacts {
    /// The leaf category, used by "at most k per category".
    pub fn leaf(&self) -> Option<&str> {
        self.category.last().map(String::as_str)
    }
}

/// The catalog has the item.
pub const KNOWN: u8 = 1;
/// Removed from the catalog.
pub const DELETED: u8 = 2;
/// In stock.
pub const AVAILABLE: u8 = 4;
/// Bought again regularly (the catalog says so).
pub const REPLENISHABLE: u8 = 8;
/// No leaf category.
pub const NO_LEAF: u32 = u32::MAX;

/// A model and the catalog, indexed together. Items of the catalog that the model has not
/// seen get index numbers after the model's and zero scores.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// The model version (0: none trained yet).
    pub version: u64,
    pub ids: Vec<String>,
    pub index: HashMap<String, u32>,
    /// Catalog facts by index; `None` when the catalog does not have the item (the shop
    /// never sent it): then only filters that need a fact exclude it.
    pub facts: Vec<Option<ItemFacts>>,
    pub popularity: Vec<f32>,
    pub trending: Vec<f32>,
    pub repeat_rate: Vec<f32>,
    /// The trained model (its matrices are shared, not copied, between the snapshots that
    /// join it with successive catalogs).
    pub model: Option<Arc<Trained>>,
    /// Per item, what the rules check on every candidate, packed so that scanning many
    /// candidates stays in cache: [`KNOWN`], [`DELETED`], [`AVAILABLE`], [`REPLENISHABLE`].
    pub flags: Vec<u8>,
    /// Per item, its leaf category as a dense number ([`NO_LEAF`] when it has none).
    pub leaf: Vec<u32>,
    /// Item indices by trending score, best first (only items with a score).
    pub by_trending: Vec<u32>,
    /// Item indices by popularity, best first (only items with a score).
    pub by_popularity: Vec<u32>,
    /// Catalog items, newest first: the last fallback.
    pub by_newest: Vec<u32>,
}

impl Snapshot {
    /// Joins a model (or none) with the catalog's items.
    pub fn new(
        version: u64,
        trained: Option<Arc<Trained>>,
        catalog: Vec<(String, ItemFacts)>,
    ) -> Snapshot {
        let mut snapshot = Snapshot {
            version,
            ..Snapshot::default()
        };
        if let Some(trained) = &trained {
            snapshot.ids = trained.items.clone();
            snapshot.popularity = trained.popularity.clone();
            snapshot.trending = trained.trending.clone();
            snapshot.repeat_rate = trained.repeat_rate.clone();
        }
        snapshot.model = trained;
        for (position, id) in snapshot.ids.iter().enumerate() {
            snapshot.index.insert(id.clone(), position as u32);
        }
        snapshot.facts = vec![None; snapshot.ids.len()];
        for (id, facts) in catalog {
            match snapshot.index.get(&id) {
                Some(&position) => snapshot.facts[position as usize] = Some(facts),
                None => {
                    snapshot.index.insert(id.clone(), snapshot.ids.len() as u32);
                    snapshot.ids.push(id);
                    snapshot.facts.push(Some(facts));
                }
            }
        }
        let n = snapshot.ids.len();
        for scores in [
            &mut snapshot.popularity,
            &mut snapshot.trending,
            &mut snapshot.repeat_rate,
        ] {
            scores.resize(n, 0.0);
        }
        let mut leaves: HashMap<&str, u32> = HashMap::new();
        snapshot.flags = Vec::with_capacity(n);
        snapshot.leaf = Vec::with_capacity(n);
        for facts in &snapshot.facts {
            let Some(facts) = facts else {
                snapshot.flags.push(0);
                snapshot.leaf.push(NO_LEAF);
                continue;
            };
            let mut flags = KNOWN;
            if facts.deleted {
                flags |= DELETED;
            }
            if facts.in_stock {
                flags |= AVAILABLE;
            }
            if facts.replenishable {
                flags |= REPLENISHABLE;
            }
            snapshot.flags.push(flags);
            snapshot.leaf.push(match facts.leaf() {
                Some(leaf) => {
                    let next = leaves.len() as u32;
                    *leaves.entry(leaf).or_insert(next)
                }
                None => NO_LEAF,
            });
        }
        snapshot.by_trending = ranked(&snapshot.trending);
        snapshot.by_popularity = ranked(&snapshot.popularity);
        let mut newest: Vec<(i64, u32)> = Vec::new();
        for (position, facts) in snapshot.facts.iter().enumerate() {
            if let Some(facts) = facts
                && !facts.deleted
            {
                newest.push((facts.created_at, position as u32));
            }
        }
        newest.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        snapshot.by_newest = newest.into_iter().map(|(_, position)| position).collect();
        snapshot
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Items bought together with `item`, best first (empty for items the model lacks).
    pub fn together_row(&self, item: u32) -> (&[u32], &[f32]) {
        match &self.model {
            Some(model) => model.together.row(item as usize),
            None => (&[], &[]),
        }
    }

    /// The personal model's weights from `item` to the items it predicts.
    pub fn personal_row(&self, item: u32) -> (&[u32], &[f32]) {
        match &self.model {
            Some(model) => model.personal.row(item as usize),
            None => (&[], &[]),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Approximate heap size, for the model info.
    pub fn memory_bytes(&self) -> usize {
        let ids: usize = self.ids.iter().map(|id| id.len() + 24 + 40).sum();
        ids + self.facts.len() * 120
            + self.len() * 4 * 6
            + self
                .model
                .as_ref()
                .map(|m| m.together.memory_bytes() + m.personal.memory_bytes())
                .unwrap_or(0)
    }
}

/// Indices with a positive score, best first (ties by index).
fn ranked(scores: &[f32]) -> Vec<u32> {
    let mut order: Vec<u32> = (0..scores.len() as u32)
        .filter(|&i| scores[i as usize] > 0.0)
        .collect();
    order.sort_unstable_by(|a, b| {
        scores[*b as usize]
            .total_cmp(&scores[*a as usize])
            .then(a.cmp(b))
    });
    order
}

const MAGIC: &[u8; 8] = b"RLNCREC1";

/// Encodes a trained model (little-endian, length-prefixed sections).
pub fn encode(trained: &Trained) -> Vec<u8> {
    let mut out = Vec::with_capacity(
        64 + trained.items.len() * 40
            + trained.together.memory_bytes()
            + trained.personal.memory_bytes(),
    );
    out.extend_from_slice(MAGIC);
    put_u64(&mut out, trained.people);
    put_u64(&mut out, trained.interactions);
    put_u64(&mut out, trained.data_until as u64);
    put_u64(&mut out, trained.items.len() as u64);
    for id in &trained.items {
        put_u64(&mut out, id.len() as u64);
        out.extend_from_slice(id.as_bytes());
    }
    for scores in [&trained.popularity, &trained.trending, &trained.repeat_rate] {
        put_f32s(&mut out, scores);
    }
    for csr in [&trained.together, &trained.personal] {
        put_u32s(&mut out, &csr.offsets);
        put_u32s(&mut out, &csr.cols);
        put_f32s(&mut out, &csr.values);
    }
    out
}

/// Decodes [`encode`]'s output.
pub fn decode(bytes: &[u8]) -> Result<Trained, String> {
    let mut reader = Reader { bytes, at: 0 };
    if reader.take(8)? != MAGIC {
        return Err("not a Relance model snapshot".into());
    }
    let people = reader.u64()?;
    let interactions = reader.u64()?;
    let data_until = reader.u64()? as i64;
    let count = reader.u64()? as usize;
    let mut items = Vec::with_capacity(count);
    for _ in 0..count {
        let length = reader.u64()? as usize;
        let text = std::str::from_utf8(reader.take(length)?).map_err(|e| e.to_string())?;
        items.push(text.to_owned());
    }
    let popularity = reader.f32s()?;
    let trending = reader.f32s()?;
    let repeat_rate = reader.f32s()?;
    let mut csrs = Vec::with_capacity(2);
    for _ in 0..2 {
        let csr = Csr {
            offsets: reader.u32s()?,
            cols: reader.u32s()?,
            values: reader.f32s()?,
        };
        if csr.offsets.len() != count + 1
            || csr.cols.len() != csr.values.len()
            || csr.offsets.last().copied().unwrap_or(0) as usize != csr.cols.len()
            || csr.cols.iter().any(|c| *c as usize >= count)
        {
            return Err("inconsistent sparse matrix".into());
        }
        csrs.push(csr);
    }
    if popularity.len() != count || trending.len() != count || repeat_rate.len() != count {
        return Err("score vectors do not match the items".into());
    }
    if reader.at != bytes.len() {
        return Err("trailing bytes".into());
    }
    let personal = csrs.pop().unwrap_or_default();
    let together = csrs.pop().unwrap_or_default();
    Ok(Trained {
        items,
        popularity,
        trending,
        repeat_rate,
        together,
        personal,
        people,
        interactions,
        data_until,
    })
}

fn put_u64(out: &mut Vec<u8>, value: u64) {
    out.extend_from_slice(&value.to_le_bytes());
}

fn put_u32s(out: &mut Vec<u8>, values: &[u32]) {
    put_u64(out, values.len() as u64);
    for value in values {
        out.extend_from_slice(&value.to_le_bytes());
    }
}

fn put_f32s(out: &mut Vec<u8>, values: &[f32]) {
    put_u64(out, values.len() as u64);
    for value in values {
        out.extend_from_slice(&value.to_le_bytes());
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, length: usize) -> Result<&'a [u8], String> {
        let end = self
            .at
            .checked_add(length)
            .filter(|end| *end <= self.bytes.len())
            .ok_or("truncated snapshot")?;
        let slice = &self.bytes[self.at..end];
        self.at = end;
        Ok(slice)
    }

    fn u64(&mut self) -> Result<u64, String> {
        let mut buffer = [0u8; 8];
        buffer.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(buffer))
    }

    fn u32s(&mut self) -> Result<Vec<u32>, String> {
        let count = self.u64()? as usize;
        let raw = self.take(count.checked_mul(4).ok_or("truncated snapshot")?)?;
        Ok(raw
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }

    fn f32s(&mut self) -> Result<Vec<f32>, String> {
        let count = self.u64()? as usize;
        let raw = self.take(count.checked_mul(4).ok_or("truncated snapshot")?)?;
        Ok(raw
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trained() -> Trained {
        Trained {
            items: vec!["a".into(), "b".into()],
            popularity: vec![2.0, 1.0],
            trending: vec![0.5, 0.0],
            repeat_rate: vec![0.1, 0.0],
            together: Csr::from_rows(vec![vec![(1, 3.5)], vec![(0, 3.5)]]),
            personal: Csr::from_rows(vec![vec![(1, 0.25)], vec![]]),
            people: 3,
            interactions: 4,
            data_until: 1_700_000_000,
        }
    }

    #[test]
    fn snapshot_round_trips_and_refuses_garbage() {
        let model = trained();
        let bytes = encode(&model);
        assert_eq!(decode(&bytes), Ok(model));
        assert!(decode(&bytes[..bytes.len() - 1]).is_err());
        assert!(decode(b"nonsense").is_err());
    }

    #[test]
    fn joins_the_catalog_and_orders_fallbacks() {
        let facts = |created_at, deleted| ItemFacts {
            category: vec!["Home".into()],
            brand: String::new(),
            price: 1.0,
            in_stock: true,
            replenishable: false,
            created_at,
            deleted,
        };
        let snapshot = Snapshot::new(
            7,
            Some(Arc::new(trained())),
            vec![
                ("b".into(), facts(10, false)),
                ("new".into(), facts(20, false)),
                ("gone".into(), facts(30, true)),
            ],
        );
        assert_eq!(snapshot.len(), 4);
        assert!(snapshot.facts[0].is_none());
        assert_eq!(snapshot.by_trending, vec![0]);
        assert_eq!(snapshot.by_popularity, vec![0, 1]);
        let newest: Vec<&str> = snapshot
            .by_newest
            .iter()
            .map(|i| snapshot.ids[*i as usize].as_str())
            .collect();
        assert_eq!(newest, vec!["new", "b"]);
        assert_eq!(snapshot.popularity[2], 0.0);
    }
}
