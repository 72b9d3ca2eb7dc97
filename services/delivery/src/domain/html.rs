//! HTML rewriting for e-mails: tracking links, the open pixel, right-to-left markup and the
//! plain-text part.
//!
//! E-mail HTML is hand-written or exported by editors and is often not well-formed, so this
//! is a tolerant scanner rather than a parser: it only recognises tags, attributes, comments
//! and entities, and copies everything else through untouched. What it does not understand
//! is left as it was, never dropped.

/// One tag found by the scanner.
struct Tag<'a> {
    /// Byte offset of the `<`.
    start: usize,
    /// Byte offset just after the `>` (or the end of the input for an unterminated tag).
    end: usize,
    /// The name as written (compare with `eq_ignore_ascii_case`).
    name: &'a str,
    /// `</name>`.
    closing: bool,
    /// Byte offset just after the name, where attributes start.
    name_end: usize,
}

/// One attribute of a tag; offsets are into the whole document.
struct Attribute<'a> {
    name: &'a str,
    /// The value's span without its quotes; `None` for a bare attribute (`<input checked>`).
    value: Option<(usize, usize)>,
    /// The quote around the value, if any.
    quote: Option<u8>,
}

/// Finds the next tag at or after `from`, skipping comments, doctypes and stray `<`.
fn next_tag(html: &str, mut from: usize) -> Option<Tag<'_>> {
    let bytes = html.as_bytes();
    loop {
        let offset = html.get(from..)?.find('<')?;
        let start = from + offset;
        let rest = &html[start..];
        if rest.starts_with("<!--") {
            // A comment: skip to its end (or to the end of the document).
            match rest.find("-->") {
                Some(close) => from = start + close + 3,
                None => return None,
            }
            continue;
        }
        let mut cursor = start + 1;
        let closing = bytes.get(cursor) == Some(&b'/');
        if closing {
            cursor += 1;
        }
        let name_start = cursor;
        while cursor < bytes.len()
            && (bytes[cursor].is_ascii_alphanumeric() || bytes[cursor] == b'-')
        {
            cursor += 1;
        }
        if cursor == name_start || !bytes[name_start].is_ascii_alphabetic() {
            // `<!DOCTYPE …>`, `<?xml …>`, or a lone `<` in text: not a tag we care about.
            from = start + 1;
            continue;
        }
        let name_end = cursor;
        let end = tag_end(bytes, name_end);
        return Some(Tag {
            start,
            end,
            name: &html[name_start..name_end],
            closing,
            name_end,
        });
    }
}

/// The offset just after the `>` closing a tag whose attributes start at `from`; a `>`
/// inside a quoted value does not close it.
fn tag_end(bytes: &[u8], from: usize) -> usize {
    let mut quote: Option<u8> = None;
    let mut i = from;
    while i < bytes.len() {
        let byte = bytes[i];
        match quote {
            Some(q) => {
                if byte == q {
                    quote = None;
                }
            }
            None => {
                if byte == b'"' || byte == b'\'' {
                    // Only a quote right after `=` opens a value; elsewhere it is a stray
                    // character, but treating it as a quote is the browsers' behaviour too.
                    quote = Some(byte);
                } else if byte == b'>' {
                    return i + 1;
                }
            }
        }
        i += 1;
    }
    bytes.len()
}

