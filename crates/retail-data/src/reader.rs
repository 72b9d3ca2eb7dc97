//! The streaming reader.

use std::collections::{HashSet, VecDeque};
use std::fs::File;
use std::io::{self, Cursor, Read};
use std::iter::FusedIterator;
use std::path::Path;

use chrono::NaiveDateTime;
use csv::ByteRecord;
use flate2::read::MultiGzDecoder;

use crate::codes::is_product_code;
use crate::error::Error;
use crate::invoice::{Invoice, Line};
use crate::stats::{SkipReason, Stats};

/// How many invoices the reader keeps open at once.
///
/// The rows of an invoice are contiguous in the real file but for one
/// exception, measured over the whole file: invoice `542806` is cut in two by
/// the two rows of cancellation `C542805` (data rows 78,087–78,130, around
/// 2011-02-01 11:19). Rows that come back to an invoice still open are merged
/// into it, so the reader needs at least 2 open invoices; 4 leaves slack for
/// other exports of the data at no real cost. An invoice is yielded once this
/// many newer invoices have started after it, or at the end of the file.
///
/// Rows coming back after their invoice was yielded become a second
/// [`Invoice`] with the same number, counted in [`Stats::late_fragments`].
pub const REORDER_WINDOW: usize = 4;

/// The gzip magic number, the first two bytes of any gzip stream.
const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// The date format of the file the project ships (`2010-12-01 08:26:00`).
const DATE_FORMAT: &str = "%Y-%m-%d %H:%M:%S";
/// The date format of other exports of the same data set (`12/1/2010 8:26`).
const US_DATE_FORMAT: &str = "%m/%d/%Y %H:%M";

/// Streams [`Invoice`]s out of the Online Retail CSV, gzipped or plain.
///
/// It is an iterator of `Result<Invoice, Error>`:
///
/// - invoices come out in the order of their first row, which is time order;
/// - an [`Error::Malformed`] stands for one bad row: the row is skipped and
///   counted, and the next call goes on with the following rows, so the
///   caller decides whether to stop or to carry on. It comes out as soon as
///   the row is read, so before the invoices still open at that point;
/// - any other error (I/O, damaged gzip) is the last item. The invoices still
///   open at that point (at most [`REORDER_WINDOW`]) are dropped, since the
///   newest may be missing rows.
///
/// [`Reader::stats`] tells what has been seen so far.
pub struct Reader {
    csv: csv::Reader<Box<dyn Read + Send>>,
    columns: Columns,
    /// Reused for every row, to avoid an allocation per row.
    record: ByteRecord,
    /// Invoices still accepting rows, oldest first.
    open: VecDeque<Invoice>,
    /// Every invoice number yielded, to notice late fragments.
    yielded: HashSet<String>,
    /// Every customer seen on a yielded invoice, for `Stats::customers`.
    customers: HashSet<String>,
    stats: Stats,
    state: State,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Rows remain to be read.
    Reading,
    /// The file is over; the open invoices remain to be yielded.
    Draining,
    /// Nothing more will be yielded.
    Done,
}

