//! Attributes a request names (a header, a query parameter, a JSON body
//! field) and how each is read, with every copy a backend might take for it.

use crate::config::AttributeConfig;
use crate::headers::{same_header, HeaderMap};
use crate::request::RequestLine;

/// Where an attachment value is read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attribute {
    /// A request header (lowercased name).
    Header(Vec<u8>),
    /// A query parameter.
    Query(String),
    /// A JSON pointer into the request body.
    JsonBody(JsonPointer),
}

/// A JSON pointer (RFC 6901), split into unescaped names once, at
/// configuration time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonPointer {
    text: String,
    names: Vec<String>,
}

impl JsonPointer {
    /// From its text: empty (the whole document) or `/`-separated names with
    /// `~1` for `/` and `~0` for `~`.
    pub fn parse(text: &str) -> Self {
        let names = match text.strip_prefix('/') {
            Some(rest) => rest
                .split('/')
                .map(|n| n.replace("~1", "/").replace("~0", "~"))
                .collect(),
            None => Vec::new(),
        };
        JsonPointer {
            text: text.to_string(),
            names,
        }
    }

    /// The pointer as configured.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl From<&AttributeConfig> for Attribute {
    fn from(a: &AttributeConfig) -> Self {
        match a {
            AttributeConfig::Header(h) => Attribute::Header(h.to_ascii_lowercase().into_bytes()),
            AttributeConfig::Query(q) => Attribute::Query(q.clone()),
            AttributeConfig::JsonBody(p) if p.starts_with('/') => {
                Attribute::JsonBody(JsonPointer::parse(p))
            }
            AttributeConfig::JsonBody(p) => Attribute::JsonBody(JsonPointer::parse(&format!(
                "/{}",
                p.replace('~', "~0").replace('/', "~1")
            ))),
        }
    }
}

impl Attribute {
    /// True when the value is in the request body.
    pub fn needs_body(&self) -> bool {
        matches!(self, Attribute::JsonBody(_))
    }

    /// Reads a header or query value. `None` if absent (or a body attribute).
    ///
    /// A header or parameter given more than once is [`AttrValue::Repeated`]:
    /// backends disagree on which copy counts, so no copy is trusted. Copies
    /// count across spellings a backend may merge: a header's case and
    /// `_`/`-`, a query parameter's case (ASP.NET binds it case-insensitively).
    pub fn read_from_request(&self, headers: &HeaderMap<'_>, line: &RequestLine<'_>) -> AttrValue {
        // Each candidate: whether it has the exact name, and its value. Only
        // the exact name gives the value; other spellings count as copies.
        let single = |candidates: &mut dyn Iterator<Item = (bool, Option<String>)>| {
            let (mut copies, mut value) = (0, None);
            for (exact, v) in candidates {
                copies += 1;
                if exact {
                    value = v;
                }
            }
            match (copies, value) {
                (2.., _) => AttrValue::Repeated,
                (_, Some(v)) => AttrValue::Found(v),
                _ => AttrValue::Absent,
            }
        };
        match self {
            Attribute::Header(h) => single(
                &mut headers
                    .iter()
                    .filter(|(n, _)| same_header(n, h))
                    .map(|(n, v)| {
                        let value = std::str::from_utf8(v).ok().map(str::to_string);
                        (n.eq_ignore_ascii_case(h), value)
                    }),
            ),
            Attribute::Query(name) => single(
                &mut form_urlencoded::parse(line.query)
                    .filter(|(k, _)| same_name_ignoring_case(k, name))
                    .map(|(k, v)| (k == name.as_str(), Some(v.into_owned()))),
            ),
            Attribute::JsonBody(_) => AttrValue::Absent,
        }
    }
}

/// A header or query attribute as read from the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttrValue {
    /// Exactly one value.
    Found(String),
    /// Not present (or not UTF-8).
    Absent,
    /// Present more than once.
    Repeated,
}

/// Outcome of reading a JSON body attribute.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyValue {
    /// The field's value (strings as-is, numbers and booleans in JSON form).
    Found(String),
    /// The body is not JSON.
    NotJson,
    /// The body nests arrays and objects deeper than the parser follows
    /// ([`MAX_BODY_DEPTH`]): it may be JSON, but it is not read.
    TooDeep,
    /// The field is absent, null, or an object/array.
    Missing,
    /// An object in the body names one field twice, or the field read
    /// beside a copy differing only in case: parsers disagree on which copy
    /// counts (Go's `encoding/json` matches names case-insensitively), so the
    /// backend might not read the value checked.
    Duplicate,
}

/// Names that a case-insensitive reader takes for one another: ASCII letters
/// in either case, and the four other characters whose simple case mappings
/// lead to an ASCII letter (the Kelvin sign to `k`, the long `ſ` to `s`, the
/// dotted `İ` and the dotless `ı` to `i`). Go's `encoding/json` matches a key
/// to a field by the upper case of each character's lower case, which folds
/// all four. Other non-ASCII letters compare as they are: full case tables
/// would grow the module, and a backend matching them needs a field name
/// outside ASCII.
pub fn same_name_ignoring_case(a: &str, b: &str) -> bool {
    let fold = |c: char| match c {
        '\u{212A}' => 'k',
        '\u{17F}' => 's',
        '\u{130}' | '\u{131}' => 'i',
        c => c.to_ascii_lowercase(),
    };
    a.chars().map(fold).eq(b.chars().map(fold))
}

