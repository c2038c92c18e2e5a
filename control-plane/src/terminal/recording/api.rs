//! Recordings through the API: list and search, the `.cast` (replay and download, each
//! audited), and the chain check. Admins see every recording; others only their own.

use axum::Extension;
use axum::Json;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

use super::cast::{self, Verify};
use crate::audit::action;
use crate::auth::Role;
use crate::edge::{ApiError, AuthUser};
use crate::storage::{
    AuditQuery, RECORDING_SEARCH_WORDS_MAX, RecordingQuery, RecordingRow, Storage, StorageError,
    UserRow,
};
use crate::terminal::TerminalContext;

/// Recordings one list returns at most (and its default).
const LIST_MAX: i64 = 200;
const LIST_DEFAULT: i64 = 50;
/// Matching chunks one search reads at most.
const MATCHED_CHUNKS_MAX: i64 = 500;
/// Moments shown per recording in a search (each costs reading its chunk).
const MOMENTS_MAX: usize = 3;
const SEARCH_BYTES_MAX: usize = 500;
const WORD_CHARS_MAX: usize = 100;
/// Chunks read per storage call while streaming a `.cast` or verifying (a chunk is about
/// 1 MiB at most, so a page stays within a few MiB).
const PAGE: i64 = 4;

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// Only this user's recordings (a login name; others than admins may give only their own).
    user: Option<String>,
    /// Only recordings on this agent (its id).
    agent: Option<String>,
    /// Started at or after: RFC 3339 or Unix milliseconds.
    from: Option<String>,
    /// Started before: RFC 3339 or Unix milliseconds.
    to: Option<String>,
    /// Words the output showed (all of them, case-insensitive; "double quotes" keep a phrase
    /// together; at most 5).
    q: Option<String>,
    /// At most this many recordings (default 50, at most 200).
    limit: Option<i64>,
}

#[derive(Serialize, schemars::JsonSchema)]
pub struct RecordingView {
    pub session_id: String,
    pub agent_id: String,
    pub agent: String,
    pub user: String,
    pub started: String,
    pub started_ms: i64,
    /// `null` while the session runs.
    pub ended_ms: Option<i64>,
    pub width: i64,
    pub height: i64,
    /// Keystrokes are recorded too.
    pub input: bool,
    pub chunks: i64,
    /// Output bytes recorded.
    pub bytes: i64,
    /// The chain's newest hash.
    pub hash: String,
    /// What the recording misses, when it does.
    pub incomplete: Option<String>,
    /// Where a search's words were shown (empty without `q`).
    pub matches: Vec<MomentView>,
}

#[derive(Serialize, schemars::JsonSchema)]
pub struct MomentView {
    /// Seconds from the recording's start.
    pub at: f64,
    /// The output around the words.
    pub excerpt: String,
}

