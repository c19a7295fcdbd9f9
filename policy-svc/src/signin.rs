//! Signing in with a password, as the OAuth sign-in page and the enrollment page do:
//! argon2id hashing with a bound on how many hashes run at once, and the throttle that
//! keeps online guessing slow without ever locking the real user out.
//!
//! **The hashing bound.** One argon2id verification holds 19 MiB for about its whole
//! run; unbounded, 200 parallel sign-ins took the service to 2 GiB, and an out-of-memory
//! kill would take the check port with it. At most `--password-hash-concurrency` hashes
//! (default: the number of CPUs) run at once, each on a hashing thread of its own, and
//! twice as many requests may wait for one; beyond that a request is refused at once
//! ([`Busy`]: 503 with `Retry-After`), before it reads or writes anything.
//!
//! **The throttle** ([`reserve`], stored by `store::signin`). An attempt is reserved in
//! the database before the password is verified, in one transaction that locks the
//! rows it reads, so parallel guesses (on one replica or many) cannot all be verified.
//! Two limits:
//! - per (user name, client): a client's first [`FREE_FAILURES`] failures under a name
//!   cost nothing; after that the client waits 15 s, then 30 s, doubling up to 15
//!   minutes, between attempts under that name. A success clears the client's count.
//! - per user name, across clients: attempts by clients past their free failures draw
//!   on a budget of [`ACCOUNT_BURST`] attempts, refilled by one every
//!   [`ACCOUNT_REFILL_MS`]. A client still within its free failures is never held back
//!   by that budget: so an attacker who fails from elsewhere, however often, cannot keep
//!   the real user from signing in, while each of the attacker's clients gets at most
//!   [`FREE_FAILURES`] guesses outside the budget.
//!
//! The client is the peer address of the connection (an IPv6 address by its /64, which
//! one subscriber usually holds whole). Behind a reverse proxy (an Istio sidecar, an
//! ingress) every client has the proxy's address, and the per-client limit would hold
//! everyone behind it together: list the proxies in `--trusted-proxies` and the client
//! is read from the `X-Forwarded-For` they append ([`forwarded_client`]).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::request::Parts;
use tokio::sync::{mpsc, oneshot};

use crate::AppState;
use crate::store::{self, now_ms, signin as db};

// ---- the hashing bound ----

/// Too many password hashes running and waiting: answer 503 with `Retry-After`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Busy;

impl Busy {
    /// Seconds for `Retry-After`: a hash takes well under one.
    pub const RETRY_AFTER_SECS: u64 = 1;
}

/// Longest a request waits for its queued hash; a full queue drains in about two hash
/// times, so this is only reached on a stalled machine.
const QUEUE_WAIT: Duration = Duration::from_secs(2);

type Job = Box<dyn FnOnce(&mut Memory) + Send>;

/// The bound on concurrent argon2 runs, shared by every handler that hashes: a fixed
/// set of worker threads, each with its argon2 memory allocated once and reused, and a
/// bounded queue in front of them. The argon2 crate allocates 19 MiB per hash, 64-byte
/// aligned; glibc did not reuse those buffers, so one thread's memory grew by 19 MiB a
/// hash up to 160 MiB, and the blocking pool has up to 512 threads (200 sign-ins, two
/// at a time on the blocking pool, grew the service by 120 MiB).
pub struct Passwords {
    queue: mpsc::Sender<Job>,
}

