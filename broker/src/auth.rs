//! Users, vhost names and permissions: the authentication and authorization database.
//!
//! Passwords are kept only as RabbitMQ password hashes (`rabbit_password_hashing_sha256` by
//! default: base64 of a 4-byte random salt followed by `sha256(salt ++ password)`), so a user
//! exported from RabbitMQ logs in here with the same password and the other way round. The
//! database is mutable at run time (management API, definitions import); readers take a short
//! read lock. Persisting changes is the job of [`crate::definitions`].
//!
//! Failed logins can be limited per source address ([`FailureLimiter`], `auth-failure-limit`;
//! RabbitMQ has no such limit, so it is off by default): a pure counter with the time passed in,
//! shared by AMQP and HTTP logins through [`AuthDb::login`].

use base64::Engine as _;
use parking_lot::RwLock;
use regex::Regex;
use sha2::{Digest, Sha256, Sha512};
use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// A permission regex; `.*` is special-cased so the common case costs nothing per publish.
#[derive(Debug, Clone)]
pub enum Pattern {
    All,
    Nothing,
    Re(Regex),
}

impl Pattern {
    fn new(s: &str) -> Self {
        if s == ".*" {
            return Pattern::All;
        }
        // An empty pattern (or one that does not compile) grants nothing, as in RabbitMQ.
        match Regex::new(s) {
            Ok(r) if !s.is_empty() => Pattern::Re(r),
            _ => Pattern::Nothing,
        }
    }
    /// The pattern as configured ("" for one that grants nothing).
    pub fn as_str(&self) -> &str {
        match self {
            Pattern::All => ".*",
            Pattern::Nothing => "",
            Pattern::Re(r) => r.as_str(),
        }
    }

    pub fn allows(&self, name: &str) -> bool {
        match self {
            Pattern::All => true,
            Pattern::Nothing => false,
            Pattern::Re(r) => r.is_match(name),
        }
    }
}

/// The three permission regexes as given (configure, write, read).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PermissionSpec {
    pub configure: String,
    pub write: String,
    pub read: String,
}

impl PermissionSpec {
    /// Everything allowed (`.*` three times).
    pub fn all() -> Self {
        Self {
            configure: ".*".into(),
            write: ".*".into(),
            read: ".*".into(),
        }
    }

    /// Checks that each regex compiles (an empty one is allowed and grants nothing).
    pub fn validate(&self) -> Result<(), String> {
        for (what, re) in [
            ("configure", &self.configure),
            ("write", &self.write),
            ("read", &self.read),
        ] {
            Regex::new(re).map_err(|e| format!("invalid {what} regex '{re}': {e}"))?;
        }
        Ok(())
    }
}

/// configure / write / read permissions of one user on one vhost, compiled.
#[derive(Debug, Clone)]
pub struct Permissions {
    pub configure: Pattern,
    pub write: Pattern,
    pub read: Pattern,
    pub spec: PermissionSpec,
}

impl Permissions {
    pub fn compile(spec: PermissionSpec) -> Self {
        Self {
            configure: Pattern::new(&spec.configure),
            write: Pattern::new(&spec.write),
            read: Pattern::new(&spec.read),
            spec,
        }
    }
}

/// RabbitMQ's password hashing algorithms (`hashing_algorithm` in definitions).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HashAlgorithm {
    #[default]
    Sha256,
    Sha512,
}

impl HashAlgorithm {
    pub const SHA256: &'static str = "rabbit_password_hashing_sha256";
    pub const SHA512: &'static str = "rabbit_password_hashing_sha512";

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            Self::SHA256 => Some(Self::Sha256),
            Self::SHA512 => Some(Self::Sha512),
            _ => None,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sha256 => Self::SHA256,
            Self::Sha512 => Self::SHA512,
        }
    }
    fn digest(self, salt: &[u8], password: &[u8]) -> Vec<u8> {
        match self {
            Self::Sha256 => {
                let mut h = Sha256::new();
                h.update(salt);
                h.update(password);
                h.finalize().to_vec()
            }
            Self::Sha512 => {
                let mut h = Sha512::new();
                h.update(salt);
                h.update(password);
                h.finalize().to_vec()
            }
        }
    }
    fn digest_len(self) -> usize {
        match self {
            Self::Sha256 => 32,
            Self::Sha512 => 64,
        }
    }
}

