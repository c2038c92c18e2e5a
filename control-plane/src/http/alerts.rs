//! The alerts API: current alerts and their history, the rules with their overrides, and the
//! notification channels (`POST …/{name}/test` sends a test notice at once).

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};

use crate::alerts::channels::{self, Channel, ChannelRequest, ChannelSpec};
use crate::alerts::evaluator::OVERRIDE_KIND;
use crate::alerts::rules::{OVERRIDES_MAX, RULES, RuleOverride, Severity};
use crate::alerts::silences::{self, Silence, SilenceRequest};
use crate::alerts::state::{Alert, Phase};
use crate::alerts::windows::{self, WindowSpec};
use crate::audit::action;
use crate::edge::{ApiError, AuthAgent, AuthUser};
use crate::handles::Handles;
use crate::storage::SpecRow;

const HISTORY_DEFAULT: i64 = 100;
const HISTORY_MAX: i64 = 1000;

#[derive(Serialize, schemars::JsonSchema)]
pub struct AlertView {
    pub key: String,
    pub rule: String,
    pub agent_id: String,
    pub agent: String,
    pub phase: Phase,
    pub severity: Severity,
    pub value: f64,
    pub summary: String,
    /// When the condition began to hold.
    pub since: String,
    pub fired: Option<String>,
    pub resolved: Option<String>,
    /// Transitions whose notice waits (for its group, or a mute).
    pub unsent: usize,
    /// What holds its notices back now (`silence ID` or `window NAME`); `null` when nothing.
    pub muted_by: Option<String>,
}

impl AlertView {
    fn of(a: Alert) -> AlertView {
        AlertView {
            key: a.key(),
            since: crate::time::rfc3339_ms(a.since_ms),
            fired: a.fired_ms.map(crate::time::rfc3339_ms),
            resolved: a.resolved_ms.map(crate::time::rfc3339_ms),
            unsent: a.unsent.len(),
            muted_by: None,
            rule: a.rule,
            agent_id: a.agent_id,
            agent: a.agent,
            phase: a.phase,
            severity: a.severity,
            value: a.value,
            summary: a.summary,
        }
    }
}

#[derive(Serialize, schemars::JsonSchema)]
pub struct HistoryView {
    pub at: String,
    #[serde(flatten)]
    pub alert: AlertView,
}

#[derive(Serialize, schemars::JsonSchema)]
pub struct AlertsView {
    /// Firing first, then pending, then recently resolved; worst severity first.
    pub alerts: Vec<AlertView>,
    /// Transitions, newest first.
    pub history: Vec<HistoryView>,
    /// The replica evaluating the rules (host/pid/…) and until when its lease runs; `null`
    /// before any replica took it.
    pub evaluator: Option<EvaluatorView>,
}

#[derive(Serialize, schemars::JsonSchema)]
pub struct EvaluatorView {
    pub replica: String,
    pub lease_until: String,
    /// `false` when the lease ran out: no replica evaluates now.
    pub live: bool,
}

#[derive(Deserialize, schemars::JsonSchema)]
pub struct AlertsQuery {
    /// Transitions listed, default 100, at most 1000.
    pub history: Option<i64>,
}

/// `GET /api/v1/alerts`
pub async fn list(
    State(state): State<Handles>,
    Query(q): Query<AlertsQuery>,
) -> Result<Json<AlertsView>, ApiError> {
    let limit = q.history.unwrap_or(HISTORY_DEFAULT);
    if !(0..=HISTORY_MAX).contains(&limit) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("history: 0 to {HISTORY_MAX}"),
        ));
    }
    let mut alerts: Vec<Alert> = state
        .storage
        .alerts()
        .await
        .map_err(ApiError::internal)?
        .into_iter()
        .filter_map(|r| serde_json::from_str(&r.data).ok())
        .collect();
    let rank = |p: Phase| match p {
        Phase::Firing => 0,
        Phase::Pending => 1,
        Phase::Resolved => 2,
    };
    alerts.sort_by(|a, b| {
        (
            rank(a.phase),
            std::cmp::Reverse(a.severity),
            &a.rule,
            &a.agent,
        )
            .cmp(&(
                rank(b.phase),
                std::cmp::Reverse(b.severity),
                &b.rule,
                &b.agent,
            ))
    });
    let history = state
        .storage
        .alert_events(limit)
        .await
        .map_err(ApiError::internal)?
        .into_iter()
        .filter_map(|e| {
            Some(HistoryView {
                at: crate::time::rfc3339_ms(e.ts_ms),
                alert: AlertView::of(serde_json::from_str(&e.data).ok()?),
            })
        })
        .collect();
    let now_ms = state.world.now_unix_ms();
    let evaluator = state
        .storage
        .lease(crate::alerts::evaluator::LEASE)
        .await
        .map_err(ApiError::internal)?
        .map(|l| EvaluatorView {
            replica: l.holder,
            lease_until: crate::time::rfc3339_ms(l.expires_ms),
            live: l.expires_ms > now_ms,
        });
    let (silences, windows) = crate::alerts::evaluator::muting(&state, now_ms)
        .await
        .map_err(ApiError::internal)?;
    // Labels matter only to a silence or window; without any, the agents are not read.
    let labels: std::collections::BTreeMap<String, crate::labels::Labels> =
        if silences.is_empty() && windows.is_empty() {
            Default::default()
        } else {
            state
                .storage
                .list_agents()
                .await
                .map_err(ApiError::internal)?
                .into_iter()
                .map(|row| (row.id, crate::labels::of(row.labels.as_deref())))
                .collect()
        };
    let none = crate::labels::Labels::new();
    let alerts = alerts
        .into_iter()
        .map(|a| {
            let muted_by = crate::alerts::evaluator::muted_by(
                &a,
                now_ms,
                labels.get(&a.agent_id).unwrap_or(&none),
                &silences,
                &windows,
            );
            AlertView {
                muted_by,
                ..AlertView::of(a)
            }
        })
        .collect();
    Ok(Json(AlertsView {
        alerts,
        history,
        evaluator,
    }))
}

