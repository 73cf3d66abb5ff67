//! `keygate validate --kind envoy`: the keygate filters of an Envoy
//! configuration (a bootstrap, or an admin `/config_dump`; YAML or JSON),
//! their plugin configurations, and, for `"forward_with": "filter_state"`,
//! the header configuration of every route behind them.
//!
//! In that mode keygate edits no request header on an allowed request: the
//! route's `request_headers_to_remove` strips the credential and client
//! copies of the forwarded headers, and its `request_headers_to_add` sets
//! them from keygate's filter state. A route without that configuration
//! would forward the credential and no identity, so every route that
//! forwards (`route`, not `direct_response` or `redirect`) must have it.

use keygate_core::policy::RouteHeaders;
use keygate_core::Policy;
use serde_json::Value;

/// What the check found.
#[derive(Debug, Default)]
pub struct Report {
    /// One line per keygate filter found.
    pub filters: Vec<String>,
    /// Problems, each starting with the place in the document.
    pub errors: Vec<String>,
}

/// Checks the Envoy configuration `text` (YAML or JSON).
pub fn check(text: &str) -> Report {
    let mut report = Report::default();
    let doc: Value = match serde_norway::from_str(text) {
        Ok(v) => v,
        Err(e) => {
            report
                .errors
                .push(format!("not a YAML or JSON document: {e}"));
            return report;
        }
    };
    let mut managers = Vec::new();
    find_managers(&doc, String::new(), &mut managers);
    for (path, hcm) in managers {
        check_manager(&doc, &path, hcm, &mut report);
    }
    if report.filters.is_empty() && report.errors.is_empty() {
        report.errors.push(
            "no keygate filter found (a wasm filter whose name, root_id or module names keygate)"
                .into(),
        );
    }
    report
}

/// Every HTTP connection manager (an object with `http_filters`), with its path.
fn find_managers<'v>(v: &'v Value, path: String, out: &mut Vec<(String, &'v Value)>) {
    match v {
        Value::Object(map) => {
            if map.get("http_filters").is_some_and(Value::is_array) {
                out.push((path.clone(), v));
            }
            for (k, child) in map {
                find_managers(child, format!("{path}.{k}"), out);
            }
        }
        Value::Array(items) => {
            for (i, child) in items.iter().enumerate() {
                find_managers(child, format!("{path}[{i}]"), out);
            }
        }
        _ => {}
    }
}

/// The wasm filter's `config`, if the filter is keygate.
fn keygate_config(filter: &Value) -> Option<&Value> {
    let typed = filter.get("typed_config")?;
    let kind = typed.get("@type")?.as_str()?;
    if !kind.ends_with("envoy.extensions.filters.http.wasm.v3.Wasm") {
        return None;
    }
    let config = typed.get("config")?;
    let names = ["name", "root_id"]
        .iter()
        .filter_map(|k| config.get(k).and_then(Value::as_str))
        .chain(
            [
                "/vm_config/code/local/filename",
                "/vm_config/code/remote/http_uri/uri",
            ]
            .iter()
            .filter_map(|p| config.pointer(p).and_then(Value::as_str)),
        )
        .any(|s| s.contains("keygate"));
    names.then_some(config)
}

fn check_manager(doc: &Value, path: &str, hcm: &Value, report: &mut Report) {
    let filters = hcm
        .get("http_filters")
        .and_then(Value::as_array)
        .map_or(&[][..], Vec::as_slice);
    for (i, filter) in filters.iter().enumerate() {
        let Some(config) = keygate_config(filter) else {
            continue;
        };
        let at = format!("{path}.http_filters[{i}]");
        let json = config
            .pointer("/configuration/value")
            .and_then(Value::as_str)
            .unwrap_or("{}");
        let policy = match Policy::from_json(json.as_bytes()) {
            Ok(p) => p,
            Err(errors) => {
                report.errors.extend(
                    errors
                        .iter()
                        .map(|e| format!("{at}: plugin configuration: {e}")),
                );
                continue;
            }
        };
        let keys = policy.keys().len();
        let Some(needed) = policy.route_headers() else {
            report
                .filters
                .push(format!("{at}: {keys} keys, forward_with headers"));
            continue;
        };
        let checked = check_routes(doc, path, hcm, &needed, report);
        report.filters.push(format!(
            "{at}: {keys} keys, forward_with filter_state, {checked} forwarding routes checked"
        ));
    }
}

