//! `GET /api/openapi.json`: the API description, generated from the router.
//!
//! The paths, methods, path parameters and security come from the route table itself
//! (the route table), so a route cannot exist without appearing here. The request and
//! response bodies and the query parameters are JSON Schemas derived (schemars) from the same
//! types the handlers deserialize and serialize. What a route does is written once, in
//! [`describe`]; `tests/it/api.rs` fails when a route has no description.

use axum::http::Method;
use schemars::generate::SchemaSettings;
use schemars::{JsonSchema, Schema, SchemaGenerator};
use serde_json::{Map, Value, json};

use super::access::{Access, RouteSpec};

type SchemaFn = fn(&mut SchemaGenerator) -> Schema;

fn schema<T: JsonSchema>(generator: &mut SchemaGenerator) -> Schema {
    generator.subschema_for::<T>()
}

/// What one route does, and the types of what it takes and gives.
pub struct Doc {
    pub summary: &'static str,
    pub tag: &'static str,
    /// The JSON body it takes.
    pub request: Option<SchemaFn>,
    /// Its query string, as a struct whose fields are the parameters.
    pub query: Option<SchemaFn>,
    /// The success status and its JSON body (`None`: not JSON, see `content`).
    pub status: u16,
    pub response: Option<SchemaFn>,
    /// Media type of a non-JSON success body, with a description.
    pub content: Option<(&'static str, &'static str)>,
}

const fn doc(summary: &'static str, tag: &'static str) -> Doc {
    Doc {
        summary,
        tag,
        request: None,
        query: None,
        status: 200,
        response: None,
        content: None,
    }
}

impl Doc {
    const fn request(mut self, f: SchemaFn) -> Doc {
        self.request = Some(f);
        self
    }
    const fn query(mut self, f: SchemaFn) -> Doc {
        self.query = Some(f);
        self
    }
    /// 204: success without a body.
    const fn no_content(mut self) -> Doc {
        self.status = 204;
        self
    }
    const fn returns(mut self, status: u16, f: SchemaFn) -> Doc {
        self.status = status;
        self.response = Some(f);
        self
    }
    const fn content(mut self, status: u16, media: &'static str, what: &'static str) -> Doc {
        self.status = status;
        self.content = Some((media, what));
        self
    }
}

/// The description of every route; `None` for a route nobody described (a test failure).
pub fn describe(method: &Method, path: &str) -> Option<Doc> {
    let (method, path) = (method.as_str(), path);
    describe_accounts(method, path)
        .or_else(|| describe_fleet(method, path))
        .or_else(|| describe_alerts(method, path))
        .or_else(|| describe_terminal(method, path))
        .or_else(|| describe_operations(method, path))
}

/// An upgrade to a WebSocket, as the 101 answer says.
const WS: &str = "WebSocket upgrade";

