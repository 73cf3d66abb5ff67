//! Route rules: compiled matchers and the requirements a matching request must meet.

use crate::config::{AttributeConfig, MatchConfig};
use crate::credential::Extractor;
use crate::headers::{same_header, HeaderMap};
use crate::ratelimit::Limit;

/// The parts of a request that rules look at, borrowed from the header map.
#[derive(Debug, Clone, Copy, Default)]
pub struct RequestLine<'h> {
    /// `:method`.
    pub method: &'h [u8],
    /// `:path` up to `?`.
    pub path: &'h [u8],
    /// `:path` after `?` (empty if none).
    pub query: &'h [u8],
    /// `:authority` without port.
    pub host: &'h [u8],
}

impl<'h> RequestLine<'h> {
    /// Reads the pseudo-headers.
    pub fn from_headers(headers: &HeaderMap<'h>) -> Self {
        let full = headers.get(b":path").unwrap_or(b"/");
        let (path, query) = match full.iter().position(|b| *b == b'?') {
            Some(q) => (&full[..q], &full[q + 1..]),
            None => (full, &b""[..]),
        };
        let authority = headers.get(b":authority").unwrap_or(b"");
        let host = strip_port(authority);
        // `example.com.` is the same host as `example.com`.
        let host = host.strip_suffix(b".").unwrap_or(host);
        RequestLine {
            method: headers.get(b":method").unwrap_or(b""),
            path,
            query,
            host,
        }
    }
}

fn strip_port(authority: &[u8]) -> &[u8] {
    if authority.first() == Some(&b'[') {
        // [v6]:port
        return match authority.iter().position(|b| *b == b']') {
            Some(end) => &authority[..=end],
            None => authority,
        };
    }
    match authority.iter().rposition(|b| *b == b':') {
        Some(c) => &authority[..c],
        None => authority,
    }
}

/// A compiled matcher.
#[derive(Debug, Clone, Default)]
pub struct Matcher {
    host: Option<HostMatch>,
    path: Option<Vec<u8>>,
    path_prefix: Option<Vec<u8>>,
    methods: Vec<Vec<u8>>,
}

#[derive(Debug, Clone)]
enum HostMatch {
    Exact(Vec<u8>),
    /// `*.example.com` stored as `.example.com`.
    Suffix(Vec<u8>),
}

impl Matcher {
    /// Compiles a match block.
    pub fn new(m: &MatchConfig) -> Self {
        let host = m.host.as_ref().map(|h| {
            let h = h.to_ascii_lowercase();
            match h.strip_prefix('*') {
                Some(rest) => HostMatch::Suffix(rest.as_bytes().to_vec()),
                None => HostMatch::Exact(h.into_bytes()),
            }
        });
        Matcher {
            host,
            path: m.path.as_ref().map(|p| p.as_bytes().to_vec()),
            path_prefix: m.path_prefix.as_ref().map(|p| p.as_bytes().to_vec()),
            methods: m
                .methods
                .iter()
                .map(|x| x.to_ascii_uppercase().into_bytes())
                .collect(),
        }
    }

    /// True when every present criterion matches.
    pub fn matches(&self, r: &RequestLine<'_>) -> bool {
        let host_ok = match &self.host {
            None => true,
            Some(HostMatch::Exact(h)) => r.host.eq_ignore_ascii_case(h),
            Some(HostMatch::Suffix(s)) => {
                r.host.len() > s.len() && r.host[r.host.len() - s.len()..].eq_ignore_ascii_case(s)
            }
        };
        host_ok
            && self.path.as_ref().is_none_or(|p| r.path == p.as_slice())
            && self
                .path_prefix
                .as_ref()
                .is_none_or(|p| r.path.starts_with(p))
            && (self.methods.is_empty() || self.methods.iter().any(|m| m == r.method))
    }
}

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