/// Checks every forwarding route of `hcm`; returns how many there were.
fn check_routes(
    doc: &Value,
    path: &str,
    hcm: &Value,
    needed: &RouteHeaders,
    report: &mut Report,
) -> usize {
    let (route_config, rc_path) = if let Some(rc) = hcm.get("route_config") {
        (rc, format!("{path}.route_config"))
    } else if let Some(name) = hcm
        .pointer("/rds/route_config_name")
        .and_then(Value::as_str)
    {
        match find_route_config(doc, name) {
            Some(rc) => (rc, format!("route configuration {name:?}")),
            None => {
                report.errors.push(format!(
                    "{path}: routes come from RDS ({name:?}) and are not in this file: check an admin /config_dump instead"
                ));
                return 0;
            }
        }
    } else {
        report.errors.push(format!(
            "{path}: no route_config or rds (scoped routes are not checked)"
        ));
        return 0;
    };
    let reverse = hcm
        .get("most_specific_header_mutations_wins")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let mut count = 0;
    let hosts = route_config
        .get("virtual_hosts")
        .and_then(Value::as_array)
        .map_or(&[][..], Vec::as_slice);
    for (h, vhost) in hosts.iter().enumerate() {
        let routes = vhost
            .get("routes")
            .and_then(Value::as_array)
            .map_or(&[][..], Vec::as_slice);
        for (r, route) in routes.iter().enumerate() {
            if route.get("route").is_none() {
                continue;
            }
            count += 1;
            // Envoy evaluates the route's headers, then the virtual host's,
            // then the route configuration's (the reverse with
            // most_specific_header_mutations_wins); each level removes, then adds.
            let mut levels = [route, vhost, route_config];
            if reverse {
                levels.reverse();
            }
            let at = format!("{rc_path}.virtual_hosts[{h}].routes[{r}]");
            for problem in route_problems(&levels, needed) {
                report.errors.push(format!("{at}: {problem}"));
            }
        }
    }
    count
}

/// A route configuration named `name` anywhere in `doc` (a config dump
/// carries them under `dynamic_route_configs` / `static_route_configs`).
fn find_route_config<'v>(doc: &'v Value, name: &str) -> Option<&'v Value> {
    match doc {
        Value::Object(map) => {
            if map.get("name").and_then(Value::as_str) == Some(name)
                && map.contains_key("virtual_hosts")
            {
                return Some(doc);
            }
            map.values().find_map(|v| find_route_config(v, name))
        }
        Value::Array(items) => items.iter().find_map(|v| find_route_config(v, name)),
        _ => None,
    }
}

/// The lowercase names in a level's `request_headers_to_remove`.
fn removed(level: &Value) -> Vec<String> {
    level
        .get("request_headers_to_remove")
        .and_then(Value::as_array)
        .map_or(&[][..], Vec::as_slice)
        .iter()
        .filter_map(Value::as_str)
        .map(str::to_ascii_lowercase)
        .collect()
}

/// The `(name, value, keep_empty_value)` entries of a level's `request_headers_to_add`.
fn added(level: &Value) -> Vec<(String, String, bool)> {
    level
        .get("request_headers_to_add")
        .and_then(Value::as_array)
        .map_or(&[][..], Vec::as_slice)
        .iter()
        .filter_map(|entry| {
            let header = entry.get("header")?;
            let name = header.get("key")?.as_str()?.to_ascii_lowercase();
            let value = header.get("value").and_then(Value::as_str).unwrap_or("");
            let keep = entry
                .get("keep_empty_value")
                .and_then(Value::as_bool)
                .unwrap_or(false);
            Some((name, value.to_string(), keep))
        })
        .collect()
}

