//! The agent's data directory: every name in it, spelled once. A leaf: the config, enrollment,
//! the buffer, the task runtime, their command-line tools and `doctor` all name files through
//! it.

/// Where the agent keeps its state unless told otherwise (owned by the agent's user, 0700).
pub const DEFAULT_DATA_DIR: &str = "/var/lib/outpost-agent";
/// The agent id and credential from enrollment (0600).
pub const IDENTITY_FILE: &str = "identity.json";
/// An enrollment in progress: its id, so a retry after a lost answer is recognised.
pub const PENDING_FILE: &str = "enrollment.json";
/// The task store (SQLite).
pub const TASKS_FILE: &str = "tasks.db";
/// The offline metrics buffer (SQLite).
pub const BUFFER_FILE: &str = "buffer.db";
/// The task API's Unix socket.
pub const SOCKET_FILE: &str = "agent.sock";
/// The run keepers' slot files, one per keeper.
pub const KEEPERS_DIR: &str = "keepers";
/// Run directories, one per run in flight, left by agents before run keepers (read on
/// recovery, never written).
pub const RUNS_DIR: &str = "runs";
