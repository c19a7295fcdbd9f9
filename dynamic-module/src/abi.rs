//! Envoy's dynamic-module ABI, the part an HTTP filter with one callout needs, written
//! by hand from Envoy's `abi.h` (ABI v0.1.0; Envoy 1.40 implements v0.2.0, which keeps
//! v0.1 modules working). Every `unsafe` of the crate is here: the exported event hooks
//! turn Envoy's pointers into `&` references for the duration of one hook, and
//! [`Stream`] wraps the callbacks in safe methods.

#![allow(unsafe_code)]

use std::ffi::c_void;
use std::marker::PhantomData;
use std::sync::Arc;

use crate::filter::{Config, Request};

/// Envoy owns it; valid for the duration of the hook it was handed to.
#[repr(C)]
#[derive(Clone, Copy)]
struct EnvoyBuffer {
    ptr: *const u8,
    len: usize,
}

impl EnvoyBuffer {
    const NULL: EnvoyBuffer = EnvoyBuffer {
        ptr: std::ptr::null(),
        len: 0,
    };

    /// # Safety
    /// `ptr` must point to `len` readable bytes for `'a` (or be null).
    unsafe fn bytes<'a>(self) -> &'a [u8] {
        if self.ptr.is_null() || self.len == 0 {
            return &[];
        }
        // SAFETY: the caller's contract.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

/// The module owns it; Envoy reads it during the call only.
#[repr(C)]
#[derive(Clone, Copy)]
struct ModuleBuffer {
    ptr: *const u8,
    len: usize,
}

impl ModuleBuffer {
    const NULL: ModuleBuffer = ModuleBuffer {
        ptr: std::ptr::null(),
        len: 0,
    };

    fn of(s: &[u8]) -> ModuleBuffer {
        ModuleBuffer {
            ptr: s.as_ptr(),
            len: s.len(),
        }
    }
}

#[repr(C)]
struct ModuleHeader {
    key: ModuleBuffer,
    value: ModuleBuffer,
}

/// Borrows `headers` for one call into Envoy.
fn module_headers(headers: &[(&str, &str)]) -> Vec<ModuleHeader> {
    headers
        .iter()
        .map(|(k, v)| ModuleHeader {
            key: ModuleBuffer::of(k.as_bytes()),
            value: ModuleBuffer::of(v.as_bytes()),
        })
        .collect()
}

#[repr(C)]
#[derive(Clone, Copy)]
struct EnvoyHeader {
    key: EnvoyBuffer,
    value: EnvoyBuffer,
}

// C enums, passed as `int`.
const REQUEST_HEADERS: u32 = 0;
const METADATA_DYNAMIC: u32 = 0;
const CALLOUT_INIT_SUCCESS: u32 = 0;
const CALLOUT_SUCCESS: u32 = 0;
const METRICS_SUCCESS: u32 = 0;

/// `envoy_dynamic_module_type_on_http_filter_request_headers_status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadersStatus {
    Continue = 0,
    /// Holds headers and body until [`Stream::continue_decoding`], as a paused
    /// proxy-wasm filter does.
    StopAllIterationAndWatermark = 4,
}

type FilterEnvoyPtr = *mut c_void;
type ConfigEnvoyPtr = *mut c_void;

unsafe extern "C" {
    fn envoy_dynamic_module_callback_http_get_headers_size(
        filter: FilterEnvoyPtr,
        header_type: u32,
    ) -> usize;
    fn envoy_dynamic_module_callback_http_get_headers(
        filter: FilterEnvoyPtr,
        header_type: u32,
        result: *mut EnvoyHeader,
    ) -> bool;
    fn envoy_dynamic_module_callback_http_set_header(
        filter: FilterEnvoyPtr,
        header_type: u32,
        key: ModuleBuffer,
        value: ModuleBuffer,
    ) -> bool;
    fn envoy_dynamic_module_callback_http_get_metadata_string(
        filter: FilterEnvoyPtr,
        source: u32,
        namespace: ModuleBuffer,
        key: ModuleBuffer,
        result: *mut EnvoyBuffer,
    ) -> bool;
    fn envoy_dynamic_module_callback_http_send_response(
        filter: FilterEnvoyPtr,
        status: u32,
        headers: *mut ModuleHeader,
        headers_len: usize,
        body: ModuleBuffer,
        details: ModuleBuffer,
    );
    fn envoy_dynamic_module_callback_http_filter_http_callout(
        filter: FilterEnvoyPtr,
        callout_id: *mut u64,
        cluster: ModuleBuffer,
        headers: *mut ModuleHeader,
        headers_len: usize,
        body: ModuleBuffer,
        timeout_ms: u64,
    ) -> u32;
    fn envoy_dynamic_module_callback_http_filter_continue_decoding(filter: FilterEnvoyPtr);
    fn envoy_dynamic_module_callback_http_clear_route_cache(filter: FilterEnvoyPtr);
    fn envoy_dynamic_module_callback_http_filter_config_define_counter(
        config: ConfigEnvoyPtr,
        name: ModuleBuffer,
        label_names: *mut ModuleBuffer,
        label_names_len: usize,
        id: *mut usize,
    ) -> u32;
    fn envoy_dynamic_module_callback_http_filter_increment_counter(
        filter: FilterEnvoyPtr,
        id: usize,
        label_values: *mut ModuleBuffer,
        label_values_len: usize,
        value: u64,
    ) -> u32;
    fn envoy_dynamic_module_callback_log(level: u32, message: ModuleBuffer);
    fn envoy_dynamic_module_callback_log_enabled(level: u32) -> bool;
}

/// `envoy_dynamic_module_type_log_level`.
#[derive(Debug, Clone, Copy)]
pub enum Level {
    Info = 2,
    Warn = 3,
    Error = 4,
}

/// Logs under Envoy's `dynamic_modules` logger; formats only when the level is on.
pub fn log(level: Level, message: impl FnOnce() -> String) {
    // SAFETY: plain values in; the message outlives the call.
    unsafe {
        if envoy_dynamic_module_callback_log_enabled(level as u32) {
            let message = message();
            envoy_dynamic_module_callback_log(level as u32, ModuleBuffer::of(message.as_bytes()));
        }
    }
}

/// The filter config being created, for defining counters (only possible then).
pub struct ConfigSite {
    ptr: ConfigEnvoyPtr,
}

impl ConfigSite {
    pub fn define_counter(&self, name: &str) -> Option<usize> {
        let mut id = 0;
        // SAFETY: `ptr` is the config Envoy is creating (we are inside `config_new`).
        let result = unsafe {
            envoy_dynamic_module_callback_http_filter_config_define_counter(
                self.ptr,
                ModuleBuffer::of(name.as_bytes()),
                std::ptr::null_mut(),
                0,
                &mut id,
            )
        };
        (result == METRICS_SUCCESS).then_some(id)
    }
}

/// One HTTP stream, for the duration of one event hook.
pub struct Stream<'hook> {
    ptr: FilterEnvoyPtr,
    hook: PhantomData<&'hook ()>,
}

