//! The operations files stay true to the code: every Grafana dashboard in `infra/grafana/`
//! and every alert rule in `infra/prometheus/` parses, has what an operator needs (panels with
//! queries, a Prometheus `datasource` variable; an alert's `for`, severity, summary,
//! description and a runbook link whose anchor is a heading of `docs/runbook.md`), and every
//! metric its PromQL names is one the services export.
//!
//! What the services export is read from the code, not from a list that could drift: the
//! literal names of the `counter!`, `gauge!` and `histogram!` macros under `crates/` and
//! `services/`, and the kit's exporter configuration (`crates/kit/src/metrics.rs`), which
//! decides which histograms have buckets (`_bucket`, `_sum`, `_count`) and which are
//! summaries (quantile series, `_sum`, `_count`).
//!
//! Runs without servers: `cargo test -p relance --test observability`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use yaml_rust2::{Yaml, YamlLoader};

/// What Prometheus writes itself for every scrape target.
const SCRAPE_SERIES: &[&str] = &[
    "up",
    "scrape_duration_seconds",
    "scrape_samples_scraped",
    "scrape_samples_post_metric_relabeling",
    "scrape_series_added",
];

/// Grafana's own variables, usable in any query.
const GRAFANA_VARIABLES: &[&str] = &[
    "__interval",
    "__interval_ms",
    "__rate_interval",
    "__range",
    "__range_s",
    "__range_ms",
    "__from",
    "__to",
    "__dashboard",
];

/// PromQL functions (Prometheus 2.x and 3.x).
const FUNCTIONS: &[&str] = &[
    "abs",
    "absent",
    "absent_over_time",
    "acos",
    "acosh",
    "asin",
    "asinh",
    "atan",
    "atanh",
    "avg_over_time",
    "ceil",
    "changes",
    "clamp",
    "clamp_max",
    "clamp_min",
    "cos",
    "cosh",
    "count_over_time",
    "day_of_month",
    "day_of_week",
    "day_of_year",
    "days_in_month",
    "deg",
    "delta",
    "deriv",
    "double_exponential_smoothing",
    "end",
    "exp",
    "floor",
    "histogram_avg",
    "histogram_count",
    "histogram_fraction",
    "histogram_quantile",
    "histogram_stddev",
    "histogram_stdvar",
    "histogram_sum",
    "holt_winters",
    "hour",
    "idelta",
    "increase",
    "info",
    "irate",
    "label_join",
    "label_replace",
    "last_over_time",
    "ln",
    "log10",
    "log2",
    "mad_over_time",
    "max_over_time",
    "min_over_time",
    "minute",
    "month",
    "pi",
    "predict_linear",
    "present_over_time",
    "quantile_over_time",
    "rad",
    "rate",
    "resets",
    "round",
    "scalar",
    "sgn",
    "sin",
    "sinh",
    "sort",
    "sort_by_label",
    "sort_by_label_desc",
    "sort_desc",
    "sqrt",
    "start",
    "stddev_over_time",
    "stdvar_over_time",
    "sum_over_time",
    "tan",
    "tanh",
    "time",
    "timestamp",
    "vector",
    "year",
];

/// Aggregation operators: `sum(…)`, `sum by (l) (…)`, `sum(…) without (l)`.
const AGGREGATIONS: &[&str] = &[
    "avg",
    "bottomk",
    "count",
    "count_values",
    "group",
    "limit_ratio",
    "limitk",
    "max",
    "min",
    "quantile",
    "stddev",
    "stdvar",
    "sum",
    "topk",
];

/// Keywords followed by a parenthesised list of label names.
const LABEL_LISTS: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];

