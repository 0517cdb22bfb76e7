//! The JSON API under `/api/v1`, and `/healthz`, `/readyz`, `/metrics`.
//!
//! Each handler carries its own OpenAPI description (`#[utoipa::path]`)
//! and is registered through `utoipa_axum::routes!`, which adds the route
//! and its document entry together: a route cannot exist undocumented, and
//! the bodies are the types in `model`, so the schemas are what is sent.

use std::sync::Arc;

use axum::Json;
use axum::extract::State as Extract;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::State;
use super::error::{ApiError, JsonBody, PathParams, QueryParams};
use super::model::{
    ErrorBody, Health, ListQuery, Overview, Readiness, ReplayItem, ReplayRequest, ReplayResponse,
    Source, SourceRequest, StageInfo, SubmitRequest, Submitted, SummaryQuery, Timeline,
    TranscriptQuery, Video,
};
use super::queries;
use crate::client::{self, ResultKind, storable};
use crate::stages::discover::MAX_BACKFILL;
use crate::store::catalog::PgCatalog;
use crate::{ids, replay};

type Shared = Arc<State>;

/// Default and largest page of the video list.
pub const DEFAULT_LIMIT: i64 = 50;
const MAX_LIMIT: i64 = 1000;
const MAX_URLS: usize = 100;
const MAX_REQUESTED_BY: usize = 200;
const MAX_REPLAY_VIDEOS: usize = 1000;
/// How long the overview waits for a first view of Kafka (later views are
/// read in the background); the status page, which polls it, fills the
/// Kafka columns in once one is there.
pub const OVERVIEW_KAFKA_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// Enqueue videos or sources.
///
/// A video already known is not processed again (its `known` field says
/// its status; replay reprocesses). Feeds, channels and playlists are
/// sources: their new videos are enqueued.
#[utoipa::path(
    post, path = "/api/v1/videos", tag = "videos",
    request_body = SubmitRequest,
    responses(
        (status = 202, description = "Sent to the pipeline (or already known)", body = Vec<Submitted>),
        (status = 400, description = "A bad URL or field, named", body = ErrorBody),
        (status = 503, description = "Kafka, the schema registry or PostgreSQL does not answer", body = ErrorBody),
    )
)]
pub async fn submit(
    Extract(state): Extract<Shared>,
    JsonBody(req): JsonBody<SubmitRequest>,
) -> Result<(StatusCode, Json<Vec<Submitted>>), ApiError> {
    if req.urls.is_empty() {
        return Err(ApiError::BadRequest(
            "urls: give at least one URL".to_string(),
        ));
    }
    if req.urls.len() > MAX_URLS {
        return Err(ApiError::BadRequest(format!(
            "urls: at most {MAX_URLS} URLs per request, not {}",
            req.urls.len()
        )));
    }
    if let Some(who) = &req.requested_by
        && who.chars().count() > MAX_REQUESTED_BY
    {
        return Err(ApiError::BadRequest(format!(
            "requested_by: at most {MAX_REQUESTED_BY} characters"
        )));
    }
    // Bad URLs are refused before Kafka is contacted.
    let plans = client::plan(&req.urls, req.feed)?;
    let sender = state.sender().await?;
    let submitted =
        client::submit_with(sender, &state.pool, plans, req.requested_by.as_deref()).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(submitted.into_iter().map(Submitted::from).collect()),
    ))
}

/// The most recent videos, newest first, with their stage runs.
#[utoipa::path(
    get, path = "/api/v1/videos", tag = "videos",
    params(ListQuery),
    responses(
        (status = 200, description = "Videos, as `vidpipe status --json` prints them", body = Vec<Video>),
        (status = 400, description = "A bad parameter, named", body = ErrorBody),
        (status = 503, description = "PostgreSQL does not answer", body = ErrorBody),
    )
)]
pub async fn list_videos(
    Extract(state): Extract<Shared>,
    QueryParams(q): QueryParams<ListQuery>,
) -> Result<Json<Vec<Video>>, ApiError> {
    let limit = q.limit.unwrap_or(DEFAULT_LIMIT);
    if !(1..=MAX_LIMIT).contains(&limit) {
        return Err(ApiError::BadRequest(format!(
            "limit: give 1 to {MAX_LIMIT}, not {limit}"
        )));
    }
    let videos = client::status(&state.pool, &[], limit).await?;
    Ok(Json(videos))
}