/// Alerts: rules, channels, silences and maintenance windows.
fn describe_alerts(method: &str, path: &str) -> Option<Doc> {
    let d = match (method, path) {
        ("GET", "/api/v1/alerts") => doc(
            "Alerts (firing, pending, recently resolved) and their transitions, newest first",
            "alerts",
        )
        .query(schema::<super::alerts::AlertsQuery>)
        .returns(200, schema::<super::alerts::AlertsView>),
        ("GET", "/api/v1/alert-rules") => doc(
            "The built-in alert rules with their default thresholds, and the overrides in force",
            "alerts",
        )
        .returns(200, schema::<super::alerts::RulesView>),
        ("POST", "/api/v1/alert-rules") => doc(
            "Override a rule's thresholds, `for` duration or whether it runs, for the agents named",
            "alerts",
        )
        .request(schema::<crate::alerts::rules::RuleOverride>)
        .returns(201, schema::<crate::alerts::rules::RuleOverride>),
        ("DELETE", "/api/v1/alert-rules/{name}") => {
            doc("Delete a rule override", "alerts").no_content()
        }
        ("GET", "/api/v1/windows") => doc(
            "Maintenance windows, each with whether it is open and its next five occurrences",
            "alerts",
        )
        .returns(200, schema::<Vec<super::alerts::WindowView>>),
        ("POST", "/api/v1/windows") => doc(
            "Add a maintenance window: a cron start in a time zone and a duration during which the named agents' notices are held back (what still fires at its end is sent then)",
            "alerts",
        )
        .request(schema::<crate::alerts::windows::WindowSpec>)
        .returns(201, schema::<crate::alerts::windows::WindowSpec>),
        ("DELETE", "/api/v1/windows/{name}") => {
            doc("Delete a maintenance window", "alerts").no_content()
        }
        ("GET", "/api/v1/silences") => doc(
            "Silences in force, and those ended within the last day",
            "alerts",
        )
        .returns(200, schema::<Vec<crate::alerts::silences::Silence>>),
        ("POST", "/api/v1/silences") => doc(
            "Hold back the notices of a rule (or all) on some agents (or all) for up to 7 days; evaluation and history go on, and what still fires when it ends is sent then",
            "alerts",
        )
        .request(schema::<crate::alerts::silences::SilenceRequest>)
        .returns(201, schema::<crate::alerts::silences::Silence>),
        ("DELETE", "/api/v1/silences/{id}") => doc("End a silence now", "alerts").no_content(),
        ("POST", "/api/v1/agent/silences") => doc(
            "An agent silences its own alerts (outpost-agent silence); `agents` is not taken",
            "alerts",
        )
        .request(schema::<crate::alerts::silences::SilenceRequest>)
        .returns(201, schema::<crate::alerts::silences::Silence>),
        ("GET", "/api/v1/alert-channels") => doc(
            "Notification channels (never their secrets)",
            "alerts",
        )
        .returns(200, schema::<Vec<super::alerts::ChannelView>>),
        ("POST", "/api/v1/alert-channels") => doc(
            "Add a notification channel: webhook (Alertmanager JSON, HMAC-signed), slack or alertmanager",
            "alerts",
        )
        .request(schema::<crate::alerts::channels::ChannelRequest>)
        .returns(201, schema::<super::alerts::ChannelCreated>),
        ("DELETE", "/api/v1/alert-channels/{name}") => {
            doc("Delete a channel; what its outbox holds is dropped", "alerts").no_content()
        }
        ("POST", "/api/v1/alert-channels/{name}/test") => doc(
            "Send a test notification through a channel now; 502 with the reason when it does not arrive",
            "alerts",
        )
        .returns(200, schema::<super::alerts::TestSent>),
        _ => return None,
    };
    Some(d)
}

/// Login, tokens and users.
fn describe_accounts(method: &str, path: &str) -> Option<Doc> {
    use super::sessions::{LoginRequest, LoginResponse, Me, TokenView};
    let d = match (method, path) {
        ("POST", "/api/v1/sessions") => doc(
            "Log in: an API token, also set as an HttpOnly SameSite=Strict cookie",
            "auth",
        )
        .request(schema::<LoginRequest>)
        .returns(200, schema::<LoginResponse>),
        ("DELETE", "/api/v1/sessions") => doc(
            "Log out: revoke the token this request carries (bearer or cookie) and clear the cookie",
            "auth",
        )
        .no_content(),
        ("GET", "/api/v1/tokens") => doc(
            "Every unexpired login and API token (by id, never the secret), newest first",
            "auth",
        )
        .returns(200, schema::<Vec<TokenView>>),
        ("DELETE", "/api/v1/tokens/{id}") => doc(
            "Revoke a token: it stops working at once on every replica",
            "auth",
        )
        .no_content(),
        ("GET", "/api/v1/users") => doc("Every user with role and state (never a password)", "auth")
            .returns(200, schema::<Vec<super::users::UserView>>),
        ("PATCH", "/api/v1/users/{name}") => doc(
            "Change a user's role, or disable (its tokens are deleted) or enable it; effective at once. The last enabled admin cannot lose the role",
            "auth",
        )
        .request(schema::<super::users::UserPatch>)
        .no_content(),
        ("DELETE", "/api/v1/users/{name}") => {
            doc("Delete a user and its tokens (not the last enabled admin)", "auth").no_content()
        }
        ("GET", "/api/v1/me") => {
            doc("Who the credentials belong to, and their role", "auth").returns(200, schema::<Me>)
        }
        _ => return None,
    };
    Some(d)
}

