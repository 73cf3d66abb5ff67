//! Credential extraction: header bytes in, one key (or a denial) out.

use crate::config::SourceConfig;
use crate::denial::{Denial, DenyCode};
use crate::headers::HeaderMap;

const AUTHORIZATION: &[u8] = b"authorization";

/// A compiled credential source.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Source {
    /// The whole value of this (lowercased) header.
    Header(Vec<u8>),
    /// `Authorization: Bearer <key>`.
    Bearer,
    /// `Authorization: <key>`.
    Bare,
}

impl From<&SourceConfig> for Source {
    fn from(c: &SourceConfig) -> Self {
        match c {
            SourceConfig::Header { name } => Source::Header(name.to_ascii_lowercase().into_bytes()),
            SourceConfig::Bearer {} => Source::Bearer,
            SourceConfig::Bare {} => Source::Bare,
        }
    }
}

/// Reads keys from the configured sources. Built once at configure time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extractor {
    /// Named headers to read, in configured order.
    headers: Vec<Vec<u8>>,
    bearer: bool,
    bare: bool,
    max_len: usize,
    prefixes: Vec<Vec<u8>>,
    /// Keys end with their checksum ([`crate::checksum`]).
    checksum: bool,
}

/// A key found in the request, borrowed from the header map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Credential<'a> {
    /// The key bytes (validated: visible ASCII, no comma, within length).
    pub key: &'a [u8],
    /// Bit `i` set: the named header `i` carried the key.
    pub header_bits: u32,
    /// The `Authorization` header carried the key.
    pub in_authorization: bool,
}

impl Extractor {
    /// Compiles sources and key-shape limits.
    pub fn new(sources: &[Source], max_len: usize, prefixes: &[String]) -> Self {
        let mut headers = Vec::new();
        let (mut bearer, mut bare) = (false, false);
        for s in sources {
            match s {
                Source::Header(n) => headers.push(n.clone()),
                Source::Bearer => bearer = true,
                Source::Bare => bare = true,
            }
        }
        Extractor {
            headers,
            bearer,
            bare,
            max_len,
            prefixes: prefixes.iter().map(|p| p.as_bytes().to_vec()).collect(),
            checksum: false,
        }
    }

    /// This extractor, refusing keys whose checksum suffix does not match.
    pub fn with_checksum(self, checksum: bool) -> Self {
        Extractor { checksum, ..self }
    }

    /// True if a Bearer source is configured (decides the `WWW-Authenticate` scheme).
    pub fn accepts_bearer(&self) -> bool {
        self.bearer
    }

    /// A credential as if every configured source had carried it: stripping
    /// it removes them all (for a request forwarded without a usable key).
    pub fn every_carrier(&self) -> Credential<'static> {
        Credential {
            key: b"",
            header_bits: u32::MAX,
            in_authorization: self.bearer || self.bare,
        }
    }

    /// [`Extractor::every_carrier`] narrowed to the sources `headers` holds:
    /// removing an absent header changes nothing, and every removal is a
    /// host call after which Envoy matches the route again.
    pub fn carriers_in(&self, headers: &HeaderMap<'_>) -> Credential<'static> {
        let header_bits = self
            .headers
            .iter()
            .enumerate()
            .filter(|(_, name)| headers.get(name).is_some())
            .fold(0u32, |bits, (i, _)| bits | 1 << (i as u32).min(31));
        Credential {
            key: b"",
            header_bits,
            in_authorization: (self.bearer || self.bare) && headers.get(AUTHORIZATION).is_some(),
        }
    }

    /// Names of the headers that carried `cred`, for stripping before forwarding.
    pub fn carrier_names<'s>(&'s self, cred: &Credential<'_>) -> impl Iterator<Item = &'s [u8]> {
        let bits = cred.header_bits;
        self.headers
            .iter()
            .enumerate()
            .filter(move |(i, _)| bits & (1 << i) != 0)
            .map(|(_, n)| n.as_slice())
            .chain(cred.in_authorization.then_some(AUTHORIZATION))
    }

    /// Finds the one key in `headers`.
    ///
    /// Every configured source that is present must hold a well-formed key,
    /// each credential header may appear once, and all sources present must
    /// agree on the key.
    pub fn extract<'a>(&self, headers: &HeaderMap<'a>) -> Result<Credential<'a>, Denial> {
        let mut found: Option<&'a [u8]> = None;
        let mut header_bits = 0u32;
        let mut in_authorization = false;
        for (i, name) in self.headers.iter().enumerate() {
            if let Some(value) = single(headers, name)? {
                let key = self.check_key(value)?;
                agree(&mut found, key)?;
                header_bits |= 1 << (i as u32).min(31);
            }
        }
        if self.bearer || self.bare {
            if let Some(value) = single(headers, AUTHORIZATION)? {
                let key = self.check_key(self.parse_authorization(value)?)?;
                agree(&mut found, key)?;
                in_authorization = true;
            }
        }
        match found {
            Some(key) => Ok(Credential {
                key,
                header_bits,
                in_authorization,
            }),
            None => Err(Denial::new(
                DenyCode::MissingApiKey,
                "no credential in any configured source",
            )),
        }
    }

    fn parse_authorization<'a>(&self, value: &'a [u8]) -> Result<&'a [u8], Denial> {
        match value.iter().position(|b| *b == b' ') {
            Some(sp) => {
                let (scheme, rest) = value.split_at(sp);
                if !(self.bearer && scheme.eq_ignore_ascii_case(b"bearer")) {
                    return Err(malformed("unknown Authorization scheme"));
                }
                let token = trim_start_spaces(rest);
                if token.is_empty() {
                    return Err(malformed("Bearer without a token"));
                }
                Ok(token)
            }
            None if value.eq_ignore_ascii_case(b"bearer") => {
                Err(malformed("Bearer without a token"))
            }
            None if self.bare => Ok(value),
            None => Err(malformed("Authorization without the Bearer scheme")),
        }
    }

    fn check_key<'a>(&self, key: &'a [u8]) -> Result<&'a [u8], Denial> {
        if key.is_empty() {
            return Err(malformed("empty key"));
        }
        if key.len() > self.max_len {
            return Err(malformed("key longer than max_key_length"));
        }
        for &b in key {
            match b {
                b',' => return Err(malformed("comma in key (repeated header joined by Envoy)")),
                0x21..=0x7e => {}
                b' ' | b'\t' | b'\r' | b'\n' => return Err(malformed("whitespace inside the key")),
                0x80..=0xff => return Err(malformed("non-ASCII byte in the key")),
                _ => return Err(malformed("control character in the key")),
            }
        }
        if !self.prefixes.is_empty() && !self.prefixes.iter().any(|p| key.starts_with(p)) {
            return Err(malformed("key does not start with a configured prefix"));
        }
        if self.checksum && !crate::checksum::verify(key) {
            return Err(malformed("key checksum does not match"));
        }
        Ok(key)
    }
}