/// Extracts `pointer` from a JSON body (an empty body is not JSON).
pub fn read_json_body(body: &[u8], pointer: &JsonPointer) -> BodyValue {
    let doc = match serde_json::from_slice::<UniqueFields>(body) {
        Ok(UniqueFields(doc)) => doc,
        // The visitor's only error is a repeated field; the rest is syntax,
        // or nesting past the parser's depth limit (which serde_json files
        // under syntax and names only in its message).
        Err(e) if e.classify() == serde_json::error::Category::Data => return BodyValue::Duplicate,
        Err(e) if e.to_string().starts_with("recursion limit exceeded") => {
            return BodyValue::TooDeep
        }
        Err(_) => return BodyValue::NotJson,
    };
    match follow(&doc, pointer) {
        Ok(Some(serde_json::Value::String(s))) => BodyValue::Found(s.clone()),
        Ok(Some(serde_json::Value::Number(n))) => BodyValue::Found(number_text(n)),
        Ok(Some(serde_json::Value::Bool(b))) => BodyValue::Found(b.to_string()),
        Ok(_) => BodyValue::Missing,
        Err(()) => BodyValue::Duplicate,
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

/// An attachment requirement.
#[derive(Debug, Clone)]
pub struct AttachmentCheck {
    /// The key's attachment set to look in.
    pub set: String,
    /// Where the value comes from.
    pub attribute: Attribute,
}

/// What a `require` rule asks of the key, compiled.
#[derive(Debug, Clone, Default)]
pub struct Requirement {
    /// At least one of these (if non-empty).
    pub scopes_any_of: Vec<String>,
    /// All of these.
    pub scopes_all_of: Vec<String>,
    /// Key environment in this list (if non-empty).
    pub environments: Vec<String>,
    /// Attachment check.
    pub attachment: Option<AttachmentCheck>,
    /// Credential sources overriding the top-level ones.
    pub extractor: Option<Extractor>,
    /// Limit overriding the key's, with the rule's name for its bucket.
    pub limit: Option<(Limit, String)>,
}

impl Requirement {
    /// True when `scopes` and `environment` satisfy the scope and environment checks.
    pub fn permits(&self, scopes: &[String], environment: Option<&str>) -> bool {
        let has = |s: &String| scopes.iter().any(|k| k == s);
        (self.scopes_any_of.is_empty() || self.scopes_any_of.iter().any(has))
            && self.scopes_all_of.iter().all(has)
            && (self.environments.is_empty()
                || environment.is_some_and(|e| self.environments.iter().any(|x| x == e)))
    }
}

/// A rule's effect.
#[derive(Debug, Clone)]
pub enum Effect {
    /// No key needed.
    Public,
    /// 403 `route_not_allowed`.
    Deny,
    /// A key meeting the requirement.
    Require(Box<Requirement>),
}

/// A compiled rule.
#[derive(Debug, Clone)]
pub struct Rule {
    /// Name for logs and bucket keys.
    pub name: String,
    /// When it applies.
    pub matcher: Matcher,
    /// What it does.
    pub effect: Effect,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line<'a>(pairs: &'a [(&'a str, &'a str)]) -> (HeaderMap<'a>, RequestLine<'a>) {
        let map = HeaderMap::from_pairs(
            pairs
                .iter()
                .map(|(n, v)| (n.as_bytes(), v.as_bytes()))
                .collect(),
        );
        let l = RequestLine::from_headers(&map);
        (map, l)
    }

    #[test]
    fn request_line_splits_path_query_and_port() {
        let (_, l) = line(&[
            (":method", "POST"),
            (":path", "/a/b?x=1&y=2"),
            (":authority", "Api.Example.com:8443"),
        ]);
        assert_eq!(
            (l.method, l.path, l.query, l.host),
            (
                &b"POST"[..],
                &b"/a/b"[..],
                &b"x=1&y=2"[..],
                &b"Api.Example.com"[..]
            )
        );
        let (_, l) = line(&[(":authority", "[::1]:80")]);
        assert_eq!(l.host, b"[::1]");
    }

    #[test]
    fn matcher_criteria() {
        let m = Matcher::new(&MatchConfig {
            host: Some("*.example.com".into()),
            path: None,
            path_prefix: Some("/api/".into()),
            methods: vec!["post".into()],
        });
        let (_, ok) = line(&[
            (":method", "POST"),
            (":path", "/api/v1?q"),
            (":authority", "a.example.com"),
        ]);
        assert!(m.matches(&ok));
        let (_, bad_host) = line(&[
            (":method", "POST"),
            (":path", "/api/v1"),
            (":authority", "example.com"),
        ]);
        assert!(!m.matches(&bad_host));
        let (_, bad_method) = line(&[
            (":method", "GET"),
            (":path", "/api/v1"),
            (":authority", "a.example.com"),
        ]);
        assert!(!m.matches(&bad_method));
        let exact = Matcher::new(&MatchConfig {
            path: Some("/api/v1/ping".into()),
            ..Default::default()
        });
        let (_, p) = line(&[(":path", "/api/v1/ping?x=1")]);
        assert!(exact.matches(&p));
        let (_, p) = line(&[(":path", "/api/v1/ping/x")]);
        assert!(!exact.matches(&p));
    }

    #[test]
    fn bodies_nesting_past_the_depth_limit_are_told_apart_from_broken_ones() {
        let at_c = JsonPointer::parse("/c");
        // The object holding "c" is one level; the arrays beside it the rest.
        let nested = |levels: usize| {
            let inner = levels - 1;
            format!(
                r#"{{"c":"c-17","x":{}{}}}"#,
                "[".repeat(inner),
                "]".repeat(inner)
            )
            .into_bytes()
        };
        assert_eq!(
            read_json_body(&nested(MAX_BODY_DEPTH), &at_c),
            BodyValue::Found("c-17".into())
        );
        assert_eq!(
            read_json_body(&nested(MAX_BODY_DEPTH + 1), &at_c),
            BodyValue::TooDeep
        );
        assert_eq!(read_json_body(&nested(5000), &at_c), BodyValue::TooDeep);
        // Unbalanced but shallow is still plain syntax.
        assert_eq!(read_json_body(br#"{"c":[[["#, &at_c), BodyValue::NotJson);
    }

    #[test]
    fn attributes_from_header_query_and_body() {
        let (map, l) = line(&[
            (":path", "/x?campaign=c%2D17&other=1"),
            ("x-campaign", "c-42"),
        ]);
        assert_eq!(
            Attribute::Query("campaign".into()).read_from_request(&map, &l),
            AttrValue::Found("c-17".into())
        );
        assert_eq!(
            Attribute::Header(b"x-campaign".to_vec()).read_from_request(&map, &l),
            AttrValue::Found("c-42".into())
        );
        let (map, l) = line(&[
            (":path", "/x?campaign=c-17&campaign=c-99"),
            ("x-c", "a"),
            ("x-c", "b"),
        ]);
        assert_eq!(
            Attribute::Query("campaign".into()).read_from_request(&map, &l),
            AttrValue::Repeated
        );
        assert_eq!(
            Attribute::Header(b"x-c".to_vec()).read_from_request(&map, &l),
            AttrValue::Repeated
        );
        assert_eq!(
            Attribute::Header(b"x-d".to_vec()).read_from_request(&map, &l),
            AttrValue::Absent
        );
        let top = Attribute::from(&AttributeConfig::JsonBody("flo_campaign_id".into()));
        assert_eq!(
            top,
            Attribute::JsonBody(JsonPointer::parse("/flo_campaign_id"))
        );
        assert_eq!(
            read_json_body(
                br#"{"flo_campaign_id":"c-17"}"#,
                &JsonPointer::parse("/flo_campaign_id")
            ),
            BodyValue::Found("c-17".into())
        );
        assert_eq!(
            read_json_body(br#"{"a":{"b":[1,17]}}"#, &JsonPointer::parse("/a/b/1")),
            BodyValue::Found("17".into())
        );
        let at_c = JsonPointer::parse("/c");
        for (body, text) in [
            (&br#"{"c":17}"#[..], "17"),
            (br#"{"c":-3}"#, "-3"),
            (br#"{"c":17.0}"#, "17.0"),
            (br#"{"c":0.5}"#, "0.5"),
            (br#"{"c":-2.25}"#, "-2.25"),
            (br#"{"c":1e21}"#, "1000000000000000000000.0"),
            (br#"{"c":true}"#, "true"),
        ] {
            assert_eq!(read_json_body(body, &at_c), BodyValue::Found(text.into()));
        }
        assert_eq!(read_json_body(br#"{"c":null}"#, &at_c), BodyValue::Missing);
        assert_eq!(
            read_json_body(br#"{"a":1}"#, &JsonPointer::parse("/flo_campaign_id")),
            BodyValue::Missing
        );
        assert_eq!(
            read_json_body(br#"{"a":"#, &JsonPointer::parse("/a")),
            BodyValue::NotJson
        );
        assert_eq!(
            read_json_body(br#"{"a":null}"#, &JsonPointer::parse("/a")),
            BodyValue::Missing
        );
        assert_eq!(
            read_json_body(b"", &JsonPointer::parse("/a")),
            BodyValue::NotJson
        );
        assert_eq!(
            read_json_body(b"[1, 2", &JsonPointer::parse("/a")),
            BodyValue::NotJson
        );
        assert_eq!(
            read_json_body(b"\"text", &JsonPointer::parse("/a")),
            BodyValue::NotJson
        );
        // Which copy wins differs between parsers: refused wherever it is.
        assert_eq!(
            read_json_body(br#"{"a":"c-99","a":"c-17"}"#, &JsonPointer::parse("/a")),
            BodyValue::Duplicate
        );
        assert_eq!(
            read_json_body(
                br#"{"a":"c-17","x":[{"b":1,"b":2}]}"#,
                &JsonPointer::parse("/a")
            ),
            BodyValue::Duplicate
        );
        assert_eq!(
            read_json_body(
                br#"{"a":{"b":1.5e3,"c":[true,null,-2]}}"#,
                &JsonPointer::parse("/a/b")
            ),
            BodyValue::Found("1500.0".into())
        );
    }

    #[test]
    fn copies_differing_in_case_are_ambiguous_on_the_path_read() {
        let dup = |body: &str, pointer: &str| {
            read_json_body(body.as_bytes(), &JsonPointer::parse(pointer))
        };
        assert_eq!(
            dup(r#"{"campaign":"c-17","CAMPAIGN":"c-99"}"#, "/campaign"),
            BodyValue::Duplicate
        );
        assert_eq!(
            dup(r#"{"Campaign":"c-99","campaign":"c-17"}"#, "/campaign"),
            BodyValue::Duplicate
        );
        // On the way to the field, too; the Kelvin sign folds to k, the long s to s.
        assert_eq!(
            dup(r#"{"o":{"k":"c-17"},"O":{"k":"c-99"}}"#, "/o/k"),
            BodyValue::Duplicate
        );
        assert_eq!(
            dup(r#"{"k":"c-17","\u212a":"c-99"}"#, "/k"),
            BodyValue::Duplicate
        );
        assert_eq!(
            dup(r#"{"\u017fid":"c-99","SID":"c-17"}"#, "/SID"),
            BodyValue::Duplicate
        );
        // Dotted and dotless i: encoding/json folds both to I.
        for other in [r"campa\u0131gn", r"CAMPA\u0130GN"] {
            let body = format!(r#"{{"campaign":"c-17","{other}":"c-99"}}"#);
            assert_eq!(dup(&body, "/campaign"), BodyValue::Duplicate, "{other}");
        }
        assert_eq!(
            dup(r#"{"campaign":"c-17","campa\u00efgn":"c-99"}"#, "/campaign"),
            BodyValue::Found("c-17".into())
        );
        // Elsewhere in the document, case variants are other fields.
        assert_eq!(
            dup(r#"{"campaign":"c-17","meta":{"x":1,"X":2}}"#, "/campaign"),
            BodyValue::Found("c-17".into())
        );
        // Only a case variant of the field: the field is absent.
        assert_eq!(
            dup(r#"{"CAMPAIGN":"c-17"}"#, "/campaign"),
            BodyValue::Missing
        );
        // Array indices as RFC 6901 has them; escapes in names.
        assert_eq!(dup(r#"{"a":[5,6]}"#, "/a/1"), BodyValue::Found("6".into()));
        assert_eq!(dup(r#"{"a":[5,6]}"#, "/a/01"), BodyValue::Missing);
        assert_eq!(dup(r#"{"a":[5,6]}"#, "/a/+1"), BodyValue::Missing);
        assert_eq!(
            dup(r#"{"a/b":{"c~d":7}}"#, "/a~1b/c~0d"),
            BodyValue::Found("7".into())
        );
    }

    #[test]
    fn header_and_query_copies_count_across_spellings() {
        let (map, l) = line(&[
            (":path", "/?campaign=c-17&Campaign=c-99"),
            ("x-campaign", "c-17"),
            ("x_campaign", "c-99"),
        ]);
        assert_eq!(
            Attribute::Query("campaign".into()).read_from_request(&map, &l),
            AttrValue::Repeated
        );
        assert_eq!(
            Attribute::Header(b"x-campaign".to_vec()).read_from_request(&map, &l),
            AttrValue::Repeated
        );
        let (one, l) = line(&[(":path", "/?campaign=c-17"), ("X-Campaign", "c-17")]);
        // Another spelling alone is not the attribute.
        let (variant, vl) = line(&[(":path", "/?Campaign=c-17"), ("x_campaign", "c-17")]);
        assert_eq!(
            Attribute::Query("campaign".into()).read_from_request(&variant, &vl),
            AttrValue::Absent
        );
        assert_eq!(
            Attribute::Header(b"x-campaign".to_vec()).read_from_request(&variant, &vl),
            AttrValue::Absent
        );
        assert_eq!(
            Attribute::Header(b"x-campaign".to_vec()).read_from_request(&one, &l),
            AttrValue::Found("c-17".into())
        );
        assert_eq!(
            Attribute::Query("campaign".into()).read_from_request(&one, &l),
            AttrValue::Found("c-17".into())
        );
    }

    #[test]
    fn requirement_scopes_and_environment() {
        let r = Requirement {
            scopes_any_of: vec!["read".into(), "ingest".into()],
            scopes_all_of: vec!["base".into()],
            environments: vec!["live".into()],
            ..Default::default()
        };
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert!(r.permits(&s(&["base", "read"]), Some("live")));
        assert!(!r.permits(&s(&["read"]), Some("live")));
        assert!(!r.permits(&s(&["base"]), Some("live")));
        assert!(!r.permits(&s(&["base", "ingest"]), Some("test")));
        assert!(!r.permits(&s(&["base", "ingest"]), None));
    }
}
