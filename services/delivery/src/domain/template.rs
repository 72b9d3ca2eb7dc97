//! Message templates: validation at save time, and rendering at send time.
//!
//! A template is checked whole when it is saved: every Liquid string of every variant is
//! parsed, then rendered against the template's `sample_data`, and every problem found is
//! returned at once with the path of the field at fault, so a CRM team fixes a template in
//! one round instead of one error per save. What is parsed is kept ([`CompiledTemplate`]),
//! so sending never parses again: a render only converts the customer's data once and runs
//! the parsed templates.
//!
//! Rendering is lenient about missing data the way Shopify's Liquid is: a customer without a
//! `first_name` renders `{{ customer.first_name }}` as empty (and `| default: "there"` as
//! `there`) instead of failing the message. Syntax errors and unknown filters cannot reach
//! send time: they are refused at save.

use std::collections::BTreeMap;
use std::sync::LazyLock;

use liquid_core::error::ResultLiquidExt as _;
use liquid_core::model::{
    ArrayView, DisplayCow, KString, KStringCow, KStringRef, ObjectView, ScalarCow, State, Value,
    ValueCow, ValueView,
};
use liquid_core::parser::{FilterArguments, FilterReflection, Tag, TryMatchToken};
use liquid_core::runtime::{PartialStore, Registers, RuntimeBuilder};
use liquid_core::{
    BlockReflection, Expression, Filter, Language, ParseBlock, ParseFilter, Renderable, Runtime,
    TagBlock, TagTokenIter,
};
use relance_proto::v1::{
    Channel, EmailContent, InAppContent, MessageContent, PushContent, SmsContent, Template,
    TemplateError, TemplateVariant, TextDirection, WebhookContent, WhatsAppContent,
};

use super::html;

/// Limits of the API, as documented in `delivery.proto`.
const MAX_NAME: usize = 64;
const MAX_DESCRIPTION: usize = 1000;
const MAX_VARIANTS: usize = 20;
const MAX_DATA_ENTRIES: usize = 50;
const MAX_WEBHOOK_HEADERS: usize = 20;
const MAX_EXPIRES_AFTER_SECONDS: i64 = 365 * 24 * 3600;
const MAX_PRODUCTS: u32 = 12;
const MAX_PRODUCTS_TIMEOUT_NANOS: i128 = 1_000_000_000;
const MAX_SAMPLE_DATA_BYTES: usize = 32 * 1024;
const MAX_PUSH_TITLE: usize = 100;
const MAX_PUSH_BODY: usize = 1000;
const MAX_EMAIL_SUBJECT: usize = 200;
const MAX_SMS_BODY: usize = 1600;
const MAX_IN_APP_TITLE: usize = 200;
const MAX_IN_APP_BODY: usize = 4000;
/// Most loop turns one render of one field may take, every `for` and `tablerow` together (an
/// inner loop counts again at each turn of its outer one). Without a bound,
/// `{% for i in (1..2000000000) %}` (whose range liquid builds in memory first) or a few
/// nested loops would hold the service, at save time and at every send.
const MAX_LOOP_TURNS: i128 = 10_000;
/// Most bytes one render of one field may write.
const MAX_RENDERED_BYTES: usize = 1024 * 1024;
/// Largest value `assign` or `capture` may hold: `{% assign s = s | append: s %}` doubles a
/// string at each step.
const MAX_ASSIGNED_BYTES: usize = 64 * 1024;

/// The channels in the order [`CompiledTemplate::channels`] lists them.
const CHANNELS: [Channel; 6] = [
    Channel::Push,
    Channel::Email,
    Channel::Sms,
    Channel::Whatsapp,
    Channel::InApp,
    Channel::Webhook,
];

/// Checks a template name: 1 to 64 characters, lowercase ASCII letters, digits and `-`,
/// starting with a letter (names appear in URLs, logs and flow documents).
pub fn validate_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("is required".to_string());
    }
    if name.len() > MAX_NAME {
        return Err(format!("is {} characters, at most {MAX_NAME}", name.len()));
    }
    if !name.starts_with(|c: char| c.is_ascii_lowercase()) {
        return Err("must start with a lowercase letter".to_string());
    }
    for c in name.chars() {
        if !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-') {
            return Err(format!(
                "may only hold lowercase letters, digits and \"-\", not {c:?}"
            ));
        }
    }
    Ok(())
}

/// Checks a BCP 47 locale tag, in the subset customers' devices send: a 2- or 3-letter
/// language, then optional script (4 letters), region (2 letters or 3 digits) and variant
/// (5 to 8 letters or digits) subtags, separated by `-`.
fn validate_locale(locale: &str) -> Result<(), String> {
    if locale.is_empty() {
        return Err("is required".to_string());
    }
    if locale.len() > 35 {
        return Err(format!("{locale:?} is not a BCP 47 locale (too long)"));
    }
    let mut subtags = locale.split('-');
    let language = subtags.next().unwrap_or_default();
    if !(2..=3).contains(&language.len()) || !language.bytes().all(|b| b.is_ascii_alphabetic()) {
        return Err(format!(
            "{locale:?} is not a BCP 47 locale (e.g. \"fr\", \"ar\", \"en-US\")"
        ));
    }
    for subtag in subtags {
        let letters = subtag.bytes().all(|b| b.is_ascii_alphabetic());
        let digits = subtag.bytes().all(|b| b.is_ascii_digit());
        let alphanumeric = subtag.bytes().all(|b| b.is_ascii_alphanumeric());
        // Script (`Hant`) or region (`DZ`), region as digits (`419`), variant (`valencia`,
        // `1996`).
        let valid = ((subtag.len() == 2 || subtag.len() == 4) && letters)
            || (subtag.len() == 3 && digits)
            || ((5..=8).contains(&subtag.len()) && alphanumeric)
            || (subtag.len() == 4
                && alphanumeric
                && subtag.starts_with(|c: char| c.is_ascii_digit()));
        if !valid {
            return Err(format!(
                "{locale:?} is not a BCP 47 locale (subtag {subtag:?})"
            ));
        }
    }
    Ok(())
}

/// A locale compared without case and with `_` taken as `-` (`en_US` from some devices).
fn normalize_locale(locale: &str) -> String {
    locale.trim().replace('_', "-").to_ascii_lowercase()
}

/// The language subtag of a (normalized) locale: `fr` of `fr-dz`.
fn language_of(locale: &str) -> &str {
    locale.split('-').next().unwrap_or_default()
}

/// The writing direction of a locale: right-to-left for Arabic, Hebrew, Persian and Urdu,
/// left-to-right otherwise.
pub fn direction_of_locale(locale: &str) -> TextDirection {
    let locale = normalize_locale(locale);
    match language_of(&locale) {
        "ar" | "he" | "iw" | "fa" | "ur" => TextDirection::Rtl,
        _ => TextDirection::Ltr,
    }
}

/// The data a template is rendered with.
#[derive(Debug, Clone, Copy)]
pub struct RenderInput<'a> {
    /// The customer's profile, as `customer`.
    pub customer: &'a serde_json::Value,
    /// The send's data, as `data`.
    pub data: &'a serde_json::Value,
    /// The recommended products, as `products` (a JSON array).
    pub products: &'a serde_json::Value,
}

/// Liquid's standard tags, blocks and filters, registered once (as `liquid::ParserBuilder`
/// does; the engine is used directly so that rendering can use [`LenientRuntime`]).
static LANGUAGE: LazyLock<Language> = LazyLock::new(standard_language);

fn standard_language() -> Language {
    use liquid_lib::stdlib;
    let mut language = Language::empty();
    let tags: Vec<Box<dyn liquid_core::ParseTag>> = vec![
        Box::new(stdlib::AssignTag),
        Box::new(stdlib::BreakTag),
        Box::new(stdlib::ContinueTag),
        Box::new(stdlib::CycleTag),
        Box::new(stdlib::IncludeTag),
        Box::new(stdlib::IncrementTag),
        Box::new(stdlib::DecrementTag),
        Box::new(stdlib::RenderTag),
    ];
    for tag in tags {
        language
            .tags
            .register(tag.reflection().tag().to_owned(), tag);
    }
    let blocks: Vec<Box<dyn liquid_core::ParseBlock>> = vec![
        Box::new(stdlib::RawBlock),
        Box::new(stdlib::IfBlock),
        Box::new(stdlib::UnlessBlock),
        Box::new(stdlib::IfChangedBlock),
        Box::new(BoundedLoop {
            block: stdlib::ForBlock,
            attributes: &["limit", "offset"],
            flags: &["reversed"],
            expected: "\"limit\", \"offset\" or \"reversed\" expected.",
        }),
        Box::new(BoundedLoop {
            block: stdlib::TableRowBlock,
            attributes: &["cols", "limit", "offset"],
            flags: &[],
            expected: "\"cols\", \"limit\" or \"offset\" expected.",
        }),
        Box::new(stdlib::CommentBlock),
        Box::new(BoundedCapture),
        Box::new(stdlib::CaseBlock),
    ];
    for block in blocks {
        language
            .blocks
            .register(block.reflection().start_tag().to_owned(), block);
    }
    let filters: Vec<Box<dyn liquid_core::ParseFilter>> = vec![
        Box::new(stdlib::Abs),
        Box::new(stdlib::Append),
        Box::new(stdlib::AtLeast),
        Box::new(stdlib::AtMost),
        Box::new(stdlib::Capitalize),
        Box::new(stdlib::Ceil),
        Box::new(stdlib::Compact),
        Box::new(stdlib::Concat),
        Box::new(stdlib::Date),
        Box::new(stdlib::Default),
        Box::new(stdlib::DividedBy),
        Box::new(stdlib::Downcase),
        Box::new(stdlib::Escape),
        Box::new(stdlib::EscapeOnce),
        Box::new(stdlib::First),
        Box::new(stdlib::Floor),
        Box::new(SizedFilter {
            filter: stdlib::Join,
            growth: Growth::Join,
        }),
        Box::new(stdlib::Last),
        Box::new(stdlib::Lstrip),
        Box::new(stdlib::Map),
        Box::new(stdlib::Minus),
        Box::new(stdlib::Modulo),
        Box::new(stdlib::NewlineToBr),
        Box::new(stdlib::Plus),
        Box::new(stdlib::Prepend),
        Box::new(stdlib::Remove),
        Box::new(stdlib::RemoveFirst),
        Box::new(SizedFilter {
            filter: stdlib::Replace,
            growth: Growth::Replace,
        }),
        Box::new(stdlib::ReplaceFirst),
        Box::new(stdlib::Reverse),
        Box::new(stdlib::Round),
        Box::new(stdlib::Rstrip),
        Box::new(stdlib::Size),
        Box::new(stdlib::Slice),
        Box::new(stdlib::Sort),
        Box::new(stdlib::SortNatural),
        Box::new(stdlib::Split),
        Box::new(stdlib::Strip),
        Box::new(stdlib::StripHtml),
        Box::new(stdlib::StripNewlines),
        Box::new(stdlib::Times),
        Box::new(stdlib::Truncate),
        Box::new(stdlib::TruncateWords),
        Box::new(stdlib::Uniq),
        Box::new(stdlib::Upcase),
        Box::new(stdlib::UrlDecode),
        Box::new(stdlib::UrlEncode),
        Box::new(stdlib::Where),
    ];
    for filter in filters {
        language
            .filters
            .register(filter.reflection().name().to_owned(), filter);
    }
    language
}

/// The root of every render: variables assigned by the template first (they live in the
/// parent's global frame), then the data, where every lookup succeeds (see [`Data`]).
///
/// liquid's own root frame copies whatever it finds into a plain value, so a list iterated
/// with `{% for %}` would lose [`Data`]'s leniency for its items; this frame lends the data
/// out instead, so `{% for item in data.items %}{{ item.image_url }}{% endfor %}` renders
/// empty for an item without an image, as on Shopify.
///
/// It also keeps what a template assigns under [`MAX_ASSIGNED_BYTES`]: a larger value is
/// stored as nil and noted in `oversized`, which fails the render once it ends.
struct LenientRuntime<'a, P> {
    parent: P,
    data: &'a Data,
    oversized: std::cell::Cell<bool>,
}

