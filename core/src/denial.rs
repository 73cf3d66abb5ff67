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
}

impl DenyCode {
    /// Every code, in README order, which is also declaration order
    /// (`code as usize` indexes this array).
    pub const ALL: [DenyCode; 15] = [
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
    /// For 401s: whether the credential sources that applied accept Bearer
    /// (`None`: the policy's top-level sources decide).
    pub bearer: Option<bool>,
}

impl Denial {
    /// A denial without rate information.
    pub const fn new(code: DenyCode, reason: &'static str) -> Self {
        Denial {
            code,
            reason,
            rate: None,
            bearer: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_lists_every_code_in_declaration_order() {
        for (i, code) in DenyCode::ALL.iter().enumerate() {
            assert_eq!(*code as usize, i, "{code:?}");
        }
    }
}