/// Loads one video or answers 404.
pub async fn video(state: &State, id: &str) -> Result<Video, ApiError> {
    client::status(&state.pool, &[id.to_string()], 1)
        .await?
        .into_iter()
        .next()
        .ok_or_else(|| ApiError::NotFound(format!("unknown video id {id:?}")))
}

/// One video and its stage runs of the current generation.
#[utoipa::path(
    get, path = "/api/v1/videos/{id}", tag = "videos",
    params(("id" = String, Path, description = "Video id (`yt:…`, `url:…`)")),
    responses(
        (status = 200, description = "The video", body = Video),
        (status = 400, description = "A bad id", body = ErrorBody),
        (status = 404, description = "No such video", body = ErrorBody),
        (status = 503, description = "PostgreSQL does not answer", body = ErrorBody),
    )
)]
pub async fn get_video(
    Extract(state): Extract<Shared>,
    PathParams(id): PathParams<String>,
) -> Result<Json<Video>, ApiError> {
    Ok(Json(video(&state, &id).await?))
}

/// Loads a video's timeline or answers 404.
pub async fn timeline(state: &State, id: &str) -> Result<Timeline, ApiError> {
    let video = video(state, id).await?;
    let runs = queries::runs(&state.pool, id).await?;
    let title = queries::titles(&state.pool, &[id.to_string()])
        .await?
        .remove(id);
    Ok(Timeline { video, title, runs })
}

/// Every stage run of every generation of a video, with start and finish
/// times, attempts and errors.
#[utoipa::path(
    get, path = "/api/v1/videos/{id}/timeline", tag = "videos",
    params(("id" = String, Path, description = "Video id")),
    responses(
        (status = 200, description = "The video and its runs, newest generation first", body = Timeline),
        (status = 400, description = "A bad id", body = ErrorBody),
        (status = 404, description = "No such video", body = ErrorBody),
        (status = 503, description = "PostgreSQL does not answer", body = ErrorBody),
    )
)]
pub async fn get_timeline(
    Extract(state): Extract<Shared>,
    PathParams(id): PathParams<String>,
) -> Result<Json<Timeline>, ApiError> {
    Ok(Json(timeline(&state, &id).await?))
}

/// A result file of a video (transcript or summary) as the response body.
async fn result_file(
    state: &State,
    id: &str,
    kind: ResultKind,
    ext: &str,
    content_type: &'static str,
    generation: Option<i64>,
) -> Result<Response, ApiError> {
    let file = client::read_result(&state.pool, &state.blobs, id, kind, ext, generation).await?;
    Ok(([(header::CONTENT_TYPE, content_type)], file.bytes).into_response())
}

/// A video's transcript file.
#[utoipa::path(
    get, path = "/api/v1/videos/{id}/transcript", tag = "results",
    params(("id" = String, Path, description = "Video id"), TranscriptQuery),
    responses(
        (status = 200, description = "The transcript in the format asked for", content(
            (String = "text/plain"),
            (String = "application/x-subrip"),
            (String = "text/vtt"),
            (serde_json::Value = "application/json"),
        )),
        (status = 400, description = "A bad parameter, named", body = ErrorBody),
        (status = 404, description = "No such video, or no finished transcription (of that generation)", body = ErrorBody),
        (status = 503, description = "PostgreSQL or the blob store does not answer", body = ErrorBody),
        (status = 500, description = "The file is missing from the blob store", body = ErrorBody),
    )
)]
pub async fn get_transcript(
    Extract(state): Extract<Shared>,
    PathParams(id): PathParams<String>,
    QueryParams(q): QueryParams<TranscriptQuery>,
) -> Result<Response, ApiError> {
    let format = q.format.unwrap_or_default();
    let (ext, content_type) = (format.ext(), format.content_type());
    result_file(
        &state,
        &id,
        ResultKind::Transcript,
        ext,
        content_type,
        q.generation,
    )
    .await
}

