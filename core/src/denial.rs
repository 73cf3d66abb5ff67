//! Denials: the stable public codes and the replies that carry them.

/// A stable, public denial code. The string form is a contract: it appears in
/// the JSON body, the log line, the metric name and the README table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DenyCode {
    /// No credential in any configured source.
    MissingApiKey,
    /// A credential is present but cannot be a key (empty, whitespace, too long...).
    MalformedApiKey,
    /// The same credential header twice, or two sources with different keys.
    AmbiguousApiKey,
    /// The key's digest is not in the key list.
    InvalidApiKey,
    /// The key has passed its `expires_at`.
    ExpiredApiKey,
    /// A valid key without the route's scope or environment.
    InsufficientScope,
    /// A valid key not attached to the value the request names.
    NotAttached,
    /// A valid key used from an address outside its `allowed_cidrs`.
    IpNotAllowed,
    /// A `deny` rule, or no rule with `default_action: deny`.
    RouteNotAllowed,
    /// The attribute an attachment rule reads is absent.
    MissingAttribute,
    /// The attribute an attachment rule reads is given more than once.
    AmbiguousAttribute,
    /// The body an attachment rule reads is not JSON.
    InvalidJsonBody,
    /// The body an attachment rule reads is over `max_body_bytes`.
    BodyTooLarge,
    /// The key's bucket is empty.
    RateLimited,
    /// No key list loaded yet, or it is too stale (control plane).
    KeyListUnavailable,
    /// The proxy failed the filter (a header map it could not read, a header
    /// it could not set): nothing about the request is known to be wrong.
    InternalError,
}

impl DenyCode {
    /// Every code, in README order, which is also declaration order
    /// (`code as usize` indexes this array).
    pub const ALL: [DenyCode; 16] = [
        DenyCode::MissingApiKey,
        DenyCode::MalformedApiKey,
        DenyCode::AmbiguousApiKey,
        DenyCode::InvalidApiKey,
        DenyCode::ExpiredApiKey,
        DenyCode::InsufficientScope,
        DenyCode::NotAttached,
        DenyCode::IpNotAllowed,
        DenyCode::RouteNotAllowed,
        DenyCode::MissingAttribute,
        DenyCode::AmbiguousAttribute,
        DenyCode::InvalidJsonBody,
        DenyCode::BodyTooLarge,
        DenyCode::RateLimited,
        DenyCode::KeyListUnavailable,
        DenyCode::InternalError,
    ];

