//! Discovery's memory in PostgreSQL: a video is claimed once (a retry of
//! the same command claims again), and due sources are polled by exactly
//! one of several instances.

use std::collections::HashSet;
use std::time::Duration;

use vidpipe::store::catalog::{Catalog, PgCatalog};

use crate::helpers::{config, fresh_database};

#[tokio::test(flavor = "multi_thread")]
async fn a_video_is_claimed_once_and_a_retry_of_the_same_command_still_claims() {
    let (pool, _) = fresh_database(&config()).await;
    let catalog = PgCatalog::new(pool);
    let claim = |who: &'static str| {
        let catalog = catalog.clone();
        async move {
            catalog
                .claim("url:abc", "https://example.com/a.mp4", Some("A"), None, who)
                .await
                .unwrap()
        }
    };
    assert!(claim("command-1").await, "first claim wins");
    assert!(
        claim("command-1").await,
        "the same command retried claims again"
    );
    assert!(
        !claim("command-2").await,
        "another command finds the video known"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn each_due_source_is_claimed_by_exactly_one_of_many_pollers() {
    let (pool, _) = fresh_database(&config()).await;
    let catalog = PgCatalog::new(pool);
    for i in 0..200 {
        catalog
            .add_source(
                &format!("src:{i}"),
                &format!("https://example.com/{i}.xml"),
                Duration::from_secs(3600),
                5,
            )
            .await
            .unwrap();
    }
    // Eight pollers race for the due sources, a few at a time.
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let catalog = catalog.clone();
        tasks.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            loop {
                let batch = catalog.claim_due(7).await.unwrap();
                if batch.is_empty() {
                    return mine;
                }
                mine.extend(batch.into_iter().map(|s| s.id));
            }
        }));
    }
    let mut seen = HashSet::new();
    let mut total = 0;
    for t in tasks {
        for id in t.await.unwrap() {
            total += 1;
            assert!(seen.insert(id.clone()), "{id} was claimed twice");
        }
    }
    assert_eq!(total, 200, "every due source was claimed");
    // Claimed sources are not due again until their interval passes.
    assert!(catalog.claim_due(100).await.unwrap().is_empty());
    let polls: Vec<i64> = catalog
        .sources()
        .await
        .unwrap()
        .iter()
        .map(|s| s.polls)
        .collect();
    assert!(polls.iter().all(|p| *p == 1), "one poll each");
}

/// Serves `body` as an RSS feed to every request; returns the feed's URL.
async fn serve_feed(body: String) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("listen");
    let addr = listener.local_addr().expect("address");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let body = body.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let reply = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/rss+xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(reply.as_bytes()).await;
            });
        }
    });
    format!("http://{addr}/feed.xml")
}

struct NoRestarts;

impl vidpipe::stages::discover::Restarter for NoRestarts {
    fn restart<'a>(
        &'a self,
        _: &'a vidpipe::stages::discover::RestartRequest,
    ) -> futures::future::BoxFuture<
        'a,
        Result<vidpipe::stages::discover::Restarted, vidpipe::template::StageError>,
    > {
        panic!("no restart is asked for here")
    }
}

/// Discover on `catalog`, fetching from loopback (where the tests serve).
fn discover_with(catalog: PgCatalog) -> vidpipe::stages::discover::Discover<PgCatalog> {
    use vidpipe::media::http::{AddressPolicy, FetchLimits, Fetcher};
    vidpipe::stages::discover::Discover {
        fetcher: Fetcher::new(
            AddressPolicy::parse_allow("127.0.0.1/32").unwrap(),
            FetchLimits::default(),
        )
        .unwrap(),
        ytdlp: vidpipe::media::ytdlp::Ytdlp::new("yt-dlp", 1 << 20, Duration::from_secs(30)),
        catalog,
        max_backfill: 20,
        restarter: std::sync::Arc::new(NoRestarts),
    }
}

/// The `n`th command to discover the source `source_id` at `url`.
fn source_command(source_id: &str, url: &str, n: u32) -> vidpipe::records::Command {
    vidpipe::records::Command {
        meta: vidpipe::records::Meta::new(source_id),
        command_id: format!("poll-{n}"),
        url: Some(url.to_string()),
        start_stage: None,
        requested_by: None,
        options: Default::default(),
        submitted_at: 0,
    }
}

fn context(source_id: &str) -> vidpipe::template::Context {
    vidpipe::template::Context {
        stage: "discover",
        meta: vidpipe::records::Meta::new(source_id),
        attempt: 1,
        cancel: Default::default(),
    }
}

