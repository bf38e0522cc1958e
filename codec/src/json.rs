//! A small JSON parser that keeps byte spans.
//!
//! The description must be re-emitted byte for byte except for the cpreg `array_len` numbers and
//! the objects of removed subsections, so we need to know where each number and object sits in
//! the text; a general-purpose JSON library would
//! re-format everything. Only what QEMU's `json_writer` produces matters, but the parser accepts
//! any RFC 8259 text and bounds its nesting depth (the input comes from the network).
//!
//! The parse sits on the switchover's critical path (the source is stopped while the held
//! device state waits for it), so it does constant, small work per byte and per token: strings
//! and keys are spans of the text (only a string with an escape, which QEMU's writer never
//! produces for a vmstate name, is decoded into a side table), string ends are found with
//! `memchr`, integers are read in place, and every node is a small `Copy` value in one vector.

use std::borrow::Cow;
use std::ops::Range;

const MAX_DEPTH: usize = 64;

/// A parsed text: every value is a [`Node`] in one vector, and the items of every array and the
/// members of every object lie contiguously in two more. A 4-vCPU description has ~1,500 objects
/// and arrays; as a tree of their own vectors that was as many allocations (and frees) while both
/// QEMUs wait; here it is a handful.
///
/// The document is a [`Shape`] (owned, and nothing in it but positions into the text and the
/// rare decoded string) paired with the text it was parsed from. A shape depends only on the
/// bytes of its text, so it is valid for any text byte-for-byte equal to that one: the
/// description cache (`description_cache.rs`) keeps one and pairs it with the next migration's
/// identical description instead of parsing it again.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Document<'a> {
    /// The text, known to be UTF-8 (string spans index it).
    text: &'a str,
    shape: Cow<'a, Shape>,
}

/// The text-independent part of a parsed [`Document`].
#[derive(Debug, Clone, PartialEq, Default)]
pub(crate) struct Shape {
    nodes: Vec<Node>,
    /// Node indices of array items, each array's items contiguous.
    items: Vec<u32>,
    /// Object members (key, node index), each object's members contiguous.
    members: Vec<(Str, u32)>,
    /// Decoded strings that had an escape (rare), indexed by [`Str::Decoded`].
    decoded: Vec<String>,
}

/// A string value or key: a span of the text, or (escaped in the text) a decoded copy.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Str {
    Span { start: usize, end: usize },
    Decoded(usize),
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Node {
    Null,
    Bool(bool),
    /// An integer that fits u64 (`None` for negative, fractional or huge numbers) and its span.
    Number {
        value: Option<u64>,
        start: usize,
        end: usize,
    },
    String(Str),
    /// `items[first..first + len]`.
    Array {
        first: usize,
        len: usize,
    },
    /// `members[first..first + len]` and the object's span (`{` to `}` inclusive), so an object
    /// can be cut out of the text (a subsection removed from the description).
    Object {
        first: usize,
        len: usize,
        start: usize,
        end: usize,
    },
}

impl<'a> Document<'a> {
    /// `shape` paired with `text`. The shape must have been parsed from a text byte-for-byte
    /// equal to `text` (the caller compares them); `None` if `text` is not UTF-8, which such a
    /// text cannot be.
    pub(crate) fn with_shape(text: &'a [u8], shape: &'a Shape) -> Option<Document<'a>> {
        Some(Document {
            text: std::str::from_utf8(text).ok()?,
            shape: Cow::Borrowed(shape),
        })
    }

    /// The shape, for a cache to keep.
    pub(crate) fn into_shape(self) -> Shape {
        self.shape.into_owned()
    }

    /// The top-level value.
    pub(crate) fn root(&self) -> Json<'_> {
        // The root is the last node pushed: containers are pushed once complete.
        Json {
            doc: self,
            index: self.shape.nodes.len().saturating_sub(1),
        }
    }

    /// Whether a key is `key`: lengths first, then the bytes (the walk asks for a few keys of
    /// every object, so this must not cost more than a comparison).
    fn key_is(&self, s: Str, key: &str) -> bool {
        match s {
            Str::Span { start, end } => {
                end - start == key.len()
                    && self.text.as_bytes().get(start..end) == Some(key.as_bytes())
            }
            Str::Decoded(index) => self.shape.decoded.get(index).is_some_and(|d| d == key),
        }
    }

    fn str(&self, s: Str) -> &str {
        match s {
            Str::Span { start, end } => self.text.get(start..end).unwrap_or_default(),
            Str::Decoded(index) => self.shape.decoded.get(index).map_or("", String::as_str),
        }
    }
}

