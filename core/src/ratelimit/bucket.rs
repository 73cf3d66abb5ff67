//! Shared-data bucket names: one scope per plugin, and names built on the
//! stack for each request.

use sha2::{Digest as _, Sha256};

/// Prefix of every bucket key in shared data. A filter's buckets are
/// `keygate/rl/<scope>/<rule>/<id>` for a rule's limit and
/// `keygate/rl/<scope>//<id>` for the key's own (see [`bucket_scope`]).
pub const BUCKET_PREFIX: &str = "keygate/rl/";

/// Longest plugin name, once escaped, that a bucket scope carries as is.
const MAX_SCOPE_LEN: usize = 64;

/// The start of a filter's bucket names, `keygate/rl/<scope>/`, from the
/// plugin's name (Envoy's `name` of the plugin configuration, Istio's
/// `<namespace>.<WasmPlugin name>`). Shared data is per `vm_id`, so filters
/// in one VM keep apart only if their bucket names differ.
///
/// In the scope, `%`, `/` and `#` are percent-escaped, so no scope holds a
/// `/`; a name longer than 64 bytes once escaped becomes `#` and 16 hex
/// digits of its SHA-256. Rule names are never empty and never hold `/`,
/// so no (scope, rule, key id) triple names another's bucket, whatever `/`
/// the key id holds.
/// Prefix of the buckets of consumers (shared by a consumer's keys): apart
/// from key buckets, so that no consumer name and key id share a bucket.
pub const CONSUMER_PREFIX: &str = "keygate/rc/";

/// The start of a filter's consumer bucket names, from its key bucket scope.
pub fn consumer_scope(bucket_scope: &str) -> String {
    bucket_scope.replacen(BUCKET_PREFIX, CONSUMER_PREFIX, 1)
}

pub fn bucket_scope(plugin_name: &str) -> String {
    let mut scope = String::with_capacity(plugin_name.len());
    for c in plugin_name.chars() {
        match c {
            '%' => scope.push_str("%25"),
            '/' => scope.push_str("%2F"),
            '#' => scope.push_str("%23"),
            c => scope.push(c),
        }
    }
    if scope.len() > MAX_SCOPE_LEN {
        let d = Sha256::digest(plugin_name.as_bytes());
        scope = format!("#{}", hex::encode(d.get(..8).unwrap_or_default()));
    }
    format!("{BUCKET_PREFIX}{scope}/")
}

/// A shared-data bucket name built on the stack, without allocating on the
/// request path: `scope` (from [`bucket_scope`]), the rule's name (empty for
/// the key's own limit), `/`, the key id.
pub struct BucketName {
    buf: [u8; 320],
    len: usize,
}

impl BucketName {
    /// The bucket of key `id` under `rule` in `scope`; `None` if longer than
    /// 320 bytes (which a valid scope, rule name and key id never are).
    pub fn new(scope: &str, rule: &str, id: &str) -> Option<Self> {
        let mut buf = [0u8; 320];
        let mut len = 0;
        for part in [scope.as_bytes(), rule.as_bytes(), b"/", id.as_bytes()] {
            buf.get_mut(len..len + part.len())?.copy_from_slice(part);
            len += part.len();
        }
        Some(BucketName { buf, len })
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        self.buf
            .get(..self.len)
            .and_then(|b| std::str::from_utf8(b).ok())
            .unwrap_or("")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test;

    #[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
    #[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
    fn bucket_names_are_built_without_allocation_limits_checked() {
        let scope = bucket_scope("keygate");
        assert_eq!(
            BucketName::new(&scope, "", "abc").unwrap().as_str(),
            "keygate/rl/keygate//abc"
        );
        assert_eq!(
            BucketName::new(&scope, "metered", "abc").unwrap().as_str(),
            "keygate/rl/keygate/metered/abc"
        );
        assert!(BucketName::new(&scope, "", &"x".repeat(320)).is_none());
        // The longest scope, rule name and key id (128 bytes) fit.
        let longest = bucket_scope(&"n".repeat(MAX_SCOPE_LEN));
        assert!(BucketName::new(&longest, &"r".repeat(64), &"i".repeat(128)).is_some());
    }

    #[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
    #[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
    fn bucket_scopes_never_hold_a_slash_and_keep_names_apart() {
        assert_eq!(bucket_scope(""), "keygate/rl//");
        assert_eq!(
            bucket_scope("istio-system.keygate"),
            "keygate/rl/istio-system.keygate/"
        );
        // Without the escape, scope "a/b" with key "x" and scope "a" with
        // rule "b" and key "/x" would name one bucket.
        assert_eq!(bucket_scope("a/b%#"), "keygate/rl/a%2Fb%25%23/");
        let long = "p".repeat(200);
        let hashed = bucket_scope(&long);
        assert!(hashed.starts_with("keygate/rl/#") && hashed.len() == BUCKET_PREFIX.len() + 18);
        assert_ne!(hashed, bucket_scope(&"p".repeat(201)));
        // A name that merely looks hashed is escaped, so it cannot collide.
        let lookalike = hashed
            .trim_start_matches(BUCKET_PREFIX)
            .trim_end_matches('/');
        assert_ne!(bucket_scope(lookalike), hashed);
        for name in ["", "a", "a/b", "%2F", "#x", &long] {
            let scope = bucket_scope(name);
            assert!(
                !scope[BUCKET_PREFIX.len()..scope.len() - 1].contains('/'),
                "{name}"
            );
        }
    }
}
