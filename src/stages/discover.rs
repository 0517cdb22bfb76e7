//! discover: a command's URL becomes the videos it stands for. A YouTube
//! video or a direct media URL is one video; a YouTube channel or playlist
//! is listed with yt-dlp; an RSS/Atom or podcast feed yields its entries
//! (enclosures first). Each video gets its deterministic id and is claimed
//! in the catalog, so a video seen before is not processed again.
//!
//! A command with a `start_stage` after discover (a legacy `{"video_id"}`
//! message on a stage queue) is not a discovery: it asks for a known video
//! to run again from that stage, as `vidpipe replay --stage STAGE --video
//! ID` does. Discovery hands it to a [`Restarter`] and hands nothing on
//! itself. The bridge gives such a command generation 0, so its own
//! discover run gets a status row of its own (`(video, discover, 0)`) and
//! never overwrites the video's first discovery; the video's row belongs
//! to the new generation the restart starts.

use std::sync::Arc;

use feed_rs::parser;
use futures::future::BoxFuture;
use url::Url;

use crate::ids;
use crate::media::http::{FetchError, Fetcher, redact};
use crate::media::ytdlp::Ytdlp;
use crate::records::{Command, Meta, VideoDiscovered};
use crate::store::catalog::Catalog;
use crate::template::{Context, Stage, StageError};

/// Largest feed document read.
const MAX_FEED_BYTES: u64 = 8 << 20;

/// Entries one later poll of a subscription takes at most, newest first:
/// each costs a catalog claim, and a feed gone hostile could list a
/// hundred thousand (8 MiB of minimal items) that would each become a
/// download of whatever host they name.
const MAX_PER_POLL: usize = 500;

/// The most entries a subscription's first poll (its backfill) may take:
/// the same bound as a later poll, whoever set it (`media.max_backfill`,
/// `sources add --backfill`, the API, or a row written before the bound).
pub const MAX_BACKFILL: usize = MAX_PER_POLL;

/// File extensions that are media, not feeds: no need to look inside.
const MEDIA_EXTENSIONS: &[&str] = &[
    "mp4", "m4a", "m4v", "mov", "mp3", "wav", "webm", "mkv", "ogg", "oga", "opus", "flac", "aac",
    "avi", "flv", "3gp", "ts",
];

/// A restart command, as discovery hands it on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestartRequest {
    /// The command's idempotency key: a repeat must not restart twice.
    pub command_id: String,
    /// The known video to run again.
    pub video_id: String,
    /// The stage it runs again from (download, extract-audio, transcribe or
    /// summarize).
    pub stage: String,
    /// The command's trace, which the restart follows.
    pub trace_id: String,
}

/// What a restart command did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Restarted {
    /// The video runs again from the stage as `generation`.
    Started {
        /// The video's generation before.
        from_generation: i64,
        /// Its new generation.
        generation: i64,
    },
    /// The same command was carried out before: nothing changed.
    Repeat {
        /// The generation that command started.
        generation: i64,
    },
}

/// Runs a known video again from a later stage, once per command id.
/// Unknown videos and videos without an input record for the stage are
/// permanent errors; an unreachable service is retryable.
pub trait Restarter: Send + Sync + 'static {
    /// Carries out one restart command.
    fn restart<'a>(
        &'a self,
        request: &'a RestartRequest,
    ) -> BoxFuture<'a, Result<Restarted, StageError>>;
}

/// The discover stage.
pub struct Discover<C> {
    /// Fetches feeds (the same guard as downloads).
    pub fetcher: Fetcher,
    /// Lists channels and playlists.
    pub ytdlp: Ytdlp,
    /// Known videos and subscriptions.
    pub catalog: C,
    /// Entries taken from a source seen for the first time.
    pub max_backfill: usize,
    /// Carries out restart commands.
    pub restarter: Arc<dyn Restarter>,
}

/// The stage a restart command starts at, if it is one.
fn restart_stage(cmd: &Command) -> Option<&str> {
    cmd.start_stage
        .as_deref()
        .map(str::trim)
        .filter(|s| !s.is_empty() && *s != "discover")
}

/// One video found in a source.
struct Found {
    url: String,
    title: Option<String>,
    published_ms: Option<i64>,
}