impl<'hook> Stream<'hook> {
    /// Every request header, copied out of Envoy in one call, as bytes (a client may
    /// send values that are not UTF-8).
    pub fn request_headers(&self) -> Vec<(Vec<u8>, Vec<u8>)> {
        // SAFETY: `ptr` is this hook's stream; Envoy fills at most `len` entries, whose
        // bytes stay valid until the hook returns, and we copy them before that.
        unsafe {
            let len =
                envoy_dynamic_module_callback_http_get_headers_size(self.ptr, REQUEST_HEADERS);
            let mut raw = vec![
                EnvoyHeader {
                    key: EnvoyBuffer::NULL,
                    value: EnvoyBuffer::NULL,
                };
                len
            ];
            if len == 0
                || !envoy_dynamic_module_callback_http_get_headers(
                    self.ptr,
                    REQUEST_HEADERS,
                    raw.as_mut_ptr(),
                )
            {
                return Vec::new();
            }
            raw.iter()
                .map(|h| (h.key.bytes().to_vec(), h.value.bytes().to_vec()))
                .collect()
        }
    }

    /// Sets a request header; `None` removes it.
    pub fn set_request_header(&self, name: &str, value: Option<&str>) {
        let value = value.map_or(ModuleBuffer::NULL, |v| ModuleBuffer::of(v.as_bytes()));
        // SAFETY: `ptr` is this hook's stream; both buffers outlive the call.
        unsafe {
            envoy_dynamic_module_callback_http_set_header(
                self.ptr,
                REQUEST_HEADERS,
                ModuleBuffer::of(name.as_bytes()),
                value,
            );
        }
    }

    /// A string in the stream's dynamic metadata.
    pub fn metadata_string(&self, namespace: &str, key: &str) -> Option<String> {
        let mut out = EnvoyBuffer::NULL;
        // SAFETY: `ptr` is this hook's stream; `out` is copied before the hook returns.
        unsafe {
            envoy_dynamic_module_callback_http_get_metadata_string(
                self.ptr,
                METADATA_DYNAMIC,
                ModuleBuffer::of(namespace.as_bytes()),
                ModuleBuffer::of(key.as_bytes()),
                &mut out,
            )
            .then(|| String::from_utf8_lossy(out.bytes()).into_owned())
        }
    }

