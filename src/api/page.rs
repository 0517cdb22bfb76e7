//! The status pages for people: server-rendered HTML (askama templates in
//! `templates/`, which escape every value), plus one script and one style
//! sheet served from here. Everything shown came from input (titles, URLs,
//! error texts) and is treated as hostile: it is only ever escaped text,
//! links to other sites are made only for http(s) URLs, and the pages'
//! Content-Security-Policy runs no script but ours.
//!
//! The script polls the JSON API and updates the page in place: on `/`
//! the video rows every 2 s (adding new ones), and the counters and the
//! stages table from `/api/v1/overview` every 5 s; on `/videos/{id}` the
//! video and its timeline every 2 s.
//! Contract for browser tests: each video row of `/` is
//! `<tr data-video-id="{id}" data-status="{status}">` with a link
//! `<a class="video-link" href="/videos/{percent-encoded id}">`; the
//! counters are `.total[data-status="{status}"] .n`; each stage's row is
//! `<tr data-stage="{stage}">` with cells `.queued`, `.running`, `.done`,
//! `.failed`, `.per-minute`, `.lag`, `.partitions`, `.members`; `#kafka-error`
//! (hidden when Kafka answered) says why lag and members are missing; each stage
//! run on `/videos/{id}` is an element with `data-stage` and `data-status`
//! (newest generation first, so the first one of a stage is the current
//! run); `#summary-link` and `#transcript-link` lead to the pages whose
//! content is in `#summary` and `#transcript`.

use std::collections::HashMap;
use std::sync::Arc;

use askama::Template;
use axum::Router;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, Query, State as Extract};
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use chrono::{DateTime, Utc};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};

use super::State;
use super::error::ApiError;
use super::model::{StageOverview, StatusCounts, TimelineRun, Video};
use super::queries;
use super::routes::{self, DEFAULT_LIMIT, OVERVIEW_KAFKA_WAIT};
use crate::backends::asr::Transcript;
use crate::backends::summarize::Summary;
use crate::client::{self, ResultKind};
use crate::stages::STAGES;

type Shared = Arc<State>;

/// What `encodeURIComponent` leaves alone, so that links the script adds
/// match the ones rendered here.
const COMPONENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'!')
    .remove(b'~')
    .remove(b'*')
    .remove(b'\'')
    .remove(b'(')
    .remove(b')');

/// A video id as one URL path segment.
pub fn encode_id(id: &str) -> String {
    utf8_percent_encode(id, COMPONENT).to_string()
}

/// The page routes.
pub fn routes() -> Router<Shared> {
    Router::new()
        .route("/", get(index))
        .route("/videos/{id}", get(video))
        .route("/videos/{id}/summary", get(summary))
        .route("/videos/{id}/transcript", get(transcript))
        .route("/assets/vidpipe.js", get(script))
        .route("/assets/vidpipe.css", get(style))
        .route("/assets/favicon.svg", get(icon))
        // Browsers ask for it whatever the page says.
        .route("/favicon.ico", get(icon))
}

async fn script() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        include_str!("assets/vidpipe.js"),
    )
        .into_response()
}

async fn style() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        include_str!("assets/vidpipe.css"),
    )
        .into_response()
}

async fn icon() -> Response {
    (
        [
            (header::CONTENT_TYPE, "image/svg+xml"),
            (header::CACHE_CONTROL, "max-age=86400"),
        ],
        include_str!("assets/favicon.svg"),
    )
        .into_response()
}

#[derive(Template)]
#[template(path = "error.html", config = "src/api/askama.toml")]
struct ErrorPage<'a> {
    heading: &'a str,
    message: &'a str,
}

fn error_page(status: StatusCode, heading: &str, message: &str) -> Response {
    render(status, &ErrorPage { heading, message })
}

/// The 404 page.
pub fn not_found(message: &str) -> Response {
    error_page(StatusCode::NOT_FOUND, "Not found", message)
}

fn render(status: StatusCode, page: &impl Template) -> Response {
    match page.render() {
        Ok(html) => (status, Html(html)).into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "a page did not render");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "the page could not be rendered",
            )
                .into_response()
        }
    }
}