/// A title is display text from a hostile source: control characters
/// (NUL, which PostgreSQL cannot store, newlines that forge log lines) are
/// dropped and the length is bounded. It never names a file.
fn clean_title(raw: Option<String>) -> Option<String> {
    let t: String = raw?.chars().filter(|c| !c.is_control()).take(300).collect();
    let t = t.trim();
    (!t.is_empty()).then(|| t.to_string())
}

fn is_media_path(url: &Url) -> bool {
    url.path()
        .rsplit('.')
        .next()
        .is_some_and(|ext| MEDIA_EXTENSIONS.contains(&ext.to_ascii_lowercase().as_str()))
}

impl<C: Catalog> Discover<C> {
    /// What `url` holds: one video, or a source's entries (newest first).
    ///
    /// A channel or playlist is listed up to `list_limit` entries (per tab).
    async fn resolve(
        &self,
        url: &Url,
        list_limit: usize,
    ) -> Result<(Vec<Found>, bool), StageError> {
        let single = |title: Option<String>| {
            Ok((
                vec![Found {
                    url: url.to_string(),
                    title,
                    published_ms: None,
                }],
                false,
            ))
        };
        if Ytdlp::youtube_id(url).is_some() || is_media_path(url) {
            return single(None);
        }
        if Ytdlp::is_site_url(url) {
            let mut found = Vec::new();
            for entry in self.ytdlp.list(url.as_str(), list_limit).await? {
                if entry.is_playlist {
                    // A channel lists its tabs (videos, shorts) as playlists.
                    // The tab's URL comes from the listing: it is listed in
                    // turn only if it is on a site of ours, like the source.
                    let tab = Url::parse(&entry.url).ok().filter(Ytdlp::is_site_url);
                    let Some(tab) = tab else {
                        tracing::warn!(source = %redact(url), "skipping a listed playlist off the known sites");
                        continue;
                    };
                    for inner in self.ytdlp.list(tab.as_str(), list_limit).await? {
                        if !inner.is_playlist {
                            found.push(Found {
                                url: inner.url,
                                title: inner.title,
                                published_ms: inner.timestamp.map(|t| t * 1000),
                            });
                        }
                    }
                } else {
                    found.push(Found {
                        url: entry.url,
                        title: entry.title,
                        published_ms: entry.timestamp.map(|t| t * 1000),
                    });
                }
            }
            return Ok((found, true));
        }
        // Anything else is a feed if it parses as one, else a direct file.
        let text = match self.fetcher.get_text(url.as_str(), MAX_FEED_BYTES).await {
            Ok((text, _)) => text,
            Err(FetchError::TooLarge { .. }) => return single(None),
            Err(e) => return Err(e.into()),
        };
        let Ok(feed) = parser::parse(text.as_bytes()) else {
            return single(None);
        };
        let mut found: Vec<Found> = feed
            .entries
            .into_iter()
            .filter_map(|entry| {
                let enclosure = entry
                    .media
                    .iter()
                    .flat_map(|m| m.content.iter())
                    .find_map(|c| c.url.as_ref().map(|u| u.to_string()));
                let link = entry.links.first().map(|l| l.href.clone());
                Some(Found {
                    url: enclosure.or(link)?,
                    title: entry.title.map(|t| t.content),
                    published_ms: entry
                        .published
                        .or(entry.updated)
                        .map(|t| t.timestamp_millis()),
                })
            })
            .collect();
        found.sort_by_key(|f| std::cmp::Reverse(f.published_ms.unwrap_or(i64::MIN)));
        Ok((found, true))
    }
}

impl<C: Catalog> Stage for Discover<C> {
    type Input = Command;
    type Output = VideoDiscovered;
    const NAME: &'static str = "discover";
    const INPUT: &'static str = "commands";
    const OUTPUT: &'static str = "video.discovered";

    fn is_video(&self, input: &Command) -> bool {
        // A source is not a video; the videos it yields get their own rows.
        // A restart's video row is the restart's (its new generation), not
        // this command's.
        !input.meta.video_id.starts_with("src:") && restart_stage(input).is_none()
    }

