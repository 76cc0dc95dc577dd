//! What the web UI needs beyond RabbitMQ's API as the `api` module answers it: its three static
//! files, and the sample history of `GET /api/overview?msg_rates_age=N&msg_rates_incr=M`.
//!
//! RabbitMQ's management API adds, when asked with `msg_rates_age` (seconds) and
//! `msg_rates_incr` (seconds between samples), a `samples` list of `{sample, timestamp}` (the
//! counter and its Unix time in ms, newest first) and `avg_rate`/`avg` to each
//! `message_stats.<key>_details`. Its UI, and ours, draw the last minutes from them when the
//! overview opens. The overview document itself is built by `api`; this module adds the samples
//! to the answer from the node's [`Sampler`](crate::stats::Sampler) history, so the UI works the
//! same against RabbitMQ and warren.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Response, StatusCode};
use serde_json::{json, Map, Value};

use super::{full, Req, Resp};
use crate::stats::{Counts, HISTORY_LEN, SAMPLE_INTERVAL};
use crate::BrokerShared;

static INDEX_HTML: &[u8] = include_bytes!("../../ui/index.html");
static APP_JS: &[u8] = include_bytes!("../../ui/app.js");
static STYLE_CSS: &[u8] = include_bytes!("../../ui/style.css");

/// The UI's files, served without authentication (they hold no data).
pub(super) fn asset(method: &Method, path: &str) -> Option<Resp> {
    if method != Method::GET {
        return None;
    }
    let (ctype, body) = match path {
        "/" | "/index.html" => ("text/html; charset=utf-8", INDEX_HTML),
        "/app.js" => ("text/javascript; charset=utf-8", APP_JS),
        "/style.css" => ("text/css; charset=utf-8", STYLE_CSS),
        _ => return None,
    };
    Some(full(StatusCode::OK, ctype, body))
}

/// `msg_rates_age` and `msg_rates_incr` of an overview request, when it asks for samples.
fn wanted(r: &Req) -> Option<(Duration, Duration)> {
    if r.method != Method::GET || r.segs.len() != 1 || r.segs[0] != "overview" {
        return None;
    }
    let secs = |k: &str| r.query.get(k).and_then(|v| v.parse::<u64>().ok());
    let age = secs("msg_rates_age")?;
    // RabbitMQ's default increment is 5 s; at least one sampling interval, at most the age.
    let incr = secs("msg_rates_incr").unwrap_or(5).clamp(1, age.max(1));
    let kept = SAMPLE_INTERVAL.as_secs().max(1) * HISTORY_LEN as u64;
    Some((
        Duration::from_secs(age.min(kept)),
        Duration::from_secs(incr),
    ))
}

/// The answer to an overview request with `msg_rates_age`: the same document with the samples
/// added. Any other request's answer is returned as it is.
pub(super) async fn with_samples(shared: &BrokerShared, r: &Req, resp: Resp) -> Resp {
    let Some((age, incr)) = wanted(r) else {
        return resp;
    };
    if resp.status() != StatusCode::OK {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let Ok(collected) = body.collect().await;
    let bytes = collected.to_bytes();
    let Ok(mut doc) = serde_json::from_slice::<Value>(&bytes) else {
        return Response::from_parts(parts, Full::new(bytes));
    };
    let history = shared.sampler.history(age, incr);
    add_samples(&mut doc, &history);
    let body = serde_json::to_vec(&doc).map(Bytes::from).unwrap_or(bytes);
    let mut resp = Response::from_parts(parts, Full::new(body));
    // The length changed; hyper sets it again from the body.
    resp.headers_mut().remove(hyper::header::CONTENT_LENGTH);
    resp
}

/// The counter behind a `message_stats` key, as the overview reports it.
fn counter(c: &Counts, key: &str) -> Option<u64> {
    Some(match key {
        "publish" => c.publish,
        "confirm" => c.confirm,
        "deliver" => c.deliver,
        "deliver_no_ack" => c.deliver_no_ack,
        "get" => c.get,
        "get_no_ack" => c.get_no_ack,
        "get_empty" => c.get_empty,
        "deliver_get" => c.deliver_get(),
        "ack" => c.ack,
        "redeliver" => c.redeliver,
        "return_unroutable" => c.return_unroutable,
        "drop_unroutable" => c.drop_unroutable,
        _ => return None,
    })
}

/// Adds `samples`, `avg_rate` and `avg` to every `message_stats.<key>_details` whose counter
/// the history holds (`history` newest first).
fn add_samples(doc: &mut Value, history: &[(u64, Counts)]) {
    let Some(stats) = doc.get_mut("message_stats").and_then(Value::as_object_mut) else {
        return;
    };
    let keys: Vec<String> = stats
        .keys()
        .filter(|k| !k.ends_with("_details"))
        .cloned()
        .collect();
    for key in keys {
        let points: Vec<(u64, u64)> = history
            .iter()
            .filter_map(|(t, c)| counter(c, &key).map(|n| (*t, n)))
            .collect();
        if points.len() != history.len() {
            continue;
        }
        let samples: Vec<Value> = points
            .iter()
            .map(|(t, n)| json!({"sample": n, "timestamp": t}))
            .collect();
        let (avg_rate, avg) = match (points.first(), points.last()) {
            (Some(&(t1, n1)), Some(&(t0, n0))) if t1 > t0 => {
                let secs = (t1 - t0) as f64 / 1000.0;
                let rate = n1.saturating_sub(n0) as f64 / secs;
                let mean = points.iter().map(|(_, n)| *n as f64).sum::<f64>() / points.len() as f64;
                ((rate * 10.0).round() / 10.0, mean.round())
            }
            _ => (0.0, points.first().map_or(0.0, |(_, n)| *n as f64)),
        };
        let details = stats
            .entry(format!("{key}_details"))
            .or_insert_with(|| Value::Object(Map::new()));
        if let Some(d) = details.as_object_mut() {
            d.insert("samples".into(), Value::Array(samples));
            d.insert("avg_rate".into(), json!(avg_rate));
            d.insert("avg".into(), json!(avg));
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn samples_go_into_each_details_newest_first_with_the_average_rate() {
        let mut doc = json!({"message_stats": {
            "publish": 50, "publish_details": {"rate": 5.0},
            "deliver_get": 20, "deliver_get_details": {"rate": 2.0},
            "disk_reads": 0, "disk_reads_details": {"rate": 0.0},
        }});
        let at = |t: u64, publish: u64, get: u64| {
            (
                t,
                Counts {
                    publish,
                    get,
                    ..Counts::default()
                },
            )
        };
        let history = [at(20_000, 50, 20), at(15_000, 30, 10), at(10_000, 0, 0)];
        add_samples(&mut doc, &history);
        let p = &doc["message_stats"]["publish_details"];
        assert_eq!(p["rate"], 5.0, "the rate stays");
        assert_eq!(
            p["samples"],
            json!([
                {"sample": 50, "timestamp": 20_000},
                {"sample": 30, "timestamp": 15_000},
                {"sample": 0, "timestamp": 10_000},
            ])
        );
        assert_eq!(p["avg_rate"], 5.0);
        assert_eq!(
            doc["message_stats"]["deliver_get_details"]["samples"][0]["sample"],
            20
        );
        // No counter behind it: left as it was.
        assert!(doc["message_stats"]["disk_reads_details"]
            .get("samples")
            .is_none());
    }

    #[test]
    fn a_document_without_message_stats_is_left_alone() {
        let mut doc = json!({"node": "warren@x"});
        add_samples(&mut doc, &[]);
        assert_eq!(doc, json!({"node": "warren@x"}));
    }
}
