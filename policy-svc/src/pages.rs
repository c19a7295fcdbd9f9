//! The HTML page kit shared by the pages people open in a browser (the OAuth sign-in
//! and consent pages, the enrollment page): one layout with its security headers,
//! escaping, cookies, and [`PageError`], the error path of their handlers.

use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::error::ApiError;
use crate::signin::{Busy, SignIn};

/// What a page handler answers when it does not go on: an error page with its status
/// (and `Retry-After` where it says "not now"), or the JSON error some page paths have
/// always answered with (a store failure). Page handlers return
/// `Result<Response, PageError>` and use `?`, as the JSON handlers do with [`ApiError`].
/// (Boxed: a `Response` is large, and this travels in every page handler's `Result`.)
#[derive(Debug)]
pub struct PageError(Box<Response>);

impl PageError {
    /// The page with `title` and `body` (HTML: escape what it quotes) at `status`.
    pub fn page(status: StatusCode, title: &str, body: String) -> Self {
        PageError(Box::new(html(status, title, body)))
    }

    /// A page rendered already (a form again, with what went wrong).
    pub fn shown(page: Response) -> Self {
        PageError(Box::new(page))
    }

    /// Too many password hashes at once ([`Busy`]): 503, retry in a second.
    pub fn busy() -> Self {
        PageError::shown(refused_for_now(
            html(
                StatusCode::SERVICE_UNAVAILABLE,
                "Try again",
                format!("<p>{}</p>", escape(SignIn::BUSY_MESSAGE)),
            ),
            StatusCode::SERVICE_UNAVAILABLE,
            Busy::RETRY_AFTER_SECS,
        ))
    }
}

impl From<ApiError> for PageError {
    fn from(e: ApiError) -> Self {
        PageError::shown(e.into_response())
    }
}

impl IntoResponse for PageError {
    fn into_response(self) -> Response {
        *self.0
    }
}

pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A page: `title` and `body` (HTML) in the one layout, never cached, framed, scripted
/// or followed by a referrer.
pub fn html(status: StatusCode, title: &str, body: String) -> Response {
    let page = format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>{t} · mcpguard</title>\
         <style>body{{font-family:sans-serif;max-width:32em;margin:3em auto}}label,input,button{{display:block;margin:.4em 0}}</style>\
         </head><body><h1>{t}</h1>{body}</body></html>",
        t = escape(title)
    );
    let mut response = (status, page).into_response();
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    // No framing (clickjacking on the consent page), no scripts, no referrer leaks.
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'",
        ),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    no_store(response)
}

/// Responses that carry or lead to credentials are never cached (RFC 6749 §5.1): the
/// pages, and the OAuth endpoints' JSON.
pub fn no_store(mut response: Response) -> Response {
    let h = response.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    response
}

/// A page that says "not now": `status`, and when to come back.
pub fn refused_for_now(mut page: Response, status: StatusCode, retry_after: u64) -> Response {
    *page.status_mut() = status;
    if let Ok(v) = HeaderValue::from_str(&retry_after.to_string()) {
        page.headers_mut().insert(header::RETRY_AFTER, v);
    }
    page
}

/// The value of the cookie `name` the browser sent.
pub fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_owned())
}

/// `; Secure` for cookies when this service is served over https.
pub fn secure_attr(issuer: &str) -> &'static str {
    if issuer.starts_with("https://") {
        "; Secure"
    } else {
        ""
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_escape_what_clients_and_users_send() {
        assert_eq!(
            escape("<a href=\"x\">'&'</a>"),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;"
        );
    }
}
