//! The services a stage calls, behind traits chosen by configuration:
//! speech recognition ([`asr`]) and summarization ([`summarize`]). Nothing
//! here knows about Kafka, offsets or the database.

pub mod asr;
pub mod summarize;