/// One value of a [`Document`] (a cheap handle).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Json<'t> {
    doc: &'t Document<'t>,
    index: usize,
}

impl<'t> Json<'t> {
    fn node(&self) -> Option<Node> {
        self.doc.shape.nodes.get(self.index).copied()
    }

    fn at(&self, index: u32) -> Json<'t> {
        Json {
            doc: self.doc,
            index: usize::try_from(index).unwrap_or(usize::MAX),
        }
    }

    pub(crate) fn get(&self, key: &str) -> Option<Json<'t>> {
        match self.node()? {
            Node::Object { first, len, .. } => {
                let doc = self.doc;
                doc.shape
                    .members
                    .get(first..first + len)?
                    .iter()
                    .find(|(k, _)| doc.key_is(*k, key))
                    .map(|&(_, index)| self.at(index))
            }
            _ => None,
        }
    }

    pub(crate) fn as_u64(self) -> Option<u64> {
        match self.node()? {
            Node::Number { value, .. } => value,
            _ => None,
        }
    }

    pub(crate) fn as_str(self) -> Option<&'t str> {
        match self.node()? {
            Node::String(s) => Some(self.doc.str(s)),
            _ => None,
        }
    }

    pub(crate) fn as_array(self) -> Option<Items<'t>> {
        match self.node()? {
            Node::Array { first, len } => Some(Items {
                doc: Some(self.doc),
                indices: self.doc.shape.items.get(first..first + len)?.iter(),
            }),
            _ => None,
        }
    }

    /// The text span of a number or an object.
    pub(crate) fn span(self) -> Option<Range<usize>> {
        match self.node()? {
            Node::Number { start, end, .. } | Node::Object { start, end, .. } => Some(start..end),
            _ => None,
        }
    }
}

/// The items of an array, in order.
#[derive(Debug, Clone, Default)]
pub(crate) struct Items<'t> {
    doc: Option<&'t Document<'t>>,
    indices: std::slice::Iter<'t, u32>,
}

impl<'t> Iterator for Items<'t> {
    type Item = Json<'t>;

    fn next(&mut self) -> Option<Json<'t>> {
        let index = *self.indices.next()?;
        Some(Json {
            doc: self.doc?,
            index: usize::try_from(index).unwrap_or(usize::MAX),
        })
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.indices.size_hint()
    }
}

impl ExactSizeIterator for Items<'_> {}

/// Why a text is not JSON, with the byte position (relative to the text).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct JsonError {
    pub(crate) pos: usize,
    pub(crate) message: &'static str,
}

pub(crate) fn parse(text: &[u8]) -> Result<Document<'_>, JsonError> {
    // Validated once here, so a string between two quotes (ASCII, never inside a multi-byte
    // sequence) can be borrowed without checking it again.
    let utf8 = std::str::from_utf8(text).map_err(|e| JsonError {
        pos: e.valid_up_to(),
        message: "json text is not utf-8",
    })?;
    let mut p = Parser {
        text,
        pos: 0,
        doc: Shape {
            // QEMU's description: about one value per 12 bytes, a quarter of them object members.
            nodes: Vec::with_capacity(text.len() / 12),
            items: Vec::with_capacity(text.len() / 48),
            members: Vec::with_capacity(text.len() / 16),
            decoded: Vec::new(),
        },
        pending_items: Vec::new(),
        pending_members: Vec::new(),
    };
    p.skip_ws();
    p.value(0)?;
    p.skip_ws();
    if p.pos != text.len() {
        return Err(p.err("trailing characters after the json value"));
    }
    Ok(Document {
        text: utf8,
        shape: Cow::Owned(p.doc),
    })
}

struct Parser<'a> {
    text: &'a [u8],
    pos: usize,
    doc: Shape,
    /// Items and members of the containers being parsed (innermost last): moved to the
    /// document, contiguous, when their container closes.
    pending_items: Vec<u32>,
    pending_members: Vec<(Str, u32)>,
}

