//! The document against the router it describes: every route (read from the router itself) is
//! an operation with the same methods, the security scheme follows `--api-key`, request bodies
//! follow `--allow-unknown-fields`, and every schema is valid JSON Schema 2020-12.

use std::collections::BTreeSet;

use axum::body::Body;
use axum::http::Request;
use serde_json::Value;
use tower::ServiceExt;

use crate::error::ApiError;
use crate::state::{AppState, StateConfig};

fn state(api_key: Option<&str>, allow_unknown_fields: bool) -> AppState {
    AppState::new(StateConfig {
        model_name: "m".into(),
        api_key: api_key.map(str::to_string),
        max_inflight: 4,
        cors_allow_origin: Vec::new(),
        timeouts: Default::default(),
        allow_unknown_fields,
    })
}

const METHODS: [&str; 5] = ["GET", "POST", "PUT", "DELETE", "PATCH"];

/// Sends one request to a fresh router; the status and whether the method-not-allowed
/// fallback answered.
async fn call(state: &AppState, method: &str, path: &str) -> (u16, bool) {
    let request = Request::builder()
        .method(method)
        .uri(path)
        .header("content-type", "application/json")
        .body(Body::from("{}"))
        .expect("request builds");
    let response = crate::app(state.clone())
        .oneshot(request)
        .await
        .expect("infallible");
    let not_allowed = response.extensions().get::<ApiError>() == Some(&ApiError::MethodNotAllowed);
    (response.status().as_u16(), not_allowed)
}

async fn document(state: &AppState) -> Value {
    let request = Request::builder()
        .uri("/openapi.json")
        .body(Body::empty())
        .expect("request builds");
    let response = crate::app(state.clone())
        .oneshot(request)
        .await
        .expect("infallible");
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "application/json");
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .expect("body");
    serde_json::from_slice(&bytes).expect("the document is JSON")
}

/// The paths the router matches, read from its own description of itself (axum's `Debug`
/// lists each route's path; the fallback router's are left out).
fn router_paths(state: &AppState) -> BTreeSet<String> {
    let debug = format!("{:?}", crate::app(state.clone()));
    let routes = debug
        .split("fallback_router")
        .next()
        .expect("split yields one part");
    let mut paths = BTreeSet::new();
    for piece in routes.split("RouteId(").skip(1) {
        if let Some(rest) = piece.split_once("): \"").map(|(_, rest)| rest)
            && let Some((path, _)) = rest.split_once('"')
        {
            paths.insert(path.to_string());
        }
    }
    paths
}

fn operations(doc: &Value) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for method in item.as_object().expect("path item").keys() {
            out.insert((path.clone(), method.to_uppercase()));
        }
    }
    out
}

#[tokio::test]
async fn every_route_of_the_router_is_an_operation_with_its_methods() {
    let state = state(None, false);
    let paths = router_paths(&state);
    // The reading of the router works (it found the routes every server has).
    for known in ["/v1/completions", "/health", "/openapi.json"] {
        assert!(paths.contains(known), "{known} not in {paths:?}");
    }
    let mut routed = BTreeSet::new();
    for path in &paths {
        for method in METHODS {
            let (_, not_allowed) = call(&state, method, path).await;
            if !not_allowed {
                routed.insert((path.clone(), method.to_string()));
            }
        }
    }
    assert_eq!(routed, operations(&document(&state).await));
}

#[tokio::test]
async fn the_bearer_scheme_and_401s_follow_the_api_key() {
    let open = document(&state(None, false)).await;
    assert!(open["components"].get("securitySchemes").is_none());
    let keyed_state = state(Some("k"), false);
    let keyed = document(&keyed_state).await;
    assert_eq!(
        keyed["components"]["securitySchemes"]["bearer"],
        serde_json::json!({"type": "http", "scheme": "bearer",
            "description": "`Authorization: Bearer KEY`, the server's --api-key"})
    );
    for (path, method) in operations(&keyed) {
        let operation = &keyed["paths"][&path][method.to_lowercase()];
        let secured = operation.get("security").is_some();
        assert_eq!(
            secured,
            operation["responses"].get("401").is_some(),
            "{path}"
        );
        let unsecured = &open["paths"][&path][method.to_lowercase()];
        assert!(unsecured.get("security").is_none() && unsecured["responses"].get("401").is_none());
        // Exactly the routes that refuse a request without the key are documented as secured.
        let (status, _) = call(&keyed_state, &method, &path).await;
        assert_eq!(status == 401, secured, "{method} {path} answered {status}");
    }
}

