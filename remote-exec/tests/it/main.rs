//! Integration tests against real OpenSSH servers (`fixtures::Sshd`).

mod exec;
mod fleet;
mod harness;
mod quoting;
