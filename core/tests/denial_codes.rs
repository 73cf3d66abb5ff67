//! The denial-code table the e2e harness reads (`tests/denial_codes.json`)
//! must equal the core's `DenyCode` table exactly: every code, in `ALL` order,
//! with its string and status. A new code without a row fails here.
#![allow(clippy::unwrap_used)]

use keygate_core::DenyCode;
use serde_json::Value;

#[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
use wasm_bindgen_test::wasm_bindgen_test;

const TABLE: &str = include_str!("../../tests/denial_codes.json");

#[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
#[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
fn denial_codes_json_equals_the_core_table() {
    let table: Value = serde_json::from_str(TABLE).unwrap();
    let rows: Vec<(String, u64)> = table["codes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| {
            let fields = row.as_object().unwrap();
            assert_eq!(fields.len(), 2, "a row has `code` and `status` only: {row}");
            (
                row["code"].as_str().unwrap().to_string(),
                row["status"].as_u64().unwrap(),
            )
        })
        .collect();
    let core: Vec<(String, u64)> = DenyCode::ALL
        .iter()
        .map(|code| (code.as_str().to_string(), u64::from(code.status())))
        .collect();
    assert_eq!(rows, core);
}

/// Each variant's place in the declaration, by an exhaustive match: a variant
/// added to `DenyCode` stops this test compiling until it is placed here, and
/// `VARIANTS` then asks for it in `ALL` (and so in the table above).
fn declared_at(code: DenyCode) -> usize {
    match code {
        DenyCode::MissingApiKey => 0,
        DenyCode::MalformedApiKey => 1,
        DenyCode::AmbiguousApiKey => 2,
        DenyCode::InvalidApiKey => 3,
        DenyCode::ExpiredApiKey => 4,
        DenyCode::InsufficientScope => 5,
        DenyCode::NotAttached => 6,
        DenyCode::IpNotAllowed => 7,
        DenyCode::RouteNotAllowed => 8,
        DenyCode::MissingAttribute => 9,
        DenyCode::AmbiguousAttribute => 10,
        DenyCode::InvalidJsonBody => 11,
        DenyCode::BodyTooLarge => 12,
        DenyCode::RateLimited => 13,
        DenyCode::KeyListUnavailable => 14,
        DenyCode::InternalError => 15,
    }
}

/// How many arms `declared_at` has.
const VARIANTS: usize = 16;

#[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
#[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
fn all_lists_every_variant() {
    assert_eq!(DenyCode::ALL.len(), VARIANTS);
    for (i, code) in DenyCode::ALL.iter().enumerate() {
        assert_eq!(declared_at(*code), i, "{code:?}");
    }
}

#[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
#[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
fn grpc_callers_get_the_status_the_readme_lists_for_each_http_status() {
    // README, "gRPC callers": 16 UNAUTHENTICATED for 401, 7 PERMISSION_DENIED
    // for 403, 8 RESOURCE_EXHAUSTED for 429 and 413, 3 INVALID_ARGUMENT for
    // 400, 14 UNAVAILABLE for 503, 13 INTERNAL for 500.
    let by_http = [
        (401, 16),
        (403, 7),
        (429, 8),
        (413, 8),
        (400, 3),
        (503, 14),
        (500, 13),
    ];
    for code in DenyCode::ALL {
        let want = by_http
            .iter()
            .find(|(http, _)| *http == code.status())
            .map(|(_, grpc)| *grpc);
        assert_eq!(Some(code.grpc_status()), want, "{code:?}");
    }
    assert_eq!(DenyCode::KeyListUnavailable.grpc_status(), 14);
}