fn request_body_schemas(doc: &Value) -> Vec<Value> {
    let mut out = Vec::new();
    for (path, method) in operations(doc) {
        let body = &doc["paths"][&path][method.to_lowercase()]["requestBody"];
        if let Some(reference) = body["content"]["application/json"]["schema"]["$ref"].as_str() {
            let name = reference.rsplit('/').next().expect("a component name");
            out.push(doc["components"]["schemas"][name].clone());
        }
    }
    out
}

#[tokio::test]
async fn request_bodies_are_closed_unless_unknown_fields_are_allowed() {
    let strict = document(&state(None, false)).await;
    let bodies = request_body_schemas(&strict);
    assert_eq!(bodies.len(), 4, "completions, chat, tokenize, detokenize");
    for body in &bodies {
        assert_eq!(body["additionalProperties"], false, "{body}");
    }
    // The OpenAI fields accepted without being implemented are listed, with what is accepted.
    let chat = &strict["components"]["schemas"]["ChatCompletionRequest"]["properties"];
    assert_eq!(
        chat["modalities"]["enum"],
        serde_json::json!([null, ["text"]])
    );
    assert!(chat["store"].get("enum").is_none());
    let relaxed = document(&state(None, true)).await;
    for body in request_body_schemas(&relaxed) {
        assert!(body.get("additionalProperties").is_none(), "{body}");
    }
}

/// Every `$ref` in `value`.
fn refs<'a>(value: &'a Value, out: &mut Vec<&'a str>) {
    match value {
        Value::Object(map) => {
            if let Some(Value::String(r)) = map.get("$ref") {
                out.push(r);
            }
            map.values().for_each(|v| refs(v, out));
        }
        Value::Array(items) => items.iter().for_each(|v| refs(v, out)),
        _ => {}
    }
}

#[tokio::test]
async fn the_document_is_openapi_3_1_with_valid_schemas() {
    let doc = document(&state(Some("k"), false)).await;
    assert_eq!(doc["openapi"], "3.1.0");
    // The fixed fields OpenAPI 3.1 requires (CI also runs openapi-spec-validator on it).
    assert!(doc["info"]["title"].is_string() && doc["info"]["version"].is_string());
    let mut found = Vec::new();
    refs(&doc, &mut found);
    assert!(!found.is_empty());
    for r in found {
        let pointer = r.strip_prefix('#').expect("local reference");
        assert!(doc.pointer(pointer).is_some(), "{r} does not resolve");
    }
    for (name, schema) in doc["components"]["schemas"].as_object().expect("schemas") {
        if let Err(e) = jsonschema::meta::validate(schema) {
            panic!("{name} is not JSON Schema 2020-12: {e}");
        }
    }
    for (path, method) in operations(&doc) {
        let operation = &doc["paths"][&path][method.to_lowercase()];
        assert!(
            operation["responses"].get("500").is_some(),
            "{path}: a panic is a 500"
        );
        assert!(operation["operationId"].is_string(), "{path}");
        for (status, response) in operation["responses"].as_object().expect("responses") {
            assert!(response["description"].is_string(), "{path} {status}");
            for media_type in response["content"]
                .as_object()
                .into_iter()
                .flatten()
                .map(|c| c.0)
            {
                assert!(
                    media_type.split_once('/').is_some(),
                    "{path} {status} {media_type}"
                );
            }
            if status != "200" {
                let schema = &response["content"]["application/json"]["schema"]["$ref"];
                assert_eq!(schema, "#/components/schemas/ErrorBody", "{path} {status}");
            }
        }
    }
}
