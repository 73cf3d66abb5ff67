//! Writes one JSON schema per Istio resource that keygate ships a manifest
//! for (envoy/istio/), taken from the CRDs in the crate istio-api-rs.
//!
//! Each schema is the CRD's `openAPIV3Schema` for that version, as the crate
//! re-emits it (kube's `CustomResourceExt::crd()`), with `apiVersion` and
//! `kind` pinned and a `$comment` naming where it came from.

use std::{env, fs, path::PathBuf};

use istio_api_rs::{
    extensions::v1alpha1::wasm_plugin::WasmPlugin, networking::v1alpha3::envoy_filter::EnvoyFilter,
};
use kube::CustomResourceExt;
use serde_json::{json, Value};

const SOURCE: &str = "istio-api-rs 0.12.0 (crates.io), feature v1_27: Istio 1.27.0's published CRDs \
     (kopium 0.22.5), emitted by kube 2.0.1 CustomResourceExt::crd(); written by tests/istio-schemas";

fn schema(crd: Value) -> (String, Value) {
    let spec = &crd["spec"];
    let version = &spec["versions"][0];
    let api_version = format!(
        "{}/{}",
        spec["group"].as_str().unwrap(),
        version["name"].as_str().unwrap()
    );
    let kind = spec["names"]["kind"].as_str().unwrap().to_string();
    let mut schema = version["schema"]["openAPIV3Schema"].clone();
    let props = schema["properties"].as_object_mut().expect("properties");
    props.insert("apiVersion".into(), json!({ "const": api_version }));
    props.insert("kind".into(), json!({ "const": kind }));
    props.insert("metadata".into(), json!({ "type": "object" }));
    schema["$comment"] = json!(format!("{kind} {api_version} from {SOURCE}"));
    let name = format!(
        "{}-{}.json",
        crd["metadata"]["name"].as_str().unwrap(),
        version["name"].as_str().unwrap()
    );
    (name, schema)
}

fn main() {
    let out = PathBuf::from(env::args().nth(1).expect("usage: istio-schemas OUT_DIR"));
    fs::create_dir_all(&out).expect("create OUT_DIR");
    for crd in [WasmPlugin::crd(), EnvoyFilter::crd()] {
        let (name, schema) = schema(serde_json::to_value(crd).expect("CRD as JSON"));
        let text = serde_json::to_string_pretty(&schema).expect("schema as JSON") + "\n";
        fs::write(out.join(&name), text).expect("write schema");
        println!("{}", out.join(name).display());
    }
}
