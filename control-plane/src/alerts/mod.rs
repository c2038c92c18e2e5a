//! Alerts: rules the control plane evaluates over what it stores on each agent's row, one
//! replica at a time under a lease, and notifications that go through a durable outbox to
//! webhook, Slack and Alertmanager channels.
//!
//! * [`rules`]: the built-in rules, their thresholds, admins' overrides, what each measures.
//! * [`state`]: an alert's life and the notices a round sends (grouped into digests).
//! * [`silences`]: notices held back for a while, by rule and agents.
//! * [`windows`]: maintenance windows (cron + duration + time zone) that hold notices back.
//! * [`smtp`]: email over SMTP (STARTTLS or TLS) for the `email` channel.
//! * [`channels`]: channel specs, how a notice is written for each kind, and sending it.
//! * [`evaluator`]: the loop on every replica: take the lease, evaluate, commit, deliver.

pub mod channels;
pub mod evaluator;
pub mod rules;
pub mod silences;
pub mod smtp;
pub mod state;
pub mod windows;
