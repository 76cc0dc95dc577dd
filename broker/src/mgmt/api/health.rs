//! The health checks about what stopping this node would cost, for pre-stop hooks and rolling
//! restarts (200 `{"status":"ok"}` when it is safe, 503 `{"status":"failed","reason":...}`
//! when it is not):
//! - `GET /api/health/checks/node-is-mirror-sync-critical`: RabbitMQ's check. Failed when a
//!   queue mastered here has a policy that asks for mirrors and none of its in-sync mirrors is
//!   up: its messages are on this node alone. Lists those queues.
//! - `GET /api/health/checks/node-is-quorum-critical`: warren's cluster state (membership,
//!   definitions, placements) is a Raft group; failed when the voters up without this node are
//!   no majority of all voters (a witness is a voter), so stopping it stops every definition
//!   change and promotion. RabbitMQ asks this of its quorum queues; warren has none, and its
//!   metadata is what a majority guards. Says which voters are up.
//!
//! "Up" is this node's view (see [`crate::cluster::status`]). A node that is not clustered is
//! never critical.
//!
//! And the probes RabbitMQ 3.10 answers, with its shapes (200 `{"status":"ok", ...}`, 503
//! `{"status":"failed","reason":...}`):
//! - `GET /api/healthchecks/node[/{node}]`: the node runs (the deprecated check);
//! - `GET /api/health/checks/local-alarms`: no alarm on this node;
//! - `GET /api/health/checks/port-listener/{port}`, `.../protocol-listener/{protocol}`: this
//!   node listens there (protocol names and aliases as RabbitMQ's: `amqp091`, `amqps`,
//!   `management`, ...);
//! - `GET /api/health/checks/virtual-hosts`: every vhost runs (always: a warren vhost has no
//!   process of its own that could be down);
//! - `GET /api/health/checks/certificate-expiration/{within}/{days|weeks|months|years}`: no
//!   certificate of a TLS listener expires within that time (read from the PEM files named
//!   in the config, as RabbitMQ reads its `certfile`).

use super::{ok as ok_json, R};
use crate::cluster::status::{self, Quorum};
use crate::mgmt::json_resp;
use crate::BrokerShared;
use hyper::StatusCode;
use serde_json::{json, Value};

fn failed(body: Value) -> R {
    Ok(json_resp(StatusCode::SERVICE_UNAVAILABLE, &body))
}

fn ok() -> R {
    Ok(json_resp(StatusCode::OK, &json!({"status": "ok"})))
}

/// GET /api/health/checks/node-is-mirror-sync-critical.
pub(super) fn mirror_sync_critical(shared: &BrokerShared) -> R {
    let Some(link) = shared.cluster() else {
        return ok();
    };
    let queues = status::unprotected_masters(shared, link);
    if queues.is_empty() {
        return ok();
    }
    let list: Vec<Value> = queues
        .iter()
        .map(|q| {
            json!({
                "name": q.name,
                "virtual_host": q.vhost,
                "readable_name": format!("queue '{}' in vhost '{}'", q.name, q.vhost),
                "type": "classic",
                "node": link.node_name(),
                "mirrors": q.mirrors,
                "synchronised_mirrors": q.in_sync,
            })
        })
        .collect();
    failed(json!({
        "status": "failed",
        "reason": format!(
            "There are classic mirrored queues without online synchronised mirrors: {} \
             queue(s) mastered on {} would lose their messages if it stopped",
            list.len(),
            link.node_name()
        ),
        "queues": list,
    }))
}

/// GET /api/health/checks/node-is-quorum-critical.
pub(super) fn quorum_critical(shared: &BrokerShared) -> R {
    let Some(link) = shared.cluster() else {
        return Ok(json_resp(
            StatusCode::OK,
            &json!({"status": "ok", "reason": "single node cluster"}),
        ));
    };
    let q = Quorum::of(link.node_name(), &link.members());
    if !q.critical() {
        return ok();
    }
    let left = q.online.len().saturating_sub(1);
    let mut reason = format!(
        "stopping {} would leave {left} of the cluster's {} voters up, not a majority \
         (voters up now: {}; voters: {})",
        link.node_name(),
        q.voters.len(),
        q.online.join(", "),
        q.voters.join(", ")
    );
    if q.voters.len() == 2 {
        reason.push_str(
            "; a two-voter cluster has no majority without either node: add a witness \
             (warren-broker --witness)",
        );
    }
    failed(json!({
        "status": "failed",
        "reason": reason,
        "voters": q.voters,
        "online": q.online,
        "queues": [],
    }))
}

/// GET /api/healthchecks/node[/{node}]: this node answers, so it runs; another node is 404
/// unless it is a member (then it is asked through its own API by the caller, not here).
pub(super) fn node_check(shared: &BrokerShared, node: Option<&str>) -> R {
    let known = match node {
        None => true,
        Some(n) if n == shared.config.node_name => true,
        Some(n) => shared
            .cluster()
            .is_some_and(|c| c.members().iter().any(|m| m.name == n && m.running)),
    };
    if !known {
        return Err(crate::mgmt::ApiError::NotFound);
    }
    ok()
}

