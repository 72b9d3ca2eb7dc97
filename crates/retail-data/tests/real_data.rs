//! Reads the real Online Retail file and the sample the project ships, and
//! checks the counts against numbers measured independently.
//!
//! Every constant below was measured with Python's `csv` module, not with this
//! crate, by a script of this shape (`is_product` is the rule documented on
//! `is_product_code`):
//!
//! ```text
//! import csv, gzip, sys
//! def is_product(code): return code[:1].isdigit() or code.startswith('DCGS')
//! with gzip.open(sys.argv[1], 'rt', newline='', encoding='utf-8') as f:
//!     rows = list(csv.DictReader(f))
//! invoices = {r['InvoiceNo'].strip(): r['CustomerID'].strip() for r in rows}
//! print(len(rows), len(invoices),                          # rows, invoices
//!       sum(i.startswith('C') for i in invoices),          # cancellations
//!       len({c for c in invoices.values() if c}),          # customers
//!       sum(not c for c in invoices.values()))             # guest invoices
//! # then, per row: non-product code, else price == 0, else a product line
//! # (summing quantity * price), and invoices with no product line.
//! ```
//!
//! The file is not in the repository (7.6 MB); the test skips, saying so, when
//! it is missing.

use std::path::{Path, PathBuf};

use relance_retail_data::{Reader, SkipReason, Stats};

const FULL_FILE: &str = "/work/shared/data/online-retail.csv.gz";

/// What a file should read as.
struct Expected {
    rows: u64,
    invoices: u64,
    cancellations: u64,
    customers: u64,
    guest_invoices: u64,
    empty_invoices: u64,
    non_product_code: u64,
    zero_price: u64,
    lines: u64,
    revenue: f64,
}

/// The whole file, 2010-12-01 to 2011-12-09.
const FULL: Expected = Expected {
    rows: 541_909,
    // Distinct InvoiceNo. Grouping *consecutive* rows instead would give
    // 25,901: invoice 542806 is cut in two by C542805 (the only such case).
    invoices: 25_900,
    cancellations: 3_836,
    customers: 4_372,
    guest_invoices: 3_710,
    empty_invoices: 2_705,
    non_product_code: 2_950,
    zero_price: 2_497,
    lines: 536_462,
    revenue: 9_792_708.88,
};

/// examples/data/online-retail-sample.csv.gz: InvoiceDate 2011-09-01 to
/// 2011-11-30, inclusive.
const SAMPLE: Expected = Expected {
    rows: 195_679,
    invoices: 8_426,
    cancellations: 1_136,
    customers: 2_872,
    guest_invoices: 999,
    empty_invoices: 849,
    non_product_code: 906,
    zero_price: 655,
    lines: 194_118,
    revenue: 3_508_843.33,
};

fn check(path: &Path, expected: &Expected) {
    let mut reader = Reader::open(path).expect("the file opens");
    let mut lines = 0u64;
    let mut revenue = 0.0;
    for invoice in &mut reader {
        let invoice = invoice.expect("every row of the real data parses");
        lines += invoice.lines.len() as u64;
        revenue += invoice.revenue();
    }
    let stats: Stats = reader.into_stats();
    println!("{}: {stats:?}", path.display());

    assert_eq!(stats.rows, expected.rows, "rows");
    assert_eq!(stats.invoices, expected.invoices, "invoices");
    assert_eq!(stats.late_fragments, 0, "late fragments");
    assert_eq!(stats.cancellations, expected.cancellations, "cancellations");
    assert_eq!(stats.customers, expected.customers, "customers");
    assert_eq!(
        stats.guest_invoices, expected.guest_invoices,
        "guest invoices"
    );
    assert_eq!(
        stats.empty_invoices, expected.empty_invoices,
        "empty invoices"
    );
    assert_eq!(
        stats.skipped(SkipReason::NonProductCode),
        expected.non_product_code,
        "non-product rows"
    );
    assert_eq!(
        stats.skipped(SkipReason::ZeroPrice),
        expected.zero_price,
        "zero-price rows"
    );
    assert_eq!(
        stats.skipped(SkipReason::NegativePrice),
        0,
        "negative-price rows"
    );
    assert_eq!(stats.skipped(SkipReason::Malformed), 0, "malformed rows");
    // Every row is either a line or counted as skipped.
    assert_eq!(lines, expected.lines, "product lines");
    assert_eq!(
        lines + stats.skipped_total(),
        stats.rows,
        "rows accounted for"
    );
    assert!(
        (revenue - expected.revenue).abs() < 0.05,
        "revenue {revenue:.2}, expected {:.2}",
        expected.revenue
    );
}

#[test]
fn full_file_reads_with_the_measured_counts() {
    let path = Path::new(FULL_FILE);
    if !path.exists() {
        println!("skipped: {FULL_FILE} is not here, the full-file counts were not checked");
        return;
    }
    check(path, &FULL);
}

#[test]
fn shipped_sample_reads_with_the_measured_counts() {
    let path: PathBuf = [
        env!("CARGO_MANIFEST_DIR"),
        "..",
        "..",
        "examples",
        "data",
        "online-retail-sample.csv.gz",
    ]
    .iter()
    .collect();
    if !path.exists() {
        println!(
            "skipped: {} is not here, the sample counts were not checked",
            path.display()
        );
        return;
    }
    check(&path, &SAMPLE);
}
