//! `vidpipe serve`: the HTTP API and the status pages.
//!
//! - `/api/v1/…`: JSON over the same library calls as the CLI (submit,
//!   status, results, sources, replay, stages), and the status page's
//!   overview; see [`routes`].
//! - `/openapi.json`: the OpenAPI 3.1 document, generated from the
//!   handlers themselves (utoipa), so it cannot drift from them.
//! - `/metrics` (Prometheus text), `/healthz` (liveness), `/readyz` (Kafka,
//!   PostgreSQL and the schema registry answer).
//! - `/`, `/videos/{id}`, `/videos/{id}/summary`, `/videos/{id}/transcript`:
//!   server-rendered HTML for people, updated live by a small script
//!   served from this process (no CDN, nothing external); see [`page`].
//!
//! The server starts whether or not the services answer (PostgreSQL is
//! connected lazily, Kafka clients connect in the background): `/readyz`
//! says which one is missing, and each request that needs a missing
//! service answers 503 naming it.

pub mod error;
pub mod listen;
pub mod metrics;
pub mod model;
pub mod page;
pub mod queries;
pub mod routes;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request};
use axum::http::{HeaderValue, Uri, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use metrics_exporter_prometheus::PrometheusHandle;
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use secrecy::ExposeSecret;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use tokio_util::sync::CancellationToken;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::admin::{self, StageTopic};
use crate::config::Config;
use crate::store::blobs::BlobStore;
use crate::store::db;
use error::ApiError;
use model::{Overview, Readiness, ServiceCheck, StageInfo, StageOverview};

/// How long a readiness probe waits for each service.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);
/// How long Kafka's view of the stages is reused: describing the groups
/// costs a few requests per stage (a second or more in all), and pages
/// poll the overview.
const STAGES_TTL: Duration = Duration::from_secs(5);
/// How old a view the status page still shows (while a newer one is read
/// in the background) rather than wait for Kafka.
const STAGES_STALE: Duration = Duration::from_secs(120);
/// How long one reading of Kafka's view may take before it counts as
/// failed (and `/api/v1/stages` answers 503).
const STAGES_TIMEOUT: Duration = Duration::from_secs(20);
/// Request bodies are small JSON documents.
const MAX_BODY: usize = 64 * 1024;

/// Why `vidpipe serve` could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// `--listen` is not an address.
    #[error("--listen {0:?}: give an address and port, e.g. 127.0.0.1:8686")]
    Listen(String),
    /// The address is taken or not ours.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
    /// A setting cannot be used (blob store, database URL, Kafka client).
    #[error("{0}")]
    Config(String),
    /// The metrics recorder cannot be installed.
    #[error("cannot install the metrics recorder: {0}")]
    Metrics(String),
    /// The server stopped with an I/O error.
    #[error("the HTTP server failed: {0}")]
    Server(std::io::Error),
    /// A non-loopback address without `api_token`: anyone who can reach it
    /// could submit, replay and unsubscribe.
    #[error(
        "refusing to listen on {0} without api_token: anyone who can reach it could submit, \
         replay and remove subscriptions; set api_token (VIDPIPE_API_TOKEN, at least 16 \
         characters) or listen on 127.0.0.1"
    )]
    Unprotected(String),
}

impl ServeError {
    /// The process exit code: 2 for usage and configuration, 3 when the
    /// address cannot be had, 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Listen(_) | Self::Config(_) | Self::Unprotected(_) => 2,
            Self::Bind { .. } => 3,
            Self::Metrics(_) | Self::Server(_) => 1,
        }
    }
}

/// What every handler shares.
pub struct State {
    /// The effective configuration.
    pub config: Config,
    /// PostgreSQL (connected lazily).
    pub pool: PgPool,
    /// The blob store with the results.
    pub blobs: BlobStore,
    /// A Kafka client for readiness probes (never subscribes).
    kafka: BaseConsumer,
    /// For the schema registry's readiness.
    http: reqwest::Client,
    /// Renders `/metrics`; none when another recorder was installed first.
    pub metrics: Option<PrometheusHandle>,
    /// Kafka's view of the stages, and when it was read.
    stages_seen: std::sync::Mutex<Option<(Instant, Vec<StageTopic>)>>,
    /// Why the last reading of the view failed (none once one succeeds).
    stages_failed: std::sync::Mutex<Option<String>>,
    /// Held while the view is read from Kafka: one reading at a time, and
    /// none is started while one runs.
    stages_refresh: Arc<tokio::sync::Mutex<()>>,
    /// The submit endpoint's producer, made on first use (and tried again
    /// on the next request if Kafka or the registry did not answer).
    sender: tokio::sync::OnceCell<crate::client::CommandSender>,
    /// Work that must not be cut off mid-way (a replay's sending): the
    /// server waits for it before it exits.
    pub tasks: tokio_util::task::TaskTracker,
    /// Fires when the server begins to shut down: tracked work stops at
    /// its next safe point.
    pub stopping: CancellationToken,
}

