//! Interactions in a compact form for training: people and items interned to dense
//! indices, one row per (person, item, basket) with its time and kind.

use std::collections::HashMap;

/// What a person did with an item. Weights say how much each kind tells about taste.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Purchase,
    Cart,
    View,
}

impl Kind {
    /// Weight of one interaction of this kind in the personal model and in trending.
    pub fn weight(self) -> f32 {
        match self {
            Kind::Purchase => 1.0,
            Kind::Cart => 0.5,
            Kind::View => 0.2,
        }
    }

    /// The one-letter code used in the Redis history.
    pub fn code(self) -> char {
        match self {
            Kind::Purchase => 'p',
            Kind::Cart => 'c',
            Kind::View => 'v',
        }
    }

    pub fn from_code(code: char) -> Option<Kind> {
        match code {
            'p' => Some(Kind::Purchase),
            'c' => Some(Kind::Cart),
            'v' => Some(Kind::View),
            _ => None,
        }
    }
}

/// One interaction.
#[derive(Debug, Clone, Copy)]
pub struct Interaction {
    pub person: u32,
    pub item: u32,
    /// The order (or session) it belongs to: items of one basket are "bought together".
    pub basket: u32,
    /// Unix seconds.
    pub at: i64,
    pub kind: Kind,
}

/// Interned strings with dense indices.
#[derive(Debug, Clone, Default)]
pub struct Interner {
    pub names: Vec<String>,
    index: HashMap<String, u32>,
}

impl Interner {
    pub fn intern(&mut self, name: &str) -> u32 {
        if let Some(&id) = self.index.get(name) {
            return id;
        }
        let id = self.names.len() as u32;
        self.names.push(name.to_owned());
        self.index.insert(name.to_owned(), id);
        id
    }

    pub fn get(&self, name: &str) -> Option<u32> {
        self.index.get(name).copied()
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }
}

/// Everything training reads.
#[derive(Debug, Clone, Default)]
pub struct Dataset {
    pub people: Interner,
    pub items: Interner,
    pub baskets: u32,
    pub interactions: Vec<Interaction>,
}

impl Dataset {
    /// Starts a new basket (an order, a session) and returns its number.
    pub fn new_basket(&mut self) -> u32 {
        self.baskets += 1;
        self.baskets - 1
    }

    pub fn add(&mut self, person: &str, item: &str, basket: u32, at: i64, kind: Kind) {
        let person = self.people.intern(person);
        let item = self.items.intern(item);
        self.interactions.push(Interaction {
            person,
            item,
            basket,
            at,
            kind,
        });
    }

    /// The newest interaction time, or 0 when empty.
    pub fn latest(&self) -> i64 {
        let mut latest = 0;
        for interaction in &self.interactions {
            latest = latest.max(interaction.at);
        }
        latest
    }
}

/// A sparse matrix in compressed rows: row `r` is `cols[offsets[r]..offsets[r+1]]`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Csr {
    pub offsets: Vec<u32>,
    pub cols: Vec<u32>,
    pub values: Vec<f32>,
}

impl Csr {
    /// An empty matrix of `rows` rows.
    pub fn empty(rows: usize) -> Csr {
        Csr {
            offsets: vec![0; rows + 1],
            cols: Vec::new(),
            values: Vec::new(),
        }
    }

    /// Builds from per-row lists.
    pub fn from_rows(rows: Vec<Vec<(u32, f32)>>) -> Csr {
        let mut csr = Csr {
            offsets: Vec::with_capacity(rows.len() + 1),
            cols: Vec::new(),
            values: Vec::new(),
        };
        csr.offsets.push(0);
        for row in rows {
            for (col, value) in row {
                csr.cols.push(col);
                csr.values.push(value);
            }
            csr.offsets.push(csr.cols.len() as u32);
        }
        csr
    }

    pub fn rows(&self) -> usize {
        self.offsets.len().saturating_sub(1)
    }

    pub fn row(&self, row: usize) -> (&[u32], &[f32]) {
        if row + 1 >= self.offsets.len() {
            return (&[], &[]);
        }
        let start = self.offsets[row] as usize;
        let end = self.offsets[row + 1] as usize;
        (&self.cols[start..end], &self.values[start..end])
    }

    pub fn nnz(&self) -> usize {
        self.cols.len()
    }

    pub fn memory_bytes(&self) -> usize {
        self.offsets.len() * 4 + self.cols.len() * 4 + self.values.len() * 4
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interns_and_groups() {
        let mut data = Dataset::default();
        let basket = data.new_basket();
        data.add("c1", "a", basket, 10, Kind::Purchase);
        data.add("c1", "b", basket, 10, Kind::Purchase);
        data.add("c2", "a", data.baskets, 20, Kind::View);
        assert_eq!(data.items.get("b"), Some(1));
        assert_eq!(data.people.len(), 2);
        assert_eq!(data.latest(), 20);
        let csr = Csr::from_rows(vec![vec![(0, 1.0), (1, 2.0)], vec![(0, 1.0)]]);
        assert_eq!(csr.row(0).0, &[0, 1]);
        assert_eq!(csr.row(1).1, &[1.0]);
        assert_eq!(csr.row(5).0.len(), 0);
    }
}
