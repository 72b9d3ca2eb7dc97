//! Reads the UCI "Online Retail" data set (Daqing Chen, UCI Machine Learning
//! Repository, 2015, CC BY 4.0) into [`Invoice`]s.
//!
//! The file is a CSV, gzipped or plain, with one row per invoice line:
//!
//! ```text
//! InvoiceNo,StockCode,Description,Quantity,InvoiceDate,UnitPrice,CustomerID,Country
//! 536365,85123A,WHITE HANGING HEART T-LIGHT HOLDER,6,2010-12-01 08:26:00,2.55,17850.0,United Kingdom
//! ```
//!
//! [`Reader`] streams it: it groups the rows of each invoice into one
//! [`Invoice`], drops the lines that are not sales of a product (postage,
//! fees, discounts, vouchers, zero prices — see [`is_product_code`] and
//! [`SkipReason`]) and counts everything it saw in [`Stats`].
//!
//! ```no_run
//! use relance_retail_data::Reader;
//!
//! # fn main() -> Result<(), relance_retail_data::Error> {
//! let mut reader = Reader::open("online-retail.csv.gz".as_ref())?;
//! for invoice in &mut reader {
//!     let invoice = invoice?;
//!     println!("{} {:.2}", invoice.invoice_no, invoice.revenue());
//! }
//! println!("{} rows, {} invoices", reader.stats().rows, reader.stats().invoices);
//! # Ok(())
//! # }
//! ```
//!
//! The crate does no I/O beyond reading the file or reader it is given.

mod codes;
mod error;
mod invoice;
mod reader;
mod stats;

pub use codes::is_product_code;
pub use error::Error;
pub use invoice::{Invoice, Line};
pub use reader::{REORDER_WINDOW, Reader};
pub use stats::{SkipReason, Stats};