impl State {
    /// The command sender all submissions share.
    pub async fn sender(
        &self,
    ) -> Result<&crate::client::CommandSender, crate::client::ClientError> {
        self.sender
            .get_or_try_init(|| crate::client::CommandSender::new(&self.config))
            .await
    }

    /// The shared state for `config`; connects nothing yet.
    pub fn new(config: Config, metrics: Option<PrometheusHandle>) -> Result<Self, ServeError> {
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(PROBE_TIMEOUT)
            .connect_lazy(config.database_url.expose_secret())
            .map_err(|e| {
                ServeError::Config(format!(
                    "database_url ({}): {e}",
                    db::describe(&config.database_url)
                ))
            })?;
        let blobs = BlobStore::from_config(&config)
            .map_err(|e| ServeError::Config(format!("storage: {e}")))?;
        let kafka: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &config.kafka_brokers)
            .set("group.id", format!("{}serve-probe", config.topic_prefix))
            .set("enable.auto.commit", "false")
            .create()
            .map_err(|e| ServeError::Config(format!("Kafka client: {e}")))?;
        let http = reqwest::Client::builder()
            .timeout(PROBE_TIMEOUT)
            .build()
            .map_err(|e| ServeError::Config(format!("HTTP client: {e}")))?;
        Ok(Self {
            tasks: tokio_util::task::TaskTracker::new(),
            stopping: CancellationToken::new(),
            config,
            pool,
            blobs,
            kafka,
            http,
            metrics,
            stages_seen: std::sync::Mutex::new(None),
            stages_failed: std::sync::Mutex::new(None),
            stages_refresh: Arc::new(tokio::sync::Mutex::new(())),
            sender: tokio::sync::OnceCell::new(),
        })
    }

    async fn check_postgres(&self) -> ServiceCheck {
        let target = db::describe(&self.config.database_url);
        // The videos table, not just a connection: a database without the
        // schema cannot serve the API either.
        let probe = sqlx::query("SELECT 1 FROM videos LIMIT 1").fetch_optional(&self.pool);
        let outcome = match tokio::time::timeout(PROBE_TIMEOUT, probe).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer within {PROBE_TIMEOUT:?}")),
        };
        check("postgresql", "PostgreSQL", &target, outcome)
    }

    async fn check_kafka(self: &Arc<Self>) -> ServiceCheck {
        let brokers = self.config.kafka_brokers.clone();
        let me = Arc::clone(self);
        let topic = self.config.topic("commands");
        // librdkafka's metadata call blocks; one topic keeps the answer
        // small on a broker with many.
        let outcome = tokio::task::spawn_blocking(move || {
            me.kafka
                .fetch_metadata(Some(&topic), PROBE_TIMEOUT)
                .map(|_| ())
                .map_err(|e| e.to_string())
        })
        .await
        .unwrap_or_else(|e| Err(format!("the probe did not finish: {e}")));
        check("kafka", "Kafka", &brokers, outcome)
    }

    async fn check_registry(&self) -> ServiceCheck {
        let Some(url) = self.config.schema_registry_url.as_deref() else {
            return ServiceCheck {
                service: "schema-registry".to_string(),
                ok: true,
                detail: "not used (schema_registry_url is empty: single-object encoding)"
                    .to_string(),
            };
        };
        let target = format!("{}/subjects", url.trim_end_matches('/'));
        let outcome = match self.http.get(&target).send().await {
            Ok(r) if r.status().is_success() => Ok(()),
            Ok(r) => Err(format!("answered {}", r.status())),
            Err(e) => Err(e.without_url().to_string()),
        };
        // /readyz is open to anyone who reaches the port: a registry URL may
        // carry a user and password.
        let shown = url::Url::parse(url)
            .map(|u| crate::media::http::redact(&u))
            .unwrap_or_else(|_| "its configured URL".to_string());
        check("schema-registry", "the schema registry", &shown, outcome)
    }

    /// Asks every service at once.
    pub async fn readiness(self: &Arc<Self>) -> Readiness {
        let (kafka, postgres, registry) = tokio::join!(
            self.check_kafka(),
            self.check_postgres(),
            self.check_registry()
        );
        let services = vec![kafka, postgres, registry];
        let failing: Vec<&str> = services
            .iter()
            .filter(|s| !s.ok)
            .map(|s| s.detail.as_str())
            .collect();
        Readiness {
            status: if failing.is_empty() {
                "ready"
            } else {
                "not ready"
            }
            .to_string(),
            error: (!failing.is_empty()).then(|| failing.join("; ")),
            services,
        }
    }

    /// The last view of the stages, if it is younger than `max_age`.
    fn stages_cached(&self, max_age: Duration) -> Option<(Duration, Vec<StageTopic>)> {
        // A poisoned lock only means a panic elsewhere mid-assignment of a
        // plain value; the value is still whole.
        let seen = self.stages_seen.lock().unwrap_or_else(|p| p.into_inner());
        seen.as_ref()
            .filter(|(at, _)| at.elapsed() < max_age)
            .map(|(at, topics)| (at.elapsed(), topics.clone()))
    }

    /// Starts reading Kafka's view of the stages in a task of its own,
    /// unless a reading is under way. The task is not tied to any request:
    /// a reading that outlasts the request that wanted it still finishes
    /// and serves the next one (on a slow broker, readings cut short by
    /// every request would never finish).
    fn refresh_stages(self: &Arc<Self>) {
        let Ok(reading) = Arc::clone(&self.stages_refresh).try_lock_owned() else {
            return;
        };
        let me = Arc::clone(self);
        tokio::spawn(async move {
            let outcome = tokio::time::timeout(STAGES_TIMEOUT, admin::describe(&me.config)).await;
            let failed = match outcome {
                Ok(Ok(topics)) => {
                    *me.stages_seen.lock().unwrap_or_else(|p| p.into_inner()) =
                        Some((Instant::now(), topics));
                    None
                }
                // Names Kafka and its address already.
                Ok(Err(e)) => Some(e.to_string()),
                Err(_) => Some(format!(
                    "Kafka at {}: describing the stages took longer than {STAGES_TIMEOUT:?}",
                    me.config.kafka_brokers
                )),
            };
            if let Some(why) = &failed {
                tracing::info!(error = %why, "cannot describe the stages");
            }
            *me.stages_failed.lock().unwrap_or_else(|p| p.into_inner()) = failed;
            drop(reading);
        });
    }

    /// The view once the reading under way (if any) has finished, waiting
    /// at most `wait`: the view if it is younger than `max_age`, else why
    /// there is none.
    async fn stages_after_reading(
        &self,
        max_age: Duration,
        wait: Duration,
    ) -> Result<Vec<StageTopic>, ApiError> {
        if tokio::time::timeout(wait, self.stages_refresh.lock())
            .await
            .is_err()
        {
            return Err(ApiError::Unavailable(format!(
                "Kafka at {} has not described the stages within {wait:?} (still asking)",
                self.config.kafka_brokers
            )));
        }
        if let Some((_, topics)) = self.stages_cached(max_age) {
            return Ok(topics);
        }
        let why = self
            .stages_failed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        Err(ApiError::Unavailable(why.unwrap_or_else(|| {
            format!(
                "Kafka at {}: the stages could not be described",
                self.config.kafka_brokers
            )
        })))
    }

    /// Kafka's view of every stage, at most [`STAGES_TTL`] old.
    async fn stage_topics(self: &Arc<Self>) -> Result<Vec<StageTopic>, ApiError> {
        if let Some((_, topics)) = self.stages_cached(STAGES_TTL) {
            return Ok(topics);
        }
        // Concurrent requests share one reading and then take what it read.
        self.refresh_stages();
        self.stages_after_reading(STAGES_TTL, STAGES_TIMEOUT).await
    }

    /// For the status page: a view up to [`STAGES_STALE`] old at once
    /// (reading a newer one in the background when it is past
    /// [`STAGES_TTL`]), else a fresh one if Kafka answers within `wait`.
    async fn stage_topics_now(
        self: &Arc<Self>,
        wait: Duration,
    ) -> Result<Vec<StageTopic>, ApiError> {
        if let Some((age, topics)) = self.stages_cached(STAGES_STALE) {
            if age >= STAGES_TTL {
                self.refresh_stages();
            }
            return Ok(topics);
        }
        self.refresh_stages();
        self.stages_after_reading(STAGES_STALE, wait).await
    }

    /// Every stage: Kafka's view with the status tables' counts.
    pub async fn stages(self: &Arc<Self>) -> Result<Vec<StageInfo>, ApiError> {
        let (topics, counts, done) = tokio::join!(
            self.stage_topics(),
            queries::stage_counts(&self.pool),
            queries::throughput(&self.pool)
        );
        let (mut counts, done) = (counts?, done?);
        Ok(topics?
            .into_iter()
            .map(|t| {
                let videos = counts.remove(&t.stage).unwrap_or_default();
                let finished = done.get(&t.stage).copied().unwrap_or(0);
                StageInfo::new(t, videos, finished)
            })
            .collect())
    }

    /// What the status page shows at the top: videos by status, and per
    /// stage its runs, throughput and (when Kafka has answered, waiting at
    /// most `wait` for a first view) partitions, lag and members.
    pub async fn overview(self: &Arc<Self>, wait: Duration) -> Result<Overview, ApiError> {
        let pool = &self.pool;
        let (totals, counts, done, topics) = tokio::join!(
            queries::video_counts(pool),
            queries::stage_counts(pool),
            queries::throughput(pool),
            self.stage_topics_now(wait),
        );
        let (videos, mut counts, done) = (totals?, counts?, done?);
        let (topics, kafka_error) = match topics {
            Ok(t) => (t, None),
            Err(e) => (Vec::new(), Some(e.to_string())),
        };
        let stages = crate::stages::STAGES
            .iter()
            .map(|name| {
                let topic = topics.iter().find(|t| t.stage == *name);
                StageOverview::new(
                    name,
                    counts.remove(*name).unwrap_or_default(),
                    done.get(*name).copied().unwrap_or(0),
                    topic,
                )
            })
            .collect();
        Ok(Overview {
            videos,
            stages,
            kafka_error,
        })
    }
}

