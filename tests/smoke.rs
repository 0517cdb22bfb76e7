//! Smoke tests: each real service of the local stack does the one thing
//! vidpipe relies on it for.

use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use schema_registry_converter::async_impl::schema_registry::{
    SrSettings, get_schema_by_id, post_schema,
};
use schema_registry_converter::schema_registry_common::{SchemaType, SuppliedSchema};

use crate::helpers::{config, create_topic, fresh_database, missing, unique};

#[tokio::test(flavor = "multi_thread")]
async fn kafka_transactions_commit_and_abort_for_a_read_committed_reader() {
    let config = config();
    let topic = create_topic(&config, "smoke_txn", 1).await;
    let brokers = config.kafka_brokers.clone();
    let t = topic.clone();
    // The transactional calls block on the broker: keep them off the executor.
    tokio::task::spawn_blocking(move || {
        let producer: BaseProducer = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .set("transactional.id", unique("smoke_txn"))
            .create()
            .unwrap_or_else(|e| missing("Kafka", &brokers, e));
        let timeout = Duration::from_secs(30);
        producer
            .init_transactions(timeout)
            .unwrap_or_else(|e| missing("Kafka transactions", &brokers, e));
        for (value, commit) in [("committed", true), ("aborted", false), ("after", true)] {
            producer.begin_transaction().expect("begin");
            producer
                .send(BaseRecord::to(&t).key("video-1").payload(value))
                .map_err(|(e, _)| e)
                .expect("enqueue");
            if commit {
                producer.commit_transaction(timeout).expect("commit");
            } else {
                producer.flush(timeout).expect("flush");
                producer.abort_transaction(timeout).expect("abort");
            }
        }
    })
    .await
    .expect("producer thread");

    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &config.kafka_brokers)
        .set("group.id", unique("smoke_reader"))
        .set("isolation.level", "read_committed")
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(&topic, 0, Offset::Beginning)
        .expect("tpl");
    consumer.assign(&tpl).expect("assign");
    let seen = tokio::task::spawn_blocking(move || {
        let mut seen = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        while seen.len() < 2 && Instant::now() < deadline {
            if let Some(msg) = consumer.poll(Duration::from_millis(200)) {
                let msg = msg.expect("consume");
                seen.push(String::from_utf8_lossy(msg.payload().unwrap_or_default()).into_owned());
            }
        }
        // Anything after the second record would be the aborted one leaking.
        if let Some(Ok(extra)) = consumer.poll(Duration::from_secs(1)) {
            seen.push(String::from_utf8_lossy(extra.payload().unwrap_or_default()).into_owned());
        }
        seen
    })
    .await
    .expect("consumer thread");
    assert_eq!(seen, vec!["committed".to_string(), "after".to_string()]);
}

#[tokio::test]
async fn schema_registry_stores_an_avro_schema_and_returns_it_by_id() {
    let config = config();
    let url = config
        .schema_registry_url
        .clone()
        .expect("the local stack configures a schema registry");
    let sr = SrSettings::new(url.clone());
    let name = unique("Smoke");
    let schema = format!(
        r#"{{"type":"record","name":"{name}","namespace":"vidpipe.test","fields":[{{"name":"video_id","type":"string"}},{{"name":"generation","type":"long"}}]}}"#
    );
    let subject = format!("{}-value", unique("smoke"));
    let registered = post_schema(
        &sr,
        subject.clone(),
        SuppliedSchema::new(
            Some(format!("vidpipe.test.{name}")),
            SchemaType::Avro,
            schema.clone(),
        ),
    )
    .await
    .unwrap_or_else(|e| missing("the schema registry", &url, e));
    let fetched = get_schema_by_id(registered.id, &sr)
        .await
        .expect("get by id");
    let expected = apache_avro::Schema::parse_str(&schema).expect("our schema parses");
    let got = apache_avro::Schema::parse_str(&fetched.schema).expect("registry's schema parses");
    assert_eq!(expected.canonical_form(), got.canonical_form());

    // The Confluent API also lists the subject with version 1.
    let versions: Vec<u32> = reqwest::get(format!("{url}/subjects/{subject}/versions"))
        .await
        .expect("list versions")
        .json()
        .await
        .expect("versions are JSON");
    assert_eq!(versions, vec![1]);
}

