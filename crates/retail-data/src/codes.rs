//! Which stock codes are products.

/// Tells whether a `StockCode` names a product someone bought, as opposed to
/// a bookkeeping line (postage, a fee, a discount, a voucher, an adjustment).
///
/// The rule: a code is a product if it starts with an ASCII digit (`85123A`,
/// `22423`, `47566B`, `15056bl`), or if it starts with `DCGS`.
///
/// Why: every code of the real file that does not start with a digit was
/// looked at (distinct `StockCode`s, with their descriptions and prices).
/// They are all bookkeeping lines, except the `DCGS…` codes:
///
/// | code | what it is |
/// |------|------------|
/// | `POST`, `DOT`, `C2` | postage, "DOTCOM POSTAGE", carriage |
/// | `M`, `m` | "Manual" price corrections |
/// | `D` | discount |
/// | `S` | "SAMPLES" (always cancelled) |
/// | `B` | "Adjust bad debt" |
/// | `CRUK` | a charity commission |
/// | `BANK CHARGES`, `AMAZONFEE` | fees |
/// | `PADS` | "PADS TO MATCH ALL CUSHIONS" at £0.001, a placeholder to push orders through |
/// | `gift_0001_10` … `gift_0001_50` | gift vouchers: money, not goods |
/// | `DCGS0003`, `DCGSSBOY`, `DCGSSGIRL`, … | real goods (ashtray, dog collars, party bags) sold through another channel: **products** |
///
/// Deciding by the first character rather than by a list of known codes means
/// an unseen non-digit code is treated as bookkeeping, which keeps revenue and
/// product counts conservative.
pub fn is_product_code(code: &str) -> bool {
    let code = code.trim();
    if code.starts_with(|c: char| c.is_ascii_digit()) {
        return true;
    }
    code.starts_with("DCGS")
}

#[cfg(test)]
mod tests {
    use super::is_product_code;

    #[test]
    fn digit_codes_are_products() {
        for code in ["85123A", "22423", "47566B", "15056bl", "84997c", "90214Y"] {
            assert!(is_product_code(code), "{code}");
        }
    }

    #[test]
    fn dcgs_codes_are_products() {
        for code in ["DCGS0003", "DCGS0066P", "DCGSSBOY", "DCGSSGIRL"] {
            assert!(is_product_code(code), "{code}");
        }
    }

    #[test]
    fn bookkeeping_codes_are_not_products() {
        let codes = [
            "POST",
            "DOT",
            "C2",
            "M",
            "m",
            "D",
            "S",
            "B",
            "CRUK",
            "PADS",
            "BANK CHARGES",
            "AMAZONFEE",
            "gift_0001_10",
            "gift_0001_50",
            "",
        ];
        for code in codes {
            assert!(!is_product_code(code), "{code}");
        }
    }
}