impl Passwords {
    /// `concurrency` hashes at once (at least one), on as many threads, and twice as
    /// many queued.
    pub fn new(concurrency: usize) -> Self {
        let n = concurrency.max(1);
        let (queue, jobs) = mpsc::channel::<Job>(n * 2);
        let jobs = Arc::new(std::sync::Mutex::new(jobs));
        for i in 0..n {
            let jobs = jobs.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("argon2-{i}"))
                .spawn(move || {
                    let mut memory = Memory::default();
                    loop {
                        let next = match jobs.lock() {
                            Ok(mut rx) => rx.blocking_recv(),
                            Err(poisoned) => poisoned.into_inner().blocking_recv(),
                        };
                        // None: every sender is gone, the service is stopping.
                        let Some(job) = next else { break };
                        job(&mut memory);
                    }
                });
            if let Err(e) = spawned {
                tracing::error!(error = %e, "could not start a password hashing thread");
            }
        }
        Passwords { queue }
    }

    /// The default bound: one hash per CPU.
    pub fn per_cpu() -> Self {
        Self::new(std::thread::available_parallelism().map_or(1, usize::from))
    }

    /// A place in the queue, or [`Busy`] at once.
    pub fn admit(&self) -> Result<Admitted, Busy> {
        let slot = self.queue.clone().try_reserve_owned().map_err(|_| Busy)?;
        Ok(Admitted { slot })
    }
}

/// A request admitted to hash once: its place in the queue is held.
pub struct Admitted {
    slot: mpsc::OwnedPermit<Job>,
}

impl Admitted {
    /// Runs `work` on a hashing thread. A job whose request has gone away by the time
    /// a thread takes it is skipped.
    async fn run<T: Send + 'static>(
        self,
        work: impl FnOnce(&mut Memory) -> T + Send + 'static,
    ) -> Result<T, Busy> {
        let (done, result) = oneshot::channel();
        self.slot.send(Box::new(move |memory| {
            if !done.is_closed() {
                let _ = done.send(work(memory));
            }
        }));
        tokio::time::timeout(QUEUE_WAIT, result)
            .await
            .map_err(|_| Busy)?
            .map_err(|_| Busy)
    }

    /// Whether `password` matches `hash`; `None` verifies against a dummy hash, so that
    /// an unknown name takes as long as a wrong password.
    pub async fn verify(self, password: String, hash: Option<String>) -> Result<bool, Busy> {
        self.run(move |memory| match hash {
            Some(hash) => verify_password(memory, &password, &hash),
            None => {
                let dummy = dummy_hash(memory);
                verify_password(memory, &password, dummy)
            }
        })
        .await
    }

    /// The argon2id hash of `password`.
    pub async fn hash(self, password: String) -> Result<Result<String, String>, Busy> {
        self.run(move |memory| hash_password(memory, &password))
            .await
    }
}

/// One hashing thread's argon2 working memory: allocated on first use, then reused.
#[derive(Default)]
pub struct Memory(Vec<argon2::Block>);

/// The largest argon2 memory a stored hash may ask for (64 MiB); ours use 19 MiB.
const MAX_BLOCKS: usize = 64 * 1024;

impl Memory {
    fn blocks(&mut self, params: &argon2::Params) -> Option<&mut [argon2::Block]> {
        let n = params.block_count();
        if n > MAX_BLOCKS {
            return None;
        }
        if self.0.len() < n {
            self.0.resize(n, argon2::Block::default());
        }
        self.0.get_mut(..n)
    }
}

/// The argon2id hash of `password` (default parameters: 19 MiB, 2 passes), as a PHC
/// string, computed in `memory`.
pub fn hash_password(memory: &mut Memory, password: &str) -> Result<String, String> {
    use argon2::password_hash::phc::{Output, ParamsString, PasswordHash, Salt};
    use argon2::{Algorithm, Argon2, Params, Version};
    let params = Params::default();
    let mut salt = [0u8; 16];
    getrandom::fill(&mut salt).map_err(|e| e.to_string())?;
    let mut out = [0u8; Params::DEFAULT_OUTPUT_LEN];
    let blocks = memory.blocks(&params).ok_or("argon2 memory")?;
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params.clone())
        .hash_password_into_with_memory(password.as_bytes(), &salt, &mut out, blocks)
        .map_err(|e| e.to_string())?;
    let phc = PasswordHash {
        algorithm: argon2::ARGON2ID_IDENT,
        version: Some(Version::V0x13.into()),
        params: ParamsString::try_from(&params).map_err(|e| e.to_string())?,
        salt: Some(Salt::new(&salt).map_err(|e| e.to_string())?),
        hash: Some(Output::new(&out).map_err(|e| e.to_string())?),
    };
    Ok(phc.to_string())
}

