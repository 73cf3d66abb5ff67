//! Repository files the core's tests read, embedded at compile time so that
//! the tests also run as Wasm, where there is no file system. Included by
//! `core/tests/cases.rs` and by the unit tests of `core/src/compile_tests.rs`;
//! `cases.rs`'s `every_file_is_embedded` (native) fails when a file is added
//! to one of these folders but not here.
// Each includer uses part of it.
#![allow(dead_code)]

/// `(file name, bytes)` of `<dir>/<name>` (from the repository's root).
macro_rules! embed {
    ($dir:literal, $name:literal) => {
        (
            $name,
            include_bytes!(concat!("../../../", $dir, "/", $name)) as &[u8],
        )
    };
}

/// Every file of `tests/cases/`.
pub const CASE_FILES: &[(&str, &[u8])] = &[
    embed!("tests/cases", "attachments.json"),
    embed!("tests/cases", "auth.json"),
    embed!("tests/cases", "authz-closed.json"),
    embed!("tests/cases", "authz-core.json"),
    embed!("tests/cases", "authz.json"),
    embed!("tests/cases", "key-format.json"),
    embed!("tests/cases", "profile-lead-distro.json"),
    embed!("tests/cases", "profile-leadflip.json"),
    embed!("tests/cases", "profile-leadterra.json"),
    embed!("tests/cases", "profile-trust-leads.json"),
];

/// Every profile, `envoy/profiles/*.json`.
pub const PROFILES: &[(&str, &[u8])] = &[
    embed!("envoy/profiles", "lead-distro.json"),
    embed!("envoy/profiles", "leadflip.json"),
    embed!("envoy/profiles", "leadterra.json"),
    embed!("envoy/profiles", "trust-leads.json"),
];

/// The bytes of `envoy/profiles/<name>.json`.
pub fn profile(name: &str) -> Option<&'static [u8]> {
    PROFILES
        .iter()
        .find(|(file, _)| file.strip_suffix(".json") == Some(name))
        .map(|(_, bytes)| *bytes)
}