impl Parser<'_> {
    fn err(&self, message: &'static str) -> JsonError {
        JsonError {
            pos: self.pos,
            message,
        }
    }

    #[inline]
    fn peek(&self) -> Option<u8> {
        self.text.get(self.pos).copied()
    }

    #[inline]
    fn skip_ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.pos += 1;
        }
    }

    fn literal(&mut self, word: &[u8], value: Node) -> Result<u32, JsonError> {
        let end = self.pos.saturating_add(word.len());
        if self.text.get(self.pos..end) == Some(word) {
            self.pos = end;
            self.push(value)
        } else {
            Err(self.err("invalid literal"))
        }
    }

    /// Add a complete value to the document; its index.
    #[inline]
    fn push(&mut self, node: Node) -> Result<u32, JsonError> {
        let index = u32::try_from(self.doc.nodes.len())
            .map_err(|_| self.err("json has too many values"))?;
        self.doc.nodes.push(node);
        Ok(index)
    }

    /// Parse one value; the index of its node.
    fn value(&mut self, depth: usize) -> Result<u32, JsonError> {
        if depth > MAX_DEPTH {
            return Err(self.err("json nested too deeply"));
        }
        match self.peek() {
            Some(b'{') => self.object(depth),
            Some(b'[') => self.array(depth),
            Some(b'"') => {
                let s = self.string()?;
                self.push(Node::String(s))
            }
            Some(b't') => self.literal(b"true", Node::Bool(true)),
            Some(b'f') => self.literal(b"false", Node::Bool(false)),
            Some(b'n') => self.literal(b"null", Node::Null),
            Some(b'-' | b'0'..=b'9') => {
                let number = self.number()?;
                self.push(number)
            }
            Some(_) => Err(self.err("unexpected character")),
            None => Err(self.err("unexpected end of json")),
        }
    }

    fn object(&mut self, depth: usize) -> Result<u32, JsonError> {
        let start = self.pos;
        self.pos += 1;
        let pending = self.pending_members.len();
        self.skip_ws();
        if self.peek() != Some(b'}') {
            loop {
                self.skip_ws();
                if self.peek() != Some(b'"') {
                    return Err(self.err("expected an object key"));
                }
                let key = self.string()?;
                self.skip_ws();
                if self.peek() != Some(b':') {
                    return Err(self.err("expected ':'"));
                }
                self.pos += 1;
                self.skip_ws();
                let value = self.value(depth + 1)?;
                self.pending_members.push((key, value));
                self.skip_ws();
                match self.peek() {
                    Some(b',') => self.pos += 1,
                    Some(b'}') => break,
                    _ => return Err(self.err("expected ',' or '}'")),
                }
            }
        }
        self.pos += 1;
        let first = self.doc.members.len();
        let len = self.pending_members.len() - pending;
        self.doc
            .members
            .extend_from_slice(self.pending_members.get(pending..).unwrap_or_default());
        self.pending_members.truncate(pending);
        self.push(Node::Object {
            first,
            len,
            start,
            end: self.pos,
        })
    }

    fn array(&mut self, depth: usize) -> Result<u32, JsonError> {
        self.pos += 1;
        let pending = self.pending_items.len();
        self.skip_ws();
        if self.peek() != Some(b']') {
            loop {
                self.skip_ws();
                let item = self.value(depth + 1)?;
                self.pending_items.push(item);
                self.skip_ws();
                match self.peek() {
                    Some(b',') => self.pos += 1,
                    Some(b']') => break,
                    _ => return Err(self.err("expected ',' or ']'")),
                }
            }
        }
        self.pos += 1;
        let first = self.doc.items.len();
        let len = self.pending_items.len() - pending;
        self.doc
            .items
            .extend_from_slice(self.pending_items.get(pending..).unwrap_or_default());
        self.pending_items.truncate(pending);
        self.push(Node::Array { first, len })
    }

    fn hex4(&mut self) -> Result<u32, JsonError> {
        let end = self.pos.saturating_add(4);
        let digits = self
            .text
            .get(self.pos..end)
            .ok_or_else(|| self.err("truncated \\u escape"))?;
        let text = std::str::from_utf8(digits).map_err(|_| self.err("invalid \\u escape"))?;
        let value = u32::from_str_radix(text, 16).map_err(|_| self.err("invalid \\u escape"))?;
        self.pos = end;
        Ok(value)
    }

    #[inline]
    fn string(&mut self) -> Result<Str, JsonError> {
        self.pos += 1;
        let start = self.pos;
        // Fast path: the first quote, backslash or control character is the closing quote, so
        // the text itself is the string. Names are short (a few words), so the scan looks at
        // eight bytes per step in a register rather than calling a vectorised search.
        if let Some(n) = first_special(self.text.get(start..).unwrap_or_default()) {
            if self.text.get(start + n) == Some(&b'"') {
                self.pos = start + n + 1;
                return Ok(Str::Span {
                    start,
                    end: start + n,
                });
            }
        }
        self.escaped_string()
    }

    /// The general case from the string's first byte: escapes decoded, errors at their byte.
    #[cold]
    #[inline(never)]
    fn escaped_string(&mut self) -> Result<Str, JsonError> {
        let mut out: Vec<u8> = Vec::new();
        loop {
            let byte = self.peek().ok_or_else(|| self.err("unterminated string"))?;
            self.pos += 1;
            match byte {
                b'"' => break,
                b'\\' => {
                    let esc = self.peek().ok_or_else(|| self.err("unterminated escape"))?;
                    self.pos += 1;
                    let ch = match esc {
                        b'"' => '"',
                        b'\\' => '\\',
                        b'/' => '/',
                        b'b' => '\u{8}',
                        b'f' => '\u{c}',
                        b'n' => '\n',
                        b'r' => '\r',
                        b't' => '\t',
                        b'u' => {
                            let code = self.hex4()?;
                            char::from_u32(code).unwrap_or(char::REPLACEMENT_CHARACTER)
                        }
                        _ => return Err(self.err("invalid escape")),
                    };
                    let mut buf = [0u8; 4];
                    out.extend_from_slice(ch.encode_utf8(&mut buf).as_bytes());
                }
                0x00..=0x1f => return Err(self.err("control character in string")),
                _ => out.push(byte),
            }
        }
        let decoded = String::from_utf8(out).map_err(|_| self.err("string is not utf-8"))?;
        self.doc.decoded.push(decoded);
        Ok(Str::Decoded(self.doc.decoded.len() - 1))
    }

    fn number(&mut self) -> Result<Node, JsonError> {
        let start = self.pos;
        if self.peek() == Some(b'-') {
            self.pos += 1;
        }
        let digits_start = self.pos;
        // Integer digits accumulate as they are scanned (None once past u64).
        let mut value = Some(0u64);
        while let Some(digit @ b'0'..=b'9') = self.peek() {
            value = value
                .and_then(|v| v.checked_mul(10))
                .and_then(|v| v.checked_add(u64::from(digit - b'0')));
            self.pos += 1;
        }
        let digits = self.pos - digits_start;
        // RFC 8259: no leading zeros (so a number's text is canonical and a patch round-trips).
        if digits == 0 || (digits > 1 && self.text.get(digits_start) == Some(&b'0')) {
            return Err(self.err("invalid number"));
        }
        let mut integer = true;
        if self.peek() == Some(b'.') {
            integer = false;
            self.pos += 1;
            while matches!(self.peek(), Some(b'0'..=b'9')) {
                self.pos += 1;
            }
        }
        if matches!(self.peek(), Some(b'e' | b'E')) {
            integer = false;
            self.pos += 1;
            if matches!(self.peek(), Some(b'+' | b'-')) {
                self.pos += 1;
            }
            while matches!(self.peek(), Some(b'0'..=b'9')) {
                self.pos += 1;
            }
        }
        // Only non-negative integers get a value.
        let value = if integer && digits_start == start {
            value
        } else {
            None
        };
        Ok(Node::Number {
            value,
            start,
            end: self.pos,
        })
    }
}

