//! keygate: the proxy-wasm filter. Thin host glue around `keygate-core`:
//! it reads headers as bytes, keeps rate-limit buckets in shared data, sends
//! local replies, logs and counts. Every decision is made in the core.

#[cfg(target_arch = "wasm32")]
mod abi;
#[cfg(target_arch = "wasm32")]
mod config_cache;
#[cfg(target_arch = "wasm32")]
mod control;
#[cfg(all(target_arch = "wasm32", feature = "crash-test"))]
mod crash_test;
#[cfg(target_arch = "wasm32")]
mod filter;
#[cfg(target_arch = "wasm32")]
mod metrics;
#[cfg(target_arch = "wasm32")]
mod shared;
#[cfg(target_arch = "wasm32")]
mod usage;

#[cfg(target_arch = "wasm32")]
proxy_wasm::main! {{
    std::panic::set_hook(Box::new(|info| {
        abi::log(abi::Level::Critical, &format!("panic: {info}"));
    }));
    proxy_wasm::set_root_context(|_| Box::<filter::KeygateRoot>::default());
}}