impl RecordingView {
    fn of(row: RecordingRow) -> RecordingView {
        RecordingView {
            started: crate::time::rfc3339_ms(row.started_ms),
            session_id: row.session_id,
            agent_id: row.agent_id,
            agent: row.agent_name,
            user: row.username,
            started_ms: row.started_ms,
            ended_ms: row.ended_ms,
            width: row.width,
            height: row.height,
            input: row.input,
            chunks: row.chunks,
            bytes: row.bytes,
            hash: row.head_hash,
            incomplete: row.incomplete,
            matches: Vec::new(),
        }
    }
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CastQuery {
    /// `true`: sent as a file to save (`Content-Disposition: attachment`), audited as a
    /// download; otherwise audited as a replay.
    download: Option<bool>,
}

#[derive(Serialize, schemars::JsonSchema)]
pub struct VerifyView {
    pub session_id: String,
    /// Every chunk carries the hash of the one before, its content matches its hash, and the
    /// recording's head names the last chunk.
    pub valid: bool,
    pub chunks: i64,
    pub bytes: i64,
    pub events: u64,
    pub hash: String,
    /// The chain's last hash as the session's `terminal.ended` audit record holds it.
    pub ended_hash: Option<String>,
    /// What comparing the head with that record found.
    pub audit: String,
    /// Where the chain breaks, when it does.
    pub problem: Option<String>,
}

fn storage_error(e: StorageError) -> ApiError {
    ApiError::internal(e)
}

/// Split a search into lower-cased words; `"…"` keeps a phrase together.
pub fn search_words(q: &str) -> Result<Vec<String>, String> {
    if q.len() > SEARCH_BYTES_MAX {
        return Err(format!("q: at most {SEARCH_BYTES_MAX} bytes"));
    }
    let mut words = Vec::new();
    for (i, part) in q.split('"').enumerate() {
        if i % 2 == 1 {
            let phrase = part.trim().to_lowercase();
            if !phrase.is_empty() {
                words.push(phrase);
            }
        } else {
            words.extend(part.split_whitespace().map(str::to_lowercase));
        }
    }
    if words.len() > RECORDING_SEARCH_WORDS_MAX {
        return Err(format!(
            "q: at most {RECORDING_SEARCH_WORDS_MAX} words or phrases"
        ));
    }
    if let Some(w) = words.iter().find(|w| w.chars().count() > WORD_CHARS_MAX) {
        return Err(format!(
            "q: {w:?} is longer than {WORD_CHARS_MAX} characters"
        ));
    }
    Ok(words)
}

/// A recording is its owner's; an admin may see any.
fn visible_to(row: &RecordingRow, user: &UserRow) -> bool {
    row.user_id == user.id || user.role.allows(Role::Admin)
}

async fn visible(
    storage: &Storage,
    user: &UserRow,
    session_id: &str,
) -> Result<RecordingRow, ApiError> {
    match storage.recording(session_id).await.map_err(storage_error)? {
        Some(row) if visible_to(&row, user) => Ok(row),
        _ => Err(ApiError::new(StatusCode::NOT_FOUND, "no such recording")),
    }
}

/// `GET /api/v1/terminal/recordings`
pub async fn list(
    State(state): State<TerminalContext>,
    Extension(AuthUser(user)): Extension<AuthUser>,
    Query(q): Query<ListQuery>,
) -> Result<Json<Vec<RecordingView>>, ApiError> {
    let bad = |e: String| ApiError::new(StatusCode::BAD_REQUEST, e);
    let admin = user.role.allows(Role::Admin);
    let user_id = match q.user.as_deref() {
        None if admin => None,
        None => Some(user.id.clone()),
        Some(name) if name == user.name => Some(user.id.clone()),
        Some(_) if !admin => {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "only admins see other users' recordings",
            ));
        }
        Some(name) => match state
            .storage
            .user_by_name(name)
            .await
            .map_err(storage_error)?
        {
            Some(u) => Some(u.id),
            // Recordings outlive their users' accounts only by id: a removed name has none.
            None => return Ok(Json(Vec::new())),
        },
    };
    let limit = q.limit.unwrap_or(LIST_DEFAULT);
    if !(1..=LIST_MAX).contains(&limit) {
        return Err(bad(format!("limit: 1 to {LIST_MAX}")));
    }
    let words = search_words(q.q.as_deref().unwrap_or("")).map_err(bad)?;
    let query = RecordingQuery {
        user_id,
        agent_id: q.agent,
        from_ms: q
            .from
            .as_deref()
            .map(|v| crate::time::parse_ms("from", v))
            .transpose()
            .map_err(bad)?,
        to_ms: q
            .to
            .as_deref()
            .map(|v| crate::time::parse_ms("to", v))
            .transpose()
            .map_err(bad)?,
        words: words.clone(),
        limit,
    };
    if words.is_empty() {
        let rows = state
            .storage
            .list_recordings(query)
            .await
            .map_err(storage_error)?;
        return Ok(Json(rows.into_iter().map(RecordingView::of).collect()));
    }
    // What someone looked for in other people's sessions is itself on record.
    state
        .audit
        .record(
            &user.name,
            action::RECORDING_SEARCHED,
            q.user.as_deref().unwrap_or(if admin { "" } else { &user.name }),
            serde_json::json!({"words": words, "agent_id": query.agent_id, "from_ms": query.from_ms, "to_ms": query.to_ms}),
        )
        .await;
    let matched = state
        .storage
        .search_recordings(RecordingQuery {
            limit: MATCHED_CHUNKS_MAX,
            ..query
        })
        .await
        .map_err(storage_error)?;
    // Chunks arrive newest recording first, in order within one: one view per recording,
    // with where the words were shown.
    let mut out: Vec<RecordingView> = Vec::new();
    for m in matched {
        if out.last().map(|v| v.session_id.as_str()) != Some(m.recording.session_id.as_str()) {
            if out.len() as i64 >= limit {
                break;
            }
            out.push(RecordingView::of(m.recording));
        }
        let Some(view) = out.last_mut() else { continue };
        if view.matches.len() >= MOMENTS_MAX {
            continue;
        }
        // One chunk in memory at a time (a chunk is about 1 MiB at most).
        let events = match state
            .storage
            .recording_chunks(&view.session_id, m.seq, 1)
            .await
        {
            Ok(mut chunks) if !chunks.is_empty() => chunks.swap_remove(0).events,
            Ok(_) => continue,
            Err(e) => return Err(storage_error(e)),
        };
        let (at, excerpt) = match cast::moment(&events, &words) {
            Some(found) => found,
            // Only the chunk before showed the words (its tail leads this chunk's search
            // text), and that chunk is listed already.
            None if !view.matches.is_empty() => continue,
            // The words straddle the boundary with the chunk before: this chunk's start.
            None => (cast::first_time(&events), String::new()),
        };
        view.matches.push(MomentView { at, excerpt });
    }
    Ok(Json(out))
}

