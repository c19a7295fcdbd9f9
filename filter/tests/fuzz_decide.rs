//! Property tests of the filter's decisions on arbitrary request headers and arbitrary
//! check answers: nothing panics (a panic kills the VM for every request on the
//! worker), a check goes out only for a well-formed route and credential, and only a
//! well-formed allow forwards.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use mcpguard_core::check::{CheckResponse, Credential, MAX_NAME};
use mcpguard_core::jwt::{self, Keys};
use mcpguard_core::route::is_valid_slug;
use mcpguard_core::token::{TokenKind, format_token};
use mcpguard_filter::config::FilterConfig;
use mcpguard_filter::decide::{self, Clock, Finish, Incoming, RawHeaders, Start};
use proptest::prelude::*;

fn config() -> ProptestConfig {
    ProptestConfig {
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

fn header_value() -> impl Strategy<Value = Vec<u8>> {
    let token = format_token(TokenKind::HostApi, &"a".repeat(40)).unwrap();
    let jwt = signed().1.clone();
    prop_oneof![
        any::<Vec<u8>>(),
        "\\PC{0,40}".prop_map(String::into_bytes),
        "/mcp/[a-z0-9-]{1,6}/[a-z0-9-]{1,6}(/[a-z.%0-9;]{0,6}){0,3}(\\?[a-z=&]{0,8})?"
            .prop_map(String::into_bytes),
        "/\\.well-known/oauth-protected-resource/mcp/[a-z]{1,4}/[a-z]{1,4}"
            .prop_map(String::into_bytes),
        "(Bearer|bearer|Basic) ?[ -~]{0,60}".prop_map(String::into_bytes),
        Just(format!("Bearer {token}").into_bytes()),
        Just(format!("Bearer {jwt}").into_bytes()),
        Just(jwt.into_bytes()),
    ]
}

fn headers() -> impl Strategy<Value = Vec<(Vec<u8>, Vec<u8>)>> {
    let name = prop_oneof![
        prop::sample::select(vec![
            ":path",
            ":scheme",
            ":authority",
            "authorization",
            "x-request-id",
            "x-mcpguard-route",
        ])
        .prop_map(|n| n.as_bytes().to_vec()),
        any::<Vec<u8>>(),
    ];
    prop::collection::vec((name, header_value()), 0..8)
}

fn signed() -> &'static (Keys, String) {
    static SIGNED: std::sync::OnceLock<(Keys, String)> = std::sync::OnceLock::new();
    SIGNED.get_or_init(|| {
        let (key, jwks) = jwt::testing::key(1, "k1");
        let token = jwt::testing::sign(&key, "k1", &jwt::testing::claims());
        (Keys::from_value(&jwks).unwrap(), token)
    })
}

fn configs() -> [FilterConfig; 3] {
    [
        FilterConfig::parse(br#"{"policy_cluster":"p"}"#).unwrap(),
        FilterConfig::parse(br#"{"policy_cluster":"p","issuer":"http://as"}"#).unwrap(),
        FilterConfig::parse(
            br#"{"policy_cluster":"p","issuer":"http://as","sidecar":{"server":"demo"}}"#,
        )
        .unwrap(),
    ]
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn any_header_bytes_are_decided_without_a_panic(
        raw in headers(),
        method in prop::option::of("\\PC{0,200}"),
        tool in prop::option::of("\\PC{0,200}"),
        with_keys in any::<bool>(),
        exceeding in any::<bool>(),
        now in prop_oneof![Just(1_500i64), any::<i64>()],
    ) {
        // As the glue reads them from Envoy: bytes, which need not be UTF-8.
        let headers = RawHeaders::from_pairs(&raw);
        let req = Incoming::from_headers(&headers, method.as_deref(), tool.as_deref(), tool.as_deref(), exceeding);
        let keys = with_keys.then(|| &signed().0);
        for config in &configs() {
            if let Start::Check(check) = decide::start(&req, config, Clock { keys, now }) {
                // A gateway-less check only for a sidecar's own app path.
                prop_assert!(check.gateway.as_deref().map_or(config.sidecar.is_some(), is_valid_slug));
                prop_assert!(is_valid_slug(&check.server));
                match &check.credential {
                    Credential::ApiToken { hash } => prop_assert!(
                        hash.len() == 64 && hash.bytes().all(|b| b.is_ascii_hexdigit())
                    ),
                    Credential::Oauth { .. } => prop_assert!(config.issuer.is_some()),
                }
                let bound = |s: &Option<String>| s.as_ref().is_none_or(|s| s.chars().count() <= MAX_NAME);
                prop_assert!(bound(&check.mcp_method) && bound(&check.tool));
            }
        }
    }

    #[test]
    fn only_a_well_formed_allow_forwards(
        status in prop::option::of(prop_oneof![Just(200u16), any::<u16>()]),
        body in prop::option::of(prop_oneof![
            any::<Vec<u8>>(),
            "\\{\"decision\":\"(allow|deny)\",\"upstream\":\\{\"scheme\":\"https?\",\"authority\":\"[a-z:0-9]{0,10}\",\"base_path\":\"(/[a-z]{0,4}){0,2}\"(,\"address\":\"(127\\.0\\.0\\.1:[0-9]{1,4}|[a-z:0-9]{0,10})\")?\\}\\}"
                .prop_map(String::into_bytes),
        ]),
        path in prop_oneof![
            "/mcp/[a-z]{1,4}/[a-z]{1,4}(/[a-z]{0,4})?".prop_map(String::from),
            "\\PC{0,30}".prop_map(String::from),
        ],
    ) {
        let finish = decide::finish(status, body.as_deref(), &path, None, None);
        if let Finish::Forward(f) = finish {
            prop_assert_eq!(status, Some(200));
            let answer = serde_json::from_slice::<CheckResponse>(body.as_deref().unwrap_or_default());
            let Ok(CheckResponse::Allow { upstream, .. }) = answer else {
                return Err(TestCaseError::fail("forwarded without an allow"));
            };
            prop_assert!(f.path.starts_with(upstream.base_path.trim_end_matches('/')));
            let Some((authority, address)) = f.upstream else {
                return Err(TestCaseError::fail("gateway mode forwarded with no upstream"));
            };
            prop_assert_eq!(authority, upstream.authority);
            // Only to an address the policy service judged, and a well-formed one.
            prop_assert!(address.parse::<std::net::SocketAddr>().is_ok());
            prop_assert_eq!(Some(address), upstream.address);
        }
    }

    #[test]
    fn a_sidecar_forwards_only_to_its_own_app_whatever_the_answer(
        status in prop::option::of(prop_oneof![Just(200u16), any::<u16>()]),
        body in prop::option::of(prop_oneof![
            any::<Vec<u8>>(),
            "\\{\"decision\":\"(allow|deny)\",\"upstream\":\\{\"scheme\":\"https?\",\"authority\":\"[a-z:0-9]{0,10}\",\"base_path\":\"(/[a-z]{0,4}){0,2}\"(,\"address\":\"[a-z:0-9.]{0,14}\")?\\}\\}"
                .prop_map(String::into_bytes),
        ]),
        path in "/mcp/[a-z]{1,4}/[a-z]{1,4}(/[a-z]{0,4})?(\\?[a-z=]{0,6})?",
    ) {
        let config = FilterConfig::parse(
            br#"{"policy_cluster":"p","sidecar":{"server":"demo","app_path":"/app"}}"#,
        )
        .unwrap();
        let finish = decide::finish(status, body.as_deref(), &path, config.sidecar.as_ref(), None);
        if let Finish::Forward(f) = finish {
            prop_assert_eq!(status, Some(200));
            prop_assert!(f.upstream.is_none(), "the answer never routes a sidecar's request");
            prop_assert_eq!(f.route, decide::SIDECAR_ROUTE);
            prop_assert!(f.path.starts_with("/app"), "{}", f.path);
        }
    }
}
