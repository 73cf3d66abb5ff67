//! Per request, `count` calls of the host function named in the plugin
//! configuration (`"<kind>:<count>"`, e.g. `"header_pairs:10"`), then
//! `Continue`. Benchmark code: it may panic, and it never runs in production.

use std::rc::Rc;

use proxy_wasm::hostcalls as host;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, MapType, MetricType};

proxy_wasm::main! {{
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(ProbeRoot::default()) });
}}

/// One host function, as keygate uses it on the request path.
#[derive(Clone, Copy, Default)]
enum Kind {
    #[default]
    Nothing,
    /// `proxy_get_header_map_pairs` on the request headers.
    HeaderPairs,
    /// `proxy_get_shared_data` of an 8-byte value.
    SharedGet,
    /// `proxy_set_shared_data` of an 8-byte value.
    SharedSet,
    /// `proxy_get_current_time_nanoseconds`.
    Clock,
    /// `proxy_replace_header_map_value` on the request headers.
    ReplaceHeader,
    /// `proxy_remove_header_map_value` of a header the request has
    /// (the client sends `x-probe-0` .. `x-probe-9`).
    RemoveHeader,
    /// `proxy_increment_metric`.
    Metric,
    /// `proxy_set_property` (filter state, as keygate sets on a denial).
    FilterState,
}

#[derive(Default)]
struct ProbeRoot {
    plan: Rc<(Kind, u32, u32)>,
}

impl Context for ProbeRoot {}

impl RootContext for ProbeRoot {
    fn on_configure(&mut self, _: usize) -> bool {
        let cfg = self.get_plugin_configuration().unwrap_or_default();
        let cfg = String::from_utf8_lossy(&cfg);
        let (kind, count) = cfg.split_once(':').unwrap_or(("nothing", "0"));
        let kind = match kind {
            "header_pairs" => Kind::HeaderPairs,
            "shared_get" => Kind::SharedGet,
            "shared_set" => Kind::SharedSet,
            "clock" => Kind::Clock,
            "replace_header" => Kind::ReplaceHeader,
            "remove_header" => Kind::RemoveHeader,
            "metric" => Kind::Metric,
            "filter_state" => Kind::FilterState,
            _ => Kind::Nothing,
        };
        let metric = host::define_metric(MetricType::Counter, "probe.count").unwrap_or(0);
        let _ = host::set_shared_data("probe/bucket", Some(&[0u8; 8]), None);
        self.plan = Rc::new((kind, count.trim().parse().unwrap_or(0), metric));
        true
    }

    fn create_http_context(&self, _: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(ProbeRequest {
            plan: self.plan.clone(),
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct ProbeRequest {
    plan: Rc<(Kind, u32, u32)>,
}

impl Context for ProbeRequest {}

impl HttpContext for ProbeRequest {
    fn on_http_request_headers(&mut self, _: usize, _: bool) -> Action {
        let (kind, count, metric) = *self.plan;
        for i in 0..count {
            match kind {
                Kind::Nothing => {}
                Kind::HeaderPairs => {
                    let _ = host::get_map_bytes(MapType::HttpRequestHeaders);
                }
                Kind::SharedGet => {
                    let _ = host::get_shared_data("probe/bucket");
                }
                Kind::SharedSet => {
                    let _ = host::set_shared_data("probe/bucket", Some(&[1u8; 8]), None);
                }
                Kind::Clock => {
                    let _ = host::get_current_time();
                }
                Kind::ReplaceHeader => {
                    let _ = host::set_map_value_bytes(MapType::HttpRequestHeaders, "x-probe", Some(b"v"));
                }
                Kind::RemoveHeader => {
                    // The benchmark client sends x-probe-0 .. x-probe-9.
                    let name = format!("x-probe-{i}");
                    let _ = host::set_map_value_bytes(MapType::HttpRequestHeaders, &name, None);
                }
                Kind::Metric => {
                    let _ = host::increment_metric(metric, 1);
                }
                Kind::FilterState => {
                    let _ = host::set_property(vec!["probe_state"], Some(b"denied"));
                }
            }
        }
        Action::Continue
    }
}