/// The attributes of a tag.
fn attributes<'a>(html: &'a str, tag: &Tag<'_>) -> Vec<Attribute<'a>> {
    let bytes = html.as_bytes();
    let mut found = Vec::new();
    let mut i = tag.name_end;
    // The `>` itself is not part of the attributes.
    let limit = if tag.end > tag.name_end && bytes.get(tag.end - 1) == Some(&b'>') {
        tag.end - 1
    } else {
        tag.end
    };
    while i < limit {
        let byte = bytes[i];
        if byte.is_ascii_whitespace() || byte == b'/' {
            i += 1;
            continue;
        }
        let name_start = i;
        while i < limit && !bytes[i].is_ascii_whitespace() && bytes[i] != b'=' && bytes[i] != b'/' {
            i += 1;
        }
        let name = &html[name_start..i];
        while i < limit && bytes[i].is_ascii_whitespace() {
            i += 1;
        }
        if i >= limit || bytes[i] != b'=' {
            found.push(Attribute {
                name,
                value: None,
                quote: None,
            });
            continue;
        }
        i += 1;
        while i < limit && bytes[i].is_ascii_whitespace() {
            i += 1;
        }
        if i < limit && (bytes[i] == b'"' || bytes[i] == b'\'') {
            let quote = bytes[i];
            let value_start = i + 1;
            let mut value_end = value_start;
            while value_end < limit && bytes[value_end] != quote {
                value_end += 1;
            }
            found.push(Attribute {
                name,
                value: Some((value_start, value_end)),
                quote: Some(quote),
            });
            i = value_end + 1;
        } else {
            let value_start = i;
            while i < limit && !bytes[i].is_ascii_whitespace() {
                i += 1;
            }
            found.push(Attribute {
                name,
                value: Some((value_start, i)),
                quote: None,
            });
        }
    }
    found
}

/// Whether a URL is an absolute http(s) one (the only kind that is tracked).
pub fn is_http_url(url: &str) -> bool {
    let url = url.trim();
    let lower = url.get(..8).unwrap_or(url).to_ascii_lowercase();
    lower.starts_with("http://") || lower.starts_with("https://")
}

/// Rewrites the `href` of every `<a>` whose value is an http(s) URL with what `wrap` returns
/// for it (the tracking link); `None` keeps the link as it is. `mailto:`, `tel:`, anchors
/// and relative links are never passed to `wrap`. The URL given to `wrap` has its entities
/// decoded (`&amp;` → `&`), and the new one is escaped for the attribute.
pub fn rewrite_links(html: &str, mut wrap: impl FnMut(&str) -> Option<String>) -> String {
    let mut out = String::with_capacity(html.len() + html.len() / 4);
    let mut copied = 0;
    let mut from = 0;
    while let Some(tag) = next_tag(html, from) {
        from = tag.end;
        if tag.closing || !tag.name.eq_ignore_ascii_case("a") {
            continue;
        }
        for attribute in attributes(html, &tag) {
            if !attribute.name.eq_ignore_ascii_case("href") {
                continue;
            }
            let Some((value_start, value_end)) = attribute.value else {
                break;
            };
            let url = decode_entities(&html[value_start..value_end]);
            let url = url.trim();
            if !is_http_url(url) {
                break;
            }
            let Some(wrapped) = wrap(url) else {
                break;
            };
            out.push_str(&html[copied..value_start]);
            if attribute.quote.is_none() {
                // An unquoted value may not hold every character of the new URL: quote it.
                out.push('"');
                out.push_str(&escape_attribute(&wrapped));
                out.push('"');
            } else {
                out.push_str(&escape_attribute(&wrapped));
            }
            copied = value_end;
            break;
        }
    }
    out.push_str(&html[copied..]);
    out
}

/// Adds a 1×1 image loading `pixel_url` (the open-tracking pixel) just before `</body>`, or
/// at the end when there is no body tag.
pub fn add_open_pixel(html: &str, pixel_url: &str) -> String {
    let pixel = format!(
        "<img src=\"{}\" width=\"1\" height=\"1\" alt=\"\" style=\"display:block;border:0;width:1px;height:1px\" />",
        escape_attribute(pixel_url)
    );
    let mut body_close = None;
    let mut from = 0;
    while let Some(tag) = next_tag(html, from) {
        from = tag.end;
        if tag.closing && tag.name.eq_ignore_ascii_case("body") {
            body_close = Some(tag.start);
        }
    }
    let mut out = String::with_capacity(html.len() + pixel.len());
    match body_close {
        Some(at) => {
            out.push_str(&html[..at]);
            out.push_str(&pixel);
            out.push_str(&html[at..]);
        }
        None => {
            out.push_str(html);
            out.push_str(&pixel);
        }
    }
    out
}