/// A feed that never arrives does not hold discovery past a cancellation
/// (a shutdown, a lost partition): it ends, retryable, when cancelled.
#[tokio::test(flavor = "multi_thread")]
async fn discovery_stops_waiting_for_a_feed_when_cancelled() {
    use vidpipe::template::{ErrorClass, Stage};
    // Accepts and never answers.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("listen");
    let url = format!("http://{}/feed.xml", listener.local_addr().unwrap());
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
        }
    });
    let (pool, _) = fresh_database(&config()).await;
    let discover = discover_with(PgCatalog::new(pool));
    let source_id = vidpipe::ids::source_id(&vidpipe::ids::normalise(&url).unwrap());
    let ctx = context(&source_id);
    let cancel = ctx.cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        cancel.cancel();
    });
    let started = std::time::Instant::now();
    let err = discover
        .process(source_command(&source_id, &url, 1), &ctx)
        .await
        .expect_err("cancelled");
    assert_eq!(
        (err.kind.as_str(), err.class),
        ("cancelled", ErrorClass::Retryable)
    );
    // The fetcher's own deadline is 30 minutes.
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
}

/// A local feed of 600 episodes (episode `i` newer than `i - 1`), in a
/// fresh database, subscribed with `backfill`: its URL, source id, the
/// database and the catalog.
async fn subscribed_big_feed(backfill: i32) -> (String, String, sqlx::PgPool, PgCatalog) {
    let items: String = (0..600)
        .map(|i| {
            let day = pub_date(i);
            format!(
                "<item><title>Episode {i}</title><pubDate>{day}</pubDate>\
                 <enclosure url=\"https://media.example.com/ep{i}.mp3\" type=\"audio/mpeg\" length=\"1\"/></item>"
            )
        })
        .collect();
    let feed = format!(
        "<?xml version=\"1.0\"?><rss version=\"2.0\"><channel><title>Big</title>{items}</channel></rss>"
    );
    let url = serve_feed(feed).await;
    let (pool, _) = fresh_database(&config()).await;
    let catalog = PgCatalog::new(pool.clone());
    let source_id = vidpipe::ids::source_id(&vidpipe::ids::normalise(&url).unwrap());
    catalog
        .add_source(&source_id, &url, Duration::from_secs(3600), backfill)
        .await
        .unwrap();
    (url, source_id, pool, catalog)
}

/// A subscription's later poll takes the newest 500 entries of a feed that
/// lists 600 new ones (a hostile feed could list a hundred thousand), and
/// its first poll only its backfill.
#[tokio::test(flavor = "multi_thread")]
async fn a_later_poll_of_a_subscription_takes_at_most_500_entries_newest_first() {
    use vidpipe::template::Stage;

    let (url, source_id, pool, catalog) = subscribed_big_feed(5).await;
    let discover = discover_with(catalog);
    let poll = |n: u32| source_command(&source_id, &url, n);
    let ctx = context(&source_id);
    let episodes = |found: &[vidpipe::records::VideoDiscovered]| -> Vec<String> {
        found
            .iter()
            .map(|v| v.title.clone().unwrap_or_default())
            .collect()
    };

    // The first poll: the subscription's backfill of 5, newest first.
    sqlx::query("UPDATE sources SET polls = 1")
        .execute(&pool)
        .await
        .unwrap();
    let first = discover.process(poll(1), &ctx).await.expect("first poll");
    assert_eq!(
        episodes(&first),
        (595..600)
            .rev()
            .map(|i| format!("Episode {i}"))
            .collect::<Vec<_>>()
    );
    // A later poll: everything new, up to 500 entries; the 5 already
    // claimed are among them and yield nothing.
    sqlx::query("UPDATE sources SET polls = 2")
        .execute(&pool)
        .await
        .unwrap();
    let later = discover.process(poll(2), &ctx).await.expect("later poll");
    assert_eq!(
        episodes(&later),
        (100..595)
            .rev()
            .map(|i| format!("Episode {i}"))
            .collect::<Vec<_>>()
    );
}

/// A first poll takes at most 500 entries whatever backfill its row holds
/// (one written before the bound, or by hand): the newest 500 of 600.
#[tokio::test(flavor = "multi_thread")]
async fn a_first_poll_takes_at_most_500_entries_whatever_its_backfill() {
    use vidpipe::template::Stage;

    let (url, source_id, pool, catalog) = subscribed_big_feed(10_000).await;
    sqlx::query("UPDATE sources SET polls = 1")
        .execute(&pool)
        .await
        .unwrap();
    let found = discover_with(catalog)
        .process(source_command(&source_id, &url, 1), &context(&source_id))
        .await
        .expect("first poll");
    assert_eq!(found.len(), 500);
    assert_eq!(found[0].title.as_deref(), Some("Episode 599"));
    assert_eq!(found[499].title.as_deref(), Some("Episode 100"));
}

/// An RFC 2822 date (no weekday) `i` minutes after a fixed hour, so that entry `i` is
/// newer than entry `i - 1`.
fn pub_date(i: u32) -> String {
    format!("02 Nov 2026 {:02}:{:02}:00 +0000", 10 + i / 60, i % 60)
}