/// An API error as a page with the same status.
struct PageError(ApiError);

impl From<ApiError> for PageError {
    fn from(e: ApiError) -> Self {
        Self(e)
    }
}

impl From<sqlx::Error> for PageError {
    fn from(e: sqlx::Error) -> Self {
        Self(ApiError::database(e))
    }
}

impl IntoResponse for PageError {
    fn into_response(self) -> Response {
        let status = self.0.status();
        let heading = match status {
            StatusCode::BAD_REQUEST => "Bad request",
            StatusCode::NOT_FOUND => "Not found",
            StatusCode::SERVICE_UNAVAILABLE => "A service is not answering",
            _ => "Something went wrong",
        };
        if status.is_server_error() {
            tracing::warn!(status = status.as_u16(), error = %self.0, "page failed");
        }
        error_page(status, heading, &self.0.to_string())
    }
}

fn path_id(id: Result<Path<String>, PathRejection>) -> Result<String, PageError> {
    id.map(|Path(id)| id)
        .map_err(|e| PageError(ApiError::BadRequest(e.body_text())))
}

fn generation_param(q: &HashMap<String, String>) -> Result<Option<i64>, PageError> {
    let Some(raw) = q.get("generation") else {
        return Ok(None);
    };
    // Below 1 is for `client::read_result` to refuse.
    let g = raw.parse::<i64>().map_err(|_| {
        PageError(ApiError::BadRequest(format!(
            "generation: {raw:?} is not a number"
        )))
    })?;
    Ok(Some(g))
}

fn when(t: Option<DateTime<Utc>>) -> String {
    t.map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
        .unwrap_or_default()
}

/// `1.2 s`, `3 min 04 s`, `1 h 02 min`.
fn duration(ms: Option<i64>) -> String {
    let Some(ms) = ms else {
        return String::new();
    };
    let ms = ms.max(0);
    if ms < 60_000 {
        format!("{:.1} s", ms as f64 / 1000.0)
    } else if ms < 3_600_000 {
        format!("{} min {:02} s", ms / 60_000, (ms % 60_000) / 1000)
    } else {
        format!("{} h {:02} min", ms / 3_600_000, (ms % 3_600_000) / 60_000)
    }
}

/// `mm:ss`, or `h:mm:ss` past an hour.
fn clock(ms: i64) -> String {
    let s = ms.max(0) / 1000;
    if s >= 3600 {
        format!("{}:{:02}:{:02}", s / 3600, (s % 3600) / 60, s % 60)
    } else {
        format!("{:02}:{:02}", s / 60, s % 60)
    }
}

/// A link to an outside page only for http(s): a `javascript:` URL from a
/// hostile feed must never become a link.
fn outside_link(url: &str) -> Option<String> {
    let parsed = url::Url::parse(url).ok()?;
    matches!(parsed.scheme(), "http" | "https").then(|| parsed.to_string())
}

struct StageRow {
    name: String,
    counts: StatusCounts,
    per_minute: String,
    lag: String,
    partitions: String,
    members: String,
}

impl From<StageOverview> for StageRow {
    /// As `vidpipe.js` shows the overview's numbers: `-` for Kafka's when
    /// there are none.
    fn from(s: StageOverview) -> Self {
        let or_dash = |n: Option<i64>| n.map_or("-".to_string(), |n| n.to_string());
        Self {
            name: s.stage,
            counts: s.videos,
            per_minute: format!("{:.1}", s.done_per_minute),
            lag: or_dash(s.lag),
            partitions: or_dash(s.partitions),
            members: or_dash(s.members),
        }
    }
}

struct FailureRow {
    id: String,
    href: String,
    label: String,
    stage: String,
    when: String,
    error: String,
}

struct VideoRow {
    id: String,
    href: String,
    label: String,
    status: String,
    stage: String,
    generation: i64,
    error: String,
}

#[derive(Template)]
#[template(path = "index.html", config = "src/api/askama.toml")]
struct IndexPage {
    limit: i64,
    totals: StatusCounts,
    kafka_error: Option<String>,
    stages: Vec<StageRow>,
    failures: Vec<FailureRow>,
    videos: Vec<VideoRow>,
}

