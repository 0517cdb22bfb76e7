//! The consumer lag gauge (`vidpipe_consumer_lag`) of a stage running as a
//! process, read from its `/metrics` as Prometheus would.

use std::time::{Duration, Instant};

use vidpipe::config::Guarantee;

use crate::helpers::{free_port, metric_series};
use crate::procs::Harness;

/// Per-partition lag series of the copy stage at `addr`.
async fn lag(addr: &str) -> Vec<(String, f64)> {
    metric_series(addr, "vidpipe_consumer_lag").await
}

#[tokio::test(flavor = "multi_thread")]
async fn consumer_lag_counts_a_backlog_down_to_zero() {
    const PARTITIONS: i32 = 3;
    const RECORDS: i64 = 240;
    const TRANSACTIONS: usize = 4;
    let mut h = Harness::new("lag", Guarantee::ExactlyOnce, PARTITIONS, 0, 24).await;
    // A transactional input, as every stage but the first reads: each
    // transaction leaves a commit marker on each partition, which a
    // caught-up stage must not count as lag.
    h.records = RECORDS;
    h.produce_input_in(TRANSACTIONS).await;
    let addr = metrics_addr();
    // One record at a time, 50 ms each: about 12 s of backlog, against
    // librdkafka's statistics every 5 s.
    let env = [
        ("COPY_DELAY_MS", "50"),
        ("VIDPIPE_RUNNER__IN_FLIGHT", "1"),
        ("VIDPIPE_METRICS_LISTEN", addr.as_str()),
    ];
    let mut child = h.spawn("lagging", &env, None);

    // While the backlog lasts, the gauge shows it, and never more than the
    // records plus their markers.
    let most = RECORDS + (TRANSACTIONS as i64) * i64::from(PARTITIONS);
    let deadline = Instant::now() + Duration::from_secs(30);
    let seen = loop {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the copy stage exited by itself"
        );
        // The listener comes up with the process; until then, wait.
        let up = reqwest::get(format!("http://{addr}/metrics")).await.is_ok();
        let total: f64 = if up {
            lag(&addr).await.iter().map(|(_, v)| v).sum()
        } else {
            0.0
        };
        if total > 0.0 {
            break total;
        }
        assert!(
            Instant::now() < deadline,
            "no consumer lag reported within 30 s of a 12 s backlog"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        seen <= most as f64,
        "lag {seen} is more than the {most} offsets in the topic"
    );

    // Once everything is processed, every partition reads 0.
    let probe = h.probe();
    tokio::task::block_in_place(|| {
        h.wait_committed(&probe, RECORDS, &mut [&mut child], Duration::from_secs(60))
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let series = lag(&addr).await;
        if series.len() == PARTITIONS as usize && series.iter().all(|(_, v)| *v == 0.0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "lag after the backlog was processed: {series:?} (expected 0 on each of {PARTITIONS} partitions)"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A free local address for a child's metrics listener.
fn metrics_addr() -> String {
    format!("127.0.0.1:{}", free_port())
}

/// Lag per partition number, from a process's `/metrics` (empty until
/// its listener is up).
async fn lag_by_partition(addr: &str) -> std::collections::HashMap<String, f64> {
    if reqwest::get(format!("http://{addr}/metrics"))
        .await
        .is_err()
    {
        return Default::default();
    }
    lag(addr)
        .await
        .into_iter()
        .filter_map(|(labels, v)| {
            let p = labels.split("partition=\"").nth(1)?.split('"').next()?;
            Some((p.to_owned(), v))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_partition_that_moves_is_reported_by_its_new_owner_only() {
    const PARTITIONS: i32 = 4;
    const RECORDS: i64 = 400;
    let h = Harness::new("lagmove", Guarantee::ExactlyOnce, PARTITIONS, RECORDS, 40).await;
    let (a_addr, b_addr) = (metrics_addr(), metrics_addr());
    // 100 ms a record, one at a time: a backlog of about 40 s for one.
    let spawn = |instance: &str, addr: &str| {
        let env = [
            ("COPY_DELAY_MS", "100"),
            ("VIDPIPE_RUNNER__IN_FLIGHT", "1"),
            ("VIDPIPE_METRICS_LISTEN", addr),
        ];
        h.spawn(instance, &env, None)
    };
    let mut a = spawn("a", &a_addr);
    // A owns every partition and reports a backlog on each.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        assert!(a.try_wait().unwrap().is_none(), "instance a exited");
        let l = lag_by_partition(&a_addr).await;
        if l.len() == PARTITIONS as usize && l.values().all(|v| *v > 0.0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "instance a reported no backlog on every partition: {l:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // B joins and takes some partitions over; once it reports a backlog on
    // one, A reports 0 for that one rather than what it last saw.
    let mut b = spawn("b", &b_addr);
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        assert!(a.try_wait().unwrap().is_none(), "instance a exited");
        assert!(b.try_wait().unwrap().is_none(), "instance b exited");
        let lb = lag_by_partition(&b_addr).await;
        let moved: Vec<&String> = lb
            .iter()
            .filter(|(_, v)| **v > 0.0)
            .map(|(p, _)| p)
            .collect();
        if !moved.is_empty() {
            let la = lag_by_partition(&a_addr).await;
            for p in moved {
                assert_eq!(
                    la.get(p).copied(),
                    Some(0.0),
                    "partition {p} moved to b (lag {:?} there) but a still reports {:?}",
                    lb.get(p),
                    la.get(p)
                );
            }
            break;
        }
        assert!(
            Instant::now() < deadline,
            "instance b took over no partition with a backlog within 40 s: a {:?}, b {lb:?}",
            lag_by_partition(&a_addr).await
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
