//! Which network addresses an upstream MCP server may have. A server registered at an
//! address inside the deployment (Envoy's admin, this service's own ports, a cloud
//! metadata service) would hand whoever holds a token on its gateway a way in, so:
//!
//! - this service's listeners and Envoy's admin address are never an upstream, on any
//!   address that reaches them (a listener on `0.0.0.0` or `[::]` is reached on every
//!   local address; one on loopback, on every loopback address);
//! - addresses that are never a real upstream are always denied ([`BUILT_IN_DENY`]:
//!   "this host", link-local and the cloud metadata services, multicast, reserved);
//! - operators add networks to deny (`--upstream-deny-networks`) and may list the only
//!   networks allowed (`--upstream-allow-networks`). Deny wins over allow.
//!
//! [`UpstreamPolicy::permits`] judges one socket address and does no I/O but, for a
//! listener bound to an unspecified address, asking the OS whether an address with that
//! port is local (a bind test). Registration resolves a name and judges every address
//! ([`UpstreamPolicy::resolve`]); the data-plane check can do the same per request and
//! connect only to the addresses it judged, so a name that later resolves inside
//! (DNS rebinding) is refused there too.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;
use std::time::Duration;

/// An IPv4 or IPv6 network in CIDR notation (`10.0.0.0/8`, `fd00::/8`); a bare address
/// is a network of that one address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Network {
    addr: IpAddr,
    prefix: u8,
}

impl Network {
    const fn v4(a: [u8; 4], prefix: u8) -> Network {
        Network {
            addr: IpAddr::V4(Ipv4Addr::new(a[0], a[1], a[2], a[3])),
            prefix,
        }
    }

    const fn v6(segments: [u16; 8], prefix: u8) -> Network {
        let [a, b, c, d, e, f, g, h] = segments;
        Network {
            addr: IpAddr::V6(Ipv6Addr::new(a, b, c, d, e, f, g, h)),
            prefix,
        }
    }

    /// Whether `ip` is in this network; an IPv4 network holds only IPv4 addresses
    /// (IPv4-mapped IPv6 addresses are made IPv4 before they are judged).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl FromStr for Network {
    type Err = String;

    fn from_str(s: &str) -> Result<Network, String> {
        let s = s.trim();
        let (addr, prefix) = match s.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("{s:?} is not a network: write it as 10.0.0.0/8 or fd00::/8"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{s:?}: the prefix length must be 0 to {max}"))?,
        };
        let network = Network { addr, prefix };
        // Host bits set (10.1.2.3/8) are most likely a typo for another network.
        if !network.contains(addr) || network.base() != addr {
            return Err(format!(
                "{s:?} has host bits set: did you mean {}/{prefix}?",
                network.base()
            ));
        }
        Ok(network)
    }
}

impl Network {
    /// The network's first address (host bits cleared).
    fn base(&self) -> IpAddr {
        match self.addr {
            IpAddr::V4(a) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask))
            }
            IpAddr::V6(a) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask))
            }
        }
    }
}

