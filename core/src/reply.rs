//! Local replies: status, headers and JSON body for each denial.

use crate::denial::{Denial, DenyCode};

/// A reply the filter sends instead of forwarding the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// HTTP status.
    pub status: u16,
    /// Response headers.
    pub headers: Vec<(&'static str, String)>,
    /// JSON body: `{"error": code, "message": sentence}`.
    pub body: String,
}

/// Renders `denial`. `www_authenticate` is the challenge sent with every 401.
pub fn render(denial: &Denial, www_authenticate: &str) -> Reply {
    let code = denial.code;
    let mut headers: Vec<(&'static str, String)> = vec![
        ("content-type", "application/json".into()),
        ("cache-control", "no-store".into()),
    ];
    if code.status() == 401 {
        let challenge = match code {
            DenyCode::MissingApiKey => www_authenticate.to_string(),
            _ => format!("{www_authenticate}, error=\"invalid_token\""),
        };
        headers.push(("www-authenticate", challenge));
    }
    if code == DenyCode::KeyListUnavailable {
        headers.push(("retry-after", "1".into()));
    }
    if let Some(rate) = denial.rate {
        headers.push(("retry-after", rate.retry_after_secs.max(1).to_string()));
        headers.push((
            "ratelimit-policy",
            format!("\"default\";q={};w={}", rate.burst, rate.window_secs),
        ));
        headers.push((
            "ratelimit",
            format!(
                "\"default\";r={};t={}",
                rate.remaining,
                rate.retry_after_secs.max(1)
            ),
        ));
    }
    Reply {
        status: code.status(),
        headers,
        body: body(code),
    }
}

/// The JSON body for `code`. Codes and messages are fixed strings without
/// characters that need escaping, so the body never contains request data.
pub fn body(code: DenyCode) -> String {
    format!(
        "{{\"error\":\"{}\",\"message\":\"{}\"}}",
        code.as_str(),
        code.message()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::denial::RateInfo;

    #[test]
    fn bodies_are_valid_json_for_every_code() {
        for code in DenyCode::ALL {
            let v: serde_json::Value = serde_json::from_str(&body(code)).unwrap();
            assert_eq!(v["error"], code.as_str());
            assert!(v["message"].as_str().unwrap().ends_with('.'));
        }
    }

    #[test]
    fn rate_limited_reply_carries_draft_headers_and_no_challenge() {
        let mut d = Denial::new(DenyCode::RateLimited, "bucket empty");
        d.rate = Some(RateInfo {
            burst: 200,
            window_secs: 2,
            remaining: 0,
            retry_after_secs: 1,
        });
        let r = render(&d, "Bearer realm=\"keygate\"");
        assert_eq!(r.status, 429);
        let h = |n: &str| {
            r.headers
                .iter()
                .find(|(k, _)| *k == n)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(h("retry-after"), Some("1"));
        assert_eq!(h("ratelimit-policy"), Some("\"default\";q=200;w=2"));
        assert_eq!(h("ratelimit"), Some("\"default\";r=0;t=1"));
        assert_eq!(h("www-authenticate"), None);
    }

    #[test]
    fn unauthorized_reply_carries_challenge() {
        let r = render(
            &Denial::new(DenyCode::InvalidApiKey, "x"),
            "Bearer realm=\"k\"",
        );
        assert_eq!(r.status, 401);
        assert!(r.headers.contains(&(
            "www-authenticate",
            "Bearer realm=\"k\", error=\"invalid_token\"".into()
        )));
        assert!(!r.headers.iter().any(|(k, _)| *k == "retry-after"));
    }
}
