//! Operating the stages' topics: `vidpipe topics` (each stage's input
//! topic, its partition count, the members of the stage's consumer group
//! and how far behind the group is) and `vidpipe topics scale` (more
//! partitions for one stage's input topic).
//!
//! A stage scales by partitions and instances: every `vidpipe run STAGE`
//! process joins the consumer group `<prefix><stage>`, and Kafka spreads the
//! input topic's partitions over the members. More members than partitions
//! leaves the extra ones idle, so scaling past the partition count starts
//! here. Kafka cannot remove partitions, and adding some moves keys to other
//! partitions, so shrinking is refused and growing is an explicit command.
//!
//! The Kafka calls here block (librdkafka's synchronous metadata and group
//! APIs); the async functions run them on the blocking pool.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewPartitions};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Message, Offset, TopicPartitionList};
use serde::Serialize;

use crate::config::Config;
use crate::stages::{self, STAGES};
use crate::store::catalog::PgCatalog;
use crate::template::Stage;

/// How long one metadata, watermark or group request may take.
const TIMEOUT: Duration = Duration::from_secs(10);

/// Why a topic command failed.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// A stage name that does not exist.
    #[error("unknown stage {0:?}; the stages are: {list}", list = STAGES.join(", "))]
    UnknownStage(String),
    /// The stage's input topic does not exist yet.
    #[error("topic {0} does not exist; `vidpipe run` creates the pipeline's topics")]
    MissingTopic(String),
    /// A partition count below the current one.
    #[error(
        "topic {topic} has {current} partitions and Kafka cannot remove partitions: \
         ask for more than {current}, not {requested}"
    )]
    Shrink {
        /// The stage's input topic.
        topic: String,
        /// Its partition count now.
        current: usize,
        /// The count asked for.
        requested: usize,
    },
    /// Kafka is unreachable or a request failed.
    #[error("Kafka at {brokers}: {message}")]
    Kafka {
        /// Bootstrap servers.
        brokers: String,
        /// What failed.
        message: String,
    },
    /// The broker refused to add the partitions.
    #[error("Kafka refused to add partitions to {topic}: {code}")]
    Refused {
        /// The topic.
        topic: String,
        /// The broker's answer.
        code: RDKafkaErrorCode,
    },
}

fn kafka(config: &Config, e: impl std::fmt::Display) -> AdminError {
    AdminError::Kafka {
        brokers: config.kafka_brokers.clone(),
        message: e.to_string(),
    }
}

/// The input topic of `stage`, without the prefix, as the stage itself
/// declares it (so that this table cannot drift from the registry).
pub fn input_suffix(stage: &str) -> Option<&'static str> {
    Some(match stage {
        "discover" => <stages::discover::Discover<PgCatalog> as Stage>::INPUT,
        "download" => <stages::download::Download as Stage>::INPUT,
        "extract-audio" => <stages::extract_audio::ExtractAudio as Stage>::INPUT,
        "transcribe" => <stages::transcribe::Transcribe as Stage>::INPUT,
        "summarize" => <stages::summarize::Summarize as Stage>::INPUT,
        _ => return None,
    })
}

/// The prefixed input topic of `stage`.
pub fn input_topic(config: &Config, stage: &str) -> Result<String, AdminError> {
    input_suffix(stage)
        .map(|s| config.topic(s))
        .ok_or_else(|| AdminError::UnknownStage(stage.to_string()))
}

/// The consumer group of `stage`, named as the runner names it.
pub fn group(config: &Config, stage: &str) -> String {
    format!("{}{stage}", config.topic_prefix)
}

/// One member of a stage's consumer group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Member {
    /// The client id: `vidpipe-<stage>-<instance>` for a `vidpipe run`.
    pub client_id: String,
    /// Where it connects from.
    pub host: String,
    /// The group's member id.
    pub member_id: String,
    /// Partitions of the input topic assigned to it (empty while a
    /// rebalance is under way, or when it could not be read).
    pub partitions: Vec<i32>,
}

/// How far the group is behind on one partition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PartitionLag {
    /// Partition.
    pub partition: i32,
    /// The group's committed offset (none before its first commit).
    pub committed: Option<i64>,
    /// The partition's high watermark.
    pub high: i64,
    /// Records not yet committed: from the first record a read_committed
    /// reader gets after the committed offset to the high watermark
    /// (transaction markers after it count too), 0 when there is none.
    pub lag: i64,
}