/// `/`: counts, stages, failures and the most recent videos.
async fn index(
    Extract(state): Extract<Shared>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, PageError> {
    let limit = match q.get("limit") {
        None => DEFAULT_LIMIT,
        Some(raw) => raw
            .parse::<i64>()
            .ok()
            .filter(|n| (1..=1000).contains(n))
            .ok_or_else(|| {
                PageError(ApiError::BadRequest(format!(
                    "limit: give 1 to 1000, not {raw:?}"
                )))
            })?,
    };
    let pool = &state.pool;
    let (overview, failures, videos) = tokio::join!(
        state.overview(OVERVIEW_KAFKA_WAIT),
        queries::failures(pool, 10),
        client::status(pool, &[], limit),
    );
    let (overview, failures, videos) = (overview?, failures?, videos?);
    let totals = overview.videos;
    let kafka_error = overview.kafka_error;
    let stages = overview.stages.into_iter().map(StageRow::from).collect();
    let ids: Vec<String> = videos
        .iter()
        .map(|v| v.id.clone())
        .chain(failures.iter().map(|f| f.id.clone()))
        .collect();
    let titles = queries::titles(pool, &ids).await?;
    let failures = failures
        .into_iter()
        .map(|f| FailureRow {
            href: encode_id(&f.id),
            label: f.title.clone().unwrap_or_else(|| f.url.clone()),
            stage: f.stage.unwrap_or_default(),
            when: when(Some(f.updated_at)),
            error: f.error.unwrap_or_default(),
            id: f.id,
        })
        .collect();
    let videos = videos
        .into_iter()
        .map(|v| VideoRow {
            href: encode_id(&v.id),
            label: titles.get(&v.id).cloned().unwrap_or_else(|| v.url.clone()),
            status: v.status,
            stage: v.stage.unwrap_or_default(),
            generation: v.generation,
            error: v.error.unwrap_or_default(),
            id: v.id,
        })
        .collect();
    Ok(render(
        StatusCode::OK,
        &IndexPage {
            limit,
            totals,
            kafka_error,
            stages,
            failures,
            videos,
        },
    ))
}

struct RunRow {
    stage: String,
    status: String,
    generation: i64,
    attempts: String,
    duration: String,
    started: String,
    finished: String,
    error: String,
}

impl From<TimelineRun> for RunRow {
    fn from(r: TimelineRun) -> Self {
        let error = match (r.error_class, r.error) {
            (Some(class), Some(e)) => format!("{class}: {e}"),
            (None, Some(e)) => e,
            (Some(class), None) => class,
            (None, None) => String::new(),
        };
        Self {
            stage: r.stage,
            status: r.status,
            generation: r.generation,
            attempts: format!(
                "{} attempt{}",
                r.attempts,
                if r.attempts == 1 { "" } else { "s" }
            ),
            duration: duration(r.duration_ms),
            started: when(r.started_at),
            finished: when(r.finished_at),
            error,
        }
    }
}

#[derive(Template)]
#[template(path = "video.html", config = "src/api/askama.toml")]
struct VideoPage {
    id: String,
    href: String,
    heading: String,
    url: String,
    url_href: Option<String>,
    status: String,
    stage: String,
    generation: i64,
    error: String,
    runs: Vec<RunRow>,
}

/// The stages a queued or running video has still to reach in its current
/// generation, shown as `pending` so that progress is visible before a
/// stage starts: from the first stage this generation ran (a replay starts
/// at its stage, which the video's row names while it is queued) to the
/// end. A finished or failed video has none. (`vidpipe.js` does the same.)
fn pending_stages(v: &Video, runs: &[TimelineRun]) -> Vec<&'static str> {
    if !matches!(v.status.as_str(), "queued" | "running") {
        return Vec::new();
    }
    let ran = |stage: &str| {
        runs.iter()
            .any(|r| r.generation == v.generation && r.stage == stage)
    };
    let start = STAGES
        .iter()
        .position(|s| ran(s))
        .or_else(|| {
            v.stage
                .as_deref()
                .and_then(|s| STAGES.iter().position(|x| *x == s))
        })
        .unwrap_or(0);
    STAGES[start..]
        .iter()
        .copied()
        .filter(|s| !ran(s))
        .collect()
}