    pub fn send_response(&self, status: u32, headers: &[(&str, &str)], body: &[u8]) {
        let mut raw = module_headers(headers);
        // SAFETY: `ptr` is this hook's stream; everything passed outlives the call.
        unsafe {
            envoy_dynamic_module_callback_http_send_response(
                self.ptr,
                status,
                raw.as_mut_ptr(),
                raw.len(),
                ModuleBuffer::of(body),
                ModuleBuffer::NULL,
            );
        }
    }

    /// Starts a callout; its answer arrives in `http_callout_done`. `false`: it did
    /// not start (unknown cluster, no healthy host, ...).
    pub fn callout(
        &self,
        cluster: &str,
        headers: &[(&str, &str)],
        body: &[u8],
        timeout_ms: u64,
    ) -> bool {
        let mut raw = module_headers(headers);
        let mut id = 0;
        // SAFETY: `ptr` is this hook's stream; everything passed outlives the call.
        let result = unsafe {
            envoy_dynamic_module_callback_http_filter_http_callout(
                self.ptr,
                &mut id,
                ModuleBuffer::of(cluster.as_bytes()),
                raw.as_mut_ptr(),
                raw.len(),
                ModuleBuffer::of(body),
                timeout_ms,
            )
        };
        result == CALLOUT_INIT_SUCCESS
    }

    /// Envoy picks the route again: after the request's headers were rewritten.
    pub fn clear_route_cache(&self) {
        // SAFETY: `ptr` is this hook's stream.
        unsafe { envoy_dynamic_module_callback_http_clear_route_cache(self.ptr) }
    }

    pub fn continue_decoding(&self) {
        // SAFETY: `ptr` is this hook's stream.
        unsafe { envoy_dynamic_module_callback_http_filter_continue_decoding(self.ptr) }
    }

    pub fn increment_counter(&self, id: usize) {
        // SAFETY: `ptr` is this hook's stream; `id` came from `define_counter`.
        unsafe {
            envoy_dynamic_module_callback_http_filter_increment_counter(
                self.ptr,
                id,
                std::ptr::null_mut(),
                0,
                1,
            );
        }
    }
}

/// # Safety
/// `ptr` must be the `filter_envoy_ptr` Envoy passed to the current hook.
unsafe fn stream<'hook>(ptr: FilterEnvoyPtr) -> Stream<'hook> {
    Stream {
        ptr,
        hook: PhantomData,
    }
}

/// # Safety
/// `ptr` must come from `on_http_filter_new` and not yet be destroyed. Shared only:
/// hooks of one stream can nest (a callout answered inside the call that starts it),
/// so `Request` keeps its state in cells.
unsafe fn request<'hook>(ptr: *const c_void) -> &'hook Request {
    // SAFETY: the caller's contract.
    unsafe { &*(ptr as *const Request) }
}

static ABI_VERSION: &[u8] = b"v0.1.0\0";

#[unsafe(no_mangle)]
extern "C" fn envoy_dynamic_module_on_program_init() -> *const u8 {
    ABI_VERSION.as_ptr()
}

#[unsafe(no_mangle)]
extern "C" fn envoy_dynamic_module_on_http_filter_config_new(
    config_envoy: ConfigEnvoyPtr,
    _name: EnvoyBuffer,
    config: EnvoyBuffer,
) -> *const c_void {
    // SAFETY: Envoy's config bytes are valid during this hook; parsing copies them.
    let bytes = unsafe { config.bytes() };
    let site = ConfigSite { ptr: config_envoy };
    match Config::new(bytes, &site) {
        Some(config) => Arc::into_raw(Arc::new(config)) as *const c_void,
        None => std::ptr::null(),
    }
}

#[unsafe(no_mangle)]
extern "C" fn envoy_dynamic_module_on_http_filter_config_destroy(config: *const c_void) {
    // SAFETY: `config` came from `Arc::into_raw` in `config_new`; Envoy destroys it
    // once. Streams still running hold their own references.
    drop(unsafe { Arc::from_raw(config as *const Config) });
}

#[unsafe(no_mangle)]
extern "C" fn envoy_dynamic_module_on_http_filter_new(
    config: *const c_void,
    _filter_envoy: FilterEnvoyPtr,
) -> *const c_void {
    // SAFETY: `config` came from `Arc::into_raw` in `config_new` and is not destroyed
    // while Envoy creates streams for it; the stream takes a reference of its own.
    let config = unsafe {
        Arc::increment_strong_count(config as *const Config);
        Arc::from_raw(config as *const Config)
    };
    Box::into_raw(Box::new(Request::new(config))) as *const c_void
}

#[unsafe(no_mangle)]
extern "C" fn envoy_dynamic_module_on_http_filter_request_headers(
    filter_envoy: FilterEnvoyPtr,
    filter: *const c_void,
    _end_of_stream: bool,
) -> u32 {
    // SAFETY: this hook's pointers (see `stream`, `request`).
    let (s, r) = unsafe { (stream(filter_envoy), request(filter)) };
    r.on_request_headers(&s) as u32
}

