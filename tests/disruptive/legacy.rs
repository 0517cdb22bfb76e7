//! What the bridge tests of both test binaries share: names of their own
//! (queues, exchanges, topic prefix) so that tests leave each other alone;
//! a legacy producer written directly against lapin, as the old system's
//! producers are (not the adapter's code); a mixed workload of valid and
//! malformed commands that knows what should become of each; and readers
//! of what came out (the commands topic, the dead-letter queue).

// Each test binary uses part of this module.
#![allow(dead_code)]

use std::collections::HashMap;
use std::time::{Duration, Instant};

use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions,
    ExchangeDeleteOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use secrecy::ExposeSecret;
use vidpipe::config::Config;
use vidpipe::records::{Command, Record};
use vidpipe::template::codec::Codec;

use crate::helpers::{missing, unique};

/// The stages' legacy queues, in the bridge's order.
pub const STAGES: [&str; 5] = [
    "discover",
    "download",
    "extract-audio",
    "transcribe",
    "summarize",
];

/// Header that tags every test message with its number.
pub const N_HEADER: &str = "x-test-n";

/// Queue, exchange and topic names of one test.
#[derive(Debug, Clone)]
pub struct Names {
    pub prefix: String,
    /// discovery, download, audio extraction, transcription, summarization.
    pub queues: [String; 5],
    pub dlx: String,
    pub dlq: String,
    pub events: String,
}

impl Names {
    pub fn new(tag: &str) -> Self {
        let base = unique(tag);
        let q = |name: &str| format!("{base}.{name}");
        Self {
            prefix: format!("{base}."),
            queues: [
                q("discovery_queue"),
                q("download_queue"),
                q("audio_extraction_queue"),
                q("transcription_queue"),
                q("summarization_queue"),
            ],
            dlx: q("dlx"),
            dlq: q("dead-letters"),
            events: q("events"),
        }
    }

    /// Points a configuration's topics and bridge at these names.
    pub fn apply(&self, c: &mut Config) {
        c.topic_prefix = self.prefix.clone();
        let b = &mut c.bridge;
        b.discovery_queue = self.queues[0].clone();
        b.download_queue = self.queues[1].clone();
        b.audio_extraction_queue = self.queues[2].clone();
        b.transcription_queue = self.queues[3].clone();
        b.summarization_queue = self.queues[4].clone();
        b.dead_letter_exchange = self.dlx.clone();
        b.dead_letter_queue = self.dlq.clone();
        b.events_exchange = self.events.clone();
        b.reconnect_max_ms = 2_000;
    }

    /// The same as environment variables, for `vidpipe bridge` children.
    pub fn env(&self) -> Vec<(String, String)> {
        let mut env = vec![("VIDPIPE_TOPIC_PREFIX".to_string(), self.prefix.clone())];
        let keys = [
            "DISCOVERY_QUEUE",
            "DOWNLOAD_QUEUE",
            "AUDIO_EXTRACTION_QUEUE",
            "TRANSCRIPTION_QUEUE",
            "SUMMARIZATION_QUEUE",
        ];
        for (k, q) in keys.iter().zip(&self.queues) {
            env.push((format!("VIDPIPE_BRIDGE__{k}"), q.clone()));
        }
        env.push((
            "VIDPIPE_BRIDGE__DEAD_LETTER_EXCHANGE".into(),
            self.dlx.clone(),
        ));
        env.push(("VIDPIPE_BRIDGE__DEAD_LETTER_QUEUE".into(), self.dlq.clone()));
        env.push((
            "VIDPIPE_BRIDGE__EVENTS_EXCHANGE".into(),
            self.events.clone(),
        ));
        env.push(("VIDPIPE_BRIDGE__RECONNECT_MAX_MS".into(), "2000".into()));
        env
    }

    /// Deletes the queues and exchanges (they are durable and would stay).
    pub async fn delete(&self, c: &Config) {
        let conn = connect(c).await;
        let ch = conn.create_channel().await.expect("channel");
        for q in self.queues.iter().chain([&self.dlq]) {
            let _ = ch
                .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
        for x in [&self.dlx, &self.events] {
            let _ = ch
                .exchange_delete(x.as_str().into(), ExchangeDeleteOptions::default())
                .await;
        }
        let _ = conn.close(200, "bye".into()).await;
    }
}

/// Connects to the stack's RabbitMQ or fails naming it.
pub async fn connect(c: &Config) -> Connection {
    try_connect(c)
        .await
        .unwrap_or_else(|e| missing("RabbitMQ", "the stack's amqp_url", e))
}

pub async fn try_connect(c: &Config) -> Result<Connection, lapin::Error> {
    Connection::connect(
        c.amqp_url.expose_secret(),
        ConnectionProperties::default().with_connection_name("vidpipe-test-legacy".into()),
    )
    .await
}

/// What should become of a test message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expect {
    /// A command on Kafka, starting at this stage, for this URL or video.
    Valid {
        start_stage: Option<&'static str>,
        url: Option<String>,
        video_id: Option<String>,
    },
    /// Dead-lettered with this reason.
    Rejected(&'static str),
}

/// One legacy message.
#[derive(Debug, Clone)]
pub struct Legacy {
    pub n: usize,
    /// Index into [`Names::queues`].
    pub queue: usize,
    pub body: Vec<u8>,
    pub message_id: Option<String>,
    pub expect: Expect,
}

impl Legacy {
    pub fn properties(&self) -> BasicProperties {
        let mut headers = FieldTable::default();
        headers.insert(N_HEADER.into(), AMQPValue::LongLongInt(self.n as i64));
        let mut p = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into())
            .with_headers(headers);
        if let Some(id) = &self.message_id {
            p = p.with_message_id(id.as_str().into());
        }
        p
    }
}

