//! A small client for the admin API, with helpers that assert success for setup steps.

use reqwest::Method;
use serde_json::{Value, json};

#[derive(Clone)]
pub struct Admin {
    pub base: String,
    token: String,
    http: reqwest::Client,
}

/// What `Admin::provision` made: a gateway exposing a server, and a token-based host
/// with one token on that gateway.
#[derive(Debug, Clone)]
pub struct Provisioned {
    pub gateway_id: i64,
    pub server_id: i64,
    pub host_id: i64,
    pub token_id: i64,
    pub connection_id: i64,
    pub token: String,
}

impl Admin {
    pub fn new(base: String, token: &str) -> Admin {
        Admin {
            base,
            token: token.to_owned(),
            http: crate::http(),
        }
    }

    /// The same API as another caller.
    pub fn with_token(&self, token: &str) -> Admin {
        Admin {
            token: token.to_owned(),
            ..self.clone()
        }
    }

    /// Any call; returns the status and the JSON body (`Null` when empty).
    pub async fn call(&self, method: Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.token);
        if let Some(body) = body {
            req = req.json(&body);
        }
        let resp = req.send().await.expect("admin API reachable");
        let status = resp.status().as_u16();
        let text = resp.text().await.expect("admin API body");
        let body = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).expect("admin API answers JSON")
        };
        (status, body)
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        self.call(Method::GET, path, None).await
    }

    pub async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.call(Method::POST, path, Some(body)).await
    }

    async fn created(&self, path: &str, body: Value) -> Value {
        let (status, v) = self.post(path, body).await;
        assert_eq!(status, 201, "POST {path}: {v}");
        v
    }

    pub async fn gateway(&self, slug: &str) -> i64 {
        self.created(
            "/api/v1/gateways",
            json!({"name": format!("Gateway {slug}"), "slug": slug}),
        )
        .await["id"]
            .as_i64()
            .unwrap()
    }

    pub async fn server(&self, slug: &str, upstream_url: &str) -> i64 {
        let body =
            json!({"name": format!("Server {slug}"), "slug": slug, "upstream_url": upstream_url});
        self.created("/api/v1/servers", body).await["id"]
            .as_i64()
            .unwrap()
    }

    pub async fn expose(&self, gateway_id: i64, server_id: i64) {
        self.expose_as(gateway_id, server_id, json!({"identity": "shared"}))
            .await;
    }

    /// Exposes a server on a gateway, or replaces the exposure, with this body
    /// (`{"identity": …, "credential"?: …}`); returns the 200 body.
    pub async fn expose_as(&self, gateway_id: i64, server_id: i64, body: Value) -> Value {
        let path = format!("/api/v1/gateways/{gateway_id}/servers/{server_id}");
        let (status, v) = self.call(Method::PUT, &path, Some(body)).await;
        assert_eq!(status, 200, "PUT {path}: {v}");
        v
    }

    /// End users: users holding a role (`member`, created here) with no capabilities.
    pub async fn end_users(&self, names: &[&str]) -> Vec<i64> {
        let role = self
            .created(
                "/api/v1/roles",
                json!({"name": "member", "capabilities": []}),
            )
            .await;
        let mut ids = Vec::new();
        for name in names {
            let user = self
                .created(
                    "/api/v1/users",
                    json!({"name": name, "role_id": role["id"]}),
                )
                .await;
            ids.push(user["id"].as_i64().unwrap());
        }
        ids
    }

    /// A token of the host on the gateway for one of the agent's end users, made with
    /// the user's consent as mcpguard requires: the user (given the tests' password)
    /// signs in on an enrollment's page, then the agent claims the per-user token. The
    /// user must already hold an identity for every per-user server of the gateway.
    pub async fn user_token(&self, host_id: i64, gateway_id: i64, user_id: i64) -> String {
        let (status, users) = self.get("/api/v1/users").await;
        assert_eq!(status, 200, "{users}");
        let name = users
            .as_array()
            .and_then(|all| all.iter().find(|u| u["id"] == user_id))
            .and_then(|u| u["name"].as_str())
            .expect("the user exists")
            .to_owned();
        let (status, v) = self
            .call(
                Method::PUT,
                &format!("/api/v1/users/{user_id}/password"),
                Some(json!({"password": crate::oauth::PASSWORD})),
            )
            .await;
        assert_eq!(status, 204, "{v}");
        let enrollment = self
            .created(
                &format!("/api/v1/hosts/{host_id}/enrollments"),
                json!({"gateway_id": gateway_id, "user_id": user_id}),
            )
            .await;
        let url = enrollment["url"].as_str().unwrap();
        let mut browser = crate::oauth::Browser::default();
        let page = browser.get(url).await;
        assert_eq!(page.status, 200, "{}", page.body);
        let mut form = std::collections::HashMap::new();
        form.insert(
            "csrf".to_owned(),
            crate::oauth::form_inputs(&page.body)["csrf"].clone(),
        );
        form.insert("username".to_owned(), name);
        form.insert("password".to_owned(), crate::oauth::PASSWORD.to_owned());
        let done = browser.post(url, &form).await;
        assert_eq!(done.status, 200, "enrolling user {user_id}: {}", done.body);
        let t = self
            .created(
                &format!("/api/v1/enrollments/{}/token", enrollment["id"]),
                json!({}),
            )
            .await;
        t["token"].as_str().unwrap().to_owned()
    }

    pub async fn host(&self, name: &str) -> i64 {
        self.created("/api/v1/hosts", json!({"name": name})).await["id"]
            .as_i64()
            .unwrap()
    }

    /// Generates a token; returns the whole 201 body (which holds `token`).
    pub async fn token(&self, host_id: i64, gateway_id: i64) -> Value {
        self.created(
            &format!("/api/v1/hosts/{host_id}/tokens"),
            json!({"gateway_id": gateway_id}),
        )
        .await
    }

    pub async fn revoke(&self, token_id: i64) {
        let (status, v) = self
            .call(Method::DELETE, &format!("/api/v1/tokens/{token_id}"), None)
            .await;
        assert_eq!(status, 204, "revoking token {token_id}: {v}");
    }

    /// The first audited allow decision `matches` accepts, polled for up to 10 s (the
    /// audit writer batches).
    pub async fn allowed_decision(&self, matches: impl Fn(&Value) -> bool) -> Value {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let (status, page) = self.get("/api/v1/audit?kind=decision&decision=allow").await;
            assert_eq!(status, 200, "{page}");
            let found = page["entries"]
                .as_array()
                .and_then(|entries| entries.iter().find(|e| matches(e)).cloned());
            if let Some(entry) = found {
                return entry;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no such audited decision: {page}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    /// Break-glass toggle; asserts the call succeeded and returned the new state.
    pub async fn set_enabled(&self, kind: &str, id: i64, enabled: bool) {
        let verb = if enabled { "enable" } else { "disable" };
        let (status, v) = self
            .post(&format!("/api/v1/{kind}/{id}/{verb}"), json!({}))
            .await;
        assert_eq!(status, 200, "{verb} {kind} {id}: {v}");
        assert_eq!(v["enabled"], enabled, "{v}");
    }

    /// Switches `p`'s exposure to per-user and gives the token's user (the caller) an
    /// identity for the server; returns the identity's id.
    pub async fn make_per_user(&self, p: &Provisioned, downstream_token: &str) -> i64 {
        self.expose_as(p.gateway_id, p.server_id, json!({"identity": "per_user"}))
            .await;
        let path = format!("/api/v1/users/1/identities/{}", p.server_id);
        let body = json!({"credential": {"type": "bearer", "token": downstream_token}});
        let (status, v) = self.call(Method::PUT, &path, Some(body)).await;
        assert_eq!(status, 200, "{v}");
        v["id"].as_i64().unwrap()
    }

    /// A user who can sign in on the OAuth pages and connect apps there
    /// (`oauth.connect`, no admin capability); returns the id.
    pub async fn person(&self, name: &str, password: &str) -> i64 {
        self.person_with(name, password, &["oauth.connect"]).await
    }

    /// A user with a role of their own holding `capabilities`, and a password to sign
    /// in with (the OAuth pages, the console); returns the id.
    pub async fn person_with(&self, name: &str, password: &str, capabilities: &[&str]) -> i64 {
        let (status, role) = self
            .post(
                "/api/v1/roles",
                json!({"name": format!("{name}-role"), "capabilities": capabilities}),
            )
            .await;
        assert_eq!(status, 201, "{role}");
        let id = self
            .created(
                "/api/v1/users",
                json!({"name": name, "role_id": role["id"]}),
            )
            .await["id"]
            .as_i64()
            .unwrap();
        let (status, v) = self
            .call(
                Method::PUT,
                &format!("/api/v1/users/{id}/password"),
                Some(json!({"password": password})),
            )
            .await;
        assert_eq!(status, 204, "{v}");
        id
    }

    /// A gateway `gateway` exposing a new server `server` at `upstream_url`, and a host
    /// with one token on that gateway.
    pub async fn provision(&self, gateway: &str, server: &str, upstream_url: &str) -> Provisioned {
        let gateway_id = self.gateway(gateway).await;
        let server_id = self.server(server, upstream_url).await;
        self.expose(gateway_id, server_id).await;
        let host_id = self.host(&format!("Agent for {gateway}")).await;
        let t = self.token(host_id, gateway_id).await;
        Provisioned {
            gateway_id,
            server_id,
            host_id,
            token_id: t["id"].as_i64().unwrap(),
            connection_id: t["connection_id"].as_i64().unwrap(),
            token: t["token"].as_str().unwrap().to_owned(),
        }
    }
}