/// GET /api/health/checks/local-alarms.
pub(super) fn local_alarms(shared: &BrokerShared) -> R {
    let a = shared.node.alarms.state();
    let node = &shared.config.node_name;
    let mut alarms = Vec::new();
    if a.memory {
        alarms.push(json!({"node": node, "resource": "memory"}));
    }
    if a.disk {
        alarms.push(json!({"node": node, "resource": "disk"}));
    }
    if alarms.is_empty() {
        return ok();
    }
    failed(json!({
        "status": "failed",
        "reason": "There are alarms in effect on the node",
        "alarms": alarms,
    }))
}

/// GET /api/health/checks/port-listener/{port}.
pub(super) fn port_listener(shared: &BrokerShared, port: &str) -> R {
    let Ok(port) = port.parse::<u16>() else {
        return Err(crate::mgmt::ApiError::bad("Invalid port"));
    };
    let ports: Vec<u16> = shared.listeners.iter().map(|(_, a)| a.port()).collect();
    if ports.contains(&port) {
        return ok_json(json!({"status": "ok", "port": port}));
    }
    failed(json!({
        "status": "failed",
        "reason": "No active listener",
        "missing": port,
        "ports": ports,
    }))
}

/// RabbitMQ's protocol name aliases (`normalize_protocol`), lowercased.
pub(super) fn normalize_protocol(p: &str) -> String {
    let p = p.to_lowercase();
    let n = match p.as_str() {
        "amqp091" | "amqp0.9.1" | "amqp0-9-1" | "amqp0_9_1" | "amqp10" | "amqp1.0" | "amqp1-0"
        | "amqp1_0" => "amqp",
        "amqps" => "amqp/ssl",
        "http1" | "http1.1" | "http_api" | "management" | "management_ui" | "ui" => "http",
        "cli" | "distribution" => "clustering",
        "prometheus" => "http/prometheus",
        other => other,
    };
    n.to_owned()
}

/// GET /api/health/checks/protocol-listener/{protocol}.
pub(super) fn protocol_listener(shared: &BrokerShared, proto: &str) -> R {
    let want = normalize_protocol(proto);
    let mut protocols: Vec<&str> = shared.listeners.iter().map(|(p, _)| *p).collect();
    protocols.dedup();
    if protocols.contains(&want.as_str()) {
        return ok_json(json!({"status": "ok", "protocol": want}));
    }
    failed(json!({
        "status": "failed",
        "reason": "No active listener",
        "missing": want,
        "protocols": protocols,
    }))
}

/// GET /api/health/checks/virtual-hosts.
pub(super) fn virtual_hosts() -> R {
    ok()
}

const DAY_SECS: f64 = 86400.0;

/// RabbitMQ's conversion of `{within}/{unit}` to seconds, or its 400 reason.
pub(super) fn expiration_window(within: &str, unit: &str) -> Result<f64, &'static str> {
    let n: i64 = within.parse().map_err(|_| "Invalid expiration value.")?;
    let per = match unit.to_lowercase().as_str() {
        "days" => DAY_SECS,
        "weeks" => DAY_SECS * 7.0,
        "months" => DAY_SECS * 365.0 / 12.0,
        "years" => DAY_SECS * 365.0,
        _ => return Err("Time unit not recognised. Supported units: days, weeks, months, years."),
    };
    Ok(n as f64 * per)
}

/// GET /api/health/checks/certificate-expiration/{within}/{unit}.
pub(super) fn certificate_expiration(shared: &BrokerShared, within: &str, unit: &str) -> R {
    let secs = expiration_window(within, unit).map_err(crate::mgmt::ApiError::bad)?;
    let now = crate::stats::epoch_ms() / 1000;
    let deadline = now as f64 + secs;
    let mut expiring = Vec::new();
    if let Some(path) = &shared.config.tls_cert {
        let expiries = std::fs::read(path)
            .map_err(|e| e.to_string())
            .and_then(|pem| cert_expiries(&pem));
        let on = match expiries {
            Err(e) => Some(json!({"error": e})),
            Ok(list) => {
                let soon: Vec<String> = list
                    .into_iter()
                    .filter(|t| (*t as f64) <= deadline)
                    .map(rfc3339)
                    .collect();
                (!soon.is_empty()).then(|| json!(soon))
            }
        };
        if let Some(on) = on {
            for (_, a) in shared.listeners.iter().filter(|(p, _)| *p == "amqp/ssl") {
                expiring.push(json!({
                    "node": shared.config.node_name,
                    "protocol": "amqp/ssl",
                    "interface": a.ip().to_string(),
                    "port": a.port(),
                    "certfile": path.display().to_string(),
                    "cacertfile": Value::Null,
                    "certfile_expires_on": on,
                    "cacertfile_expires_on": [],
                }));
            }
        }
    }
    if expiring.is_empty() {
        return ok();
    }
    failed(json!({
        "status": "failed",
        "reason": "Certificates expiring",
        "expired": expiring,
    }))
}