#[derive(Serialize, schemars::JsonSchema)]
pub struct RuleView {
    pub name: &'static str,
    pub measures: &'static str,
    pub warning: Option<f64>,
    pub critical: Option<f64>,
    pub for_s: u64,
}

#[derive(Serialize, schemars::JsonSchema)]
pub struct RulesView {
    /// The built-in rules with their default thresholds.
    pub rules: Vec<RuleView>,
    /// Admins' changes for some agents, applied in name order.
    pub overrides: Vec<RuleOverride>,
}

/// `GET /api/v1/alert-rules`
pub async fn rules(State(state): State<Handles>) -> Result<Json<RulesView>, ApiError> {
    let overrides = crate::alerts::evaluator::overrides(&state)
        .await
        .map_err(ApiError::internal)?;
    Ok(Json(RulesView {
        rules: RULES
            .iter()
            .map(|r| RuleView {
                name: r.name,
                measures: r.measures,
                warning: r.warning,
                critical: r.critical,
                for_s: r.for_s,
            })
            .collect(),
        overrides,
    }))
}

/// A spec to store through [`store_spec`].
struct NewSpec<'a> {
    kind: &'static str,
    id: String,
    name: &'a str,
    spec: String,
    secret: Option<String>,
    /// Specs of the kind kept at most.
    max: usize,
    what: &'static str,
    audit: &'static str,
}

/// Store a new spec (refused when its kind is full or the name is taken) and audit it with
/// its spec (never the secret); its id.
async fn store_spec(state: &Handles, actor: &str, new: NewSpec<'_>) -> Result<String, ApiError> {
    let existing = state
        .storage
        .specs(new.kind)
        .await
        .map_err(ApiError::internal)?;
    if existing.len() >= new.max {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("at most {} {}s; delete one first", new.max, new.what),
        ));
    }
    let id = new.id;
    let details: serde_json::Value = serde_json::from_str(&new.spec).unwrap_or_default();
    let row = SpecRow {
        kind: new.kind.into(),
        id: id.clone(),
        name: new.name.to_string(),
        spec: new.spec,
        secret: new.secret,
        created_ms: state.world.now_unix_ms(),
    };
    if !state
        .storage
        .create_spec(row)
        .await
        .map_err(ApiError::internal)?
    {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("a {} named {:?} exists", new.what, new.name),
        ));
    }
    state
        .audit
        .record(actor, new.audit, new.name, details)
        .await;
    Ok(id)
}

fn bad(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, message)
}

/// `POST /api/v1/alert-rules`: an override.
pub async fn create_override(
    State(state): State<Handles>,
    Extension(AuthUser(user)): Extension<AuthUser>,
    Json(spec): Json<RuleOverride>,
) -> Result<(StatusCode, Json<RuleOverride>), ApiError> {
    spec.validate().map_err(bad)?;
    let spec = RuleOverride {
        name: spec.name.trim().to_string(),
        ..spec
    };
    let stored = serde_json::to_string(&spec).map_err(ApiError::internal)?;
    store_spec(
        &state,
        &user.name,
        NewSpec {
            kind: OVERRIDE_KIND,
            id: crate::auth::new_id(&state.world, "ar"),
            name: &spec.name,
            spec: stored,
            secret: None,
            max: OVERRIDES_MAX,
            what: "rule override",
            audit: action::ALERT_RULE_CHANGED,
        },
    )
    .await?;
    Ok((StatusCode::CREATED, Json(spec)))
}