/// Whether `password` matches the PHC string `hash` (any argon2 variant and
/// parameters it names), computed in `memory` and compared in constant time.
fn verify_password(memory: &mut Memory, password: &str, hash: &str) -> bool {
    use argon2::password_hash::phc::PasswordHash;
    use argon2::{Algorithm, Argon2, Params, Version};
    use subtle::ConstantTimeEq;
    let Ok(parsed) = PasswordHash::new(hash) else {
        return false;
    };
    let (Some(salt), Some(expected)) = (&parsed.salt, &parsed.hash) else {
        return false;
    };
    let Ok(algorithm) = Algorithm::try_from(parsed.algorithm.as_str()) else {
        return false;
    };
    let version = match parsed.version {
        Some(v) => Version::try_from(v),
        None => Ok(Version::default()),
    };
    let (Ok(version), Ok(params)) = (version, Params::try_from(&parsed)) else {
        return false;
    };
    let mut out = vec![0u8; expected.len()];
    let Some(blocks) = memory.blocks(&params) else {
        return false;
    };
    Argon2::new(algorithm, version, params)
        .hash_password_into_with_memory(password.as_bytes(), salt, &mut out, blocks)
        .is_ok()
        && bool::from(out.ct_eq(expected.as_bytes()))
}

/// A hash to verify against when the user does not exist (computed once, on first
/// use, on a hashing thread).
fn dummy_hash(memory: &mut Memory) -> &'static str {
    static DUMMY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DUMMY.get_or_init(|| hash_password(memory, "not the password").unwrap_or_default())
}

// ---- the client ----

/// The client a sign-in comes from, as the throttle counts it: the peer address (an
/// IPv6 address by its /64), or `unknown` when the server was not asked to keep it.
/// When the peer is a trusted proxy (`--trusted-proxies`), the address that proxy says
/// it serves, from `X-Forwarded-For` ([`forwarded_client`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Client(pub String);

impl Client {
    pub fn of(peer: Option<IpAddr>) -> Client {
        Client(match peer.map(canonical) {
            Some(IpAddr::V4(v4)) => v4.to_string(),
            Some(IpAddr::V6(v6)) => {
                let s = v6.segments();
                format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
            }
            None => "unknown".to_owned(),
        })
    }
}

/// An IPv4 client connected over IPv6 (`::ffff:a.b.c.d`) is that IPv4 client.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// A network of trusted proxies: `10.0.0.0/8`, `127.0.0.6`, `fd00::/8`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Network {
    addr: IpAddr,
    prefix: u32,
}

impl std::str::FromStr for Network {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, prefix) = match s.trim().split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s.trim(), None),
        };
        let addr = canonical(
            addr.parse()
                .map_err(|_| format!("{s:?}: not an IP address"))?,
        );
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p
                .parse()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{s:?}: the prefix length must be 0 to {max}"))?,
            None => max,
        };
        Ok(Network { addr, prefix })
    }
}

impl Network {
    pub fn contains(&self, ip: IpAddr) -> bool {
        let bits = |a: IpAddr| match a {
            IpAddr::V4(v4) => (u128::from(u32::from(v4)) << 96, 32),
            IpAddr::V6(v6) => (u128::from(v6), 128),
        };
        let ((net, family), (ip, ip_family)) = (bits(self.addr), bits(canonical(ip)));
        if family != ip_family {
            return false;
        }
        let mask = u128::MAX.checked_shl(128 - self.prefix).unwrap_or(0);
        net & mask == ip & mask
    }
}