impl<P: Runtime> Runtime for LenientRuntime<'_, P> {
    fn partials(&self) -> &dyn PartialStore {
        self.parent.partials()
    }

    fn name(&self) -> Option<KStringRef<'_>> {
        self.parent.name()
    }

    fn roots(&self) -> std::collections::BTreeSet<KStringCow<'_>> {
        let mut roots = self.parent.roots();
        roots.extend(ObjectView::keys(self.data));
        roots
    }

    fn try_get(&self, path: &[ScalarCow<'_>]) -> Option<ValueCow<'_>> {
        if let Some(value) = self.parent.try_get(path) {
            return Some(value);
        }
        liquid_core::model::try_find(self.data, path)
    }

    fn get(&self, path: &[ScalarCow<'_>]) -> liquid_core::Result<ValueCow<'_>> {
        // What cannot be found (even a key of a string) is nil, never an error.
        Ok(self.try_get(path).unwrap_or(ValueCow::Owned(Value::Nil)))
    }

    fn set_global(&self, name: KString, value: Value) -> Option<Value> {
        if !fits(&value, MAX_ASSIGNED_BYTES) {
            self.oversized.set(true);
            return self.parent.set_global(name, Value::Nil);
        }
        self.parent.set_global(name, value)
    }

    fn set_index(&self, name: KString, value: Value) -> Option<Value> {
        self.parent.set_index(name, value)
    }

    fn get_index<'a>(&'a self, name: &str) -> Option<ValueCow<'a>> {
        self.parent.get_index(name)
    }

    fn registers(&self) -> &Registers {
        self.parent.registers()
    }
}

/// One string field, parsed.
enum Text {
    /// No Liquid markup at all: copied as is, without running the engine.
    Plain(String),
    /// Parsed Liquid.
    Liquid(liquid_core::Template),
}

impl Text {
    fn render(&self, globals: &Data) -> Result<String, liquid_core::Error> {
        match self {
            Text::Plain(text) => Ok(text.clone()),
            Text::Liquid(template) => {
                let runtime = LenientRuntime {
                    parent: RuntimeBuilder::new().build(),
                    data: globals,
                    oversized: std::cell::Cell::new(false),
                };
                let mut out = Limited::new(MAX_RENDERED_BYTES);
                let rendered = template.render_to(&mut out, &runtime);
                if out.exceeded {
                    return Err(liquid_core::Error::with_msg(format!(
                        "renders to more than {} KiB",
                        MAX_RENDERED_BYTES / 1024
                    )));
                }
                if runtime.oversized.get() {
                    return Err(liquid_core::Error::with_msg(format!(
                        "assigns or captures a value of more than {} KiB",
                        MAX_ASSIGNED_BYTES / 1024
                    )));
                }
                rendered?;
                String::from_utf8(out.bytes)
                    .map_err(|_| liquid_core::Error::with_msg("renders invalid UTF-8"))
            }
        }
    }
}

/// A render's output, refusing to grow past a size (the render then fails on its next write).
struct Limited {
    bytes: Vec<u8>,
    max: usize,
    exceeded: bool,
}

impl Limited {
    fn new(max: usize) -> Limited {
        Limited {
            bytes: Vec::new(),
            max,
            exceeded: false,
        }
    }
}

impl std::io::Write for Limited {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.bytes.len() + buf.len() > self.max {
            self.exceeded = true;
            return Err(std::io::Error::other("the rendered text is too long"));
        }
        self.bytes.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Whether a value's text is at most `max` bytes (lists and objects: all their items).
fn fits(value: &dyn ValueView, max: usize) -> bool {
    fn size(value: &dyn ValueView, budget: &mut usize) -> bool {
        if let Some(array) = value.as_array() {
            array.values().all(|item| size(item, budget))
        } else if let Some(object) = value.as_object() {
            object.iter().all(|(key, item)| {
                *budget = budget.saturating_sub(key.len());
                *budget > 0 && size(item, budget)
            })
        } else {
            let length = value.to_kstr().len();
            match budget.checked_sub(length) {
                Some(left) => {
                    *budget = left;
                    true
                }
                None => false,
            }
        }
    }
    let mut budget = max;
    size(value, &mut budget)
}

/// `for` or `tablerow` that first counts its turns against the render's [`LoopBudget`]: over
/// [`MAX_LOOP_TURNS`], the render fails before liquid builds the range or runs the loop.
///
/// The block's head (`item in (1..n) limit: 3`) is read here as liquid reads it, with the
/// same errors at the same positions, then handed to liquid's own block as a copy.
#[derive(Clone)]
struct BoundedLoop<B> {
    block: B,
    /// Parameters taking a value (`limit: 3`).
    attributes: &'static [&'static str],
    /// Parameters alone (`reversed`).
    flags: &'static [&'static str],
    /// The error for anything else.
    expected: &'static str,
}

impl<B: ParseBlock + Clone + 'static> ParseBlock for BoundedLoop<B> {
    fn parse(
        &self,
        mut arguments: TagTokenIter<'_>,
        block: TagBlock<'_, '_>,
        options: &Language,
    ) -> liquid_core::Result<Box<dyn Renderable>> {
        let mut words = Vec::new();
        let variable = arguments.expect_next("Identifier expected.")?;
        words.push(variable.as_str().to_owned());
        variable.expect_identifier().into_result()?;
        let keyword = arguments.expect_next("\"in\" expected.")?;
        words.push(keyword.as_str().to_owned());
        keyword
            .expect_str("in")
            .into_result_custom_msg("\"in\" expected.")?;
        let range = arguments.expect_next("Array or range expected.")?;
        words.push(range.as_str().to_owned());
        let turns = match range.expect_value() {
            TryMatchToken::Matches(collection) => Turns::Collection(collection),
            TryMatchToken::Fails(range) => match range.expect_range() {
                TryMatchToken::Matches((start, stop)) => Turns::Range(start, stop),
                TryMatchToken::Fails(range) => return range.raise_error().into_err(),
            },
        };
        while let Some(parameter) = arguments.next() {
            let name = parameter.as_str().to_owned();
            if self.flags.contains(&name.as_str()) {
                words.push(name);
                continue;
            }
            if !self.attributes.contains(&name.as_str()) {
                return parameter.raise_custom_error(self.expected).into_err();
            }
            arguments
                .expect_next("\":\" expected.")?
                .expect_str(":")
                .into_result_custom_msg("\":\" expected.")?;
            let value = arguments.expect_next("Value expected.")?;
            let text = value.as_str().to_owned();
            value.expect_value().into_result()?;
            words.extend([name, ":".to_owned(), text]);
        }
        let head = format!(
            "{{% {} {} %}}",
            self.block.reflection().start_tag(),
            words.join(" ")
        );
        let inner = self
            .block
            .parse(Tag::new(&head)?.into_tokens(), block, options)?;
        Ok(Box::new(BoundedLoopRender { turns, inner }))
    }

    fn reflection(&self) -> &dyn BlockReflection {
        self.block.reflection()
    }
}

/// What a loop runs over.
#[derive(Debug)]
enum Turns {
    /// `(start..stop)`.
    Range(Expression, Expression),
    /// A list (one turn per item) or an object (one per entry).
    Collection(Expression),
}

impl Turns {
    /// How many turns the loop takes before `limit` and `offset`; 0 when the range or the
    /// collection is not one, which the loop itself then reports.
    fn count(&self, runtime: &dyn Runtime) -> i128 {
        match self {
            Turns::Range(start, stop) => {
                let whole = |bound: &Expression| {
                    let value = bound.evaluate(runtime).ok()?;
                    value.as_scalar()?.to_integer()
                };
                match (whole(start), whole(stop)) {
                    (Some(start), Some(stop)) => (i128::from(stop) - i128::from(start) + 1).max(0),
                    _ => 0,
                }
            }
            Turns::Collection(collection) => match collection.evaluate(runtime) {
                Ok(value) => value
                    .as_array()
                    .map(|array| array.size())
                    .or_else(|| value.as_object().map(|object| object.size()))
                    .map_or(0, i128::from),
                Err(_) => 0,
            },
        }
    }
}

/// Loop turns taken so far in one render.
#[derive(Default)]
struct LoopBudget {
    turns: i128,
}

#[derive(Debug)]
struct BoundedLoopRender {
    turns: Turns,
    inner: Box<dyn Renderable>,
}

impl Renderable for BoundedLoopRender {
    fn render_to(
        &self,
        writer: &mut dyn std::io::Write,
        runtime: &dyn Runtime,
    ) -> liquid_core::Result<()> {
        let turns = self.turns.count(runtime);
        {
            let mut budget = runtime.registers().get_mut::<LoopBudget>();
            budget.turns += turns;
            if budget.turns > MAX_LOOP_TURNS {
                return Err(liquid_core::Error::with_msg(format!(
                    "loops would run more than {MAX_LOOP_TURNS} times"
                )));
            }
        }
        self.inner.render_to(writer, runtime)
    }
}

/// A filter whose result can be many times the size of its input, checked before it runs:
/// over [`MAX_RENDERED_BYTES`], the render fails instead. `replace` turns every match into
/// the replacement, so `| replace: "x", "xx" | replace: "x", "xx" …` doubles at each step;
/// `join` puts the separator between every two items.
#[derive(Clone)]
struct SizedFilter<F> {
    filter: F,
    growth: Growth,
}

#[derive(Clone, Copy, Debug)]
enum Growth {
    /// `replace: search, replacement`.
    Replace,
    /// `join: separator` (a space by default).
    Join,
}

impl<F: ParseFilter + Clone + 'static> ParseFilter for SizedFilter<F> {
    fn parse(&self, arguments: FilterArguments<'_>) -> liquid_core::Result<Box<dyn Filter>> {
        let positional: Vec<Expression> = arguments.positional.collect();
        let inner = self.filter.parse(FilterArguments {
            positional: Box::new(positional.clone().into_iter()),
            keyword: arguments.keyword,
        })?;
        Ok(Box::new(SizedFilterRun {
            growth: self.growth,
            arguments: positional,
            inner,
        }))
    }

    fn reflection(&self) -> &dyn FilterReflection {
        self.filter.reflection()
    }
}

#[derive(Debug)]
struct SizedFilterRun {
    growth: Growth,
    arguments: Vec<Expression>,
    inner: Box<dyn Filter>,
}

impl std::fmt::Display for SizedFilterRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.inner.fmt(f)
    }
}

impl SizedFilterRun {
    /// The size of the result in bytes, as `str::replace` and liquid's `join` make it.
    fn result_size(&self, input: &dyn ValueView, runtime: &dyn Runtime) -> usize {
        let argument = |index: usize, default: &str| -> String {
            self.arguments
                .get(index)
                .and_then(|argument| argument.evaluate(runtime).ok())
                .map_or_else(|| default.to_owned(), |value| value.to_kstr().to_string())
        };
        match self.growth {
            Growth::Replace => {
                let text = input.to_kstr();
                let search = argument(0, "");
                let replacement = argument(1, "");
                let matches = if search.is_empty() {
                    text.chars().count() + 1
                } else {
                    text.matches(search.as_str()).count()
                };
                (text.len() - matches.saturating_mul(search.len()))
                    .saturating_add(matches.saturating_mul(replacement.len()))
            }
            Growth::Join => {
                let Some(items) = input.as_array() else {
                    return 0;
                };
                let separator = argument(0, " ");
                let count = usize::try_from(items.size()).unwrap_or(usize::MAX);
                items
                    .values()
                    .fold(0usize, |size, item| {
                        size.saturating_add(item.to_kstr().len())
                    })
                    .saturating_add(count.saturating_sub(1).saturating_mul(separator.len()))
            }
        }
    }
}

impl Filter for SizedFilterRun {
    fn evaluate(&self, input: &dyn ValueView, runtime: &dyn Runtime) -> liquid_core::Result<Value> {
        if self.result_size(input, runtime) > MAX_RENDERED_BYTES {
            return Err(liquid_core::Error::with_msg(format!(
                "the result would be more than {} KiB",
                MAX_RENDERED_BYTES / 1024
            )));
        }
        self.inner.evaluate(input, runtime)
    }
}

/// `{% capture name %}…{% endcapture %}` as liquid's, but capturing at most
/// [`MAX_ASSIGNED_BYTES`] (a loop inside could otherwise write without end).
#[derive(Clone)]
struct BoundedCapture;

