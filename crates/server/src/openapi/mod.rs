//! The OpenAPI 3.1 document served at `GET /openapi.json`. Its operations come from the
//! handlers' `#[utoipa::path]` attributes, registered by [`crate::app`] together with their
//! routes (utoipa-axum), and its schemas from the wire types the handlers deserialize and
//! serialize; this module adds what depends on the running configuration.
//!
//! Invariants: every route of the router is an operation of the document, with the methods it
//! answers; the operations behind the API key carry the `bearer` security requirement and a 401
//! exactly when a key is configured; request bodies say `additionalProperties: false` unless
//! the server runs with `--allow-unknown-fields`, and list the OpenAI fields that
//! [`crate::openai::fields`] accepts without implementing them, with the values it accepts.

pub mod errors;

use std::sync::Arc;

use axum::body::Bytes;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde_json::Value;
use utoipa::openapi::path::Operation;
use utoipa::openapi::response::ResponseBuilder;
use utoipa::openapi::schema::{AdditionalProperties, ObjectBuilder, Schema, SchemaType};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{ContentBuilder, OpenApi, Ref, RefOr};
use utoipa::{OpenApi as _, ToSchema};

use crate::error::ErrorBody;
use crate::openai::fields::{Unimplemented, WireRequest};
use crate::openai::schema;
use crate::openai::types::{
    ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest,
};
use crate::state::StateConfig;

/// The name of the bearer security scheme (present only when an API key is configured).
pub const SECURITY_SCHEME: &str = "bearer";

#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "mpt-serve",
        description = "OpenAI-compatible HTTP API of mpt-server, serving MosaicML MPT models. \
            Errors, in JSON responses and inside streams, are always an ErrorBody. Streams \
            (`\"stream\": true`) are server-sent events: each event's `data` is one chunk \
            (CompletionChunk, ChatCompletionChunk) or an ErrorBody, and the last is `[DONE]`."
    ),
    components(schemas(ErrorBody)),
    tags(
        (name = "openai", description = "OpenAI's completions, chat completions and models"),
        (name = "vllm", description = "vLLM's tokenizer endpoints"),
        (name = "server", description = "Probes, metrics and this document; never need the API key"),
    )
)]
struct Base;

/// The document before any route is registered: info, tags and the error schema.
pub fn base() -> OpenApi {
    Base::openapi()
}

fn operations_mut(doc: &mut OpenApi) -> impl Iterator<Item = &mut Operation> {
    doc.paths.paths.values_mut().flat_map(|item| {
        [
            &mut item.get,
            &mut item.put,
            &mut item.post,
            &mut item.delete,
            &mut item.options,
            &mut item.head,
            &mut item.patch,
            &mut item.trace,
        ]
        .into_iter()
        .flatten()
    })
}

fn error_response(description: &str) -> RefOr<utoipa::openapi::Response> {
    let content = ContentBuilder::new()
        .schema(Some(Ref::from_schema_name(ErrorBody::name())))
        .build();
    ResponseBuilder::new()
        .description(description)
        .content("application/json", content)
        .build()
        .into()
}

/// Marks every operation of `doc` (the routes behind the API key) as needing the bearer key,
/// with its 401, when a key is configured.
pub fn protect(doc: &mut OpenApi, api_key: bool) {
    if !api_key {
        return;
    }
    for operation in operations_mut(doc) {
        operation
            .security
            .get_or_insert_with(Vec::new)
            .push(SecurityRequirement::new(
                SECURITY_SCHEME,
                Vec::<String>::new(),
            ));
        operation.responses.responses.insert(
            "401".into(),
            error_response("Missing or wrong API key (`code: invalid_api_key`)."),
        );
    }
    doc.components
        .get_or_insert_with(Default::default)
        .add_security_scheme(
            SECURITY_SCHEME,
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("`Authorization: Bearer KEY`, the server's --api-key"))
                    .build(),
            ),
        );
}

/// Request body types and the OpenAI fields each accepts without declaring them.
fn wire_requests() -> [(String, &'static [(&'static str, Unimplemented)]); 4] {
    fn entry<T: WireRequest + ToSchema>() -> (String, &'static [(&'static str, Unimplemented)]) {
        (T::name().into_owned(), T::UNIMPLEMENTED)
    }
    [
        entry::<CompletionRequest>(),
        entry::<ChatCompletionRequest>(),
        entry::<TokenizeRequest>(),
        entry::<DetokenizeRequest>(),
    ]
}

/// The schema of an OpenAI field accepted without being implemented.
fn unimplemented_schema(treatment: Unimplemented) -> Schema {
    match treatment {
        Unimplemented::NoEffect => schema::any("Accepted with any value; it changes nothing here."),
        Unimplemented::Default(defaults) => {
            let values = std::iter::once(Value::Null).chain(
                defaults
                    .iter()
                    .map(|d| serde_json::from_str(d).expect("defaults are JSON; this is a bug")),
            );
            ObjectBuilder::new()
                .schema_type(SchemaType::AnyValue)
                .enum_values(Some(values))
                .description(Some(
                    "Not implemented: accepted only as null or its default, otherwise a 400.",
                ))
                .into()
        }
    }
}

/// The document as the running server serves it: the security scheme and the request bodies'
/// treatment of unknown fields follow `config`.
pub fn finish(mut doc: OpenApi, config: &StateConfig) -> OpenApi {
    let Some(components) = doc.components.as_mut() else {
        return doc;
    };
    for (name, unimplemented) in wire_requests() {
        let Some(RefOr::T(Schema::Object(schema))) = components.schemas.get_mut(&name) else {
            continue;
        };
        for (field, treatment) in unimplemented {
            schema.properties.insert(
                (*field).to_string(),
                unimplemented_schema(*treatment).into(),
            );
        }
        if !config.allow_unknown_fields {
            schema.additional_properties = Some(Box::new(AdditionalProperties::FreeForm(false)));
        }
    }
    doc
}

/// The serialized document, shared by every request for it.
#[derive(Clone)]
pub struct ApiDocument(Arc<Bytes>);

impl ApiDocument {
    /// Serializes `doc` once.
    pub fn new(doc: &OpenApi) -> Self {
        let json = serde_json::to_vec(doc).expect("the OpenAPI document serializes; this is a bug");
        Self(Arc::new(Bytes::from(json)))
    }

    /// The JSON text.
    pub fn json(&self) -> &[u8] {
        &self.0
    }
}

impl IntoResponse for ApiDocument {
    fn into_response(self) -> Response {
        (
            [(header::CONTENT_TYPE, "application/json")],
            Bytes::clone(&self.0),
        )
            .into_response()
    }
}

#[cfg(test)]
mod tests;
