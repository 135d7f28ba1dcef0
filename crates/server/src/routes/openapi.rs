//! `GET /openapi.json`: the OpenAPI document of this server, as configured.
//!
//! Invariant: the body is the document [`crate::app`] built with the router it serves.

use axum::Extension;

use crate::openapi::ApiDocument;
use crate::openapi::errors::InternalErrors;

/// The OpenAPI 3.1 document.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "server",
    responses(
        (status = 200, description = "This document (OpenAPI 3.1)", body = Object, content_type = "application/json"),
        InternalErrors,
    )
)]
pub async fn openapi_json(Extension(document): Extension<ApiDocument>) -> ApiDocument {
    document
}