impl BlockReflection for BoundedCapture {
    fn start_tag(&self) -> &str {
        "capture"
    }

    fn end_tag(&self) -> &str {
        "endcapture"
    }

    fn description(&self) -> &str {
        ""
    }
}

impl ParseBlock for BoundedCapture {
    fn parse(
        &self,
        mut arguments: TagTokenIter<'_>,
        mut block: TagBlock<'_, '_>,
        options: &Language,
    ) -> liquid_core::Result<Box<dyn Renderable>> {
        let name: KString = arguments
            .expect_next("Identifier expected")?
            .expect_identifier()
            .into_result()?
            .to_owned()
            .into();
        arguments.expect_nothing()?;
        let template = liquid_core::Template::new(
            block
                .parse_all(options)
                .trace_with(|| format!("{{% capture {name} %}}").into())?,
        );
        block.assert_empty();
        Ok(Box::new(Capture { name, template }))
    }

    fn reflection(&self) -> &dyn BlockReflection {
        self
    }
}

#[derive(Debug)]
struct Capture {
    name: KString,
    template: liquid_core::Template,
}

impl Renderable for Capture {
    fn render_to(
        &self,
        _writer: &mut dyn std::io::Write,
        runtime: &dyn Runtime,
    ) -> liquid_core::Result<()> {
        let mut captured = Limited::new(MAX_ASSIGNED_BYTES);
        let rendered = self.template.render_to(&mut captured, runtime);
        if captured.exceeded {
            return Err(liquid_core::Error::with_msg(format!(
                "captures more than {} KiB",
                MAX_ASSIGNED_BYTES / 1024
            )));
        }
        rendered.trace_with(|| format!("{{% capture {} %}}", self.name).into())?;
        let text = String::from_utf8(captured.bytes)
            .map_err(|_| liquid_core::Error::with_msg("captures invalid UTF-8"))?;
        runtime.set_global(self.name.clone(), Value::scalar(text));
        Ok(())
    }
}

/// A field name and its parsed text (map entries and list items).
type Entries = Vec<(String, Text)>;

struct PushParts {
    title: Text,
    body: Text,
    image_url: Text,
    url: Text,
    data: Entries,
    collapse_key: Text,
}

struct EmailParts {
    subject: Text,
    preheader: Text,
    html: Text,
    text: Text,
    from_name: Text,
    reply_to: Text,
}

struct WhatsAppParts {
    template_name: String,
    language: String,
    header_image_url: Text,
    body_parameters: Vec<Text>,
    button_url_parameters: Vec<Text>,
}

struct InAppParts {
    title: Text,
    body: Text,
    image_url: Text,
    url: Text,
    data: Entries,
    expires_after: Option<prost_types::Duration>,
}

struct WebhookParts {
    body: Text,
    headers: Entries,
}

/// One variant's content, parsed.
#[derive(Default)]
struct Parts {
    push: Option<PushParts>,
    email: Option<EmailParts>,
    sms: Option<Text>,
    whatsapp: Option<WhatsAppParts>,
    in_app: Option<InAppParts>,
    webhook: Option<WebhookParts>,
}

struct CompiledVariant {
    /// The variant's locale, normalized for matching.
    locale: String,
    /// Its direction, explicit or derived from the locale.
    direction: TextDirection,
    /// What error paths start with: `variants[1].content.` or `inline.`.
    prefix: String,
    parts: Parts,
}

/// A validated template with every Liquid string parsed, ready to render many times. It is
/// `Send + Sync` and meant to be shared in an `Arc` (a cache of compiled templates).
pub struct CompiledTemplate {
    template: Template,
    variants: Vec<CompiledVariant>,
    default_variant: usize,
}

impl std::fmt::Debug for CompiledTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CompiledTemplate")
            .field("name", &self.template.name)
            .field("version", &self.template.version)
            .field("variants", &self.variants.len())
            .finish_non_exhaustive()
    }
}

fn error(field: impl Into<String>, reason: impl Into<String>) -> TemplateError {
    TemplateError {
        field: field.into(),
        reason: reason.into(),
        line: 0,
        column: 0,
    }
}

/// Validates a template and parses every Liquid string of it. Every problem is returned,
/// not only the first, each with the path of its field.
pub fn compile(template: &Template) -> Result<CompiledTemplate, Vec<TemplateError>> {
    let mut errors = Vec::new();
    if let Err(reason) = validate_name(&template.name) {
        errors.push(error("name", reason));
    }
    let description = template.description.chars().count();
    if description > MAX_DESCRIPTION {
        errors.push(error(
            "description",
            format!("is {description} characters, at most {MAX_DESCRIPTION}"),
        ));
    }
    if template.variants.is_empty() {
        errors.push(error("variants", "at least one variant is required"));
    } else if template.variants.len() > MAX_VARIANTS {
        errors.push(error(
            "variants",
            format!(
                "{} variants, at most {MAX_VARIANTS}",
                template.variants.len()
            ),
        ));
    }
    let mut default_variant = None;
    let default_locale = normalize_locale(&template.default_locale);
    for (i, variant) in template.variants.iter().enumerate() {
        let field = format!("variants[{i}].locale");
        match validate_locale(&variant.locale) {
            Err(reason) => errors.push(error(field, reason)),
            Ok(()) => {
                let locale = normalize_locale(&variant.locale);
                for (j, earlier) in template.variants[..i].iter().enumerate() {
                    if normalize_locale(&earlier.locale) == locale {
                        errors.push(error(
                            field.clone(),
                            format!(
                                "locale {:?} is repeated (also variants[{j}])",
                                variant.locale
                            ),
                        ));
                        break;
                    }
                }
                if locale == default_locale && default_variant.is_none() {
                    default_variant = Some(i);
                }
            }
        }
    }
    if template.default_locale.is_empty() {
        errors.push(error("default_locale", "is required"));
    } else if default_variant.is_none() && !template.variants.is_empty() {
        errors.push(error(
            "default_locale",
            format!(
                "{:?} is not the locale of any variant",
                template.default_locale
            ),
        ));
    }
    check_products(template, &mut errors);
    let sample = sample_input(template, &mut errors);

    let mut variants = Vec::with_capacity(template.variants.len());
    for (i, variant) in template.variants.iter().enumerate() {
        let prefix = format!("variants[{i}].content.");
        let before = errors.len();
        let parts = compile_content(variant.content.as_ref(), &prefix, &mut errors);
        variants.push(CompiledVariant {
            locale: normalize_locale(&variant.locale),
            direction: variant_direction(variant),
            prefix,
            parts,
        });
        // Rendering a variant that did not parse would only repeat its errors.
        if errors.len() == before
            && let Some(sample) = &sample
        {
            render_sample(&variants[i], sample, &mut errors);
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    Ok(CompiledTemplate {
        template: template.clone(),
        variants,
        default_variant: default_variant.unwrap_or(0),
    })
}

/// Validates inline content (`SendRequest.inline`) like a one-variant template, with error
/// paths starting with `inline.` (e.g. `inline.email.html`). There is no sample data: the
/// content is rendered with empty data, which still surfaces type errors in literals.
pub fn compile_inline(content: &MessageContent) -> Result<CompiledTemplate, Vec<TemplateError>> {
    let mut errors = Vec::new();
    let prefix = "inline.".to_string();
    let parts = compile_content(Some(content), &prefix, &mut errors);
    let variant = CompiledVariant {
        locale: String::new(),
        direction: TextDirection::Ltr,
        prefix,
        parts,
    };
    if errors.is_empty() {
        let empty = SampleData {
            customer: serde_json::json!({}),
            data: serde_json::json!({}),
            products: serde_json::json!([]),
        };
        render_sample(&variant, &empty, &mut errors);
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    Ok(CompiledTemplate {
        template: Template {
            variants: vec![TemplateVariant {
                locale: String::new(),
                direction: TextDirection::Unspecified as i32,
                content: Some(content.clone()),
            }],
            ..Template::default()
        },
        variants: vec![variant],
        default_variant: 0,
    })
}

fn variant_direction(variant: &TemplateVariant) -> TextDirection {
    match TextDirection::try_from(variant.direction) {
        Ok(TextDirection::Ltr) => TextDirection::Ltr,
        Ok(TextDirection::Rtl) => TextDirection::Rtl,
        _ => direction_of_locale(&variant.locale),
    }
}

fn check_products(template: &Template, errors: &mut Vec<TemplateError>) {
    let Some(products) = &template.products else {
        return;
    };
    if products.n > MAX_PRODUCTS {
        errors.push(error(
            "products.n",
            format!("{} products, at most {MAX_PRODUCTS}", products.n),
        ));
    }
    if let Some(timeout) = &products.timeout {
        let nanos = i128::from(timeout.seconds) * 1_000_000_000 + i128::from(timeout.nanos);
        if nanos <= 0 {
            errors.push(error("products.timeout", "must be positive"));
        } else if nanos > MAX_PRODUCTS_TIMEOUT_NANOS {
            errors.push(error("products.timeout", "at most 1 s"));
        }
    }
}

/// The template's sample data split into what the template sees.
struct SampleData {
    customer: serde_json::Value,
    data: serde_json::Value,
    products: serde_json::Value,
}

/// Reads and checks `sample_data`; `None` when it is unusable (its errors are recorded).
fn sample_input(template: &Template, errors: &mut Vec<TemplateError>) -> Option<SampleData> {
    let mut sample = SampleData {
        customer: serde_json::json!({}),
        data: serde_json::json!({}),
        products: serde_json::json!([]),
    };
    let Some(data) = &template.sample_data else {
        return Some(sample);
    };
    let json = relance_proto::convert::struct_to_json(data);
    let size = serde_json::to_string(&json).map(|s| s.len()).unwrap_or(0);
    let before = errors.len();
    if size > MAX_SAMPLE_DATA_BYTES {
        errors.push(error(
            "sample_data",
            format!("is {size} bytes as JSON, at most {MAX_SAMPLE_DATA_BYTES}"),
        ));
    }
    let serde_json::Value::Object(map) = json else {
        return None;
    };
    for (key, value) in map {
        match key.as_str() {
            "customer" | "data" => {
                if !value.is_object() {
                    errors.push(error(format!("sample_data.{key}"), "must be an object"));
                } else if key == "customer" {
                    sample.customer = value;
                } else {
                    sample.data = value;
                }
            }
            "products" => {
                if value.is_array() {
                    sample.products = value;
                } else {
                    errors.push(error("sample_data.products", "must be a list"));
                }
            }
            other => errors.push(error(
                "sample_data",
                format!("unknown key {other:?} (the keys are customer, data and products)"),
            )),
        }
    }
    if errors.len() > before {
        return None;
    }
    Some(sample)
}

/// Renders every channel of a variant with the sample data, recording what fails.
fn render_sample(variant: &CompiledVariant, sample: &SampleData, errors: &mut Vec<TemplateError>) {
    let globals = globals(&RenderInput {
        customer: &sample.customer,
        data: &sample.data,
        products: &sample.products,
    });
    for channel in CHANNELS {
        if !variant.parts.has(channel) {
            continue;
        }
        if let Err(mut found) = render_parts(variant, channel, &globals) {
            errors.append(&mut found);
        }
    }
}

/// Parses the Liquid fields of one variant's content, checking its limits.
fn compile_content(
    content: Option<&MessageContent>,
    prefix: &str,
    errors: &mut Vec<TemplateError>,
) -> Parts {
    let mut parts = Parts::default();
    let Some(content) = content else {
        errors.push(error(
            prefix.trim_end_matches('.'),
            "content for at least one channel is required",
        ));
        return parts;
    };
    let mut compiler = Compiler { prefix, errors };
    if let Some(push) = &content.push {
        parts.push = Some(compiler.push(push));
    }
    if let Some(email) = &content.email {
        parts.email = Some(compiler.email(email));
    }
    if let Some(sms) = &content.sms {
        if sms.body.trim().is_empty() {
            compiler.fail("sms.body", "is required");
        }
        parts.sms = Some(compiler.text("sms.body", &sms.body));
    }
    if let Some(whatsapp) = &content.whatsapp {
        parts.whatsapp = Some(compiler.whatsapp(whatsapp));
    }
    if let Some(in_app) = &content.in_app {
        parts.in_app = Some(compiler.in_app(in_app));
    }
    if let Some(webhook) = &content.webhook {
        parts.webhook = Some(compiler.webhook(webhook));
    }
    if !CHANNELS.iter().any(|channel| parts.has(*channel)) {
        compiler.errors.push(error(
            prefix.trim_end_matches('.'),
            "content for at least one channel is required",
        ));
    }
    parts
}

impl Parts {
    fn has(&self, channel: Channel) -> bool {
        match channel {
            Channel::Push => self.push.is_some(),
            Channel::Email => self.email.is_some(),
            Channel::Sms => self.sms.is_some(),
            Channel::Whatsapp => self.whatsapp.is_some(),
            Channel::InApp => self.in_app.is_some(),
            Channel::Webhook => self.webhook.is_some(),
            Channel::Unspecified => false,
        }
    }
}

/// Parses fields, recording errors under `prefix`.
struct Compiler<'a> {
    prefix: &'a str,
    errors: &'a mut Vec<TemplateError>,
}

impl Compiler<'_> {
    fn fail(&mut self, field: &str, reason: impl Into<String>) {
        self.errors
            .push(error(format!("{}{field}", self.prefix), reason));
    }

    fn text(&mut self, field: &str, source: &str) -> Text {
        if !source.contains("{{") && !source.contains("{%") {
            return Text::Plain(source.to_string());
        }
        if let Some((at, number)) = oversized_integer(source) {
            let (line, column) = position(source, at);
            self.errors.push(TemplateError {
                field: format!("{}{field}", self.prefix),
                reason: format!("the number {number} does not fit in 64 bits"),
                line,
                column,
            });
            return Text::Plain(String::new());
        }
        match liquid_core::parser::parse(source, &LANGUAGE) {
            Ok(elements) => Text::Liquid(liquid_core::Template::new(elements)),
            Err(err) => {
                let (reason, line, column) = describe_parse_error(source, &err);
                self.errors.push(TemplateError {
                    field: format!("{}{field}", self.prefix),
                    reason,
                    line,
                    column,
                });
                Text::Plain(String::new())
            }
        }
    }

    fn entries<'m>(
        &mut self,
        field: &str,
        map: impl Iterator<Item = (&'m String, &'m String)>,
    ) -> Entries {
        let mut entries = Vec::new();
        for (key, value) in map {
            let text = self.text(&format!("{field}[{key:?}]"), value);
            entries.push((key.clone(), text));
        }
        entries
    }

    fn push(&mut self, push: &PushContent) -> PushParts {
        if push.title.trim().is_empty() && push.body.trim().is_empty() {
            self.fail("push", "a title or a body is required");
        }
        if push.data.len() > MAX_DATA_ENTRIES {
            self.fail(
                "push.data",
                format!("{} entries, at most {MAX_DATA_ENTRIES}", push.data.len()),
            );
        }
        // Sorted so that errors and renders come out in a stable order.
        let data: BTreeMap<&String, &String> = push.data.iter().collect();
        PushParts {
            title: self.text("push.title", &push.title),
            body: self.text("push.body", &push.body),
            image_url: self.text("push.image_url", &push.image_url),
            url: self.text("push.url", &push.url),
            data: self.entries("push.data", data.into_iter()),
            collapse_key: self.text("push.collapse_key", &push.collapse_key),
        }
    }

    fn email(&mut self, email: &EmailContent) -> EmailParts {
        if email.subject.trim().is_empty() {
            self.fail("email.subject", "is required");
        }
        if email.html.trim().is_empty() && email.text.trim().is_empty() {
            self.fail("email.html", "an HTML or a text part is required");
        }
        EmailParts {
            subject: self.text("email.subject", &email.subject),
            preheader: self.text("email.preheader", &email.preheader),
            html: self.text("email.html", &email.html),
            text: self.text("email.text", &email.text),
            from_name: self.text("email.from_name", &email.from_name),
            reply_to: self.text("email.reply_to", &email.reply_to),
        }
    }

    fn whatsapp(&mut self, whatsapp: &WhatsAppContent) -> WhatsAppParts {
        if whatsapp.template_name.trim().is_empty() {
            self.fail(
                "whatsapp.template_name",
                "is required (the name of a template approved by Meta)",
            );
        }
        let mut body_parameters = Vec::with_capacity(whatsapp.body_parameters.len());
        for (i, parameter) in whatsapp.body_parameters.iter().enumerate() {
            body_parameters.push(self.text(&format!("whatsapp.body_parameters[{i}]"), parameter));
        }
        let mut button_url_parameters = Vec::with_capacity(whatsapp.button_url_parameters.len());
        for (i, parameter) in whatsapp.button_url_parameters.iter().enumerate() {
            button_url_parameters
                .push(self.text(&format!("whatsapp.button_url_parameters[{i}]"), parameter));
        }
        WhatsAppParts {
            template_name: whatsapp.template_name.clone(),
            language: whatsapp.language.clone(),
            header_image_url: self.text("whatsapp.header_image_url", &whatsapp.header_image_url),
            body_parameters,
            button_url_parameters,
        }
    }

    fn in_app(&mut self, in_app: &InAppContent) -> InAppParts {
        if in_app.title.trim().is_empty() && in_app.body.trim().is_empty() {
            self.fail("in_app", "a title or a body is required");
        }
        if in_app.data.len() > MAX_DATA_ENTRIES {
            self.fail(
                "in_app.data",
                format!("{} entries, at most {MAX_DATA_ENTRIES}", in_app.data.len()),
            );
        }
        if let Some(expires) = &in_app.expires_after {
            if expires.seconds < 0 || (expires.seconds == 0 && expires.nanos <= 0) {
                self.fail("in_app.expires_after", "must be positive");
            } else if expires.seconds > MAX_EXPIRES_AFTER_SECONDS
                || (expires.seconds == MAX_EXPIRES_AFTER_SECONDS && expires.nanos > 0)
            {
                self.fail("in_app.expires_after", "at most 365 days");
            }
        }
        let data: BTreeMap<&String, &String> = in_app.data.iter().collect();
        InAppParts {
            title: self.text("in_app.title", &in_app.title),
            body: self.text("in_app.body", &in_app.body),
            image_url: self.text("in_app.image_url", &in_app.image_url),
            url: self.text("in_app.url", &in_app.url),
            data: self.entries("in_app.data", data.into_iter()),
            expires_after: in_app.expires_after,
        }
    }

    fn webhook(&mut self, webhook: &WebhookContent) -> WebhookParts {
        if webhook.headers.len() > MAX_WEBHOOK_HEADERS {
            self.fail(
                "webhook.headers",
                format!(
                    "{} headers, at most {MAX_WEBHOOK_HEADERS}",
                    webhook.headers.len()
                ),
            );
        }
        let headers: BTreeMap<&String, &String> = webhook.headers.iter().collect();
        for name in headers.keys() {
            let field = format!("webhook.headers[{name:?}]");
            if name.is_empty() || !name.bytes().all(is_header_name_byte) {
                self.fail(&field, "is not a valid HTTP header name");
            } else if name.eq_ignore_ascii_case("content-type") {
                self.fail(&field, "Content-Type is set by Relance");
            }
        }
        WebhookParts {
            body: self.text("webhook.body", &webhook.body),
            headers: self.entries("webhook.headers", headers.into_iter()),
        }
    }
}