/// Follows `pointer` in `doc`. `Err` when an object on the way holds the
/// next name more than once up to case.
fn follow<'v>(
    doc: &'v serde_json::Value,
    pointer: &JsonPointer,
) -> Result<Option<&'v serde_json::Value>, ()> {
    let mut at = doc;
    for token in &pointer.names {
        at = match at {
            serde_json::Value::Object(fields) => {
                if fields
                    .keys()
                    .filter(|k| same_name_ignoring_case(k, token))
                    .count()
                    > 1
                {
                    return Err(());
                }
                match fields.get(token) {
                    Some(v) => v,
                    None => return Ok(None),
                }
            }
            serde_json::Value::Array(items) => {
                // RFC 6901 indices: digits only, no leading zero.
                let index = (!token.starts_with('+') && (token == "0" || !token.starts_with('0')))
                    .then(|| token.parse::<usize>().ok())
                    .flatten();
                match index.and_then(|i| items.get(i)) {
                    Some(v) => v,
                    None => return Ok(None),
                }
            }
            _ => return Ok(None),
        };
    }
    Ok(Some(at))
}

/// How many levels of arrays and objects a JSON body may nest: serde_json
/// stops at its 128th, which keeps the parser's recursion within the Wasm
/// stack.
pub const MAX_BODY_DEPTH: usize = 127;

/// A request body parsed once, for every JSON-body check of a rule.
pub struct JsonBody(serde_json::Value);

impl JsonBody {
    /// Parses `body`, refusing a repeated field (any depth) and nesting
    /// past [`MAX_BODY_DEPTH`]; the error is the [`BodyValue`] that says why.
    pub fn parse(body: &[u8]) -> Result<JsonBody, BodyValue> {
        match serde_json::from_slice::<UniqueFields>(body) {
            Ok(UniqueFields(doc)) => Ok(JsonBody(doc)),
            // The visitor's only error is a repeated field; the rest is syntax,
            // or nesting past the parser's depth limit (which serde_json files
            // under syntax and names only in its message).
            Err(e) if e.classify() == serde_json::error::Category::Data => {
                Err(BodyValue::Duplicate)
            }
            Err(e) if e.to_string().starts_with("recursion limit exceeded") => {
                Err(BodyValue::TooDeep)
            }
            Err(_) => Err(BodyValue::NotJson),
        }
    }

    /// The value at `pointer`.
    pub fn value_at(&self, pointer: &JsonPointer) -> BodyValue {
        match follow(&self.0, pointer) {
            Ok(Some(serde_json::Value::String(s))) => BodyValue::Found(s.clone()),
            Ok(Some(serde_json::Value::Number(n))) => BodyValue::Found(number_text(n)),
            Ok(Some(serde_json::Value::Bool(b))) => BodyValue::Found(b.to_string()),
            Ok(_) => BodyValue::Missing,
            Err(()) => BodyValue::Duplicate,
        }
    }
}

/// Extracts `pointer` from a JSON body (an empty body is not JSON).
pub fn read_json_body(body: &[u8], pointer: &JsonPointer) -> BodyValue {
    match JsonBody::parse(body) {
        Ok(doc) => doc.value_at(pointer),
        Err(why) => why,
    }
}

/// A body number as text: integers in decimal (`17`), other numbers in
/// positional notation with at least one decimal (`17.0`, `0.5`, never
/// `1e21`), so `17` and `17.0` stay different values. Written with Rust's
/// own float formatting, which serde's messages already need, rather than
/// serde_json's printer, which would be in the module for this one use.
fn number_text(n: &serde_json::Number) -> String {
    if let Some(u) = n.as_u64() {
        return u.to_string();
    }
    if let Some(i) = n.as_i64() {
        return i.to_string();
    }
    let f = n.as_f64().unwrap_or(0.0);
    let mut text = f.to_string();
    if !text.contains('.') {
        text.push_str(".0");
    }
    text
}

/// A JSON document read as `serde_json::Value`, except that an object naming
/// a field twice is an error (serde_json keeps the last copy silently).
struct UniqueFields(serde_json::Value);

impl<'de> serde::Deserialize<'de> for UniqueFields {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(UniqueFieldsVisitor).map(UniqueFields)
    }
}

struct UniqueFieldsVisitor;

impl<'de> serde::de::Visitor<'de> for UniqueFieldsVisitor {
    type Value = serde_json::Value;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Self::Value, E> {
        Ok(v.into())
    }
    fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
        Ok(v.into())
    }
    fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
        Ok(v.into())
    }
    fn visit_f64<E>(self, v: f64) -> Result<Self::Value, E> {
        Ok(serde_json::Number::from_f64(v).map_or(serde_json::Value::Null, Into::into))
    }
    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(v.into())
    }
    fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
        Ok(v.into())
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(serde_json::Value::Null)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut items = Vec::new();
        while let Some(UniqueFields(v)) = seq.next_element()? {
            items.push(v);
        }
        Ok(serde_json::Value::Array(items))
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut fields = serde_json::Map::new();
        while let Some(name) = map.next_key::<String>()? {
            let UniqueFields(v) = map.next_value()?;
            if fields.insert(name, v).is_some() {
                return Err(serde::de::Error::custom("a field is repeated"));
            }
        }
        Ok(serde_json::Value::Object(fields))
    }
}

#[cfg(test)]
#[path = "attribute_tests.rs"]
mod tests;
