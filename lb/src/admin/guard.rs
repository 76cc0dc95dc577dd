//! The checks every admin request passes before a route runs. Pure: a path, headers and "has a
//! body" in, a verdict out.
//!
//! In order:
//! 1. Browsers. A web page can make the browser send requests to the admin API (it sits on
//!    loopback, where the browser runs). `Sec-Fetch-Site: cross-site` and an `Origin` that is not
//!    the admin's own `Host` (or is `null`) get 403: a page cannot install a fault rule or reset
//!    connections, even with a bodiless form POST. Without a token, the `Host` itself must be an
//!    IP literal or `localhost`, so a page that rebinds its own DNS name to 127.0.0.1 (same
//!    origin, so the `Origin` check passes) is refused too.
//! 2. The token, when configured: `Authorization: Bearer <token>`, or HTTP basic auth whose
//!    password is the token (any user name, for `curl -u`). Compared in constant time. 401 with
//!    `WWW-Authenticate: Bearer` otherwise. `GET /healthz` needs no token (health probes).
//! 3. A request with a body must say `Content-Type: application/json` (parameters allowed): 415
//!    otherwise, since `text/plain`, form and missing types are what a cross-site "simple"
//!    request can send without a CORS preflight.
//!
//! Requests without `Origin` and `Sec-Fetch-*` (curl, scripts, probes) pass step 1.

use hyper::header::{HeaderMap, AUTHORIZATION, CONTENT_TYPE, HOST, ORIGIN};
use hyper::StatusCode;

/// Why a request is refused; the message goes into the JSON error body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// 403: a browser request from another origin, or a rebound host name.
    Forbidden(String),
    /// 401: no or wrong token.
    Unauthorized(&'static str),
    /// 415: a body that is not JSON.
    UnsupportedMediaType(String),
}

impl Refusal {
    pub fn status(&self) -> StatusCode {
        match self {
            Refusal::Forbidden(_) => StatusCode::FORBIDDEN,
            Refusal::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Refusal::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
        }
    }

    pub fn message(&self) -> String {
        match self {
            Refusal::Forbidden(m) | Refusal::UnsupportedMediaType(m) => m.clone(),
            Refusal::Unauthorized(m) => (*m).to_string(),
        }
    }
}

/// The path that needs no token.
pub const OPEN_PATH: &str = "/healthz";

/// Runs the three checks of the module doc. `token` is the configured token, if any.
pub fn check(
    path: &str,
    headers: &HeaderMap,
    has_body: bool,
    token: Option<&str>,
) -> Result<(), Refusal> {
    check_browser(headers, token.is_none())?;
    if let Some(token) = token {
        if path != OPEN_PATH {
            check_token(headers, token)?;
        }
    }
    if has_body && !is_json(headers) {
        let got = headers
            .get(CONTENT_TYPE)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
        return Err(Refusal::UnsupportedMediaType(match got {
            Some(t) => format!(
                "request bodies must be Content-Type: application/json, not `{}`",
                crate::backend::addr::shown(&t)
            ),
            None => {
                "request bodies must be Content-Type: application/json (none given)".to_string()
            }
        }));
    }
    Ok(())
}

fn forbidden(m: impl Into<String>) -> Refusal {
    Refusal::Forbidden(m.into())
}

fn check_browser(headers: &HeaderMap, no_token: bool) -> Result<(), Refusal> {
    let site = headers.get("sec-fetch-site").map(|v| v.as_bytes());
    if site.is_some_and(|s| s.eq_ignore_ascii_case(b"cross-site")) {
        return Err(forbidden("cross-site requests are refused"));
    }
    let host = match headers.get(HOST) {
        Some(h) => Some(
            h.to_str()
                .ok()
                .and_then(|h| authority(h, 80))
                .ok_or_else(|| forbidden("malformed Host header"))?,
        ),
        None => None,
    };
    let mut origins = headers.get_all(ORIGIN).iter();
    if let Some(origin) = origins.next() {
        if origins.next().is_some() {
            return Err(forbidden("more than one Origin header"));
        }
        let origin = origin.to_str().unwrap_or("");
        if origin.trim() == "null" {
            return Err(forbidden("requests with Origin: null are refused"));
        }
        let Some(o) = parse_origin(origin) else {
            return Err(forbidden("malformed Origin header"));
        };
        if Some(&o) != host.as_ref() {
            return Err(forbidden(format!(
                "cross-origin request refused: Origin `{}` is not this admin API",
                crate::backend::addr::shown(origin)
            )));
        }
    }
    if no_token {
        if let Some((h, _)) = &host {
            if !is_local_host(h) {
                return Err(forbidden(
                    "without an admin token, the Host must be an IP address or localhost \
                     (a DNS name could be rebound to this machine by a web page)",
                ));
            }
        }
    }
    Ok(())
}

