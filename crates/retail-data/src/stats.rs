//! Counts of what the reader saw.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// Why a row did not become a [`crate::Line`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SkipReason {
    /// The stock code is postage, a fee, a discount, a voucher… (see
    /// [`crate::is_product_code`]). The row still belongs to its invoice.
    NonProductCode,
    /// A product row priced 0: free samples, stock adjustments, damaged or
    /// lost goods. It is not a sale. The row still belongs to its invoice.
    ZeroPrice,
    /// A product row with a negative price. None in the real file; counted
    /// apart so it cannot pass for a refund.
    NegativePrice,
    /// The row's fields do not parse. The reader yields an
    /// [`crate::Error::Malformed`] for it; the row belongs to no invoice.
    Malformed,
}

impl SkipReason {
    /// The key of this reason in [`Stats::skipped`].
    pub fn as_str(self) -> &'static str {
        match self {
            SkipReason::NonProductCode => "non_product_code",
            SkipReason::ZeroPrice => "zero_price",
            SkipReason::NegativePrice => "negative_price",
            SkipReason::Malformed => "malformed",
        }
    }
}

impl fmt::Display for SkipReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the reader has seen so far.
///
/// Row counters (`rows`, `skipped`) move as rows are read; invoice counters
/// move as invoices are yielded. Once the reader returns `None`, all of them
/// describe the whole file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    /// Data rows read, header excluded, malformed rows included.
    pub rows: u64,
    /// Invoices yielded, cancellations and invoices without product lines
    /// included.
    pub invoices: u64,
    /// Invoices yielded whose number starts with `C`.
    pub cancellations: u64,
    /// Distinct `CustomerID`s among the invoices yielded.
    pub customers: u64,
    /// Invoices yielded without a `CustomerID`.
    pub guest_invoices: u64,
    /// Invoices yielded with no product line left (`lines` empty).
    pub empty_invoices: u64,
    /// Invoices yielded whose number had already been yielded: rows of one
    /// invoice that came back after the reader had closed it (see
    /// [`crate::REORDER_WINDOW`]). 0 on the real file.
    pub late_fragments: u64,
    /// Rows that did not become a line, by [`SkipReason::as_str`]. A reason
    /// that never happened has no entry.
    pub skipped: BTreeMap<String, u64>,
}

impl Stats {
    /// How many rows were skipped for `reason`.
    pub fn skipped(&self, reason: SkipReason) -> u64 {
        self.skipped.get(reason.as_str()).copied().unwrap_or(0)
    }

    /// All skipped rows, whatever the reason.
    pub fn skipped_total(&self) -> u64 {
        self.skipped.values().sum()
    }

    pub(crate) fn count_skip(&mut self, reason: SkipReason) {
        if let Some(count) = self.skipped.get_mut(reason.as_str()) {
            *count += 1;
            return;
        }
        self.skipped.insert(reason.as_str().to_owned(), 1);
    }
}

#[cfg(test)]
mod tests {
    use super::{SkipReason, Stats};

    #[test]
    fn counts_skips_by_reason() {
        let mut stats = Stats::default();
        stats.count_skip(SkipReason::ZeroPrice);
        stats.count_skip(SkipReason::ZeroPrice);
        stats.count_skip(SkipReason::Malformed);
        assert_eq!(stats.skipped(SkipReason::ZeroPrice), 2);
        assert_eq!(stats.skipped(SkipReason::Malformed), 1);
        assert_eq!(stats.skipped(SkipReason::NonProductCode), 0);
        assert_eq!(stats.skipped_total(), 3);
        assert_eq!(stats.skipped.get("zero_price"), Some(&2));
    }
}