/// `/videos/{id}`: the video and its timeline.
async fn video(
    Extract(state): Extract<Shared>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Response, PageError> {
    let id = path_id(id)?;
    let t = routes::timeline(&state, &id).await?;
    let v = t.video;
    let runs: Vec<RunRow> = pending_stages(&v, &t.runs)
        .into_iter()
        .map(|stage| RunRow {
            stage: stage.to_string(),
            status: "pending".to_string(),
            generation: v.generation,
            attempts: String::new(),
            duration: String::new(),
            started: String::new(),
            finished: String::new(),
            error: String::new(),
        })
        .collect();
    let mut all: Vec<RunRow> = t.runs.into_iter().map(RunRow::from).collect();
    all.extend(runs);
    let order = |s: &str| STAGES.iter().position(|x| *x == s).unwrap_or(STAGES.len());
    all.sort_by(|a, b| {
        b.generation
            .cmp(&a.generation)
            .then(order(&a.stage).cmp(&order(&b.stage)))
    });
    Ok(render(
        StatusCode::OK,
        &VideoPage {
            href: encode_id(&v.id),
            heading: t.title.unwrap_or_else(|| v.id.clone()),
            url_href: outside_link(&v.url),
            url: v.url,
            status: v.status,
            stage: v.stage.unwrap_or_default(),
            generation: v.generation,
            error: v.error.unwrap_or_default(),
            id: v.id,
            runs: all,
        },
    ))
}

async fn read_result(
    state: &State,
    id: &str,
    kind: ResultKind,
    format: &str,
    generation: Option<i64>,
) -> Result<client::ResultFile, PageError> {
    client::read_result(&state.pool, &state.blobs, id, kind, format, generation)
        .await
        .map_err(|e| PageError(e.into()))
}

/// The heading of a video's result pages: its title, else its id.
async fn heading(state: &State, id: &str) -> Result<String, PageError> {
    Ok(queries::titles(&state.pool, &[id.to_string()])
        .await?
        .remove(id)
        .unwrap_or_else(|| id.to_string()))
}

struct SummaryView {
    text: String,
    key_points: Vec<(String, String)>,
    chapters: Vec<(String, String, String, String)>,
    backend: String,
    language: Option<String>,
}

#[derive(Template)]
#[template(path = "summary.html", config = "src/api/askama.toml")]
struct SummaryPage {
    id: String,
    href: String,
    heading: String,
    generation: i64,
    parsed: Option<SummaryView>,
    markdown: String,
}

/// `/videos/{id}/summary`: the summary as text, key points and chapters.
async fn summary(
    Extract(state): Extract<Shared>,
    id: Result<Path<String>, PathRejection>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, PageError> {
    let id = path_id(id)?;
    let generation = generation_param(&q)?;
    let file = read_result(&state, &id, ResultKind::Summary, "json", generation).await?;
    let parsed = serde_json::from_slice::<Summary>(&file.bytes)
        .ok()
        .map(|s| SummaryView {
            text: s.summary,
            key_points: s
                .key_points
                .into_iter()
                .map(|p| (clock(p.start_ms), p.text))
                .collect(),
            chapters: s
                .chapters
                .into_iter()
                .map(|c| (clock(c.start_ms), clock(c.end_ms), c.title, c.summary))
                .collect(),
            backend: s.backend,
            language: s.language,
        });
    // A summary.json this build cannot read: show the markdown as text.
    let markdown = if parsed.is_none() {
        let md = read_result(
            &state,
            &id,
            ResultKind::Summary,
            "md",
            Some(file.generation),
        )
        .await?;
        String::from_utf8_lossy(&md.bytes).into_owned()
    } else {
        String::new()
    };
    Ok(render(
        StatusCode::OK,
        &SummaryPage {
            href: encode_id(&id),
            heading: heading(&state, &id).await?,
            generation: file.generation,
            parsed,
            markdown,
            id,
        },
    ))
}

struct SegmentRow {
    start_ms: i64,
    end_ms: i64,
    start: String,
    text: String,
}

#[derive(Template)]
#[template(path = "transcript.html", config = "src/api/askama.toml")]
struct TranscriptPage {
    id: String,
    href: String,
    heading: String,
    generation: i64,
    language: Option<String>,
    segments: Vec<SegmentRow>,
}

/// `/videos/{id}/transcript`: the segments with their start times.
async fn transcript(
    Extract(state): Extract<Shared>,
    id: Result<Path<String>, PathRejection>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, PageError> {
    let id = path_id(id)?;
    let generation = generation_param(&q)?;
    let file = read_result(&state, &id, ResultKind::Transcript, "json", generation).await?;
    let parsed: Transcript = serde_json::from_slice(&file.bytes).map_err(|e| {
        PageError(ApiError::Internal(format!(
            "the transcript of {id} does not parse: {e}"
        )))
    })?;
    let segments = parsed
        .segments
        .into_iter()
        .map(|s| SegmentRow {
            start_ms: s.start_ms,
            end_ms: s.end_ms,
            start: clock(s.start_ms),
            text: s.text,
        })
        .collect();
    Ok(render(
        StatusCode::OK,
        &TranscriptPage {
            href: encode_id(&id),
            heading: heading(&state, &id).await?,
            generation: file.generation,
            language: parsed.language,
            segments,
            id,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_encoded_like_encode_uri_component() {
        assert_eq!(encode_id("url:0123abcd"), "url%3A0123abcd");
        assert_eq!(encode_id("yt:a-b_c.d~e"), "yt%3Aa-b_c.d~e");
        assert_eq!(encode_id("a/b?c#d e"), "a%2Fb%3Fc%23d%20e");
        assert_eq!(encode_id("é"), "%C3%A9");
        assert_eq!(encode_id("!*'()"), "!*'()");
    }

    #[test]
    fn only_web_urls_become_links() {
        assert!(outside_link("javascript:alert(1)").is_none());
        assert!(outside_link("data:text/html,<script>").is_none());
        assert_eq!(
            outside_link("https://example.com/a b").as_deref(),
            Some("https://example.com/a%20b")
        );
    }

    #[test]
    fn hostile_values_are_escaped() {
        let page = ErrorPage {
            heading: "<script>alert(1)</script>",
            message: "\"><img src=x onerror=alert(1)>",
        }
        .render()
        .unwrap();
        assert!(!page.contains("<script>alert"), "{page}");
        assert!(!page.contains("<img"), "{page}");
        assert!(page.contains("&#60;script&#62;") || page.contains("&lt;script&gt;"));
    }

    #[test]
    fn only_stages_still_to_come_are_pending() {
        let video = |status: &str, stage: Option<&str>, generation| Video {
            id: "url:a".into(),
            url: String::new(),
            status: status.into(),
            stage: stage.map(str::to_string),
            generation,
            error: None,
            stages: Vec::new(),
        };
        let run = |stage: &str, generation| TimelineRun {
            stage: stage.into(),
            generation,
            status: "done".into(),
            attempts: 1,
            started_at: None,
            finished_at: None,
            duration_ms: None,
            error_class: None,
            error: None,
        };
        assert_eq!(
            pending_stages(&video("queued", None, 1), &[]),
            STAGES.to_vec()
        );
        let first = [run("discover", 1), run("download", 1)];
        assert_eq!(
            pending_stages(&video("running", Some("download"), 1), &first),
            ["extract-audio", "transcribe", "summarize"]
        );
        // A replay from summarize: generation 2 never runs the others.
        assert_eq!(
            pending_stages(&video("queued", Some("summarize"), 2), &first),
            ["summarize"]
        );
        assert!(pending_stages(&video("failed", Some("download"), 1), &first).is_empty());
    }

    #[test]
    fn times_read_well() {
        assert_eq!(clock(61_500), "01:01");
        assert_eq!(clock(3_723_000), "1:02:03");
        assert_eq!(duration(Some(1_234)), "1.2 s");
        assert_eq!(duration(Some(125_000)), "2 min 05 s");
        assert_eq!(duration(None), "");
    }
}