/// A stored password: RabbitMQ's base64 `salt ++ digest`, or empty (no password login).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PasswordHash {
    pub algorithm: HashAlgorithm,
    /// base64 of the 4-byte salt followed by the digest; empty means password login is off.
    pub hash: String,
}

impl PasswordHash {
    /// Hashes `password` with the given salt (deterministic; for tests and for [`Self::new`]).
    pub fn with_salt(algorithm: HashAlgorithm, salt: [u8; 4], password: &str) -> Self {
        let mut raw = salt.to_vec();
        raw.extend(algorithm.digest(&salt, password.as_bytes()));
        Self {
            algorithm,
            hash: base64::engine::general_purpose::STANDARD.encode(raw),
        }
    }

    /// Hashes `password` with a fresh random salt (SHA-256, RabbitMQ's default).
    pub fn new(password: &str) -> Self {
        Self::with_salt(HashAlgorithm::Sha256, rand::random(), password)
    }

    /// A stored hash as found in definitions; checks it decodes to salt + digest.
    pub fn from_stored(algorithm: HashAlgorithm, hash: &str) -> Result<Self, String> {
        if !hash.is_empty() {
            let raw = base64::engine::general_purpose::STANDARD
                .decode(hash)
                .map_err(|e| format!("password_hash is not base64: {e}"))?;
            if raw.len() != 4 + algorithm.digest_len() {
                return Err(format!(
                    "password_hash has {} bytes, {} expects {}",
                    raw.len(),
                    algorithm.as_str(),
                    4 + algorithm.digest_len()
                ));
            }
        }
        Ok(Self {
            algorithm,
            hash: hash.to_owned(),
        })
    }

    /// Whether `password` matches. An empty hash matches nothing.
    pub fn verify(&self, password: &str) -> bool {
        let Ok(raw) = base64::engine::general_purpose::STANDARD.decode(&self.hash) else {
            return false;
        };
        if raw.len() != 4 + self.algorithm.digest_len() {
            return false;
        }
        let (salt, digest) = raw.split_at(4);
        let want = self.algorithm.digest(salt, password.as_bytes());
        // Constant-time comparison: the result must not depend on where bytes differ.
        want.iter()
            .zip(digest)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }
}

#[derive(Debug, Clone)]
pub struct User {
    pub name: String,
    pub password: PasswordHash,
    pub tags: Vec<String>,
}

/// Authentication and authorization database.
#[derive(Debug, Default)]
pub struct AuthDb {
    inner: RwLock<AuthState>,
    /// Failed logins by source address (off unless `auth-failure-limit` is set).
    failures: parking_lot::Mutex<FailureLimiter>,
}

#[derive(Debug, Default, Clone)]
struct AuthState {
    users: BTreeMap<String, User>,
    vhosts: BTreeMap<String, VhostMeta>,
    perms: BTreeMap<(String, String), Arc<Permissions>>,
}

/// Descriptive vhost metadata (kept and exported; no behaviour).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VhostMeta {
    pub description: String,
    pub tags: Vec<String>,
}

/// Why a login failed (all map to 403 on the wire).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("bad credentials")]
    BadCredentials,
    #[error("user '{0}' can only connect via localhost")]
    LoopbackOnly(String),
    /// The source address failed too often lately; the password was not checked.
    #[error("too many failed logins from this address; try again later")]
    TooManyFailures,
}

/// Whether `ip` is a loopback address (an IPv4-mapped IPv6 address counts as its IPv4 address,
/// as a dual-stack socket reports IPv4 clients that way).
pub fn is_loopback(ip: IpAddr) -> bool {
    ip.to_canonical().is_loopback()
}

// === failed-login limit ===

/// How long failures are counted, and how long a source that reached the limit is refused.
pub const FAILURE_WINDOW: Duration = Duration::from_secs(60);
/// Most source addresses tracked; past it the stalest entries go first.
pub const FAILURE_TABLE_CAP: usize = 10_000;

