//! Shared test fixtures: the stack's configuration, fresh databases, random
//! topic names, and failures that say which service is missing.

use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use sqlx::PgPool;
use vidpipe::config::Config;

/// Writes `body` to `path` as an executable script (a stand-in for a tool).
pub fn script(path: &std::path::Path, body: &str) {
    std::fs::write(path, body).expect("write the script");
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("make it executable");
}

/// The configuration a program on this machine gets with nothing set: the
/// built-in defaults plus the env file of the running stack.
pub fn config() -> Config {
    Config::local_defaults().expect("the local stack's configuration must load")
}

/// A short random suffix for names of topics, groups and databases.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::new_v4().simple())
}

/// Fails the test with a message naming the missing service.
#[track_caller]
pub fn missing(service: &str, address: &str, err: impl std::fmt::Display) -> ! {
    panic!(
        "{service} is not reachable at {address}: {err}\n\
         start the local stack first: scripts/stack up (or run the whole suite with scripts/test)"
    )
}

/// A Kafka admin client for the stack's broker.
pub fn kafka_admin(config: &Config) -> AdminClient<DefaultClientContext> {
    ClientConfig::new()
        .set("bootstrap.servers", &config.kafka_brokers)
        .create()
        .unwrap_or_else(|e| missing("Kafka", &config.kafka_brokers, e))
}

/// Creates a topic with a random name and the given partition count.
pub async fn create_topic(config: &Config, prefix: &str, partitions: i32) -> String {
    let name = unique(prefix);
    let admin = kafka_admin(config);
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let results = admin
        .create_topics(
            &[NewTopic::new(&name, partitions, TopicReplication::Fixed(1))],
            &opts,
        )
        .await
        .unwrap_or_else(|e| missing("Kafka", &config.kafka_brokers, e));
    for r in results {
        if let Err((topic, code)) = r {
            panic!("cannot create topic {topic}: {code}");
        }
    }
    name
}

/// A fresh database with a random name and the migrations applied.
pub async fn fresh_database(config: &Config) -> (PgPool, String) {
    let admin = vidpipe::store::db::connect(&config.database_url, 1)
        .await
        .unwrap_or_else(|e| {
            missing(
                "PostgreSQL",
                &vidpipe::store::db::describe(&config.database_url),
                e,
            )
        });
    let name = unique("vidpipe_test");
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&admin)
        .await
        .expect("the vidpipe role may create databases");
    admin.close().await;
    let mut url = url::Url::parse(secrecy::ExposeSecret::expose_secret(&config.database_url))
        .expect("database_url parses");
    url.set_path(&name);
    let url: secrecy::SecretString = url.to_string().into();
    let pool = vidpipe::store::db::connect(&url, 4)
        .await
        .expect("connect to the fresh database");
    vidpipe::store::db::migrate(&pool)
        .await
        .expect("migrations apply to a fresh database");
    (pool, name)
}

/// A fresh migrated database (see [`fresh_database`]) and its URL, for
/// configurations and child processes.
pub async fn fresh_database_url(config: &Config) -> (PgPool, secrecy::SecretString) {
    let (pool, name) = fresh_database(config).await;
    let mut url = url::Url::parse(secrecy::ExposeSecret::expose_secret(&config.database_url))
        .expect("database_url parses");
    url.set_path(&name);
    (pool, url.to_string().into())
}

/// Every record of `topic` that a read_committed reader finds from the
/// start (a new group each call), reading until nothing new arrives for
/// `idle`.
pub async fn read_all(
    config: &Config,
    topic: &str,
    idle: Duration,
) -> Vec<rdkafka::message::OwnedMessage> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let (brokers, topic) = (config.kafka_brokers.clone(), topic.to_string());
    tokio::task::spawn_blocking(move || {
        let reader: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .set("group.id", unique("reader"))
            .set("auto.offset.reset", "earliest")
            .set("isolation.level", "read_committed")
            .set("enable.auto.commit", "false")
            .create()
            .unwrap_or_else(|e| missing("Kafka", &brokers, e));
        reader.subscribe(&[&topic]).expect("subscribe");
        let mut out = Vec::new();
        let mut last = std::time::Instant::now();
        while last.elapsed() < idle {
            if let Some(Ok(m)) = reader.poll(Duration::from_millis(200)) {
                out.push(m.detach());
                last = std::time::Instant::now();
            }
        }
        out
    })
    .await
    .expect("reader thread")
}

/// The series of metric `name` that a process serves at
/// `http://{addr}/metrics` (Prometheus text format): each one's labels (the
/// text between the braces) and value.
pub async fn metric_series(addr: &str, name: &str) -> Vec<(String, f64)> {
    let text = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .and_then(|r| r.error_for_status())
        .unwrap_or_else(|e| panic!("http://{addr}/metrics: {e}"))
        .text()
        .await
        .expect("metrics text");
    text.lines()
        .filter_map(|line| {
            let rest = line.strip_prefix(name)?;
            let (labels, value) = match rest.strip_prefix('{') {
                Some(r) => r.split_once('}')?,
                None if rest.starts_with(' ') => ("", rest),
                None => return None,
            };
            Some((labels.to_owned(), value.trim().parse().ok()?))
        })
        .collect()
}

/// A loopback port free at the time of asking.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}
