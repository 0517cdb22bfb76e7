//! The pipeline against its physical limit, in one run on one machine:
//! 20 generated spoken videos through (1) the ASR server alone, fed the
//! extracted audio as fast as it takes it (transcription is nearly all of
//! the work), (2) `benches/sequential.sh`, the same download, ffmpeg and ASR
//! calls one video after another, and (3) vidpipe, all five stages in this
//! process on real Kafka, registry and PostgreSQL.
//!
//! The three run in rounds (`BENCH_ROUNDS`, default 3), each round compared
//! within itself: this machine's speed drifts by as much as the
//! differences measured.
//!
//! `cargo bench --bench pipeline --profile dev`; needs `scripts/stack up`.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use secrecy::ExposeSecret;
use tokio_util::sync::CancellationToken;
use vidpipe::config::Config;
use vidpipe::stages::{self, Services};
use vidpipe::template::testkit::spoken_video;

const VIDEOS: usize = 20;
/// The pause before each variant (vidpipe's stages join their groups in it).
const SETTLE: Duration = Duration::from_secs(8);
const SENTENCES: [&str; 5] = [
    "The river flows past the old mill every morning, and the miller counts every sack before noon.",
    "Our team measured the temperature of the lake for twelve weeks and found the warmest water in August.",
    "To repair a flat tire, remove the wheel, find the hole in the tube, and cover it with a patch.",
    "The library opens at nine, and the children's corner fills up with readers soon after.",
    "A good bread needs flour, water, salt and time, and the dough should rest overnight.",
];