/// Marks the document as right-to-left (and of language `lang`) so that mail clients lay out
/// Arabic, Hebrew, Persian or Urdu correctly: on the `<html>` tag when there is one, else on
/// `<body>`, else by wrapping the fragment in a `<div>`. Left-to-right content is returned
/// unchanged (it is every client's default). Attributes already present are kept.
pub fn with_direction(html: &str, rtl: bool, lang: &str) -> String {
    if !rtl {
        return html.to_string();
    }
    let mut html_tag = None;
    let mut body_tag = None;
    let mut from = 0;
    while let Some(tag) = next_tag(html, from) {
        from = tag.end;
        if tag.closing {
            continue;
        }
        if html_tag.is_none() && tag.name.eq_ignore_ascii_case("html") {
            html_tag = Some(tag);
            break;
        }
        if body_tag.is_none() && tag.name.eq_ignore_ascii_case("body") {
            body_tag = Some(tag);
        }
    }
    let Some(tag) = html_tag.or(body_tag) else {
        let mut out = String::with_capacity(html.len() + 40);
        out.push_str("<div dir=\"rtl\"");
        if !lang.is_empty() {
            out.push_str(" lang=\"");
            out.push_str(&escape_attribute(lang));
            out.push('"');
        }
        out.push('>');
        out.push_str(html);
        out.push_str("</div>");
        return out;
    };
    let mut has_dir = false;
    let mut has_lang = false;
    for attribute in attributes(html, &tag) {
        if attribute.name.eq_ignore_ascii_case("dir") {
            has_dir = true;
        } else if attribute.name.eq_ignore_ascii_case("lang") {
            has_lang = true;
        }
    }
    let mut added = String::new();
    if !has_dir {
        added.push_str(" dir=\"rtl\"");
    }
    if !has_lang && !lang.is_empty() {
        added.push_str(" lang=\"");
        added.push_str(&escape_attribute(lang));
        added.push('"');
    }
    let mut out = String::with_capacity(html.len() + added.len());
    out.push_str(&html[..tag.name_end]);
    out.push_str(&added);
    out.push_str(&html[tag.name_end..]);
    out
}

/// Elements whose content is never text for a reader.
const SKIPPED: [&str; 5] = ["script", "style", "head", "template", "noscript"];

/// Elements that start and end on a line of their own; those of `PARAGRAPHS` also leave a
/// blank line.
const BLOCKS: [&str; 22] = [
    "div", "tr", "li", "ul", "ol", "table", "section", "article", "header", "footer", "nav",
    "aside", "main", "center", "dl", "dt", "dd", "pre", "address", "figure", "tbody", "form",
];
const PARAGRAPHS: [&str; 9] = ["p", "h1", "h2", "h3", "h4", "h5", "h6", "blockquote", "hr"];

/// Builds plain text while collapsing whitespace: spaces and line breaks are only written
/// once the next word arrives, so trailing ones never pile up.
struct TextOut {
    text: String,
    space: bool,
    newlines: usize,
}

impl TextOut {
    fn word(&mut self, word: &str) {
        if self.text.is_empty() {
            // Nothing before: leading breaks and spaces are dropped.
        } else if self.newlines > 0 {
            for _ in 0..self.newlines {
                self.text.push('\n');
            }
        } else if self.space {
            self.text.push(' ');
        }
        self.newlines = 0;
        self.space = false;
        self.text.push_str(word);
    }

    fn text(&mut self, text: &str) {
        let mut first = true;
        let starts_with_space = text.starts_with(|c: char| c.is_whitespace());
        for word in text.split(|c: char| c.is_whitespace()) {
            if word.is_empty() {
                continue;
            }
            if !first || starts_with_space {
                self.space = true;
            }
            first = false;
            self.word(word);
        }
        if text.ends_with(|c: char| c.is_whitespace()) {
            self.space = true;
        }
    }

    fn breaks(&mut self, count: usize) {
        if self.newlines < count {
            self.newlines = count;
        }
    }
}

