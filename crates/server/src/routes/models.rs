//! `GET /v1/models`: the one served model.
//!
//! Invariant: the listed id is exactly the name requests must use in `model`.

use axum::Json;
use axum::extract::State;

use crate::error::ApiError;
use crate::openai::types::{ModelCard, ModelList};
use crate::openapi::errors::UnavailableErrors;
use crate::state::AppState;

/// Lists the served model.
#[utoipa::path(
    get,
    path = "/v1/models",
    tag = "openai",
    responses(
        (status = 200, description = "The served model", body = ModelList),
        UnavailableErrors,
    )
)]
pub async fn list_models(State(state): State<AppState>) -> Result<Json<ModelList>, ApiError> {
    let loaded = state.loaded()?;
    Ok(Json(ModelList {
        object: "list",
        data: vec![ModelCard {
            id: state.config().model_name.clone(),
            object: "model",
            created: state.created(),
            owned_by: "mpt-serve",
            max_model_len: loaded.engine.model_info().max_model_len,
        }],
    }))
}
