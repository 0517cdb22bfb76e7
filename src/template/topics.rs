//! Topic management: create what is missing, never shrink.
//!
//! `vidpipe run` makes sure every topic it reads or writes exists, with the
//! configured partition count. Existing topics are left as they are: Kafka
//! cannot remove partitions, and adding some changes which partition a video
//! id maps to, so it is an operator's decision (see docs/ARCHITECTURE.md,
//! "Scaling a stage").

use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::types::RDKafkaErrorCode;

/// Why topics could not be made ready.
#[derive(Debug, thiserror::Error)]
pub enum TopicError {
    /// The broker could not be reached or refused.
    #[error("cannot create topics on {brokers}: {source}")]
    Kafka {
        /// Bootstrap servers.
        brokers: String,
        /// The client's error.
        source: rdkafka::error::KafkaError,
    },
    /// One topic was refused.
    #[error("cannot create topic {topic}: {code}")]
    Refused {
        /// The topic.
        topic: String,
        /// The broker's answer.
        code: RDKafkaErrorCode,
    },
}

/// Creates the topics that do not exist yet.
pub async fn ensure(
    brokers: &str,
    topics: &[String],
    partitions: i32,
    replication: i32,
) -> Result<(), TopicError> {
    let kafka = |source| TopicError::Kafka {
        brokers: brokers.to_string(),
        source,
    };
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .map_err(kafka)?;
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|t| NewTopic::new(t, partitions, TopicReplication::Fixed(replication)))
        .collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    for result in admin.create_topics(&new, &opts).await.map_err(kafka)? {
        match result {
            Ok(_) => {}
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => return Err(TopicError::Refused { topic, code }),
        }
    }
    Ok(())
}
