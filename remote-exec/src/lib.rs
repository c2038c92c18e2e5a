//! Supervised SSH execution: layered timeouts, streaming output, classified outcomes,
//! retries only when safe, argv quoting, verified host keys, receipts, guaranteed cleanup.
//!
//! Remote execution is infrastructure, not a helper: every operation runs under layered
//! timeouts, streams its output, ends in one of five classified outcomes, is retried only when
//! that is safe, leaves a receipt on the host so an uncertain run can be reconciled, and
//! releases its channel and socket on every path.
//!
//! - [`quote`]: argv → one command line for a POSIX shell; injection is impossible by
//!   construction.
//! - [`outcome`]: the sans-IO classification and retry policy.
//! - [`client`]: one connection (connect, handshake + host key check, auth) and commands on it.
//! - [`receipt`]: the remote wrapper that records start and exit under the operation id.
//! - [`inventory`]: hosts from TOML and `--hosts` selection.
//! - [`fleet`]: fan-out with a concurrency limit, an error budget, retries and a pool of
//!   reusable connections.

pub mod client;
pub mod fleet;
pub mod inventory;
pub mod outcome;
pub mod quote;
pub mod receipt;

pub use client::{Client, Connection, Gauges, HostKeyPolicy, Live, OutputKind, Report, Timeouts};
pub use inventory::{Host, Inventory, InventoryError};
pub use outcome::{Outcome, Phase, RetryPolicy};
pub use receipt::{OpId, ReceiptStatus};
