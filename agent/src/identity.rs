//! Enrollment and the agent's stored identity.
//!
//! `enroll` trades a one-time token for an agent id and a credential and stores them in
//! `<data_dir>/identity.json` (mode 0600, written atomically). The enrollment id is chosen
//! once and saved in `<data_dir>/enrollment.json` *before* the request goes out, so a retry
//! after a lost answer (or a crash) is recognised by the control plane as the same enrollment
//! and never creates a second identity for this host.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use world::World;

use crate::layout::{IDENTITY_FILE, PENDING_FILE};
const ENROLL_TIMEOUT: Duration = Duration::from_secs(15);
const RESPONSE_BYTES_MAX: usize = 64 * 1024;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Identity {
    pub agent_id: String,
    pub credential: String,
    pub control_plane: String,
    pub name: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct Pending {
    enrollment_id: String,
    control_plane: String,
}

#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error("control plane URL {0:?} is not a valid http:// URL")]
    BadUrl(String),
    #[error("control plane refused the enrollment: {0}")]
    Refused(String),
    #[error("could not reach the control plane: {0}")]
    Unreachable(String),
    #[error("{0}")]
    Io(String),
}

fn io(context: &str, path: &Path, e: impl std::fmt::Display) -> EnrollError {
    EnrollError::Io(format!("{context} {}: {e}", path.display()))
}

/// Write `bytes` to `path` atomically (temp file, fsync, rename) with mode 0600.
pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

pub fn identity_path(data_dir: &Path) -> PathBuf {
    data_dir.join(IDENTITY_FILE)
}

/// The stored identity, `None` when the agent was never enrolled.
pub fn load(data_dir: &Path) -> Result<Option<Identity>, EnrollError> {
    let path = identity_path(data_dir);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| io("parse", &path, e)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io("read", &path, e)),
    }
}

fn create_private_dir(dir: &Path) -> Result<(), EnrollError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| io("create data dir", dir, e))
}

fn pending_enrollment_id(
    world: &World,
    data_dir: &Path,
    control_plane: &str,
) -> Result<String, EnrollError> {
    let path = data_dir.join(PENDING_FILE);
    if let Ok(bytes) = std::fs::read(&path)
        && let Ok(p) = serde_json::from_slice::<Pending>(&bytes)
        && p.control_plane == control_plane
    {
        return Ok(p.enrollment_id);
    }
    let pending = Pending {
        enrollment_id: format!("enr_{}", hex_lower(&world.random_bytes::<16>())),
        control_plane: control_plane.to_string(),
    };
    let bytes = serde_json::to_vec(&pending).map_err(|e| io("encode", &path, e))?;
    write_private(&path, &bytes).map_err(|e| io("write", &path, e))?;
    Ok(pending.enrollment_id)
}

fn hex_lower(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Enroll with `control_plane` using `token`, store the identity and return it.
pub async fn enroll(
    world: &World,
    data_dir: &Path,
    control_plane: &str,
    token: &str,
    name: &str,
    labels: std::collections::BTreeMap<String, String>,
) -> Result<Identity, EnrollError> {
    let base = url::Url::parse(control_plane)
        .map_err(|_| EnrollError::BadUrl(control_plane.to_string()))?;
    let url = base
        .join(proto::ENROLL_PATH)
        .map_err(|_| EnrollError::BadUrl(control_plane.to_string()))?;
    create_private_dir(data_dir)?;
    let enrollment_id = pending_enrollment_id(world, data_dir, control_plane)?;
    let request = proto::EnrollRequest {
        token: token.to_string(),
        name: name.to_string(),
        enrollment_id,
        labels,
    };
    let body = serde_json::to_vec(&request).map_err(|e| EnrollError::Io(e.to_string()))?;
    let mut headers = http::HeaderMap::new();
    headers.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    let response = world::http_request(
        world,
        http::Method::POST,
        &url,
        headers,
        body.into(),
        ENROLL_TIMEOUT,
        RESPONSE_BYTES_MAX,
    )
    .await
    .map_err(|e| match e {
        world::HttpError::BadUrl { reason, .. } => EnrollError::BadUrl(reason),
        other => EnrollError::Unreachable(other.to_string()),
    })?;
    if !response.status.is_success() {
        let reason = serde_json::from_slice::<proto::ErrorBody>(&response.body)
            .map(|b| b.error)
            .unwrap_or_else(|_| format!("HTTP {}", response.status));
        return Err(EnrollError::Refused(reason));
    }
    let answer: proto::EnrollResponse = serde_json::from_slice(&response.body)
        .map_err(|e| EnrollError::Unreachable(format!("unreadable enrollment answer: {e}")))?;
    let identity = Identity {
        agent_id: answer.agent_id,
        credential: answer.credential,
        control_plane: control_plane.to_string(),
        name: name.to_string(),
    };
    let path = identity_path(data_dir);
    let bytes = serde_json::to_vec_pretty(&identity).map_err(|e| io("encode", &path, e))?;
    write_private(&path, &bytes).map_err(|e| io("write", &path, e))?;
    let _ = std::fs::remove_file(data_dir.join(PENDING_FILE));
    Ok(identity)
}

/// Host name of this machine (the default agent name).
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown-host".to_string())
}
