//! Crash safety, after Kafka's own transactions system test: a child process
//! runs the copy stage over 5,000 records and is killed with SIGKILL three
//! times at random points after at least 20% progress, then restarted. A
//! read_committed reader then checks what reached the output topic.

use std::time::Duration;

use rand::Rng;
use vidpipe::config::Guarantee;

use crate::helpers::unique;
use crate::procs::{Harness, signal};

const RECORDS: i64 = 5_000;
const VIDEOS: i64 = 250;
const PARTITIONS: i32 = 3;

async fn crash_run(guarantee: Guarantee) -> Harness {
    let h = Harness::new("crash", guarantee, PARTITIONS, RECORDS, VIDEOS).await;
    tokio::task::block_in_place(|| {
        let probe = h.probe();
        let instance = unique("child");
        let mut child = h.spawn(&instance, &[], None);
        let mut rng = rand::rng();
        let mut floor = RECORDS / 5;
        for kill in 0..3 {
            // A random point between the floor and 90%, later each time.
            let target = rng.random_range(floor..=(RECORDS * 9 / 10).max(floor + 1));
            h.wait_committed(&probe, target, &mut [&mut child], Duration::from_secs(180));
            child.kill().expect("SIGKILL");
            child.wait().unwrap();
            eprintln!("kill {} at committed >= {target}", kill + 1);
            floor = target;
            child = h.spawn(&instance, &[], None);
        }
        h.wait_committed(&probe, RECORDS, &mut [&mut child], Duration::from_secs(300));
        // Everything may have been committed before the last kill, so the
        // restarted child can still be starting: a SIGTERM before its
        // handler is installed would kill it outright. Give it time to
        // start, then check the graceful path.
        std::thread::sleep(Duration::from_secs(3));
        signal(&child, "TERM");
        let status = child.wait().unwrap();
        assert!(status.success(), "graceful shutdown exits 0, got {status}");
    });
    h
}

#[tokio::test(flavor = "multi_thread")]
async fn exactly_once_survives_three_sigkills_without_loss_or_duplicates() {
    let h = crash_run(Guarantee::ExactlyOnce).await;
    h.assert_exactly_once().await;
    h.assert_status_terminal().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn at_least_once_survives_three_sigkills_without_loss() {
    let h = crash_run(Guarantee::AtLeastOnce).await;
    let counts = h.output_counts().await;
    assert_eq!(
        counts.len() as i64,
        RECORDS,
        "every input reached the output"
    );
    let duplicates: usize = counts.values().map(|n| n - 1).sum();
    eprintln!(
        "at-least-once: {duplicates} duplicate outputs over {RECORDS} records after 3 SIGKILLs"
    );
    h.assert_status_terminal().await;
}