/// Other keywords and literals.
const KEYWORDS: &[&str] = &[
    "and", "or", "unless", "bool", "offset", "atan2", "inf", "nan",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// A metric the code records, and where.
#[derive(Debug, Clone)]
struct Metric {
    kind: Kind,
    at: String,
}

/// How the exporter decides a histogram has buckets (`Matcher::Full/Prefix/Suffix`).
#[derive(Debug, Clone)]
enum Matcher {
    Full(String),
    Prefix(String),
    Suffix(String),
}

impl Matcher {
    fn matches(&self, name: &str) -> bool {
        match self {
            Matcher::Full(full) => name == full,
            Matcher::Prefix(prefix) => name.starts_with(prefix.as_str()),
            Matcher::Suffix(suffix) => name.ends_with(suffix.as_str()),
        }
    }
}

/// The series names a Prometheus scrape of the services can hold.
#[derive(Debug, Default)]
struct Catalog {
    metrics: BTreeMap<String, Metric>,
    /// Series name → the metric it belongs to (a histogram's `_bucket` → the histogram).
    series: BTreeMap<String, String>,
}

impl Catalog {
    fn new(metrics: BTreeMap<String, Metric>, bucketed: &[Matcher]) -> Catalog {
        let mut series = BTreeMap::new();
        for (name, metric) in &metrics {
            let names: Vec<String> = match metric.kind {
                Kind::Counter | Kind::Gauge => vec![name.clone()],
                Kind::Histogram if bucketed.iter().any(|m| m.matches(name)) => vec![
                    format!("{name}_bucket"),
                    format!("{name}_sum"),
                    format!("{name}_count"),
                ],
                // A summary: `name{quantile="…"}`, `name_sum`, `name_count`.
                Kind::Histogram => {
                    vec![name.clone(), format!("{name}_sum"), format!("{name}_count")]
                }
            };
            for series_name in names {
                series.insert(series_name, name.clone());
            }
        }
        for name in SCRAPE_SERIES {
            series.insert((*name).to_owned(), (*name).to_owned());
        }
        Catalog { metrics, series }
    }

    /// Why `name` is not a series the services export, with the likely intended one.
    fn problem(&self, name: &str) -> Option<String> {
        if self.series.contains_key(name) {
            return None;
        }
        if let Some(metric) = self.metrics.get(name)
            && metric.kind == Kind::Histogram
        {
            return Some(format!(
                "`{name}` is a histogram ({}): query `{name}_bucket`, `{name}_sum` or `{name}_count`",
                metric.at
            ));
        }
        for suffix in ["_bucket", "_sum", "_count"] {
            if let Some(base) = name.strip_suffix(suffix)
                && let Some(metric) = self.metrics.get(base)
            {
                return Some(format!(
                    "`{name}`: `{base}` is a {:?} ({}), it has no `{suffix}` series",
                    metric.kind, metric.at
                ));
            }
        }
        let closest = self
            .series
            .keys()
            .map(|known| (edit_distance(name, known), known))
            .min();
        Some(match closest {
            Some((distance, known)) if distance <= 4 => {
                format!("`{name}` is not exported by any service (did you mean `{known}`?)")
            }
            _ => format!("`{name}` is not exported by any service"),
        })
    }
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut current = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let substitution = previous[j] + usize::from(ca != *cb);
            current.push(substitution.min(previous[j + 1] + 1).min(current[j] + 1));
        }
        previous = current;
    }
    previous[b.len()]
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

fn relative(path: &Path) -> String {
    let root = root().canonicalize().unwrap_or_else(|_| root());
    let path = path.canonicalize().unwrap_or_else(|_| path.to_owned());
    path.strip_prefix(&root)
        .unwrap_or(&path)
        .display()
        .to_string()
}

/// Files under `dir` whose name ends with one of `extensions`, sorted.
fn files(dir: &Path, extensions: &[&str], skip_dirs: &[&str]) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_owned()];
    while let Some(dir) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if path.is_dir() {
                if !skip_dirs.contains(&name.as_str()) {
                    pending.push(path);
                }
            } else if extensions.iter().any(|ext| name.ends_with(ext)) {
                found.push(path);
            }
        }
    }
    found.sort();
    found
}

// ---- what the code exports ----------------------------------------------------------------

/// The metrics recorded by `counter!`, `gauge!` and `histogram!` (and their `describe_*`)
/// in `source`; a macro whose name is not a string literal is an error, since this test
/// could not see it.
fn scan_macros(
    source: &str,
    file: &str,
    metrics: &mut BTreeMap<String, Metric>,
    errors: &mut Vec<String>,
) {
    for (needle, kind) in [
        ("counter!(", Kind::Counter),
        ("gauge!(", Kind::Gauge),
        ("histogram!(", Kind::Histogram),
    ] {
        let mut from = 0;
        while let Some(found) = source[from..].find(needle) {
            let at = from + found;
            from = at + needle.len();
            let before = &source[..at];
            let preceding = before.chars().next_back();
            let is_macro = match preceding {
                Some(c) if c.is_alphanumeric() || c == '_' => before.ends_with("describe_"),
                _ => true,
            };
            let line_start = before.rfind('\n').map_or(0, |i| i + 1);
            let in_comment = before[line_start..].contains("//");
            if !is_macro || in_comment {
                continue;
            }
            let line = before.matches('\n').count() + 1;
            let where_ = format!("{file}:{line}");
            let rest = source[from..].trim_start();
            let name = rest
                .strip_prefix('"')
                .and_then(|rest| rest.split_once('"'))
                .map(|(name, _)| name.to_owned());
            let Some(name) = name else {
                errors.push(format!(
                    "{where_}: `{needle}` without a string-literal metric name: this test cannot \
                     check the dashboards and alerts against it (name the metric literally)"
                ));
                continue;
            };
            match metrics.get(&name) {
                Some(known) if known.kind != kind => errors.push(format!(
                    "{where_}: `{name}` recorded as a {kind:?} here and as a {:?} at {}",
                    known.kind, known.at
                )),
                Some(_) => {}
                None => {
                    metrics.insert(
                        name,
                        Metric {
                            kind,
                            at: where_.clone(),
                        },
                    );
                }
            }
        }
    }
}