#[tokio::test]
async fn postgres_round_trip_on_a_fresh_migrated_database() {
    let config = config();
    let (pool, name) = fresh_database(&config).await;
    let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations WHERE success")
        .fetch_one(&pool)
        .await
        .expect("migrations table");
    assert_eq!(
        applied as usize,
        vidpipe::store::db::MIGRATOR.iter().count()
    );
    sqlx::query("INSERT INTO videos (id, url, status) VALUES ($1, $2, 'queued')")
        .bind("yt:abc")
        .bind("https://example.org/v")
        .execute(&pool)
        .await
        .expect("insert");
    let (url, status): (String, String) =
        sqlx::query_as("SELECT url, status FROM videos WHERE id = $1")
            .bind("yt:abc")
            .fetch_one(&pool)
            .await
            .expect("select");
    assert_eq!(
        (url.as_str(), status.as_str()),
        ("https://example.org/v", "queued")
    );
    let db: String = sqlx::query_scalar("SELECT current_database()")
        .fetch_one(&pool)
        .await
        .expect("current_database");
    assert_eq!(db, name);
}

#[tokio::test]
async fn rabbitmq_publish_is_confirmed_and_consumed() {
    use lapin::options::{
        BasicAckOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions,
        QueueDeclareOptions,
    };
    use lapin::types::FieldTable;
    use lapin::{BasicProperties, Connection, ConnectionProperties};
    use secrecy::ExposeSecret;

    let config = config();
    let conn = Connection::connect(
        config.amqp_url.expose_secret(),
        ConnectionProperties::default(),
    )
    .await
    .unwrap_or_else(|e| missing("RabbitMQ", "the configured amqp_url", e));
    let channel = conn.create_channel().await.expect("channel");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm_select");
    let queue = unique("smoke");
    channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("declare");
    let confirm = channel
        .basic_publish(
            "".into(),
            queue.as_str().into(),
            BasicPublishOptions::default(),
            br#"{"url":"https://example.org/v"}"#,
            BasicProperties::default(),
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
    assert!(confirm.is_ack(), "the broker must confirm the publish");
    let mut got = None;
    for _ in 0..50 {
        if let Some(msg) = channel
            .basic_get(queue.as_str().into(), BasicGetOptions::default())
            .await
            .expect("get")
        {
            got = Some(msg);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let msg = got.expect("the published message arrives");
    assert_eq!(msg.delivery.data, br#"{"url":"https://example.org/v"}"#);
    msg.delivery
        .ack(BasicAckOptions::default())
        .await
        .expect("ack");
    conn.close(200, "done".into()).await.ok();
}

#[tokio::test]
async fn asr_server_transcribes_a_spoken_clip() {
    let config = config();
    let dir = tempfile::tempdir().expect("tempdir");
    let wav = dir.path().join("fox.wav");
    let status = tokio::process::Command::new("espeak-ng")
        .arg("-w")
        .arg(&wav)
        .arg("the quick brown fox jumps over the lazy dog")
        .status()
        .await
        .unwrap_or_else(|e| missing("espeak-ng", "PATH", e));
    assert!(status.success(), "espeak-ng failed: {status}");
    let bytes = tokio::fs::read(&wav).await.expect("read clip");
    let form = reqwest::multipart::Form::new()
        .part(
            "file",
            reqwest::multipart::Part::bytes(bytes)
                .file_name("fox.wav")
                .mime_str("audio/wav")
                .expect("mime"),
        )
        .text("model", config.asr_model.clone())
        .text("response_format", "json");
    let url = format!("{}/audio/transcriptions", config.asr_url);
    let response = reqwest::Client::new()
        .post(&url)
        .timeout(Duration::from_secs(120))
        .multipart(form)
        .send()
        .await
        .unwrap_or_else(|e| missing("the ASR server", &url, e));
    let status = response.status();
    let body: serde_json::Value = response.json().await.expect("JSON answer");
    assert!(status.is_success(), "ASR answered {status}: {body}");
    let text = body["text"].as_str().unwrap_or_default().to_lowercase();
    for word in ["quick", "fox", "dog"] {
        assert!(text.contains(word), "transcript {text:?} lacks {word:?}");
    }
}
