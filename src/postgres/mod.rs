//! Everything about the PostgreSQL server itself: binaries, data directory, configuration
//! files, connections and the server log.

pub mod binaries;
pub mod command;
pub mod conf;
pub mod connect;
pub mod control;
pub mod datadir;
pub mod hba;
pub mod log;
pub mod lsn;
pub mod server;

pub use command::command;
