//! What can go wrong while reading the file.

use std::io;
use std::path::PathBuf;

/// An error from [`crate::Reader`].
///
/// [`Error::Malformed`] concerns one row: the reader skips that row, counts
/// it, and goes on if the caller keeps iterating. Every other error ends the
/// iteration.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file could not be opened.
    #[error("cannot open {}: {source}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// Reading failed: an I/O error, or a damaged or truncated gzip stream.
    #[error("cannot read the online-retail CSV: {0}")]
    Read(#[from] io::Error),

    /// The CSV layer failed (in practice an I/O error under it).
    #[error("cannot read the online-retail CSV: {0}")]
    Csv(#[from] csv::Error),

    /// The header row lacks a column the reader needs.
    #[error("the header has no {column} column (found: {found})")]
    MissingColumn {
        column: &'static str,
        /// The header as read, comma-separated.
        found: String,
    },

    /// One row could not be understood.
    #[error("{}", describe_malformed(*row, *line, *column, problem))]
    Malformed {
        /// 1-based number of the data row (the header is not counted): the
        /// same numbering as [`crate::Stats::rows`].
        row: u64,
        /// 1-based line of the file where the row starts, when known.
        line: Option<u64>,
        /// The column at fault, or `None` when the row as a whole is wrong
        /// (a wrong number of fields).
        column: Option<&'static str>,
        /// What is wrong, with the offending value.
        problem: String,
    },
}

fn describe_malformed(
    row: u64,
    line: Option<u64>,
    column: Option<&'static str>,
    problem: &str,
) -> String {
    let mut text = format!("malformed row {row}");
    if let Some(line) = line {
        text.push_str(&format!(" (line {line})"));
    }
    if let Some(column) = column {
        text.push_str(&format!(", column {column}"));
    }
    text.push_str(": ");
    text.push_str(problem);
    text
}
