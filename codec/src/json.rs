//! A small JSON parser that keeps byte spans.
//!
//! The description must be re-emitted byte for byte except for the cpreg `array_len` numbers and
//! the objects of removed subsections, so we need to know where each number and object sits in
//! the text; a general-purpose JSON library would
//! re-format everything. Only what QEMU's `json_writer` produces matters, but the parser accepts
//! any RFC 8259 text and bounds its nesting depth (the input comes from the network).
//!
//! The parse sits on the switchover's critical path (the source is stopped while the held
//! device state waits for it), so strings borrow from the text unless they contain an escape
//! (QEMU's writer never escapes a vmstate name), and integers are read digit by digit instead of
//! through `str::parse`: a 4-vCPU description has ~2,300 strings that would otherwise each be an
//! allocation.

use std::borrow::Cow;
use std::ops::Range;

const MAX_DEPTH: usize = 64;

/// A parsed text: every value is a [`Node`] in one vector, and the items of every array and the
/// members of every object lie contiguously in two more. A 4-vCPU description has ~1,500 objects
/// and arrays; as a tree of their own vectors that was as many allocations (and frees) while both
/// QEMUs wait; here it is a handful.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Document<'a> {
    nodes: Vec<Node<'a>>,
    /// Node indices of array items, each array's items contiguous.
    items: Vec<u32>,
    /// Object members (key, node index), each object's members contiguous.
    members: Vec<(Cow<'a, str>, u32)>,
}

#[derive(Debug, Clone, PartialEq)]
enum Node<'a> {
    Null,
    Bool(bool),
    /// An integer that fits u64 (`None` for negative, fractional or huge numbers) and its span.
    Number {
        value: Option<u64>,
        span: Range<usize>,
    },
    String(Cow<'a, str>),
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
        span: Range<usize>,
    },
}

impl<'a> Document<'a> {
    /// The top-level value.
    pub(crate) fn root(&self) -> Json<'_> {
        // The root is the last node pushed: containers are pushed once complete.
        Json {
            doc: self,
            index: self.nodes.len().saturating_sub(1),
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
    fn node(&self) -> Option<&'t Node<'t>> {
        self.doc.nodes.get(self.index)
    }

    fn at(&self, index: u32) -> Json<'t> {
        Json {
            doc: self.doc,
            index: usize::try_from(index).unwrap_or(usize::MAX),
        }
    }

    pub(crate) fn get(&self, key: &str) -> Option<Json<'t>> {
        match self.node()? {
            Node::Object { first, len, .. } => self
                .doc
                .members
                .get(*first..first + len)?
                .iter()
                .find(|(k, _)| k == key)
                .map(|&(_, index)| self.at(index)),
            _ => None,
        }
    }

    pub(crate) fn as_u64(self) -> Option<u64> {
        match self.node()? {
            Node::Number { value, .. } => *value,
            _ => None,
        }
    }

    pub(crate) fn as_str(self) -> Option<&'t str> {
        match self.node()? {
            Node::String(s) => Some(s),
            _ => None,
        }
    }

    pub(crate) fn as_array(self) -> Option<Items<'t>> {
        match self.node()? {
            Node::Array { first, len } => Some(Items {
                doc: Some(self.doc),
                indices: self.doc.items.get(*first..first + len)?.iter(),
            }),
            _ => None,
        }
    }

    /// The text span of a number or an object.
    pub(crate) fn span(self) -> Option<Range<usize>> {
        match self.node()? {
            Node::Number { span, .. } | Node::Object { span, .. } => Some(span.clone()),
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
        utf8,
        pos: 0,
        doc: Document {
            // QEMU's description: about one value per 12 bytes, a quarter of them object members.
            nodes: Vec::with_capacity(text.len() / 12),
            items: Vec::new(),
            members: Vec::with_capacity(text.len() / 48),
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
    Ok(p.doc)
}

struct Parser<'a> {
    text: &'a [u8],
    /// `text`, known to be UTF-8.
    utf8: &'a str,
    pos: usize,
    doc: Document<'a>,
    /// Items and members of the containers being parsed (innermost last): moved to the
    /// document, contiguous, when their container closes.
    pending_items: Vec<u32>,
    pending_members: Vec<(Cow<'a, str>, u32)>,
}

impl<'a> Parser<'a> {
    fn err(&self, message: &'static str) -> JsonError {
        JsonError {
            pos: self.pos,
            message,
        }
    }

    fn peek(&self) -> Option<u8> {
        self.text.get(self.pos).copied()
    }

    fn skip_ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.pos += 1;
        }
    }

    fn expect(&mut self, byte: u8, message: &'static str) -> Result<(), JsonError> {
        if self.peek() == Some(byte) {
            self.pos += 1;
            Ok(())
        } else {
            Err(self.err(message))
        }
    }

    fn literal(&mut self, word: &[u8], value: Node<'a>) -> Result<u32, JsonError> {
        let end = self.pos.saturating_add(word.len());
        if self.text.get(self.pos..end) == Some(word) {
            self.pos = end;
            self.push(value)
        } else {
            Err(self.err("invalid literal"))
        }
    }

    /// Add a complete value to the document; its index.
    fn push(&mut self, node: Node<'a>) -> Result<u32, JsonError> {
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
                self.expect(b':', "expected ':'")?;
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
        let members = self.pending_members.drain(pending..);
        let len = members.len();
        self.doc.members.extend(members);
        self.push(Node::Object {
            first,
            len,
            span: start..self.pos,
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
        let items = self.pending_items.drain(pending..);
        let len = items.len();
        self.doc.items.extend(items);
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

    fn string(&mut self) -> Result<Cow<'a, str>, JsonError> {
        self.pos += 1;
        let start = self.pos;
        // Fast path: no escape before the closing quote, so the text itself is the string.
        let text = self.text;
        let plain_end = text
            .get(start..)
            .and_then(|rest| {
                rest.iter()
                    .position(|&b| b == b'"' || b == b'\\' || b < 0x20)
            })
            .map(|n| start + n);
        if let Some(end) = plain_end {
            if text.get(end) == Some(&b'"') {
                self.pos = end + 1;
                return self
                    .utf8
                    .get(start..end)
                    .map(Cow::Borrowed)
                    .ok_or_else(|| self.err("string is not utf-8"));
            }
        }
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
        String::from_utf8(out)
            .map(Cow::Owned)
            .map_err(|_| self.err("string is not utf-8"))
    }

    fn number(&mut self) -> Result<Node<'a>, JsonError> {
        let start = self.pos;
        if self.peek() == Some(b'-') {
            self.pos += 1;
        }
        let digits_start = self.pos;
        while matches!(self.peek(), Some(b'0'..=b'9')) {
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
        let span = start..self.pos;
        // Only non-negative integers get a value; the digits were checked above.
        let value = if integer && digits_start == start {
            self.text
                .get(span.clone())
                .unwrap_or_default()
                .iter()
                .try_fold(0u64, |acc, &digit| {
                    acc.checked_mul(10)?.checked_add(u64::from(digit - b'0'))
                })
        } else {
            None
        };
        Ok(Node::Number { value, span })
    }
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
    fn rejects_deep_nesting_and_garbage() {
        let deep = "[".repeat(1000);
        assert!(parse(deep.as_bytes()).is_err());
        assert!(parse(b"{\"a\":1} x").is_err());
        assert!(parse(b"{\"a\":\x00}").is_err());
    }
}