/// The bucket matchers of the kit's exporter (`Matcher::Suffix("_seconds")`, …).
fn scan_matchers(source: &str) -> Vec<Matcher> {
    let mut matchers = Vec::new();
    for (needle, make) in [
        ("Matcher::Full(\"", Matcher::Full as fn(String) -> Matcher),
        ("Matcher::Prefix(\"", Matcher::Prefix),
        ("Matcher::Suffix(\"", Matcher::Suffix),
    ] {
        for (at, _) in source.match_indices(needle) {
            if let Some((literal, _)) = source[at + needle.len()..].split_once('"') {
                matchers.push(make(literal.to_owned()));
            }
        }
    }
    matchers
}

/// Everything the services export, read from the sources.
fn exported() -> Catalog {
    let root = root();
    let mut metrics = BTreeMap::new();
    let mut errors = Vec::new();
    let mut scanned = 0;
    for dir in ["crates", "services"] {
        // Tests record no production metrics (and this file names metrics on purpose).
        for path in files(&root.join(dir), &[".rs"], &["tests", "target", "benches"]) {
            scanned += 1;
            scan_macros(&read(&path), &relative(&path), &mut metrics, &mut errors);
        }
    }
    assert!(
        errors.is_empty(),
        "metric macros the observability test cannot read:\n  {}",
        errors.join("\n  ")
    );
    assert!(
        scanned > 50 && metrics.len() > 20,
        "scanned {scanned} files and found {} metrics: is the workspace layout still crates/ and services/?",
        metrics.len()
    );
    for kit_metric in [
        "relance_grpc_requests_total",
        "relance_grpc_request_duration_seconds",
        "relance_queue_depth",
        "relance_messages_consumed_total",
    ] {
        assert!(
            metrics.contains_key(kit_metric),
            "the kit's {kit_metric} was not found by the scan: the scanner is broken"
        );
    }
    let exporter = root.join("crates/kit/src/metrics.rs");
    let matchers = scan_matchers(&read(&exporter));
    assert!(
        !matchers.is_empty(),
        "no `Matcher::…(\"…\")` bucket configuration found in {}: every histogram would be a \
         summary; update this test if the exporter is configured differently",
        relative(&exporter)
    );
    Catalog::new(metrics, &matchers)
}

// ---- PromQL -------------------------------------------------------------------------------