impl std::fmt::Debug for Reader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reader")
            .field("stats", &self.stats)
            .field("open", &self.open.len())
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl Reader {
    /// Opens a file, gzipped or not. Gzip is recognised by its first two
    /// bytes, not by the file name, so a `.csv` that is really gzipped (or
    /// the reverse) still reads.
    pub fn open(path: &Path) -> Result<Reader, Error> {
        let file = File::open(path).map_err(|source| Error::Open {
            path: path.to_path_buf(),
            source,
        })?;
        Reader::from_reader(file)
    }

    /// Reads from any byte source (a file, stdin, a buffer), gzipped or not,
    /// detected as in [`Reader::open`]. The header row is read here, so a
    /// file that is not the Online Retail CSV fails at once.
    ///
    /// The source must be `Send` so that the reader can move to another
    /// thread (a blocking task of an async importer, a load-test worker).
    pub fn from_reader(reader: impl Read + Send + 'static) -> Result<Reader, Error> {
        let input = decompress_if_gzipped(Box::new(reader))?;
        let mut csv = csv::ReaderBuilder::new()
            .has_headers(true)
            // Rows of the wrong length are reported by us, with the row number.
            .flexible(true)
            // The file pads many descriptions with spaces.
            .trim(csv::Trim::All)
            .from_reader(input);
        let header = csv.byte_headers()?.clone();
        let columns = Columns::find(&header)?;
        Ok(Reader {
            csv,
            columns,
            record: ByteRecord::new(),
            open: VecDeque::new(),
            yielded: HashSet::new(),
            customers: HashSet::new(),
            stats: Stats::default(),
            state: State::Reading,
        })
    }

    /// What has been seen so far; complete once the iterator returned `None`.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Gives the counts away, for a caller done with the reader.
    pub fn into_stats(self) -> Stats {
        self.stats
    }

    /// Reads one row into the open invoices. `Ok(false)` at the end of the
    /// file.
    fn read_row(&mut self) -> Result<bool, Error> {
        if !self.csv.read_byte_record(&mut self.record)? {
            return Ok(false);
        }
        self.stats.rows += 1;

        let row = match parse_row(&self.record, &self.columns) {
            Ok(row) => row,
            Err(fault) => {
                self.stats.count_skip(SkipReason::Malformed);
                return Err(Error::Malformed {
                    row: self.stats.rows,
                    line: self.record.position().map(|p| p.line()),
                    column: fault.column,
                    problem: fault.problem,
                });
            }
        };

        let invoice = self.invoice_for(&row);
        if row.invoiced_at < invoice.invoiced_at {
            invoice.invoiced_at = row.invoiced_at;
        }
        match skip_reason(&row) {
            Some(reason) => self.stats.count_skip(reason),
            None => invoice.lines.push(Line {
                stock_code: row.stock_code,
                description: row.description,
                quantity: row.quantity,
                unit_price: row.unit_price,
            }),
        }
        Ok(true)
    }

    /// The open invoice `row` belongs to, started from `row` if there is none.
    fn invoice_for(&mut self, row: &Row) -> &mut Invoice {
        // Searching from the newest: nearly every row belongs to it.
        let found = self
            .open
            .iter()
            .rposition(|invoice| invoice.invoice_no == row.invoice_no);
        let index = match found {
            Some(index) => index,
            None => {
                self.open.push_back(Invoice {
                    invoice_no: row.invoice_no.clone(),
                    customer_id: row.customer_id.clone(),
                    country: row.country.clone(),
                    invoiced_at: row.invoiced_at,
                    is_cancellation: row.invoice_no.starts_with('C'),
                    lines: Vec::new(),
                });
                self.open.len() - 1
            }
        };
        &mut self.open[index]
    }

    /// Counts an invoice that leaves the reader, and hands it back.
    fn release(&mut self, invoice: Invoice) -> Invoice {
        self.stats.invoices += 1;
        if invoice.is_cancellation {
            self.stats.cancellations += 1;
        }
        if invoice.lines.is_empty() {
            self.stats.empty_invoices += 1;
        }
        match &invoice.customer_id {
            Some(id) => {
                if !self.customers.contains(id) {
                    self.customers.insert(id.clone());
                    self.stats.customers += 1;
                }
            }
            None => self.stats.guest_invoices += 1,
        }
        if !self.yielded.insert(invoice.invoice_no.clone()) {
            self.stats.late_fragments += 1;
        }
        invoice
    }
}

impl Iterator for Reader {
    type Item = Result<Invoice, Error>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            match self.state {
                State::Done => return None,
                State::Draining => {
                    let Some(invoice) = self.open.pop_front() else {
                        self.state = State::Done;
                        return None;
                    };
                    return Some(Ok(self.release(invoice)));
                }
                State::Reading => {}
            }

            // Only an invoice that many newer ones have started after is
            // surely complete.
            if self.open.len() > REORDER_WINDOW {
                if let Some(invoice) = self.open.pop_front() {
                    return Some(Ok(self.release(invoice)));
                }
            }

            match self.read_row() {
                Ok(true) => {}
                Ok(false) => self.state = State::Draining,
                Err(error @ Error::Malformed { .. }) => return Some(Err(error)),
                Err(error) => {
                    self.state = State::Done;
                    self.open.clear();
                    return Some(Err(error));
                }
            }
        }
    }
}

impl FusedIterator for Reader {}