/// RFC 9110 `tchar`.
fn is_header_name_byte(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&byte)
}

impl CompiledTemplate {
    /// The template as saved.
    pub fn template(&self) -> &Template {
        &self.template
    }

    /// The variant for a customer's locale: the exact locale, else one of the same language
    /// (`fr-DZ` takes `fr`, then `fr-FR`; `fr` takes `fr-FR`), else the default locale's.
    pub fn pick_variant(&self, locale: &str) -> usize {
        let wanted = normalize_locale(locale);
        if wanted.is_empty() {
            return self.default_variant;
        }
        for (i, variant) in self.variants.iter().enumerate() {
            if variant.locale == wanted {
                return i;
            }
        }
        let language = language_of(&wanted);
        for (i, variant) in self.variants.iter().enumerate() {
            if variant.locale == language {
                return i;
            }
        }
        for (i, variant) in self.variants.iter().enumerate() {
            if language_of(&variant.locale) == language {
                return i;
            }
        }
        self.default_variant
    }

    /// The writing direction of a variant: its own, else derived from its locale.
    pub fn direction(&self, variant: usize) -> TextDirection {
        match self.variants.get(variant) {
            Some(variant) => variant.direction,
            None => TextDirection::Ltr,
        }
    }

    /// The channels a variant has content for.
    pub fn channels(&self, variant: usize) -> Vec<Channel> {
        let Some(variant) = self.variants.get(variant) else {
            return Vec::new();
        };
        let mut channels = Vec::new();
        for channel in CHANNELS {
            if variant.parts.has(channel) {
                channels.push(channel);
            }
        }
        channels
    }

    /// Renders one channel of one variant: the result has only that channel's part set.
    /// Missing data renders empty; what can still fail is a filter given data of the wrong
    /// type, a length limit exceeded once rendered, or a webhook body that is not JSON.
    pub fn render(
        &self,
        variant: usize,
        channel: Channel,
        input: &RenderInput<'_>,
    ) -> Result<MessageContent, Vec<TemplateError>> {
        let Some(compiled) = self.variants.get(variant) else {
            return Err(vec![error("variants", format!("no variant {variant}"))]);
        };
        render_parts(compiled, channel, &globals(input))
    }
}

/// The root object a template sees.
fn globals(input: &RenderInput<'_>) -> Data {
    let mut root = BTreeMap::new();
    root.insert(
        KString::from_static("customer"),
        Data::from_json(input.customer),
    );
    root.insert(KString::from_static("data"), Data::from_json(input.data));
    root.insert(
        KString::from_static("products"),
        Data::from_json(input.products),
    );
    Data::Object(root)
}

/// Renders fields of one variant, collecting every error.
struct Renderer<'a> {
    prefix: &'a str,
    globals: &'a Data,
    errors: Vec<TemplateError>,
}

impl Renderer<'_> {
    fn text(&mut self, field: &str, text: &Text) -> String {
        match text.render(self.globals) {
            Ok(rendered) => rendered,
            Err(err) => {
                self.fail(field, describe_render_error(&err));
                String::new()
            }
        }
    }

    fn limited(&mut self, field: &str, text: &Text, max: usize) -> String {
        let rendered = self.text(field, text);
        let length = rendered.chars().count();
        if length > max {
            self.fail(
                field,
                format!("is {length} characters once rendered, at most {max}"),
            );
        }
        rendered
    }

    fn entries(
        &mut self,
        field: &str,
        entries: &Entries,
    ) -> std::collections::HashMap<String, String> {
        let mut map = std::collections::HashMap::with_capacity(entries.len());
        for (key, text) in entries {
            let value = self.text(&format!("{field}[{key:?}]"), text);
            map.insert(key.clone(), value);
        }
        map
    }

    fn list(&mut self, field: &str, texts: &[Text]) -> Vec<String> {
        let mut list = Vec::with_capacity(texts.len());
        for (i, text) in texts.iter().enumerate() {
            list.push(self.text(&format!("{field}[{i}]"), text));
        }
        list
    }

    fn fail(&mut self, field: &str, reason: impl Into<String>) {
        self.errors
            .push(error(format!("{}{field}", self.prefix), reason));
    }
}

