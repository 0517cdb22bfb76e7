//! Persistent state outside Kafka: the PostgreSQL database ([`db`]: status
//! rows and leases; [`catalog`]: discovered videos and subscriptions) and
//! the blob store for media and transcripts ([`blobs`]).

pub mod blobs;
pub mod catalog;
pub mod db;