/// `count` messages over the five queues; every `malformed_every`-th one
/// is malformed (in turn: bad JSON, not an object, a missing field, a
/// field of the wrong type, a bad URL, an unknown stage, a stage command
/// without its video). Valid ones carry their number as option `n`; half
/// have a message id, half get a hashed id.
pub fn workload(tag: &str, count: usize, malformed_every: usize) -> Vec<Legacy> {
    let mut out = Vec::with_capacity(count);
    let mut bad = 0;
    for n in 0..count {
        let message_id = (n % 2 == 1).then(|| format!("{tag}-{n}"));
        if malformed_every > 0 && n % malformed_every == malformed_every - 1 {
            let (queue, body, reason): (usize, String, &'static str) = match bad % 7 {
                0 => (0, format!("{{\"url\": \"https://x.test/{n}"), "bad_json"),
                1 => (0, format!("[{n}, 2]"), "not_an_object"),
                2 => (
                    0,
                    format!("{{\"requested_by\": \"n{n}\"}}"),
                    "missing_field",
                ),
                3 => (0, format!("{{\"url\": {n}}}"), "bad_field"),
                4 => (
                    0,
                    format!("{{\"url\": \"ftp://x.test/{n}.mp4\"}}"),
                    "bad_url",
                ),
                5 => (
                    1,
                    format!("{{\"video_id\": \"v{n}\", \"stage\": \"dance\"}}"),
                    "unknown_stage",
                ),
                _ => (
                    3,
                    format!("{{\"url\": \"https://x.test/{n}.mp4\"}}"),
                    "missing_field",
                ),
            };
            bad += 1;
            out.push(Legacy {
                n,
                queue,
                body: body.into_bytes(),
                message_id,
                expect: Expect::Rejected(reason),
            });
            continue;
        }
        let queue = n % 5;
        let (body, expect) = if queue == 0 {
            let url = format!("https://media.test/{tag}/{n}.mp4");
            let body = serde_json::json!({
                "url": url,
                "requested_by": "legacy-producer",
                "options": {"n": n, "lang": "en"},
            });
            let expect = Expect::Valid {
                start_stage: None,
                url: Some(url),
                video_id: None,
            };
            (body, expect)
        } else {
            let video = format!("url:{tag}{n}");
            let body = serde_json::json!({
                "video_id": video,
                "requested_by": "legacy-producer",
                "options": {"n": n},
            });
            let expect = Expect::Valid {
                start_stage: Some(STAGES[queue]),
                url: None,
                video_id: Some(video),
            };
            (body, expect)
        };
        out.push(Legacy {
            n,
            queue,
            body: body.to_string().into_bytes(),
            message_id,
            expect,
        });
    }
    out
}

/// A publisher with confirms that reconnects and republishes whatever was
/// not confirmed (so a broker restart can leave a message in a queue
/// twice, as with any at-least-once producer).
pub struct Publisher {
    config: Config,
    link: Option<(Connection, Channel)>,
    pub republished: usize,
}

impl Publisher {
    pub fn new(config: &Config) -> Self {
        Self {
            config: config.clone(),
            link: None,
            republished: 0,
        }
    }

