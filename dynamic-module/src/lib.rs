//! mcpguard's filter as an Envoy dynamic module: a native shared library Envoy loads
//! in place of a wasm VM (`envoy.filters.http.dynamic_modules`). It runs the wasm
//! filter's own request lifecycle (`mcpguard_filter::lifecycle`); only the host it runs
//! over differs. `make bench` measures it as setup (d), to see what proxy-wasm's
//! crossings cost; it is not yet shipped (BENCHMARKS.md).
//!
//! `abi` holds every `unsafe` of the crate; `filter` is safe Rust.

mod abi;
mod filter;