/// A video's summary file.
#[utoipa::path(
    get, path = "/api/v1/videos/{id}/summary", tag = "results",
    params(("id" = String, Path, description = "Video id"), SummaryQuery),
    responses(
        (status = 200, description = "The summary in the format asked for", content(
            (String = "text/markdown"),
            (serde_json::Value = "application/json"),
        )),
        (status = 400, description = "A bad parameter, named", body = ErrorBody),
        (status = 404, description = "No such video, or no finished summary (of that generation)", body = ErrorBody),
        (status = 503, description = "PostgreSQL or the blob store does not answer", body = ErrorBody),
        (status = 500, description = "The file is missing from the blob store", body = ErrorBody),
    )
)]
pub async fn get_summary(
    Extract(state): Extract<Shared>,
    PathParams(id): PathParams<String>,
    QueryParams(q): QueryParams<SummaryQuery>,
) -> Result<Response, ApiError> {
    let format = q.format.unwrap_or_default();
    let (ext, content_type) = (format.ext(), format.content_type());
    result_file(
        &state,
        &id,
        ResultKind::Summary,
        ext,
        content_type,
        q.generation,
    )
    .await
}

/// Subscriptions (feeds, channels, playlists) that discovery polls.
#[utoipa::path(
    get, path = "/api/v1/sources", tag = "sources",
    responses(
        (status = 200, description = "Every subscription, by URL", body = Vec<Source>),
        (status = 503, description = "PostgreSQL does not answer", body = ErrorBody),
    )
)]
pub async fn list_sources(Extract(state): Extract<Shared>) -> Result<Json<Vec<Source>>, ApiError> {
    let list = PgCatalog::new(state.pool.clone()).sources().await?;
    Ok(Json(list.into_iter().map(Source::from).collect()))
}

/// Subscribe to a source (or change a subscription); its first poll is
/// due at once.
#[utoipa::path(
    post, path = "/api/v1/sources", tag = "sources",
    request_body = SourceRequest,
    responses(
        (status = 201, description = "The subscription", body = Source),
        (status = 400, description = "A bad URL or field, named", body = ErrorBody),
        (status = 503, description = "PostgreSQL does not answer", body = ErrorBody),
    )
)]
pub async fn add_source(
    Extract(state): Extract<Shared>,
    JsonBody(req): JsonBody<SourceRequest>,
) -> Result<(StatusCode, Json<Source>), ApiError> {
    let every = req.every_secs.unwrap_or(3600);
    if !(60..=31_536_000).contains(&every) {
        return Err(ApiError::BadRequest(format!(
            "every_secs: give 60 (one minute) to 31536000 (a year), not {every}"
        )));
    }
    let max = MAX_BACKFILL as i32;
    let backfill = req
        .backfill
        .unwrap_or(state.config.media.max_backfill as i32);
    if !(0..=max).contains(&backfill) {
        return Err(ApiError::BadRequest(format!(
            "backfill: give 0 to {max}, not {backfill}"
        )));
    }
    let url = ids::normalise(&req.url).map_err(|e| ApiError::BadRequest(format!("url: {e}")))?;
    let source = PgCatalog::new(state.pool.clone())
        .add_source(
            &ids::source_id(&url),
            url.as_str(),
            std::time::Duration::from_secs(every as u64),
            backfill,
        )
        .await?;
    Ok((StatusCode::CREATED, Json(Source::from(source))))
}