/// Counts failed logins per source address: after `limit` failures within [`FAILURE_WINDOW`],
/// the source is refused for [`FAILURE_WINDOW`] without its password being checked. Pure: the
/// caller passes the time in.
///
/// Invariants worth naming: the table never holds more than [`FAILURE_TABLE_CAP`] sources, so
/// an attacker cycling through addresses (IPv6 gives plenty) costs bounded memory; evicting a
/// source only ever forgets failures, it never blocks anyone.
#[derive(Debug, Default)]
pub struct FailureLimiter {
    /// 0 = off.
    limit: u32,
    sources: HashMap<IpAddr, Failures>,
}

#[derive(Debug, Clone, Copy)]
struct Failures {
    /// Start of the counting window.
    since: Instant,
    count: u32,
    blocked_until: Option<Instant>,
    last: Instant,
}

impl Failures {
    /// Nothing left to remember at `now`: window and block both over.
    fn stale(&self, now: Instant) -> bool {
        match self.blocked_until {
            Some(t) => now >= t,
            None => now >= self.since + FAILURE_WINDOW,
        }
    }
}

impl FailureLimiter {
    /// `limit` failures allowed per window; 0 turns the limiter off.
    pub fn new(limit: u32) -> Self {
        Self {
            limit,
            sources: HashMap::new(),
        }
    }

    /// Whether a login from `ip` may be checked at `now`.
    pub fn allows(&self, ip: IpAddr, now: Instant) -> bool {
        if self.limit == 0 {
            return true;
        }
        self.sources
            .get(&ip.to_canonical())
            .and_then(|f| f.blocked_until)
            .is_none_or(|t| now >= t)
    }

    /// Counts a failed login from `ip`.
    pub fn record_failure(&mut self, ip: IpAddr, now: Instant) {
        if self.limit == 0 {
            return;
        }
        let ip = ip.to_canonical();
        if !self.sources.contains_key(&ip) && self.sources.len() >= FAILURE_TABLE_CAP {
            self.evict(now);
        }
        let f = self.sources.entry(ip).or_insert(Failures {
            since: now,
            count: 0,
            blocked_until: None,
            last: now,
        });
        if f.stale(now) {
            *f = Failures {
                since: now,
                count: 0,
                blocked_until: None,
                last: now,
            };
        }
        f.count = f.count.saturating_add(1);
        f.last = now;
        if f.count >= self.limit && f.blocked_until.is_none() {
            f.blocked_until = Some(now + FAILURE_WINDOW);
        }
    }

    /// Makes room for one more source: drops stale entries, and if none was stale, the one
    /// with the oldest failure.
    fn evict(&mut self, now: Instant) {
        self.sources.retain(|_, f| !f.stale(now));
        if self.sources.len() >= FAILURE_TABLE_CAP {
            if let Some(ip) = self
                .sources
                .iter()
                .min_by_key(|(_, f)| f.last)
                .map(|(ip, _)| *ip)
            {
                self.sources.remove(&ip);
            }
        }
    }

    /// Sources tracked (for tests).
    pub fn len(&self) -> usize {
        self.sources.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sources.is_empty()
    }
}

impl AuthDb {
    /// An empty database (no users, no vhosts).
    pub fn new() -> Self {
        Self::default()
    }

    /// The config file's users (passwords hashed here), vhosts and permissions, with the
    /// implicit defaults (guest/guest on `/`). The broker itself boots through
    /// [`crate::definitions`], which also loads stored definitions.
    pub fn from_config(cfg: &crate::config::Config) -> Self {
        let db = Self::new();
        for v in cfg.effective_vhosts() {
            db.put_vhost(&v, VhostMeta::default());
        }
        for u in cfg.effective_users() {
            db.put_user(User {
                password: PasswordHash::new(&u.password),
                name: u.name,
                tags: u.tags,
            });
        }
        for p in cfg.effective_permissions() {
            db.put_permissions(
                &p.user,
                &p.vhost,
                PermissionSpec {
                    configure: p.configure,
                    write: p.write,
                    read: p.read,
                },
            );
        }
        db
    }

    /// Turns the failed-login limit on (`limit` failures per source and window) or off (0).
    pub fn set_failure_limit(&self, limit: u32) {
        *self.failures.lock() = FailureLimiter::new(limit);
    }