/// The client behind trusted proxies: `X-Forwarded-For` read from the right (the hop
/// our proxy appended) to the first address that is not a trusted proxy; what lies to
/// its left came from the client and is not believed. A peer that is not a trusted
/// proxy is the client, whatever it sends; an unreadable hop stops the walk.
pub fn forwarded_client<'a>(
    peer: IpAddr,
    forwarded_for: impl Iterator<Item = &'a str>,
    trusted: &[Network],
) -> IpAddr {
    let is_trusted = |ip: IpAddr| trusted.iter().any(|n| n.contains(ip));
    let mut client = peer;
    if !is_trusted(client) {
        return client;
    }
    let hops: Vec<&str> = forwarded_for.flat_map(|v| v.split(',')).collect();
    // A proxy chain is short; a long header is someone else's.
    for hop in hops.iter().rev().take(16) {
        let hop = hop.trim();
        let parsed = hop
            .parse::<IpAddr>()
            .or_else(|_| hop.parse::<SocketAddr>().map(|s| s.ip()));
        let Ok(ip) = parsed else { break };
        client = ip;
        if !is_trusted(ip) {
            break;
        }
    }
    client
}

impl FromRequestParts<AppState> for Client {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let peer = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|c| c.0.ip());
        let forwarded = parts
            .headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok());
        let trusted = &state.oauth.trusted_proxies;
        Ok(Client::of(
            peer.map(|p| forwarded_client(p, forwarded, trusted)),
        ))
    }
}

// ---- the throttle ----

/// Failures a client may have under one name before it must wait between attempts,
/// and before its attempts draw on the name's budget.
pub const FREE_FAILURES: i64 = 3;
/// The wait after the first failure past the free ones; it doubles with each further
/// failure, up to [`MAX_WAIT_MS`].
const FIRST_WAIT_MS: i64 = 15_000;
const MAX_WAIT_MS: i64 = 15 * 60_000;
/// A client's failures under a name are forgotten this long after its last attempt.
pub const SOURCE_MEMORY_MS: i64 = 24 * 3_600_000;
/// The name's budget for attempts from clients past their free failures: this many at
/// once, and one more every [`ACCOUNT_REFILL_MS`] (120 an hour at most).
pub const ACCOUNT_BURST: i64 = 10;
pub const ACCOUNT_REFILL_MS: i64 = 30_000;

/// One client's record under one name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SourceState {
    /// Attempts counted against it (each is counted before it is verified, and a
    /// success clears them).
    pub failures: i64,
    /// No attempt before this time (unix ms).
    pub next_at: i64,
    pub last_at: i64,
}

/// What the throttle says about an attempt, and what to store if it goes ahead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reservation {
    /// Verify the password; store the new source record and the name's budget
    /// (GCRA's theoretical arrival time).
    Allowed {
        source: SourceState,
        account_tat: i64,
    },
    /// Refuse without verifying; try again after this many milliseconds.
    Throttled { retry_after_ms: i64 },
}

/// How long a client waits after its `failures`th counted failure.
pub fn wait_after(failures: i64) -> i64 {
    if failures < FREE_FAILURES {
        return 0;
    }
    let doublings = u32::try_from((failures - FREE_FAILURES).min(10)).unwrap_or(10);
    (FIRST_WAIT_MS << doublings).min(MAX_WAIT_MS)
}

/// Decides an attempt at `now` by a client with record `source` under a name whose
/// budget stands at `account_tat`. The attempt is counted as a failure up front.
pub fn reserve(now: i64, source: SourceState, account_tat: i64) -> Reservation {
    let source = if now - source.last_at > SOURCE_MEMORY_MS {
        SourceState::default()
    } else {
        source
    };
    if source.next_at > now {
        return Reservation::Throttled {
            retry_after_ms: source.next_at - now,
        };
    }
    // GCRA: the budget is spent up to `tat`; `tolerance` ahead of now is a full burst.
    let tolerance = (ACCOUNT_BURST - 1) * ACCOUNT_REFILL_MS;
    let tat = account_tat.max(now);
    let budget_left = tat - now <= tolerance;
    let in_good_standing = source.failures < FREE_FAILURES;
    if !budget_left && !in_good_standing {
        return Reservation::Throttled {
            retry_after_ms: tat - tolerance - now,
        };
    }
    let failures = source.failures + 1;
    Reservation::Allowed {
        source: SourceState {
            failures,
            next_at: now + wait_after(failures),
            last_at: now,
        },
        // A client in good standing draws on the budget while there is some, and is
        // let through without it when there is none.
        account_tat: if budget_left {
            tat + ACCOUNT_REFILL_MS
        } else {
            account_tat
        },
    }
}

