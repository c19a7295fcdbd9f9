//! Plugin configuration, parsed once in the root context.

use serde::Deserialize;

/// Given to Envoy as a JSON `google.protobuf.StringValue` in the wasm filter's
/// `configuration`. Unknown fields are refused so a typo fails at load, not at 3 a.m.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilterConfig {
    /// Envoy cluster that reaches the policy service's check port.
    pub policy_cluster: String,
    /// `:authority` sent on check callouts.
    #[serde(default = "default_policy_authority")]
    pub policy_authority: String,
    /// Deadline for one check callout; past it the request is refused with 503.
    #[serde(default = "default_check_timeout_ms")]
    pub check_timeout_ms: u64,
    /// Public base URL of this gateway (`https://mcp.example.com`), used for the
    /// `resource_metadata` URL in 401s. When unset it is taken from the request's
    /// `:scheme` and `:authority`.
    #[serde(default)]
    pub public_base_url: Option<String>,
}

fn default_policy_authority() -> String {
    "mcpguard-policy".to_owned()
}

const fn default_check_timeout_ms() -> u64 {
    300
}

/// Upper bound on the check deadline: a longer one would hold client requests hostage
/// to a sick policy service.
pub const MAX_CHECK_TIMEOUT_MS: u64 = 10_000;

impl FilterConfig {
    pub fn parse(bytes: &[u8]) -> Result<Self, String> {
        let config: FilterConfig = serde_json::from_slice(bytes)
            .map_err(|e| format!("invalid mcpguard filter configuration: {e}"))?;
        if config.policy_cluster.is_empty() {
            return Err("policy_cluster must name the Envoy cluster of the policy service".into());
        }
        if !(1..=MAX_CHECK_TIMEOUT_MS).contains(&config.check_timeout_ms) {
            return Err(format!(
                "check_timeout_ms must be between 1 and {MAX_CHECK_TIMEOUT_MS}"
            ));
        }
        if let Some(url) = &config.public_base_url {
            let ok = (url.starts_with("http://") || url.starts_with("https://"))
                && !url.ends_with('/')
                && !url.contains(char::is_whitespace);
            if !ok {
                return Err(format!(
                    "public_base_url must be an http(s) URL without a trailing slash, got {url:?}"
                ));
            }
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minimal_config_gets_defaults() {
        let c = FilterConfig::parse(br#"{"policy_cluster":"mcpguard_policy"}"#).unwrap();
        assert_eq!(c.policy_cluster, "mcpguard_policy");
        assert_eq!(c.policy_authority, "mcpguard-policy");
        assert_eq!(c.check_timeout_ms, 300);
        assert_eq!(c.public_base_url, None);
    }

    #[test]
    fn bad_configs_are_refused_with_a_reason() {
        for (bad, why) in [
            (&b""[..], "invalid"),
            (br#"{}"#, "policy_cluster"),
            (br#"{"policy_cluster":""}"#, "policy_cluster"),
            (br#"{"policy_cluster":"p","typo":1}"#, "unknown field"),
            (
                br#"{"policy_cluster":"p","check_timeout_ms":0}"#,
                "check_timeout_ms",
            ),
            (
                br#"{"policy_cluster":"p","check_timeout_ms":60000}"#,
                "check_timeout_ms",
            ),
            (
                br#"{"policy_cluster":"p","public_base_url":"example.com"}"#,
                "public_base_url",
            ),
            (
                br#"{"policy_cluster":"p","public_base_url":"https://x/"}"#,
                "public_base_url",
            ),
        ] {
            let err = FilterConfig::parse(bad).unwrap_err();
            assert!(err.contains(why), "{err} should mention {why}");
        }
    }
}