fn check(service: &str, name: &str, target: &str, outcome: Result<(), String>) -> ServiceCheck {
    match outcome {
        Ok(()) => ServiceCheck {
            service: service.to_string(),
            ok: true,
            detail: format!("{name} at {target} answers"),
        },
        Err(why) => ServiceCheck {
            service: service.to_string(),
            ok: false,
            detail: format!("{name} at {target} does not answer: {why}"),
        },
    }
}

/// The document's frame; the operations come from the handlers.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "vidpipe",
        description = "Submit videos, follow them through the pipeline's stages, and read their \
                       transcripts and summaries. Errors are JSON `{\"error\": \"...\"}`: 400 bad \
                       input (named), 404 an unknown id, 409 the same work already under way, 422 a \
                       request that cannot be carried out, 503 a service that does not answer \
                       (named)."
    ),
    tags(
        (name = "videos", description = "Submit, status, timeline, replay"),
        (name = "results", description = "Transcripts and summaries"),
        (name = "sources", description = "Subscriptions that discovery polls"),
        (name = "stages", description = "Topics, consumer groups, lag and throughput"),
        (name = "operations", description = "Health, readiness, metrics"),
    )
)]
struct ApiDoc;

/// The API's routes and the document that describes them.
fn api() -> (Router<Arc<State>>, utoipa::openapi::OpenApi) {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(routes::submit, routes::list_videos))
        .routes(routes!(routes::get_video))
        .routes(routes!(routes::get_timeline))
        .routes(routes!(routes::get_transcript))
        .routes(routes!(routes::get_summary))
        .routes(routes!(routes::list_sources, routes::add_source))
        .routes(routes!(routes::remove_source))
        .routes(routes!(routes::replay))
        .routes(routes!(routes::stages))
        .routes(routes!(routes::overview))
        .routes(routes!(routes::healthz))
        .routes(routes!(routes::readyz))
        .routes(routes!(routes::metrics))
        .split_for_parts()
}