/// The metric names a PromQL expression selects, in order; an error for what cannot be
/// read (an unknown function, unbalanced braces, an unterminated string).
fn metric_names(expr: &str) -> Result<Vec<String>, String> {
    let chars: Vec<char> = expr.chars().collect();
    let is_ident_start = |c: char| c.is_ascii_alphabetic() || c == '_' || c == ':';
    let is_ident = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let next_significant = |mut i: usize| {
        while i < chars.len() && chars[i].is_whitespace() {
            i += 1;
        }
        (i, chars.get(i).copied())
    };
    let skip_parens = |open: usize| -> Result<usize, String> {
        let mut depth = 0;
        for (i, c) in chars.iter().enumerate().skip(open) {
            match c {
                '(' => depth += 1,
                ')' => {
                    depth -= 1;
                    if depth == 0 {
                        return Ok(i + 1);
                    }
                }
                _ => {}
            }
        }
        Err("unbalanced parentheses".to_owned())
    };

    let mut names = Vec::new();
    let mut braces = 0usize;
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '"' || c == '\'' || c == '`' {
            let mut j = i + 1;
            while j < chars.len() && chars[j] != c {
                if chars[j] == '\\' && c != '`' {
                    j += 1;
                }
                j += 1;
            }
            if j >= chars.len() {
                return Err("unterminated string".to_owned());
            }
            i = j + 1;
        } else if c == '#' {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c == '{' {
            braces += 1;
            i += 1;
        } else if c == '}' {
            braces = braces
                .checked_sub(1)
                .ok_or_else(|| "unbalanced braces".to_owned())?;
            i += 1;
        } else if c == '[' {
            // A range or subquery: durations and Grafana variables only.
            while i < chars.len() && chars[i] != ']' {
                i += 1;
            }
            i += 1;
        } else if c == '$' {
            // A Grafana variable: $name, ${name}, ${name:format}.
            i += 1;
            if chars.get(i) == Some(&'{') {
                while i < chars.len() && chars[i] != '}' {
                    i += 1;
                }
                i += 1;
            } else {
                while i < chars.len() && is_ident(chars[i]) {
                    i += 1;
                }
            }
        } else if c.is_ascii_digit()
            || (c == '.' && chars.get(i + 1).is_some_and(char::is_ascii_digit))
        {
            // A number or a duration: 0.005, 1e-3, 0x1f, 5m, 1h30m.
            let start = i;
            let hex = chars.get(i + 1).is_some_and(|x| *x == 'x' || *x == 'X');
            while i < chars.len() {
                let d = chars[i];
                let exponent_sign = !hex
                    && (d == '-' || d == '+')
                    && i > start
                    && matches!(chars[i - 1], 'e' | 'E');
                if d.is_ascii_alphanumeric() || d == '.' || d == '_' || exponent_sign {
                    i += 1;
                } else {
                    break;
                }
            }
        } else if is_ident_start(c) {
            let start = i;
            while i < chars.len() && is_ident(chars[i]) {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            if braces > 0 {
                continue; // a label name in a selector
            }
            let lower = word.to_ascii_lowercase();
            let (next_at, next) = next_significant(i);
            if LABEL_LISTS.contains(&lower.as_str()) {
                if next == Some('(') {
                    i = skip_parens(next_at)?;
                }
                continue;
            }
            if KEYWORDS.contains(&lower.as_str()) || AGGREGATIONS.contains(&lower.as_str()) {
                continue;
            }
            if next == Some('(') {
                if FUNCTIONS.contains(&word.as_str()) {
                    continue;
                }
                return Err(format!("unknown function `{word}()`"));
            }
            names.push(word);
        } else {
            i += 1;
        }
    }
    if braces != 0 {
        return Err("unbalanced braces".to_owned());
    }
    Ok(names)
}

/// The Grafana variables (`$name`, `${name}`, `${name:fmt}`) a query uses.
fn variables(query: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut rest = query;
    while let Some(at) = rest.find('$') {
        rest = &rest[at + 1..];
        let name: String = if let Some(braced) = rest.strip_prefix('{') {
            braced
                .split(['}', ':'])
                .next()
                .unwrap_or_default()
                .to_owned()
        } else {
            rest.chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect()
        };
        // `$1` in label_replace is a regex group, not a variable.
        if !name.is_empty() && !name.chars().all(|c| c.is_ascii_digit()) {
            found.push(name);
        }
    }
    found
}

/// The problems of one PromQL expression: unreadable, or naming metrics nobody exports.
fn check_expr(catalog: &Catalog, expr: &str) -> Vec<String> {
    match metric_names(expr) {
        Err(error) => vec![format!("cannot read the query ({error}): {expr}")],
        Ok(names) if names.is_empty() => vec![format!("the query selects no metric: {expr}")],
        Ok(names) => {
            let mut seen = BTreeSet::new();
            names
                .into_iter()
                .filter(|name| seen.insert(name.clone()))
                .filter_map(|name| catalog.problem(&name))
                .collect()
        }
    }
}

// ---- the runbook --------------------------------------------------------------------------

/// GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

fn runbook_anchors() -> BTreeSet<String> {
    let runbook = read(&root().join("docs/runbook.md"));
    let mut in_code = false;
    let mut anchors = BTreeSet::new();
    for line in runbook.lines() {
        if line.trim_start().starts_with("```") {
            in_code = !in_code;
            continue;
        }
        if in_code {
            continue;
        }
        let hashes = line.chars().take_while(|c| *c == '#').count();
        if (1..=6).contains(&hashes) && line[hashes..].starts_with(' ') {
            anchors.insert(anchor(&line[hashes..]));
        }
    }
    anchors
}

// ---- dashboards ---------------------------------------------------------------------------

fn json_str<'a>(value: &'a serde_json::Value, key: &str) -> &'a str {
    value.get(key).and_then(|v| v.as_str()).unwrap_or("")
}

/// Every panel, also those inside collapsed rows.
fn panels(value: &serde_json::Value) -> Vec<&serde_json::Value> {
    let mut all = Vec::new();
    for panel in value
        .get("panels")
        .and_then(|p| p.as_array())
        .into_iter()
        .flatten()
    {
        all.push(panel);
        all.extend(panels(panel));
    }
    all
}

fn datasource_is_the_variable(value: Option<&serde_json::Value>) -> bool {
    match value {
        Some(serde_json::Value::String(name)) => name == "$datasource" || name == "${datasource}",
        Some(object) => {
            let uid = json_str(object, "uid");
            uid == "$datasource" || uid == "${datasource}"
        }
        None => false,
    }
}