    async fn process(
        &self,
        cmd: Command,
        ctx: &Context,
    ) -> Result<Vec<VideoDiscovered>, StageError> {
        if let Some(stage) = restart_stage(&cmd) {
            let request = RestartRequest {
                command_id: cmd.command_id.clone(),
                video_id: cmd.meta.video_id.clone(),
                stage: stage.to_string(),
                trace_id: cmd.meta.trace_id.clone(),
            };
            match self.restarter.restart(&request).await? {
                Restarted::Started {
                    from_generation,
                    generation,
                } => tracing::info!(
                    video_id = request.video_id,
                    stage,
                    from_generation,
                    generation,
                    "restarted at {stage}"
                ),
                Restarted::Repeat { generation } => tracing::info!(
                    video_id = request.video_id,
                    command_id = request.command_id,
                    generation,
                    "restart command seen before: nothing to do"
                ),
            }
            // The restart's record went to the stage's own input topic.
            return Ok(Vec::new());
        }
        let raw = cmd
            .url
            .as_deref()
            .ok_or_else(|| StageError::permanent("bad_command", "the command has no URL"))?;
        let url =
            ids::normalise(raw).map_err(|e| StageError::permanent("bad_url", e.to_string()))?;
        // A source seen for the first time (or submitted once) reaches back
        // only so far; a subscription's later polls take what is new, up to
        // MAX_PER_POLL entries (newest first). A first look lists a channel
        // to four times what it takes (some entries are known already, or
        // are not videos).
        let first = |n: usize| (n, n.max(1) * 4);
        let (limit, list_limit, later) = match self.catalog.source(&ids::source_id(&url)).await? {
            Some(s) if s.polls > 1 => (MAX_PER_POLL, MAX_PER_POLL, true),
            Some(s) => {
                let (n, list) = first((s.max_backfill.max(0) as usize).min(MAX_BACKFILL));
                (n, list, false)
            }
            None => {
                let (n, list) = first(self.max_backfill);
                (n, list, false)
            }
        };
        // Listing a channel or reading a feed can take up to the download
        // deadline: a shutdown or a lost partition must not wait for it
        // (dropping the work kills yt-dlp and closes the connection).
        let (found, is_source) = tokio::select! {
            r = self.resolve(&url, list_limit) => r?,
            _ = ctx.cancel.cancelled() => {
                return Err(StageError::retryable("cancelled", "discovery was cancelled"));
            }
        };
        if is_source && self.is_video(&cmd) {
            return Err(StageError::permanent(
                "is_a_source",
                "this URL is a feed, channel or playlist, not a video: submit it with --feed, \
                 or subscribe with `vidpipe sources add URL`",
            ));
        }
        if is_source && later && found.len() > limit {
            tracing::info!(
                source = %redact(&url),
                entries = found.len(),
                limit,
                "source lists more new entries than one poll takes: the oldest are left out"
            );
        }
        let mut out = Vec::new();
        for f in found.into_iter().take(if is_source { limit } else { 1 }) {
            let Ok(video_url) = ids::normalise(&f.url) else {
                tracing::warn!(source = %redact(&url), "skipping an entry with an unusable URL");
                continue;
            };
            let video_id = ids::video_id(&video_url);
            let title = clean_title(f.title);
            let source = is_source.then(|| url.as_str());
            let claimed = self
                .catalog
                .claim(
                    &video_id,
                    video_url.as_str(),
                    title.as_deref(),
                    source,
                    &cmd.command_id,
                )
                .await?;
            if !claimed {
                tracing::info!(video_id, "already known: not processed again (use replay)");
                continue;
            }
            out.push(VideoDiscovered {
                meta: Meta {
                    video_id,
                    // A video's own command carries its generation (a
                    // replay from discovery bumps it); a source's videos
                    // start at 1.
                    generation: if is_source { 1 } else { cmd.meta.generation },
                    trace_id: cmd.meta.trace_id.clone(),
                },
                url: video_url.to_string(),
                title,
                source_url: source.map(str::to_string),
                published_at: f.published_ms,
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_later_start_stage_makes_a_restart() {
        let mut cmd = Command {
            meta: Meta::new("yt:abc"),
            command_id: "c-1".into(),
            url: None,
            start_stage: None,
            requested_by: None,
            options: Default::default(),
            submitted_at: 0,
        };
        assert_eq!(restart_stage(&cmd), None);
        for (given, want) in [
            ("discover", None),
            ("  ", None),
            ("transcribe", Some("transcribe")),
            (" download ", Some("download")),
        ] {
            cmd.start_stage = Some(given.into());
            assert_eq!(restart_stage(&cmd), want, "{given:?}");
        }
    }
}
