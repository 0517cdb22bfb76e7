//! The producers that serve librdkafka without spinning
//! (`vidpipe::template::produce`), on the stack's real Kafka.

use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseProducer, BaseRecord, FutureRecord, Producer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use vidpipe::template::produce::{self, AckProducer, serve_until};

use crate::helpers::{config, create_topic, missing, unique};

/// Reads the record at `offset` of `topic`'s `partition`.
async fn record_at(brokers: &str, topic: &str, partition: i32, offset: i64) -> (String, String) {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", unique("acks_reader"))
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, Offset::Offset(offset))
        .expect("tpl");
    consumer.assign(&tpl).expect("assign");
    tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Some(m) = consumer.poll(Duration::from_millis(200)) {
                let m = m.expect("consume");
                let text =
                    |b: Option<&[u8]>| String::from_utf8_lossy(b.unwrap_or_default()).into_owned();
                return (text(m.key()), text(m.payload()));
            }
        }
        panic!("no record at offset {offset} within 30 s");
    })
    .await
    .expect("consumer thread")
}

#[tokio::test(flavor = "multi_thread")]
async fn each_send_resolves_with_where_its_record_landed() {
    let config = config();
    let topic = create_topic(&config, "acks", 2).await;
    let producer = AckProducer::new(&produce::idempotent(
        &config.kafka_brokers,
        Duration::from_secs(15),
    ))
    .expect("producer");
    let keys = ["video-a", "video-b", "video-c", "video-d"];
    let sends = keys.iter().map(|k| {
        let payload = format!("payload of {k}");
        let producer = &producer;
        let topic = &topic;
        async move {
            producer
                .send(
                    FutureRecord::to(topic).key(*k).payload(&payload),
                    Duration::from_secs(5),
                )
                .await
        }
    });
    let landed = futures::future::join_all(sends).await;
    for (k, acked) in keys.iter().zip(landed) {
        let (partition, offset) = acked.expect("each send is acknowledged");
        let (key, payload) = record_at(&config.kafka_brokers, &topic, partition, offset).await;
        assert_eq!(key, *k);
        assert_eq!(payload, format!("payload of {k}"));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_record_the_client_refuses_fails_its_send_at_once() {
    let config = config();
    let topic = create_topic(&config, "acks_refused", 1).await;
    let producer = AckProducer::new(
        ClientConfig::new()
            .set("bootstrap.servers", &config.kafka_brokers)
            .set("message.max.bytes", "1000"),
    )
    .expect("producer");
    let big = vec![b'x'; 5000];
    let start = Instant::now();
    let err = producer
        .send(
            FutureRecord::<str, _>::to(&topic).payload(&big),
            Duration::from_secs(5),
        )
        .await
        .expect_err("a record over message.max.bytes");
    // Refused by the client itself, not after a broker round trip or the
    // 5 s queue timeout (a generous bound: it takes microseconds).
    assert!(start.elapsed() < Duration::from_secs(2));
    assert_eq!(
        err,
        KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge)
    );
    // The producer is still usable for records it accepts.
    let (partition, offset) = producer
        .send(
            FutureRecord::to(&topic).key("k").payload("small"),
            Duration::from_secs(5),
        )
        .await
        .expect("a small record");
    assert_eq!((partition, offset), (0, 0));
}

#[tokio::test(flavor = "multi_thread")]
async fn serve_until_returns_once_acknowledged_or_at_its_deadline() {
    let config = config();
    let topic = create_topic(&config, "serve_until", 1).await;
    let brokers = config.kafka_brokers.clone();
    tokio::task::spawn_blocking(move || {
        let producer: BaseProducer = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .create()
            .expect("producer");
        producer
            .send(BaseRecord::to(&topic).key("k").payload("v"))
            .map_err(|(e, _)| e)
            .expect("enqueue");
        assert_eq!(producer.in_flight_count(), 1);
        let start = Instant::now();
        let acked = serve_until(&producer, start + Duration::from_secs(30), || {
            producer.in_flight_count() == 0
        });
        if !acked {
            missing("Kafka", &brokers, "no acknowledgement within 30 s");
        }
        // It returned on the acknowledgement, not at its deadline.
        assert!(start.elapsed() < Duration::from_secs(20));
        // A condition that never holds: it returns false, and not before
        // its deadline.
        let start = Instant::now();
        let wait = Duration::from_millis(50);
        assert!(!serve_until(&producer, start + wait, || false));
        assert!(start.elapsed() >= wait);
    })
    .await
    .expect("producer thread");
}

#[tokio::test(flavor = "multi_thread")]
async fn sends_wait_for_room_in_a_full_queue_until_their_queue_timeout() {
    let config = config();
    let topic = create_topic(&config, "acks_full", 1).await;
    // Room for one record, held for a second before it is sent: every
    // other send finds the queue full until then.
    let producer = AckProducer::new(
        produce::idempotent(&config.kafka_brokers, Duration::from_secs(15))
            .set("queue.buffering.max.messages", "1")
            .set("linger.ms", "1000"),
    )
    .expect("producer");
    let first = producer.send(
        FutureRecord::to(&topic).key("k").payload("0"),
        Duration::from_secs(10),
    );
    let refused = async {
        // Let the first one take the only place.
        tokio::time::sleep(Duration::from_millis(100)).await;
        producer
            .send(
                FutureRecord::to(&topic).key("k").payload("refused"),
                Duration::ZERO,
            )
            .await
    };
    let later = (1..4).map(|i| {
        let payload = i.to_string();
        let producer = &producer;
        let topic = &topic;
        async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            producer
                .send(
                    FutureRecord::to(topic).key("k").payload(&payload),
                    Duration::from_secs(10),
                )
                .await
                .map(|acked| (payload, acked))
        }
    });
    let (first, refused, later) = tokio::join!(first, refused, futures::future::join_all(later));
    assert_eq!(
        refused.expect_err("no room and no time to wait for it"),
        KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull)
    );
    assert_eq!(first.expect("the first record"), (0, 0));
    let mut offsets = Vec::new();
    for sent in later {
        let (payload, (partition, offset)) = sent.expect("a record that waited for room");
        assert_eq!(partition, 0);
        let (_, stored) = record_at(&config.kafka_brokers, &topic, 0, offset).await;
        assert_eq!(stored, payload);
        offsets.push(offset);
    }
    offsets.sort();
    assert_eq!(offsets, vec![1, 2, 3]);
}
