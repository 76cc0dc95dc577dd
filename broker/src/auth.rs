//! Users, vhost names and permissions: the authentication and authorization database.
//!
//! Passwords are kept only as RabbitMQ password hashes (`rabbit_password_hashing_sha256` by
//! default: base64 of a 4-byte random salt followed by `sha256(salt ++ password)`), so a user
//! exported from RabbitMQ logs in here with the same password and the other way round. The
//! database is mutable at run time (management API, definitions import); readers take a short
//! read lock. Persisting changes is the job of [`crate::definitions`].

use base64::Engine as _;
use parking_lot::RwLock;
use regex::Regex;
use sha2::{Digest, Sha256, Sha512};
use std::collections::BTreeMap;
use std::sync::Arc;

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