fn check_dashboard(catalog: &Catalog, file: &str, text: &str) -> Vec<String> {
    let mut problems = Vec::new();
    let dashboard: serde_json::Value = match serde_json::from_str(text) {
        Ok(value) => value,
        Err(error) => return vec![format!("{file}: not JSON: {error}")],
    };
    if json_str(&dashboard, "title").is_empty() || json_str(&dashboard, "uid").is_empty() {
        problems.push(format!("{file}: the dashboard needs a title and a uid"));
    }

    let templating: Vec<&serde_json::Value> = dashboard
        .pointer("/templating/list")
        .and_then(|l| l.as_array())
        .into_iter()
        .flatten()
        .collect();
    let mut defined: BTreeSet<String> = GRAFANA_VARIABLES.iter().map(|v| v.to_string()).collect();
    let mut has_datasource = false;
    for variable in &templating {
        let name = json_str(variable, "name");
        defined.insert(name.to_owned());
        if json_str(variable, "type") == "datasource" {
            has_datasource |= name == "datasource" && json_str(variable, "query") == "prometheus";
            continue;
        }
        if json_str(variable, "type") != "query" {
            continue;
        }
        if !datasource_is_the_variable(variable.get("datasource")) {
            problems.push(format!(
                "{file}: variable `{name}` must query the `${{datasource}}` variable"
            ));
        }
        let query = match variable.get("query") {
            Some(serde_json::Value::String(q)) => q.clone(),
            Some(object) => json_str(object, "query").to_owned(),
            None => String::new(),
        };
        // label_values(selector, label) · label_values(label) · query_result(expr) · metrics(re)
        let selector = if let Some(args) = query
            .strip_prefix("label_values(")
            .and_then(|q| q.strip_suffix(')'))
        {
            args.rsplit_once(',')
                .map(|(selector, _)| selector.to_owned())
        } else {
            query
                .strip_prefix("query_result(")
                .and_then(|q| q.strip_suffix(')'))
                .map(str::to_owned)
        };
        if let Some(selector) = selector {
            for problem in check_expr(catalog, &selector) {
                problems.push(format!("{file}: variable `{name}`: {problem}"));
            }
        }
    }
    if !has_datasource {
        problems.push(format!(
            "{file}: no `datasource` variable of type datasource (query: prometheus): the \
             dashboard cannot be imported into another Grafana"
        ));
    }

    let all = panels(&dashboard);
    let mut queried = 0;
    for panel in &all {
        let kind = json_str(panel, "type");
        if kind == "row" || kind == "text" {
            continue;
        }
        let title = json_str(panel, "title");
        let targets = panel
            .get("targets")
            .and_then(|t| t.as_array())
            .cloned()
            .unwrap_or_default();
        if targets.is_empty() {
            problems.push(format!("{file}: panel \"{title}\" has no targets"));
            continue;
        }
        if !datasource_is_the_variable(panel.get("datasource")) {
            problems.push(format!(
                "{file}: panel \"{title}\" must use the `${{datasource}}` variable as its datasource"
            ));
        }
        for target in &targets {
            let expr = json_str(target, "expr");
            let ref_id = json_str(target, "refId");
            if expr.trim().is_empty() {
                problems.push(format!(
                    "{file}: panel \"{title}\" target {ref_id} has no expr"
                ));
                continue;
            }
            queried += 1;
            for variable in variables(expr) {
                if !defined.contains(&variable) {
                    problems.push(format!(
                        "{file}: panel \"{title}\" target {ref_id}: `${variable}` is not a variable of the dashboard"
                    ));
                }
            }
            for problem in check_expr(catalog, expr) {
                problems.push(format!(
                    "{file}: panel \"{title}\" target {ref_id}: {problem}"
                ));
            }
        }
    }
    if queried == 0 {
        problems.push(format!("{file}: no panel with a query"));
    }
    problems
}

// ---- alert rules --------------------------------------------------------------------------

fn yaml_str<'a>(value: &'a Yaml, key: &str) -> Option<&'a str> {
    value[key].as_str()
}

fn is_duration(text: &str) -> bool {
    let mut rest = text;
    if rest.is_empty() {
        return false;
    }
    while !rest.is_empty() {
        let digits = rest.chars().take_while(char::is_ascii_digit).count();
        if digits == 0 {
            return false;
        }
        rest = &rest[digits..];
        let Some(unit) = ["ms", "s", "m", "h", "d", "w", "y"]
            .into_iter()
            .find(|unit| rest.starts_with(unit))
        else {
            return false;
        };
        rest = &rest[unit.len()..];
    }
    true
}