/// The OpenAPI document, as `/openapi.json` serves it.
pub fn openapi() -> utoipa::openapi::OpenApi {
    api().1
}

/// The whole application: API, document, pages, metrics and headers.
pub fn app(state: Arc<State>) -> Router {
    let (api, doc) = api();
    let doc = Arc::new(doc);
    api.route(
        "/openapi.json",
        axum::routing::get(move || {
            let doc = Arc::clone(&doc);
            async move { axum::Json(doc.as_ref().clone()) }
        }),
    )
    .merge(page::routes())
    .fallback(not_found)
    .layer(DefaultBodyLimit::max(MAX_BODY))
    .layer(middleware::from_fn_with_state(
        Arc::clone(&state),
        require_token,
    ))
    .layer(middleware::from_fn_with_state(Arc::clone(&state), deadline))
    .layer(middleware::from_fn_with_state(
        Arc::clone(&state),
        listen::check_host,
    ))
    .layer(middleware::from_fn(metrics::track))
    .layer(middleware::from_fn(security_headers))
    .with_state(state)
}

/// With `api_token` set, a request that changes something (any method but
/// GET, HEAD and OPTIONS) must carry `Authorization: Bearer <token>`.
/// Reading stays open: the status pages only read.
async fn require_token(
    axum::extract::State(state): axum::extract::State<Arc<State>>,
    req: Request,
    next: Next,
) -> Response {
    let reads = matches!(
        *req.method(),
        axum::http::Method::GET | axum::http::Method::HEAD | axum::http::Method::OPTIONS
    );
    let Some(token) = state.config.api_token.as_ref().filter(|_| !reads) else {
        return next.run(req).await;
    };
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    if crate::config::same_secret(given.as_bytes(), token.expose_secret().as_bytes()) {
        return next.run(req).await;
    }
    let mut response = (
        axum::http::StatusCode::UNAUTHORIZED,
        axum::Json(serde_json::json!({
            "error": "this request changes something: send Authorization: Bearer <api_token>"
        })),
    )
        .into_response();
    response
        .headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    response
}