/// A readable plain-text version of an e-mail's HTML (its `text/plain` part): tags, scripts
/// and styles dropped, links as `text (url)`, block elements on lines of their own,
/// paragraphs separated by a blank line, entities decoded and whitespace collapsed.
pub fn to_text(html: &str) -> String {
    let mut out = TextOut {
        text: String::with_capacity(html.len() / 2),
        space: false,
        newlines: 0,
    };
    // The href of the `<a>` being read, and where its text started in the output.
    let mut link: Option<(String, usize)> = None;
    let mut from = 0;
    while let Some(tag) = next_tag(html, from) {
        out.text(&decode_entities(
            strip_comments(&html[from..tag.start]).as_ref(),
        ));
        from = tag.end;
        let name = tag.name.to_ascii_lowercase();
        if !tag.closing && SKIPPED.contains(&name.as_str()) {
            // Skip to the matching closing tag.
            let mut inner = tag.end;
            let mut resume = html.len();
            while let Some(close) = next_tag(html, inner) {
                inner = close.end;
                if close.closing && close.name.eq_ignore_ascii_case(&name) {
                    resume = close.end;
                    break;
                }
            }
            from = resume;
            continue;
        }
        if name == "br" {
            out.breaks(1);
        } else if name == "li" && !tag.closing {
            out.breaks(1);
            out.word("-");
            out.space = true;
        } else if name == "td" || name == "th" {
            out.space = true;
        } else if PARAGRAPHS.contains(&name.as_str()) {
            out.breaks(2);
        } else if BLOCKS.contains(&name.as_str()) {
            out.breaks(1);
        } else if name == "img" && !tag.closing {
            for attribute in attributes(html, &tag) {
                if attribute.name.eq_ignore_ascii_case("alt")
                    && let Some((start, end)) = attribute.value
                {
                    out.text(&decode_entities(&html[start..end]));
                }
            }
        } else if name == "a" {
            if tag.closing {
                if let Some((href, text_start)) = link.take() {
                    let shown = out.text.get(text_start..).unwrap_or("").trim().to_string();
                    let href_shown = href.strip_prefix("mailto:").unwrap_or(&href);
                    if shown.is_empty() {
                        out.word(href_shown);
                    } else if shown != href_shown && !href.starts_with('#') {
                        out.space = true;
                        out.word(&format!("({href_shown})"));
                    }
                }
            } else {
                link = None;
                for attribute in attributes(html, &tag) {
                    if attribute.name.eq_ignore_ascii_case("href")
                        && let Some((start, end)) = attribute.value
                    {
                        let href = decode_entities(&html[start..end]).trim().to_string();
                        if !href.is_empty() {
                            link = Some((href, out.text.len()));
                        }
                    }
                }
            }
        }
    }
    out.text(&decode_entities(
        strip_comments(html.get(from..).unwrap_or("")).as_ref(),
    ));
    out.text
}

/// Text between two tags may still hold the end of an unterminated comment; `next_tag`
/// skipped well-formed ones already, so only a stray `<!--` needs cutting here.
fn strip_comments(text: &str) -> std::borrow::Cow<'_, str> {
    match text.find("<!--") {
        Some(at) => std::borrow::Cow::Owned(text[..at].to_string()),
        None => std::borrow::Cow::Borrowed(text),
    }
}

/// Escapes a value for a double- or single-quoted attribute.
pub fn escape_attribute(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 8);
    for c in value.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            other => out.push(other),
        }
    }
    out
}