/// The notAfter of each certificate in a PEM file, Unix seconds.
fn cert_expiries(pem: &[u8]) -> Result<Vec<i64>, String> {
    let mut out = Vec::new();
    for c in rustls_pemfile::certs(&mut &pem[..]) {
        let der = c.map_err(|e| format!("cannot read the certificate file: {e}"))?;
        out.push(not_after(&der).ok_or("cannot read the certificate's validity")?);
    }
    Ok(out)
}

/// One DER element at the start of `b`: (tag, contents, rest).
fn der(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, b) = b.split_first()?;
    let (&l0, mut b) = b.split_first()?;
    let len = if l0 < 0x80 {
        usize::from(l0)
    } else {
        let n = usize::from(l0 & 0x7f);
        if n == 0 || n > 4 || b.len() < n {
            return None;
        }
        let (lb, rest) = b.split_at(n);
        b = rest;
        lb.iter().fold(0usize, |a, x| (a << 8) | usize::from(*x))
    };
    if b.len() < len {
        return None;
    }
    let (body, rest) = b.split_at(len);
    Some((tag, body, rest))
}

/// A certificate's notAfter (Unix seconds): Certificate -> tbsCertificate -> [version],
/// serialNumber, signature, issuer, validity { notBefore, notAfter }.
pub(super) fn not_after(cert: &[u8]) -> Option<i64> {
    let (_, cert, _) = der(cert)?;
    let (_, tbs, _) = der(cert)?;
    let mut rest = tbs;
    let (tag, _, r) = der(rest)?;
    if tag == 0xa0 {
        rest = r; // explicit version
    }
    for _ in 0..3 {
        rest = der(rest)?.2; // serial, signature algorithm, issuer
    }
    let (_, validity, _) = der(rest)?;
    let (_, _, after) = der(validity)?;
    let (tag, t, _) = der(after)?;
    let t = std::str::from_utf8(t).ok()?;
    let digits = |s: &str| s.parse::<i64>().ok();
    let (year, rest) = match tag {
        0x17 => {
            // UTCTime: YYMMDDHHMMSSZ, years 1950..2049.
            let yy = digits(t.get(0..2)?)?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, t.get(2..)?)
        }
        0x18 => (digits(t.get(0..4)?)?, t.get(4..)?),
        _ => return None,
    };
    let f = |i: usize| rest.get(i..i + 2).and_then(digits);
    let (mo, d, h, mi, s) = (f(0)?, f(2)?, f(4)?, f(6)?, f(8)?);
    Some(days_from_civil(year, mo, d) * 86400 + h * 3600 + mi * 60 + s)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146097 + doe - 719468
}

/// Unix seconds as `YYYY-MM-DDTHH:MM:SSZ`.
fn rfc3339(t: i64) -> String {
    let (days, secs) = (t.div_euclid(86400), t.rem_euclid(86400));
    // Inverse of days_from_civil.
    let z = days + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocol_aliases_like_rabbitmq() {
        assert_eq!(normalize_protocol("AMQP091"), "amqp");
        assert_eq!(normalize_protocol("amqps"), "amqp/ssl");
        assert_eq!(normalize_protocol("management"), "http");
        assert_eq!(normalize_protocol("mqtt"), "mqtt");
    }

    #[test]
    fn expiration_windows_and_errors() {
        assert_eq!(expiration_window("1", "weeks"), Ok(7.0 * 86400.0));
        assert_eq!(expiration_window("2", "Days"), Ok(2.0 * 86400.0));
        assert_eq!(
            expiration_window("x", "days"),
            Err("Invalid expiration value.")
        );
        assert!(expiration_window("1", "fortnights")
            .is_err_and(|e| e.starts_with("Time unit not recognised")));
    }

    #[test]
    fn dates_round_trip() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11017);
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951782400 + 3661), "2000-02-29T01:01:01Z");
    }

    #[test]
    fn reads_not_after_of_a_generated_certificate() {
        let mut params = rcgen::CertificateParams::new(vec!["localhost".into()]).expect("params");
        params.not_after = rcgen::date_time_ymd(2031, 7, 15);
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = params.self_signed(&key).expect("cert");
        let t = not_after(cert.der()).expect("validity");
        assert_eq!(rfc3339(t), "2031-07-15T00:00:00Z");
        let pem = cert.pem();
        assert_eq!(cert_expiries(pem.as_bytes()), Ok(vec![t]));
        assert!(not_after(&cert.der()[..20]).is_none());
    }
}
