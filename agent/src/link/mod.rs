//! The agent's control channel: one outbound WebSocket to the control plane, kept alive
//! forever. [`driver`] does the network work; its retries follow [`crate::backoff`].

pub mod driver;

pub use driver::{LinkConfig, LinkStatus, run_link};
