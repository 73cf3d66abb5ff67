//! Local replies: status, headers and JSON body for each denial (a gRPC
//! status and message for a gRPC request).
//!
//! [`render`] builds one reply; [`ReplyBook`] holds every reply a policy can
//! send, encoded once per configuration, so that a denial costs no formatting.

use std::cell::RefCell;
use std::rc::Rc;

use crate::denial::{Denial, DenyCode, RateInfo};
use crate::headers;

/// A reply the filter sends instead of forwarding the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// HTTP status.
    pub status: u16,
    /// Response headers.
    pub headers: Vec<(&'static str, String)>,
    /// JSON body: `{"error": code, "message": sentence}`; for gRPC, the
    /// `grpc-message`: `code: sentence`.
    pub body: String,
    /// For a gRPC request, the `grpc-status` Envoy sends (with HTTP 200).
    pub grpc_status: Option<u32>,
}

/// Renders `denial`. `www_authenticate` is the challenge sent with every 401.
pub fn render(denial: &Denial, www_authenticate: &str) -> Reply {
    let code = denial.code;
    let mut headers: Vec<(&'static str, String)> = Vec::with_capacity(5);
    if !denial.grpc {
        // Envoy writes a gRPC reply's content type itself.
        headers.push(("content-type", "application/json".into()));
    }
    headers.push(("cache-control", "no-store".into()));
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
            format!(
                "\"{}\";q={};w={}",
                rate.policy.as_str(),
                rate.burst,
                rate.window_secs
            ),
        ));
        headers.push((
            "ratelimit",
            format!(
                "\"{}\";r={};t={}",
                rate.policy.as_str(),
                rate.remaining,
                rate.retry_after_secs.max(1)
            ),
        ));
    }
    Reply {
        status: code.status(),
        headers,
        body: if denial.grpc {
            grpc_message(code)
        } else {
            body(code)
        },
        grpc_status: denial.grpc.then(|| code.grpc_status()),
    }
}

/// The `grpc-message` for `code`: the code, then the sentence.
pub fn grpc_message(code: DenyCode) -> String {
    format!("{}: {}", code.as_str(), code.message())
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

/// A reply in the form the host takes: the header map already serialized.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedReply {
    /// HTTP status.
    pub status: u16,
    /// Envoy's response code details (`%RESPONSE_CODE_DETAILS%`): `keygate_<code>`.
    pub details: String,
    /// JSON body (the `grpc-message` for gRPC).
    pub body: String,
    /// Response headers in the proxy-wasm serialization.
    pub headers: Vec<u8>,
    /// The gRPC status for a gRPC request, -1 otherwise (the host's form).
    pub grpc_status: i32,
}

impl EncodedReply {
    /// Renders and encodes `denial`.
    pub fn of(denial: &Denial, www_authenticate: &str) -> Self {
        let r = render(denial, www_authenticate);
        let pairs: Vec<(&[u8], &[u8])> = r
            .headers
            .iter()
            .map(|(k, v)| (k.as_bytes(), v.as_bytes()))
            .collect();
        EncodedReply {
            status: r.status,
            details: format!("keygate_{}", denial.code.as_str()),
            body: r.body,
            headers: headers::encode(&pairs),
            grpc_status: r.grpc_status.map_or(-1, |s| s as i32),
        }
    }
}

/// The three challenge variants a denial can carry (see [`Denial::bearer`]).
const CHALLENGES: [Option<bool>; 3] = [None, Some(true), Some(false)];

/// What makes a rate reply: its code, figures and protocol (gRPC or not).
type RateKey = (DenyCode, RateInfo, bool);

/// Every reply of one configuration, encoded at configuration time.
///
/// Replies without rate figures are fixed per code, challenge and protocol
/// (HTTP or gRPC). A 429
/// carries the bucket's figures, which repeat while one key is over its
/// limit, so the last one is kept and reused while they stay the same.
/// Single-threaded by design: one book per Wasm VM.
#[derive(Debug)]
pub struct ReplyBook {
    fixed: Vec<Rc<EncodedReply>>,
    last_rate: RefCell<Option<(RateKey, Rc<EncodedReply>)>>,
}

impl ReplyBook {
    /// Encodes every code with each challenge `challenge(bearer)` gives.
    pub fn new(challenge: impl Fn(Option<bool>) -> String) -> Self {
        let mut fixed = Vec::with_capacity(2 * CHALLENGES.len() * DenyCode::ALL.len());
        for grpc in [false, true] {
            for bearer in CHALLENGES {
                let www_authenticate = challenge(bearer);
                for code in DenyCode::ALL {
                    let denial = Denial {
                        bearer,
                        grpc,
                        ..Denial::new(code, "")
                    };
                    fixed.push(Rc::new(EncodedReply::of(&denial, &www_authenticate)));
                }
            }
        }
        ReplyBook {
            fixed,
            last_rate: RefCell::new(None),
        }
    }