/// `DELETE /api/v1/alert-rules/{name}`
pub async fn delete_override(
    State(state): State<Handles>,
    Extension(AuthUser(user)): Extension<AuthUser>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    delete_spec(
        &state,
        &user.name,
        OVERRIDE_KIND,
        &name,
        "rule override",
        action::ALERT_RULE_DELETED,
    )
    .await
}

/// Remove the spec of `kind` called `name` (`what` names it in a refusal) and audit it as
/// `audit`.
async fn delete_spec(
    state: &Handles,
    actor: &str,
    kind: &str,
    name: &str,
    what: &str,
    audit: &str,
) -> Result<StatusCode, ApiError> {
    if !state
        .storage
        .delete_spec(kind, name)
        .await
        .map_err(ApiError::internal)?
    {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no {what} named {name:?}"),
        ));
    }
    state
        .audit
        .record(actor, audit, name, serde_json::json!({}))
        .await;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Serialize, schemars::JsonSchema)]
pub struct ChannelView {
    pub id: String,
    #[serde(flatten)]
    pub spec: ChannelSpec,
}

#[derive(Serialize, schemars::JsonSchema)]
pub struct ChannelCreated {
    #[serde(flatten)]
    pub channel: ChannelView,
    /// The HMAC key made for a webhook posted without one: shown this once.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
}

/// `GET /api/v1/alert-channels` (never a secret).
pub async fn channels(State(state): State<Handles>) -> Result<Json<Vec<ChannelView>>, ApiError> {
    let rows = state
        .storage
        .specs(channels::SPEC_KIND)
        .await
        .map_err(ApiError::internal)?;
    Ok(Json(
        rows.iter()
            .filter_map(Channel::from_row)
            .map(|c| ChannelView {
                id: c.id,
                spec: c.spec,
            })
            .collect(),
    ))
}

/// `POST /api/v1/alert-channels`
pub async fn create_channel(
    State(state): State<Handles>,
    Extension(AuthUser(user)): Extension<AuthUser>,
    Json(request): Json<ChannelRequest>,
) -> Result<(StatusCode, Json<ChannelCreated>), ApiError> {
    let posted_secret = request.secret.is_some();
    let made = hex::encode(state.world.random_bytes::<24>());
    let (spec, secret) = request.into_stored(made).map_err(bad)?;
    let stored = serde_json::to_string(&spec).map_err(ApiError::internal)?;
    let id = store_spec(
        &state,
        &user.name,
        NewSpec {
            kind: channels::SPEC_KIND,
            id: crate::auth::new_id(&state.world, "ch"),
            name: &spec.name,
            spec: stored,
            secret: secret.clone(),
            max: channels::CHANNELS_MAX,
            what: "channel",
            audit: action::ALERT_CHANNEL_CREATED,
        },
    )
    .await?;
    let shown = (spec.kind == channels::Kind::Webhook && !posted_secret)
        .then_some(secret)
        .flatten();
    Ok((
        StatusCode::CREATED,
        Json(ChannelCreated {
            channel: ChannelView { id, spec },
            secret: shown,
        }),
    ))
}

/// `DELETE /api/v1/alert-channels/{name}`: what its outbox still holds is dropped.
pub async fn delete_channel(
    State(state): State<Handles>,
    Extension(AuthUser(user)): Extension<AuthUser>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    delete_spec(
        &state,
        &user.name,
        channels::SPEC_KIND,
        &name,
        "channel",
        action::ALERT_CHANNEL_DELETED,
    )
    .await
}

#[derive(Serialize, schemars::JsonSchema)]
pub struct TestSent {
    pub delivered: bool,
    /// Why it did not arrive.
    pub error: Option<String>,
}

/// `POST /api/v1/alert-channels/{name}/test`: send a test notice now (not through the outbox).
pub async fn test_channel(
    State(state): State<Handles>,
    Extension(AuthUser(user)): Extension<AuthUser>,
    Path(name): Path<String>,
) -> Result<(StatusCode, Json<TestSent>), ApiError> {
    let channel = state
        .storage
        .specs(channels::SPEC_KIND)
        .await
        .map_err(ApiError::internal)?
        .iter()
        .filter(|r| r.name == name)
        .find_map(Channel::from_row)
        .ok_or_else(|| {
            ApiError::new(StatusCode::NOT_FOUND, format!("no channel named {name:?}"))
        })?;
    let result = channel
        .send(
            &state.world,
            &channels::test_notice(state.world.now_unix_ms(), &user.name),
            channels::SEND_TIMEOUT,
        )
        .await;
    let status = if result.is_ok() {
        StatusCode::OK
    } else {
        StatusCode::BAD_GATEWAY
    };
    Ok((
        status,
        Json(TestSent {
            delivered: result.is_ok(),
            error: result.err(),
        }),
    ))
}