    /// The public code string.
    pub const fn as_str(self) -> &'static str {
        match self {
            DenyCode::MissingApiKey => "missing_api_key",
            DenyCode::MalformedApiKey => "malformed_api_key",
            DenyCode::AmbiguousApiKey => "ambiguous_api_key",
            DenyCode::InvalidApiKey => "invalid_api_key",
            DenyCode::ExpiredApiKey => "expired_api_key",
            DenyCode::InsufficientScope => "insufficient_scope",
            DenyCode::NotAttached => "not_attached",
            DenyCode::IpNotAllowed => "ip_not_allowed",
            DenyCode::RouteNotAllowed => "route_not_allowed",
            DenyCode::MissingAttribute => "missing_attribute",
            DenyCode::AmbiguousAttribute => "ambiguous_attribute",
            DenyCode::InvalidJsonBody => "invalid_json_body",
            DenyCode::BodyTooLarge => "body_too_large",
            DenyCode::RateLimited => "rate_limited",
            DenyCode::KeyListUnavailable => "key_list_unavailable",
            DenyCode::InternalError => "internal_error",
        }
    }

    /// The HTTP status sent for this code.
    pub const fn status(self) -> u16 {
        match self {
            DenyCode::MissingApiKey
            | DenyCode::MalformedApiKey
            | DenyCode::AmbiguousApiKey
            | DenyCode::InvalidApiKey
            | DenyCode::ExpiredApiKey => 401,
            DenyCode::InsufficientScope
            | DenyCode::NotAttached
            | DenyCode::IpNotAllowed
            | DenyCode::RouteNotAllowed => 403,
            DenyCode::MissingAttribute
            | DenyCode::AmbiguousAttribute
            | DenyCode::InvalidJsonBody => 400,
            DenyCode::BodyTooLarge => 413,
            DenyCode::RateLimited => 429,
            DenyCode::KeyListUnavailable => 503,
            DenyCode::InternalError => 500,
        }
    }

    /// The gRPC status a gRPC caller gets instead of the HTTP status:
    /// UNAUTHENTICATED for 401, PERMISSION_DENIED for 403, RESOURCE_EXHAUSTED
    /// for 429 and 413 (not the UNAVAILABLE Envoy maps a bare 429 to, which
    /// clients retry at once), INVALID_ARGUMENT for 400, UNAVAILABLE for 503,
    /// INTERNAL for 500.
    pub const fn grpc_status(self) -> u32 {
        match self.status() {
            401 => 16,
            403 => 7,
            429 | 413 => 8,
            400 => 3,
            503 => 14,
            _ => 13,
        }
    }

    /// One sentence for a person. Never contains request data.
    pub const fn message(self) -> &'static str {
        match self {
            DenyCode::MissingApiKey => "This endpoint requires an API key.",
            DenyCode::MalformedApiKey => {
                "The API key is malformed: check for spaces, line breaks or a missing part."
            }
            DenyCode::AmbiguousApiKey => "Send exactly one API key, in one header.",
            DenyCode::InvalidApiKey => "The API key is not valid.",
            DenyCode::ExpiredApiKey => "The API key has expired.",
            DenyCode::InsufficientScope => "The API key does not have permission for this action.",
            DenyCode::NotAttached => {
                "The API key is not attached to the resource named in the request."
            }
            DenyCode::IpNotAllowed => "The API key may not be used from this address.",
            DenyCode::RouteNotAllowed => "This route is not available.",
            DenyCode::MissingAttribute => {
                "The request does not name the resource this endpoint needs."
            }
            DenyCode::AmbiguousAttribute => {
                "The request names the resource this endpoint needs more than once."
            }
            DenyCode::InvalidJsonBody => {
                "The request body is not valid JSON, or nests more than 127 levels deep."
            }
            DenyCode::BodyTooLarge => "The request body is too large.",
            DenyCode::RateLimited => "Too many requests for this API key; retry later.",
            DenyCode::KeyListUnavailable => "The API key list is not available yet; retry shortly.",
            DenyCode::InternalError => "The gateway could not check this request; retry later.",
        }
    }
}

/// The name of a rate limit as a 429 shows it (`RateLimit-Policy`), kept
/// inline so that rate figures stay plain values.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct LimitName {
    buf: [u8; LimitName::MAX],
    len: u8,
}

impl LimitName {
    /// Longest name.
    pub const MAX: usize = 16;
    /// The name of a lone `rate_limit`.
    pub const DEFAULT: LimitName = LimitName::from_static(b"default");

    const fn from_static(name: &[u8]) -> Self {
        let mut buf = [0u8; Self::MAX];
        let mut i = 0;
        while i < name.len() && i < Self::MAX {
            buf[i] = name[i];
            i += 1;
        }
        LimitName { buf, len: i as u8 }
    }

    /// `name` if it is 1-16 characters of `A-Z a-z 0-9 _ - .` (it is written
    /// inside a quoted header string).
    pub fn new(name: &str) -> Option<Self> {
        let ok = !name.is_empty()
            && name.len() <= Self::MAX
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b));
        if !ok {
            return None;
        }
        let mut buf = [0u8; Self::MAX];
        buf.get_mut(..name.len())?.copy_from_slice(name.as_bytes());
        Some(LimitName {
            buf,
            len: name.len() as u8,
        })
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        self.buf
            .get(..usize::from(self.len))
            .and_then(|b| std::str::from_utf8(b).ok())
            .unwrap_or("default")
    }
}

impl Default for LimitName {
    fn default() -> Self {
        LimitName::DEFAULT
    }
}

impl std::fmt::Debug for LimitName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.as_str())
    }
}

/// Rate-limit figures attached to a 429.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateInfo {
    /// The limit these figures are about (the one that refused, on a 429).
    pub policy: LimitName,
    /// Bucket size (`q` in `RateLimit-Policy`).
    pub burst: u64,
    /// Seconds to refill the whole bucket (`w`).
    pub window_secs: u64,
    /// Requests left now (`r`).
    pub remaining: u64,
    /// Whole seconds until a request will be admitted, at least 1 when denied.
    pub retry_after_secs: u64,
}

/// Which key a refusal is about, as a log line may name it: the id of a
/// listed key, a masked form of any other, never the key itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyLabel<'p> {
    /// Refused before a usable key was read.
    None,
    /// A key in the list.
    Id(&'p str),
    /// A key not in the list.
    Masked(Masked),
}