fn render_parts(
    variant: &CompiledVariant,
    channel: Channel,
    globals: &Data,
) -> Result<MessageContent, Vec<TemplateError>> {
    let mut r = Renderer {
        prefix: &variant.prefix,
        globals,
        errors: Vec::new(),
    };
    let parts = &variant.parts;
    let mut content = MessageContent::default();
    match channel {
        Channel::Push => {
            let Some(push) = &parts.push else {
                return Err(no_content(variant, channel));
            };
            content.push = Some(PushContent {
                title: r.limited("push.title", &push.title, MAX_PUSH_TITLE),
                body: r.limited("push.body", &push.body, MAX_PUSH_BODY),
                image_url: r.text("push.image_url", &push.image_url),
                url: r.text("push.url", &push.url),
                data: r.entries("push.data", &push.data),
                collapse_key: r.text("push.collapse_key", &push.collapse_key),
            });
        }
        Channel::Email => {
            let Some(email) = &parts.email else {
                return Err(no_content(variant, channel));
            };
            let mut html = r.text("email.html", &email.html);
            let mut text = r.text("email.text", &email.text);
            if text.trim().is_empty() {
                // Every e-mail gets a text part: some clients and spam filters need one.
                text = html::to_text(&html);
            }
            if variant.direction == TextDirection::Rtl && !html.is_empty() {
                html = html::with_direction(&html, true, &variant.locale);
            }
            content.email = Some(EmailContent {
                subject: r.limited("email.subject", &email.subject, MAX_EMAIL_SUBJECT),
                preheader: r.text("email.preheader", &email.preheader),
                html,
                text,
                from_name: r.text("email.from_name", &email.from_name),
                reply_to: r.text("email.reply_to", &email.reply_to),
            });
        }
        Channel::Sms => {
            let Some(sms) = &parts.sms else {
                return Err(no_content(variant, channel));
            };
            content.sms = Some(SmsContent {
                body: r.limited("sms.body", sms, MAX_SMS_BODY),
            });
        }
        Channel::Whatsapp => {
            let Some(whatsapp) = &parts.whatsapp else {
                return Err(no_content(variant, channel));
            };
            content.whatsapp = Some(WhatsAppContent {
                template_name: whatsapp.template_name.clone(),
                language: whatsapp.language.clone(),
                header_image_url: r.text("whatsapp.header_image_url", &whatsapp.header_image_url),
                body_parameters: r.list("whatsapp.body_parameters", &whatsapp.body_parameters),
                button_url_parameters: r.list(
                    "whatsapp.button_url_parameters",
                    &whatsapp.button_url_parameters,
                ),
            });
        }
        Channel::InApp => {
            let Some(in_app) = &parts.in_app else {
                return Err(no_content(variant, channel));
            };
            content.in_app = Some(InAppContent {
                title: r.limited("in_app.title", &in_app.title, MAX_IN_APP_TITLE),
                body: r.limited("in_app.body", &in_app.body, MAX_IN_APP_BODY),
                image_url: r.text("in_app.image_url", &in_app.image_url),
                url: r.text("in_app.url", &in_app.url),
                data: r.entries("in_app.data", &in_app.data),
                expires_after: in_app.expires_after,
            });
        }
        Channel::Webhook => {
            let Some(webhook) = &parts.webhook else {
                return Err(no_content(variant, channel));
            };
            let body = r.text("webhook.body", &webhook.body);
            if !body.trim().is_empty()
                && let Err(err) = serde_json::from_str::<serde_json::Value>(&body)
            {
                r.errors.push(TemplateError {
                    field: format!("{}webhook.body", variant.prefix),
                    reason: format!("does not render to valid JSON: {err}"),
                    line: u32::try_from(err.line()).unwrap_or(0),
                    column: u32::try_from(err.column()).unwrap_or(0),
                });
            }
            let headers = r.entries("webhook.headers", &webhook.headers);
            for (name, value) in &headers {
                if value.contains(['\r', '\n']) {
                    r.fail(
                        &format!("webhook.headers[{name:?}]"),
                        "renders with a line break",
                    );
                }
            }
            content.webhook = Some(WebhookContent { body, headers });
        }
        Channel::Unspecified => return Err(no_content(variant, channel)),
    }
    if !r.errors.is_empty() {
        return Err(r.errors);
    }
    Ok(content)
}

fn no_content(variant: &CompiledVariant, channel: Channel) -> Vec<TemplateError> {
    let name = match channel {
        Channel::Push => "push",
        Channel::Email => "email",
        Channel::Sms => "sms",
        Channel::Whatsapp => "whatsapp",
        Channel::InApp => "in_app",
        Channel::Webhook => "webhook",
        Channel::Unspecified => "channel",
    };
    vec![error(
        format!("{}{name}", variant.prefix),
        format!("no {name} content"),
    )]
}

/// Turns liquid's parse error into a short reason and the position inside the field.
/// liquid reports most syntax errors pest-style (` --> line:column` … ` = message`) but an
/// unknown filter without a position, so that one is looked up in the source.
fn describe_parse_error(source: &str, err: &liquid_core::Error) -> (String, u32, u32) {
    let text = err.to_string();
    let (message, context) = split_error(&text);
    let (mut line, mut column) = (0, 0);
    if let Some(position) = message.trim_start().strip_prefix("--> ") {
        let mut numbers = position.trim().split(':');
        line = numbers.next().and_then(|n| n.parse().ok()).unwrap_or(0);
        column = numbers.next().and_then(|n| n.parse().ok()).unwrap_or(0);
    }
    // The pest message is the line starting with `=`.
    let mut reason = message.to_string();
    for text_line in text.lines() {
        if let Some(pest_message) = text_line.trim_start().strip_prefix("= ") {
            reason = pest_message.to_string();
            break;
        }
    }
    if let Some(filter) = context_value(&context, "requested filter") {
        let (filter_line, filter_column) = find_filter(source, filter);
        return (
            format!("unknown filter {filter:?}"),
            filter_line,
            filter_column,
        );
    }
    if reason.starts_with("Unknown tag")
        && let Some(tag) = context_value(&context, "requested")
    {
        return (format!("unknown tag {tag:?}"), line, column);
    }
    if let Some(rest) = reason.strip_prefix("Unclosed block. {% end")
        && let Some(tag) = rest.split(' ').next()
    {
        let tag = tag.trim_end_matches("%}").trim();
        return (format!("unclosed tag {tag:?}"), line, column);
    }
    (plain_reason(&reason), line, column)
}

/// A render error as a short reason: `filter "divided_by": can't divide by zero`.
fn describe_render_error(err: &liquid_core::Error) -> String {
    let text = err.to_string();
    let (message, context) = split_error(&text);
    let mut reason = plain_reason(message);
    if let Some(cause) = context_value(&context, "cause") {
        reason = format!("{reason}: {}", plain_reason(cause));
    }
    if let Some(filter) = context_value(&context, "filter") {
        let name = filter.split([' ', ':']).next().unwrap_or(filter);
        reason = format!("filter {name:?}: {reason}");
    }
    reason
}

/// The first line of liquid's error (after `liquid: `) and its `key=value` context lines.
fn split_error(text: &str) -> (&str, Vec<(&str, &str)>) {
    let mut lines = text.lines();
    let first = lines.next().unwrap_or_default();
    let message = first.strip_prefix("liquid:").unwrap_or(first).trim();
    let mut context = Vec::new();
    for line in lines {
        let line = line.trim();
        if let Some((key, value)) = line.split_once('=')
            && ((!key.is_empty() && !key.contains(' ')) || key.starts_with("requested"))
        {
            context.push((key.trim(), value.trim()));
        }
    }
    (message, context)
}

fn context_value<'a>(context: &[(&'a str, &'a str)], key: &str) -> Option<&'a str> {
    context
        .iter()
        .find(|(k, _)| *k == key)
        .map(|(_, value)| *value)
}

/// A message as a lowercase reason without a final period.
fn plain_reason(message: &str) -> String {
    let message = message.trim().trim_end_matches('.');
    let mut chars = message.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => "invalid template".to_string(),
    }
}

/// The first integer literal inside Liquid markup (`{{ … }}`, `{% … %}`) that does not fit in
/// an `i64`, with its byte offset. liquid's parser reads integer literals with `expect`, so
/// `{{ 99999999999999999999 }}` would panic in it: such a source is refused before it is
/// parsed. Text outside markup and string literals inside it are not numbers to liquid.
fn oversized_integer(source: &str) -> Option<(usize, &str)> {
    let bytes = source.as_bytes();
    let mut i = 0;
    while i + 1 < bytes.len() {
        let close = match (bytes[i], bytes[i + 1]) {
            (b'{', b'{') => b'}',
            (b'{', b'%') => b'%',
            _ => {
                i += 1;
                continue;
            }
        };
        i += 2;
        // `{{-` / `{%-`: the hyphen trims whitespace, it is no sign.
        if bytes.get(i) == Some(&b'-') {
            i += 1;
        }
        let inner = i;
        let mut quote = None;
        while i < bytes.len() {
            let byte = bytes[i];
            if let Some(open) = quote {
                if byte == open {
                    quote = None;
                }
                i += 1;
                continue;
            }
            match byte {
                b'\'' | b'"' => {
                    quote = Some(byte);
                    i += 1;
                }
                _ if byte == close && bytes.get(i + 1) == Some(&b'}') => break,
                b'0'..=b'9' => {
                    let start = i;
                    while i < bytes.len() && bytes[i].is_ascii_digit() {
                        i += 1;
                    }
                    let before = |back: usize| {
                        start
                            .checked_sub(back)
                            .filter(|at| *at >= inner)
                            .map(|at| bytes[at])
                    };
                    let word =
                        |b: Option<u8>| b.is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_');
                    // Part of a name (`item2`, `a-1`) or of a float (`1.5`): not an integer.
                    let in_name = word(before(1))
                        || (before(1) == Some(b'-')
                            && (word(before(2)) || before(2) == Some(b'-')));
                    let fraction =
                        before(1) == Some(b'.') && before(2).is_some_and(|b| b.is_ascii_digit());
                    let float = bytes.get(i) == Some(&b'.')
                        && bytes.get(i + 1).is_some_and(u8::is_ascii_digit);
                    if in_name || fraction || float {
                        continue;
                    }
                    let from = if before(1) == Some(b'-') {
                        start - 1
                    } else {
                        start
                    };
                    let number = &source[from..i];
                    if number.parse::<i64>().is_err() {
                        return Some((from, number));
                    }
                }
                _ => i += 1,
            }
        }
        i += 2;
    }
    None
}

/// Line and column (from 1, in characters) of the first use of filter `name` (`| name`).
fn find_filter(source: &str, name: &str) -> (u32, u32) {
    let mut from = 0;
    while let Some(offset) = source[from..].find('|') {
        let bar = from + offset;
        from = bar + 1;
        let after = &source[from..];
        let trimmed = after.trim_start();
        let Some(rest) = trimmed.strip_prefix(name) else {
            continue;
        };
        if rest.starts_with(|c: char| c.is_alphanumeric() || c == '_' || c == '-') {
            continue;
        }
        let at = from + (after.len() - trimmed.len());
        return position(source, at);
    }
    (0, 0)
}

fn position(source: &str, at: usize) -> (u32, u32) {
    let before = &source[..at];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = source[line_start..at].chars().count() + 1;
    (
        u32::try_from(line).unwrap_or(u32::MAX),
        u32::try_from(column).unwrap_or(u32::MAX),
    )
}

/// The data a template renders with, converted from JSON once per render.
///
/// liquid 0.26 is strict: looking up a key an object does not have fails the whole render
/// ("Unknown index"). Shopify's Liquid renders such lookups as nil, and templates are
/// written for that (`{{ customer.first_name | default: "there" }}`), so these values
/// answer every lookup: a missing key (or an index past the end of a list) gives [`NIL`],
/// which is nil for conditions, `default` and rendering, and itself answers every lookup so
/// that `customer.address.city` is nil too when there is no address.
///
/// With [`LenientRuntime`] this covers the data as given and the loop variables over its
/// lists. Values a template builds itself (`assign` with a filter such as `sort`, or a list
/// reached through a loop variable and iterated again) are plain liquid values; a missing
/// key of those is still nil when read directly (`{{ x.missing }}`, through the runtime),
/// but not inside a nested `{% for %}` over them.
#[derive(Debug)]
enum Data {
    Nil,
    /// A liquid scalar value (string, number, boolean).
    Scalar(Value),
    Array(Vec<Data>),
    Object(BTreeMap<KString, Data>),
}

static NIL: Data = Data::Nil;

impl Data {
    fn from_json(json: &serde_json::Value) -> Data {
        match json {
            serde_json::Value::Null => Data::Nil,
            serde_json::Value::Bool(b) => Data::Scalar(Value::scalar(*b)),
            serde_json::Value::Number(n) => match n.as_i64() {
                Some(i) => Data::Scalar(Value::scalar(i)),
                None => Data::Scalar(Value::scalar(n.as_f64().unwrap_or_default())),
            },
            serde_json::Value::String(s) => Data::Scalar(Value::scalar(s.clone())),
            serde_json::Value::Array(items) => {
                let mut array = Vec::with_capacity(items.len());
                for item in items {
                    array.push(Data::from_json(item));
                }
                Data::Array(array)
            }
            serde_json::Value::Object(map) => {
                let mut object = BTreeMap::new();
                for (key, value) in map {
                    object.insert(KString::from_ref(key), Data::from_json(value));
                }
                Data::Object(object)
            }
        }
    }