#[tokio::main]
async fn main() {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path();
    let mut audio_secs = 0.0;
    // `BENCH_SENTENCES` sentences per video (default 3: 13.7 s of speech);
    // longer videos make the fixed time to the first clip a smaller share.
    let sentences: usize = std::env::var("BENCH_SENTENCES")
        .map(|v| v.parse().expect("BENCH_SENTENCES: a count"))
        .unwrap_or(3);
    for i in 0..VIDEOS {
        let text: Vec<&str> = (0..sentences)
            .map(|k| SENTENCES[(i + k) % SENTENCES.len()])
            .collect();
        spoken_video(work, &format!("v{i}.mp4"), &text.join(" ")).expect("espeak-ng and ffmpeg");
        let wav = work.join(format!("v{i}.wav"));
        let ok = Command::new("ffmpeg")
            .args(["-loglevel", "error", "-nostdin", "-y", "-i"])
            .arg(work.join(format!("v{i}.mp4")))
            .args(["-vn", "-ac", "1", "-ar", "16000"])
            .arg(&wav)
            .status()
            .unwrap();
        assert!(ok.success());
        audio_secs += (std::fs::metadata(&wav).unwrap().len() - 44) as f64 / 32_000.0;
    }
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut http = Command::new("python3")
        .args([
            "-m",
            "http.server",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--directory",
        ])
        .arg(work)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("python3 http.server");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut c = Config::local_defaults().expect("config");
    // `BENCH_ASR_CONCURRENCY` sets `media.asr_concurrency` for the ASR-alone
    // run and the pipeline alike.
    if let Ok(n) = std::env::var("BENCH_ASR_CONCURRENCY") {
        c.media.asr_concurrency = n.parse().expect("BENCH_ASR_CONCURRENCY: a count");
    }
    // `BENCH_ASR_URL` points every variant at another ASR server (as
    // `benches/pinned.sh` does, with transcription on CPUs of its own).
    if let Ok(url) = std::env::var("BENCH_ASR_URL") {
        c.asr_url = url;
    }
    let concurrency = c.media.asr_concurrency;
    // A connection per request, as vidpipe's ASR client does: the stack's
    // server is one worker process per core, and a kept-alive connection
    // stays with one worker (see `src/backends/asr/http.rs`).
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let transcribe = |path: std::path::PathBuf| {
        let client = client.clone();
        let url = format!("{}/audio/transcriptions", c.asr_url);
        async move {
            let bytes = tokio::fs::read(&path).await.unwrap();
            let form = reqwest::multipart::Form::new()
                .part(
                    "file",
                    reqwest::multipart::Part::bytes(bytes).file_name("a.wav"),
                )
                .text("model", "whisper-1")
                .text("model_name", "whisper-1")
                .text("response_format", "verbose_json");
            let r = client
                .post(url)
                .multipart(form)
                .send()
                .await
                .expect("ASR server (scripts/stack up)");
            assert!(r.status().is_success(), "ASR answered {}", r.status());
        }
    };
    // Warm the model up, untimed.
    transcribe(work.join("v0.wav")).await;

    let urls: Vec<String> = (0..VIDEOS)
        .map(|i| format!("http://127.0.0.1:{port}/v{i}.mp4"))
        .collect();
    let mut pc = c.clone();
    // `BENCH_NICENESS=0` runs ffmpeg at vidpipe's own priority, to compare.
    if let Ok(n) = std::env::var("BENCH_NICENESS") {
        pc.media.tool_niceness = n.parse().expect("BENCH_NICENESS: 0 to 19");
    }
    pc.net_allow = "127.0.0.1/32".into();
    let admin = vidpipe::store::db::connect(&c.database_url, 1)
        .await
        .unwrap();
    // The machine's speed drifts by +-10% over minutes (other tenants), as
    // much as the differences measured: the three variants run in rounds,
    // one after another in each, and each round is compared within itself.
    let rounds: usize = std::env::var("BENCH_ROUNDS")
        .map(|v| v.parse().expect("BENCH_ROUNDS: a count"))
        .unwrap_or(3);
    let mut results = Vec::new();
    let mut breakdowns = Vec::new();
    for round in 1..=rounds {
        // (1) The ASR server alone, `asr_concurrency` requests at a time.
        // Every variant starts with the ASR server idle for the same time
        // (vidpipe's stages join their groups for as long): its first
        // request after a pause is slower (1.0-1.3 s against ~0.95 s, four
        // tries), and only vidpipe used to pay for it.
        tokio::time::sleep(SETTLE).await;
        phase("asr-alone");
        let t = Instant::now();
        let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(concurrency));
        let mut tasks = Vec::new();
        for i in 0..VIDEOS {
            let sem = sem.clone();
            let f = transcribe(work.join(format!("v{i}.wav")));
            tasks.push(tokio::spawn(async move {
                let _p = sem.acquire().await.unwrap();
                f.await
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let asr_alone = t.elapsed().as_secs_f64();

        // (2) The sequential script.
        tokio::time::sleep(SETTLE).await;
        phase("script");
        let seq_dir = tempfile::tempdir().unwrap();
        let t = Instant::now();
        let ok = Command::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/benches/sequential.sh"
        ))
        .arg(&c.asr_url)
        .arg(seq_dir.path())
        .args(&urls)
        .status()
        .expect("sequential.sh");
        assert!(ok.success(), "sequential.sh failed");
        let script = t.elapsed().as_secs_f64();

        // (3) vidpipe: a fresh database and topics, all stages in this process.
        let (pipeline, breakdown) = vidpipe_run(&pc, &admin, &urls).await;
        phase("end");
        eprintln!(
            "round {round}: ASR alone {asr_alone:.1} s, script {script:.1} s, vidpipe {pipeline:.1} s"
        );
        results.push([asr_alone, script, pipeline]);
        breakdowns.push(breakdown);
    }
    let _ = http.kill();
    let _ = http.wait();

    println!(
        "\n{VIDEOS} spoken videos, {audio_secs:.0} s of audio in all; ASR concurrency {concurrency}; ffmpeg niceness {}; {rounds} rounds\n",
        pc.media.tool_niceness
    );
    println!(
        "| round | ASR server alone (the limit), s | sequential script (curl, ffmpeg, curl), s | vidpipe, all stages, s | script vs ASR alone | vidpipe vs ASR alone |"
    );
    println!("| ---: | ---: | ---: | ---: | ---: | ---: |");
    for (i, [asr, script, pipeline]) in results.iter().enumerate() {
        println!(
            "| {} | {asr:.1} | {script:.1} | {pipeline:.1} | {:.0}% | {:.0}% |",
            i + 1,
            asr / script * 100.0,
            asr / pipeline * 100.0
        );
    }
    let median = |f: &dyn Fn(&[f64; 3]) -> f64| {
        let mut v: Vec<f64> = results.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let faster = results.iter().filter(|r| r[2] < r[1]).count();
    println!(
        "\nMedian of the rounds: vidpipe at {:.0}% of the ASR server alone ({:.1} audio s per wall s), the script at {:.0}%; vidpipe faster than the script in {faster} of {rounds} rounds.",
        median(&|r| r[0] / r[2]) * 100.0,
        median(&|r| audio_secs / r[2]),
        median(&|r| r[0] / r[1]) * 100.0,
    );
    for (i, breakdown) in breakdowns.iter().enumerate() {
        println!(
            "\nRound {}: where vidpipe's time went (from its stage_runs rows, seconds after submit):\n",
            i + 1
        );
        println!("{breakdown}");
    }
}

/// One vidpipe run: a fresh database and topics, all five stages in this
/// process; the wall time from submitting the videos until all are done,
/// and the stages' timeline.
async fn vidpipe_run(c: &Config, admin: &sqlx::PgPool, urls: &[String]) -> (f64, String) {
    let mut pc = c.clone();
    let run_id = uuid::Uuid::new_v4().simple().to_string();
    pc.topic_prefix = format!("bench_{run_id}.");
    let blobs = tempfile::tempdir().unwrap();
    pc.storage = blobs.path().display().to_string();
    let db = format!("bench_{run_id}");
    sqlx::query(&format!("CREATE DATABASE {db}"))
        .execute(admin)
        .await
        .unwrap();
    let mut url = url::Url::parse(c.database_url.expose_secret()).unwrap();
    url.set_path(&db);
    pc.database_url = url.to_string().into();
    let pool = vidpipe::store::db::connect(&pc.database_url, 4)
        .await
        .unwrap();
    vidpipe::store::db::migrate(&pool).await.unwrap();
    let services = Services::build(pc.clone()).await.expect("services");
    let shutdown = CancellationToken::new();
    let running = tokio::spawn({
        let shutdown = shutdown.clone();
        async move { stages::run(&[], services, "bench", shutdown).await }
    });
    // Let every stage join its group before the clock starts.
    tokio::time::sleep(SETTLE).await;
    // A new id for every video in every round (ids are derived from URLs).
    let urls: Vec<String> = urls.iter().map(|u| format!("{u}?run={run_id}")).collect();
    phase("vidpipe");
    let t = Instant::now();
    let t0 = chrono::Utc::now();
    let submitted = vidpipe::client::submit(&pc, &pool, &urls, false, None)
        .await
        .expect("submit");
    let ids: Vec<String> = submitted.iter().map(|s| s.id.clone()).collect();
    loop {
        let all = vidpipe::client::status(&pool, &ids, VIDEOS as i64)
            .await
            .unwrap();
        let done = all.iter().filter(|v| v.status == "done").count();
        assert!(
            all.iter().all(|v| v.status != "failed"),
            "a video failed: {all:#?}"
        );
        if done == VIDEOS {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let pipeline = t.elapsed().as_secs_f64();
    let breakdown = timeline(&pool, t0).await;
    shutdown.cancel();
    running.await.unwrap().expect("stages stop cleanly");
    pool.close().await;
    (pipeline, breakdown)
}

/// Prints a phase marker with the wall clock to stderr, so that a CPU
/// sampler running beside the benchmark can be lined up with its phases.
fn phase(name: &str) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    eprintln!("phase {name} {:.1}", now.as_secs_f64());
}

/// The pipeline's run from its own status rows: per stage, when its first
/// run started and its last one finished, and the mean run time (which for
/// transcribe includes waiting for a free ASR request slot). What lies
/// before the first transcription and after the last one is the pipeline's
/// own cost on the critical path; gaps in between are the ASR server idle.
async fn timeline(pool: &sqlx::PgPool, t0: chrono::DateTime<chrono::Utc>) -> String {
    let rows: Vec<(String, f64, f64, f64, i64)> = sqlx::query_as(
        "SELECT stage,
                EXTRACT(EPOCH FROM min(started_at) - $1)::float8,
                EXTRACT(EPOCH FROM max(finished_at) - $1)::float8,
                avg(duration_ms)::float8 / 1000.0,
                count(*)
           FROM stage_runs WHERE status = 'done' GROUP BY stage
          ORDER BY min(started_at)",
    )
    .bind(t0)
    .fetch_all(pool)
    .await
    .expect("stage_runs");
    let mut out = String::from(
        "| stage | runs | first start | last finish | mean run |\n| --- | ---: | ---: | ---: | ---: |\n",
    );
    for (stage, first, last, mean, n) in rows {
        out.push_str(&format!(
            "| {stage} | {n} | {first:.2} | {last:.2} | {mean:.2} |\n"
        ));
    }
    out
}