    /// A login from `source` at `now`: refused without a password check while the source is
    /// over the failed-login limit; a refusal counts as a failure.
    pub fn login(
        &self,
        user: &str,
        pass: &str,
        source: IpAddr,
        loopback: bool,
        now: Instant,
    ) -> Result<(), AuthError> {
        if !self.failures.lock().allows(source, now) {
            return Err(AuthError::TooManyFailures);
        }
        let r = self.authenticate(user, pass, loopback);
        if r.is_err() {
            self.failures.lock().record_failure(source, now);
        }
        r
    }

    /// Checks a password (and the guest loopback rule) without counting failures.
    pub fn authenticate(&self, user: &str, pass: &str, loopback: bool) -> Result<(), AuthError> {
        let st = self.inner.read();
        match st.users.get(user) {
            Some(u) if u.password.verify(pass) => {
                if u.name == "guest" && !loopback {
                    Err(AuthError::LoopbackOnly(u.name.clone()))
                } else {
                    Ok(())
                }
            }
            _ => Err(AuthError::BadCredentials),
        }
    }

    pub fn vhost_exists(&self, vhost: &str) -> bool {
        self.inner.read().vhosts.contains_key(vhost)
    }

    /// Vhost names, sorted.
    pub fn vhosts(&self) -> Vec<String> {
        self.inner.read().vhosts.keys().cloned().collect()
    }

    /// Vhosts with their metadata, sorted by name.
    /// The description and tags of one vhost.
    pub fn vhost_meta(&self, vhost: &str) -> Option<VhostMeta> {
        self.inner.read().vhosts.get(vhost).cloned()
    }