/// `GET /api/v1/terminal/recordings/{id}`
pub async fn show(
    State(state): State<TerminalContext>,
    Extension(AuthUser(user)): Extension<AuthUser>,
    Path(session_id): Path<String>,
) -> Result<Json<RecordingView>, ApiError> {
    let row = visible(&state.storage, &user, &session_id).await?;
    Ok(Json(RecordingView::of(row)))
}

/// `GET /api/v1/terminal/recordings/{id}/cast`: the header, then every chunk's events, read
/// from storage a page at a time while the answer streams.
pub async fn download(
    State(state): State<TerminalContext>,
    Extension(AuthUser(user)): Extension<AuthUser>,
    Path(session_id): Path<String>,
    Query(q): Query<CastQuery>,
) -> Result<Response, ApiError> {
    let row = visible(&state.storage, &user, &session_id).await?;
    let download = q.download.unwrap_or(false);
    let what = if download {
        action::RECORDING_DOWNLOADED
    } else {
        action::RECORDING_REPLAYED
    };
    state
        .audit
        .record(
            &user.name,
            what,
            &session_id,
            serde_json::json!({"owner": row.username, "agent": row.agent_name, "bytes": row.bytes}),
        )
        .await;
    let header_line = cast::header(&row);
    let storage = state.storage.clone();
    let pages = futures_util::stream::unfold(Some(0i64), move |next| {
        let storage = storage.clone();
        let session_id = session_id.clone();
        async move {
            let from = next?;
            match storage.recording_chunks(&session_id, from, PAGE).await {
                Ok(chunks) if chunks.is_empty() => None,
                Ok(chunks) => {
                    let next = (chunks.len() as i64 == PAGE).then(|| from + PAGE);
                    let text: String = chunks.into_iter().map(|c| c.events).collect();
                    Some((Ok::<_, std::io::Error>(text), next))
                }
                Err(e) => Some((Err(std::io::Error::other(e.to_string())), None)),
            }
        }
    });
    let body = futures_util::stream::once(async move { Ok(header_line) }).chain(pages);
    let mut response = Body::from_stream(body).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-asciicast"),
    );
    if download {
        let name = format!("attachment; filename=\"outpost-{}.cast\"", row.session_id);
        if let Ok(v) = HeaderValue::from_str(&name) {
            headers.insert(header::CONTENT_DISPOSITION, v);
        }
    }
    Ok(response)
}

