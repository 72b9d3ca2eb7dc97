//! Invoices and their lines.

use chrono::NaiveDateTime;
use serde::{Deserialize, Serialize};

/// One product line of an invoice: a row of the file that sold (or, in a
/// cancellation, took back) a product.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Line {
    /// The `StockCode`, as written (`85123A`). Always a product code, see
    /// [`crate::is_product_code`].
    pub stock_code: String,
    /// The `Description`, trimmed (the file pads many with trailing spaces).
    /// May be empty.
    pub description: String,
    /// Units; negative in cancellations.
    pub quantity: i64,
    /// Price of one unit in pounds sterling; always greater than zero (rows
    /// priced 0 are skipped).
    pub unit_price: f64,
}

impl Line {
    /// `quantity × unit_price`: negative for a cancelled line.
    pub fn amount(&self) -> f64 {
        self.quantity as f64 * self.unit_price
    }
}

/// All the rows of one `InvoiceNo`.
///
/// An invoice is yielded even when none of its rows was a product line (an
/// invoice of postage only, a bad-debt adjustment, a line priced 0): `lines`
/// is then empty. The reader never hides an invoice, so a caller that wants
/// one event per invoice gets them all, and one that only wants purchases
/// checks `lines.is_empty()`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Invoice {
    /// The `InvoiceNo` as written: `536365`, `C536379` for a cancellation,
    /// `A563185` for a bad-debt adjustment.
    pub invoice_no: String,
    /// The `CustomerID` without its float suffix (`17850.0` → `17850`);
    /// `None` for a guest checkout.
    pub customer_id: Option<String>,
    /// The `Country` of the invoice's first row.
    pub country: String,
    /// The earliest `InvoiceDate` of the invoice's rows. A few invoices span
    /// two consecutive minutes; the first one is when the order was placed.
    pub invoiced_at: NaiveDateTime,
    /// The `InvoiceNo` starts with `C`: the invoice takes back goods, with
    /// negative quantities.
    pub is_cancellation: bool,
    /// The product lines, in file order. Non-product and zero-price rows are
    /// left out (and counted in [`crate::Stats::skipped`]).
    pub lines: Vec<Line>,
}

impl Invoice {
    /// The sum of `quantity × unit_price` over the product lines: what the
    /// customer paid for goods, without postage or fees. Negative for a
    /// cancellation, 0 for an invoice without product lines.
    pub fn revenue(&self) -> f64 {
        let mut total = 0.0;
        for line in &self.lines {
            total += line.amount();
        }
        total
    }
}

#[cfg(test)]
mod tests {
    use super::{Invoice, Line};
    use chrono::NaiveDate;

    fn line(quantity: i64, unit_price: f64) -> Line {
        Line {
            stock_code: "22423".to_owned(),
            description: "REGENCY CAKESTAND 3 TIER".to_owned(),
            quantity,
            unit_price,
        }
    }

    fn invoice(lines: Vec<Line>) -> Invoice {
        let at = NaiveDate::from_ymd_opt(2011, 1, 1)
            .and_then(|d| d.and_hms_opt(10, 0, 0))
            .expect("valid date");
        Invoice {
            invoice_no: "536365".to_owned(),
            customer_id: Some("17850".to_owned()),
            country: "United Kingdom".to_owned(),
            invoiced_at: at,
            is_cancellation: false,
            lines,
        }
    }

    #[test]
    fn revenue_sums_lines() {
        let inv = invoice(vec![line(6, 2.55), line(2, 12.75)]);
        assert!((inv.revenue() - 40.8).abs() < 1e-9);
    }

    #[test]
    fn revenue_is_negative_for_negative_quantities() {
        let inv = invoice(vec![line(-3, 2.0)]);
        assert!((inv.revenue() + 6.0).abs() < 1e-9);
    }

    #[test]
    fn revenue_of_no_lines_is_zero() {
        assert_eq!(invoice(Vec::new()).revenue(), 0.0);
    }
}
