//! The consumer lag gauge (`vidpipe_consumer_lag`) of a stage running as a
//! process, read from its `/metrics` as Prometheus would.

use std::time::{Duration, Instant};

use vidpipe::config::Guarantee;

use crate::helpers::metric_series;
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
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let addr = format!("127.0.0.1:{port}");
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