impl fmt::Display for Network {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// Networks that are never a real upstream, denied whatever the flags say.
pub const BUILT_IN_DENY: &[(Network, &str)] = &[
    (
        Network::v4([0, 0, 0, 0], 8),
        "\"this network\": 0.0.0.0 reaches this host",
    ),
    (
        Network::v6([0, 0, 0, 0, 0, 0, 0, 0], 128),
        "the unspecified address reaches this host",
    ),
    (
        Network::v4([169, 254, 0, 0], 16),
        "link-local, where cloud metadata services answer (169.254.169.254)",
    ),
    (Network::v6([0xfe80, 0, 0, 0, 0, 0, 0, 0], 10), "link-local"),
    (
        Network::v6([0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254], 128),
        "the AWS metadata service over IPv6",
    ),
    (
        Network::v4([100, 100, 100, 200], 32),
        "the Alibaba Cloud metadata service",
    ),
    (
        Network::v4([168, 63, 129, 16], 32),
        "the Azure platform endpoint (WireServer)",
    ),
    (Network::v4([224, 0, 0, 0], 4), "multicast"),
    (Network::v6([0xff00, 0, 0, 0, 0, 0, 0, 0], 8), "multicast"),
    (Network::v4([240, 0, 0, 0], 4), "reserved and broadcast"),
];

/// The well-known NAT64 prefix: `64:ff9b::a.b.c.d` reaches IPv4 `a.b.c.d` through a
/// NAT64 gateway, so it is judged as that IPv4 address too.
const NAT64: Network = Network::v6([0x64, 0xff9b, 0, 0, 0, 0, 0, 0], 96);

/// Why an address is refused: the rule, named for the operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rule {
    /// A listener of this deployment (`what` names it).
    Listener {
        what: &'static str,
        listen: SocketAddr,
    },
    BuiltIn {
        network: Network,
        why: &'static str,
    },
    /// In `--upstream-deny-networks`.
    DenyList(Network),
    /// `--upstream-allow-networks` is set and holds no network with this address.
    NotAllowed,
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rule::Listener { what, listen } => write!(f, "it reaches {what} ({listen})"),
            Rule::BuiltIn { network, why } => write!(f, "{network} is always denied ({why})"),
            Rule::DenyList(network) => write!(f, "{network} is in --upstream-deny-networks"),
            Rule::NotAllowed => f.write_str("it is in no network of --upstream-allow-networks"),
        }
    }
}

/// An address the policy refuses, and the rule that refuses it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{addr} is not allowed as an upstream: {rule}")]
pub struct Denied {
    pub addr: SocketAddr,
    pub rule: Rule,
}

/// Why [`UpstreamPolicy::resolve`] gives no addresses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error(transparent)]
    Denied(#[from] Denied),
    /// The name did not resolve (in time); no address was judged.
    #[error("{host} does not resolve: {why}")]
    Unresolvable { host: String, why: String },
}

/// A listener that upstreams must never reach.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listener {
    pub what: &'static str,
    pub listen: SocketAddr,
}

/// The address policy for upstreams (see the module's documentation).
#[derive(Debug, Clone)]
pub struct UpstreamPolicy {
    listeners: Vec<Listener>,
    deny: Vec<Network>,
    allow: Vec<Network>,
    /// Whether an address is one of this machine's (for listeners on `0.0.0.0`/`[::]`).
    is_local: fn(IpAddr) -> bool,
}

/// Longest a registration waits for a name to resolve.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(3);

impl UpstreamPolicy {
    pub fn new(listeners: Vec<Listener>, deny: Vec<Network>, allow: Vec<Network>) -> Self {
        UpstreamPolicy {
            listeners,
            deny,
            allow,
            is_local: is_local_address,
        }
    }

    /// Whether an upstream may be connected to at `addr`; `Err` names the rule that
    /// refuses it. Cheap: no I/O, except a bind test for an address whose port is that
    /// of a listener on an unspecified address.
    pub fn permits(&self, addr: SocketAddr) -> Result<(), Denied> {
        let ip = canonical(addr.ip());
        let denied = |rule| {
            Err(Denied {
                addr: SocketAddr::new(ip, addr.port()),
                rule,
            })
        };
        for l in &self.listeners {
            if l.listen.port() == addr.port() && self.reaches(canonical(l.listen.ip()), ip) {
                return denied(Rule::Listener {
                    what: l.what,
                    listen: l.listen,
                });
            }
        }
        // Judged as itself, and as the IPv4 address a NAT64 address stands for.
        let nat64 = match ip {
            IpAddr::V6(v6) if NAT64.contains(ip) => {
                let [.., a, b, c, d] = v6.octets();
                Some(IpAddr::V4(Ipv4Addr::new(a, b, c, d)))
            }
            _ => None,
        };
        let forms = || std::iter::once(ip).chain(nat64);
        for (network, why) in BUILT_IN_DENY {
            if forms().any(|ip| network.contains(ip)) {
                return denied(Rule::BuiltIn {
                    network: *network,
                    why,
                });
            }
        }
        if let Some(network) = self.deny.iter().find(|n| forms().any(|ip| n.contains(ip))) {
            return denied(Rule::DenyList(*network));
        }
        if !self.allow.is_empty() && !self.allow.iter().any(|n| n.contains(ip)) {
            return denied(Rule::NotAllowed);
        }
        Ok(())
    }

