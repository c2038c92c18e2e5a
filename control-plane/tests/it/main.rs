//! Control-plane integration tests: real storage backends, a real server on a loopback port.

mod alerts;
mod api;
mod architecture;
mod backups;
mod channel;
mod demo;
mod exec;
mod harness;
mod limits;
mod storage;
mod streams;
