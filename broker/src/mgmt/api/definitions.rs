//! Definitions (administrators only):
//! - `GET /api/definitions`: everything, in RabbitMQ's definitions.json shape
//! - `POST /api/definitions`: import, 204 once applied.
//!
//! The export and import themselves are `crate::definitions`.

use super::{admin, def_err, ok, R};
use crate::mgmt::{no_content, ApiError, Req};
use crate::BrokerShared;
use hyper::Method;

/// GET|POST /api/definitions.
pub(super) async fn definitions(shared: &BrokerShared, r: &Req) -> R {
    match r.method {
        Method::GET => {
            admin(r)?;
            let d = shared.export_definitions(crate::definitions::ExportScope::All);
            ok(serde_json::to_value(&d).map_err(|e| ApiError::bad(e.to_string()))?)
        }
        Method::POST => {
            admin(r)?;
            let d = crate::definitions::parse_definitions(&r.body).map_err(def_err)?;
            shared.import_definitions(&d).await.map_err(def_err)?;
            Ok(no_content())
        }
        _ => Err(ApiError::MethodNotAllowed),
    }
}