/// Unsubscribe, by source id or URL.
#[utoipa::path(
    delete, path = "/api/v1/sources/{id}", tag = "sources",
    params(("id" = String, Path, description = "Source id (`src:…`) or URL")),
    responses(
        (status = 204, description = "Removed"),
        (status = 400, description = "A bad id", body = ErrorBody),
        (status = 404, description = "No such subscription", body = ErrorBody),
        (status = 503, description = "PostgreSQL does not answer", body = ErrorBody),
    )
)]
pub async fn remove_source(
    Extract(state): Extract<Shared>,
    PathParams(id): PathParams<String>,
) -> Result<StatusCode, ApiError> {
    if !storable(&id) {
        return Err(ApiError::NotFound(format!("no subscription {id:?}")));
    }
    if PgCatalog::new(state.pool.clone())
        .remove_source(&id)
        .await?
    {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::NotFound(format!("no subscription {id:?}")))
    }
}

/// Reprocess videos from a stage as a new generation.
///
/// Re-feeds each chosen video into the stage's input topic as generation
/// (current + 1): that stage and every later one run again, and the
/// earlier generations' results stay readable. With `dry_run`, lists what
/// would be replayed and sends nothing.
#[utoipa::path(
    post, path = "/api/v1/replay", tag = "videos",
    request_body = ReplayRequest,
    responses(
        (status = 200, description = "Dry run: what would be replayed", body = ReplayResponse),
        (status = 202, description = "Replayed: the videos now run as the new generation", body = ReplayResponse),
        (status = 400, description = "A bad stage, time or selection, named", body = ErrorBody),
        (status = 404, description = "Unknown video ids, named", body = ErrorBody),
        (status = 409, description = "The same replay is under way", body = ErrorBody),
        (status = 422, description = "A chosen video has no input record to replay", body = ErrorBody),
        (status = 503, description = "Kafka, the schema registry or PostgreSQL does not answer", body = ErrorBody),
    )
)]
pub async fn replay(
    Extract(state): Extract<Shared>,
    JsonBody(req): JsonBody<ReplayRequest>,
) -> Result<(StatusCode, Json<ReplayResponse>), ApiError> {
    if req.videos.len() > MAX_REPLAY_VIDEOS {
        return Err(ApiError::BadRequest(format!(
            "videos: at most {MAX_REPLAY_VIDEOS} per request, not {}",
            req.videos.len()
        )));
    }
    let unstorable: Vec<String> = req
        .videos
        .iter()
        .filter(|id| !storable(id))
        .cloned()
        .collect();
    if !unstorable.is_empty() {
        return Err(replay::ReplayError::UnknownVideos(unstorable).into());
    }
    let now = chrono::Utc::now();
    let time = |field: &str, t: Option<&str>| {
        t.map(|t| replay::parse_time(t, now))
            .transpose()
            .map_err(|e| ApiError::BadRequest(format!("{field}: {e}")))
    };
    let selection = replay::Selection {
        stage: req.stage.as_str().to_string(),
        videos: req.videos,
        since: time("since", req.since.as_deref())?,
        until: time("until", req.until.as_deref())?,
        max_videos: Some(MAX_REPLAY_VIDEOS),
    };
    let plan = replay::plan(&state.config, &state.pool, &selection).await?;
    let (stage, topic) = (plan.stage.clone(), plan.topic.clone());
    if req.dry_run {
        let videos = plan
            .items
            .iter()
            .map(|p| ReplayItem {
                video_id: p.video_id.clone(),
                from_generation: p.from_generation,
                to_generation: p.to_generation,
                source: p.source.into(),
            })
            .collect();
        return Ok((
            StatusCode::OK,
            Json(ReplayResponse {
                stage,
                topic,
                dry_run: true,
                videos,
                not_sent: 0,
            }),
        ));
    }
    // Each video is moved to `queued` and then its record is sent: a client
    // that goes away between the two must not leave a video queued with
    // nothing on its way, so the sending runs to its end on a task of its
    // own whatever becomes of the request.
    // A shutdown stops it between videos, and the server waits for that.
    let sending = {
        let shared = Arc::clone(&state);
        state.tasks.spawn(async move {
            replay::send(&shared.config, &shared.pool, plan, &shared.stopping).await
        })
    };
    let sent = sending
        .await
        .map_err(|e| ApiError::Internal(format!("the replay's sending task failed: {e}")))??;
    let left = sent.left;
    let sent = sent.replayed;
    let videos = sent
        .into_iter()
        .map(|r| {
            let replay::Replayed {
                video_id,
                from_generation,
                generation,
                source,
            } = r;
            ReplayItem {
                video_id,
                from_generation,
                to_generation: generation,
                source: source.into(),
            }
        })
        .collect();
    Ok((
        StatusCode::ACCEPTED,
        Json(ReplayResponse {
            stage,
            topic,
            dry_run: false,
            videos,
            not_sent: left,
        }),
    ))
}