/// `GET /api/v1/silences`: those in force and those ended within the last day, ending first.
pub async fn list_silences(State(state): State<Handles>) -> Result<Json<Vec<Silence>>, ApiError> {
    let mut list: Vec<Silence> = state
        .storage
        .specs(silences::SPEC_KIND)
        .await
        .map_err(ApiError::internal)?
        .iter()
        .filter_map(|r| serde_json::from_str(&r.spec).ok())
        .collect();
    list.sort_by_key(|s: &Silence| s.ends_ms);
    Ok(Json(list))
}

async fn create_silence_as(
    state: &Handles,
    actor: String,
    agent: Option<(String, String)>,
    request: SilenceRequest,
) -> Result<(StatusCode, Json<Silence>), ApiError> {
    let id = crate::auth::new_id(&state.world, "sil");
    let silence = request
        .into_silence(id.clone(), state.world.now_unix_ms(), actor.clone(), agent)
        .map_err(bad)?;
    let stored = serde_json::to_string(&silence).map_err(ApiError::internal)?;
    store_spec(
        state,
        &actor,
        NewSpec {
            kind: silences::SPEC_KIND,
            id: id.clone(),
            name: &id,
            spec: stored,
            secret: None,
            max: silences::SILENCES_MAX,
            what: "silence",
            audit: action::SILENCE_CREATED,
        },
    )
    .await?;
    Ok((StatusCode::CREATED, Json(silence)))
}

/// `POST /api/v1/silences`
pub async fn create_silence(
    State(state): State<Handles>,
    Extension(AuthUser(user)): Extension<AuthUser>,
    Json(request): Json<SilenceRequest>,
) -> Result<(StatusCode, Json<Silence>), ApiError> {
    create_silence_as(&state, user.name, None, request).await
}

/// `POST /api/v1/agent/silences`: an agent silences its own alerts (`outpost-agent silence`).
pub async fn agent_silence(
    State(state): State<Handles>,
    Extension(AuthAgent(agent)): Extension<AuthAgent>,
    Json(request): Json<SilenceRequest>,
) -> Result<(StatusCode, Json<Silence>), ApiError> {
    let actor = format!("agent:{}", agent.name);
    create_silence_as(&state, actor, Some((agent.id, agent.name)), request).await
}

/// `DELETE /api/v1/silences/{id}`: end it now.
pub async fn end_silence(
    State(state): State<Handles>,
    Extension(AuthUser(user)): Extension<AuthUser>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    delete_spec(
        &state,
        &user.name,
        silences::SPEC_KIND,
        &id,
        "silence",
        action::SILENCE_ENDED,
    )
    .await
}

#[derive(Serialize, schemars::JsonSchema)]
pub struct WindowView {
    #[serde(flatten)]
    pub spec: WindowSpec,
    /// Open now.
    pub open: bool,
    /// The next five occurrences (the one open now first): `[start, end]`, RFC 3339.
    pub next: Vec<[String; 2]>,
}

/// `GET /api/v1/windows`: every maintenance window with its next five occurrences.
pub async fn list_windows(State(state): State<Handles>) -> Result<Json<Vec<WindowView>>, ApiError> {
    let now_ms = state.world.now_unix_ms();
    let list = crate::alerts::evaluator::windows(&state)
        .await
        .map_err(ApiError::internal)?;
    Ok(Json(
        list.into_iter()
            .map(|w| WindowView {
                open: w.open_at(now_ms).is_some(),
                next: w
                    .next(now_ms, 5)
                    .into_iter()
                    .map(|(a, b)| [crate::time::rfc3339_ms(a), crate::time::rfc3339_ms(b)])
                    .collect(),
                spec: w.spec,
            })
            .collect(),
    ))
}

/// `POST /api/v1/windows`
pub async fn create_window(
    State(state): State<Handles>,
    Extension(AuthUser(user)): Extension<AuthUser>,
    Json(spec): Json<WindowSpec>,
) -> Result<(StatusCode, Json<WindowSpec>), ApiError> {
    let window = spec.check().map_err(bad)?;
    let stored = serde_json::to_string(&window.spec).map_err(ApiError::internal)?;
    store_spec(
        &state,
        &user.name,
        NewSpec {
            kind: windows::SPEC_KIND,
            id: crate::auth::new_id(&state.world, "win"),
            name: &window.spec.name,
            spec: stored,
            secret: None,
            max: windows::WINDOWS_MAX,
            what: "window",
            audit: action::WINDOW_CREATED,
        },
    )
    .await?;
    Ok((StatusCode::CREATED, Json(window.spec)))
}

/// `DELETE /api/v1/windows/{name}`
pub async fn delete_window(
    State(state): State<Handles>,
    Extension(AuthUser(user)): Extension<AuthUser>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    delete_spec(
        &state,
        &user.name,
        windows::SPEC_KIND,
        &name,
        "window",
        action::WINDOW_DELETED,
    )
    .await
}
