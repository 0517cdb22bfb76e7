//! The `vidpipe` binary as a person or a script runs it: help and examples
//! for every command (no service needed), `submit --wait` on real videos
//! (progress lines, exit 0 for a good video, 1 naming the stage and reason
//! for failing ones), `status` as JSON and as a table, `show` in every
//! format, and exit code 3 naming the service that cannot be reached.
//!
//! The pipeline runs in this process (as in `pipeline.rs`) on its own
//! topics, database and blob store; the binary is pointed at them.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Output, Stdio};
use std::time::Duration;

use secrecy::ExposeSecret;
use serde_json::Value;
use vidpipe::config::Config;
use vidpipe::stages::STAGES;

use crate::helpers::{config, fresh_database_url, unique};
use crate::pipeline::{Pipeline, SCRIPTS, serve, spoken_video};

const VIDPIPE: &str = env!("CARGO_BIN_EXE_vidpipe");

/// A loopback port that nothing listens on: bound, then let go.
fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
    listener.local_addr().expect("its address").port()
}

/// What a run printed and how it ended.
struct Ran {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl std::fmt::Debug for Ran {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {:?}\n--- stdout\n{}\n--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

impl From<Output> for Ran {
    fn from(out: Output) -> Self {
        Ran {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

/// Runs `program args` with `env` added, killed if it takes longer than
/// `limit` (a hung command fails the test instead of hanging it).
async fn run_program(program: &str, args: &[&str], env: &[(&str, String)], limit: Duration) -> Ran {
    let mut command = tokio::process::Command::new(program);
    command
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("VIDPIPE_LOG", "warn")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    match tokio::time::timeout(limit, command.output()).await {
        Ok(out) => out
            .unwrap_or_else(|e| panic!("cannot run {program}: {e}"))
            .into(),
        Err(_) => panic!(
            "`{program} {}` did not end within {limit:?}",
            args.join(" ")
        ),
    }
}

async fn vidpipe(args: &[&str], env: &[(&str, String)], limit: Duration) -> Ran {
    run_program(VIDPIPE, args, env, limit).await
}

/// The environment that points the binary at `c`'s topics, database and
/// blob store.
fn env_of(c: &Config) -> Vec<(&'static str, String)> {
    vec![
        ("VIDPIPE_TOPIC_PREFIX", c.topic_prefix.clone()),
        (
            "VIDPIPE_DATABASE_URL",
            c.database_url.expose_secret().to_string(),
        ),
        ("VIDPIPE_STORAGE", c.storage.clone()),
    ]
}

/// The names under the `Commands:` heading of a help text (clap's `help`
/// left out).
fn listed_commands(help: &str) -> Vec<String> {
    help.lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .filter_map(|l| l.split_whitespace().next())
        .filter(|name| *name != "help")
        .map(str::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn every_command_and_subcommand_has_help_with_an_example_without_any_service() {
    let port = closed_port();
    let nowhere = [
        ("VIDPIPE_KAFKA_BROKERS", format!("127.0.0.1:{port}")),
        (
            "VIDPIPE_SCHEMA_REGISTRY_URL",
            format!("http://127.0.0.1:{port}"),
        ),
        (
            "VIDPIPE_DATABASE_URL",
            format!("postgres://vidpipe@127.0.0.1:{port}/vidpipe"),
        ),
        ("VIDPIPE_AMQP_URL", format!("amqp://127.0.0.1:{port}/%2f")),
        ("VIDPIPE_ASR_URL", format!("http://127.0.0.1:{port}/v1")),
        ("VIDPIPE_LLM_URL", format!("http://127.0.0.1:{port}/v1")),
    ];
    let limit = Duration::from_secs(30);
    let top = vidpipe(&["--help"], &nowhere, limit).await;
    assert_eq!(top.code, Some(0), "{top:?}");
    for needed in [
        "Examples:",
        "vidpipe submit",
        "Exit codes:",
        "0  success",
        "1  a video failed",
        "2  usage or configuration error",
        "3  a service cannot be reached",
    ] {
        assert!(top.stdout.contains(needed), "{needed:?} in {top:?}");
    }
    let short = vidpipe(&["-h"], &nowhere, limit).await;
    assert_eq!(short.code, Some(0), "{short:?}");
    assert!(short.stdout.contains("Exit codes:"), "{short:?}");

    // Walk the commands the help lists, and theirs.
    let mut pending: Vec<Vec<String>> = listed_commands(&top.stdout)
        .into_iter()
        .map(|c| vec![c])
        .collect();
    let mut seen = BTreeSet::new();
    while let Some(path) = pending.pop() {
        let mut args: Vec<&str> = path.iter().map(String::as_str).collect();
        args.push("--help");
        let help = vidpipe(&args, &nowhere, limit).await;
        let name = path.join(" ");
        assert_eq!(help.code, Some(0), "vidpipe {name} --help: {help:?}");
        assert!(
            help.stdout.contains("Example"),
            "vidpipe {name} --help shows an example: {help:?}"
        );
        assert!(
            help.stdout.contains(&format!("vidpipe {name}")),
            "vidpipe {name} --help: an example of this command: {help:?}"
        );
        assert!(help.stderr.is_empty(), "no log, no error: {help:?}");
        for sub in listed_commands(&help.stdout) {
            let mut p = path.clone();
            p.push(sub);
            pending.push(p);
        }
        seen.insert(name);
    }
    // Every command of the design's table (and the project's own) is there.
    for command in [
        "run",
        "submit",
        "status",
        "show",
        "replay",
        "sources",
        "sources add",
        "sources list",
        "sources remove",
        "serve",
        "bridge",
        "migrate",
        "topics",
        "topics scale",
        "config",
    ] {
        assert!(seen.contains(command), "vidpipe {command} exists: {seen:?}");
    }
    let via_help = vidpipe(&["help", "submit"], &nowhere, limit).await;
    assert_eq!(via_help.code, Some(0), "{via_help:?}");
    assert!(via_help.stdout.contains("--wait"), "{via_help:?}");
    // A usage error is exit 2, with the usage.
    let bad = vidpipe(&["submit"], &nowhere, limit).await;
    assert_eq!(bad.code, Some(2), "{bad:?}");
    assert!(bad.stderr.contains("Usage"), "{bad:?}");
    // A value out of bounds is refused before anything is touched.
    let over = vidpipe(
        &[
            "sources",
            "add",
            "https://example.com/feed.xml",
            "--backfill",
            "501",
        ],
        &nowhere,
        limit,
    )
    .await;
    assert_eq!(over.code, Some(2), "{over:?}");
    assert!(over.stderr.contains("--backfill 501"), "{over:?}");
}

/// A short video with a picture and no sound.
fn silent_video(dir: &Path, name: &str) {
    let status = std::process::Command::new("ffmpeg")
        .args(["-loglevel", "error", "-nostdin", "-y", "-f", "lavfi", "-i"])
        .arg("color=c=red:s=160x120:r=10:d=3")
        .args(["-c:v", "mpeg4"])
        .arg(dir.join(name))
        .status()
        .unwrap_or_else(|e| panic!("ffmpeg: {e} (scripts/stack up installs it)"));
    assert!(status.success(), "ffmpeg made {name}");
}

/// The submitted id of `url`, from the first line `submit` prints.
fn submitted_id(ran: &Ran, url: &str) -> String {
    ran.stdout
        .lines()
        .find(|l| l.ends_with(url))
        .and_then(|l| l.split('\t').next())
        .unwrap_or_else(|| panic!("submit prints the id of {url}: {ran:?}"))
        .to_string()
}

/// Quotes a word for `sh` (script's -c takes a command line).
fn sh_quote(word: &str) -> String {
    format!("'{}'", word.replace('\'', r"'\''"))
}

/// Runs `vidpipe args` on a pseudo-terminal (util-linux `script`, part of
/// Debian's essential bsdutils), as a person at a terminal would.
async fn vidpipe_on_a_terminal(args: &[&str], env: &[(&str, String)]) -> Ran {
    let line: Vec<String> = std::iter::once(VIDPIPE)
        .chain(args.iter().copied())
        .map(sh_quote)
        .collect();
    let line = line.join(" ");
    let mut env = env.to_vec();
    env.push(("SHELL", "/bin/sh".into()));
    env.push(("TERM", "xterm".into()));
    run_program(
        "script",
        &["-qec", &line, "/dev/null"],
        &env,
        Duration::from_secs(120),
    )
    .await
}

/// The cues of an SRT or VTT document: (number if any, timing line, text).
fn cues(doc: &str) -> Vec<(Option<usize>, String, String)> {
    doc.split("\n\n")
        .map(str::trim)
        .filter(|b| !b.is_empty() && *b != "WEBVTT")
        .map(|block| {
            let lines: Vec<&str> = block.lines().collect();
            let timing = lines
                .iter()
                .position(|l| l.contains(" --> "))
                .unwrap_or_else(|| panic!("a cue has a timing line: {block:?}"));
            let number = (timing == 1).then(|| {
                lines[0]
                    .parse()
                    .unwrap_or_else(|_| panic!("a cue number: {block:?}"))
            });
            (
                number,
                lines[timing].to_string(),
                lines[timing + 1..].join(" "),
            )
        })
        .collect()
}

/// `HH:MM:SS<sep>mmm`.
fn is_time(t: &str, sep: char) -> bool {
    let b = t.as_bytes();
    b.len() == 12
        && b[2] == b':'
        && b[5] == b':'
        && b[8] == sep as u8
        && t.chars()
            .enumerate()
            .all(|(i, c)| [2, 5, 8].contains(&i) || c.is_ascii_digit())
}

#[tokio::test(flavor = "multi_thread")]
async fn submit_wait_status_and_show_on_real_videos() {
    let dir = tempfile::tempdir().unwrap();
    spoken_video(dir.path(), "good.mp4", SCRIPTS[0]);
    silent_video(dir.path(), "silent.mp4");
    let site = serve(dir.path(), "127.0.0.1").await;
    let p = Pipeline::start("cli", |c| {
        c.net_allow = "127.0.0.1/32".into();
        c.runner.max_attempts = 2;
    })
    .await;
    let env = env_of(&p.config);
    let (good, silent, missing) = (
        site.url("media/good.mp4"),
        site.url("media/silent.mp4"),
        site.url("media/missing.mp4"),
    );
    let wait = Duration::from_secs(600);
    let good_args = ["submit", "--wait", "--timeout", "500", &good];
    let failing_args = ["submit", "--wait", "--timeout", "500", &silent, &missing];
    let (ok, failing) = tokio::join!(
        vidpipe(&good_args, &env, wait),
        vidpipe(&failing_args, &env, wait),
    );

    // The good video: exit 0; stdout is a pipe here, so plain lines: the
    // id, then a tab-separated line per stage change, ending done.
    assert_eq!(ok.code, Some(0), "{ok:?}");
    let good_id = submitted_id(&ok, &good);
    assert!(
        !ok.stdout.contains('\u{1b}') && !ok.stdout.contains('\r'),
        "no terminal drawing into a pipe: {ok:?}"
    );
    let progress: Vec<Vec<&str>> = ok
        .stdout
        .lines()
        .skip(1)
        .map(|l| l.split('\t').collect())
        .collect();
    assert!(!progress.is_empty(), "{ok:?}");
    for fields in &progress {
        assert_eq!(fields[0], good_id, "{ok:?}");
        assert!(["queued", "running", "done"].contains(&fields[1]), "{ok:?}");
        assert!(fields[2] == "-" || STAGES.contains(&fields[2]), "{ok:?}");
    }
    assert_eq!(
        progress.last().map(Vec::as_slice),
        Some([good_id.as_str(), "done", "summarize"].as_slice()),
        "{ok:?}"
    );

    // The failing ones: exit 1, each named with its stage and reason, on
    // stdout's lines and in stderr's summary.
    assert_eq!(failing.code, Some(1), "{failing:?}");
    let silent_id = submitted_id(&failing, &silent);
    let missing_id = submitted_id(&failing, &missing);
    for (id, stage, reason) in [
        (&silent_id, "extract-audio", "no_audio"),
        (&missing_id, "download", "http_404"),
    ] {
        assert!(
            failing.stdout.lines().any(|l| {
                let f: Vec<&str> = l.split('\t').collect();
                f.len() == 4
                    && f[0] == id
                    && f[1] == "failed"
                    && f[2] == stage
                    && f[3].contains(reason)
            }),
            "a line names {id}'s stage {stage} and reason {reason}: {failing:?}"
        );
        assert!(
            failing.stderr.lines().any(|l| l
                .starts_with(&format!("error: {id} failed in {stage}: "))
                && l.contains(reason)),
            "stderr names {id}'s stage {stage} and reason {reason}: {failing:?}"
        );
    }

    // On a terminal: a live line per video, frozen at its end. The videos
    // are known now, so these return at once.
    let tty = vidpipe_on_a_terminal(&["submit", "--wait", &good], &env).await;
    assert_eq!(tty.code, Some(0), "{tty:?}");
    assert!(
        tty.stdout.contains(&format!("{good_id}  [5/5] done in ")),
        "{tty:?}"
    );
    let tty = vidpipe_on_a_terminal(&["submit", "--wait", &silent], &env).await;
    assert_eq!(tty.code, Some(1), "{tty:?}");
    assert!(
        tty.stdout.contains(&format!(
            "{silent_id}  [3/5] extract-audio failed: no_audio"
        )),
        "{tty:?}"
    );

    // status --json: the contract's fields and types.
    let limit = Duration::from_secs(60);
    let ran = vidpipe(
        &["status", "--json", &good_id, &silent_id, &missing_id],
        &env,
        limit,
    )
    .await;
    assert_eq!(ran.code, Some(0), "{ran:?}");
    let all: Value = serde_json::from_str(&ran.stdout).unwrap_or_else(|e| panic!("{e}: {ran:?}"));
    let all = all.as_array().expect("a JSON array");
    assert_eq!(all.len(), 3, "{ran:?}");
    for v in all {
        for key in ["id", "url", "status"] {
            assert!(v[key].is_string(), "{key} is a string: {v}");
        }
        let stages = v["stages"].as_array().expect("stages is an array");
        assert!(!stages.is_empty(), "{v}");
        for s in stages {
            assert!(
                STAGES.contains(&s["name"].as_str().unwrap_or_default()),
                "{s}"
            );
            assert!(s["status"].is_string(), "{s}");
            assert!(s["attempts"].as_i64().is_some_and(|n| n >= 1), "{s}");
            assert!(
                s["duration_ms"].is_i64() || s["duration_ms"].is_null(),
                "{s}"
            );
            assert!(s["error"].is_string() || s["error"].is_null(), "{s}");
        }
    }
    let by_id = |id: &str| all.iter().find(|v| v["id"] == id).expect(id);
    let g = by_id(&good_id);
    assert_eq!(g["status"], "done");
    assert_eq!(g["url"], good.as_str());
    let names: Vec<&str> = g["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, STAGES, "{g}");
    for s in g["stages"].as_array().unwrap() {
        assert_eq!(s["status"], "done", "{s}");
        assert!(s["duration_ms"].is_i64() && s["error"].is_null(), "{s}");
    }
    for (id, stage, reason) in [
        (&silent_id, "extract-audio", "no_audio"),
        (&missing_id, "download", "http_404"),
    ] {
        let v = by_id(id);
        assert_eq!(v["status"], "failed", "{v}");
        let last = v["stages"].as_array().unwrap().last().unwrap().clone();
        assert_eq!(
            (last["name"].as_str(), last["status"].as_str()),
            (Some(stage), Some("failed")),
            "{v}"
        );
        assert!(
            last["error"].as_str().is_some_and(|e| e.contains(reason)),
            "{v}"
        );
    }
    // Without ids: every video of this database.
    let ran = vidpipe(&["status", "--json"], &env, limit).await;
    let listed: Value =
        serde_json::from_str(&ran.stdout).unwrap_or_else(|e| panic!("{e}: {ran:?}"));
    assert_eq!(listed.as_array().map(Vec::len), Some(3), "{ran:?}");

    // The table: a header and a row per video, columns aligned.
    let ran = vidpipe(&["status"], &env, limit).await;
    assert_eq!(ran.code, Some(0), "{ran:?}");
    let lines: Vec<&str> = ran.stdout.lines().collect();
    assert_eq!(lines.len(), 4, "{ran:?}");
    let header = lines[0];
    for column in ["ID", "STATUS", "STAGE", "GEN", "TIME", "URL / ERROR"] {
        assert!(header.contains(column), "{column}: {ran:?}");
    }
    let at = |name: &str| header.find(name).unwrap();
    for (id, status, stage, detail) in [
        (&good_id, "done", "summarize", good.as_str()),
        (&silent_id, "failed", "extract-audio", "no_audio"),
        (&missing_id, "failed", "download", "http_404"),
    ] {
        let row = lines
            .iter()
            .find(|l| l.starts_with(id.as_str()))
            .unwrap_or_else(|| panic!("a row for {id}: {ran:?}"));
        assert_eq!(
            row.get(at("STATUS")..at("STATUS") + status.len()),
            Some(status),
            "{ran:?}"
        );
        assert_eq!(
            row.get(at("STAGE")..at("STAGE") + stage.len()),
            Some(stage),
            "{ran:?}"
        );
        assert!(
            row.get(at("URL / ERROR")..)
                .is_some_and(|d| d.contains(detail)),
            "{ran:?}"
        );
    }
    let unknown = vidpipe(&["status", "url:nothing-here"], &env, limit).await;
    assert_eq!(unknown.code, Some(1), "{unknown:?}");
    assert!(unknown.stderr.contains("unknown video id"), "{unknown:?}");

    // show: every format of the transcript and the summary.
    let show = |what: &'static str, format: &'static str| {
        let (env, id) = (env.clone(), good_id.clone());
        async move {
            let ran = vidpipe(&["show", &id, what, "--format", format], &env, limit).await;
            assert_eq!(ran.code, Some(0), "show {what} --format {format}: {ran:?}");
            assert!(
                ran.stderr.is_empty(),
                "show {what} --format {format}: {ran:?}"
            );
            ran.stdout
        }
    };
    let txt = show("--transcript", "txt").await;
    assert!(txt.to_lowercase().contains("river"), "{txt}");
    assert_eq!(show("--transcript", "txt").await, txt);
    let srt = show("--transcript", "srt").await;
    let srt_cues = cues(&srt);
    assert!(!srt_cues.is_empty(), "{srt}");
    for (n, (number, timing, text)) in srt_cues.iter().enumerate() {
        assert_eq!(*number, Some(n + 1), "SRT cues are numbered from 1: {srt}");
        let (a, b) = timing.split_once(" --> ").unwrap();
        assert!(is_time(a, ',') && is_time(b, ','), "{timing}");
        assert!(!text.is_empty(), "{srt}");
    }
    let vtt = show("--transcript", "vtt").await;
    assert!(vtt.starts_with("WEBVTT\n\n"), "{vtt}");
    let vtt_cues = cues(&vtt);
    assert_eq!(vtt_cues.len(), srt_cues.len(), "{vtt}");
    for (number, timing, text) in &vtt_cues {
        assert_eq!(*number, None, "{vtt}");
        let (a, b) = timing.split_once(" --> ").unwrap();
        assert!(is_time(a, '.') && is_time(b, '.'), "{timing}");
        assert!(!text.is_empty(), "{vtt}");
    }
    let json: Value =
        serde_json::from_str(&show("--transcript", "json").await).expect("transcript JSON");
    let segments = json["segments"].as_array().expect("segments");
    assert_eq!(segments.len(), srt_cues.len(), "{json}");
    for s in segments {
        assert!(
            s["start_ms"].is_i64() && s["end_ms"].is_i64() && s["text"].is_string(),
            "{s}"
        );
    }
    let md = show("--summary", "md").await;
    assert!(md.starts_with("# "), "a markdown heading: {md}");
    assert!(md.contains("\n## Summary\n"), "{md}");
    let summary: Value =
        serde_json::from_str(&show("--summary", "json").await).expect("summary JSON");
    assert!(
        summary["summary"].as_str().is_some_and(|s| !s.is_empty()),
        "{summary}"
    );
    assert!(summary["key_points"].is_array(), "{summary}");
    // Defaults: txt for transcripts, md for summaries.
    let default = vidpipe(&["show", &good_id, "--transcript"], &env, limit).await;
    assert_eq!(default.stdout, txt, "{default:?}");
    let default = vidpipe(&["show", &good_id, "--summary"], &env, limit).await;
    assert_eq!(default.stdout, md, "{default:?}");
    // A format the result does not come in: usage, exit 2.
    let ran = vidpipe(
        &["show", &good_id, "--summary", "--format", "srt"],
        &env,
        limit,
    )
    .await;
    assert_eq!(ran.code, Some(2), "{ran:?}");
    assert!(ran.stderr.contains("md, json"), "{ran:?}");
    // A video that never got that far: exit 1, saying so.
    let ran = vidpipe(&["show", &silent_id, "--transcript"], &env, limit).await;
    assert_eq!(ran.code, Some(1), "{ran:?}");
    assert!(ran.stderr.contains("no finished transcribe run"), "{ran:?}");
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_service_that_cannot_be_reached_is_named_with_exit_code_3() {
    let port = closed_port();
    let limit = Duration::from_secs(90);
    // PostgreSQL: every command that needs it.
    let no_database = [(
        "VIDPIPE_DATABASE_URL",
        format!("postgres://vidpipe@127.0.0.1:{port}/vidpipe"),
    )];
    let commands: [&[&str]; 7] = [
        &["status"],
        &["status", "--json"],
        &["show", "url:x", "--transcript"],
        &["sources", "list"],
        &["submit", "https://example.com/a.mp4"],
        &["replay", "--stage", "transcribe", "--video", "url:x"],
        &["migrate"],
    ];
    let runs = futures::future::join_all(
        commands
            .iter()
            .map(|args| vidpipe(args, &no_database, limit)),
    )
    .await;
    for (args, ran) in commands.iter().zip(runs) {
        assert_eq!(ran.code, Some(3), "{args:?}: {ran:?}");
        assert!(
            ran.stderr.contains("PostgreSQL") && ran.stderr.contains(&port.to_string()),
            "{args:?} names PostgreSQL and where: {ran:?}"
        );
    }

    // Kafka and the schema registry, with the database there.
    let mut c = config();
    c.topic_prefix = format!("{}.", unique("cli_down"));
    let (_pool, url) = fresh_database_url(&c).await;
    c.database_url = url;
    let mut env = env_of(&c);
    env.push(("VIDPIPE_KAFKA_BROKERS", format!("127.0.0.1:{port}")));
    let ran = vidpipe(
        &["submit", "https://example.com/b.mp4", "--wait"],
        &env,
        limit,
    )
    .await;
    assert_eq!(ran.code, Some(3), "{ran:?}");
    assert!(
        ran.stderr.contains("Kafka") && ran.stderr.contains(&format!("127.0.0.1:{port}")),
        "names Kafka and where: {ran:?}"
    );
    let mut env = env_of(&c);
    env.push((
        "VIDPIPE_SCHEMA_REGISTRY_URL",
        format!("http://127.0.0.1:{port}"),
    ));
    let ran = vidpipe(&["submit", "https://example.com/c.mp4"], &env, limit).await;
    assert_eq!(ran.code, Some(3), "{ran:?}");
    assert!(ran.stderr.contains("schema registry"), "{ran:?}");
}

/// `migrate` on a database whose applied migration was changed since:
/// exit 1 naming the migration (someone must look), not 3 (PostgreSQL
/// answers; trying again would not help).
#[tokio::test(flavor = "multi_thread")]
async fn a_migration_that_fails_is_exit_1_not_unreachable() {
    let c = config();
    let (pool, url) = crate::helpers::fresh_database_url(&c).await;
    sqlx::query(
        "UPDATE _sqlx_migrations SET checksum = '\\x00'::bytea
         WHERE version = (SELECT min(version) FROM _sqlx_migrations)",
    )
    .execute(&pool)
    .await
    .unwrap();
    let ran = vidpipe(
        &["migrate"],
        &[("VIDPIPE_DATABASE_URL", url.expose_secret().to_string())],
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(ran.code, Some(1), "{ran:?}");
    assert!(ran.stderr.contains("migration"), "{ran:?}");
    assert!(!ran.stderr.contains("vidpipe@"), "{ran:?}");
}

/// A login PostgreSQL refuses, or a database that does not exist, is a
/// configuration error (exit 2, naming PostgreSQL, not echoing the
/// password), not a service that cannot be reached.
#[tokio::test(flavor = "multi_thread")]
async fn a_refused_login_or_a_missing_database_is_exit_2() {
    let c = config();
    let mut wrong_password =
        url::Url::parse(c.database_url.expose_secret()).expect("database_url parses");
    wrong_password
        .set_password(Some("not-the-password-0451"))
        .unwrap();
    let mut no_database = url::Url::parse(c.database_url.expose_secret()).unwrap();
    no_database.set_path("/no_such_database_0451");
    for url in [wrong_password, no_database] {
        for args in [&["status"][..], &["migrate"][..], &["run"][..]] {
            let ran = vidpipe(
                args,
                &[("VIDPIPE_DATABASE_URL", url.to_string())],
                Duration::from_secs(60),
            )
            .await;
            assert_eq!(ran.code, Some(2), "{args:?} {url}: {ran:?}");
            assert!(ran.stderr.contains("PostgreSQL"), "{ran:?}");
            assert!(!ran.stderr.contains("not-the-password"), "{ran:?}");
        }
    }
}