/// Agents, their tasks and metrics, and the agents' own protocol.
fn describe_fleet(method: &str, path: &str) -> Option<Doc> {
    let d = match (method, path) {
        ("DELETE", "/api/v1/agents/{id}") => doc(
            "Remove an agent: its credential stops working and its channel ends within a heartbeat; its tasks and metrics are deleted",
            "fleet",
        )
        .no_content(),
        ("POST", "/api/v1/agents/{id}/rekey") => doc(
            "A single-use token (1 h) that rotates the agent's credential when its host runs `outpost-agent enroll --force --token`; it keeps its id, tasks and metrics",
            "fleet",
        )
        .returns(201, schema::<super::users::RekeyToken>),
        ("POST", "/api/v1/agents/enroll") => doc(
            "Enroll an agent with a single-use token; returns its credential (retry-safe by enrollment_id)",
            "agent protocol",
        )
        .request(schema::<proto::EnrollRequest>)
        .returns(200, schema::<proto::EnrollResponse>),
        ("GET", "/api/v1/agents") => doc(
            "The fleet: each agent's status, last contact and metrics-buffer health",
            "fleet",
        )
        .returns(200, schema::<Vec<super::agents::AgentView>>),
        ("PUT", "/api/v1/agents/{id}/labels") => doc(
            "Replace an agent's labels (`{}` clears them); selectors everywhere take `KEY=VALUE`",
            "fleet",
        )
        .request(schema::<crate::labels::Labels>)
        .returns(200, schema::<crate::labels::Labels>),
        ("GET", "/api/v1/backups") => doc(
            "Every agent's backup status (pgBackRest and WAL archiving) and the risk it runs, worst first: no_backup, rpo_breached, archive_failing, last_failed, unknown, healthy",
            "backups",
        )
        .query(schema::<super::backups::BackupsQuery>)
        .returns(200, schema::<Vec<super::backups::BackupView>>),
        ("GET", "/api/v1/backup-policies") => doc(
            "Backup policies, with what this replica's last reconcile did on each selected agent",
            "backups",
        )
        .returns(200, schema::<Vec<super::backup_policies::PolicyView>>),
        ("POST", "/api/v1/backup-policies") => doc(
            "Create a backup policy: pgBackRest backups, check, verify and restore drill on cron schedules for the agents it names; the tasks reach each agent when it is connected",
            "backups",
        )
        .request(schema::<crate::backup_policies::PolicySpec>)
        .returns(201, schema::<super::backup_policies::PolicyView>),
        ("POST", "/api/v1/rollouts/dry-run") => doc(
            "The waves a rollout spec makes of the agents it selects now: the hosts in each wave, in order, and the failure that halts each wave and the whole rollout. Nothing runs",
            "rollouts",
        )
        .request(schema::<crate::rollouts::RolloutSpec>)
        .returns(200, schema::<crate::rollouts::Plan>),
        ("POST", "/api/v1/rollouts") => doc(
            "Start a rollout: the spec is planned against the agents now and driven wave by wave, each host running the task once (key rollout:{id}:{agent}); halts when a wave's or the total error budget is spent or a health gate fails",
            "rollouts",
        )
        .request(schema::<crate::rollouts::RolloutSpec>)
        .returns(201, schema::<super::rollouts::RolloutView>),
        ("GET", "/api/v1/rollouts") => doc(
            "Rollouts, newest first, with their state, wave and hosts counted by state",
            "rollouts",
        )
        .returns(200, schema::<Vec<super::rollouts::RolloutView>>),
        ("GET", "/api/v1/rollouts/{id}") => doc(
            "A rollout with every host: its wave, state (pending, dispatched, ok, failed, refused_by_policy, offline, canceled, not_started), task and detail",
            "rollouts",
        )
        .returns(200, schema::<super::rollouts::RolloutView>),
        ("POST", "/api/v1/rollouts/{id}/{action}") => doc(
            "Control a rollout: pause (no host starts; runs in flight go on), resume, approve (after the canary), abort (body {\"cancel_running\": true} also cancels the tasks in flight), retry-failed (failed hosts run again under a new key). 409 when the action does not apply to the rollout's state",
            "rollouts",
        )
        .request(schema::<super::rollouts::AbortBody>)
        .returns(200, schema::<super::rollouts::RolloutView>),
        ("DELETE", "/api/v1/backup-policies/{id}") => {
            doc("Delete a backup policy; its tasks are canceled on the agents", "backups")
                .no_content()
        }
        ("GET", "/api/v1/agents/{id}/tasks") => doc("An agent's tasks, most recently changed first", "tasks")
            .returns(200, schema::<Vec<proto::TaskSnapshot>>),
        ("POST", "/api/v1/agents/{id}/tasks") => doc(
            "Create a task on an agent (the body mirrors `outpost-agent tasks add`); the agent must be online",
            "tasks",
        )
        .request(schema::<proto::TaskRequest>)
        .returns(201, schema::<proto::TaskSnapshot>),
        ("POST", "/api/v1/agents/{id}/tasks/{task_id}/cancel") => {
            doc("Cancel a task (a running one is stopped)", "tasks")
                .returns(200, schema::<proto::TaskSnapshot>)
        }
        ("GET", "/api/v1/agents/{id}/metrics") => doc(
            "Stored metrics of an agent in a time range, oldest first",
            "metrics",
        )
        .query(schema::<super::metrics::ReadQuery>)
        .returns(200, schema::<Vec<super::metrics::MetricView>>),
        ("POST", "/api/v1/agent/metrics") => doc(
            "Deliver a metrics batch (agents; JSON, optionally gzip). Durable before the answer; idempotent on (agent, epoch, seq); 429 with Retry-After when shedding load",
            "agent protocol",
        )
        .request(schema::<proto::MetricsBatch>)
        .returns(200, schema::<proto::MetricsAck>),
        ("GET", "/api/v1/agent/channel") => doc(
            "The agent's control channel: hello/welcome, heartbeats, commands and task events as JSON text frames",
            "agent protocol",
        )
        .content(101, "application/json", WS),
        ("GET", "/api/v1/agent/terminal/{id}") => doc(
            "The agent's reverse socket for one terminal session (agents)",
            "agent protocol",
        )
        .content(101, "application/octet-stream", WS),
        _ => return None,
    };
    Some(d)
}