/// Answers 503 when a request takes longer than `api_request_timeout_secs`:
/// every service call has a bound of its own, and this is the bound of
/// them all together, so no request holds a connection for ever.
async fn deadline(
    axum::extract::State(state): axum::extract::State<Arc<State>>,
    req: Request,
    next: Next,
) -> Response {
    // A replay's sending runs to its end on a task of its own whatever
    // becomes of the request: an answer "stopped" would be untrue, and a
    // client retrying on it would replay the same videos twice. Its work
    // is bounded otherwise (1000 videos, each send with its own timeout).
    if req.uri().path() == "/api/v1/replay" {
        return next.run(req).await;
    }
    let limit = Duration::from_secs(state.config.api_request_timeout_secs);
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(response) => response,
        Err(_) => ApiError::Unavailable(format!(
            "the request took longer than {}s (api_request_timeout_secs) and was stopped",
            limit.as_secs()
        ))
        .into_response(),
    }
}

/// JSON under `/api/`, a page elsewhere.
async fn not_found(uri: Uri) -> Response {
    let path = uri.path();
    if path.starts_with("/api/") {
        ApiError::NotFound(format!("no such endpoint: {path} (see /openapi.json)")).into_response()
    } else {
        page::not_found(&format!("There is no page at {path}.")).into_response()
    }
}

/// Pages may run only this server's script and style, and nothing may
/// frame them: a hostile title that slipped past escaping still could not
/// load or run anything.
async fn security_headers(req: Request, next: Next) -> Response {
    let mut response = next.run(req).await;
    let headers = response.headers_mut();
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    let html = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/html"));
    if html {
        headers.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(
                "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
                 img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
            ),
        );
    }
    response
}

/// Serves until `shutdown`; prints the address it listens on (useful with
/// port 0) to stdout.
pub async fn serve(
    config: Config,
    listen: &str,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    let addr: std::net::SocketAddr = listen
        .parse()
        .map_err(|_| ServeError::Listen(listen.to_string()))?;
    if !addr.ip().is_loopback() && config.api_token.is_none() {
        return Err(ServeError::Unprotected(addr.to_string()));
    }
    let handle = metrics::install().map_err(ServeError::Metrics)?;
    let mut state = State::new(config, Some(handle))?;
    // Tracked work stops when the server begins to shut down.
    state.stopping = shutdown.clone();
    let state = Arc::new(state);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Bind {
            addr: addr.to_string(),
            source,
        })?;
    let local = listener.local_addr().map_err(ServeError::Server)?;
    // The first look at the stages takes a second or more: have it ready
    // for the first visitor of the status page.
    state.refresh_stages();
    println!("vidpipe serve: listening on http://{local}");
    tracing::info!(address = %local, "serving the API and status pages");
    let tasks = state.tasks.clone();
    listen::run(listener, app(state), shutdown).await;
    // A replay stops between videos, never between a video's move to
    // `queued` and the send of its record: wait for that point.
    tasks.close();
    if !tasks.is_empty() {
        tracing::info!(
            tasks = tasks.len(),
            "waiting for replays under way to reach a safe point"
        );
    }
    tasks.wait().await;
    Ok(())
}