/// Wraps `input` in a gzip decoder if it starts with the gzip magic number.
///
/// The first bytes are read by hand and put back in front of the stream,
/// because a single `read` may return fewer than two bytes (a pipe).
/// `MultiGzDecoder` reads every member of a concatenated gzip file, as
/// `gzip -d` does.
fn decompress_if_gzipped(mut input: Box<dyn Read + Send>) -> Result<Box<dyn Read + Send>, Error> {
    let mut head = [0u8; 2];
    let mut filled = 0;
    while filled < head.len() {
        match input.read(&mut head[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(error) => return Err(Error::Read(error)),
        }
    }
    let is_gzip = head[..filled] == GZIP_MAGIC;
    let whole = Cursor::new(head[..filled].to_vec()).chain(input);
    if is_gzip {
        return Ok(Box::new(MultiGzDecoder::new(whole)));
    }
    Ok(Box::new(whole))
}

/// The position of each needed column in the header.
struct Columns {
    invoice_no: usize,
    stock_code: usize,
    description: usize,
    quantity: usize,
    invoice_date: usize,
    unit_price: usize,
    customer_id: usize,
    country: usize,
    /// How many fields the header has: every row must have as many.
    width: usize,
}

impl Columns {
    /// Finds the columns by name (ignoring ASCII case), so that a file with
    /// its columns in another order still reads.
    fn find(header: &ByteRecord) -> Result<Columns, Error> {
        let position = |name: &'static str| -> Result<usize, Error> {
            for (index, field) in header.iter().enumerate() {
                if field.eq_ignore_ascii_case(name.as_bytes()) {
                    return Ok(index);
                }
            }
            let found: Vec<String> = header
                .iter()
                .map(|field| String::from_utf8_lossy(field).into_owned())
                .collect();
            Err(Error::MissingColumn {
                column: name,
                found: found.join(","),
            })
        };
        Ok(Columns {
            invoice_no: position(INVOICE_NO)?,
            stock_code: position(STOCK_CODE)?,
            description: position(DESCRIPTION)?,
            quantity: position(QUANTITY)?,
            invoice_date: position(INVOICE_DATE)?,
            unit_price: position(UNIT_PRICE)?,
            customer_id: position(CUSTOMER_ID)?,
            country: position(COUNTRY)?,
            width: header.len(),
        })
    }
}

const INVOICE_NO: &str = "InvoiceNo";
const STOCK_CODE: &str = "StockCode";
const DESCRIPTION: &str = "Description";
const QUANTITY: &str = "Quantity";
const INVOICE_DATE: &str = "InvoiceDate";
const UNIT_PRICE: &str = "UnitPrice";
const CUSTOMER_ID: &str = "CustomerID";
const COUNTRY: &str = "Country";

/// One data row, parsed.
struct Row {
    invoice_no: String,
    stock_code: String,
    description: String,
    quantity: i64,
    invoiced_at: NaiveDateTime,
    unit_price: f64,
    customer_id: Option<String>,
    country: String,
}

/// What is wrong with a row; the reader adds where it is.
struct Fault {
    column: Option<&'static str>,
    problem: String,
}

impl Fault {
    fn column(column: &'static str, problem: String) -> Fault {
        Fault {
            column: Some(column),
            problem,
        }
    }
}

fn parse_row(record: &ByteRecord, columns: &Columns) -> Result<Row, Fault> {
    if record.len() != columns.width {
        return Err(Fault {
            column: None,
            problem: format!(
                "expected {} fields, found {} (an unquoted comma?)",
                columns.width,
                record.len()
            ),
        });
    }

    let invoice_no = text(record, columns.invoice_no, INVOICE_NO)?;
    if invoice_no.is_empty() {
        return Err(Fault::column(INVOICE_NO, "empty".to_owned()));
    }
    let quantity = text(record, columns.quantity, QUANTITY)?;
    let invoice_date = text(record, columns.invoice_date, INVOICE_DATE)?;
    let unit_price = text(record, columns.unit_price, UNIT_PRICE)?;
    let customer_id = text(record, columns.customer_id, CUSTOMER_ID)?;

    Ok(Row {
        invoice_no: invoice_no.to_owned(),
        stock_code: text(record, columns.stock_code, STOCK_CODE)?.to_owned(),
        // Free text: a stray byte must not cost a purchase.
        description: String::from_utf8_lossy(&record[columns.description]).into_owned(),
        quantity: parse_quantity(quantity).map_err(|p| Fault::column(QUANTITY, p))?,
        invoiced_at: parse_date(invoice_date).map_err(|p| Fault::column(INVOICE_DATE, p))?,
        unit_price: parse_price(unit_price).map_err(|p| Fault::column(UNIT_PRICE, p))?,
        customer_id: parse_customer_id(customer_id).map_err(|p| Fault::column(CUSTOMER_ID, p))?,
        country: text(record, columns.country, COUNTRY)?.to_owned(),
    })
}

