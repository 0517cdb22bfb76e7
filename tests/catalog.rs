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
