//! The README's full configuration example must stay valid.
#![allow(clippy::unwrap_used)]

#[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
use wasm_bindgen_test::wasm_bindgen_test;

#[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
#[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
fn readme_configuration_example_compiles() {
    let readme = include_str!("../../README.md");
    let section = &readme[readme.find("## Configuration").unwrap()..];
    let start = section.find("```json\n").unwrap() + "```json\n".len();
    let json = &section[start..start + section[start..].find("```").unwrap()];
    let policy = keygate_core::Policy::from_json(json.as_bytes());
    assert!(policy.is_ok(), "{:?}", policy.err());
    assert_eq!(policy.unwrap().keys().len(), 2);
}
