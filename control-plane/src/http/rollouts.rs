//! Rollouts through the API: the dry run, which shows the waves a spec makes of the agents it
//! selects now (their order, the hosts in each, and the failure that halts each wave).

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;

use crate::edge::ApiError;
use crate::handles::Handles;
use crate::rollouts::{Plan, RolloutSpec, Target};

/// `POST /api/v1/rollouts/dry-run`.
pub async fn dry_run(
    State(state): State<Handles>,
    Json(spec): Json<RolloutSpec>,
) -> Result<Json<Plan>, ApiError> {
    let rows = state
        .storage
        .list_agents()
        .await
        .map_err(ApiError::internal)?;
    let agents = Target::all(&rows, &state.settings, state.world.now_unix_ms());
    spec.plan(&agents)
        .map(Json)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e))
}