#[unsafe(no_mangle)]
extern "C" fn envoy_dynamic_module_on_http_filter_http_callout_done(
    filter_envoy: FilterEnvoyPtr,
    filter: *const c_void,
    _callout_id: u64,
    result: u32,
    headers: *const EnvoyHeader,
    headers_len: usize,
    body: *const EnvoyBuffer,
    body_len: usize,
) {
    // SAFETY: this hook's pointers; the answer's headers and body chunks are Envoy's,
    // valid until the hook returns, and copied before that.
    let (s, r, status, body) = unsafe {
        let headers = if headers.is_null() {
            &[][..]
        } else {
            std::slice::from_raw_parts(headers, headers_len)
        };
        let status = headers
            .iter()
            .find(|h| h.key.bytes() == b":status")
            .and_then(|h| std::str::from_utf8(h.value.bytes()).ok())
            .and_then(|v| v.parse::<u16>().ok());
        let chunks = if body.is_null() {
            &[][..]
        } else {
            std::slice::from_raw_parts(body, body_len)
        };
        let body: Vec<u8> = chunks.iter().flat_map(|c| c.bytes()).copied().collect();
        (stream(filter_envoy), request(filter), status, body)
    };
    let status = status.filter(|_| result == CALLOUT_SUCCESS);
    r.on_check_answer(&s, status, &body);
}

#[unsafe(no_mangle)]
extern "C" fn envoy_dynamic_module_on_http_filter_destroy(filter: *const c_void) {
    // SAFETY: `filter` came from `Box::into_raw` in `filter_new`; destroyed once.
    drop(unsafe { Box::from_raw(filter as *mut Request) });
}

// Hooks Envoy requires but this filter has nothing to do in: let everything through.

#[unsafe(no_mangle)]
extern "C" fn envoy_dynamic_module_on_http_filter_request_body(
    _: FilterEnvoyPtr,
    _: *const c_void,
    _: bool,
) -> u32 {
    0
}

#[unsafe(no_mangle)]
extern "C" fn envoy_dynamic_module_on_http_filter_request_trailers(
    _: FilterEnvoyPtr,
    _: *const c_void,
) -> u32 {
    0
}

#[unsafe(no_mangle)]
extern "C" fn envoy_dynamic_module_on_http_filter_response_headers(
    _: FilterEnvoyPtr,
    _: *const c_void,
    _: bool,
) -> u32 {
    0
}

#[unsafe(no_mangle)]
extern "C" fn envoy_dynamic_module_on_http_filter_response_body(
    _: FilterEnvoyPtr,
    _: *const c_void,
    _: bool,
) -> u32 {
    0
}

#[unsafe(no_mangle)]
extern "C" fn envoy_dynamic_module_on_http_filter_response_trailers(
    _: FilterEnvoyPtr,
    _: *const c_void,
) -> u32 {
    0
}

#[unsafe(no_mangle)]
extern "C" fn envoy_dynamic_module_on_http_filter_stream_complete(
    _: FilterEnvoyPtr,
    _: *const c_void,
) {
}

#[unsafe(no_mangle)]
extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_headers(
    _: FilterEnvoyPtr,
    _: *const c_void,
    _: u64,
    _: *const EnvoyHeader,
    _: usize,
    _: bool,
) {
}

#[unsafe(no_mangle)]
extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_data(
    _: FilterEnvoyPtr,
    _: *const c_void,
    _: u64,
    _: *const EnvoyBuffer,
    _: usize,
    _: bool,
) {
}

#[unsafe(no_mangle)]
extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_trailers(
    _: FilterEnvoyPtr,
    _: *const c_void,
    _: u64,
    _: *const EnvoyHeader,
    _: usize,
) {
}

#[unsafe(no_mangle)]
extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_complete(
    _: FilterEnvoyPtr,
    _: *const c_void,
    _: u64,
) {
}

#[unsafe(no_mangle)]
extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_reset(
    _: FilterEnvoyPtr,
    _: *const c_void,
    _: u64,
    _: u32,
) {
}

#[unsafe(no_mangle)]
extern "C" fn envoy_dynamic_module_on_http_filter_scheduled(
    _: FilterEnvoyPtr,
    _: *const c_void,
    _: u64,
) {
}

#[unsafe(no_mangle)]
extern "C" fn envoy_dynamic_module_on_http_filter_downstream_above_write_buffer_high_watermark(
    _: FilterEnvoyPtr,
    _: *const c_void,
) {
}

#[unsafe(no_mangle)]
extern "C" fn envoy_dynamic_module_on_http_filter_downstream_below_write_buffer_low_watermark(
    _: FilterEnvoyPtr,
    _: *const c_void,
) {
}
