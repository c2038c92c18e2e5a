//! The agent's control channel: one outbound WebSocket to the control plane, kept alive
//! forever. [`backoff`] is the sans-IO retry policy; [`driver`] does the network work.

pub mod backoff;
pub mod driver;

pub use backoff::Backoff;
pub use driver::{LinkConfig, LinkStatus, run_link};