/// (host lowercased, port) of `host[:port]`; IPv6 in brackets; `default_port` without a port.
fn authority(s: &str, default_port: u16) -> Option<(String, u16)> {
    let s = s.trim();
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (h, after) = rest.split_once(']')?;
        h.parse::<std::net::Ipv6Addr>().ok()?;
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':')?),
        };
        (format!("[{}]", h.to_ascii_lowercase()), port)
    } else {
        let (h, p) = match s.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (s, None),
        };
        if h.is_empty() || h.contains([':', '/', '@', ' ']) {
            return None;
        }
        (h.to_ascii_lowercase(), p)
    };
    let port = match port {
        None => default_port,
        Some(p) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => p.parse().ok()?,
        Some(_) => return None,
    };
    Some((host, port))
}

/// `scheme://host[:port]` (a browser's Origin) as (host, port).
fn parse_origin(s: &str) -> Option<(String, u16)> {
    let (scheme, rest) = s.trim().split_once("://")?;
    let default = match scheme.to_ascii_lowercase().as_str() {
        "http" => 80,
        "https" => 443,
        _ => return None,
    };
    authority(rest.strip_suffix('/').unwrap_or(rest), default)
}

/// An IP literal, `localhost` or a name under `.localhost` (which resolvers keep on loopback).
fn is_local_host(host: &str) -> bool {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    bare.parse::<std::net::IpAddr>().is_ok()
        || host == "localhost"
        || host == "localhost."
        || host.ends_with(".localhost")
        || host.ends_with(".localhost.")
}

fn check_token(headers: &HeaderMap, token: &str) -> Result<(), Refusal> {
    let Some(value) = headers.get(AUTHORIZATION) else {
        return Err(Refusal::Unauthorized(
            "this admin API needs a token: Authorization: Bearer <token> (or basic auth with the \
             token as password)",
        ));
    };
    let presented = presented_token(value.as_bytes());
    match presented {
        Some(p) if ct_eq(&p, token.as_bytes()) => Ok(()),
        _ => Err(Refusal::Unauthorized("wrong or malformed admin token")),
    }
}

/// The token in an Authorization value: `Bearer <token>`, or the password of `Basic <base64>`.
fn presented_token(value: &[u8]) -> Option<Vec<u8>> {
    let text = std::str::from_utf8(value).ok()?.trim();
    let (scheme, cred) = text.split_once(' ')?;
    let cred = cred.trim();
    if scheme.eq_ignore_ascii_case("bearer") {
        Some(cred.as_bytes().to_vec())
    } else if scheme.eq_ignore_ascii_case("basic") {
        let raw = base64_decode(cred)?;
        let colon = raw.iter().position(|&b| b == b':')?;
        Some(raw[colon + 1..].to_vec())
    } else {
        None
    }
}

/// Equality whose time depends on the lengths only, never on where the bytes differ.
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= usize::from(x ^ y);
    }
    std::hint::black_box(diff) == 0
}

/// Standard base64 (RFC 4648 alphabet), padding optional; `None` on anything else.
fn base64_decode(s: &str) -> Option<Vec<u8>> {
    fn val(c: u8) -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    }
    let s = s.trim_end_matches('=').as_bytes();
    if s.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    for chunk in s.chunks(4) {
        let mut n = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            n |= val(c)? << (18 - 6 * i);
        }
        let bytes = n.to_be_bytes();
        out.extend_from_slice(&bytes[1..chunk.len()]);
    }
    Some(out)
}