/// A field as UTF-8 text. The width was checked, so the field exists.
fn text<'r>(record: &'r ByteRecord, index: usize, column: &'static str) -> Result<&'r str, Fault> {
    let bytes = &record[index];
    std::str::from_utf8(bytes).map_err(|_| {
        Fault::column(
            column,
            format!("not UTF-8: {:?}", String::from_utf8_lossy(bytes)),
        )
    })
}

fn parse_quantity(text: &str) -> Result<i64, String> {
    text.parse::<i64>()
        .map_err(|_| format!("expected a whole number, found {text:?}"))
}

fn parse_price(text: &str) -> Result<f64, String> {
    let Ok(price) = text.parse::<f64>() else {
        return Err(format!("expected a price such as 2.55, found {text:?}"));
    };
    // `parse` accepts "inf" and "NaN", which no price is.
    if !price.is_finite() {
        return Err(format!("expected a price such as 2.55, found {text:?}"));
    }
    Ok(price)
}

fn parse_date(text: &str) -> Result<NaiveDateTime, String> {
    if let Ok(at) = NaiveDateTime::parse_from_str(text, DATE_FORMAT) {
        return Ok(at);
    }
    if let Ok(at) = NaiveDateTime::parse_from_str(text, US_DATE_FORMAT) {
        return Ok(at);
    }
    Err(format!(
        "expected a date such as 2010-12-01 08:26:00, found {text:?}"
    ))
}

/// `17850.0` → `17850`. The file writes the number as a float because it
/// went through a spreadsheet; the identity is the integer part. Empty means
/// a guest checkout.
fn parse_customer_id(text: &str) -> Result<Option<String>, String> {
    if text.is_empty() {
        return Ok(None);
    }
    let digits = match text.split_once('.') {
        None => text,
        Some((whole, fraction)) if fraction.bytes().all(|b| b == b'0') => whole,
        Some(_) => {
            return Err(format!(
                "expected a customer number such as 17850.0, found {text:?}"
            ));
        }
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!(
            "expected a customer number such as 17850.0, found {text:?}"
        ));
    }
    Ok(Some(digits.to_owned()))
}