    fn is_empty_collection(&self) -> bool {
        match self {
            Data::Nil => true,
            Data::Scalar(_) => false,
            Data::Array(items) => items.is_empty(),
            Data::Object(map) => map.is_empty(),
        }
    }
}

impl ValueView for Data {
    fn as_debug(&self) -> &dyn std::fmt::Debug {
        self
    }

    fn render(&self) -> DisplayCow<'_> {
        match self {
            Data::Nil => DisplayCow::Owned(Box::new("")),
            Data::Scalar(value) => value.render(),
            _ => DisplayCow::Owned(Box::new(self.to_value().render().to_string())),
        }
    }

    fn source(&self) -> DisplayCow<'_> {
        match self {
            Data::Nil => DisplayCow::Owned(Box::new("nil")),
            Data::Scalar(value) => value.source(),
            _ => DisplayCow::Owned(Box::new(self.to_value().source().to_string())),
        }
    }

    fn type_name(&self) -> &'static str {
        match self {
            Data::Nil => "nil",
            Data::Scalar(value) => value.type_name(),
            Data::Array(_) => "array",
            Data::Object(_) => "object",
        }
    }

    fn query_state(&self, state: State) -> bool {
        match self {
            Data::Scalar(value) => value.query_state(state),
            Data::Nil => !matches!(state, State::Truthy),
            _ => match state {
                State::Truthy => true,
                State::DefaultValue | State::Empty | State::Blank => self.is_empty_collection(),
            },
        }
    }

    fn to_kstr(&self) -> KStringCow<'_> {
        match self {
            Data::Nil => KStringCow::from_static(""),
            Data::Scalar(value) => value.to_kstr(),
            _ => KStringCow::from_string(self.render().to_string()),
        }
    }

    fn to_value(&self) -> Value {
        match self {
            Data::Nil => Value::Nil,
            Data::Scalar(value) => value.clone(),
            Data::Array(items) => Value::Array(items.iter().map(Data::to_value).collect()),
            Data::Object(map) => {
                let mut object = liquid_core::Object::new();
                for (key, value) in map {
                    object.insert(key.clone(), value.to_value());
                }
                Value::Object(object)
            }
        }
    }

    fn as_scalar(&self) -> Option<ScalarCow<'_>> {
        match self {
            Data::Scalar(value) => value.as_scalar(),
            _ => None,
        }
    }

    fn as_array(&self) -> Option<&dyn ArrayView> {
        match self {
            Data::Array(_) => Some(self),
            _ => None,
        }
    }

    fn as_object(&self) -> Option<&dyn ObjectView> {
        match self {
            // Nil answers lookups too, so that a chain through a missing key is nil.
            Data::Object(_) | Data::Nil => Some(self),
            _ => None,
        }
    }

    fn is_nil(&self) -> bool {
        matches!(self, Data::Nil)
    }
}

impl ObjectView for Data {
    fn as_value(&self) -> &dyn ValueView {
        self
    }

    fn size(&self) -> i64 {
        match self {
            Data::Object(map) => i64::try_from(map.len()).unwrap_or(i64::MAX),
            _ => 0,
        }
    }

    fn keys<'k>(&'k self) -> Box<dyn Iterator<Item = KStringCow<'k>> + 'k> {
        match self {
            Data::Object(map) => Box::new(map.keys().map(|k| KStringCow::from(k.as_ref()))),
            _ => Box::new(std::iter::empty()),
        }
    }

    fn values<'k>(&'k self) -> Box<dyn Iterator<Item = &'k dyn ValueView> + 'k> {
        match self {
            Data::Object(map) => Box::new(map.values().map(|v| v as &dyn ValueView)),
            _ => Box::new(std::iter::empty()),
        }
    }

    fn iter<'k>(&'k self) -> Box<dyn Iterator<Item = (KStringCow<'k>, &'k dyn ValueView)> + 'k> {
        match self {
            Data::Object(map) => Box::new(
                map.iter()
                    .map(|(k, v)| (KStringCow::from(k.as_ref()), v as &dyn ValueView)),
            ),
            _ => Box::new(std::iter::empty()),
        }
    }

    fn contains_key(&self, _index: &str) -> bool {
        // Every key is answered (missing ones with nil): this is what makes the root object
        // lenient, since liquid asks it before looking a variable up.
        true
    }

    fn get<'s>(&'s self, index: &str) -> Option<&'s dyn ValueView> {
        if let Data::Object(map) = self
            && let Some(value) = map.get(index)
        {
            return Some(value);
        }
        if index == "size" && matches!(self, Data::Object(_)) {
            // Let liquid compute an object's `size` itself; nil's is nil.
            return None;
        }
        Some(&NIL)
    }
}

impl ArrayView for Data {
    fn as_value(&self) -> &dyn ValueView {
        self
    }

    fn size(&self) -> i64 {
        match self {
            Data::Array(items) => i64::try_from(items.len()).unwrap_or(i64::MAX),
            _ => 0,
        }
    }

    fn values<'k>(&'k self) -> Box<dyn Iterator<Item = &'k dyn ValueView> + 'k> {
        match self {
            Data::Array(items) => Box::new(items.iter().map(|v| v as &dyn ValueView)),
            _ => Box::new(std::iter::empty()),
        }
    }

    fn contains_key(&self, index: i64) -> bool {
        self.array_index(index).is_some()
    }

    fn get(&self, index: i64) -> Option<&dyn ValueView> {
        match (self, self.array_index(index)) {
            (Data::Array(items), Some(i)) => items.as_slice().get(i).map(|v| v as &dyn ValueView),
            _ => Some(&NIL),
        }
    }
}