/// A stage's input topic and consumer group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StageTopic {
    /// Stage name.
    pub stage: String,
    /// Its input topic.
    pub topic: String,
    /// Its consumer group.
    pub group: String,
    /// Partition count; none when the topic does not exist.
    pub partitions: Option<usize>,
    /// The group's state (`Stable`, `PreparingRebalance`, `Empty`, `Dead`).
    pub group_state: String,
    /// The group's members.
    pub members: Vec<Member>,
    /// Records not yet committed, over all partitions.
    pub lag: i64,
    /// Per partition.
    pub partition_lag: Vec<PartitionLag>,
}

/// The result of a scale command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Scaled {
    /// The stage's input topic.
    pub topic: String,
    /// Partitions before.
    pub from: usize,
    /// Partitions now.
    pub to: usize,
}

/// A consumer context for readers that ask for end-of-partition notices
/// (`enable.partition.eof`): librdkafka also hands some of those to the
/// error callback (when a reader closes with one queued), which by
/// default logs them as errors. They are not errors; everything else is
/// still logged.
pub struct QuietEof;

impl ClientContext for QuietEof {
    fn error(&self, error: KafkaError, reason: &str) {
        let eof = error.rdkafka_error_code() == Some(RDKafkaErrorCode::PartitionEOF)
            || matches!(error, KafkaError::PartitionEOF(_));
        if !eof {
            tracing::error!("librdkafka: {error}: {reason}");
        }
    }
}

impl ConsumerContext for QuietEof {}

fn consumer(config: &Config, group: &str) -> Result<BaseConsumer, AdminError> {
    // A consumer that never subscribes does not join the group: it only
    // reads the group's committed offsets.
    ClientConfig::new()
        .set("bootstrap.servers", &config.kafka_brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .map_err(|e| kafka(config, e))
}

/// The partition count of `topic`, or none when it does not exist.
fn partition_count(
    config: &Config,
    client: &BaseConsumer,
    topic: &str,
) -> Result<Option<usize>, AdminError> {
    let metadata = client
        .fetch_metadata(Some(topic), TIMEOUT)
        .map_err(|e| kafka(config, e))?;
    let Some(t) = metadata.topics().iter().find(|t| t.name() == topic) else {
        return Ok(None);
    };
    match t.error() {
        None => Ok(Some(t.partitions().len())),
        Some(e) if RDKafkaErrorCode::from(e) == RDKafkaErrorCode::UnknownTopicOrPartition => {
            Ok(None)
        }
        Some(e) => Err(kafka(
            config,
            format!("metadata of {topic}: {}", RDKafkaErrorCode::from(e)),
        )),
    }
}

fn describe_stage(config: &Config, stage: &str) -> Result<StageTopic, AdminError> {
    let topic = input_topic(config, stage)?;
    let group = group(config, stage);
    let client = consumer(config, &group)?;
    let partitions = partition_count(config, &client, &topic)?;
    let groups = client
        .fetch_group_list(Some(&group), TIMEOUT)
        .map_err(|e| kafka(config, e))?;
    let (group_state, members) = match groups.groups().iter().find(|g| g.name() == group) {
        Some(g) => (
            g.state().to_string(),
            g.members()
                .iter()
                .map(|m| Member {
                    client_id: m.client_id().to_string(),
                    host: m.client_host().trim_start_matches('/').to_string(),
                    member_id: m.id().to_string(),
                    partitions: m
                        .assignment()
                        .and_then(|a| assigned_partitions(a, &topic))
                        .unwrap_or_default(),
                })
                .collect(),
        ),
        None => ("Dead".to_string(), Vec::new()),
    };
    let mut partition_lag = Vec::new();
    if let Some(n) = partitions {
        let mut tpl = TopicPartitionList::new();
        for p in 0..n as i32 {
            tpl.add_partition(&topic, p);
        }
        let committed = client
            .committed_offsets(tpl, TIMEOUT)
            .map_err(|e| kafka(config, e))?;
        for p in 0..n as i32 {
            let (low, high) = client
                .fetch_watermarks(&topic, p, TIMEOUT)
                .map_err(|e| kafka(config, e))?;
            let committed = committed
                .find_partition(&topic, p)
                .and_then(|e| match e.offset() {
                    Offset::Offset(o) => Some(o),
                    _ => None,
                });
            // Before its first commit the group starts at the earliest
            // record (the runner's auto.offset.reset), so all of it is lag.
            let lag = (high - committed.unwrap_or(low)).max(0);
            partition_lag.push(PartitionLag {
                partition: p,
                committed,
                high,
                lag,
            });
        }
        let behind: Vec<(i32, i64)> = partition_lag
            .iter()
            .filter(|l| l.lag > 0)
            .map(|l| (l.partition, l.high - l.lag))
            .collect();
        if !behind.is_empty() {
            let pending = first_pending(config, &topic, &behind)?;
            for l in &mut partition_lag {
                match pending.get(&l.partition) {
                    Some(Some(offset)) => l.lag = (l.high - offset).max(0),
                    Some(None) => l.lag = 0,
                    None => {}
                }
            }
        }
    }
    Ok(StageTopic {
        stage: stage.to_string(),
        topic,
        group,
        partitions,
        group_state,
        members,
        lag: partition_lag.iter().map(|p| p.lag).sum(),
        partition_lag,
    })
}

/// Where the records a group has not committed start, per partition: the
/// offset of the first record a read_committed reader gets at or after
/// `from`, or none when there is none (what lies between `from` and the
/// high watermark is transaction markers or aborted records, which every
/// exactly-once stage leaves behind its last record). Without this, a
/// caught-up partition would show a lag of 1. Partitions that do not
/// answer within a few seconds are left out (their raw lag stands).
fn first_pending(
    config: &Config,
    topic: &str,
    from: &[(i32, i64)],
) -> Result<std::collections::HashMap<i32, Option<i64>>, AdminError> {
    let probe: BaseConsumer<QuietEof> = ClientConfig::new()
        .set("bootstrap.servers", &config.kafka_brokers)
        // Assigned, never subscribed: it joins no group and commits nothing.
        .set("group.id", format!("{}topics-probe", config.topic_prefix))
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .set("enable.partition.eof", "true")
        .set("fetch.max.bytes", "1048576")
        // What lies past a caught-up group's offset is mostly a transaction
        // marker: the broker would hold each such fetch for the default
        // 500 ms waiting for data, seconds over all the stages.
        .set("fetch.wait.max.ms", "10")
        .create_with_context(QuietEof)
        .map_err(|e| kafka(config, e))?;
    let mut tpl = TopicPartitionList::new();
    for (p, offset) in from {
        tpl.add_partition_offset(topic, *p, Offset::Offset(*offset))
            .map_err(|e| kafka(config, e))?;
    }
    probe.assign(&tpl).map_err(|e| kafka(config, e))?;
    let mut found = std::collections::HashMap::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while found.len() < from.len() && std::time::Instant::now() < deadline {
        match probe.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                found.entry(m.partition()).or_insert(Some(m.offset()));
            }
            Some(Err(KafkaError::PartitionEOF(p))) => {
                found.entry(p).or_insert(None);
            }
            // A transient fetch error: the raw lag stands for what is left.
            Some(Err(_)) | None => {}
        }
    }
    Ok(found)
}

