//! What a backend address may be: its syntax, its resolution, and never warren-lb itself.
//!
//! A backend pointing back at one of warren-lb's own sockets is refused: at one of its listeners it
//! makes a proxy loop (each connection opens another one, until the fds run out), at the admin port
//! it exposes the admin API on a data port. The check runs wherever a backend list enters the
//! process: config validation ([`crate::Config::validate`], IP literals against the configured
//! addresses), `Lb::bind` and reload (every backend resolved, against the bound addresses, so
//! port 0 counts too), and the admin API's `PUT /listeners/{name}/backends`.
//!
//! The syntax and "own address" rules are pure ([`parse`], [`own_match`]); [`resolve`] is the only
//! I/O (DNS, with a timeout).
//!
//! Invariant worth naming: a backend that passes here connects to the address it named; host names
//! are still resolved again at every connect (DNS may change, which this check cannot see).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

/// A backend refused: not valid, not resolvable, or warren-lb itself. Configuration checks
/// report it as `config::ValidationError::BadBackend` (this module does not import `config`,
/// which uses it).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("listener `{listener}`: backend `{addr}` {reason}")]
pub struct BadBackend {
    pub listener: String,
    /// As given, cut to a readable length.
    pub addr: String,
    pub reason: String,
}

/// [`OwnAddr::what`] of the admin API.
const ADMIN: &str = "admin API";

/// How long the resolution of one backend name may take (config load, reload, admin PUT).
pub const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);

/// Longest DNS name (RFC 1035, without the trailing dot).
const MAX_NAME: usize = 253;
/// Longest DNS label.
const MAX_LABEL: usize = 63;

/// A syntactically valid backend address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendAddr {
    /// An IP literal: connected to directly.
    Ip(SocketAddr),
    /// A DNS name and port: resolved at every connect.
    Name { host: String, port: u16 },
}

/// Parses `host:port` / `ip:port` / `[ipv6]:port`; the error says what is wrong (without the
/// address itself, which the caller names).
pub fn parse(s: &str) -> Result<BackendAddr, String> {
    if s.starts_with('[') {
        let sa: SocketAddr = s
            .parse()
            .map_err(|_| "is not a valid [IPv6]:port address".to_string())?;
        return ip_backend(sa);
    }
    let Some((host, port)) = s.rsplit_once(':') else {
        return Err("is not host:port".to_string());
    };
    if host.contains(':') {
        return Err("has an IPv6 address without brackets (write [addr]:port)".to_string());
    }
    let port = parse_port(port)?;
    if host.is_empty() {
        return Err("is not host:port (empty host)".to_string());
    }
    // A last label of digits only is meant as an IPv4 address: it must be a full, valid one
    // (`999.1.1.1`, `127.1` and `010.0.0.1` are refused, not handed to the resolver).
    let last = host.strip_suffix('.').unwrap_or(host).rsplit('.').next();
    if last.is_some_and(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_digit())) {
        let ip: Ipv4Addr = host
            .parse()
            .map_err(|_| format!("has an invalid IPv4 address `{}`", shown(host)))?;
        return ip_backend(SocketAddr::new(IpAddr::V4(ip), port));
    }
    check_dns_name(host)?;
    Ok(BackendAddr::Name {
        host: host.to_string(),
        port,
    })
}

fn ip_backend(sa: SocketAddr) -> Result<BackendAddr, String> {
    if sa.port() == 0 {
        return Err("has port 0 (1..65535)".to_string());
    }
    if sa.ip().to_canonical().is_unspecified() {
        return Err(format!(
            "is the unspecified address {}: not a host to connect to",
            sa.ip()
        ));
    }
    Ok(BackendAddr::Ip(sa))
}

fn parse_port(p: &str) -> Result<u16, String> {
    let bad = || format!("has an invalid port `{}` (1..65535)", shown(p));
    if p.is_empty() || p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    match p.parse::<u32>() {
        Ok(n @ 1..=65535) => u16::try_from(n).map_err(|_| bad()),
        _ => Err(bad()),
    }
}