/// Check a recording's chain from its first chunk to its head.
pub async fn verify(storage: &Storage, session_id: &str) -> Result<VerifyView, StorageError> {
    let row = storage
        .recording(session_id)
        .await?
        .ok_or_else(|| StorageError::Backend(format!("no recording {session_id}")))?;
    let mut check = Verify::new(session_id);
    let mut problem = None;
    let mut from = 0;
    'pages: loop {
        let chunks = storage.recording_chunks(session_id, from, PAGE).await?;
        let n = chunks.len() as i64;
        for chunk in &chunks {
            if let Err(broken) = check.chunk(chunk) {
                problem = Some(broken.to_string());
                break 'pages;
            }
        }
        if n < PAGE {
            break;
        }
        from += PAGE;
    }
    if problem.is_none()
        && let Err(broken) = check.finish(&row)
    {
        problem = Some(broken.to_string());
    }
    // The chain proves the chunks agree with the head; the head is held against the hash the
    // session's end wrote into the audit log, so rewriting the whole chain shows too.
    let ended = storage
        .audit_list(AuditQuery {
            action: Some(action::TERMINAL_ENDED.to_string()),
            target: Some(session_id.to_string()),
            before_id: None,
            limit: 1,
        })
        .await?;
    let ended_hash = ended.first().and_then(|r| {
        let detail: serde_json::Value = serde_json::from_str(&r.detail).ok()?;
        Some(detail["recording"]["hash"].as_str()?.to_string())
    });
    let audit = match &ended_hash {
        None if ended.is_empty() => "no terminal.ended audit record (the session is live, or the record was pruned): the head was not compared".to_string(),
        None => "the terminal.ended audit record names no recording hash: the head was not compared".to_string(),
        Some(hash) if *hash == row.head_hash => "the head is the hash the terminal.ended audit record holds".to_string(),
        Some(hash) => {
            let broken = format!(
                "the head {} is not the hash the terminal.ended audit record holds ({hash}): the recording changed after the session ended",
                row.head_hash
            );
            problem.get_or_insert(broken.clone());
            broken
        }
    };
    Ok(VerifyView {
        session_id: session_id.to_string(),
        valid: problem.is_none(),
        chunks: row.chunks,
        bytes: row.bytes,
        events: check.events,
        hash: row.head_hash,
        ended_hash,
        audit,
        problem,
    })
}

/// `GET /api/v1/terminal/recordings/{id}/verify`
pub async fn check(
    State(state): State<TerminalContext>,
    Extension(AuthUser(user)): Extension<AuthUser>,
    Path(session_id): Path<String>,
) -> Result<Json<VerifyView>, ApiError> {
    visible(&state.storage, &user, &session_id).await?;
    let view = verify(&state.storage, &session_id)
        .await
        .map_err(storage_error)?;
    Ok(Json(view))
}

#[cfg(test)]
mod tests {
    use super::search_words;

    #[test]
    fn words_phrases_and_limits() {
        assert_eq!(
            search_words(r#"DROP "table  Orders" now"#).expect("ok"),
            vec!["drop", "table  orders", "now"]
        );
        assert_eq!(search_words("  ").expect("ok"), Vec::<String>::new());
        assert!(search_words("a b c d e f").is_err());
        assert!(search_words(&"x".repeat(101)).is_err());
        assert!(search_words(&"x ".repeat(300)).is_err());
    }
}