fn check_rules(
    catalog: &Catalog,
    anchors: &BTreeSet<String>,
    alerts_seen: &mut BTreeSet<String>,
    file: &str,
    text: &str,
) -> Vec<String> {
    let mut problems = Vec::new();
    let documents = match YamlLoader::load_from_str(text) {
        Ok(documents) => documents,
        Err(error) => return vec![format!("{file}: not YAML: {error}")],
    };
    let mut rules_seen = 0;
    for document in &documents {
        // A rule file (`groups:`) or a PrometheusRule (`spec: { groups: }`).
        let groups = if document["groups"].is_badvalue() {
            &document["spec"]["groups"]
        } else {
            &document["groups"]
        };
        let Some(groups) = groups.as_vec() else {
            problems.push(format!("{file}: no `groups:` list"));
            continue;
        };
        for group in groups {
            let group_name = yaml_str(group, "name").unwrap_or("");
            if group_name.is_empty() {
                problems.push(format!("{file}: a group has no name"));
            }
            let Some(rules) = group["rules"].as_vec() else {
                problems.push(format!("{file}: group {group_name} has no `rules:` list"));
                continue;
            };
            for (index, rule) in rules.iter().enumerate() {
                rules_seen += 1;
                let Some(alert) = yaml_str(rule, "alert") else {
                    problems.push(format!(
                        "{file}: group {group_name}, rule #{}: no `alert:` name",
                        index + 1
                    ));
                    continue;
                };
                let at = format!("{file}: alert {alert}");
                if !alerts_seen.insert(alert.to_owned()) {
                    problems.push(format!("{at}: the name is used twice"));
                }
                match yaml_str(rule, "expr") {
                    Some(expr) => {
                        for problem in check_expr(catalog, expr) {
                            problems.push(format!("{at}: {problem}"));
                        }
                    }
                    None => problems.push(format!("{at}: no `expr:`")),
                }
                match yaml_str(rule, "for") {
                    Some(duration) if is_duration(duration) => {}
                    Some(duration) => problems.push(format!(
                        "{at}: `for: {duration}` is not a Prometheus duration"
                    )),
                    None => problems.push(format!("{at}: no `for:`")),
                }
                match yaml_str(&rule["labels"], "severity") {
                    Some("critical" | "warning" | "info") => {}
                    Some(other) => problems.push(format!(
                        "{at}: severity {other:?} (critical, warning or info)"
                    )),
                    None => problems.push(format!("{at}: no `labels.severity`")),
                }
                let annotations = &rule["annotations"];
                for key in ["summary", "description"] {
                    if yaml_str(annotations, key).is_none_or(|text| text.trim().is_empty()) {
                        problems.push(format!("{at}: no `annotations.{key}`"));
                    }
                }
                let link = yaml_str(annotations, "runbook_url")
                    .or_else(|| yaml_str(annotations, "runbook"));
                match link.and_then(|link| link.split_once("docs/runbook.md#")) {
                    Some((_, target)) if anchors.contains(target) => {}
                    Some((_, target)) => problems.push(format!(
                        "{at}: the runbook link's anchor #{target} is not a heading of docs/runbook.md"
                    )),
                    None => problems.push(format!(
                        "{at}: `annotations.runbook_url` must link to a section of docs/runbook.md (…docs/runbook.md#anchor)"
                    )),
                }
            }
        }
    }
    if rules_seen == 0 {
        problems.push(format!("{file}: no rules"));
    }
    problems
}

/// The input series of promtool's rule tests must be series the services export.
fn check_promtool_series(catalog: &Catalog, file: &str, text: &str) -> Vec<String> {
    let documents = match YamlLoader::load_from_str(text) {
        Ok(documents) => documents,
        Err(error) => return vec![format!("{file}: not YAML: {error}")],
    };
    let mut problems = Vec::new();
    for test in documents
        .iter()
        .flat_map(|d| d["tests"].as_vec().cloned().unwrap_or_default())
    {
        let name = yaml_str(&test, "name").unwrap_or("(unnamed)").to_owned();
        for series in test["input_series"].as_vec().into_iter().flatten() {
            let selector = yaml_str(series, "series").unwrap_or("");
            for problem in check_expr(catalog, selector) {
                problems.push(format!("{file}: test {name:?}: {problem}"));
            }
        }
    }
    problems
}

// ---- the tests ----------------------------------------------------------------------------

fn report(problems: &[String]) -> String {
    let mut text = String::new();
    for problem in problems {
        let _ = writeln!(text, "  - {problem}");
    }
    text
}