/// Every stage's input topic, partitions, group members and lag, in
/// pipeline order.
pub async fn describe(config: &Config) -> Result<Vec<StageTopic>, AdminError> {
    let config = config.clone();
    let brokers = config.kafka_brokers.clone();
    tokio::task::spawn_blocking(move || {
        STAGES
            .iter()
            .map(|stage| describe_stage(&config, stage))
            .collect()
    })
    .await
    .map_err(|e| AdminError::Kafka {
        brokers,
        message: format!("the Kafka task did not finish: {e}"),
    })?
}

/// Grows `stage`'s input topic to `partitions` partitions. Asking for the
/// current count changes nothing; asking for fewer is refused.
pub async fn scale(config: &Config, stage: &str, partitions: usize) -> Result<Scaled, AdminError> {
    let topic = input_topic(config, stage)?;
    // One client for every metadata read below (the wait for the new count
    // reads it every 100 ms): a client per read connected anew each time.
    let probe = Arc::new(consumer(config, &format!("{}admin", config.topic_prefix))?);
    let Some(current) = read_partition_count(config, &probe, &topic).await? else {
        return Err(AdminError::MissingTopic(topic));
    };
    if partitions < current {
        return Err(AdminError::Shrink {
            topic,
            current,
            requested: partitions,
        });
    }
    if partitions == current {
        return Ok(Scaled {
            topic,
            from: current,
            to: current,
        });
    }
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &config.kafka_brokers)
        .create()
        .map_err(|e| kafka(config, e))?;
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let results = admin
        .create_partitions(&[NewPartitions::new(&topic, partitions)], &opts)
        .await
        .map_err(|e| kafka(config, e))?;
    for result in results {
        if let Err((topic, code)) = result {
            return Err(AdminError::Refused { topic, code });
        }
    }
    // The controller has accepted; the brokers' metadata follows a moment
    // later. Return once it shows the new partitions, so that what runs
    // next (a scaled consumer, another `topics` command) sees them: a
    // second command right after this one read the old count and asked
    // Kafka to "grow" to fewer partitions than it has.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while read_partition_count(config, &probe, &topic).await? < Some(partitions) {
        if tokio::time::Instant::now() >= deadline {
            tracing::warn!(
                topic,
                partitions,
                "Kafka accepted the new partitions but its metadata does not show them yet"
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Dropping a client with a group id closes its queue, polling in
    // 100 ms slices: off the async thread.
    let _ = tokio::task::spawn_blocking(move || drop(probe)).await;
    Ok(Scaled {
        topic,
        from: current,
        to: partitions,
    })
}

/// The partition count of `topic` (None if it does not exist), read with
/// `client` on the blocking pool.
async fn read_partition_count(
    config: &Config,
    client: &Arc<BaseConsumer>,
    topic: &str,
) -> Result<Option<usize>, AdminError> {
    let config = config.clone();
    let client = Arc::clone(client);
    let topic = topic.to_string();
    let brokers = config.kafka_brokers.clone();
    tokio::task::spawn_blocking(move || partition_count(&config, &client, &topic))
        .await
        .map_err(|e| AdminError::Kafka {
            brokers,
            message: format!("the Kafka task did not finish: {e}"),
        })?
}

/// The partitions of `topic` in a member's assignment (Kafka's consumer
/// protocol: version, then an array of (topic, partitions), then user
/// data). None when the bytes do not parse: the listing then shows no
/// partitions rather than failing.
pub fn assigned_partitions(bytes: &[u8], topic: &str) -> Option<Vec<i32>> {
    struct Reader<'a>(&'a [u8]);
    impl Reader<'_> {
        fn take(&mut self, n: usize) -> Option<&[u8]> {
            if self.0.len() < n {
                return None;
            }
            let (head, tail) = self.0.split_at(n);
            self.0 = tail;
            Some(head)
        }
        fn i16(&mut self) -> Option<i16> {
            self.take(2).map(|b| i16::from_be_bytes([b[0], b[1]]))
        }
        fn i32(&mut self) -> Option<i32> {
            self.take(4)
                .map(|b| i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
        }
    }
    if bytes.is_empty() {
        return Some(Vec::new());
    }
    let mut r = Reader(bytes);
    let _version = r.i16()?;
    let topics = r.i32()?;
    let mut out = Vec::new();
    for _ in 0..topics.max(0) {
        let len = usize::try_from(r.i16()?).ok()?;
        let name = std::str::from_utf8(r.take(len)?).ok()?.to_string();
        let count = r.i32()?;
        for _ in 0..count.max(0) {
            let p = r.i32()?;
            if name == topic {
                out.push(p);
            }
        }
    }
    out.sort_unstable();
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assignment(topics: &[(&str, &[i32])]) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&1i16.to_be_bytes());
        b.extend_from_slice(&(topics.len() as i32).to_be_bytes());
        for (name, parts) in topics {
            b.extend_from_slice(&(name.len() as i16).to_be_bytes());
            b.extend_from_slice(name.as_bytes());
            b.extend_from_slice(&(parts.len() as i32).to_be_bytes());
            for p in *parts {
                b.extend_from_slice(&p.to_be_bytes());
            }
        }
        // User data: null.
        b.extend_from_slice(&(-1i32).to_be_bytes());
        b
    }

    #[test]
    fn assignments_parse_per_topic() {
        let bytes = assignment(&[("a", &[3, 1]), ("b", &[0])]);
        assert_eq!(assigned_partitions(&bytes, "a"), Some(vec![1, 3]));
        assert_eq!(assigned_partitions(&bytes, "b"), Some(vec![0]));
        assert_eq!(assigned_partitions(&bytes, "c"), Some(vec![]));
        assert_eq!(assigned_partitions(&[], "a"), Some(vec![]));
    }

    #[test]
    fn truncated_assignments_are_none_not_panics() {
        let bytes = assignment(&[("topic", &[0, 1, 2])]);
        for n in 1..bytes.len() - 4 {
            assert_eq!(assigned_partitions(&bytes[..n], "topic"), None, "{n}");
        }
        let mut lying = assignment(&[("t", &[0])]);
        lying[2..6].copy_from_slice(&i32::MAX.to_be_bytes());
        assert_eq!(assigned_partitions(&lying, "t"), None);
    }

    #[test]
    fn every_stage_has_an_input_topic() {
        for s in STAGES {
            assert!(input_suffix(s).is_some(), "{s}");
        }
        assert_eq!(input_suffix("transcribe"), Some("video.audio-extracted"));
        assert_eq!(input_suffix("discover"), Some("commands"));
        assert!(input_suffix("nope").is_none());
    }
}