/// Browser terminals and recordings.
fn describe_terminal(method: &str, path: &str) -> Option<Doc> {
    use crate::terminal::browser::{CreateRequest, CreateResponse, SessionView, WsQuery};
    use crate::terminal::recording::api::{CastQuery, ListQuery, RecordingView, VerifyView};
    let d = match (method, path) {
        ("POST", "/api/v1/terminal/sessions") => doc(
            "Open a psql terminal session on an online agent; 404 unknown agent, 409 offline, 429 limit reached",
            "terminal",
        )
        .request(schema::<CreateRequest>)
        .returns(201, schema::<CreateResponse>),
        ("GET", "/api/v1/terminal/sessions") => doc(
            "The terminal sessions open now, oldest first: an admin sees everyone's, others their own",
            "terminal",
        )
        .returns(200, schema::<Vec<SessionView>>),
        ("GET", "/api/v1/terminal/sessions/{id}") => {
            doc("A terminal session's state", "terminal").returns(200, schema::<SessionView>)
        }
        ("DELETE", "/api/v1/terminal/sessions/{id}") => doc(
            "Close a terminal session (psql is interrupted, then its process group killed)",
            "terminal",
        )
        .returns(200, schema::<SessionView>),
        ("GET", "/api/v1/terminal/sessions/{id}/ws") => doc(
            "The browser's terminal socket: binary frames are terminal bytes both ways; text frames are JSON control (resize from the browser; offset, skipped, state, closed to it). Resumes at ?offset=N",
            "terminal",
        )
        .query(schema::<WsQuery>)
        .content(101, "application/octet-stream", WS),
        ("GET", "/api/v1/terminal/recordings") => doc(
            "Terminal recordings, newest first, by user, agent, start time and words the output showed (each match gives the moment in seconds): admins see all, others their own",
            "terminal",
        )
        .query(schema::<ListQuery>)
        .returns(200, schema::<Vec<RecordingView>>),
        ("GET", "/api/v1/terminal/recordings/{id}") => doc(
            "One terminal recording: who, where, when, its size, its chain's head and what it misses",
            "terminal",
        )
        .returns(200, schema::<RecordingView>),
        ("GET", "/api/v1/terminal/recordings/{id}/cast") => doc(
            "The recording as asciicast v2 (what asciinema plays); ?download=true sends it as a file. Audited as a replay or a download",
            "terminal",
        )
        .query(schema::<CastQuery>)
        .content(200, "application/x-asciicast", "A header line, then one JSON event per line: [seconds, \"o\"|\"i\"|\"r\"|\"m\", data]"),
        ("GET", "/api/v1/terminal/recordings/{id}/verify") => doc(
            "Check the recording's hash chain: each chunk carries the hash of the one before and the head names the last",
            "terminal",
        )
        .returns(200, schema::<VerifyView>),
        _ => return None,
    };
    Some(d)
}