/// What is wrong with one route whose header levels, in Envoy's order of
/// evaluation, are `levels`.
fn route_problems(levels: &[&Value], needed: &RouteHeaders) -> Vec<String> {
    let removes: Vec<Vec<String>> = levels.iter().map(|l| removed(l)).collect();
    let adds: Vec<Vec<(String, String, bool)>> = levels.iter().map(|l| added(l)).collect();
    let mut problems = Vec::new();
    for name in &needed.remove {
        if !removes.iter().flatten().any(|n| n == name) {
            problems.push(format!("request_headers_to_remove lacks {name:?}"));
        }
    }
    for (name, state) in &needed.add {
        let want = format!("%FILTER_STATE(wasm.{state}:PLAIN)%");
        let found = adds
            .iter()
            .enumerate()
            .flat_map(|(i, list)| list.iter().map(move |a| (i, a)))
            .filter(|(_, (n, _, _))| n == name)
            .collect::<Vec<_>>();
        let Some((level, (_, value, keep))) = found.first() else {
            problems.push(format!(
                "request_headers_to_add lacks {{header: {{key: {name}, value: \"{want}\"}}}}"
            ));
            continue;
        };
        if value != &want || found.len() > 1 {
            problems.push(format!(
                "{name:?} must be added once, with the value \"{want}\" only"
            ));
        }
        if *keep {
            problems.push(format!(
                "{name:?}: keep_empty_value would forward an empty header when keygate set none"
            ));
        }
        // A removal evaluated after the addition would delete what was added.
        if removes[level + 1..].iter().flatten().any(|n| n == name) {
            problems.push(format!(
                "{name:?} is removed at a level Envoy evaluates after the one that adds it"
            ));
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    const PLUGIN: &str = r#"{\"forward_with\": \"filter_state\", \"forward\": {\"environment\": \"x-env\"}, \"keys\": []}"#;

    fn bootstrap(route_extra: &str) -> String {
        format!(
            r#"{{"static_resources": {{"listeners": [{{"filter_chains": [{{"filters": [{{"typed_config": {{
              "http_filters": [
                {{"name": "envoy.filters.http.wasm", "typed_config": {{
                  "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
                  "config": {{"name": "keygate", "root_id": "keygate",
                    "configuration": {{"value": "{PLUGIN}"}}}}}}}},
                {{"name": "envoy.filters.http.router"}}],
              "route_config": {{"virtual_hosts": [{{"name": "all", "domains": ["*"], "routes": [
                {{"match": {{"prefix": "/health"}}, "direct_response": {{"status": 200}}}},
                {{"match": {{"prefix": "/"}}, "route": {{"cluster": "backend"}} {route_extra}}}]}}]}}
            }}}}]}}]}}]}}}}"#
        )
    }

    const GOOD: &str = r#", "request_headers_to_remove": ["x-api-key", "authorization", "x-api-key-id", "x-api-key-key-id", "x-env"],
        "request_headers_to_add": [
          {"header": {"key": "x-api-key-id", "value": "%FILTER_STATE(wasm.keygate_identity:PLAIN)%"}},
          {"header": {"key": "x-api-key-key-id", "value": "%FILTER_STATE(wasm.keygate_key_id:PLAIN)%"}},
          {"header": {"key": "x-env", "value": "%FILTER_STATE(wasm.keygate_environment:PLAIN)%"}}]"#;

    #[test]
    fn a_route_with_the_headers_passes() {
        let r = check(&bootstrap(GOOD));
        assert!(r.errors.is_empty(), "{:?}", r.errors);
        assert_eq!(r.filters.len(), 1);
        assert!(
            r.filters[0].contains("1 forwarding routes checked"),
            "{:?}",
            r.filters
        );
    }

    #[test]
    fn a_route_that_forgets_them_is_named() {
        let r = check(&bootstrap(""));
        assert!(
            r.errors
                .iter()
                .any(|e| e.contains("routes[1]") && e.contains("lacks \"x-api-key\"")),
            "{:?}",
            r.errors
        );
        assert!(
            r.errors.iter().any(|e| e.contains("keygate_identity")),
            "{:?}",
            r.errors
        );
        // The direct_response route forwards nothing and is not checked.
        assert!(
            !r.errors.iter().any(|e| e.contains("routes[0]")),
            "{:?}",
            r.errors
        );
    }

    #[test]
    fn a_removal_after_the_addition_is_refused() {
        let late = GOOD.replace(
            r#""request_headers_to_remove": ["x-api-key", "authorization", "x-api-key-id","#,
            r#""request_headers_to_remove": ["x-api-key", "authorization","#,
        );
        let doc = bootstrap(&late).replace(
            r#""domains": ["*"]"#,
            r#""domains": ["*"], "request_headers_to_remove": ["x-api-key-id"]"#,
        );
        let r = check(&doc);
        assert!(
            r.errors
                .iter()
                .any(|e| e.contains("removed at a level Envoy evaluates after")),
            "{:?}",
            r.errors
        );
    }

    #[test]
    fn the_default_mode_needs_no_route_headers() {
        let doc = bootstrap("").replace(r#"\"forward_with\": \"filter_state\", "#, "");
        let r = check(&doc);
        assert!(r.errors.is_empty(), "{:?}", r.errors);
        assert!(
            r.filters[0].contains("forward_with headers"),
            "{:?}",
            r.filters
        );
    }

    #[test]
    fn no_keygate_filter_is_an_error() {
        let r = check("static_resources: {}\n");
        assert_eq!(r.errors.len(), 1, "{:?}", r.errors);
    }
}