/// RFC 1035/1123 host name: at most 253 characters, labels of 1..63 `[A-Za-z0-9-]` that neither
/// start nor end with `-`; one trailing dot allowed.
fn check_dns_name(host: &str) -> Result<(), String> {
    let name = host.strip_suffix('.').unwrap_or(host);
    if name.len() > MAX_NAME {
        return Err(format!(
            "has a host name of {} characters (at most {MAX_NAME})",
            name.len()
        ));
    }
    for label in name.split('.') {
        if label.is_empty() {
            return Err("has a host name with an empty label".to_string());
        }
        if label.len() > MAX_LABEL {
            return Err(format!(
                "has a host name label of {} characters (at most {MAX_LABEL})",
                label.len()
            ));
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err(format!(
                "has an invalid host name `{}` (letters, digits, `-` and `.` only)",
                shown(host)
            ));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(format!(
                "has an invalid host name `{}` (a label starts or ends with `-`)",
                shown(host)
            ));
        }
    }
    Ok(())
}

/// `s`, cut to a length fit for an error message (hostile input can be megabytes long).
pub fn shown(s: &str) -> String {
    const MAX: usize = 80;
    if s.chars().count() <= MAX {
        return s.to_string();
    }
    let head: String = s.chars().take(MAX).collect();
    format!("{head}... ({} characters)", s.chars().count())
}

/// One of warren-lb's own sockets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnAddr {
    pub addr: SocketAddr,
    /// For messages: "listener `amqp`" or "admin API".
    pub what: String,
}

impl OwnAddr {
    pub fn listener(name: &str, addr: SocketAddr) -> Self {
        Self {
            addr,
            what: format!("listener `{name}`"),
        }
    }

    pub fn admin(addr: SocketAddr) -> Self {
        Self {
            addr,
            what: ADMIN.to_string(),
        }
    }
}

/// The own socket that a connection to `backend` would reach, if any.
///
/// Same port, and: the same IP; or an own socket bound to the wildcard address (0.0.0.0 / [::])
/// and a backend IP that is loopback, unspecified or, per `is_local`, an address of this machine.
/// A wildcard IPv6 bind is treated as dual-stack and a wildcard IPv4 bind as reachable from `::1`
/// too: refusing a backend that would not loop is cheap, a loop is not. Own sockets on port 0
/// (not bound yet) never match.
pub fn own_match<'a>(
    backend: SocketAddr,
    own: &'a [OwnAddr],
    is_local: &dyn Fn(IpAddr) -> bool,
) -> Option<&'a OwnAddr> {
    let bip = backend.ip().to_canonical();
    own.iter().find(|o| {
        if o.addr.port() == 0 || o.addr.port() != backend.port() {
            return false;
        }
        let oip = o.addr.ip().to_canonical();
        bip == oip
            || bip.is_unspecified()
            || (oip.is_unspecified() && (bip.is_loopback() || is_local(bip)))
    })
}

/// True if `ip` is an address of this machine: binding a UDP socket to it succeeds only then
/// (no packet is sent). Loopback and unspecified addresses are local by definition.
pub fn is_local_ip(ip: IpAddr) -> bool {
    ip.is_loopback()
        || ip.is_unspecified()
        || std::net::UdpSocket::bind(SocketAddr::new(ip, 0)).is_ok()
}

/// The addresses a valid backend connects to: the literal itself, or the name resolved (within
/// [`RESOLVE_TIMEOUT`]). An error is a sentence fragment like those of [`parse`].
pub async fn resolve(addr: &BackendAddr) -> Result<Vec<SocketAddr>, String> {
    match addr {
        BackendAddr::Ip(sa) => Ok(vec![*sa]),
        BackendAddr::Name { host, port } => {
            let lookup = tokio::net::lookup_host((host.as_str(), *port));
            match tokio::time::timeout(RESOLVE_TIMEOUT, lookup).await {
                Err(_) => Err(format!(
                    "does not resolve: no answer within {}",
                    humantime::format_duration(RESOLVE_TIMEOUT)
                )),
                Ok(Err(e)) => Err(format!("does not resolve: {e}")),
                Ok(Ok(it)) => {
                    let v: Vec<SocketAddr> = it.collect();
                    if v.is_empty() {
                        return Err("does not resolve: no addresses".to_string());
                    }
                    Ok(v)
                }
            }
        }
    }
}

/// Refuses `resolved` (an address backend `backend` of `listener` connects to) if it is one of
/// `own`; `via_name` when it came from resolving a name (the message says so).
pub fn check_not_own(
    listener: &str,
    backend: &str,
    resolved: SocketAddr,
    via_name: bool,
    own: &[OwnAddr],
    is_local: &dyn Fn(IpAddr) -> bool,
) -> Result<(), BadBackend> {
    let Some(o) = own_match(resolved, own, is_local) else {
        return Ok(());
    };
    let why = if o.what == ADMIN {
        "it would expose the admin API on a data port"
    } else {
        "it would loop connections back into warren-lb"
    };
    let via = if via_name {
        format!("resolves to {resolved}, which ")
    } else {
        String::new()
    };
    Err(BadBackend {
        listener: listener.to_string(),
        addr: shown(backend),
        reason: format!("{via}is warren-lb's own {} ({}): {why}", o.what, o.addr),
    })
}

