//! High availability: who leads, when to fence, who may promote. The decisions are pure
//! functions of observed state ([`decide`], [`quorum`]), tested with tables of cases; the
//! Lease client ([`lease`]) is the I/O edge for leadership.

pub mod decide;
pub mod lease;
pub mod quorum;
