//! The few proxy-wasm host calls keygate makes, as raw imports with
//! non-panicking wrappers.
//!
//! The SDK's `hostcalls` panic on any unexpected status and its `String`
//! getters panic on non-UTF-8 bytes; a panic kills the VM for every request on
//! that worker. Here every call returns `Result<_, Status>` and bytes stay bytes.

use std::cell::RefCell;
use std::ptr::null_mut;
use std::sync::atomic::{AtomicU32, Ordering};

use keygate_core::tally::{MetricIds, MetricKind};

/// A raw proxy-wasm status code (`0` is OK).
pub type Status = u32;

const OK: Status = 0;
const NOT_FOUND: Status = 1;
const CAS_MISMATCH: Status = 8;

/// Header map selector: request headers.
pub const REQUEST_HEADERS: u32 = 0;
/// Header map selector: HTTP callout response headers.
pub const CALLOUT_RESPONSE_HEADERS: u32 = 6;
/// Buffer selector: HTTP callout response body.
pub const CALLOUT_RESPONSE_BODY: u32 = 4;
/// Buffer selector: request body.
pub const REQUEST_BODY: u32 = 0;
/// Buffer selector: plugin configuration.
pub const PLUGIN_CONFIGURATION: u32 = 7;

/// Log levels as proxy-wasm numbers them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u32)]
pub enum Level {
    /// Debug.
    Debug = 1,
    /// Info.
    Info = 2,
    /// Warning.
    Warn = 3,
    /// Error.
    Error = 4,
    /// Critical.
    Critical = 5,
}

#[link(wasm_import_module = "env")]
extern "C" {
    fn proxy_log(level: u32, data: *const u8, size: usize) -> u32;
    fn proxy_get_log_level(level: *mut u32) -> u32;
    fn proxy_get_buffer_bytes(
        kind: u32,
        start: usize,
        max: usize,
        data: *mut *mut u8,
        size: *mut usize,
    ) -> u32;
    fn proxy_get_header_map_pairs(map: u32, data: *mut *mut u8, size: *mut usize) -> u32;
    fn proxy_remove_header_map_value(map: u32, key: *const u8, key_size: usize) -> u32;
    fn proxy_replace_header_map_value(
        map: u32,
        key: *const u8,
        key_size: usize,
        value: *const u8,
        value_size: usize,
    ) -> u32;
    #[allow(clippy::too_many_arguments)]
    fn proxy_send_local_response(
        status: u32,
        details: *const u8,
        details_size: usize,
        body: *const u8,
        body_size: usize,
        headers: *const u8,
        headers_size: usize,
        grpc_status: i32,
    ) -> u32;
    fn proxy_get_shared_data(
        key: *const u8,
        key_size: usize,
        data: *mut *mut u8,
        size: *mut usize,
        cas: *mut u32,
    ) -> u32;
    fn proxy_set_shared_data(
        key: *const u8,
        key_size: usize,
        value: *const u8,
        value_size: usize,
        cas: u32,
    ) -> u32;
    fn proxy_define_metric(kind: u32, name: *const u8, name_size: usize, id: *mut u32) -> u32;
    fn proxy_increment_metric(id: u32, offset: i64) -> u32;
    fn proxy_record_metric(id: u32, value: u64) -> u32;
    fn proxy_set_property(
        path: *const u8,
        path_size: usize,
        value: *const u8,
        value_size: usize,
    ) -> u32;
    fn proxy_get_property(
        path: *const u8,
        path_size: usize,
        data: *mut *mut u8,
        size: *mut usize,
    ) -> u32;
    fn proxy_get_current_time_nanoseconds(time: *mut u64) -> u32;
    fn proxy_set_tick_period_milliseconds(period: u32) -> u32;
}

#[link(wasm_import_module = "wasi_snapshot_preview1")]
extern "C" {
    fn clock_time_get(id: u32, precision: u64, time: *mut u64) -> u16;
}

/// Takes ownership of a host-allocated buffer (allocated through the SDK's
/// `proxy_on_memory_allocate`, i.e. a `Vec<u8>` of exactly `size`).
unsafe fn owned(data: *mut u8, size: usize) -> Vec<u8> {
    if data.is_null() {
        Vec::new()
    } else {
        Vec::from_raw_parts(data, size, size)
    }
}

fn status(s: u32) -> Result<(), Status> {
    if s == OK {
        Ok(())
    } else {
        Err(s)
    }
}

/// Writes one log line at `level`.
pub fn log(level: Level, message: &str) {
    // SAFETY: pointer and length describe a live &str.
    let _ = unsafe { proxy_log(level as u32, message.as_ptr(), message.len()) };
}