impl KeyLabel<'_> {
    /// What an access log may show of the key: its id, or its masked form
    /// for a key not in the list; `None` before a key was read.
    pub fn audit(&self) -> Option<String> {
        match self {
            KeyLabel::None => None,
            KeyLabel::Id(id) => Some((*id).to_string()),
            KeyLabel::Masked(m) => Some(m.to_string()),
        }
    }
}

impl std::fmt::Display for KeyLabel<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeyLabel::None => f.write_str("-"),
            KeyLabel::Id(id) => write!(f, "id={id}"),
            KeyLabel::Masked(m) => write!(f, "masked={m}"),
        }
    }
}

/// At most the first 4 and last 4 bytes of a key (fewer for short keys), so
/// that most of it is never shown; kept inline, so a refusal allocates nothing.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Masked {
    head: [u8; 4],
    tail: [u8; 4],
    /// Bytes of `head` shown (0 or 4).
    head_len: u8,
    /// Bytes of `tail` shown (0 or 4).
    tail_len: u8,
}

impl Masked {
    /// The masked form of `key`: first 4 and last 4 bytes from 20 bytes on,
    /// the last 4 from 12, nothing below.
    pub fn of(key: &[u8]) -> Self {
        let n = key.len();
        let (head_len, tail_len) = match n {
            n if n >= 20 => (4, 4),
            n if n >= 12 => (0, 4),
            _ => (0, 0),
        };
        let mut head = [0u8; 4];
        let mut tail = [0u8; 4];
        if let Some(h) = key.get(..head_len) {
            head[..head_len].copy_from_slice(h);
        }
        if let Some(t) = key.get(n - tail_len..) {
            tail[..tail_len].copy_from_slice(t);
        }
        Masked {
            head,
            tail,
            head_len: head_len as u8,
            tail_len: tail_len as u8,
        }
    }
}

impl std::fmt::Display for Masked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shown = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        let head = self
            .head
            .get(..usize::from(self.head_len))
            .unwrap_or_default();
        let tail = self
            .tail
            .get(..usize::from(self.tail_len))
            .unwrap_or_default();
        write!(f, "{}…{}", shown(head), shown(tail))
    }
}

impl std::fmt::Debug for Masked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Masked({self})")
    }
}

/// Why a request is refused: the public code plus a private reason for logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Denial {
    /// Public code.
    pub code: DenyCode,
    /// Precise reason, for the log and access-log filter state only.
    pub reason: &'static str,
    /// Present on `rate_limited`.
    pub rate: Option<RateInfo>,
    /// For 401s: whether the credential sources that applied accept Bearer
    /// (`None`: the policy's top-level sources decide).
    pub bearer: Option<bool>,
    /// The request is gRPC: the reply is a gRPC status, not a JSON body.
    pub grpc: bool,
}

impl Denial {
    /// A denial without rate information.
    pub const fn new(code: DenyCode, reason: &'static str) -> Self {
        Denial {
            code,
            reason,
            rate: None,
            bearer: None,
            grpc: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test;

    #[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
    #[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
    fn all_lists_every_code_in_declaration_order() {
        for (i, code) in DenyCode::ALL.iter().enumerate() {
            assert_eq!(*code as usize, i, "{code:?}");
        }
    }

    #[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
    #[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
    fn masked_never_shows_more_than_eight_characters() {
        let m = |k: &[u8]| Masked::of(k).to_string();
        assert_eq!(m(b"lfk_sk_a1b2c3d4e5f6g7h8"), "lfk_…g7h8");
        assert_eq!(m(b"abcdefghijkl"), "…ijkl");
        assert_eq!(m(b"short"), "…");
        assert_eq!(
            KeyLabel::Masked(Masked::of(b"short")).to_string(),
            "masked=…"
        );
        assert_eq!(KeyLabel::Id("acme").to_string(), "id=acme");
        assert_eq!(KeyLabel::None.to_string(), "-");
        assert_eq!(KeyLabel::Id("acme").audit().as_deref(), Some("acme"));
        let masked = KeyLabel::Masked(Masked::of(b"lfk_sk_a1b2c3d4e5f6g7h8"));
        assert_eq!(masked.audit().as_deref(), Some("lfk_…g7h8"));
        assert_eq!(KeyLabel::None.audit(), None);
    }
}