// ---- signing in ----

/// What a sign-in with a name and password came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignIn {
    User(i64),
    /// Wrong name or password, or a disabled user: the same answer for each.
    Refused,
    /// Too many recent attempts from this client under this name (or under this name
    /// from everywhere): refused without verifying, retry after this many seconds.
    Throttled(u64),
    /// The hash waited too long in the queue (a stalled machine): not verified.
    Busy,
}

impl SignIn {
    pub const THROTTLED_MESSAGE: &str =
        "Too many sign-in attempts under this name; wait a little and try again.";
    pub const BUSY_MESSAGE: &str =
        "Sign-in is busy right now (too many at once); try again in a moment.";
}

/// The longest user name and password anyone can have: longer ones are refused without
/// hashing or counting (no user can sign in with them).
const MAX_NAME_CHARS: usize = 200;
const MAX_PASSWORD_CHARS: usize = 1024;
/// The shortest password an admin may set.
const MIN_PASSWORD_CHARS: usize = 12;

/// Whether `password` may be set (the admin API sets it): 12 to 1024
/// printable characters, so that every password set is one [`sign_in`] accepts.
pub fn is_settable_password(password: &str) -> bool {
    let length = password.chars().count();
    (MIN_PASSWORD_CHARS..=MAX_PASSWORD_CHARS).contains(&length)
        && !password.chars().any(char::is_control)
}

