//! The real binaries, end to end: `outpost serve`, `outpost admin`, `outpost-agent enroll|run`.

mod backups;
mod buffer;
mod cli;
mod doctor;
mod harness;
mod link;
mod rollouts;
mod security;
mod tasks;
mod terminal;
mod tls;
