//! Group membership under change, in exactly-once mode, with the copy stage
//! in child processes: instances leaving and rejoining (cooperative
//! rebalancing) and a zombie that wakes up after its partitions moved on.

use std::time::{Duration, Instant};

use vidpipe::config::Guarantee;

use crate::procs::{Harness, signal};

/// Owners of the stage's partition leases, one entry per partition.
async fn lease_owners(h: &Harness) -> Vec<String> {
    sqlx::query_scalar("SELECT owner FROM partition_leases ORDER BY partition")
        .fetch_all(&h.pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn instances_leaving_and_rejoining_lose_and_duplicate_nothing() {
    const RECORDS: i64 = 3_000;
    let h = Harness::new("rebalance", Guarantee::ExactlyOnce, 6, RECORDS, 150).await;
    let env = [("COPY_DELAY_MS", "5")];
    let probe = h.probe();
    let (mut a, mut b) = tokio::task::block_in_place(|| {
        let mut a = h.spawn("a", &env, None);
        let mut b = h.spawn("b", &env, None);
        h.wait_committed(
            &probe,
            RECORDS / 4,
            &mut [&mut a, &mut b],
            Duration::from_secs(120),
        );
        // A leaves gracefully: its partitions move to B.
        signal(&a, "TERM");
        let status = a.wait().unwrap();
        assert!(status.success(), "SIGTERM shuts down cleanly, got {status}");
        h.wait_committed(&probe, RECORDS / 2, &mut [&mut b], Duration::from_secs(120));
        // A joins again and takes its share back.
        let a = h.spawn("a", &env, None);
        (a, b)
    });
    // Both instances must own partitions again once the group settles.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let owners = lease_owners(&h).await;
        if owners.len() == 6 && owners.iter().any(|o| o == "a") && owners.iter().any(|o| o == "b") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the rejoined instance got no partitions: owners {owners:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::task::block_in_place(|| {
        h.wait_committed(
            &probe,
            RECORDS,
            &mut [&mut a, &mut b],
            Duration::from_secs(180),
        );
        for child in [&mut a, &mut b] {
            signal(child, "TERM");
            let status = child.wait().unwrap();
            assert!(status.success(), "SIGTERM shuts down cleanly, got {status}");
        }
    });
    h.assert_exactly_once().await;
    h.assert_status_terminal().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_zombie_is_fenced_in_kafka_and_in_the_database() {
    const RECORDS: i64 = 2_000;
    let h = Harness::new("zombie", Guarantee::ExactlyOnce, 4, RECORDS, 100).await;
    let dir = tempfile::tempdir().unwrap();
    let zombie_log = dir.path().join("zombie.log");
    // Slow records and many in flight, so the zombie is mid-work when stopped:
    // at 150 ms a record its partitions still hold most of their records when
    // the other instance has joined, even when a loaded machine makes the
    // join slow (at 50 ms the zombie sometimes finished first and had no
    // stale write left to be refused).
    let env = [
        ("COPY_DELAY_MS", "150"),
        ("VIDPIPE_RUNNER__IN_FLIGHT", "16"),
    ];
    let probe = h.probe();
    let mut zombie = tokio::task::block_in_place(|| {
        let mut z = h.spawn("zombie", &env, Some(&zombie_log));
        h.wait_committed(
            &probe,
            RECORDS / 10,
            &mut [&mut z],
            Duration::from_secs(120),
        );
        z
    });
    let mut healthy = h.spawn("healthy", &env, None);
    // Wait until both share the partitions, then freeze the zombie.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let owners = lease_owners(&h).await;
        if owners.iter().any(|o| o == "healthy") && owners.iter().any(|o| o == "zombie") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no shared assignment: {owners:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    signal(&zombie, "STOP");
    // Past the session timeout (6 s) the group gives everything to the other.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let owners = lease_owners(&h).await;
        if owners.len() == 4 && owners.iter().all(|o| o == "healthy") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the stopped instance's partitions were not reassigned: {owners:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Let the new owner make progress, then wake the zombie up.
    tokio::time::sleep(Duration::from_secs(2)).await;
    signal(&zombie, "CONT");
    tokio::task::block_in_place(|| {
        h.wait_committed(
            &probe,
            RECORDS,
            &mut [&mut zombie, &mut healthy],
            Duration::from_secs(180),
        );
        for child in [&mut zombie, &mut healthy] {
            signal(child, "TERM");
            let status = child.wait().unwrap();
            assert!(status.success(), "SIGTERM shuts down cleanly, got {status}");
        }
    });
    let log = std::fs::read_to_string(&zombie_log).unwrap();
    assert!(
        log.contains("partition lease lost"),
        "the zombie's database writes were not fenced; its log:\n{}",
        &log[log.len().saturating_sub(4000)..]
    );
    h.assert_exactly_once().await;
    h.assert_status_terminal().await;
}

/// An instance whose partitions are paused under load (its buffer full)
/// loses its membership and gets the same partitions back: it must consume
/// again (librdkafka keeps a partition paused across a revoke and a new
/// assignment, and the runner once trusted its own flag and stalled).
#[tokio::test(flavor = "multi_thread")]
async fn a_paused_instance_that_regains_its_partitions_consumes_again() {
    const RECORDS: i64 = 600;
    let h = Harness::new("repause", Guarantee::ExactlyOnce, 2, RECORDS, RECORDS).await;
    // Four in flight and a buffer of eight: the partitions are paused
    // nearly all the time.
    let env = [
        ("COPY_DELAY_MS", "20"),
        ("VIDPIPE_RUNNER__IN_FLIGHT", "4"),
        ("VIDPIPE_RUNNER__MAX_BUFFERED", "8"),
    ];
    let probe = h.probe();
    tokio::task::block_in_place(|| {
        let mut child = h.spawn("solo", &env, None);
        h.wait_committed(&probe, 40, &mut [&mut child], Duration::from_secs(120));
        // Past the session timeout (6 s): the group drops the member, which
        // rejoins when it wakes and is given its partitions again.
        signal(&child, "STOP");
        std::thread::sleep(Duration::from_secs(9));
        signal(&child, "CONT");
        h.wait_committed(&probe, RECORDS, &mut [&mut child], Duration::from_secs(180));
        signal(&child, "TERM");
        let status = child.wait().unwrap();
        assert!(status.success(), "SIGTERM shuts down cleanly, got {status}");
    });
    h.assert_exactly_once().await;
    h.assert_status_terminal().await;
}

/// A partition whose committed offset is unstable (another member's
/// transaction holds offsets for it, and that member is gone without
/// ending it) while its owner has to re-read it: here a rewind after the
/// owner's partition lease was taken. The coordinator answers "unstable"
/// until the broker aborts the transaction (its timeout, 45 s here), longer
/// than one read waits (30 s). The owner must wait; it used to start the
/// partitions over at offset 0, re-running and re-committing every record
/// (duplicate outputs; the zombie test met this by chance).
#[tokio::test(flavor = "multi_thread")]
async fn a_rewind_waits_for_offsets_held_by_an_abandoned_transaction() {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::producer::{BaseProducer, Producer};
    use rdkafka::{ClientConfig, Offset, TopicPartitionList};

    const RECORDS: i64 = 2_000;
    let h = Harness::new("unstable", Guarantee::ExactlyOnce, 2, RECORDS, 100).await;
    // Slow enough that the stage is mid-way when the lease is taken.
    let env = [("COPY_DELAY_MS", "50"), ("VIDPIPE_RUNNER__IN_FLIGHT", "4")];
    let probe = h.probe();
    let topic = h.c.topic("in");
    let group = format!("{}copy", h.c.topic_prefix);
    let mut owner = tokio::task::block_in_place(|| {
        let mut owner = h.spawn("owner", &env, None);
        h.wait_committed(&probe, 200, &mut [&mut owner], Duration::from_secs(120));
        owner
    });
    // Another member joins (taking one partition), opens a transaction
    // with an offset for the owner's other partition, and disappears
    // without ending it.
    let (abandoned, kept) = tokio::task::block_in_place(|| {
        let member: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &h.c.kafka_brokers)
            .set("group.id", &group)
            .set("enable.auto.commit", "false")
            .set("partition.assignment.strategy", "cooperative-sticky")
            .create()
            .unwrap();
        member.subscribe(&[&topic]).unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        let taken = loop {
            let _ = member.poll(Duration::from_millis(100));
            if let Some(e) = member.assignment().unwrap().elements().first() {
                break e.partition();
            }
            assert!(
                Instant::now() < deadline,
                "the second member got no partition"
            );
        };
        let kept = 1 - taken;
        let producer: BaseProducer = ClientConfig::new()
            .set("bootstrap.servers", &h.c.kafka_brokers)
            .set("transactional.id", format!("{group}-abandoned"))
            .set("transaction.timeout.ms", "45000")
            .create()
            .unwrap();
        producer.init_transactions(Duration::from_secs(30)).unwrap();
        producer.begin_transaction().unwrap();
        let mut offsets = TopicPartitionList::new();
        offsets
            .add_partition_offset(&topic, kept, Offset::Offset(1))
            .unwrap();
        producer
            .send_offsets_to_transaction(
                &offsets,
                &member.group_metadata().unwrap(),
                Duration::from_secs(30),
            )
            .unwrap();
        // Leaving gives the partition back to the owner; the transaction
        // stays open (the producer is kept alive and never ends it).
        drop(member);
        (producer, kept)
    });
    // The owner's lease on that partition is taken: its next write there is
    // refused, and it rewinds every partition to the committed offsets.
    sqlx::query(
        "UPDATE partition_leases SET epoch = epoch + 1, owner = 'intruder' WHERE partition = $1",
    )
    .bind(kept)
    .execute(&h.pool)
    .await
    .unwrap();
    tokio::task::block_in_place(|| {
        h.wait_committed(&probe, RECORDS, &mut [&mut owner], Duration::from_secs(240));
        signal(&owner, "TERM");
        let status = owner.wait().unwrap();
        assert!(status.success(), "SIGTERM shuts down cleanly, got {status}");
    });
    drop(abandoned);
    h.assert_exactly_once().await;
    h.assert_status_terminal().await;
}