/// Offset of the first `"`, `\\` or control character (below 0x20) in `bytes`.
#[inline]
fn first_special(bytes: &[u8]) -> Option<usize> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    let mut chunks = bytes.chunks_exact(8);
    let mut offset = 0;
    for chunk in &mut chunks {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        let x = u64::from_le_bytes(word);
        // A byte's high bit is set where it is below 0x20 / equal to `"` / equal to `\\`
        // (exact for the lowest such byte, which is all that is used).
        let quote = x ^ (ONES * u64::from(b'"'));
        let backslash = x ^ (ONES * u64::from(b'\\'));
        let found = ((x.wrapping_sub(ONES * 0x20))
            | (quote.wrapping_sub(ONES) & !quote)
            | (backslash.wrapping_sub(ONES) & !backslash))
            & !x
            & HIGHS;
        if found != 0 {
            return Some(offset + usize::try_from(found.trailing_zeros() / 8).unwrap_or(0));
        }
        offset += 8;
    }
    chunks
        .remainder()
        .iter()
        .position(|&b| b == b'"' || b == b'\\' || b < 0x20)
        .map(|n| offset + n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_with_spans() {
        let text = br#"{"a": [1, {"b": "x\"y"}], "n": 261}"#;
        let doc = parse(text).unwrap();
        let json = doc.root();
        let n = json.get("n").unwrap();
        assert_eq!(n.as_u64(), Some(261));
        assert_eq!(&text[n.span().unwrap()], b"261");
        let inner = json.get("a").unwrap().as_array().unwrap().nth(1).unwrap();
        assert_eq!(inner.get("b").unwrap().as_str(), Some("x\"y"));
        assert_eq!(&text[inner.span().unwrap()], br#"{"b": "x\"y"}"#);
        assert_eq!(json.span(), Some(0..text.len()));
    }

    #[test]
    fn a_shape_pairs_with_any_copy_of_its_text() {
        let text = br#"{"k\u0041": [1, {"b": "x"}], "n": 261}"#.to_vec();
        let parsed = parse(&text).unwrap();
        let shape = parsed.clone().into_shape();
        let copy = text.clone();
        let paired = Document::with_shape(&copy, &shape).unwrap();
        assert_eq!(paired, parsed);
        assert_eq!(paired.root().get("n").and_then(Json::as_u64), Some(261));
        assert_eq!(
            paired.root().get("n").and_then(Json::span),
            parsed.root().get("n").and_then(Json::span)
        );
        let inner = paired
            .root()
            .get("kA")
            .and_then(Json::as_array)
            .unwrap()
            .nth(1)
            .unwrap();
        assert_eq!(inner.get("b").and_then(Json::as_str), Some("x"));
        // Not UTF-8: no document (a text equal to the shape's never is).
        assert!(Document::with_shape(b"\xff", &shape).is_none());
    }

    #[test]
    fn rejects_deep_nesting_and_garbage() {
        let deep = "[".repeat(1000);
        assert!(parse(deep.as_bytes()).is_err());
        assert!(parse(b"{\"a\":1} x").is_err());
        assert!(parse(b"{\"a\":\x00}").is_err());
    }

    #[test]
    fn first_special_matches_a_byte_by_byte_scan() {
        let naive = |bytes: &[u8]| {
            bytes
                .iter()
                .position(|&b| b == b'"' || b == b'\\' || b < 0x20)
        };
        // Every position within and across the 8-byte steps, every kind of special byte, and
        // bytes that a wrong bit trick would confuse with them (0x20, 0x21, 0x23, 0x5b, 0x5d,
        // 0x7f, 0x80, 0xa2, 0xdc, 0xff).
        let specials = [b'"', b'\\', 0x00, 0x01, 0x1f];
        let fillers = [
            b'a', 0x20, 0x21, 0x23, 0x5b, 0x5d, 0x7f, 0x80, 0xa2, 0xdc, 0xff,
        ];
        for len in 0..20 {
            for &filler in &fillers {
                let plain = vec![filler; len];
                assert_eq!(first_special(&plain), naive(&plain));
                for at in 0..len {
                    for &special in &specials {
                        let mut bytes = plain.clone();
                        bytes[at] = special;
                        assert_eq!(first_special(&bytes), Some(at));
                        // A second special byte after the first must not move the answer.
                        if let Some(last) = bytes.last_mut() {
                            *last = b'"';
                        }
                        assert_eq!(first_special(&bytes), Some(at), "{bytes:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn escaped_strings_decode_and_errors_keep_their_positions() {
        let doc = parse(br#"{"k\u0041": "a\nb", "plain": "p"}"#).unwrap();
        assert_eq!(doc.root().get("kA").and_then(Json::as_str), Some("a\nb"));
        assert_eq!(doc.root().get("plain").and_then(Json::as_str), Some("p"));
        let err = parse(b"[\"ab\x01\"]").unwrap_err();
        assert_eq!((err.pos, err.message), (5, "control character in string"));
        let err = parse(b"[\"ab\\q\"]").unwrap_err();
        assert_eq!((err.pos, err.message), (6, "invalid escape"));
        let err = parse(b"[\"abcdefghijk").unwrap_err();
        assert_eq!((err.pos, err.message), (13, "unterminated string"));
    }
}