/// Per stage: input topic, partitions, group members and lag (Kafka), the
/// videos by status at that stage and the runs finished per minute over
/// the last 10 minutes (status tables).
#[utoipa::path(
    get, path = "/api/v1/stages", tag = "stages",
    responses(
        (status = 200, description = "The stages in pipeline order", body = Vec<StageInfo>),
        (status = 503, description = "Kafka or PostgreSQL does not answer", body = ErrorBody),
    )
)]
pub async fn stages(Extract(state): Extract<Shared>) -> Result<Json<Vec<StageInfo>>, ApiError> {
    Ok(Json(state.stages().await?))
}

/// What the status page shows and polls: videos by status, and per stage
/// its runs, throughput, partitions, lag and members.
///
/// Cheaper than `/api/v1/stages` and never waits long for Kafka: its view
/// may be up to two minutes old while a newer one is read, and when there
/// is none yet (or Kafka does not answer) the Kafka fields are null and
/// `kafka_error` says why.
#[utoipa::path(
    get, path = "/api/v1/overview", tag = "stages",
    responses(
        (status = 200, description = "Videos by status and the stages in pipeline order", body = Overview),
        (status = 503, description = "PostgreSQL does not answer", body = ErrorBody),
    )
)]
pub async fn overview(Extract(state): Extract<Shared>) -> Result<Json<Overview>, ApiError> {
    Ok(Json(state.overview(OVERVIEW_KAFKA_WAIT).await?))
}

/// Liveness: 200 while the process serves requests.
#[utoipa::path(
    get, path = "/healthz", tag = "operations",
    responses((status = 200, description = "Up", body = Health))
)]
pub async fn healthz() -> Json<Health> {
    Json(Health {
        status: "ok".to_string(),
    })
}

/// Readiness: 200 only when Kafka, PostgreSQL and the schema registry
/// answer; 503 naming the ones that do not.
#[utoipa::path(
    get, path = "/readyz", tag = "operations",
    responses(
        (status = 200, description = "Every service answers", body = Readiness),
        (status = 503, description = "A service does not answer; `error` names it", body = Readiness),
    )
)]
pub async fn readyz(Extract(state): Extract<Shared>) -> (StatusCode, Json<Readiness>) {
    let readiness = state.readiness().await;
    let status = if readiness.error.is_none() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(readiness))
}

/// Prometheus metrics of this process (HTTP requests) and of the pipeline
/// (videos by status).
#[utoipa::path(
    get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus text format", body = String, content_type = "text/plain"))
)]
pub async fn metrics(Extract(state): Extract<Shared>) -> Response {
    super::metrics::update_pipeline_gauges(&state.pool).await;
    let text = state
        .metrics
        .as_ref()
        .map(|h| h.render())
        .unwrap_or_default();
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}
