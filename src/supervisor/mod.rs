//! PID 1 duties: reaping, owning the postmaster, turning signals into orderly actions.

pub mod postmaster;
pub mod reaper;