/// One backend of a listener and the addresses it resolved to.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub listener: String,
    pub backend: String,
    pub addrs: Vec<SocketAddr>,
    /// An IP literal (no name was resolved).
    pub literal: bool,
}

/// Parses and resolves every backend of `listener` (names concurrently, each within
/// [`RESOLVE_TIMEOUT`]); the first failure in list order is the error.
pub async fn resolve_all(listener: &str, backends: &[String]) -> Result<Vec<Resolved>, BadBackend> {
    let bad = |b: &str, reason: String| BadBackend {
        listener: listener.to_string(),
        addr: shown(b),
        reason,
    };
    let mut parsed = Vec::with_capacity(backends.len());
    for b in backends {
        parsed.push(parse(b).map_err(|r| bad(b, r))?);
    }
    let mut lookups = tokio::task::JoinSet::new();
    for (i, p) in parsed.iter().enumerate() {
        if matches!(p, BackendAddr::Name { .. }) {
            let p = p.clone();
            lookups.spawn(async move { (i, resolve(&p).await) });
        }
    }
    let mut results: Vec<Option<Result<Vec<SocketAddr>, String>>> = vec![None; parsed.len()];
    while let Some(r) = lookups.join_next().await {
        // A lookup task that failed leaves its slot empty: reported below as lost.
        if let Ok((i, r)) = r {
            results[i] = Some(r);
        }
    }
    let mut out = Vec::with_capacity(parsed.len());
    for ((b, p), r) in backends.iter().zip(parsed).zip(results) {
        let (addrs, literal) = match (p, r) {
            (BackendAddr::Ip(sa), _) => (vec![sa], true),
            (BackendAddr::Name { .. }, Some(Ok(v))) => (v, false),
            (BackendAddr::Name { .. }, Some(Err(reason))) => return Err(bad(b, reason)),
            (BackendAddr::Name { .. }, None) => {
                return Err(bad(b, "does not resolve: lookup lost".to_string()))
            }
        };
        out.push(Resolved {
            listener: listener.to_string(),
            backend: b.clone(),
            addrs,
            literal,
        });
    }
    Ok(out)
}