/// Why this row is not a product line, if it is not.
fn skip_reason(row: &Row) -> Option<SkipReason> {
    if !is_product_code(&row.stock_code) {
        return Some(SkipReason::NonProductCode);
    }
    if row.unit_price == 0.0 {
        return Some(SkipReason::ZeroPrice);
    }
    if row.unit_price < 0.0 {
        return Some(SkipReason::NegativePrice);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::{REORDER_WINDOW, Reader};
    use crate::{Error, Invoice, SkipReason};
    use std::io::{Cursor, Write};

    const HEADER: &str =
        "InvoiceNo,StockCode,Description,Quantity,InvoiceDate,UnitPrice,CustomerID,Country\n";

    fn reader(body: &str) -> Reader {
        let csv = format!("{HEADER}{body}");
        Reader::from_reader(Cursor::new(csv.into_bytes())).expect("header reads")
    }

    /// Reads everything, expecting no error.
    fn invoices(body: &str) -> (Vec<Invoice>, Reader) {
        let mut reader = reader(body);
        let mut out = Vec::new();
        for item in &mut reader {
            out.push(item.expect("no error"));
        }
        (out, reader)
    }

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        encoder.write_all(bytes).expect("gzip in memory");
        encoder.finish().expect("gzip in memory")
    }

    #[test]
    fn groups_rows_by_invoice() {
        let (invoices, reader) = invoices(
            "536365,85123A,WHITE HANGING HEART T-LIGHT HOLDER,6,2010-12-01 08:26:00,2.55,17850.0,United Kingdom\n\
             536365,71053,WHITE METAL LANTERN,6,2010-12-01 08:26:00,3.39,17850.0,United Kingdom\n\
             536366,22633,HAND WARMER UNION JACK,6,2010-12-01 08:28:00,1.85,17850.0,United Kingdom\n",
        );
        assert_eq!(invoices.len(), 2);
        assert_eq!(invoices[0].invoice_no, "536365");
        assert_eq!(invoices[0].lines.len(), 2);
        assert_eq!(invoices[0].lines[1].stock_code, "71053");
        assert_eq!(invoices[0].lines[1].quantity, 6);
        assert_eq!(invoices[0].lines[1].unit_price, 3.39);
        assert_eq!(invoices[0].country, "United Kingdom");
        assert_eq!(invoices[0].invoiced_at.to_string(), "2010-12-01 08:26:00");
        assert!((invoices[0].revenue() - (6.0 * 2.55 + 6.0 * 3.39)).abs() < 1e-9);
        assert_eq!(invoices[1].invoice_no, "536366");
        let stats = reader.stats();
        assert_eq!(stats.rows, 3);
        assert_eq!(stats.invoices, 2);
        assert_eq!(stats.customers, 1);
        assert_eq!(stats.skipped_total(), 0);
    }

    #[test]
    fn quoted_commas_stay_in_the_description() {
        let (invoices, _) = invoices(
            "536520,21888,\"BINGO SET,\",1,2010-12-01 12:43:00,3.75,14729.0,United Kingdom\n\
             536520,84247G,\"DECOUPAGE,GREETING CARD,\",24,2010-12-01 12:43:00,0.42,14729.0,United Kingdom\n",
        );
        assert_eq!(invoices.len(), 1);
        assert_eq!(invoices[0].lines[0].description, "BINGO SET,");
        assert_eq!(invoices[0].lines[1].description, "DECOUPAGE,GREETING CARD,");
        assert_eq!(invoices[0].lines[1].quantity, 24);
        assert_eq!(invoices[0].lines[1].unit_price, 0.42);
        assert_eq!(invoices[0].country, "United Kingdom");
    }

    #[test]
    fn descriptions_are_trimmed() {
        let (invoices, _) = invoices(
            "536365,22457,NATURAL SLATE HEART CHALKBOARD ,6,2011-02-01 11:20:00,2.95,12836.0,United Kingdom\n",
        );
        assert_eq!(
            invoices[0].lines[0].description,
            "NATURAL SLATE HEART CHALKBOARD"
        );
    }

    #[test]
    fn float_customer_id_loses_its_suffix() {
        let (invoices, reader) = invoices(
            "536365,85123A,A,6,2010-12-01 08:26:00,2.55,17850.0,United Kingdom\n\
             536366,85123A,A,6,2010-12-01 08:27:00,2.55,13047,United Kingdom\n\
             536367,85123A,A,6,2010-12-01 08:28:00,2.55,,United Kingdom\n\
             536368,85123A,A,6,2010-12-01 08:29:00,2.55,17850.0,United Kingdom\n",
        );
        assert_eq!(invoices[0].customer_id.as_deref(), Some("17850"));
        assert_eq!(invoices[1].customer_id.as_deref(), Some("13047"));
        assert_eq!(invoices[2].customer_id, None);
        let stats = reader.stats();
        assert_eq!(stats.customers, 2);
        assert_eq!(stats.guest_invoices, 1);
    }

    #[test]
    fn cancellation_has_negative_revenue() {
        let (invoices, reader) = invoices(
            "C536379,22556,PLASTERS IN TIN CIRCUS PARADE,-12,2010-12-01 09:41:00,1.65,14527.0,United Kingdom\n\
             C536379,21980,PACK OF 12 RED RETROSPOT TISSUES,-24,2010-12-01 09:41:00,0.29,14527.0,United Kingdom\n\
             536380,22961,JAM MAKING SET PRINTED,24,2010-12-01 09:41:00,1.45,17809.0,United Kingdom\n",
        );
        assert!(invoices[0].is_cancellation);
        assert_eq!(invoices[0].lines.len(), 2);
        assert!((invoices[0].revenue() - (-12.0 * 1.65 - 24.0 * 0.29)).abs() < 1e-9);
        assert!(!invoices[1].is_cancellation);
        assert_eq!(reader.stats().cancellations, 1);
        assert_eq!(reader.stats().invoices, 2);
    }

    #[test]
    fn bad_debt_adjustment_is_not_a_cancellation() {
        let (invoices, reader) =
            invoices("A563185,B,Adjust bad debt,1,2011-08-12 14:50:00,11062.06,,United Kingdom\n");
        assert!(!invoices[0].is_cancellation);
        assert!(invoices[0].lines.is_empty());
        assert_eq!(reader.stats().skipped(SkipReason::NonProductCode), 1);
    }

    #[test]
    fn non_product_lines_are_skipped_and_counted() {
        let (invoices, reader) = invoices(
            "536370,22728,ALARM CLOCK BAKELIKE PINK,24,2010-12-01 08:45:00,3.75,12583.0,France\n\
             536370,POST,POSTAGE,3,2010-12-01 08:45:00,18.0,12583.0,France\n\
             536371,DOT,DOTCOM POSTAGE,1,2010-12-01 09:00:00,569.77,,United Kingdom\n\
             536372,gift_0001_20,Dotcomgiftshop Gift Voucher £20.00,1,2010-12-01 09:01:00,17.02,,United Kingdom\n",
        );
        // The invoice keeps its product line only: postage is not revenue.
        assert_eq!(invoices[0].lines.len(), 1);
        assert!((invoices[0].revenue() - 90.0).abs() < 1e-9);
        // Invoices left without product lines are still yielded, empty.
        assert_eq!(invoices.len(), 3);
        assert!(invoices[1].lines.is_empty());
        assert!(invoices[2].lines.is_empty());
        assert_eq!(invoices[2].revenue(), 0.0);
        let stats = reader.stats();
        assert_eq!(stats.rows, 4);
        assert_eq!(stats.invoices, 3);
        assert_eq!(stats.empty_invoices, 2);
        assert_eq!(stats.skipped(SkipReason::NonProductCode), 3);
        assert_eq!(stats.skipped.get("non_product_code"), Some(&3));
    }

    #[test]
    fn zero_price_lines_are_skipped_and_counted() {
        let (invoices, reader) = invoices(
            "536414,22139,,56,2010-12-01 11:52:00,0.0,,United Kingdom\n\
             536415,22139,RETROSPOT TEA SET CERAMIC 11 PC ,1,2010-12-01 11:53:00,4.95,17850.0,United Kingdom\n\
             536415,21955,DOORMAT UNION JACK GUNS AND ROSES,1,2010-12-01 11:53:00,0,17850.0,United Kingdom\n",
        );
        assert!(invoices[0].lines.is_empty());
        assert_eq!(invoices[1].lines.len(), 1);
        assert_eq!(reader.stats().skipped(SkipReason::ZeroPrice), 2);
        assert_eq!(reader.stats().skipped.get("zero_price"), Some(&2));
    }

    #[test]
    fn malformed_row_names_row_and_column_then_reading_goes_on() {
        let mut reader = reader(
            "536365,85123A,A,6,2010-12-01 08:26:00,2.55,17850.0,United Kingdom\n\
             536366,85123A,A,six,2010-12-01 08:28:00,2.55,17850.0,United Kingdom\n\
             536367,85123A,A,6,2010-12-01 08:29:00,2.55,17850.0,United Kingdom\n",
        );
        let error = match reader.next() {
            Some(Err(error)) => error,
            other => panic!("expected an error, got {other:?}"),
        };
        match &error {
            Error::Malformed {
                row, line, column, ..
            } => {
                assert_eq!(*row, 2);
                assert_eq!(*line, Some(3));
                assert_eq!(*column, Some("Quantity"));
            }
            other => panic!("expected Malformed, got {other:?}"),
        }
        let message = error.to_string();
        assert!(message.contains("row 2"), "{message}");
        assert!(message.contains("Quantity"), "{message}");
        assert!(message.contains("\"six\""), "{message}");

        let rest: Vec<Invoice> = reader
            .by_ref()
            .map(|r| r.expect("no more errors"))
            .collect();
        let numbers: Vec<&str> = rest.iter().map(|i| i.invoice_no.as_str()).collect();
        assert_eq!(numbers, ["536365", "536367"]);
        assert_eq!(reader.stats().rows, 3);
        assert_eq!(reader.stats().skipped(SkipReason::Malformed), 1);
    }

    fn first_error(body: &str) -> Error {
        let mut reader = reader(body);
        for item in &mut reader {
            if let Err(error) = item {
                return error;
            }
        }
        panic!("no error in {body:?}");
    }

    #[test]
    fn malformed_fields_name_their_column() {
        let cases = [
            ("1,22,A,6,01.12.2010,2.55,17850.0,UK\n", Some("InvoiceDate")),
            ("1,22,A,6,2010-12-01 08:26:00,2,55,17850.0,UK\n", None),
            (
                "1,22,A,6,2010-12-01 08:26:00,cheap,17850.0,UK\n",
                Some("UnitPrice"),
            ),
            (
                "1,22,A,6,2010-12-01 08:26:00,NaN,17850.0,UK\n",
                Some("UnitPrice"),
            ),
            (
                "1,22,A,6,2010-12-01 08:26:00,2.55,17850.5,UK\n",
                Some("CustomerID"),
            ),
            (
                "1,22,A,6,2010-12-01 08:26:00,2.55,abc,UK\n",
                Some("CustomerID"),
            ),
            (
                ",22,A,6,2010-12-01 08:26:00,2.55,17850.0,UK\n",
                Some("InvoiceNo"),
            ),
            ("1,22,A,6,2010-12-01 08:26:00\n", None),
        ];
        for (body, expected) in cases {
            match first_error(body) {
                Error::Malformed { row, column, .. } => {
                    assert_eq!(row, 1, "{body}");
                    assert_eq!(column, expected, "{body}");
                }
                other => panic!("{body}: expected Malformed, got {other:?}"),
            }
        }
    }

    #[test]
    fn other_date_format_reads() {
        let (invoices, _) =
            invoices("536365,85123A,A,6,12/1/2010 8:26,2.55,17850.0,United Kingdom\n");
        assert_eq!(invoices[0].invoiced_at.to_string(), "2010-12-01 08:26:00");
    }

    #[test]
    fn header_without_needed_column_fails_at_once() {
        let csv = "InvoiceNo,StockCode,Description,Quantity,InvoiceDate,UnitPrice,Country\n";
        match Reader::from_reader(Cursor::new(csv.as_bytes().to_vec())) {
            Err(Error::MissingColumn { column, .. }) => assert_eq!(column, "CustomerID"),
            other => panic!("expected MissingColumn, got {other:?}"),
        }
        match Reader::from_reader(Cursor::new(Vec::new())) {
            Err(Error::MissingColumn { column, .. }) => assert_eq!(column, "InvoiceNo"),
            other => panic!("expected MissingColumn, got {other:?}"),
        }
    }

    #[test]
    fn columns_are_found_by_name() {
        let csv = "Country,CustomerID,UnitPrice,InvoiceDate,Quantity,Description,StockCode,InvoiceNo\n\
                   France,12583.0,3.75,2010-12-01 08:45:00,24,ALARM CLOCK,22728,536370\n";
        let mut reader = Reader::from_reader(Cursor::new(csv.as_bytes().to_vec())).expect("header");
        let invoice = reader.next().expect("one invoice").expect("no error");
        assert_eq!(invoice.invoice_no, "536370");
        assert_eq!(invoice.country, "France");
        assert_eq!(invoice.lines[0].stock_code, "22728");
    }

    #[test]
    fn gzip_is_detected_by_magic_bytes() {
        let csv =
            format!("{HEADER}536365,85123A,A,6,2010-12-01 08:26:00,2.55,17850.0,United Kingdom\n");
        let mut reader = Reader::from_reader(Cursor::new(gzip(csv.as_bytes()))).expect("header");
        let invoice = reader.next().expect("one invoice").expect("no error");
        assert_eq!(invoice.invoice_no, "536365");
        assert!(reader.next().is_none());
        assert_eq!(reader.stats().rows, 1);
    }

    #[test]
    fn open_ignores_the_file_extension() {
        let csv =
            format!("{HEADER}536365,85123A,A,6,2010-12-01 08:26:00,2.55,17850.0,United Kingdom\n");
        let dir = std::env::temp_dir().join(format!("relance-retail-data-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        // Gzip named .csv, plain named .gz: both read.
        let gzipped = dir.join("really-gzipped.csv");
        let plain = dir.join("really-plain.csv.gz");
        std::fs::write(&gzipped, gzip(csv.as_bytes())).expect("write");
        std::fs::write(&plain, csv.as_bytes()).expect("write");
        for path in [&gzipped, &plain] {
            let reader = Reader::open(path).expect("opens");
            let invoices: Vec<Invoice> = reader.map(|r| r.expect("no error")).collect();
            assert_eq!(invoices.len(), 1, "{}", path.display());
        }
        std::fs::remove_dir_all(&dir).expect("clean up");

        match Reader::open(&dir.join("missing.csv")) {
            Err(error @ Error::Open { .. }) => {
                assert!(error.to_string().contains("missing.csv"), "{error}")
            }
            other => panic!("expected Open, got {other:?}"),
        }
    }

    #[test]
    fn concatenated_gzip_members_all_read() {
        let first =
            format!("{HEADER}536365,85123A,A,6,2010-12-01 08:26:00,2.55,17850.0,United Kingdom\n");
        let second = "536366,85123A,A,6,2010-12-01 08:27:00,2.55,17850.0,United Kingdom\n";
        let mut bytes = gzip(first.as_bytes());
        bytes.extend(gzip(second.as_bytes()));
        let reader = Reader::from_reader(Cursor::new(bytes)).expect("header");
        assert_eq!(reader.count(), 2);
    }

    #[test]
    fn truncated_gzip_ends_with_an_error() {
        let mut body = String::from(HEADER);
        for i in 0..2000 {
            body.push_str(&format!(
                "{},85123A,WHITE HANGING HEART T-LIGHT HOLDER {i},6,2010-12-01 08:26:00,2.55,17850.0,United Kingdom\n",
                536365 + i
            ));
        }
        let mut bytes = gzip(body.as_bytes());
        bytes.truncate(bytes.len() / 2);
        let mut reader = Reader::from_reader(Cursor::new(bytes)).expect("header");
        let mut last = None;
        for item in &mut reader {
            last = Some(item);
        }
        match last {
            Some(Err(Error::Csv(_) | Error::Read(_))) => {}
            other => panic!("expected a read error last, got {other:?}"),
        }
        assert!(reader.next().is_none());
    }

    #[test]
    fn interrupted_invoice_is_merged() {
        // As in the real file around row 78,087: 542806 is cut by C542805.
        let (invoices, reader) = invoices(
            "542806,48194,DOORMAT HEARTS,1,2011-02-01 11:19:00,7.95,12836.0,United Kingdom\n\
             542806,21524,DOORMAT SPOTTY HOME SWEET HOME,1,2011-02-01 11:19:00,7.95,12836.0,United Kingdom\n\
             C542805,22156,HEART DECORATION WITH PEARLS ,-1,2011-02-01 11:19:00,0.85,14606.0,United Kingdom\n\
             542806,22692,DOORMAT WELCOME TO OUR HOME,2,2011-02-01 11:20:00,7.95,12836.0,United Kingdom\n\
             542807,22692,DOORMAT WELCOME TO OUR HOME,2,2011-02-01 11:21:00,7.95,12837.0,United Kingdom\n",
        );
        let numbers: Vec<&str> = invoices.iter().map(|i| i.invoice_no.as_str()).collect();
        assert_eq!(numbers, ["542806", "C542805", "542807"]);
        assert_eq!(invoices[0].lines.len(), 3);
        assert_eq!(invoices[0].invoiced_at.to_string(), "2011-02-01 11:19:00");
        assert_eq!(reader.stats().invoices, 3);
        assert_eq!(reader.stats().late_fragments, 0);
    }

    #[test]
    fn rows_returning_after_the_window_are_a_late_fragment() {
        let mut body = String::from("1,22,A,1,2011-02-01 11:19:00,1.0,1.0,UK\n");
        for i in 0..=REORDER_WINDOW {
            body.push_str(&format!(
                "{},22,A,1,2011-02-01 11:19:00,1.0,1.0,UK\n",
                100 + i
            ));
        }
        body.push_str("1,22,A,1,2011-02-01 11:20:00,1.0,1.0,UK\n");
        let (invoices, reader) = invoices(&body);
        assert_eq!(invoices.len(), REORDER_WINDOW + 3);
        assert_eq!(reader.stats().invoices, (REORDER_WINDOW + 3) as u64);
        assert_eq!(reader.stats().late_fragments, 1);
        assert_eq!(reader.stats().customers, 1);
    }

    #[test]
    fn stats_grow_during_iteration() {
        let mut body = String::new();
        for i in 0..10 {
            body.push_str(&format!(
                "{},22,A,1,2011-02-01 11:19:00,1.0,{}.0,UK\n",
                100 + i,
                12000 + i
            ));
        }
        let mut reader = reader(&body);
        let first = reader.next().expect("an invoice").expect("no error");
        assert_eq!(first.invoice_no, "100");
        assert_eq!(reader.stats().invoices, 1);
        assert_eq!(reader.stats().customers, 1);
        assert!(reader.stats().rows >= 1);
        assert!(reader.stats().rows < 10);
        let rest = reader.by_ref().count();
        assert_eq!(rest, 9);
        let stats = reader.into_stats();
        assert_eq!(stats.rows, 10);
        assert_eq!(stats.invoices, 10);
        assert_eq!(stats.customers, 10);
    }

    #[test]
    fn reader_is_send() {
        fn assert_send<T: Send>() {}
        assert_send::<Reader>();
    }
}