    /// Whether a connection to `target` reaches a listener bound to `bound` (same port).
    fn reaches(&self, bound: IpAddr, target: IpAddr) -> bool {
        if target.is_unspecified() {
            // Connecting to 0.0.0.0 or [::] connects to this host.
            return true;
        }
        if bound.is_unspecified() {
            return target.is_loopback() || (self.is_local)(target);
        }
        if bound.is_loopback() {
            // Over-broad on purpose: every loopback address, both families.
            return target.is_loopback();
        }
        bound == target
    }

    /// The addresses of an upstream's host (an address literal, bracketed or not, or a
    /// name, resolved now), each judged by [`UpstreamPolicy::permits`]: all of them are
    /// permitted, or the first that is not is the error. `localhost` and names under
    /// `.localhost` count as loopback (RFC 6761) whatever the resolver says.
    pub async fn resolve(&self, host: &str, port: u16) -> Result<Vec<SocketAddr>, Refused> {
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let mut addrs: Vec<SocketAddr> = match bare.parse::<IpAddr>() {
            Ok(ip) => vec![SocketAddr::new(ip, port)],
            Err(_) => {
                let unresolvable = |why: String| Refused::Unresolvable {
                    host: host.to_owned(),
                    why,
                };
                let name = bare.trim_end_matches('.').to_ascii_lowercase();
                let mut addrs = Vec::new();
                if name == "localhost" || name.ends_with(".localhost") {
                    addrs.push(SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port));
                    addrs.push(SocketAddr::new(Ipv6Addr::LOCALHOST.into(), port));
                }
                match tokio::time::timeout(RESOLVE_TIMEOUT, tokio::net::lookup_host((bare, port)))
                    .await
                {
                    Ok(Ok(found)) => addrs.extend(found),
                    Ok(Err(_)) | Err(_) if !addrs.is_empty() => {}
                    Ok(Err(e)) => return Err(unresolvable(e.to_string())),
                    Err(_) => {
                        return Err(unresolvable(format!("no answer in {RESOLVE_TIMEOUT:?}")));
                    }
                }
                if addrs.is_empty() {
                    return Err(unresolvable("no addresses".into()));
                }
                addrs
            }
        };
        addrs.dedup();
        for addr in &addrs {
            self.permits(*addr)?;
        }
        Ok(addrs)
    }
}

impl UpstreamPolicy {
    /// [`UpstreamPolicy::resolve`] for an authority as servers store it (`host:port`,
    /// `[v6]:port`); one without a port is refused as unresolvable.
    pub async fn resolve_authority(&self, authority: &str) -> Result<Vec<SocketAddr>, Refused> {
        match split_authority(authority) {
            Some((host, port)) => self.resolve(host, port).await,
            None => Err(Refused::Unresolvable {
                host: authority.to_owned(),
                why: "no port".into(),
            }),
        }
    }
}

/// `host:port` or `[v6]:port` split into the host (brackets kept) and the port.
pub fn split_authority(authority: &str) -> Option<(&str, u16)> {
    let (host, port) = authority.rsplit_once(':')?;
    Some((host, port.parse().ok()?))
}

impl Default for UpstreamPolicy {
    /// The built-in denials only: no listeners known, no operator lists.
    fn default() -> Self {
        UpstreamPolicy::new(Vec::new(), Vec::new(), Vec::new())
    }
}