/// The UI's files, health, SSH operations, the audit log, Prometheus and this document.
fn describe_operations(method: &str, path: &str) -> Option<Doc> {
    use super::observe::{AuditParams, AuditView};
    use crate::exec::api::{ExecRequest, RunView, Started};
    let d = match (method, path) {
        ("GET", "/healthz") => doc("Liveness, the storage backend in use and whether the terminal stream store answers", "system")
            .content(200, "application/json", "`{\"status\":\"ok\",\"storage\":\"sqlite|postgres\"}`"),
        ("GET", "/") => doc("The web UI", "ui").content(200, "text/html", "The single page of the UI"),
        ("GET", "/assets/{*path}") => {
            doc("Static files of the web UI", "ui").content(200, "application/octet-stream", "A file")
        }
        ("POST", "/api/v1/exec") => doc(
            "Run one command on hosts of the configured inventory over supervised SSH; poll the run for output",
            "exec",
        )
        .request(schema::<ExecRequest>)
        .returns(202, schema::<Started>),
        ("GET", "/api/v1/exec/{op_id}") => doc(
            "An exec run: each host's outcome and output so far",
            "exec",
        )
        .returns(200, schema::<RunView>),
        ("GET", "/metrics") => doc("The control plane's figures in the Prometheus text format", "system")
            .content(200, "text/plain", "Prometheus exposition format 0.0.4"),
        ("GET", "/api/v1/audit") => doc(
            "The audit log, newest first: logins, enrollments, terminal sessions, tasks, exec runs",
            "audit",
        )
        .query(schema::<AuditParams>)
        .returns(200, schema::<Vec<AuditView>>),
        ("GET", "/api/openapi.json") => doc("This document", "system")
            .content(200, "application/json", "OpenAPI 3.1"),

        _ => return None,
    };
    Some(d)
}

/// `{*path}` → `{path}` (OpenAPI has no catch-all syntax).
fn openapi_path(path: &str) -> String {
    path.replace("{*", "{")
}

fn path_params(path: &str) -> Vec<Value> {
    path.split('/')
        .filter_map(|seg| seg.strip_prefix('{')?.strip_suffix('}'))
        .map(|name| {
            json!({
                "name": name.trim_start_matches('*'),
                "in": "path",
                "required": true,
                "schema": {"type": "string"},
            })
        })
        .collect()
}

