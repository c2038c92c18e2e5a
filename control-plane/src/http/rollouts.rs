//! Rollouts through the API: the dry run, which shows the waves a spec makes of the agents it
//! selects now (their order, the hosts in each, and the failure that halts each wave); the
//! rollout itself (created here, driven by [`crate::rollouts::driver`]), its status, and an
//! operator's controls: pause, resume, approve, abort and retry-failed.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};

use crate::audit::action;
use crate::edge::{ApiError, AuthUser};
use crate::handles::Handles;
use crate::rollouts::driver::{self, Host, Loaded, Rollout};
use crate::rollouts::{Plan, RolloutSpec, Target};

const LIST_MAX: i64 = 200;

/// `POST /api/v1/rollouts/dry-run`.
pub async fn dry_run(
    State(state): State<Handles>,
    Json(spec): Json<RolloutSpec>,
) -> Result<Json<Plan>, ApiError> {
    plan(&state, &spec).await.map(Json)
}

async fn plan(state: &Handles, spec: &RolloutSpec) -> Result<Plan, ApiError> {
    let rows = state
        .storage
        .list_agents()
        .await
        .map_err(ApiError::internal)?;
    let agents = Target::all(&rows, &state.settings, state.world.now_unix_ms());
    spec.plan(&agents)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e))
}

/// A rollout with its hosts and counts by host state.
#[derive(Serialize, schemars::JsonSchema)]
pub struct RolloutView {
    #[serde(flatten)]
    pub rollout: Rollout,
    /// Hosts by state (`pending`, `dispatched`, `ok`, `failed`, …).
    pub counts: std::collections::BTreeMap<String, usize>,
    /// Every host, by wave (left out of the list).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<Host>,
}

fn view(loaded: Loaded, with_hosts: bool) -> RolloutView {
    let mut counts = std::collections::BTreeMap::new();
    for h in &loaded.hosts {
        *counts.entry(driver::name_of(h.state)).or_insert(0) += 1;
    }
    RolloutView {
        rollout: loaded.rollout,
        counts,
        hosts: if with_hosts { loaded.hosts } else { Vec::new() },
    }
}

async fn load(state: &Handles, id: &str) -> Result<Loaded, ApiError> {
    let (row, hosts) = state
        .storage
        .rollout(id)
        .await
        .map_err(ApiError::internal)?
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("no rollout {id}")))?;
    Loaded::from_rows(&row, &hosts).map_err(ApiError::internal)
}

/// `POST /api/v1/rollouts`: plan the spec against the agents now and start it.
pub async fn create(
    State(state): State<Handles>,
    Extension(AuthUser(user)): Extension<AuthUser>,
    Json(spec): Json<RolloutSpec>,
) -> Result<(StatusCode, Json<RolloutView>), ApiError> {
    let plan = plan(&state, &spec).await?;
    let loaded = driver::create(&state.storage, &state.world, spec, plan, &user.name)
        .await
        .map_err(ApiError::internal)?;
    let id = loaded.rollout.id.clone();
    state
        .audit
        .record(
            &user.name,
            action::ROLLOUT_CREATED,
            &id,
            driver::created_detail(&loaded),
        )
        .await;
    tracing::info!(rollout = %id, user = %user.name, hosts = loaded.hosts.len(), "rollout created");
    Ok((StatusCode::CREATED, Json(view(loaded, true))))
}

/// `GET /api/v1/rollouts`: newest first, without their hosts.
pub async fn list(State(state): State<Handles>) -> Result<Json<Vec<RolloutView>>, ApiError> {
    let rows = state
        .storage
        .rollouts(false, LIST_MAX)
        .await
        .map_err(ApiError::internal)?;
    let mut out = Vec::new();
    for row in rows {
        out.push(view(load(&state, &row.id).await?, false));
    }
    Ok(Json(out))
}

/// `GET /api/v1/rollouts/{id}`.
pub async fn show(
    State(state): State<Handles>,
    Path(id): Path<String>,
) -> Result<Json<RolloutView>, ApiError> {
    Ok(Json(view(load(&state, &id).await?, true)))
}

/// The body of `POST /api/v1/rollouts/{id}/abort` (optional).
#[derive(Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AbortBody {
    /// Cancel the hosts' tasks in flight too (default: they run to their end and are
    /// recorded).
    #[serde(default)]
    pub cancel_running: bool,
}

/// `POST /api/v1/rollouts/{id}/{action}`: `pause`, `resume`, `approve`, `abort`,
/// `retry-failed`.
pub async fn control(
    State(state): State<Handles>,
    Extension(AuthUser(user)): Extension<AuthUser>,
    Path((id, what)): Path<(String, String)>,
    body: Option<Json<AbortBody>>,
) -> Result<Json<RolloutView>, ApiError> {
    let cancel_running = body.is_some_and(|Json(b)| b.cancel_running);
    let (loaded, detail) = driver::control(
        &state.storage,
        &state.world,
        &id,
        &what,
        &user.name,
        cancel_running,
    )
    .await
    .map_err(|e| match e {
        driver::ControlError::NotFound => {
            ApiError::new(StatusCode::NOT_FOUND, format!("no rollout {id}"))
        }
        driver::ControlError::NotNow(e) => ApiError::new(StatusCode::CONFLICT, e),
        driver::ControlError::Busy => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the rollout kept changing under this request; try again",
        ),
        driver::ControlError::Storage(e) => ApiError::internal(e),
    })?;
    state
        .audit
        .record(&user.name, action::ROLLOUT_CONTROLLED, &id, detail)
        .await;
    tracing::info!(rollout = %id, user = %user.name, action = %what, "rollout controlled");
    Ok(Json(view(loaded, true)))
}
