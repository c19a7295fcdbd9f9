//! Headed hosts: a person in a browser (sign-in and consent forms, posted with their
//! CSRF tokens), and a raw OAuth client for the negative cases the SDK never makes.

use std::collections::HashMap;

use reqwest::redirect::Policy;
use rmcp::ServiceExt;
use rmcp::model::ClientConfig;
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::transport::auth::{
    AuthClient, AuthorizationManager, AuthorizationRequest, AuthorizationSession,
};
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use serde_json::{Value, json};

/// The password the tests give the people they create (`Admin::person`).
pub const PASSWORD: &str = "correct horse battery staple";

/// The pages' hidden and named inputs, by name (the pages are ours and simple).
pub fn form_inputs(html: &str) -> HashMap<String, String> {
    let mut out = HashMap::new();
    for tag in html.split("<input").skip(1) {
        let tag = &tag[..tag.find('>').unwrap_or(tag.len())];
        let attr = |name: &str| {
            let start = tag.find(&format!("{name}=\""))? + name.len() + 2;
            let end = tag[start..].find('"')? + start;
            Some(unescape(&tag[start..end]))
        };
        if let (Some(name), Some(value)) = (attr("name"), attr("value")) {
            out.insert(name, value);
        }
    }
    out
}

fn unescape(s: &str) -> String {
    s.replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&amp;", "&")
}

/// `name=value` of a `Set-Cookie` header named `name`.
fn set_cookie(resp: &reqwest::Response, name: &str) -> Option<String> {
    resp.headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(|v| v.split(';').next().unwrap_or_default().to_owned())
        .find(|c| c.starts_with(&format!("{name}=")))
}

/// A browser: no redirects followed (the test reads each `Location`), cookies kept by
/// hand.
pub struct Browser {
    http: reqwest::Client,
    cookies: Vec<String>,
    /// Sent with every request (e.g. `x-forwarded-for`, as a proxy would).
    headers: Vec<(String, String)>,
}

/// What the browser saw at one step.
pub struct Page {
    pub status: u16,
    pub location: Option<String>,
    /// `Retry-After` in seconds, on refusals that say when to come back.
    pub retry_after: Option<u64>,
    pub body: String,
}

impl Default for Browser {
    fn default() -> Self {
        Browser {
            http: crate::http_client()
                .redirect(Policy::none())
                .build()
                .unwrap(),
            cookies: Vec::new(),
            headers: Vec::new(),
        }
    }
}

impl Browser {
    /// A browser whose connections come from `local` (a loopback address such as
    /// 127.0.0.2): another client, as far as the policy service's peer address goes.
    pub fn from_address(local: std::net::IpAddr) -> Browser {
        Browser {
            http: crate::http_client()
                .redirect(Policy::none())
                .local_address(local)
                .build()
                .unwrap(),
            cookies: Vec::new(),
            headers: Vec::new(),
        }
    }

    /// Sends `name: value` with every request from now on.
    pub fn with_header(mut self, name: &str, value: &str) -> Browser {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    fn request(&self, method: reqwest::Method, url: &str) -> reqwest::RequestBuilder {
        let mut req = self
            .http
            .request(method, url)
            .header("cookie", self.cookies.join("; "));
        for (name, value) in &self.headers {
            req = req.header(name, value);
        }
        req
    }

    async fn page(&mut self, resp: reqwest::Response) -> Page {
        for name in [
            "mcpguard_login_csrf",
            "mcpguard_session",
            "mcpguard_enroll_csrf",
            "mcpguard_connect",
            "mcpguard_console_login",
            "mcpguard_console",
        ] {
            if let Some(c) = set_cookie(&resp, name) {
                self.cookies
                    .retain(|old| !old.starts_with(&format!("{name}=")));
                self.cookies.push(c);
            }
        }
        Page {
            status: resp.status().as_u16(),
            location: resp
                .headers()
                .get("location")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
            retry_after: resp
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok()),
            body: resp.text().await.unwrap_or_default(),
        }
    }

    pub async fn get(&mut self, url: &str) -> Page {
        let resp = self
            .request(reqwest::Method::GET, url)
            .send()
            .await
            .expect("policy service reachable");
        self.page(resp).await
    }