/// Decodes character references: the named ones e-mails commonly hold, and every numeric
/// one. An unknown or malformed reference is kept as written.
pub fn decode_entities(text: &str) -> String {
    if !text.contains('&') {
        return text.to_string();
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('&') {
        out.push_str(&rest[..at]);
        rest = &rest[at..];
        let Some(semicolon) = rest.bytes().take(12).position(|b| b == b';') else {
            out.push('&');
            rest = &rest[1..];
            continue;
        };
        let reference = &rest[1..semicolon];
        match decode_reference(reference) {
            Some(c) => {
                out.push(c);
                rest = &rest[semicolon + 1..];
            }
            None => {
                out.push('&');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

fn decode_reference(reference: &str) -> Option<char> {
    if let Some(number) = reference.strip_prefix('#') {
        let code = match number.strip_prefix(['x', 'X']) {
            Some(hex) => u32::from_str_radix(hex, 16).ok()?,
            None => number.parse::<u32>().ok()?,
        };
        return char::from_u32(code);
    }
    let c = match reference {
        "amp" => '&',
        "lt" => '<',
        "gt" => '>',
        "quot" => '"',
        "apos" => '\'',
        "nbsp" => ' ',
        "copy" => '©',
        "reg" => '®',
        "trade" => '™',
        "euro" => '€',
        "pound" => '£',
        "yen" => '¥',
        "hellip" => '…',
        "mdash" => '—',
        "ndash" => '–',
        "laquo" => '«',
        "raquo" => '»',
        "lsquo" => '‘',
        "rsquo" => '’',
        "ldquo" => '“',
        "rdquo" => '”',
        "bull" => '•',
        "middot" => '·',
        "times" => '×',
        "eacute" => 'é',
        "egrave" => 'è',
        "agrave" => 'à',
        "ccedil" => 'ç',
        "rlm" => '\u{200f}',
        "lrm" => '\u{200e}',
        "zwnj" => '\u{200c}',
        "zwj" => '\u{200d}',
        _ => return None,
    };
    Some(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn track(url: &str) -> Option<String> {
        Some(format!("https://t.example/c/{}", url.len()))
    }

    #[test]
    fn rewrites_http_links_only() {
        let html = r##"<p><a href="https://shop.example/a">A</a> <A HREF='http://shop.example/b'>B</A>
<a href="mailto:x@example.com">mail</a> <a href="tel:+213555">tel</a> <a href="#top">top</a>
<a class="btn" href=https://shop.example/c>C</a> <link href="https://shop.example/style.css"></p>"##;
        let mut seen = Vec::new();
        let out = rewrite_links(html, |url| {
            seen.push(url.to_string());
            track(url)
        });
        assert_eq!(
            seen,
            [
                "https://shop.example/a",
                "http://shop.example/b",
                "https://shop.example/c"
            ]
        );
        assert!(
            out.contains(r#"<a href="https://t.example/c/22">A</a>"#),
            "{out}"
        );
        assert!(
            out.contains(r#"<A HREF='https://t.example/c/21'>B</A>"#),
            "{out}"
        );
        assert!(out.contains(r#"<a class="btn" href="https://t.example/c/22">C</a>"#));
        assert!(out.contains(r#"href="mailto:x@example.com""#));
        assert!(out.contains(r#"href="tel:+213555""#));
        assert!(out.contains(r##"href="#top""##));
        assert!(out.contains(r#"<link href="https://shop.example/style.css">"#));
    }

    #[test]
    fn link_entities_are_decoded_then_reescaped() {
        let html = r#"<a title="x > y" href="https://shop.example/p?a=1&amp;b=2">P</a>"#;
        let mut seen = String::new();
        let out = rewrite_links(html, |url| {
            seen = url.to_string();
            Some("https://t.example/c/x?u=1&v=\"2\"".to_string())
        });
        assert_eq!(seen, "https://shop.example/p?a=1&b=2");
        assert_eq!(
            out,
            r#"<a title="x > y" href="https://t.example/c/x?u=1&amp;v=&quot;2&quot;">P</a>"#
        );
    }

    #[test]
    fn wrap_returning_none_keeps_the_link_and_comments_are_skipped() {
        let html =
            r#"<!-- <a href="https://x.example">no</a> --><a href="https://y.example">y</a>"#;
        let mut count = 0;
        let out = rewrite_links(html, |_| {
            count += 1;
            None
        });
        assert_eq!(out, html);
        assert_eq!(count, 1);
    }

    #[test]
    fn open_pixel_goes_before_body_close_or_at_the_end() {
        let out = add_open_pixel(
            "<html><body><p>Hi</p></BODY></html>",
            "https://t.example/o/x.gif?a=1&b=2",
        );
        assert!(out.starts_with("<html><body><p>Hi</p><img src=\"https://t.example/o/x.gif?a=1&amp;b=2\" width=\"1\" height=\"1\" alt=\"\""));
        assert!(out.ends_with("/></BODY></html>"));
        let out = add_open_pixel("<p>Hi</p>", "https://t.example/o/x.gif");
        assert!(out.starts_with("<p>Hi</p><img src=\"https://t.example/o/x.gif\""));
    }

    #[test]
    fn direction_goes_on_html_then_body_then_a_div() {
        assert_eq!(with_direction("<p>x</p>", false, "ar"), "<p>x</p>");
        assert_eq!(
            with_direction("<!DOCTYPE html><HTML><body>x</body></HTML>", true, "ar"),
            "<!DOCTYPE html><HTML dir=\"rtl\" lang=\"ar\"><body>x</body></HTML>"
        );
        assert_eq!(
            with_direction("<body class=\"m\">x</body>", true, "he"),
            "<body dir=\"rtl\" lang=\"he\" class=\"m\">x</body>"
        );
        assert_eq!(
            with_direction("<p>مرحبا</p>", true, "ar-DZ"),
            "<div dir=\"rtl\" lang=\"ar-DZ\"><p>مرحبا</p></div>"
        );
        assert_eq!(
            with_direction("<html lang=\"fa\"><body>x</body></html>", true, "fa"),
            "<html dir=\"rtl\" lang=\"fa\"><body>x</body></html>"
        );
    }

    #[test]
    fn text_of_a_simple_email() {
        let html = r#"<html><head><title>T</title><style>p { color: red }</style></head>
<body><h1>Hello&nbsp;Amina,</h1>
<p>Your   cart is
waiting: <a href="https://shop.example/cart?a=1&amp;b=2">see your cart</a>.</p>
<script>alert(1)</script>
<ul><li>Shoes &amp; socks</li><li>Hat</li></ul>
<p>Line one<br>Line two</p>
<p><a href="https://shop.example/">https://shop.example/</a> &copy; 2025 &#8212; &#x41;</p>
</body></html>"#;
        assert_eq!(
            to_text(html),
            "Hello Amina,\n\nYour cart is waiting: see your cart (https://shop.example/cart?a=1&b=2).\n\n- Shoes & socks\n- Hat\n\nLine one\nLine two\n\nhttps://shop.example/ © 2025 — A"
        );
    }

    #[test]
    fn arabic_email() {
        let html = "<html><body><h1>مرحبا سارة</h1><p>سلتك في انتظارك: <a href=\"https://shop.example/ar/cart\">إتمام الطلب</a></p></body></html>";
        let rtl = with_direction(html, true, "ar");
        assert!(rtl.starts_with("<html dir=\"rtl\" lang=\"ar\"><body>"));
        let tracked = rewrite_links(&rtl, |_| Some("https://t.example/c/abc".into()));
        assert!(tracked.contains("<a href=\"https://t.example/c/abc\">إتمام الطلب</a>"));
        let with_pixel = add_open_pixel(&tracked, "https://t.example/o/abc.gif");
        assert!(with_pixel.ends_with("/></body></html>"));
        assert_eq!(
            to_text(html),
            "مرحبا سارة\n\nسلتك في انتظارك: إتمام الطلب (https://shop.example/ar/cart)"
        );
    }

    #[test]
    fn text_tolerates_broken_html() {
        assert_eq!(to_text("a < b and <b>c</b"), "a < b and c");
        assert_eq!(to_text("x <!-- never closed"), "x");
        assert_eq!(to_text("<p>a &bogus; &amp</p>"), "a &bogus; &amp");
        assert_eq!(
            to_text("<a href=\"mailto:hi@shop.example\">Write to us</a>"),
            "Write to us (hi@shop.example)"
        );
        assert_eq!(
            to_text("<a href=\"https://x.example\"><img src=\"l.png\"></a>"),
            "https://x.example"
        );
    }
}
