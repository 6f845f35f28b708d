//! pgwarden: a per-pod PostgreSQL instance manager that runs as PID 1.
//!
//! The binary (`src/main.rs`) is a thin command line over these modules; they are a library
//! so that integration tests can drive the pure decisions and the API clients directly.

pub mod backup;
pub mod config;
#[cfg(feature = "demo")]
pub mod demo;
pub mod ha;
pub mod health;
pub mod http;
pub mod k8s;
pub mod logging;
pub mod metrics;
pub mod monitor;
pub mod postgres;
pub mod run;
pub mod supervisor;
pub mod tls;
pub mod wal;