/// Query parameters from a struct schema's properties (resolving its `$ref`).
fn query_params(generator: &SchemaGenerator, schema: &Schema) -> Vec<Value> {
    let resolved = schema
        .get("$ref")
        .and_then(Value::as_str)
        .and_then(|r| r.rsplit('/').next())
        .and_then(|name| generator.definitions().get(name))
        .cloned()
        .unwrap_or_else(|| schema.clone().to_value());
    let required: Vec<&str> = resolved
        .get("required")
        .and_then(Value::as_array)
        .map(|r| r.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    resolved
        .get("properties")
        .and_then(Value::as_object)
        .map(|props| {
            props
                .iter()
                .map(|(name, prop)| {
                    let mut p = json!({
                        "name": name,
                        "in": "query",
                        "required": required.contains(&name.as_str()),
                        "schema": prop,
                    });
                    if let Some(d) = prop.get("description") {
                        p["description"] = d.clone();
                    }
                    p
                })
                .collect()
        })
        .unwrap_or_default()
}

fn security(access: Access) -> (Value, Option<String>) {
    match access {
        Access::Public => (json!([]), None),
        Access::User(role) => (
            json!([{"bearer": []}, {"cookie": []}]),
            Some(format!(
                "Requires a user with role `{}` or higher.",
                role.as_str()
            )),
        ),
        Access::Agent => (
            json!([{"bearer": []}]),
            Some("Requires an enrolled agent's credential as the bearer token.".to_string()),
        ),
    }
}

fn operation(generator: &mut SchemaGenerator, spec: &RouteSpec, d: Doc) -> Value {
    let (security, who) = security(spec.access);
    let mut parameters = path_params(spec.path);
    if let Some(q) = d.query {
        let s = q(generator);
        parameters.extend(query_params(generator, &s));
    }
    let ok = match (d.response, d.content) {
        (Some(f), _) => json!({
            "description": "Success",
            "content": {"application/json": {"schema": f(generator)}},
        }),
        (None, Some((media, what))) => json!({
            "description": what,
            "content": {media: {}},
        }),
        (None, None) => json!({"description": "Success"}),
    };
    let error = generator.subschema_for::<proto::ErrorBody>();
    let mut responses = Map::new();
    responses.insert(d.status.to_string(), ok);
    responses.insert(
        "default".into(),
        json!({
            "description": "An error: the status says which, the body says why",
            "content": {"application/json": {"schema": error}},
        }),
    );
    let operation_id = format!(
        "{}{}",
        spec.method.as_str().to_lowercase(),
        spec.path
            .split(['/', '{', '}', '*', '.'])
            .filter(|s| !s.is_empty())
            .map(|s| format!("_{s}"))
            .collect::<String>()
    );
    let mut op = json!({
        "operationId": operation_id,
        "summary": d.summary,
        "tags": [d.tag],
        "security": security,
        "parameters": parameters,
        "responses": responses,
    });
    if let Some(who) = who {
        op["description"] = json!(who);
    }
    if let Some(f) = d.request {
        op["requestBody"] = json!({
            "required": true,
            "content": {"application/json": {"schema": f(generator)}},
        });
    }
    op
}

/// The whole document for the routes in `specs`.
pub fn document(specs: &[RouteSpec]) -> Value {
    let mut settings = SchemaSettings::draft2020_12();
    settings.definitions_path = "/components/schemas".into();
    settings.meta_schema = None;
    let mut generator = settings.into_generator();
    let mut paths = Map::new();
    for spec in specs {
        let Some(d) = describe(&spec.method, spec.path) else {
            continue;
        };
        let op = operation(&mut generator, spec, d);
        let entry = paths
            .entry(openapi_path(spec.path))
            .or_insert_with(|| json!({}));
        entry[spec.method.as_str().to_lowercase()] = op;
    }
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "Outpost control plane",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "The only public entry point of an Outpost appliance: users (web UI, API tokens) and agents (enrollment, control channel, metrics, terminal).",
        },
        "paths": paths,
        "components": {
            "schemas": generator.take_definitions(true),
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "description": "An API token from POST /api/v1/sessions, or an agent credential"},
                "cookie": {"type": "apiKey", "in": "cookie", "name": crate::edge::SESSION_COOKIE, "description": "Set by POST /api/v1/sessions; named __Host-outpost_session when the control plane is served over TLS (or behind a TLS proxy)"},
            },
        },
    })
}