fn malformed(reason: &'static str) -> Denial {
    Denial::new(DenyCode::MalformedApiKey, reason)
}

/// The value of `name` if it appears once, without surrounding spaces and
/// tabs (which are not part of a field value; Envoy trims them from HTTP/1.1
/// but passes them on from HTTP/2); a denial if it appears twice.
fn single<'a>(headers: &HeaderMap<'a>, name: &[u8]) -> Result<Option<&'a [u8]>, Denial> {
    let mut values = headers.get_all(name);
    let first = values.next();
    if first.is_some() && values.next().is_some() {
        return Err(Denial::new(
            DenyCode::AmbiguousApiKey,
            "credential header repeated",
        ));
    }
    Ok(first.map(trim_ows))
}

/// `v` without leading and trailing spaces and tabs.
fn trim_ows(v: &[u8]) -> &[u8] {
    let ows = |b: &u8| *b == b' ' || *b == b'\t';
    let start = v.iter().position(|b| !ows(b)).unwrap_or(v.len());
    let end = v.iter().rposition(|b| !ows(b)).map_or(start, |i| i + 1);
    v.get(start..end).unwrap_or_default()
}

fn agree<'a>(found: &mut Option<&'a [u8]>, key: &'a [u8]) -> Result<(), Denial> {
    match found {
        Some(prev) if *prev != key => Err(Denial::new(
            DenyCode::AmbiguousApiKey,
            "two sources carry different keys",
        )),
        _ => {
            *found = Some(key);
            Ok(())
        }
    }
}

