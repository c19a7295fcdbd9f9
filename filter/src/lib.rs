//! mcpguard's proxy-wasm HTTP filter. `config` and `decide` hold everything that can be
//! decided without Envoy and are tested natively; `wasm` is the thin proxy-wasm glue and
//! only exists in the `.wasm`.

pub mod config;
pub mod counters;
pub mod decide;

#[cfg(target_arch = "wasm32")]
mod wasm;