#[test]
fn dashboards_and_alerts_query_only_exported_metrics() {
    let catalog = exported();
    let root = root();
    let mut problems = Vec::new();

    let dashboards = files(&root.join("infra/grafana"), &[".json"], &[]);
    assert!(!dashboards.is_empty(), "no dashboard in infra/grafana/");
    let mut uids = BTreeMap::new();
    for path in &dashboards {
        let file = relative(path);
        let text = read(path);
        problems.extend(check_dashboard(&catalog, &file, &text));
        if let Ok(value) = serde_json::from_str::<serde_json::Value>(&text) {
            let uid = json_str(&value, "uid").to_owned();
            if let Some(other) = uids.insert(uid.clone(), file.clone()) {
                problems.push(format!("{file}: uid {uid:?} is also {other}'s"));
            }
        }
    }

    // infra/prometheus/tests/ holds promtool's unit tests of the rules, not rules.
    let rule_files = files(
        &root.join("infra/prometheus"),
        &[".yaml", ".yml"],
        &["tests"],
    );
    assert!(!rule_files.is_empty(), "no rule file in infra/prometheus/");
    let anchors = runbook_anchors();
    let mut alerts = BTreeSet::new();
    for path in &rule_files {
        problems.extend(check_rules(
            &catalog,
            &anchors,
            &mut alerts,
            &relative(path),
            &read(path),
        ));
    }

    // The promtool tests feed series named like the real ones.
    for path in files(
        &root.join("infra/prometheus/tests"),
        &[".yaml", ".yml"],
        &[],
    ) {
        problems.extend(check_promtool_series(
            &catalog,
            &relative(&path),
            &read(&path),
        ));
    }

    assert!(
        problems.is_empty(),
        "{} problem(s) in the dashboards and alert rules:\n{}",
        problems.len(),
        report(&problems)
    );
}

// ---- the checker itself -------------------------------------------------------------------

fn sample_catalog() -> Catalog {
    let mut metrics = BTreeMap::new();
    scan_macros(
        r#"
        metrics::counter!("relance_grpc_requests_total", "rpc" => rpc, "code" => code).increment(1);
        metrics::histogram!("relance_grpc_request_duration_seconds", "rpc" => rpc)
            .record(elapsed);
        metrics::gauge!(
            "relance_queue_depth", "queue" => queue
        ).set(depth);
        metrics::histogram!("relance_report_rows").record(rows);
        // metrics::counter!("relance_commented_out_total")
        "#,
        "sample.rs",
        &mut metrics,
        &mut Vec::new(),
    );
    let matchers =
        scan_matchers(r#".set_buckets_for_metric(Matcher::Suffix("_seconds".into()), B)"#);
    Catalog::new(metrics, &matchers)
}

#[test]
fn the_scanner_reads_macro_names_and_refuses_names_it_cannot_see() {
    let catalog = sample_catalog();
    let names: Vec<&str> = catalog.metrics.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        [
            "relance_grpc_request_duration_seconds",
            "relance_grpc_requests_total",
            "relance_queue_depth",
            "relance_report_rows",
        ]
    );
    // `_seconds` histograms have buckets; the other one is a summary.
    assert!(
        catalog
            .problem("relance_grpc_request_duration_seconds_bucket")
            .is_none()
    );
    assert!(catalog.problem("relance_report_rows").is_none());
    assert!(catalog.problem("relance_report_rows_bucket").is_some());

    let mut errors = Vec::new();
    scan_macros(
        "metrics::counter!(NAME).increment(1);",
        "consts.rs",
        &mut BTreeMap::new(),
        &mut errors,
    );
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(errors[0].starts_with("consts.rs:1:"), "{errors:?}");
}

#[test]
fn the_tokenizer_finds_the_metrics_of_a_query() {
    let expr = r#"
        histogram_quantile(0.99, sum by (le, rpc) (
          rate(relance_grpc_request_duration_seconds_bucket{rpc=~"Recommendations/.*", job=~"$job"}[$__rate_interval])
        )) > 0.005
        and on (rpc) sum without (code) (rate(relance_grpc_requests_total{code!="OK"}[5m] offset 1h)) > 1e-3
        or label_replace(relance_queue_depth, "service", "$1", "queue", "([^.]+)\\..*")  # a comment naming fake_metric
        unless max_over_time(up[10m:1m]) == bool 0 * group_left(instance) vector(1)
    "#;
    assert_eq!(
        metric_names(expr),
        Ok(vec![
            "relance_grpc_request_duration_seconds_bucket".to_owned(),
            "relance_grpc_requests_total".to_owned(),
            "relance_queue_depth".to_owned(),
            "up".to_owned(),
        ])
    );
    assert_eq!(variables(expr), ["job", "__rate_interval"]);
    assert!(check_expr(&sample_catalog(), expr).is_empty());
}