fn trim_start_spaces(v: &[u8]) -> &[u8] {
    let n = v.iter().take_while(|b| **b == b' ').count();
    &v[n..]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test;

    fn ex(sources: &[Source]) -> Extractor {
        Extractor::new(sources, 64, &[])
    }

    fn run<'a>(e: &Extractor, h: &'a [(&'a str, &'a [u8])]) -> Result<Credential<'a>, Denial> {
        let map = HeaderMap::from_pairs(h.iter().map(|(n, v)| (n.as_bytes(), *v)).collect());
        e.extract(&map)
    }

    fn code(r: Result<Credential<'_>, Denial>) -> &'static str {
        match r {
            Ok(_) => "ok",
            Err(d) => d.code.as_str(),
        }
    }

    #[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
    #[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
    fn x_api_key_only_ignores_authorization() {
        let e = ex(&[Source::Header(b"x-api-key".to_vec())]);
        assert_eq!(
            code(run(&e, &[("authorization", b"Bearer abc")])),
            "missing_api_key"
        );
        assert_eq!(run(&e, &[("X-Api-Key", b"abc")]).unwrap().key, b"abc");
    }

    #[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
    #[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
    fn bearer_scheme_is_case_insensitive_but_key_is_not_changed() {
        let e = ex(&[Source::Bearer]);
        for v in [
            &b"Bearer AbC"[..],
            b"bearer AbC",
            b"BEARER AbC",
            b"Bearer   AbC",
        ] {
            assert_eq!(run(&e, &[("authorization", v)]).unwrap().key, b"AbC");
        }
    }

    #[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
    #[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
    fn spaces_and_tabs_around_a_value_are_not_part_of_it() {
        let both = ex(&[Source::Header(b"x-api-key".to_vec()), Source::Bearer]);
        for h in [
            &[("x-api-key", &b" abc "[..])][..],
            &[("x-api-key", b"\tabc\t")],
            &[("authorization", b" Bearer abc ")],
            &[("authorization", b"Bearer abc\t"), ("x-api-key", b"abc ")],
        ] {
            assert_eq!(run(&both, h).unwrap().key, b"abc", "{h:?}");
        }
        for v in [&b"Bearer\tabc"[..], b"Bearer a bc", b"  ", b"Bearer  "] {
            assert_eq!(
                code(run(&both, &[("authorization", v)])),
                "malformed_api_key",
                "{v:?}"
            );
        }
        assert_eq!(
            code(run(&both, &[("x-api-key", b" \t ")])),
            "malformed_api_key"
        );
    }

    #[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
    #[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
    fn authorization_shapes() {
        let bearer = ex(&[Source::Bearer]);
        let both = ex(&[Source::Bearer, Source::Bare]);
        let bare = ex(&[Source::Bare]);
        assert_eq!(
            code(run(&bearer, &[("authorization", b"Bearer")])),
            "malformed_api_key"
        );
        assert_eq!(
            code(run(&bearer, &[("authorization", b"Basic abc")])),
            "malformed_api_key"
        );
        assert_eq!(
            code(run(&bearer, &[("authorization", b"abc")])),
            "malformed_api_key"
        );
        assert_eq!(
            run(&both, &[("authorization", b"abc")]).unwrap().key,
            b"abc"
        );
        assert_eq!(
            run(&both, &[("authorization", b"Bearer abc")]).unwrap().key,
            b"abc"
        );
        assert_eq!(
            code(run(&bare, &[("authorization", b"Bearer abc")])),
            "malformed_api_key"
        );
        assert_eq!(
            code(run(&bare, &[("authorization", b"Bearer a,Bearer a")])),
            "malformed_api_key"
        );
    }

    #[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
    #[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
    fn bad_key_bytes_are_malformed() {
        let e = ex(&[Source::Header(b"x-api-key".to_vec())]);
        let long = [b'a'; 65];
        for v in [
            &b""[..],
            b"a b",
            b"a\tb",
            b"a\x01b",
            b"a\xffb",
            b"a,b",
            &long,
        ] {
            assert_eq!(
                code(run(&e, &[("x-api-key", v)])),
                "malformed_api_key",
                "{v:?}"
            );
        }
        assert_eq!(code(run(&e, &[("x-api-key", &[b'a'; 64])])), "ok");
    }

    #[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
    #[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
    fn duplicates_and_disagreement_are_ambiguous() {
        let e = ex(&[Source::Header(b"x-api-key".to_vec()), Source::Bearer]);
        assert_eq!(
            code(run(&e, &[("x-api-key", b"a"), ("x-api-key", b"a")])),
            "ambiguous_api_key"
        );
        assert_eq!(
            code(run(
                &e,
                &[("x-api-key", b"a"), ("authorization", b"Bearer b")]
            )),
            "ambiguous_api_key"
        );
        let c = run(&e, &[("x-api-key", b"a"), ("authorization", b"Bearer a")]).unwrap();
        assert_eq!(
            e.carrier_names(&c).collect::<Vec<_>>(),
            vec![&b"x-api-key"[..], b"authorization"]
        );
    }

    #[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
    #[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
    fn prefixes_are_checked() {
        let e = Extractor::new(
            &[Source::Bearer],
            64,
            &["sk_live_".into(), "sk_test_".into()],
        );
        assert_eq!(
            code(run(&e, &[("authorization", b"Bearer sk_live_x")])),
            "ok"
        );
        assert_eq!(
            code(run(&e, &[("authorization", b"Bearer pk_live_x")])),
            "malformed_api_key"
        );
    }

    #[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
    #[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
    fn the_log_reason_names_what_is_wrong_with_the_key() {
        // The access log's `malformed_api_key (<reason>)` tells an operator
        // which byte class the client got wrong.
        let e = ex(&[Source::Header(b"x-api-key".to_vec())]);
        for (v, reason) in [
            (&b"a\xc3\xa9b"[..], "non-ASCII byte in the key"),
            (b"a\x80", "non-ASCII byte in the key"),
            (b"a\x01b", "control character in the key"),
            (b"a\x7f", "control character in the key"),
            (b"a b", "whitespace inside the key"),
            (b"a,b", "comma in key (repeated header joined by Envoy)"),
        ] {
            match run(&e, &[("x-api-key", v)]) {
                Err(d) => assert_eq!(
                    (d.code.as_str(), d.reason),
                    ("malformed_api_key", reason),
                    "{v:?}"
                ),
                Ok(_) => panic!("{v:?} accepted"),
            }
        }
    }
}
