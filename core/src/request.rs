//! The request line (method, authority, path, query) that rules and
//! attributes read, borrowed from the header map.

use crate::headers::HeaderMap;

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

/// True for a gRPC request, as Envoy tells one (`content-type`
/// `application/grpc`, or that followed by `+` or `;`): Envoy turns its local
/// replies into gRPC statuses.
pub fn is_grpc(headers: &HeaderMap<'_>) -> bool {
    headers
        .get(b"content-type")
        .and_then(|v| v.strip_prefix(b"application/grpc"))
        .is_some_and(|rest| matches!(rest.first(), None | Some(b'+' | b';')))
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

/// The header map and request line of `pairs`, for tests.
#[cfg(test)]
pub(crate) fn line<'a>(pairs: &'a [(&'a str, &'a str)]) -> (HeaderMap<'a>, RequestLine<'a>) {
    let map = HeaderMap::from_pairs(
        pairs
            .iter()
            .map(|(n, v)| (n.as_bytes(), v.as_bytes()))
            .collect(),
    );
    let l = RequestLine::from_headers(&map);
    (map, l)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test;

    #[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
    #[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
    fn grpc_requests_are_told_as_envoy_tells_them() {
        let grpc = |ct: &str| is_grpc(&line(&[("content-type", ct)]).0);
        assert!(grpc("application/grpc"));
        assert!(grpc("application/grpc+proto"));
        assert!(grpc("application/grpc;charset=utf-8"));
        assert!(!grpc("application/grpc-web"));
        assert!(!grpc("application/json"));
        assert!(!is_grpc(&line(&[(":path", "/")]).0));
    }

    #[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
    #[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
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
}
