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
    /// The key's bucket is empty.
    RateLimited,
}

impl DenyCode {
    /// Every code, in README order.
    pub const ALL: [DenyCode; 5] = [
        DenyCode::MissingApiKey,
        DenyCode::MalformedApiKey,
        DenyCode::AmbiguousApiKey,
        DenyCode::InvalidApiKey,
        DenyCode::RateLimited,
    ];

    /// The public code string.
    pub const fn as_str(self) -> &'static str {
        match self {
            DenyCode::MissingApiKey => "missing_api_key",
            DenyCode::MalformedApiKey => "malformed_api_key",
            DenyCode::AmbiguousApiKey => "ambiguous_api_key",
            DenyCode::InvalidApiKey => "invalid_api_key",
            DenyCode::RateLimited => "rate_limited",
        }
    }

    /// The HTTP status sent for this code.
    pub const fn status(self) -> u16 {
        match self {
            DenyCode::RateLimited => 429,
            _ => 401,
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
            DenyCode::RateLimited => "Too many requests for this API key; retry later.",
        }
    }
}

/// Rate-limit figures attached to a 429.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateInfo {
    /// Bucket size (`q` in `RateLimit-Policy`).
    pub burst: u64,
    /// Seconds to refill the whole bucket (`w`).
    pub window_secs: u64,
    /// Requests left now (`r`).
    pub remaining: u64,
    /// Whole seconds until a request will be admitted, at least 1 when denied.
    pub retry_after_secs: u64,
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
}

impl Denial {
    /// A denial without rate information.
    pub const fn new(code: DenyCode, reason: &'static str) -> Self {
        Denial {
            code,
            reason,
            rate: None,
        }
    }
}