    pub async fn post(&mut self, url: &str, form: &HashMap<String, String>) -> Page {
        let resp = self
            .request(reqwest::Method::POST, url)
            .form(form)
            .send()
            .await
            .expect("policy service reachable");
        self.page(resp).await
    }

    /// Signs in to the console at `base` (the policy service's public URL) as `user`.
    pub async fn console_sign_in(&mut self, base: &str, user: &str, password: &str) {
        let login = self.get(&format!("{base}/console/login")).await;
        assert_eq!(login.status, 200, "console sign-in page: {}", login.body);
        let mut form = form_inputs(&login.body);
        form.insert("username".into(), user.into());
        form.insert("password".into(), password.into());
        let signed_in = self.post(&format!("{base}/console/login"), &form).await;
        assert_eq!(signed_in.status, 303, "console sign-in: {}", signed_in.body);
    }

    /// Drops the cookies: a visitor from another site, as far as CSRF goes.
    pub fn forget_cookies(&mut self) {
        self.cookies.clear();
    }

    /// From the authorization URL to the client's redirect URI: sign in, allow.
    /// `identities` fills the consent page's per-server fields. Returns the final
    /// `Location` (the client's redirect URI with `code`, `state` and `iss`).
    pub async fn authorize(
        &mut self,
        issuer: &str,
        auth_url: &str,
        user: &str,
        password: &str,
        identities: &[(&str, &str)],
    ) -> String {
        let login = self.get(auth_url).await;
        assert_eq!(login.status, 200, "sign-in page: {}", login.body);
        let mut form = form_inputs(&login.body);
        assert!(
            form.contains_key("csrf"),
            "the sign-in form carries a CSRF token"
        );
        form.insert("username".into(), user.into());
        form.insert("password".into(), password.into());
        let signed_in = self.post(&format!("{issuer}/oauth/login"), &form).await;
        assert_eq!(signed_in.status, 303, "sign-in: {}", signed_in.body);
        let consent_url = format!("{issuer}{}", signed_in.location.unwrap());
        let consent = self.get(&consent_url).await;
        assert_eq!(consent.status, 200, "consent page: {}", consent.body);
        let mut form = form_inputs(&consent.body);
        for (name, value) in identities {
            form.insert((*name).into(), (*value).into());
        }
        form.insert("decision".into(), "allow".into());
        let allowed = self.post(&format!("{issuer}/oauth/consent"), &form).await;
        assert_eq!(allowed.status, 303, "consent: {}", allowed.body);
        allowed.location.unwrap()
    }
}

