//! Metric names (the spec's contract), their descriptions and the Prometheus recorder.
//!
//! Hot-path counters are resolved to handles once (per backend, per listener) and bytes are added
//! per buffer read, batched per connection, so the data path does not touch the registry.

use std::sync::OnceLock;

use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub const CONNECTIONS_TOTAL: &str = "warren_lb_connections_total";
pub const CONNECTIONS_ACTIVE: &str = "warren_lb_connections_active";
pub const BYTES_TOTAL: &str = "warren_lb_bytes_total";
pub const BACKEND_UP: &str = "warren_lb_backend_up";
pub const HEALTH_CHECKS_TOTAL: &str = "warren_lb_health_checks_total";
pub const CONNECT_ERRORS_TOTAL: &str = "warren_lb_connect_errors_total";
pub const REFUSED_TOTAL: &str = "warren_lb_refused_total";
pub const CONNECT_DURATION_SECONDS: &str = "warren_lb_connect_duration_seconds";
pub const CONNECTION_ERRORS_TOTAL: &str = "warren_lb_connection_errors_total";
pub const FAULTS_TOTAL: &str = "warren_lb_faults_total";

pub const L_LISTENER: &str = "listener";
pub const L_BACKEND: &str = "backend";
pub const L_DIRECTION: &str = "direction";
pub const L_RESULT: &str = "result";
pub const L_SOURCE: &str = "source";
pub const L_RULE: &str = "rule";
pub const L_KIND: &str = "kind";

pub const DIR_UPSTREAM: &str = "upstream";
pub const DIR_DOWNSTREAM: &str = "downstream";
pub const RESULT_OK: &str = "ok";
pub const RESULT_FAIL: &str = "fail";

/// Buckets of the connect-duration histogram, seconds.
const CONNECT_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the process-wide Prometheus recorder once and describes every metric.
///
/// Returns `None` if another recorder was installed first (then `/metrics` is empty).
pub fn install() -> Option<PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Full(CONNECT_DURATION_SECONDS.to_string()),
                    CONNECT_BUCKETS,
                )
                .ok()?
                .build_recorder();
            let handle = recorder.handle();
            metrics::set_global_recorder(recorder).ok()?;
            describe();
            Some(handle)
        })
        .clone()
}

fn describe() {
    describe_counter!(CONNECTIONS_TOTAL, "Connections proxied to a backend");
    describe_gauge!(CONNECTIONS_ACTIVE, "Live proxied connections");
    describe_counter!(BYTES_TOTAL, Unit::Bytes, "Payload bytes forwarded");
    describe_gauge!(BACKEND_UP, "1 if the backend is healthy, else 0");
    describe_counter!(HEALTH_CHECKS_TOTAL, "Health checks run, by result");
    describe_counter!(CONNECT_ERRORS_TOTAL, "Failed connects to a backend");
    describe_counter!(
        REFUSED_TOTAL,
        "Connections refused (max_connections or a refuse rule)"
    );
    describe_histogram!(
        CONNECT_DURATION_SECONDS,
        Unit::Seconds,
        "Time to connect to a backend"
    );
    describe_counter!(
        FAULTS_TOTAL,
        "Faults injected, by rule and kind (admin resets: rule=\"admin\")"
    );
    describe_counter!(
        CONNECTION_ERRORS_TOTAL,
        "Proxied connections that ended on an I/O error, by source"
    );
}