/// The host's log level as last read by [`refresh_log_level`]; 0 (trace)
/// until then, so that nothing is hidden before the first read.
static LOG_LEVEL: AtomicU32 = AtomicU32::new(0);

/// Reads the host's log level into the cache [`log_enabled`] consults. The
/// root calls it at configure time and on every tick, so a level changed
/// through Envoy's admin `/logging` takes effect within a tick, and no
/// request pays a host call to ask.
pub fn refresh_log_level() {
    let mut current = 0u32;
    // SAFETY: `current` is a valid out-pointer.
    let s = unsafe { proxy_get_log_level(&mut current) };
    // A host that will not say gets every line.
    LOG_LEVEL.store(if s == OK { current } else { 0 }, Ordering::Relaxed);
}

/// True when the host would print a line at `level` (as of the last refresh).
pub fn log_enabled(level: Level) -> bool {
    LOG_LEVEL.load(Ordering::Relaxed) <= level as u32
}

/// Up to `max` bytes of a host buffer, from offset `start`.
fn buffer(kind: u32, start: usize, max: usize) -> Result<Vec<u8>, Status> {
    let (mut data, mut size) = (null_mut(), 0usize);
    // SAFETY: out-pointers are valid; the host allocates through our allocator.
    let s = unsafe { proxy_get_buffer_bytes(kind, start, max, &mut data, &mut size) };
    match s {
        OK => Ok(unsafe { owned(data, size) }),
        NOT_FOUND => Ok(Vec::new()),
        e => Err(e),
    }
}

/// The whole plugin configuration buffer.
pub fn plugin_configuration() -> Result<Vec<u8>, Status> {
    buffer(PLUGIN_CONFIGURATION, 0, usize::MAX)
}

/// Up to `max` bytes of the plugin configuration from offset `start`.
pub fn plugin_configuration_range(start: usize, max: usize) -> Result<Vec<u8>, Status> {
    buffer(PLUGIN_CONFIGURATION, start, max)
}

/// The buffered request body, up to `max` bytes.
pub fn request_body(max: usize) -> Result<Vec<u8>, Status> {
    buffer(REQUEST_BODY, 0, max)
}

/// An Envoy attribute such as `source.address` (path segments joined by NUL).
pub fn property(path: &[u8]) -> Result<Option<Vec<u8>>, Status> {
    let (mut data, mut size) = (null_mut(), 0usize);
    // SAFETY: out-pointers are valid.
    match unsafe { proxy_get_property(path.as_ptr(), path.len(), &mut data, &mut size) } {
        OK => Ok(Some(unsafe { owned(data, size) })),
        NOT_FOUND => Ok(None),
        e => Err(e),
    }
}

/// Wall-clock nanoseconds since the Unix epoch.
pub fn unix_ns() -> Option<u64> {
    let mut t = 0u64;
    // SAFETY: `t` is a valid out-pointer.
    (unsafe { proxy_get_current_time_nanoseconds(&mut t) } == OK).then_some(t)
}

/// A serialized header map, decoded later by `keygate_core::headers`.
pub fn header_pairs(map: u32) -> Result<Vec<u8>, Status> {
    let (mut data, mut size) = (null_mut(), 0usize);
    // SAFETY: as above.
    status(unsafe { proxy_get_header_map_pairs(map, &mut data, &mut size) })?;
    Ok(unsafe { owned(data, size) })
}

/// The serialized request header map.
pub fn request_header_pairs() -> Result<Vec<u8>, Status> {
    header_pairs(REQUEST_HEADERS)
}

/// Up to `max` bytes of the HTTP callout response body.
pub fn callout_body(max: usize) -> Result<Vec<u8>, Status> {
    buffer(CALLOUT_RESPONSE_BODY, 0, max)
}

/// Removes every value of a request header.
pub fn remove_request_header(name: &[u8]) -> Result<(), Status> {
    // SAFETY: pointer and length describe a live slice.
    status(unsafe { proxy_remove_header_map_value(REQUEST_HEADERS, name.as_ptr(), name.len()) })
}

/// Sets a request header, replacing every existing value.
pub fn replace_request_header(name: &[u8], value: &[u8]) -> Result<(), Status> {
    // SAFETY: pointers and lengths describe live slices.
    status(unsafe {
        proxy_replace_header_map_value(
            REQUEST_HEADERS,
            name.as_ptr(),
            name.len(),
            value.as_ptr(),
            value.len(),
        )
    })
}

