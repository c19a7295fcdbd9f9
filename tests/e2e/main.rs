//! End-to-end tests through real Envoy with the built `.wasm`, the real policy service
//! and a real MCP server. Each test starts its own stack on free loopback ports.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod admin_api;
mod attacks;
mod attacks_admin;
mod attacks_audit;
mod attacks_limits;
mod attacks_signin;
mod audit;
mod breakglass;
mod capabilities;
mod check_stream;
mod console;
mod console_gateways;
mod console_people;
mod deploy;
mod dynamic_module;
mod enrollments;
mod envoy_config;
mod ext_authz;
mod failure;
mod gateway_url;
mod gateway_url_upstreams;
mod identities;
mod oauth;
mod oauth_identities;
mod observability;
mod provisioning;
mod routing;
mod run;
mod scaleout;
mod sidecar;
mod teams;
mod tls;
mod tokens;