/// Refuses any resolved backend that reaches one of `own` (see [`own_match`]).
pub fn check_resolved(resolved: &[Resolved], own: &[OwnAddr]) -> Result<(), BadBackend> {
    for r in resolved {
        for a in &r.addrs {
            check_not_own(&r.listener, &r.backend, *a, !r.literal, own, &is_local_ip)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_local(_: IpAddr) -> bool {
        false
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn valid_backends_parse() {
        assert_eq!(
            parse("10.0.0.1:5672"),
            Ok(BackendAddr::Ip(sa("10.0.0.1:5672")))
        );
        assert_eq!(parse("[::1]:80"), Ok(BackendAddr::Ip(sa("[::1]:80"))));
        assert_eq!(
            parse("rabbit-1.example.com.:65535"),
            Ok(BackendAddr::Name {
                host: "rabbit-1.example.com.".into(),
                port: 65535
            })
        );
        assert!(matches!(parse("rabbit3:1"), Ok(BackendAddr::Name { .. })));
        assert!(matches!(parse("0x7f:1"), Ok(BackendAddr::Name { .. })));
        let label = "a".repeat(63);
        let name = [label.as_str(); 3].join(".") + ".ab-c"; // 63*3 + 2 + 5 = 196
        assert!(parse(&format!("{name}:1")).is_ok());
    }

    #[test]
    fn invalid_backends_say_why() {
        let e = |s: &str| parse(s).unwrap_err();
        assert_eq!(e("nohost"), "is not host:port");
        assert_eq!(e(":80"), "is not host:port (empty host)");
        assert!(e("999.1.1.1:1").contains("invalid IPv4 address `999.1.1.1`"));
        assert!(e("127.1:1").contains("invalid IPv4"));
        assert!(e("010.0.0.1:1").contains("invalid IPv4"));
        assert!(e("1.2.3.4:0").contains("invalid port `0`"));
        assert!(e("1.2.3.4:65536").contains("invalid port"));
        assert!(e("1.2.3.4:+80").contains("invalid port"));
        assert!(e("host:080000").contains("invalid port"));
        assert!(e("host:").contains("invalid port"));
        assert!(e("[::1]:0").contains("port 0"));
        assert!(e("[::1]").contains("[IPv6]:port"));
        assert!(e("::1:80").contains("without brackets"));
        assert!(e("0.0.0.0:80").contains("unspecified"));
        assert!(e("[::]:80").contains("unspecified"));
        assert!(e("-bad:1").contains("starts or ends with `-`"));
        assert!(e("bad-.x:1").contains("starts or ends with `-`"));
        assert!(e("a..b:1").contains("empty label"));
        assert!(e("host_name:1").contains("letters, digits"));
        assert!(e("with space:1").contains("letters, digits"));
        assert!(e(&format!("{}:1", "a".repeat(64))).contains("label of 64 characters"));
        let long = format!("{}:1", ["abc"; 64].join("."));
        assert!(
            e(&long).contains("host name of 255 characters"),
            "{}",
            e(&long)
        );
    }

    #[test]
    fn a_huge_host_is_refused_and_not_echoed_whole() {
        let host = "a".repeat(5000);
        let err = parse(&format!("{host}:80")).unwrap_err();
        assert!(err.contains("5000 characters"), "{err}");
        let err = parse(&format!("{}:80", "a.".repeat(2500) + "x")).unwrap_err();
        assert!(err.len() < 200, "{err}");
        let odd = "é".repeat(5000) + ":1";
        let err = parse(&odd).unwrap_err();
        assert!(err.len() < 400, "{err}");
    }

    #[test]
    fn own_listener_and_admin_addresses_match() {
        let own = [
            OwnAddr::listener("amqp", sa("127.0.0.1:5672")),
            OwnAddr::listener("wild", sa("0.0.0.0:15672")),
            OwnAddr::listener("wild6", sa("[::]:7000")),
            OwnAddr::admin(sa("127.0.0.1:9901")),
            OwnAddr::listener("unbound", sa("127.0.0.1:0")),
        ];
        let m = |b: &str| own_match(sa(b), &own, &no_local).map(|o| o.what.clone());
        assert_eq!(m("127.0.0.1:5672").as_deref(), Some("listener `amqp`"));
        assert_eq!(
            m("[::ffff:127.0.0.1]:5672").as_deref(),
            Some("listener `amqp`")
        );
        assert_eq!(m("127.0.0.1:9901").as_deref(), Some("admin API"));
        assert_eq!(m("127.0.0.1:15672").as_deref(), Some("listener `wild`"));
        assert_eq!(m("127.9.9.9:15672").as_deref(), Some("listener `wild`"));
        assert_eq!(m("[::1]:7000").as_deref(), Some("listener `wild6`"));
        assert_eq!(m("127.0.0.1:7000").as_deref(), Some("listener `wild6`"));
        assert_eq!(m("0.0.0.0:5672").as_deref(), Some("listener `amqp`"));
        // Not ours: another port, another loopback address for a specific bind, a remote host.
        assert_eq!(m("127.0.0.1:5673"), None);
        assert_eq!(m("127.0.0.2:5672"), None);
        assert_eq!(m("10.0.0.11:15672"), None);
        assert_eq!(m("127.0.0.1:0"), None);
        // A wildcard bind also takes the machine's own addresses.
        let local = |ip: IpAddr| ip == "10.0.0.11".parse::<IpAddr>().unwrap();
        assert!(own_match(sa("10.0.0.11:15672"), &own, &local).is_some());
    }

    #[test]
    fn loopback_is_local_and_a_documentation_address_is_not() {
        assert!(is_local_ip("127.0.0.1".parse().unwrap()));
        assert!(is_local_ip("0.0.0.0".parse().unwrap()));
        assert!(!is_local_ip("192.0.2.1".parse().unwrap()));
    }

    #[tokio::test]
    async fn literals_resolve_to_themselves_and_localhost_resolves() {
        let a = parse("127.0.0.1:1").unwrap();
        assert_eq!(resolve(&a).await, Ok(vec![sa("127.0.0.1:1")]));
        let l = parse("localhost:1").unwrap();
        let got = resolve(&l).await.unwrap();
        assert!(got.iter().all(|a| a.ip().is_loopback()), "{got:?}");
    }
}
