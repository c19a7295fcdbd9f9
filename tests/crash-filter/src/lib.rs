//! Test-only stand-in for the mcpguard filter (never shipped): it answers every request
//! itself with `200 checked` and never lets one continue, except that a request
//! carrying `x-crash` makes it panic, which fails its wasm VM. The e2e test
//! `attacks::a_failed_vm_refuses_then_recovers` swaps it into the shipped Envoy config
//! to watch what the config's `failure_policy` does after a crash.

#[cfg(target_arch = "wasm32")]
mod glue {
    use proxy_wasm::traits::{Context, HttpContext, RootContext};
    use proxy_wasm::types::{Action, ContextType};

    proxy_wasm::main! {{
        proxy_wasm::set_root_context(|_| Box::new(Root));
    }}

    struct Root;
    impl Context for Root {}
    impl RootContext for Root {
        fn on_configure(&mut self, _size: usize) -> bool {
            true
        }
        fn create_http_context(&self, _id: u32) -> Option<Box<dyn HttpContext>> {
            Some(Box::new(Request))
        }
        fn get_type(&self) -> Option<ContextType> {
            Some(ContextType::HttpContext)
        }
    }

    struct Request;
    impl Context for Request {}
    impl HttpContext for Request {
        fn on_http_request_headers(&mut self, _headers: usize, _end: bool) -> Action {
            #[allow(clippy::panic)]
            if self.get_http_request_header_bytes("x-crash").is_some() {
                panic!("crash requested");
            }
            self.send_http_response(200, vec![("content-type", "text/plain")], Some(b"checked"));
            Action::Pause
        }
    }
}