impl Data {
    /// A liquid index (negative counts from the end) as a position in the list.
    fn array_index(&self, index: i64) -> Option<usize> {
        let Data::Array(items) = self else {
            return None;
        };
        let len = i64::try_from(items.len()).ok()?;
        let index = if index < 0 { len + index } else { index };
        if index < 0 || index >= len {
            return None;
        }
        usize::try_from(index).ok()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use relance_proto::v1::TemplateProducts;
    use serde_json::json;

    fn email(subject: &str, html: &str) -> MessageContent {
        MessageContent {
            email: Some(EmailContent {
                subject: subject.into(),
                html: html.into(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn variant(locale: &str, content: MessageContent) -> TemplateVariant {
        TemplateVariant {
            locale: locale.into(),
            direction: TextDirection::Unspecified as i32,
            content: Some(content),
        }
    }

    fn template(variants: Vec<TemplateVariant>) -> Template {
        Template {
            name: "cart-1".into(),
            default_locale: variants[0].locale.clone(),
            variants,
            ..Default::default()
        }
    }

    fn render_with(
        compiled: &CompiledTemplate,
        variant: usize,
        channel: Channel,
        customer: serde_json::Value,
        data: serde_json::Value,
    ) -> Result<MessageContent, Vec<TemplateError>> {
        let products = json!([]);
        compiled.render(
            variant,
            channel,
            &RenderInput {
                customer: &customer,
                data: &data,
                products: &products,
            },
        )
    }

    fn fields(errors: &[TemplateError]) -> Vec<&str> {
        errors.iter().map(|e| e.field.as_str()).collect()
    }

    #[test]
    fn names() {
        assert!(validate_name("cart-1").is_ok());
        assert!(validate_name("a").is_ok());
        assert!(validate_name(&"a".repeat(64)).is_ok());
        assert!(validate_name(&"a".repeat(65)).is_err());
        assert!(validate_name("").is_err());
        assert!(validate_name("1cart").is_err());
        assert!(validate_name("-cart").is_err());
        assert!(validate_name("Cart").is_err());
        assert!(validate_name("cart_1").is_err());
        assert!(validate_name("carté").is_err());
    }

    #[test]
    fn locales() {
        for good in [
            "fr",
            "ar",
            "en",
            "fr-DZ",
            "en-US",
            "zh-Hant-TW",
            "es-419",
            "ber",
        ] {
            assert!(validate_locale(good).is_ok(), "{good}");
        }
        for bad in [
            "", "f", "french", "fr_FR", "fr-", "en-US-x", "12", "fr DZ", "ar-🙂",
        ] {
            assert!(validate_locale(bad).is_err(), "{bad}");
        }
        assert_eq!(direction_of_locale("ar"), TextDirection::Rtl);
        assert_eq!(direction_of_locale("ar-DZ"), TextDirection::Rtl);
        assert_eq!(direction_of_locale("he"), TextDirection::Rtl);
        assert_eq!(direction_of_locale("fa-IR"), TextDirection::Rtl);
        assert_eq!(direction_of_locale("ur"), TextDirection::Rtl);
        assert_eq!(direction_of_locale("fr-DZ"), TextDirection::Ltr);
        assert_eq!(direction_of_locale(""), TextDirection::Ltr);
    }

    #[test]
    fn compiled_templates_are_shareable() {
        fn shareable<T: Send + Sync + 'static>() {}
        shareable::<CompiledTemplate>();
    }

    #[test]
    fn picks_variants_by_locale() {
        let mut t = template(vec![
            variant("en", email("Hi", "<p>Hi</p>")),
            variant("fr-FR", email("Salut", "<p>Salut</p>")),
            variant("fr", email("Bonjour", "<p>Bonjour</p>")),
            variant("ar", email("مرحبا", "<p>مرحبا</p>")),
            variant("en-US", email("Hey", "<p>Hey</p>")),
        ]);
        t.default_locale = "fr".into();
        let compiled = compile(&t).unwrap();
        assert_eq!(compiled.pick_variant("fr-FR"), 1);
        assert_eq!(compiled.pick_variant("fr_fr"), 1);
        assert_eq!(compiled.pick_variant("fr-DZ"), 2);
        assert_eq!(compiled.pick_variant("fr"), 2);
        assert_eq!(compiled.pick_variant("ar-DZ"), 3);
        assert_eq!(compiled.pick_variant("en-GB"), 0);
        assert_eq!(compiled.pick_variant("EN-us"), 4);
        assert_eq!(compiled.pick_variant("de"), 2);
        assert_eq!(compiled.pick_variant(""), 2);
        assert_eq!(compiled.direction(3), TextDirection::Rtl);
        assert_eq!(compiled.direction(0), TextDirection::Ltr);
        assert_eq!(compiled.channels(0), vec![Channel::Email]);
        assert_eq!(compiled.template().name, "cart-1");

        // Language only: `fr` takes the first variant of its language when there is no
        // plain `fr`.
        let mut t = template(vec![
            variant("en", email("Hi", "x")),
            variant("fr-FR", email("Salut", "x")),
        ]);
        t.default_locale = "en".into();
        let compiled = compile(&t).unwrap();
        assert_eq!(compiled.pick_variant("fr"), 1);
        assert_eq!(compiled.pick_variant("fr-CA"), 1);
    }

    #[test]
    fn explicit_direction_wins() {
        let mut v = variant("ar", email("x", "<p>x</p>"));
        v.direction = TextDirection::Ltr as i32;
        let compiled = compile(&template(vec![v])).unwrap();
        assert_eq!(compiled.direction(0), TextDirection::Ltr);
        let mut v = variant("en", email("x", "<p>x</p>"));
        v.direction = TextDirection::Rtl as i32;
        let compiled = compile(&template(vec![v])).unwrap();
        assert_eq!(compiled.direction(0), TextDirection::Rtl);
    }

    #[test]
    fn missing_variables_render_empty() {
        let content = MessageContent {
            sms: Some(SmsContent {
                body: "Hi {{ customer.first_name }}|{{ customer.first_name | default: \"there\" }}|{{ customer.address.city }}|{{ nothing.at.all }}|{% if customer.vip %}VIP{% else %}regular{% endif %}|{% if customer.first_name == blank %}blank{% endif %}|{{ data.items[5].title }}|{{ data.items.first.title | upcase }}|{% for i in data.items %}{{ i.title }}:{{ i.image_url }};{% endfor %}|{% for x in data.missing %}never{% else %}none{% endfor %}|{{ data.items.size }}".into(),
            }),
            ..Default::default()
        };
        let compiled = compile(&template(vec![variant("en", content)])).unwrap();
        let rendered = render_with(
            &compiled,
            0,
            Channel::Sms,
            json!({}),
            json!({"items": [{"title": "Shoes"}, {"title": "Hat", "image_url": "h.png"}]}),
        )
        .unwrap();
        assert_eq!(
            rendered.sms.unwrap().body,
            "Hi |there|||regular|blank||SHOES|Shoes:;Hat:h.png;|none|2"
        );
        let rendered = render_with(
            &compiled,
            0,
            Channel::Sms,
            json!({"first_name": "Amina", "vip": true, "address": {"city": "Oran"}}),
            json!({}),
        )
        .unwrap();
        assert_eq!(
            rendered.sms.unwrap().body,
            "Hi Amina|Amina|Oran||VIP|||||none|"
        );
    }

    #[test]
    fn values_render_as_shopify_does() {
        let content = MessageContent {
            sms: Some(SmsContent {
                body: "{{ data.n }} {{ data.price }} {{ data.price | times: 2 }} {{ data.ok }} {{ data.none }}|{{ products[0].title }} {{ products.size }}".into(),
            }),
            ..Default::default()
        };
        // `times` needs a number: the sample data says what the send will give.
        let mut t = template(vec![variant("en", content)]);
        t.sample_data = Some(relance_proto::convert::json_to_struct(&json!({
            "data": {"price": 1}
        })));
        let compiled = compile(&t).unwrap();
        let customer = json!({});
        let data = json!({"n": 3, "price": 12.5, "ok": true, "none": null});
        let products = json!([{"title": "Mug"}]);
        let rendered = compiled
            .render(
                0,
                Channel::Sms,
                &RenderInput {
                    customer: &customer,
                    data: &data,
                    products: &products,
                },
            )
            .unwrap();
        assert_eq!(rendered.sms.unwrap().body, "3 12.5 25 true |Mug 1");
    }

    #[test]
    fn every_string_of_every_channel_is_rendered() {
        let content = MessageContent {
            push: Some(PushContent {
                title: "{{ customer.name }}".into(),
                body: "b {{ data.x }}".into(),
                image_url: "https://i.example/{{ data.x }}.png".into(),
                url: "https://shop.example/{{ data.x }}".into(),
                data: [("k".to_string(), "v{{ data.x }}".to_string())].into(),
                collapse_key: "c{{ data.x }}".into(),
            }),
            whatsapp: Some(WhatsAppContent {
                template_name: "cart_reminder".into(),
                language: "fr".into(),
                header_image_url: "https://i.example/{{ data.x }}".into(),
                body_parameters: vec!["{{ customer.name }}".into(), "{{ data.x }}".into()],
                button_url_parameters: vec!["cart/{{ data.x }}".into()],
            }),
            in_app: Some(InAppContent {
                title: "t {{ data.x }}".into(),
                body: "**{{ customer.name }}**".into(),
                data: [("d".to_string(), "{{ data.x }}".to_string())].into(),
                ..Default::default()
            }),
            webhook: Some(WebhookContent {
                body: "{\"name\": \"{{ customer.name }}\", \"x\": {{ data.x }}}".into(),
                headers: [("X-Shop".to_string(), "s{{ data.x }}".to_string())].into(),
            }),
            ..Default::default()
        };
        let mut t = template(vec![variant("fr", content)]);
        // Without a sample `x`, the webhook body would not be JSON: `"x": }`.
        t.sample_data = Some(relance_proto::convert::json_to_struct(&json!({
            "data": {"x": 1}
        })));
        let compiled = compile(&t).unwrap();
        assert_eq!(
            compiled.channels(0),
            vec![
                Channel::Push,
                Channel::Whatsapp,
                Channel::InApp,
                Channel::Webhook
            ]
        );
        let customer = json!({"name": "Sara"});
        let data = json!({"x": 7});
        let push =
            render_with(&compiled, 0, Channel::Push, customer.clone(), data.clone()).unwrap();
        assert!(push.email.is_none() && push.whatsapp.is_none());
        let push = push.push.unwrap();
        assert_eq!(push.title, "Sara");
        assert_eq!(push.body, "b 7");
        assert_eq!(push.image_url, "https://i.example/7.png");
        assert_eq!(push.url, "https://shop.example/7");
        assert_eq!(push.data["k"], "v7");
        assert_eq!(push.collapse_key, "c7");

        let wa = render_with(
            &compiled,
            0,
            Channel::Whatsapp,
            customer.clone(),
            data.clone(),
        )
        .unwrap()
        .whatsapp
        .unwrap();
        assert_eq!(wa.template_name, "cart_reminder");
        assert_eq!(wa.body_parameters, ["Sara", "7"]);
        assert_eq!(wa.button_url_parameters, ["cart/7"]);
        assert_eq!(wa.header_image_url, "https://i.example/7");

        let in_app = render_with(&compiled, 0, Channel::InApp, customer.clone(), data.clone())
            .unwrap()
            .in_app
            .unwrap();
        assert_eq!(
            (in_app.title.as_str(), in_app.body.as_str()),
            ("t 7", "**Sara**")
        );
        assert_eq!(in_app.data["d"], "7");

        let webhook = render_with(
            &compiled,
            0,
            Channel::Webhook,
            customer.clone(),
            data.clone(),
        )
        .unwrap()
        .webhook
        .unwrap();
        assert_eq!(webhook.body, "{\"name\": \"Sara\", \"x\": 7}");
        assert_eq!(webhook.headers["X-Shop"], "s7");

        let missing = render_with(&compiled, 0, Channel::Email, customer, data).unwrap_err();
        assert_eq!(fields(&missing), ["variants[0].content.email"]);
    }

    #[test]
    fn email_gets_a_text_part_and_rtl_markup() {
        let arabic = variant(
            "ar",
            email(
                "طلبك رقم {{ data.order }}",
                "<html><body><h1>مرحبا {{ customer.first_name | default: \"\" }}</h1><p>شكرا لطلبك <a href=\"https://shop.example/o/{{ data.order }}\">تتبع الطلب</a></p></body></html>",
            ),
        );
        let mut english = variant("en", email("Order {{ data.order }}", "<p>Thanks</p>"));
        if let Some(email) = english.content.as_mut().and_then(|c| c.email.as_mut()) {
            email.text = "Thanks, order {{ data.order }}".into();
        }
        let compiled = compile(&template(vec![arabic, english])).unwrap();
        let rendered = render_with(
            &compiled,
            0,
            Channel::Email,
            json!({"first_name": "سارة"}),
            json!({"order": 1234}),
        )
        .unwrap()
        .email
        .unwrap();
        assert_eq!(rendered.subject, "طلبك رقم 1234");
        assert!(
            rendered
                .html
                .starts_with("<html dir=\"rtl\" lang=\"ar\"><body><h1>مرحبا سارة</h1>"),
            "{}",
            rendered.html
        );
        assert_eq!(
            rendered.text,
            "مرحبا سارة\n\nشكرا لطلبك تتبع الطلب (https://shop.example/o/1234)"
        );

        let rendered = render_with(&compiled, 1, Channel::Email, json!({}), json!({"order": 9}))
            .unwrap()
            .email
            .unwrap();
        assert_eq!(rendered.html, "<p>Thanks</p>");
        assert_eq!(rendered.text, "Thanks, order 9");
    }

    #[test]
    fn length_limits_are_checked_once_rendered() {
        let content = MessageContent {
            push: Some(PushContent {
                title: "{{ data.long }}".into(),
                body: "ok".into(),
                ..Default::default()
            }),
            sms: Some(SmsContent {
                body: "{{ data.long }}{{ data.long }}".into(),
            }),
            ..Default::default()
        };
        let compiled = compile(&template(vec![variant("en", content)])).unwrap();
        let ok = render_with(
            &compiled,
            0,
            Channel::Push,
            json!({}),
            json!({"long": "é".repeat(100)}),
        );
        assert!(ok.is_ok());
        let errors = render_with(
            &compiled,
            0,
            Channel::Push,
            json!({}),
            json!({"long": "é".repeat(101)}),
        )
        .unwrap_err();
        assert_eq!(fields(&errors), ["variants[0].content.push.title"]);
        assert!(
            errors[0].reason.contains("at most 100"),
            "{}",
            errors[0].reason
        );
        let errors = render_with(
            &compiled,
            0,
            Channel::Sms,
            json!({}),
            json!({"long": "x".repeat(801)}),
        )
        .unwrap_err();
        assert_eq!(fields(&errors), ["variants[0].content.sms.body"]);
    }

    #[test]
    fn liquid_errors_have_a_reason_and_a_position() {
        let content = MessageContent {
            email: Some(EmailContent {
                subject: "Hi".into(),
                html: "<p>\n  {{ data.total | monye }}</p>".into(),
                ..Default::default()
            }),
            sms: Some(SmsContent {
                body: "a\n{% if customer.vip %}b".into(),
            }),
            push: Some(PushContent {
                title: "{% frobnicate %}".into(),
                body: "{{ x | plus: }}".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let ok = variant("en", email("x", "y"));
        let errors = compile(&template(vec![ok, variant("fr", content)])).unwrap_err();
        let find = |field: &str| {
            errors
                .iter()
                .find(|e| e.field == field)
                .unwrap_or_else(|| panic!("no error for {field}: {errors:?}"))
        };
        let monye = find("variants[1].content.email.html");
        assert_eq!(monye.reason, "unknown filter \"monye\"");
        assert_eq!((monye.line, monye.column), (2, 19));
        let unclosed = find("variants[1].content.sms.body");
        assert_eq!(unclosed.reason, "unclosed tag \"if\"");
        assert!(unclosed.line >= 2, "{unclosed:?}");
        let tag = find("variants[1].content.push.title");
        assert_eq!(tag.reason, "unknown tag \"frobnicate\"");
        assert_eq!((tag.line, tag.column), (1, 4));
        let syntax = find("variants[1].content.push.body");
        assert_eq!((syntax.line, syntax.column), (1, 14));
        assert!(syntax.reason.starts_with("expected"), "{}", syntax.reason);
        assert_eq!(errors.len(), 4, "{errors:?}");
    }

    #[test]
    fn render_errors_surface_at_save_time() {
        let mut t = template(vec![variant(
            "en",
            MessageContent {
                sms: Some(SmsContent {
                    body: "{{ data.total | divided_by: data.count }}".into(),
                }),
                webhook: Some(WebhookContent {
                    body: "{\"name\": {{ customer.name }}}".into(),
                    ..Default::default()
                }),
                ..Default::default()
            },
        )]);
        t.sample_data = Some(relance_proto::convert::json_to_struct(&json!({
            "customer": {"name": "Sara"},
            "data": {"total": 10, "count": 0}
        })));
        let errors = compile(&t).unwrap_err();
        assert_eq!(
            fields(&errors),
            [
                "variants[0].content.sms.body",
                "variants[0].content.webhook.body"
            ]
        );
        assert_eq!(
            errors[0].reason,
            "filter \"divided_by\": invalid argument: can't divide by zero"
        );
        assert!(
            errors[1]
                .reason
                .starts_with("does not render to valid JSON"),
            "{}",
            errors[1].reason
        );
    }

    #[test]
    fn every_problem_is_reported() {
        let big = MessageContent {
            push: Some(PushContent {
                title: "t".into(),
                data: (0..51)
                    .map(|i| (format!("k{i}"), "v".to_string()))
                    .collect(),
                ..Default::default()
            }),
            whatsapp: Some(WhatsAppContent::default()),
            in_app: Some(InAppContent {
                title: "t".into(),
                expires_after: Some(prost_types::Duration {
                    seconds: 366 * 24 * 3600,
                    nanos: 0,
                }),
                ..Default::default()
            }),
            webhook: Some(WebhookContent {
                body: String::new(),
                headers: (0..21)
                    .map(|i| (format!("X-H{i}"), "v".to_string()))
                    .collect(),
            }),
            ..Default::default()
        };
        let t = Template {
            name: "Bad Name".into(),
            description: "d".repeat(1001),
            default_locale: "de".into(),
            variants: vec![
                variant("fr", big),
                variant("FR", email("x", "y")),
                variant("french!", email("x", "y")),
                TemplateVariant {
                    locale: "en".into(),
                    direction: 0,
                    content: Some(MessageContent::default()),
                },
            ],
            products: Some(TemplateProducts {
                n: 13,
                timeout: Some(prost_types::Duration {
                    seconds: 2,
                    nanos: 0,
                }),
                ..Default::default()
            }),
            sample_data: Some(relance_proto::convert::json_to_struct(&json!({
                "data": {"blob": "x".repeat(33 * 1024)}
            }))),
            ..Default::default()
        };
        let errors = compile(&t).unwrap_err();
        let mut found = fields(&errors);
        found.sort_unstable();
        assert_eq!(
            found,
            [
                "default_locale",
                "description",
                "name",
                "products.n",
                "products.timeout",
                "sample_data",
                "variants[0].content.in_app.expires_after",
                "variants[0].content.push.data",
                "variants[0].content.webhook.headers",
                "variants[0].content.whatsapp.template_name",
                "variants[1].locale",
                "variants[2].locale",
                "variants[3].content",
            ],
            "{errors:#?}"
        );

        let too_many = Template {
            variants: (0..21)
                .map(|i| variant(&format!("x{}", (b'a' + i as u8) as char), email("s", "h")))
                .collect(),
            default_locale: "xa".into(),
            name: "many".into(),
            ..Default::default()
        };
        assert_eq!(fields(&compile(&too_many).unwrap_err()), ["variants"]);
        let none = Template {
            name: "none".into(),
            default_locale: "en".into(),
            ..Default::default()
        };
        assert_eq!(fields(&compile(&none).unwrap_err()), ["variants"]);
    }

    #[test]
    fn inline_content_is_validated_with_inline_paths() {
        let content = MessageContent {
            email: Some(EmailContent {
                subject: "Order {{ data.id }}".into(),
                html: "{{ data.id | monye }}".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let errors = compile_inline(&content).unwrap_err();
        assert_eq!(fields(&errors), ["inline.email.html"]);
        assert_eq!(errors[0].reason, "unknown filter \"monye\"");
        assert_eq!((errors[0].line, errors[0].column), (1, 14));

        let errors = compile_inline(&MessageContent::default()).unwrap_err();
        assert_eq!(fields(&errors), ["inline"]);

        let content = email(
            "Order {{ data.id }}",
            "<p>{{ customer.first_name | default: \"Hi\" }}</p>",
        );
        let compiled = compile_inline(&content).unwrap();
        assert_eq!(compiled.pick_variant("ar"), 0);
        assert_eq!(compiled.channels(0), vec![Channel::Email]);
        let rendered = render_with(&compiled, 0, Channel::Email, json!({}), json!({"id": 5}))
            .unwrap()
            .email
            .unwrap();
        assert_eq!(rendered.subject, "Order 5");
        assert_eq!(rendered.html, "<p>Hi</p>");
        assert_eq!(rendered.text, "Hi");
        let errors = render_with(&compiled, 0, Channel::Sms, json!({}), json!({})).unwrap_err();
        assert_eq!(fields(&errors), ["inline.sms"]);
    }

    /// The error of a one-variant template whose e-mail html is `html` (found by the
    /// `template_compile` fuzz target, fuzz/regressions/template_compile/).
    fn html_error(html: &str) -> TemplateError {
        let errors = compile(&template(vec![variant("en", email("Hi", html))]))
            .expect_err("the template is refused");
        assert_eq!(
            fields(&errors),
            ["variants[0].content.email.html"],
            "{errors:?}"
        );
        errors.into_iter().next().expect("one error")
    }

    #[test]
    fn a_huge_range_is_refused_instead_of_exhausting_memory() {
        // liquid builds the whole range before the first turn: 2e9 values, out of memory.
        let error = html_error("{% for i in (1..2000000000) %}x{% endfor %}");
        assert_eq!(error.reason, "loops would run more than 10000 times");
        let error = html_error("{% assign n = 2000000000 %}{% for i in (1..n) %}{% endfor %}");
        assert_eq!(error.reason, "loops would run more than 10000 times");
        let error = html_error(
            "<table>{% tablerow i in (-9223372036854775807..9223372036854775807) %}{% endtablerow %}</table>",
        );
        assert_eq!(error.reason, "loops would run more than 10000 times");
    }

    #[test]
    fn nested_loops_share_one_budget() {
        let error =
            html_error("{% for a in (1..1000) %}{% for b in (1..1000) %}{% endfor %}{% endfor %}");
        assert_eq!(error.reason, "loops would run more than 10000 times");
        let within = "{% for a in (1..100) %}{% for b in (1..99) %}{% endfor %}{% endfor %}";
        assert!(compile(&template(vec![variant("en", email("Hi", within))])).is_ok());
    }

    #[test]
    fn assigned_and_captured_values_cannot_grow_without_end() {
        let doubling = "{% assign s = 'xx' %}".to_owned()
            + &"{% assign s = s | append: s %}".repeat(40)
            + "{{ s | size }}";
        let error = html_error(&doubling);
        assert_eq!(
            error.reason,
            "assigns or captures a value of more than 64 KiB"
        );
        let error = html_error(
            "{% capture c %}{% for i in (1..10000) %}12345678{% endfor %}{% endcapture %}{{ c }}",
        );
        assert_eq!(error.reason, "captures more than 64 KiB");
        let large = "{% assign s = 'x' %}".to_owned()
            + &"{% assign s = s | append: s %}".repeat(16)
            + "{% for i in (1..100) %}{{ s }}{% endfor %}";
        let error = html_error(&large);
        assert_eq!(error.reason, "renders to more than 1024 KiB");
    }

    #[test]
    fn filters_that_multiply_their_input_are_checked_before_they_run() {
        // Each `replace` doubles the text: 2^40 bytes after 40 of them.
        let doubling = "{{ 'x'".to_owned() + &" | replace: 'x', 'xx'".repeat(40) + " }}";
        let error = html_error(&doubling);
        assert_eq!(
            error.reason,
            "filter \"replace\": the result would be more than 1024 KiB"
        );
        let squared = "{% assign s = 'x' %}".to_owned()
            + &"{% assign s = s | append: s %}".repeat(15)
            + "{{ s | replace: '', s | size }}{{ s | split: '' | join: s | size }}";
        let error = html_error(&squared);
        assert_eq!(
            error.reason,
            "filter \"replace\": the result would be more than 1024 KiB"
        );
        let joined = "{% assign s = 'x' %}".to_owned()
            + &"{% assign s = s | append: s %}".repeat(15)
            + "{{ s | split: '' | join: s | size }}";
        let error = html_error(&joined);
        assert_eq!(
            error.reason,
            "filter \"join\": the result would be more than 1024 KiB"
        );
        let fine = "{{ 'a-b-c' | replace: '-', ', ' }}|{{ 'a-b' | replace: '' }}|{{ 'a,b' | split: ',' | join }}|{{ 'a,b' | split: ',' | join: '+' }}";
        let compiled = compile(&template(vec![variant("en", email("Hi", fine))])).expect("valid");
        let sent =
            render_with(&compiled, 0, Channel::Email, json!({}), json!({})).expect("renders");
        assert_eq!(sent.email.expect("email").html, "a, b, c|a-b|a b|a+b");
    }

    #[test]
    fn integers_past_64_bits_are_refused_instead_of_panicking_the_parser() {
        // liquid-core parses integer literals with `expect`: this panicked at save time.
        let error =
            html_error("<p>{% assign n = -9223372087435675808 size %}{{ n }} article(s)</p>");
        assert_eq!(
            error.reason,
            "the number -9223372087435675808 does not fit in 64 bits"
        );
        assert_eq!((error.line, error.column), (1, 18));
        for source in [
            "{{ 99999999999999999999 }}",
            "{{ data.items[18446744073709551616] }}",
            "x\n{%- for i in (1..-9223372036854775809) -%}{%- endfor -%}",
            "{{-9223372036854775808}}",
            "{{ 'a' | append: +9223372036854775808 }}",
        ] {
            let error = html_error(source);
            assert!(
                error.reason.starts_with("the number "),
                "{source}: {error:?}"
            );
        }
        // Numbers liquid reads otherwise, or not at all, are left to it.
        let fine = "Order 123456789012345678901234 {{ -9223372036854775808 }} {{ 1.123456789012345678901234 }} {{ '99999999999999999999' }} {{ data.a99999999999999999999 | default: \"x\" }} {% if 2 > 1 %}ok{% endif %}";
        let compiled = compile(&template(vec![variant("en", email("Hi", fine))])).expect("valid");
        let sent =
            render_with(&compiled, 0, Channel::Email, json!({}), json!({})).expect("renders");
        assert_eq!(
            sent.email.expect("email").html,
            "Order 123456789012345678901234 -9223372036854775808 1.1234567890123457 99999999999999999999 x ok"
        );
    }

    #[test]
    fn bounded_loops_keep_liquid_s_meaning_and_errors() {
        let mut t = template(vec![variant(
            "en",
            MessageContent {
                sms: Some(SmsContent {
                    body: "{% for i in (1..3) limit: 2 reversed %}{{ i }}{% endfor %}|{% for x in data.items offset:1 %}{{ x }}{% else %}none{% endfor %}|{% capture c %}{{ data.items | size }}{% endcapture %}{{ c }}|{% tablerow t in data.items cols: 2 %}{{ t }}{% endtablerow %}".into(),
                }),
                ..Default::default()
            },
        )]);
        t.sample_data = Some(relance_proto::convert::json_to_struct(
            &json!({"data": {"items": ["a", "b", "c"]}}),
        ));
        let compiled = compile(&t).expect("valid");
        let sent = render_with(
            &compiled,
            0,
            Channel::Sms,
            json!({}),
            json!({"items": ["a", "b", "c"]}),
        )
        .expect("renders");
        let body = sent.sms.expect("sms").body;
        assert!(body.starts_with("21|bc|3|<tr class=\"row1\">"), "{body}");
        for (source, reason, column) in [
            (
                "{% for i in data.items limt: 2 %}{% endfor %}",
                "\"limit\", \"offset\" or \"reversed\" expected",
                24,
            ),
            (
                "{% for i on data.items %}{% endfor %}",
                "\"in\" expected",
                10,
            ),
            (
                "{% tablerow i in data.items reversed %}{% endtablerow %}",
                "\"cols\", \"limit\" or \"offset\" expected",
                29,
            ),
        ] {
            let error = html_error(source);
            assert_eq!(
                (error.reason.as_str(), error.line, error.column),
                (reason, 1, column),
                "{source}"
            );
        }
    }

    #[test]
    fn renders_thousands_per_second() {
        let html = "<html><body><h1>Hi {{ customer.first_name | default: \"there\" }}</h1>{% for item in data.items %}<p>{{ item.title }} — {{ item.price | times: 1.2 | round: 2 }} {{ item.currency }}</p>{% endfor %}{% for p in products %}<a href=\"{{ p.url }}\">{{ p.title }}</a>{% endfor %}</body></html>";
        let compiled = compile(&template(vec![variant(
            "en",
            email("Your cart, {{ customer.first_name }}", html),
        )]))
        .unwrap();
        let customer =
            json!({"first_name": "Amina", "email": "a@example.com", "city": "Oran", "orders": 3});
        let data = json!({"items": [{"title": "Shoes", "price": 49.9, "currency": "EUR"}, {"title": "Hat", "price": 15, "currency": "EUR"}]});
        let products = json!([{"title": "Mug", "url": "https://shop.example/mug"}, {"title": "Cap", "url": "https://shop.example/cap"}]);
        let input = RenderInput {
            customer: &customer,
            data: &data,
            products: &products,
        };
        let started = std::time::Instant::now();
        let count = 1000;
        for _ in 0..count {
            compiled.render(0, Channel::Email, &input).unwrap();
        }
        let elapsed = started.elapsed();
        // Generous for an unoptimised build on a busy machine; release is far faster.
        assert!(
            elapsed.as_secs_f64() < 5.0,
            "{count} renders took {elapsed:?}"
        );
    }
}
