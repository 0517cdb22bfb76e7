//! Persistent state outside Kafka: the PostgreSQL database (status rows,
//! leases, subscriptions) and, later, the blob store for media and
//! transcripts.

pub mod db;