/// Signs in an enabled user with a password, once `admitted` to hash (the caller asks
/// [`Passwords::admit`] before it reads anything, and answers [`Busy`] itself). Takes as
/// long for an unknown name as for a wrong password, and throttles both alike.
pub async fn sign_in(
    state: &AppState,
    admitted: Admitted,
    client: &Client,
    username: &str,
    password: &str,
) -> Result<SignIn, store::StoreError> {
    if username.chars().count() > MAX_NAME_CHARS || password.chars().count() > MAX_PASSWORD_CHARS {
        return Ok(SignIn::Refused);
    }
    if let Reservation::Throttled { retry_after_ms } =
        db::reserve(&state.db, username, &client.0, now_ms()).await?
    {
        // Whole seconds, rounded up, at least one.
        let secs = u64::try_from(retry_after_ms.max(1)).map_or(1, |ms| ms.div_ceil(1000));
        return Ok(SignIn::Throttled(secs));
    }
    let (user_id, hash, enabled) = match store::signin::password_of(&state.db, username).await? {
        Some((id, Some(hash), enabled)) => (Some(id), Some(hash), enabled.0),
        _ => (None, None, false),
    };
    let Ok(verified) = admitted.verify(password.to_owned(), hash).await else {
        return Ok(SignIn::Busy);
    };
    match user_id.filter(|_| verified && enabled) {
        Some(id) => {
            db::succeeded(&state.db, username, &client.0).await?;
            Ok(SignIn::User(id))
        }
        None => Ok(SignIn::Refused),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: i64 = 60_000;

    #[test]
    fn every_password_that_can_be_set_can_sign_in() {
        assert!(is_settable_password("twelve chars"));
        assert!(is_settable_password(&"é".repeat(MAX_PASSWORD_CHARS)));
        assert!(!is_settable_password("eleven char"));
        assert!(!is_settable_password(&"a".repeat(MAX_PASSWORD_CHARS + 1)));
        assert!(!is_settable_password("twelve\nchars"));
    }

    /// `n` failed attempts by one client under one name, each as soon as allowed.
    fn attempts(n: i64, mut now: i64, mut tat: i64) -> (SourceState, i64, i64) {
        let mut source = SourceState::default();
        while source.failures < n {
            match reserve(now, source, tat) {
                Reservation::Allowed {
                    source: s,
                    account_tat,
                } => {
                    (source, tat) = (s, account_tat);
                }
                Reservation::Throttled { retry_after_ms } => now += retry_after_ms,
            }
        }
        (source, tat, now)
    }

    #[test]
    fn a_client_gets_its_free_failures_then_waits_longer_each_time() {
        let waits: Vec<i64> = (1..=10).map(wait_after).collect();
        assert_eq!(
            waits,
            [
                0, 0, 15_000, 30_000, 60_000, 120_000, 240_000, 480_000, 900_000, 900_000
            ]
        );
        assert_eq!(wait_after(i64::MAX), MAX_WAIT_MS);
        let now = 10 * MIN;
        let mut source = SourceState::default();
        for n in 1..=FREE_FAILURES {
            let Reservation::Allowed { source: s, .. } = reserve(now, source, 0) else {
                panic!("free failure {n} throttled");
            };
            source = s;
        }
        // Parallel attempts at the same instant: the one after the free ones waits.
        assert_eq!(
            reserve(now, source, 0),
            Reservation::Throttled {
                retry_after_ms: 15_000
            }
        );
        assert!(matches!(
            reserve(now + 15_000, source, 0),
            Reservation::Allowed { .. }
        ));
        // A day later the client is forgotten.
        let later = now + SOURCE_MEMORY_MS + 1;
        let Reservation::Allowed { source: fresh, .. } = reserve(later, source, 0) else {
            panic!("forgotten");
        };
        assert_eq!(fresh.failures, 1);
    }

    #[test]
    fn the_names_budget_holds_back_failing_clients_but_never_a_client_in_good_standing() {
        let now = 100 * MIN;
        // An attacker from many addresses has spent the name's budget.
        let spent = now + (ACCOUNT_BURST - 1) * ACCOUNT_REFILL_MS + 1;
        let failing = SourceState {
            failures: FREE_FAILURES + 2,
            next_at: now,
            last_at: now - 1,
        };
        assert_eq!(
            reserve(now, failing, spent),
            Reservation::Throttled { retry_after_ms: 1 }
        );
        // The real user, from a client with no recent failures, is verified; the budget
        // is not pushed further away by it.
        assert_eq!(
            reserve(now, SourceState::default(), spent),
            Reservation::Allowed {
                source: SourceState {
                    failures: 1,
                    next_at: now,
                    last_at: now
                },
                account_tat: spent
            }
        );
        // With budget left, a failing client past its wait is verified and spends some.
        assert_eq!(
            reserve(now, failing, 0),
            Reservation::Allowed {
                source: SourceState {
                    failures: FREE_FAILURES + 3,
                    next_at: now + wait_after(FREE_FAILURES + 3),
                    last_at: now
                },
                account_tat: now + ACCOUNT_REFILL_MS
            }
        );
    }

    #[test]
    fn guessing_from_one_client_stays_slow() {
        // However fast it asks, one client gets a handful of guesses in the first hour
        // and a few an hour after that.
        let (source, _, t) = attempts(9, 0, 0);
        assert_eq!(source.failures, 9);
        assert!(t >= 15 * MIN, "nine guesses took {} min", t / MIN);
        let (_, _, t) = attempts(20, 0, 0);
        assert!(t >= 3 * 60 * MIN, "twenty guesses took {} min", t / MIN);
    }

    #[test]
    fn clients_are_addresses_and_ipv6_counts_by_its_64() {
        let ip = |s: &str| Some(s.parse::<IpAddr>().unwrap());
        assert_eq!(Client::of(ip("127.0.0.2")).0, "127.0.0.2");
        assert_eq!(Client::of(ip("::ffff:10.1.2.3")).0, "10.1.2.3");
        assert_eq!(
            Client::of(ip("2001:db8:1:2:aaaa::1")),
            Client::of(ip("2001:db8:1:2:ffff::9"))
        );
        assert_eq!(Client::of(ip("2001:db8:1:2::1")).0, "2001:db8:1:2::/64");
        assert_ne!(
            Client::of(ip("2001:db8:1:2::1")),
            Client::of(ip("2001:db8:1:3::1"))
        );
        assert_eq!(Client::of(None).0, "unknown");
    }

    #[test]
    fn behind_trusted_proxies_the_client_is_the_hop_they_saw() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let nets: Vec<Network> = ["10.0.0.0/8", "127.0.0.6", "fd00::/8"]
            .iter()
            .map(|n| n.parse().unwrap())
            .collect();
        assert!(nets[0].contains(ip("10.200.1.2")) && !nets[0].contains(ip("11.0.0.1")));
        assert!(nets[1].contains(ip("::ffff:127.0.0.6")) && !nets[1].contains(ip("127.0.0.7")));
        assert!(nets[2].contains(ip("fd12::1")) && !nets[2].contains(ip("fe80::1")));
        assert!(!nets[0].contains(ip("::a00:1")), "families do not mix");
        assert!(
            "0.0.0.0/0"
                .parse::<Network>()
                .unwrap()
                .contains(ip("8.8.8.8"))
        );
        for bad in ["10.0.0.0/33", "nonsense", "::/129", "10.0.0.0/x"] {
            assert!(bad.parse::<Network>().is_err(), "{bad}");
        }
        let client = |peer: &str, xff: &[&str]| {
            forwarded_client(ip(peer), xff.iter().copied(), &nets).to_string()
        };
        // Not through a trusted proxy: the peer, whatever it claims.
        assert_eq!(client("203.0.113.9", &["198.51.100.1"]), "203.0.113.9");
        // Through the sidecar and an ingress: the first hop they did not add.
        assert_eq!(
            client("127.0.0.6", &["198.51.100.1, 203.0.113.5, 10.1.2.3"]),
            "203.0.113.5"
        );
        assert_eq!(
            client("127.0.0.6", &["198.51.100.1", "203.0.113.5:4711"]),
            "203.0.113.5"
        );
        // No header, only trusted hops, or garbage: the last trusted hop.
        assert_eq!(client("127.0.0.6", &[]), "127.0.0.6");
        assert_eq!(client("127.0.0.6", &["10.9.9.9"]), "10.9.9.9");
        assert_eq!(client("127.0.0.6", &["203.0.113.5, garbage"]), "127.0.0.6");
    }

    #[test]
    fn passwords_hash_with_argon2id_and_verify_in_reused_memory() {
        let mut memory = Memory::default();
        let h = hash_password(&mut memory, "correct horse").unwrap();
        assert!(h.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{h}");
        assert!(verify_password(&mut memory, "correct horse", &h));
        assert!(!verify_password(&mut memory, "wrong horse", &h));
        assert!(!verify_password(&mut memory, "x", "not a hash"));
        assert_ne!(
            h,
            hash_password(&mut memory, "correct horse").unwrap(),
            "salted"
        );
        // The same scheme as the argon2 crate's own hasher, both ways: hashes stored
        // before this module still verify.
        use argon2::password_hash::{PasswordHasher, PasswordVerifier};
        let theirs = argon2::Argon2::default()
            .hash_password(b"correct horse")
            .unwrap()
            .to_string();
        assert!(verify_password(&mut memory, "correct horse", &theirs));
        assert!(!verify_password(&mut memory, "correct horsf", &theirs));
        assert!(
            argon2::Argon2::default()
                .verify_password(b"correct horse", h.as_str())
                .is_ok()
        );
        // A hash asking for more memory than any of ours is refused, not obeyed.
        let greedy = theirs.replace("m=19456", "m=4194304");
        assert!(!verify_password(&mut memory, "correct horse", &greedy));
        assert_eq!(
            memory.0.len(),
            19456,
            "allocated once, at the size ours use"
        );
    }

    #[tokio::test]
    async fn beyond_the_bound_hashing_is_refused_at_once() {
        let passwords = Passwords::new(1);
        let held: Vec<_> = (0..2).map(|_| passwords.admit().unwrap()).collect();
        assert_eq!(
            passwords.admit().err(),
            Some(Busy),
            "two queued for one thread"
        );
        drop(held);
        let admitted = passwords.admit().unwrap();
        assert_eq!(
            admitted.verify("x".into(), Some("not a hash".into())).await,
            Ok(false)
        );
    }
}