#[test]
fn a_misspelled_metric_or_function_fails_with_its_name() {
    let catalog = sample_catalog();
    let problems = check_expr(
        &catalog,
        r#"sum by (rpc) (rate(relance_grpc_request_total{code="INTERNAL"}[5m]))"#,
    );
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(
        problems[0].contains("`relance_grpc_request_total` is not exported")
            && problems[0].contains("did you mean `relance_grpc_requests_total`"),
        "{problems:?}"
    );

    let problems = check_expr(
        &catalog,
        "histogram_quantle(0.99, rate(relance_grpc_request_duration_seconds_bucket[5m]))",
    );
    assert!(
        problems.len() == 1 && problems[0].contains("unknown function `histogram_quantle()`"),
        "{problems:?}"
    );

    // A histogram is only there as _bucket/_sum/_count; a counter has no _bucket.
    let problems = check_expr(&catalog, "rate(relance_grpc_request_duration_seconds[5m])");
    assert!(problems[0].contains("is a histogram"), "{problems:?}");
    let problems = check_expr(&catalog, "rate(relance_grpc_requests_total_bucket[5m])");
    assert!(
        problems[0].contains("has no `_bucket` series"),
        "{problems:?}"
    );
}

#[test]
fn a_dashboard_or_rule_with_an_unknown_metric_is_reported_with_its_panel_or_alert() {
    let catalog = sample_catalog();
    let dashboard = r#"{
      "title": "t", "uid": "u",
      "templating": {"list": [
        {"name": "datasource", "type": "datasource", "query": "prometheus"},
        {"name": "job", "type": "query", "datasource": {"uid": "${datasource}"},
         "query": "label_values(relance_grpc_requests_total, job)"}
      ]},
      "panels": [
        {"type": "row", "title": "r", "panels": [
          {"type": "timeseries", "title": "Depth", "datasource": {"uid": "${datasource}"},
           "targets": [{"refId": "A", "expr": "max by (queue) (relance_queue_depht{job=~\"$job\"})"}]}
        ]},
        {"type": "stat", "title": "Rate", "datasource": {"uid": "${datasource}"},
         "targets": [{"refId": "A", "expr": "sum(rate(relance_grpc_requests_total{job=~\"$jbo\"}[5m]))"}]}
      ]
    }"#;
    let problems = check_dashboard(&catalog, "infra/grafana/x.json", dashboard);
    assert_eq!(problems.len(), 2, "{problems:#?}");
    assert!(problems[0].starts_with(
        "infra/grafana/x.json: panel \"Depth\" target A: `relance_queue_depht` is not exported"
    ));
    assert!(problems[1].contains("panel \"Rate\" target A: `$jbo` is not a variable"));

    let rules = r#"
groups:
  - name: g
    rules:
      - alert: QueueGrowing
        expr: max by (queue) (deriv(relance_queue_depth[10m])) > 0
        for: 10m
        labels: { severity: warning }
        annotations:
          summary: s
          description: d
          runbook_url: https://example.org/docs/runbook.md#queuegrowing
      - alert: Misspelled
        expr: sum(rate(relance_grpc_requests_totl[5m])) > 0
        for: 5 minutes
        labels: { severity: page }
        annotations:
          summary: s
          runbook_url: docs/runbook.md#nowhere
"#;
    let anchors: BTreeSet<String> = ["queuegrowing".to_owned()].into();
    let problems = check_rules(
        &catalog,
        &anchors,
        &mut BTreeSet::new(),
        "infra/prometheus/r.yaml",
        rules,
    );
    let expected = [
        "infra/prometheus/r.yaml: alert Misspelled: `relance_grpc_requests_totl` is not exported",
        "infra/prometheus/r.yaml: alert Misspelled: `for: 5 minutes` is not a Prometheus duration",
        "infra/prometheus/r.yaml: alert Misspelled: severity \"page\"",
        "infra/prometheus/r.yaml: alert Misspelled: no `annotations.description`",
        "infra/prometheus/r.yaml: alert Misspelled: the runbook link's anchor #nowhere",
    ];
    assert_eq!(problems.len(), expected.len(), "{problems:#?}");
    for (problem, start) in problems.iter().zip(expected) {
        assert!(
            problem.starts_with(start),
            "{problem:?} should start with {start:?}"
        );
    }
}

#[test]
fn runbook_anchors_follow_github() {
    assert_eq!(anchor(" RelanceTargetDown"), "relancetargetdown");
    assert_eq!(
        anchor("Queue depth: growing (10 min)"),
        "queue-depth-growing-10-min"
    );
}
