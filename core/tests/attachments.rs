//! Several attachments on one rule: configuration errors name the entry.
//! (What the checks answer is in tests/cases/attachments.json.)
#![allow(clippy::unwrap_used)]

use keygate_core::Policy;
use serde_json::json;

#[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
use wasm_bindgen_test::wasm_bindgen_test;

fn first_error(rule: serde_json::Value) -> String {
    let cfg = json!({"rules": [rule]});
    Policy::from_json(cfg.to_string().as_bytes()).unwrap_err()[0].to_string()
}

#[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
#[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
fn each_attachment_is_checked_at_its_own_path() {
    let e = first_error(json!({"match": {}, "action": "require", "attachments": [
        {"set": "campaigns", "from": {"json_body": "flo_campaign_id"}},
        {"set": "suppliers", "from": {"header": "bad header"}}
    ]}));
    assert_eq!(
        e,
        "rules[0].attachments[1].from.header: not a valid header name"
    );
    let e = first_error(json!({"match": {}, "action": "require", "attachments": [
        {"set": "", "from": {"query": "q"}}
    ]}));
    assert!(e.starts_with("rules[0].attachments[0].set: "), "{e}");
}

#[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
#[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
fn attachment_and_attachments_together_are_refused() {
    let a = json!({"set": "campaigns", "from": {"query": "campaign"}});
    let e =
        first_error(json!({"match": {}, "action": "require", "attachment": a, "attachments": [a]}));
    assert_eq!(
        e,
        "rules[0].attachments: give attachment or attachments, not both"
    );
}

#[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
#[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
fn public_rules_take_no_attachments() {
    let e = first_error(json!({"match": {}, "action": "public", "attachments": [
        {"set": "campaigns", "from": {"query": "campaign"}}
    ]}));
    assert!(e.starts_with("rules[0].action: "), "{e}");
}