    /// The reply for `denial`: shared when it is fixed, rendered (and kept)
    /// when it carries rate figures not seen last time.
    pub fn reply(&self, denial: &Denial) -> Rc<EncodedReply> {
        // The order of `new`: protocol, `CHALLENGES`, then `DenyCode::ALL`
        // (declaration order).
        let variant = match denial.bearer {
            None => 0,
            Some(true) => 1,
            Some(false) => 2,
        } + usize::from(denial.grpc) * CHALLENGES.len();
        let index = variant * DenyCode::ALL.len() + denial.code as usize;
        let Some(rate) = denial.rate else {
            return match self.fixed.get(index) {
                Some(fixed) => fixed.clone(),
                // Unreachable: every code and variant is encoded in `new`.
                None => Rc::new(EncodedReply::of(denial, "")),
            };
        };
        let mut last = self.last_rate.borrow_mut();
        let key = (denial.code, rate, denial.grpc);
        if let Some((seen, reply)) = last.as_ref() {
            if *seen == key {
                return reply.clone();
            }
        }
        // Rate replies carry no challenge, so any variant's text will do.
        let reply = Rc::new(EncodedReply::of(denial, ""));
        *last = Some((key, reply.clone()));
        reply
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::denial::RateInfo;

    #[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test;

    #[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
    #[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
    fn bodies_are_valid_json_for_every_code() {
        for code in DenyCode::ALL {
            let v: serde_json::Value = serde_json::from_str(&body(code)).unwrap();
            assert_eq!(v["error"], code.as_str());
            assert!(v["message"].as_str().unwrap().ends_with('.'));
        }
    }

    #[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
    #[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
    fn rate_limited_reply_carries_draft_headers_and_no_challenge() {
        let mut d = Denial::new(DenyCode::RateLimited, "bucket empty");
        d.rate = Some(RateInfo {
            policy: crate::denial::LimitName::DEFAULT,
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

    #[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
    #[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
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

    fn challenge(bearer: Option<bool>) -> String {
        match bearer {
            None => "Bearer realm=\"k\"".into(),
            Some(true) => "Bearer realm=\"b\"".into(),
            Some(false) => "ApiKey realm=\"a\"".into(),
        }
    }

    #[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
    #[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
    fn the_book_gives_what_render_gives_for_every_code_challenge_and_protocol() {
        let book = ReplyBook::new(challenge);
        for grpc in [false, true] {
            for bearer in CHALLENGES {
                for code in DenyCode::ALL {
                    let denial = Denial {
                        bearer,
                        grpc,
                        ..Denial::new(code, "some reason")
                    };
                    let want = EncodedReply::of(&denial, &challenge(bearer));
                    assert_eq!(*book.reply(&denial), want, "{code:?} {bearer:?} {grpc}");
                    let map = headers::HeaderMap::decode(&want.headers).unwrap();
                    let json = (!grpc).then_some(&b"application/json"[..]);
                    assert_eq!(map.get(b"content-type"), json);
                }
            }
        }
    }

    #[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
    #[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
    fn grpc_callers_get_a_status_and_the_code_in_the_message() {
        let grpc = |code| {
            let d = Denial {
                grpc: true,
                ..Denial::new(code, "x")
            };
            render(&d, "Bearer realm=\"k\"")
        };
        let statuses: Vec<_> = [
            DenyCode::MissingApiKey,
            DenyCode::InsufficientScope,
            DenyCode::RateLimited,
        ]
        .map(|c| grpc(c).grpc_status)
        .into();
        assert_eq!(statuses, [Some(16), Some(7), Some(8)]);
        let r = grpc(DenyCode::InsufficientScope);
        assert!(r.body.starts_with("insufficient_scope: "), "{}", r.body);
        let mut limited = Denial {
            grpc: true,
            ..Denial::new(DenyCode::RateLimited, "bucket empty")
        };
        limited.rate = Some(RateInfo {
            policy: crate::denial::LimitName::DEFAULT,
            burst: 1,
            window_secs: 1,
            remaining: 0,
            retry_after_secs: 3,
        });
        let r = render(&limited, "");
        assert!(r.headers.contains(&("retry-after", "3".into())));
        assert_eq!(
            render(&Denial::new(DenyCode::RateLimited, "x"), "").grpc_status,
            None
        );
        for code in DenyCode::ALL {
            assert_ne!(code.grpc_status(), 0, "{code:?} is never OK");
        }
    }

    #[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
    #[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
    fn rate_replies_follow_the_figures_and_reuse_the_last() {
        let book = ReplyBook::new(challenge);
        let limited = |remaining, retry_after_secs| Denial {
            rate: Some(RateInfo {
                policy: crate::denial::LimitName::DEFAULT,
                burst: 5,
                window_secs: 10,
                remaining,
                retry_after_secs,
            }),
            ..Denial::new(DenyCode::RateLimited, "bucket empty")
        };
        let first = book.reply(&limited(0, 2));
        let again = book.reply(&limited(0, 2));
        assert!(Rc::ptr_eq(&first, &again));
        let later = book.reply(&limited(0, 1));
        assert_eq!(*later, EncodedReply::of(&limited(0, 1), ""));
        let map = headers::HeaderMap::decode(&later.headers).unwrap();
        assert_eq!(map.get(b"retry-after"), Some(&b"1"[..]));
        assert_eq!(map.get(b"ratelimit"), Some(&b"\"default\";r=0;t=1"[..]));
        assert_eq!(
            map.get(b"ratelimit-policy"),
            Some(&b"\"default\";q=5;w=10"[..])
        );
        // The fixed replies are untouched by rate replies.
        let missing = book.reply(&Denial::new(DenyCode::MissingApiKey, "x"));
        assert_eq!(missing.status, 401);
        assert_eq!(missing.details, "keygate_missing_api_key");
    }
}