/// `sources remove URL` finds the subscription however the URL is spelt,
/// as long as it is the same source (host case, default port, tracking
/// parameters).
#[tokio::test(flavor = "multi_thread")]
async fn a_subscription_is_removed_by_any_spelling_of_its_url() {
    let (pool, _) = fresh_database(&config()).await;
    let catalog = PgCatalog::new(pool);
    let url = vidpipe::ids::normalise("https://example.com/feed.xml").unwrap();
    let id = vidpipe::ids::source_id(&url);
    catalog
        .add_source(&id, url.as_str(), Duration::from_secs(3600), 5)
        .await
        .unwrap();
    assert!(
        !catalog
            .remove_source("https://example.com/other.xml")
            .await
            .unwrap()
    );
    assert!(
        catalog
            .remove_source("https://EXAMPLE.com:443/feed.xml?utm_source=x")
            .await
            .unwrap()
    );
    assert!(catalog.sources().await.unwrap().is_empty());
}

/// The read paths that poll (the newest videos; runs finished lately) have
/// indexes that serve them, not a scan of tables that grow with every video.
#[tokio::test(flavor = "multi_thread")]
async fn the_polled_read_queries_can_use_an_index() {
    let (pool, _) = fresh_database(&config()).await;
    let mut conn = pool.acquire().await.unwrap();
    // An empty table is cheapest to scan: make the planner show what it
    // could use.
    sqlx::query("SET enable_seqscan = off")
        .execute(&mut *conn)
        .await
        .unwrap();
    for (query, index) in [
        (
            "EXPLAIN SELECT id FROM videos ORDER BY updated_at DESC LIMIT 20",
            "videos_updated_idx",
        ),
        (
            "EXPLAIN SELECT stage, count(*) FROM stage_runs WHERE status = 'done' \
             AND finished_at >= now() - interval '15 minutes' GROUP BY stage",
            "stage_runs_finished_idx",
        ),
    ] {
        let plan: Vec<String> = sqlx::query_scalar(query)
            .fetch_all(&mut *conn)
            .await
            .unwrap();
        assert!(
            plan.join("\n").contains(index),
            "{query}:\n{}",
            plan.join("\n")
        );
    }
}

/// Status listings carry each video's runs of its current generation only,
/// in pipeline order, newest video first (all videos' runs are read in one
/// query, so a listing of 200 videos is two queries, not 201).
#[tokio::test(flavor = "multi_thread")]
async fn status_lists_each_videos_runs_of_its_current_generation() {
    let (pool, _) = fresh_database(&config()).await;
    for (id, generation, status, age_s) in [
        ("url:one", 2, "running", 0),
        ("url:two", 1, "failed", 10),
        ("url:three", 1, "queued", 20),
    ] {
        sqlx::query(
            "INSERT INTO videos (id, url, generation, status, updated_at)
             VALUES ($1, 'https://example.com/' || $1, $2, $3, now() - make_interval(secs => $4))",
        )
        .bind(id)
        .bind(generation as i64)
        .bind(status)
        .bind(age_s as f64)
        .execute(&pool)
        .await
        .unwrap();
    }
    for (id, stage, generation, status) in [
        ("url:one", "transcribe", 2, "running"),
        ("url:one", "download", 1, "done"),
        ("url:one", "download", 2, "done"),
        ("url:one", "extract-audio", 2, "done"),
        ("url:two", "summarize", 1, "failed"),
        ("url:two", "discover", 1, "done"),
    ] {
        sqlx::query(
            "INSERT INTO stage_runs (video_id, stage, generation, attempt, status)
             VALUES ($1, $2, $3, 1, $4)",
        )
        .bind(id)
        .bind(stage)
        .bind(generation as i64)
        .bind(status)
        .execute(&pool)
        .await
        .unwrap();
    }
    let shown = |v: &vidpipe::client::VideoStatus| {
        (
            v.id.clone(),
            v.stages
                .iter()
                .map(|s| format!("{}@{}:{}", s.name, s.generation, s.status))
                .collect::<Vec<_>>(),
        )
    };
    let all: Vec<_> = vidpipe::client::status(&pool, &[], 10)
        .await
        .unwrap()
        .iter()
        .map(shown)
        .collect();
    assert_eq!(
        all,
        [
            (
                "url:one".to_string(),
                vec![
                    "download@2:done".to_string(),
                    "extract-audio@2:done".into(),
                    "transcribe@2:running".into()
                ]
            ),
            (
                "url:two".into(),
                vec!["discover@1:done".into(), "summarize@1:failed".into()]
            ),
            ("url:three".into(), vec![]),
        ]
    );
    let two: Vec<_> = vidpipe::client::status(&pool, &["url:two".into()], 10)
        .await
        .unwrap()
        .iter()
        .map(shown)
        .collect();
    assert_eq!(two, [all[1].clone()]);
    assert_eq!(
        vidpipe::client::status(&pool, &[], 1).await.unwrap().len(),
        1
    );
}