/// `Content-Type: application/json`, parameters (`; charset=utf-8`) allowed.
fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::HeaderValue;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    const T: Option<&str> = Some("s3cret-token");

    #[test]
    fn base64_decodes_rfc4648_vectors() {
        for (enc, dec) in [
            ("", ""),
            ("Zg==", "f"),
            ("Zm8=", "fo"),
            ("Zm9v", "foo"),
            ("Zm9vYg==", "foob"),
            ("Zm9vYmE=", "fooba"),
            ("Zm9vYmFy", "foobar"),
            ("Zm9vYmFy", "foobar"),
            ("Zm9vYg", "foob"),
        ] {
            assert_eq!(base64_decode(enc).as_deref(), Some(dec.as_bytes()), "{enc}");
        }
        assert_eq!(base64_decode("Z"), None);
        assert_eq!(base64_decode("Zm9v!"), None);
        assert_eq!(base64_decode("Zm 9v"), None);
    }

    #[test]
    fn constant_time_equality_is_equality() {
        assert!(ct_eq(b"abc", b"abc"));
        assert!(ct_eq(b"", b""));
        assert!(!ct_eq(b"abc", b"abd"));
        assert!(!ct_eq(b"abc", b"abcd"));
        assert!(!ct_eq(b"abcd", b"abc"));
        assert!(!ct_eq(b"", b"a"));
    }

    #[test]
    fn bearer_and_basic_tokens_are_accepted() {
        let ok = |h: HeaderMap| check("/listeners", &h, false, T);
        assert_eq!(
            ok(headers(&[("authorization", "Bearer s3cret-token")])),
            Ok(())
        );
        assert_eq!(
            ok(headers(&[("authorization", "bearer  s3cret-token ")])),
            Ok(())
        );
        // "anyone:s3cret-token" and ":s3cret-token"
        assert_eq!(
            ok(headers(&[(
                "authorization",
                "Basic YW55b25lOnMzY3JldC10b2tlbg=="
            )])),
            Ok(())
        );
        assert_eq!(
            ok(headers(&[("authorization", "Basic OnMzY3JldC10b2tlbg==")])),
            Ok(())
        );
        for bad in [
            "Bearer s3cret-toke",
            "Bearer s3cret-token2",
            "Bearer",
            "Token s3cret-token",
            "s3cret-token",
            "Basic czNjcmV0LXRva2Vu", // no colon: "s3cret-token" as a user name
            "Basic !!!",
        ] {
            let r = ok(headers(&[("authorization", bad)]));
            assert!(matches!(r, Err(Refusal::Unauthorized(_))), "{bad}: {r:?}");
        }
        assert!(matches!(
            ok(HeaderMap::new()),
            Err(Refusal::Unauthorized(_))
        ));
        // /healthz needs none; without a configured token nothing is asked.
        assert_eq!(check("/healthz", &HeaderMap::new(), false, T), Ok(()));
        assert_eq!(check("/listeners", &HeaderMap::new(), false, None), Ok(()));
    }

    #[test]
    fn origin_must_be_the_admins_own_host() {
        let h = |pairs: &[(&'static str, &str)]| check("/x", &headers(pairs), false, None);
        assert_eq!(h(&[("host", "127.0.0.1:9901")]), Ok(()));
        assert_eq!(
            h(&[
                ("host", "127.0.0.1:9901"),
                ("origin", "http://127.0.0.1:9901")
            ]),
            Ok(())
        );
        assert_eq!(
            h(&[("host", "LOCALHOST"), ("origin", "http://localhost:80")]),
            Ok(())
        );
        assert_eq!(
            h(&[("host", "[::1]:9901"), ("origin", "http://[::1]:9901")]),
            Ok(())
        );
        for (host, origin) in [
            ("127.0.0.1:9901", "http://evil.example"),
            ("127.0.0.1:9901", "http://127.0.0.1:8080"),
            ("127.0.0.1:9901", "https://127.0.0.1:9901:"),
            ("127.0.0.1:9901", "null"),
            ("127.0.0.1:9901", "file://"),
            ("127.0.0.1:9901", "garbage"),
            ("localhost", "https://localhost"),
        ] {
            let r = h(&[("host", host), ("origin", origin)]);
            assert!(matches!(r, Err(Refusal::Forbidden(_))), "{origin}: {r:?}");
        }
        let two = h(&[
            ("host", "127.0.0.1:1"),
            ("origin", "http://127.0.0.1:1"),
            ("origin", "http://127.0.0.1:1"),
        ]);
        assert!(matches!(two, Err(Refusal::Forbidden(_))));
        let r = h(&[("host", "127.0.0.1:1"), ("sec-fetch-site", "cross-site")]);
        assert!(matches!(r, Err(Refusal::Forbidden(_))));
        assert_eq!(
            h(&[("host", "127.0.0.1:1"), ("sec-fetch-site", "same-origin")]),
            Ok(())
        );
    }

    #[test]
    fn without_a_token_the_host_must_be_local() {
        let h = |host: &str, token| check("/x", &headers(&[("host", host)]), false, token);
        for ok in [
            "127.0.0.1:9901",
            "[::1]:1",
            "localhost:9901",
            "a.localhost",
            "10.1.2.3",
        ] {
            assert_eq!(h(ok, None), Ok(()), "{ok}");
        }
        let r = h("rebound.example:9901", None);
        assert!(matches!(r, Err(Refusal::Forbidden(_))), "{r:?}");
        // With a token, names are fine (the token is what protects).
        let with = check(
            "/x",
            &headers(&[
                ("host", "lb-admin.internal:9901"),
                ("authorization", "Bearer s3cret-token"),
            ]),
            false,
            T,
        );
        assert_eq!(with, Ok(()));
        // No Host at all (HTTP/1.0 tools): not a browser.
        assert_eq!(check("/x", &HeaderMap::new(), false, None), Ok(()));
    }

    #[test]
    fn bodies_must_be_json() {
        let b = |ct: Option<&str>| {
            let mut h = headers(&[("host", "127.0.0.1:1")]);
            if let Some(ct) = ct {
                h.insert(CONTENT_TYPE, HeaderValue::from_str(ct).unwrap());
            }
            check("/x", &h, true, None)
        };
        assert_eq!(b(Some("application/json")), Ok(()));
        assert_eq!(b(Some("Application/JSON; charset=utf-8")), Ok(()));
        for bad in [
            Some("text/plain"),
            Some("application/x-www-form-urlencoded"),
            Some("multipart/form-data; boundary=x"),
            Some("application/jsonp"),
            None,
        ] {
            let r = b(bad);
            assert!(
                matches!(r, Err(Refusal::UnsupportedMediaType(_))),
                "{bad:?}"
            );
        }
        // No body, no rule.
        assert_eq!(
            check(
                "/x",
                &headers(&[("content-type", "text/plain")]),
                false,
                None
            ),
            Ok(())
        );
    }
}