    pub fn vhosts_meta(&self) -> Vec<(String, VhostMeta)> {
        let st = self.inner.read();
        st.vhosts
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Every (user, vhost, permissions), ordered by user then vhost.
    pub fn permission_entries(&self) -> Vec<(String, String, Arc<Permissions>)> {
        self.inner
            .read()
            .perms
            .iter()
            .map(|((u, v), p)| (u.clone(), v.clone(), p.clone()))
            .collect()
    }

    pub fn permissions(&self, user: &str, vhost: &str) -> Option<Arc<Permissions>> {
        self.inner
            .read()
            .perms
            .get(&(user.to_owned(), vhost.to_owned()))
            .cloned()
    }

    pub fn user(&self, name: &str) -> Option<User> {
        self.inner.read().users.get(name).cloned()
    }

    /// Users, sorted by name.
    pub fn users(&self) -> Vec<User> {
        self.inner.read().users.values().cloned().collect()
    }

    /// Every (user, vhost, permissions), sorted by user then vhost.
    pub fn all_permissions(&self) -> Vec<(String, String, PermissionSpec)> {
        self.inner
            .read()
            .perms
            .iter()
            .map(|((u, v), p)| (u.clone(), v.clone(), p.spec.clone()))
            .collect()
    }

    // === mutation (validation is the caller's job: see crate::definitions) ===

    /// Adds a vhost or updates its metadata; returns true if it is new.
    pub fn put_vhost(&self, name: &str, meta: VhostMeta) -> bool {
        self.inner
            .write()
            .vhosts
            .insert(name.to_owned(), meta)
            .is_none()
    }

    /// Removes a vhost and every permission on it; returns false if it did not exist.
    pub fn remove_vhost(&self, name: &str) -> bool {
        let mut st = self.inner.write();
        st.perms.retain(|(_, v), _| v != name);
        st.vhosts.remove(name).is_some()
    }

    /// Adds or replaces a user; returns true if it is new.
    pub fn put_user(&self, user: User) -> bool {
        self.inner
            .write()
            .users
            .insert(user.name.clone(), user)
            .is_none()
    }

    /// Changes a user with `f`; returns false if there is no such user.
    pub fn update_user(&self, name: &str, f: impl FnOnce(&mut User)) -> bool {
        match self.inner.write().users.get_mut(name) {
            Some(u) => {
                f(u);
                true
            }
            None => false,
        }
    }

    /// Removes a user and their permissions; returns false if it did not exist.
    pub fn remove_user(&self, name: &str) -> bool {
        let mut st = self.inner.write();
        st.perms.retain(|(u, _), _| u != name);
        st.users.remove(name).is_some()
    }

    pub fn put_permissions(&self, user: &str, vhost: &str, spec: PermissionSpec) {
        self.inner.write().perms.insert(
            (user.to_owned(), vhost.to_owned()),
            Arc::new(Permissions::compile(spec)),
        );
    }

    /// Returns false if there were none.
    pub fn remove_permissions(&self, user: &str, vhost: &str) -> bool {
        self.inner
            .write()
            .perms
            .remove(&(user.to_owned(), vhost.to_owned()))
            .is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guest_db() -> AuthDb {
        let db = AuthDb::new();
        db.put_vhost("/", VhostMeta::default());
        db.put_user(User {
            name: "guest".into(),
            password: PasswordHash::new("guest"),
            tags: vec!["administrator".into()],
        });
        db.put_permissions("guest", "/", PermissionSpec::all());
        db
    }

    #[test]
    fn guest_only_from_loopback_and_wrong_password_refused() {
        let db = guest_db();
        assert_eq!(db.authenticate("guest", "guest", true), Ok(()));
        assert_eq!(
            db.authenticate("guest", "guest", false),
            Err(AuthError::LoopbackOnly("guest".into()))
        );
        assert_eq!(
            db.authenticate("guest", "nope", true),
            Err(AuthError::BadCredentials)
        );
        assert_eq!(
            db.authenticate("nobody", "guest", true),
            Err(AuthError::BadCredentials)
        );
        let p = db.permissions("guest", "/").expect("perms");
        assert!(p.configure.allows("anything"));
        assert!(db.permissions("guest", "other").is_none());
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn failure_limit_blocks_a_source_for_the_window() {
        let t0 = Instant::now();
        let mut l = FailureLimiter::new(3);
        let (a, b) = (ip("203.0.113.7"), ip("203.0.113.8"));
        for _ in 0..2 {
            assert!(l.allows(a, t0));
            l.record_failure(a, t0);
        }
        assert!(l.allows(a, t0));
        l.record_failure(a, t0 + Duration::from_secs(10));
        // Third failure within 60 s: refused from then on, for 60 s.
        assert!(!l.allows(a, t0 + Duration::from_secs(10)));
        assert!(!l.allows(a, t0 + Duration::from_secs(69)));
        assert!(l.allows(a, t0 + Duration::from_secs(70)));
        // Other sources are not affected; a mapped address is the same source.
        assert!(l.allows(b, t0 + Duration::from_secs(10)));
        assert!(!l.allows(ip("::ffff:203.0.113.7"), t0 + Duration::from_secs(10)));
        // After the block, counting starts over.
        l.record_failure(a, t0 + Duration::from_secs(70));
        assert!(l.allows(a, t0 + Duration::from_secs(70)));
    }

    #[test]
    fn failures_spread_over_more_than_the_window_do_not_block() {
        let t0 = Instant::now();
        let mut l = FailureLimiter::new(2);
        let a = ip("2001:db8::1");
        l.record_failure(a, t0);
        l.record_failure(a, t0 + Duration::from_secs(61));
        assert!(l.allows(a, t0 + Duration::from_secs(61)));
        l.record_failure(a, t0 + Duration::from_secs(62));
        assert!(!l.allows(a, t0 + Duration::from_secs(62)));
    }

    #[test]
    fn failure_limit_off_counts_nothing() {
        let t0 = Instant::now();
        let mut l = FailureLimiter::new(0);
        for _ in 0..100 {
            l.record_failure(ip("10.0.0.1"), t0);
        }
        assert!(l.allows(ip("10.0.0.1"), t0));
        assert!(l.is_empty());
    }

    #[test]
    fn failure_table_is_bounded() {
        let t0 = Instant::now();
        let mut l = FailureLimiter::new(1);
        let first = ip("10.0.0.0");
        l.record_failure(first, t0);
        assert!(!l.allows(first, t0));
        for i in 1..(FAILURE_TABLE_CAP as u32 + 500) {
            let t = t0 + Duration::from_millis(u64::from(i));
            l.record_failure(IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i)), t);
            assert!(l.len() <= FAILURE_TABLE_CAP);
        }
        assert_eq!(l.len(), FAILURE_TABLE_CAP);
        // The oldest source was evicted: forgotten, never blocked by it.
        assert!(l.allows(first, t0 + Duration::from_secs(1)));
        // Stale entries go before live ones.
        let later = t0 + Duration::from_secs(3600);
        l.record_failure(ip("192.0.2.1"), later);
        assert_eq!(l.len(), 1);
    }

    #[test]
    fn login_refuses_without_checking_the_password_once_over_the_limit() {
        let db = guest_db();
        db.set_failure_limit(2);
        let now = Instant::now();
        let src = ip("203.0.113.7");
        assert_eq!(
            db.login("guest", "nope", src, true, now),
            Err(AuthError::BadCredentials)
        );
        assert_eq!(
            db.login("guest", "nope", src, true, now),
            Err(AuthError::BadCredentials)
        );
        assert_eq!(
            db.login("guest", "guest", src, true, now),
            Err(AuthError::TooManyFailures)
        );
        assert_eq!(
            db.login("guest", "guest", ip("127.0.0.1"), true, now),
            Ok(())
        );
        assert_eq!(
            db.login("guest", "guest", src, true, now + FAILURE_WINDOW),
            Ok(())
        );
    }

    #[test]
    fn loopback_includes_mapped_addresses() {
        assert!(is_loopback(ip("127.0.0.1")));
        assert!(is_loopback(ip("127.1.2.3")));
        assert!(is_loopback(ip("::1")));
        assert!(is_loopback(ip("::ffff:127.0.0.1")));
        assert!(!is_loopback(ip("::ffff:10.0.0.1")));
        assert!(!is_loopback(ip("203.0.113.7")));
    }

    #[test]
    fn empty_pattern_grants_nothing() {
        assert!(!Pattern::new("").allows("x"));
        assert!(Pattern::new("^a").allows("abc"));
        assert!(!Pattern::new("^a").allows("bac"));
    }

    #[test]
    fn rabbitmq_sha256_hash_layout_and_verification() {
        // Known answer: salt 0x01020304, password "guest".
        let h = PasswordHash::with_salt(HashAlgorithm::Sha256, [1, 2, 3, 4], "guest");
        let raw = base64::engine::general_purpose::STANDARD
            .decode(&h.hash)
            .expect("base64");
        assert_eq!(&raw[..4], &[1, 2, 3, 4]);
        let mut d = Sha256::new();
        d.update([1u8, 2, 3, 4]);
        d.update(b"guest");
        assert_eq!(&raw[4..], d.finalize().as_slice());
        assert!(h.verify("guest"));
        assert!(!h.verify("guest2"));
        assert!(!h.verify(""));
        // Two hashes of one password differ by salt, both verify.
        let (a, b) = (PasswordHash::new("p"), PasswordHash::new("p"));
        assert!(a.verify("p") && b.verify("p"));
    }

    #[test]
    fn hash_exported_by_rabbitmq_verifies() {
        // From a RabbitMQ 3.10 export (user alice, password s3cret-pass).
        let h = PasswordHash::from_stored(
            HashAlgorithm::Sha256,
            "MC68HMFH5MNJAeAhK/c1KFfs8ECViZH3Be1dxghTai8QMZhp",
        )
        .expect("valid");
        assert!(h.verify("s3cret-pass"));
        assert!(!h.verify("s3cret-pas"));
    }

    #[test]
    fn sha512_and_bad_stored_hashes() {
        let h = PasswordHash::with_salt(HashAlgorithm::Sha512, [9, 9, 9, 9], "x");
        assert!(h.verify("x"));
        PasswordHash::from_stored(HashAlgorithm::Sha512, &h.hash).expect("valid");
        assert!(PasswordHash::from_stored(HashAlgorithm::Sha256, &h.hash).is_err());
        assert!(PasswordHash::from_stored(HashAlgorithm::Sha256, "!!notbase64").is_err());
        let empty = PasswordHash::from_stored(HashAlgorithm::Sha256, "").expect("empty ok");
        assert!(!empty.verify(""));
    }

    #[test]
    fn deleting_a_user_or_vhost_drops_its_permissions() {
        let db = guest_db();
        db.put_vhost("v", VhostMeta::default());
        db.put_permissions("guest", "v", PermissionSpec::all());
        assert!(db.remove_vhost("v"));
        assert!(db.permissions("guest", "v").is_none());
        assert!(!db.remove_vhost("v"));
        assert!(db.remove_user("guest"));
        assert!(db.permissions("guest", "/").is_none());
    }
}
