//! Users, vhosts and permissions (from the config file for now).

use crate::config::Config;
use regex::Regex;
use std::collections::HashMap;
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

/// configure / write / read permissions of one user on one vhost.
#[derive(Debug, Clone)]
pub struct Permissions {
    pub configure: Pattern,
    pub write: Pattern,
    pub read: Pattern,
}

#[derive(Debug, Clone)]
pub struct User {
    pub name: String,
    password: String,
    pub tags: Vec<String>,
}

/// Authentication and authorization database.
#[derive(Debug, Default)]
pub struct AuthDb {
    users: HashMap<String, User>,
    vhosts: Vec<String>,
    perms: HashMap<(String, String), Arc<Permissions>>,
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
    pub fn from_config(cfg: &Config) -> Self {
        let users = cfg
            .effective_users()
            .into_iter()
            .map(|u| {
                (
                    u.name.clone(),
                    User {
                        name: u.name,
                        password: u.password,
                        tags: u.tags,
                    },
                )
            })
            .collect();
        let perms = cfg
            .effective_permissions()
            .into_iter()
            .map(|p| {
                (
                    (p.user, p.vhost),
                    Arc::new(Permissions {
                        configure: Pattern::new(&p.configure),
                        write: Pattern::new(&p.write),
                        read: Pattern::new(&p.read),
                    }),
                )
            })
            .collect();
        Self {
            users,
            vhosts: cfg.effective_vhosts(),
            perms,
        }
    }

    pub fn authenticate(&self, user: &str, pass: &str, loopback: bool) -> Result<(), AuthError> {
        match self.users.get(user) {
            Some(u) if u.password == pass => {
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
        self.vhosts.iter().any(|v| v == vhost)
    }

    pub fn vhosts(&self) -> &[String] {
        &self.vhosts
    }

    pub fn user(&self, name: &str) -> Option<&User> {
        self.users.get(name)
    }

    /// Every user, by name.
    pub fn users(&self) -> Vec<&User> {
        let mut v: Vec<_> = self.users.values().collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// Every (user, vhost, permissions), ordered.
    pub fn permission_entries(&self) -> Vec<(&str, &str, &Permissions)> {
        let mut v: Vec<_> = self
            .perms
            .iter()
            .map(|((u, vh), p)| (u.as_str(), vh.as_str(), &**p))
            .collect();
        v.sort_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
        v
    }

    pub fn permissions(&self, user: &str, vhost: &str) -> Option<Arc<Permissions>> {
        self.perms
            .get(&(user.to_owned(), vhost.to_owned()))
            .cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_only_from_loopback_and_wrong_password_refused() {
        let db = AuthDb::from_config(&Config::default());
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
}