    async fn channel(&mut self) -> &Channel {
        let deadline = Instant::now() + Duration::from_secs(180);
        while self.link.is_none() {
            let error = match try_connect(&self.config).await {
                Ok(conn) => match conn.create_channel().await {
                    Ok(ch) => match ch.confirm_select(ConfirmSelectOptions::default()).await {
                        Ok(()) => {
                            self.link = Some((conn, ch));
                            break;
                        }
                        Err(e) => e,
                    },
                    Err(e) => e,
                },
                Err(e) => e,
            };
            assert!(
                Instant::now() < deadline,
                "RabbitMQ did not come back within 180 s: {error}"
            );
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        match &self.link {
            Some((_, ch)) => ch,
            None => unreachable!("connected above"),
        }
    }

    /// Declares a queue as a legacy producer does (durable, no arguments).
    pub async fn declare(&mut self, queue: &str) {
        let ch = self.channel().await;
        ch.queue_declare(
            queue.into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("declare a legacy queue");
    }

    /// Publishes until the broker confirms.
    pub async fn publish(&mut self, queue: &str, m: &Legacy) {
        let mut first = true;
        loop {
            if !first {
                self.republished += 1;
            }
            first = false;
            let props = m.properties();
            let ch = self.channel().await;
            let sent = async {
                ch.basic_publish(
                    "".into(),
                    ShortString::from(queue),
                    BasicPublishOptions::default(),
                    &m.body,
                    props,
                )
                .await?
                .await
            }
            .await;
            match sent {
                Ok(Confirmation::Ack(_)) => return,
                Ok(other) => panic!("the broker did not take a message: {other:?}"),
                Err(_) => {
                    self.link = None;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }

    pub async fn close(mut self) {
        if let Some((conn, _)) = self.link.take() {
            let _ = conn.close(200, "bye".into()).await;
        }
    }
}

/// Ready messages in a queue (not those delivered and unacknowledged).
pub async fn depth(c: &Config, queue: &str) -> u32 {
    depth_if_declared(c, queue)
        .await
        .unwrap_or_else(|| panic!("queue {queue} does not exist"))
}

/// Like [`depth`], but `None` while nobody has declared the queue yet (a
/// queue the bridge declares when it starts).
pub async fn depth_if_declared(c: &Config, queue: &str) -> Option<u32> {
    let conn = connect(c).await;
    let ch = conn.create_channel().await.expect("channel");
    let q = ch
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await;
    let _ = conn.close(200, "bye".into()).await;
    match q {
        Ok(q) => Some(q.message_count()),
        Err(e) if e.to_string().contains("NOT_FOUND") => None,
        Err(e) => panic!("queue {queue}: {e}"),
    }
}

/// A dead letter: the test number of the message and the reason headers.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub n: Option<i64>,
    pub reason: String,
    pub error: String,
    pub queue: String,
    pub command_id: String,
}

fn header_text(h: &FieldTable, key: &str) -> String {
    match h.inner().get(key) {
        Some(AMQPValue::LongString(s)) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

/// Takes every message from the dead-letter queue.
pub async fn drain_dead_letters(c: &Config, dlq: &str) -> Vec<DeadLetter> {
    let conn = connect(c).await;
    let ch = conn.create_channel().await.expect("channel");
    let mut out = Vec::new();
    while let Some(m) = ch
        .basic_get(dlq.into(), BasicGetOptions::default())
        .await
        .expect("basic.get from the dead-letter queue")
    {
        let headers = m.delivery.properties.headers().clone().unwrap_or_default();
        let n = match headers.inner().get(N_HEADER) {
            Some(AMQPValue::LongLongInt(n)) => Some(*n),
            _ => None,
        };
        out.push(DeadLetter {
            n,
            reason: header_text(&headers, "x-vidpipe-reason"),
            error: header_text(&headers, "x-vidpipe-error"),
            queue: header_text(&headers, "x-vidpipe-queue"),
            command_id: header_text(&headers, "x-vidpipe-command-id"),
        });
        m.delivery
            .ack(BasicAckOptions::default())
            .await
            .expect("ack");
    }
    let _ = conn.close(200, "bye".into()).await;
    out
}

/// Every command record on `<prefix>commands`, read up to the end.
pub async fn commands(c: &Config) -> Vec<Command> {
    let cc = c.clone();
    let raw = tokio::task::spawn_blocking(move || {
        let topic = cc.topic("commands");
        let reader: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &cc.kafka_brokers)
            .set("group.id", unique("verify"))
            .set("enable.auto.commit", "false")
            .create()
            .unwrap_or_else(|e| missing("Kafka", &cc.kafka_brokers, e));
        let md = reader
            .fetch_metadata(Some(&topic), Duration::from_secs(10))
            .unwrap_or_else(|e| missing("Kafka", &cc.kafka_brokers, e));
        let parts: Vec<i32> = md.topics()[0].partitions().iter().map(|p| p.id()).collect();
        let mut tpl = TopicPartitionList::new();
        let mut ends = HashMap::new();
        for p in &parts {
            // Right after a broker restart a partition may have no leader
            // for a few seconds.
            let deadline = Instant::now() + Duration::from_secs(60);
            let high = loop {
                match reader.fetch_watermarks(&topic, *p, Duration::from_secs(10)) {
                    Ok((_, high)) => break high,
                    Err(e) => {
                        assert!(Instant::now() < deadline, "watermarks of {topic}: {e}");
                        std::thread::sleep(Duration::from_millis(500));
                    }
                }
            };
            ends.insert(*p, high);
            tpl.add_partition_offset(&topic, *p, Offset::Beginning)
                .unwrap();
        }
        reader.assign(&tpl).unwrap();
        let mut next: HashMap<i32, i64> = parts.iter().map(|p| (*p, 0)).collect();
        let mut out = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        while next.iter().any(|(p, o)| *o < ends[p]) {
            assert!(
                Instant::now() < deadline,
                "could not read {topic} to its end"
            );
            if let Some(Ok(m)) = reader.poll(Duration::from_millis(200)) {
                next.insert(m.partition(), m.offset() + 1);
                out.push(m.payload().unwrap_or_default().to_vec());
            }
        }
        out
    })
    .await
    .expect("reader thread");
    let dec = Codec::new(c.schema_registry_url.as_deref())
        .expect("codec")
        .decoder(Command::SCHEMA)
        .expect("decoder");
    let mut out = Vec::with_capacity(raw.len());
    for bytes in raw {
        out.push(dec.decode(&bytes).await.expect("a command record decodes"));
    }
    out
}

/// Checks what became of `sent`: each valid message exactly once on Kafka
/// with the right fields (`strict`: one record per command; otherwise one
/// command id, possibly repeated, whose repeats are counted and returned),
/// each malformed one in `dead` with its reason, nothing else anywhere.
pub fn check_outcome(
    sent: &[Legacy],
    records: &[Command],
    dead: &[DeadLetter],
    strict: bool,
) -> usize {
    let mut by_n: HashMap<usize, Vec<&Command>> = HashMap::new();
    for r in records {
        let n: usize = r
            .options
            .get("n")
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("a record without option n: {r:?}"));
        by_n.entry(n).or_default().push(r);
    }
    let mut dead_by_n: HashMap<i64, Vec<&DeadLetter>> = HashMap::new();
    for d in dead {
        let n =
            d.n.unwrap_or_else(|| panic!("a dead letter without {N_HEADER}: {d:?}"));
        dead_by_n.entry(n).or_default().push(d);
    }
    let mut repeats = 0;
    let mut valid = 0;
    let mut rejected = 0;
    for m in sent {
        match &m.expect {
            Expect::Valid {
                start_stage,
                url,
                video_id,
            } => {
                valid += 1;
                let got = by_n
                    .get(&m.n)
                    .unwrap_or_else(|| panic!("valid message {} is not on Kafka", m.n));
                let ids: std::collections::BTreeSet<&str> =
                    got.iter().map(|r| r.command_id.as_str()).collect();
                assert_eq!(
                    ids.len(),
                    1,
                    "message {} has several command ids: {ids:?}",
                    m.n
                );
                if strict {
                    assert_eq!(
                        got.len(),
                        1,
                        "message {} is on Kafka {} times",
                        m.n,
                        got.len()
                    );
                }
                repeats += got.len() - 1;
                let r = got[0];
                if let Some(id) = &m.message_id {
                    assert_eq!(&r.command_id, id, "the message id is the command id");
                } else {
                    assert!(r.command_id.starts_with("amqp:"), "{}", r.command_id);
                }
                assert_eq!(r.start_stage.as_deref(), *start_stage, "message {}", m.n);
                assert_eq!(r.url, *url, "message {}", m.n);
                match (video_id, url) {
                    (Some(v), _) => assert_eq!(&r.meta.video_id, v),
                    (None, Some(u)) => {
                        let u = vidpipe::ids::normalise(u).unwrap();
                        assert_eq!(r.meta.video_id, vidpipe::ids::subject(&u, false));
                    }
                    (None, None) => unreachable!(),
                }
                assert_eq!(r.requested_by.as_deref(), Some("legacy-producer"));
                assert!(
                    !dead_by_n.contains_key(&(m.n as i64)),
                    "valid {} dead-lettered",
                    m.n
                );
            }
            Expect::Rejected(reason) => {
                rejected += 1;
                let got = dead_by_n.get(&(m.n as i64)).unwrap_or_else(|| {
                    panic!("malformed message {} ({reason}) is not dead-lettered", m.n)
                });
                for d in got {
                    assert_eq!(d.reason, *reason, "message {}: {d:?}", m.n);
                    assert!(!d.error.is_empty(), "a dead letter says why: {d:?}");
                }
                assert!(!by_n.contains_key(&m.n), "malformed {} reached Kafka", m.n);
            }
        }
    }
    let known: std::collections::HashSet<usize> = sent.iter().map(|m| m.n).collect();
    assert!(
        by_n.keys().all(|n| known.contains(n)),
        "records of unknown messages"
    );
    eprintln!(
        "{valid} valid commands on Kafka ({} records, {repeats} repeats), {rejected} dead-lettered ({} dead letters)",
        records.len(),
        dead.len()
    );
    repeats
}