/// IPv4-mapped IPv6 addresses (`::ffff:127.0.0.1`) are the IPv4 address they carry.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Whether `ip` is an address of this machine: binding a UDP socket to it succeeds only
/// then (or for an address it may not bind, which is refused too: the safe side).
fn is_local_address(ip: IpAddr) -> bool {
    std::net::UdpSocket::bind(SocketAddr::new(ip, 0)).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn net(s: &str) -> Network {
        s.parse().unwrap()
    }

    fn listeners(public: &str, check: &str, envoy: &str) -> Vec<Listener> {
        vec![
            Listener {
                what: "the policy service's public port",
                listen: addr(public),
            },
            Listener {
                what: "the policy service's check port",
                listen: addr(check),
            },
            Listener {
                what: "Envoy's admin",
                listen: addr(envoy),
            },
        ]
    }

    /// A policy whose "local addresses" are 10.0.0.5 and loopback, for the unspecified
    /// listener cases.
    fn with_local(policy: UpstreamPolicy) -> UpstreamPolicy {
        UpstreamPolicy {
            is_local: |ip| ip == IpAddr::from([10, 0, 0, 5]) || ip.is_loopback(),
            ..policy
        }
    }

    #[test]
    fn networks_parse_and_contain() {
        assert!(net("10.0.0.0/8").contains("10.255.1.2".parse().unwrap()));
        assert!(!net("10.0.0.0/8").contains("11.0.0.1".parse().unwrap()));
        assert!(net("0.0.0.0/0").contains("8.8.8.8".parse().unwrap()));
        assert!(!net("0.0.0.0/0").contains("::1".parse().unwrap()));
        assert!(net("::/0").contains("2001:db8::1".parse().unwrap()));
        assert!(net("fd00::/8").contains("fdab::1".parse().unwrap()));
        assert!(net("192.0.2.7").contains("192.0.2.7".parse().unwrap()));
        assert!(!net("192.0.2.7").contains("192.0.2.8".parse().unwrap()));
        assert_eq!(net(" 10.0.0.0/8 ").to_string(), "10.0.0.0/8");
        for bad in [
            "",
            "10.0.0.0/33",
            "::/129",
            "10.0.0.0/-1",
            "ten/8",
            "10.1.2.3/8",
            "10.0.0.0/",
            "a/b/c",
        ] {
            assert!(bad.parse::<Network>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn own_listeners_and_envoy_admin_are_refused_on_every_address_that_reaches_them() {
        let p = UpstreamPolicy::new(
            listeners("127.0.0.1:8080", "127.0.0.1:8081", "127.0.0.1:9901"),
            vec![],
            vec![],
        );
        for target in [
            "127.0.0.1:9901",
            "127.0.0.2:9901",
            "[::1]:9901",
            "[::ffff:127.0.0.1]:9901",
            "0.0.0.0:9901",
            "[::]:9901",
            "127.0.0.1:8080",
            "[::1]:8081",
        ] {
            let denied = p.permits(addr(target)).unwrap_err();
            assert!(
                matches!(denied.rule, Rule::Listener { .. }),
                "{target}: {denied}"
            );
        }
        // Other ports of loopback stay usable: make run's and the tests' demo servers.
        for ok in ["127.0.0.1:9100", "[::1]:9100", "127.0.0.1:9902"] {
            assert_eq!(p.permits(addr(ok)), Ok(()), "{ok}");
        }
        let denied = p.permits(addr("[::ffff:127.0.0.1]:9901")).unwrap_err();
        assert_eq!(denied.addr, addr("127.0.0.1:9901"), "judged as IPv4");
        assert_eq!(
            denied.to_string(),
            "127.0.0.1:9901 is not allowed as an upstream: it reaches Envoy's admin (127.0.0.1:9901)"
        );
    }

    #[test]
    fn a_listener_on_an_unspecified_address_is_reached_on_every_local_address() {
        let p = with_local(UpstreamPolicy::new(
            listeners("0.0.0.0:8080", "[::]:8081", "10.0.0.5:9901"),
            vec![],
            vec![],
        ));
        for target in [
            "10.0.0.5:8080",
            "127.0.0.1:8080",
            "[::1]:8080",
            "10.0.0.5:8081",
            "[::ffff:10.0.0.5]:8081",
            "10.0.0.5:9901",
        ] {
            assert!(p.permits(addr(target)).is_err(), "{target}");
        }
        // Another machine's 8080, and this machine's other addresses for a listener
        // bound to one address only.
        for ok in ["10.0.0.6:8080", "192.0.2.1:8081", "127.0.0.1:9901"] {
            assert_eq!(p.permits(addr(ok)), Ok(()), "{ok}");
        }
    }

    #[test]
    fn built_in_denials_hold_in_every_spelling() {
        let p = UpstreamPolicy::default();
        for target in [
            "169.254.169.254:80",
            "[::ffff:169.254.169.254]:80",
            "[64:ff9b::a9fe:a9fe]:80",
            "[fe80::1]:80",
            "[fd00:ec2::254]:80",
            "0.0.0.0:80",
            "0.1.2.3:80",
            "[::]:80",
            "224.0.0.1:80",
            "[ff02::1]:80",
            "255.255.255.255:80",
            "100.100.100.200:80",
            "168.63.129.16:80",
        ] {
            let denied = p.permits(addr(target)).unwrap_err();
            assert!(matches!(denied.rule, Rule::BuiltIn { .. }), "{target}");
        }
        for ok in [
            "127.0.0.1:80",
            "10.1.2.3:443",
            "[2001:db8::1]:443",
            "8.8.8.8:443",
        ] {
            assert_eq!(p.permits(addr(ok)), Ok(()), "{ok}");
        }
        let denied = p.permits(addr("169.254.169.254:80")).unwrap_err();
        assert!(
            denied
                .to_string()
                .contains("169.254.0.0/16 is always denied")
        );
    }

    #[test]
    fn operators_deny_and_allow_networks_and_deny_wins() {
        let p = UpstreamPolicy::new(
            vec![],
            vec![net("127.0.0.0/8"), net("::1/128"), net("10.9.0.0/16")],
            vec![net("10.0.0.0/8"), net("2001:db8::/32")],
        );
        assert_eq!(
            p.permits(addr("127.0.0.1:9100")).unwrap_err().rule,
            Rule::DenyList(net("127.0.0.0/8"))
        );
        assert_eq!(
            p.permits(addr("[::ffff:127.0.0.1]:9100")).unwrap_err().rule,
            Rule::DenyList(net("127.0.0.0/8"))
        );
        assert_eq!(
            p.permits(addr("[64:ff9b::7f00:1]:9100")).unwrap_err().rule,
            Rule::DenyList(net("127.0.0.0/8")),
            "NAT64 to a denied IPv4 address"
        );
        assert_eq!(
            p.permits(addr("10.9.1.1:443")).unwrap_err().rule,
            Rule::DenyList(net("10.9.0.0/16")),
            "deny wins over allow"
        );
        assert_eq!(
            p.permits(addr("192.0.2.1:443")).unwrap_err().rule,
            Rule::NotAllowed
        );
        assert_eq!(p.permits(addr("10.1.1.1:443")), Ok(()));
        assert_eq!(p.permits(addr("[2001:db8::5]:443")), Ok(()));
    }

    #[tokio::test]
    async fn resolve_judges_every_address_of_a_name_and_literals_as_they_are() {
        let p = UpstreamPolicy::new(
            listeners("127.0.0.1:8080", "127.0.0.1:8081", "127.0.0.1:9901"),
            vec![],
            vec![],
        );
        assert_eq!(
            p.resolve("127.0.0.1", 9100).await,
            Ok(vec![addr("127.0.0.1:9100")])
        );
        assert_eq!(p.resolve("[::1]", 9100).await, Ok(vec![addr("[::1]:9100")]));
        for host in [
            "localhost",
            "LOCALHOST.",
            "envoy.localhost",
            "[::1]",
            "127.0.0.1",
        ] {
            let refused = p.resolve(host, 9901).await.unwrap_err();
            assert!(
                matches!(&refused, Refused::Denied(d) if matches!(d.rule, Rule::Listener { .. })),
                "{host}: {refused}"
            );
        }
        assert!(matches!(
            p.resolve("169.254.169.254", 80).await,
            Err(Refused::Denied(_))
        ));
        assert!(matches!(
            p.resolve("no-such-host.invalid", 80).await,
            Err(Refused::Unresolvable { .. })
        ));
        assert_eq!(
            p.resolve_authority("[::1]:9100").await,
            Ok(vec![addr("[::1]:9100")])
        );
        assert!(matches!(
            p.resolve_authority("localhost:9901").await,
            Err(Refused::Denied(_))
        ));
        assert!(matches!(
            p.resolve_authority("localhost").await,
            Err(Refused::Unresolvable { .. })
        ));
    }
}