/// A query parameter of a URL.
pub fn query_param(url: &str, name: &str) -> Option<String> {
    reqwest::Url::parse(url)
        .ok()?
        .query_pairs()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

/// A hand-driven public OAuth client: registration, authorization URL with PKCE, token
/// requests. For the negative cases; the SDK is the client of the happy path.
pub struct RawClient {
    pub issuer: String,
    pub client_id: String,
    pub redirect_uri: String,
    http: reqwest::Client,
}

/// A PKCE pair: (verifier, S256 challenge).
pub fn pkce(seed: &str) -> (String, String) {
    let verifier = format!("{seed}-{}", "v".repeat(50));
    let challenge = mcpguard_core::oauth::s256_challenge(&verifier);
    (verifier, challenge)
}

impl RawClient {
    pub async fn register(issuer: &str, name: &str) -> RawClient {
        let http = crate::http();
        let redirect_uri = "http://127.0.0.1:1/callback".to_owned();
        let resp = http
            .post(format!("{issuer}/oauth/register"))
            .json(
                &json!({"client_name": name, "redirect_uris": [redirect_uri],
                "token_endpoint_auth_method": "none"}),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 201);
        let body: Value = resp.json().await.unwrap();
        RawClient {
            issuer: issuer.to_owned(),
            client_id: body["client_id"].as_str().unwrap().to_owned(),
            redirect_uri,
            http,
        }
    }

    pub fn authorization_url(&self, resource: &str, challenge: &str, state: &str) -> String {
        let mut url = reqwest::Url::parse(&format!("{}/oauth/authorize", self.issuer)).unwrap();
        url.query_pairs_mut()
            .append_pair("response_type", "code")
            .append_pair("client_id", &self.client_id)
            .append_pair("redirect_uri", &self.redirect_uri)
            .append_pair("code_challenge", challenge)
            .append_pair("code_challenge_method", "S256")
            .append_pair("state", state)
            .append_pair("resource", resource);
        url.to_string()
    }

    /// POSTs to the token endpoint: (status, JSON body).
    pub async fn token(&self, params: &[(&str, &str)]) -> (u16, Value) {
        let mut form: Vec<(&str, &str)> = vec![("client_id", &self.client_id)];
        form.extend_from_slice(params);
        let resp = self
            .http
            .post(format!("{}/oauth/token", self.issuer))
            .form(&form)
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        assert_eq!(
            resp.headers()
                .get("cache-control")
                .and_then(|v| v.to_str().ok()),
            Some("no-store")
        );
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    pub async fn exchange(&self, code: &str, verifier: &str) -> (u16, Value) {
        self.token(&[
            ("grant_type", "authorization_code"),
            ("code", code),
            ("redirect_uri", &self.redirect_uri.clone()),
            ("code_verifier", verifier),
        ])
        .await
    }

    pub async fn refresh(&self, refresh_token: &str) -> (u16, Value) {
        self.token(&[
            ("grant_type", "refresh_token"),
            ("refresh_token", refresh_token),
        ])
        .await
    }

    pub async fn revoke(&self, token: &str) -> u16 {
        self.http
            .post(format!("{}/oauth/revoke", self.issuer))
            .form(&[("client_id", self.client_id.as_str()), ("token", token)])
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    }

    /// The whole flow for `user`: sign-in, consent, code; returns the token response.
    pub async fn sign_in(&self, resource: &str, user: &str, password: &str) -> Value {
        let (verifier, challenge) = pkce("ok");
        let url = self.authorization_url(resource, &challenge, "st");
        let back = Browser::default()
            .authorize(&self.issuer, &url, user, password, &[])
            .await;
        let code = query_param(&back, "code").expect("a code");
        let (status, tokens) = self.exchange(&code, &verifier).await;
        assert_eq!(status, 200, "{tokens}");
        tokens
    }
}

/// A headed app on the official Rust SDK (rmcp, feature `auth`), as the MCP
/// authorization spec has it: discovery from the gateway's 401 `challenge` (the
/// protected-resource metadata at the gateway, then the issuer's metadata),
/// registration, the user (`alice`, playing the browser) signing in and allowing, the
/// code exchanged with PKCE, then an MCP session at `url`. Returns the SDK's HTTP
/// client (it holds the tokens) and the session.
pub async fn sdk_connect(
    url: &str,
    challenge: &str,
    issuer: &str,
    client_name: &str,
) -> (AuthClient<reqwest::Client>, crate::mcp::Client) {
    let mut manager = AuthorizationManager::new(url).await.unwrap();
    let resolved = manager
        .resolve_metadata_from_challenge(Some(challenge))
        .await
        .unwrap();
    manager.set_metadata(resolved.metadata);
    let redirect_uri = "http://127.0.0.1:1/callback";
    let session = AuthorizationSession::new(
        manager,
        AuthorizationRequest::new(redirect_uri).with_client_name(client_name),
    )
    .await
    .map_err(|(_, e)| e)
    .unwrap();
    let back = Browser::default()
        .authorize(
            issuer,
            session.get_authorization_url(),
            "alice",
            PASSWORD,
            &[],
        )
        .await;
    assert!(back.starts_with(redirect_uri), "{back}");
    assert_eq!(query_param(&back, "iss").as_deref(), Some(issuer));
    session.handle_callback_url(&back).await.unwrap();
    let auth = AuthClient::new(reqwest::Client::default(), session.auth_manager);
    let transport = StreamableHttpClientTransport::with_client(
        auth.clone(),
        StreamableHttpClientTransportConfig::with_uri(url),
    );
    let client = ClientConfig::default().serve(transport).await.unwrap();
    (auth, client)
}