/// Sends a local reply. `headers` is a serialized header map. For a gRPC
/// request Envoy sends `grpc_status` (when not -1) with the body as
/// `grpc-message`.
pub fn send_local_response(
    code: u32,
    details: &str,
    body: &[u8],
    headers: &[u8],
    grpc_status: i32,
) -> Result<(), Status> {
    // SAFETY: pointers and lengths describe live slices.
    status(unsafe {
        proxy_send_local_response(
            code,
            details.as_ptr(),
            details.len(),
            body.as_ptr(),
            body.len(),
            headers.as_ptr(),
            headers.len(),
            grpc_status,
        )
    })
}

/// Reads a shared-data value and its CAS token (`None` when absent).
pub fn get_shared_data(key: &str) -> Result<Option<(Vec<u8>, u32)>, Status> {
    let (mut data, mut size, mut cas) = (null_mut(), 0usize, 0u32);
    // SAFETY: out-pointers are valid.
    let s =
        unsafe { proxy_get_shared_data(key.as_ptr(), key.len(), &mut data, &mut size, &mut cas) };
    match s {
        OK => Ok(Some((unsafe { owned(data, size) }, cas))),
        NOT_FOUND => Ok(None),
        e => Err(e),
    }
}

/// Writes a shared-data value; `cas = 0` is unconditional. `Ok(false)` on CAS mismatch.
pub fn set_shared_data(key: &str, value: &[u8], cas: u32) -> Result<bool, Status> {
    // SAFETY: pointers and lengths describe live slices.
    match unsafe {
        proxy_set_shared_data(key.as_ptr(), key.len(), value.as_ptr(), value.len(), cas)
    } {
        OK => Ok(true),
        CAS_MISMATCH => Ok(false),
        e => Err(e),
    }
}

/// Writes `key` only if it is absent; `Ok(false)` if another VM wrote it
/// first. Envoy writes an absent key whatever the CAS, and refuses to
/// overwrite a present one unless the CAS is 0 or its current token. Tokens
/// come from one process-wide counter, so `u32::MAX` matches an existing key
/// only if its last write happened to draw that exact token: about once in
/// 2^32 writes.
pub fn create_shared_data(key: &str, value: &[u8]) -> Result<bool, Status> {
    set_shared_data(key, value, u32::MAX)
}

thread_local! {
    /// This VM's metric ids: it lives across configuration updates, so each
    /// metric is defined once (see `MetricIds`).
    static METRIC_IDS: RefCell<MetricIds> = RefCell::default();
}

/// Defines a metric once per VM; its id.
fn define_metric(kind: MetricKind, name: &str) -> Result<u32, Status> {
    let code = match kind {
        MetricKind::Counter => 0,
        MetricKind::Gauge => 1,
    };
    METRIC_IDS.with(|ids| {
        ids.borrow_mut().get_or_define(kind, name, || {
            let mut id = 0u32;
            // SAFETY: pointer and length describe a live &str; `id` is a valid out-pointer.
            status(unsafe { proxy_define_metric(code, name.as_ptr(), name.len(), &mut id) })?;
            Ok(id)
        })
    })
}

/// Defines a counter (once per VM) and returns its id.
pub fn define_counter(name: &str) -> Result<u32, Status> {
    define_metric(MetricKind::Counter, name)
}

/// Defines a gauge (once per VM) and returns its id.
pub fn define_gauge(name: &str) -> Result<u32, Status> {
    define_metric(MetricKind::Gauge, name)
}

/// Sets a gauge.
pub fn record(id: u32, value: u64) {
    // SAFETY: plain values.
    let _ = unsafe { proxy_record_metric(id, value) };
}

/// Adds `by` to a counter.
pub fn increment(id: u32, by: i64) {
    // SAFETY: plain values.
    let _ = unsafe { proxy_increment_metric(id, by) };
}

/// Sets a filter-state value readable in access logs as `%FILTER_STATE(wasm.<name>:PLAIN)%`.
pub fn set_filter_state(name: &str, value: &[u8]) -> Result<(), Status> {
    // SAFETY: pointers and lengths describe live slices.
    status(unsafe { proxy_set_property(name.as_ptr(), name.len(), value.as_ptr(), value.len()) })
}

/// Asks for `on_tick` every `ms` milliseconds on this root context.
pub fn set_tick_period_ms(ms: u32) -> Result<(), Status> {
    // SAFETY: a plain value.
    status(unsafe { proxy_set_tick_period_milliseconds(ms) })
}

/// Monotonic nanoseconds from the host (WASI monotonic clock), the same
/// clock for every worker's VM. `None` if the host refuses.
pub fn monotonic_ns() -> Option<u64> {
    let mut t = 0u64;
    // SAFETY: `t` is a valid out-pointer. Clock id 1 is CLOCK_MONOTONIC.
    let s = unsafe { clock_time_get(1, 1, &mut t) };
    (s == 0).then_some(t)
}
