//! download: fetches a discovered video into the blob store. Sites that
//! need an extractor (YouTube and friends) go through yt-dlp, preferring
//! audio-only formats; direct files through the guarded HTTP client. Both
//! stream to disk under a byte cap. A site that answers 429 or a bot check
//! is cooled down for every download of this instance.

use std::sync::Arc;
use std::time::Duration;

use url::Url;

use crate::media::http::{Fetcher, Sites};
use crate::media::ytdlp::Ytdlp;
use crate::records::{Meta, VideoDiscovered, VideoDownloaded};
use crate::store::blobs::BlobStore;
use crate::template::{Context, Stage, StageError};

/// The download stage.
pub struct Download {
    /// Direct files.
    pub fetcher: Fetcher,
    /// Sites.
    pub ytdlp: Ytdlp,
    /// Per-site slots and cooldowns, shared by this instance's downloads.
    pub sites: Arc<Sites>,
    /// Where media goes.
    pub blobs: BlobStore,
}

/// Cooldown after a 429 or bot check that named no delay.
const DEFAULT_COOLDOWN: Duration = Duration::from_secs(60);

impl Stage for Download {
    type Input = VideoDiscovered;
    type Output = VideoDownloaded;
    const NAME: &'static str = "download";
    const INPUT: &'static str = "video.discovered";
    const OUTPUT: &'static str = "video.downloaded";

    async fn process(
        &self,
        v: VideoDiscovered,
        ctx: &Context,
    ) -> Result<Vec<VideoDownloaded>, StageError> {
        let url = Url::parse(&v.url)
            .map_err(|e| StageError::permanent("bad_url", format!("unusable URL: {e}")))?;
        let host = url.host_str().unwrap_or_default().to_string();
        let _slot = self.sites.enter(&host).await;
        let scratch = self.blobs.scratch()?;
        let fetched = if Ytdlp::is_site_url(&url) {
            self.ytdlp
                .download(url.as_str(), scratch.path(), &ctx.cancel)
                .await
                .map(|d| (d.path, None, None))
                .map_err(StageError::from)
        } else {
            let dest = scratch.path().join("media");
            self.fetcher
                .fetch_to_file(url.as_str(), &dest, &ctx.cancel)
                .await
                .map(|f| (dest, Some(f.sha256), f.content_type))
                .map_err(StageError::from)
        };
        let (path, sha256, content_type) = match fetched {
            Ok(x) => x,
            Err(e) => {
                if matches!(e.kind.as_str(), "rate_limited" | "bot_check") {
                    self.sites
                        .cool_down(&host, e.retry_after.unwrap_or(DEFAULT_COOLDOWN));
                }
                return Err(e);
            }
        };
        // Our own name, never the title: only the extension is kept, and
        // only when it is a plain one.
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .filter(|e| e.len() <= 5 && e.bytes().all(|b| b.is_ascii_alphanumeric()))
            .unwrap_or("bin");
        let name = format!("media.{ext}");
        let media = self
            .blobs
            .put(
                &v.meta.video_id,
                v.meta.generation,
                &name,
                &path,
                sha256,
                content_type.as_deref(),
            )
            .await?;
        Ok(vec![VideoDownloaded {
            meta: Meta { ..v.meta },
            url: v.url,
            title: v.title,
            media,
        }])
    }
}
