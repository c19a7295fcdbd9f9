//! mcpguard's proxy-wasm HTTP filter. `config`, `decide` and `lifecycle` hold everything
//! that can be decided and carried out without Envoy and are tested natively; `wasm` is
//! the thin proxy-wasm glue (a [`lifecycle::Host`]) and only exists in the `.wasm`.

pub mod config;
pub mod counters;
pub mod decide;
pub mod lifecycle;

#[cfg(target_arch = "wasm32")]
mod stream;
#[cfg(target_arch = "wasm32")]
mod wasm;
