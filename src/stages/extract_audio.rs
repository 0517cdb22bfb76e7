//! extract-audio: probes the downloaded media and turns its audio into
//! 16 kHz mono, split at silences into chunks the ASR backend accepts.
//! Media without audio, or longer than allowed, fails for good.

use crate::media::ffmpeg::{self, Limits};
use crate::records::{AudioChunk, AudioExtracted, VideoDownloaded};
use crate::store::blobs::BlobStore;
use crate::template::{Context, Stage, StageError};

/// The extract-audio stage.
pub struct ExtractAudio {
    /// Media in, audio out.
    pub blobs: BlobStore,
    /// Duration, size and chunking bounds.
    pub limits: Limits,
}

impl Stage for ExtractAudio {
    type Input = VideoDownloaded;
    type Output = AudioExtracted;
    const NAME: &'static str = "extract-audio";
    const INPUT: &'static str = "video.downloaded";
    const OUTPUT: &'static str = "video.audio-extracted";

    async fn process(
        &self,
        v: VideoDownloaded,
        ctx: &Context,
    ) -> Result<Vec<AudioExtracted>, StageError> {
        // A local copy for ffmpeg (the file itself in a local store).
        let media = self.blobs.local(&v.media.uri).await?;
        let scratch = self.blobs.scratch()?;
        let x = ffmpeg::extract(media.path(), scratch.path(), &self.limits, &ctx.cancel).await?;
        drop(media);
        let (id, generation) = (&v.meta.video_id, v.meta.generation);
        let mut chunks = Vec::with_capacity(x.chunks.len());
        let single = x.chunks.len() == 1 && x.chunks[0].path == x.audio;
        for (i, c) in x.chunks.iter().enumerate() {
            let blob = if single {
                None
            } else {
                let name = format!("audio.{i:04}.wav");
                Some(
                    self.blobs
                        .put(
                            id,
                            generation,
                            &name,
                            &c.path,
                            Some(c.sha256.clone()),
                            Some("audio/wav"),
                        )
                        .await?,
                )
            };
            chunks.push((
                blob,
                c.offset.as_millis() as i64,
                c.duration.as_millis() as i64,
            ));
        }
        let audio = self
            .blobs
            .put(
                id,
                generation,
                "audio.wav",
                &x.audio,
                Some(x.audio_sha256.clone()),
                Some("audio/wav"),
            )
            .await?;
        let chunks = chunks
            .into_iter()
            .map(|(blob, offset_ms, duration_ms)| AudioChunk {
                blob: blob.unwrap_or_else(|| audio.clone()),
                offset_ms,
                duration_ms,
            })
            .collect();
        Ok(vec![AudioExtracted {
            meta: v.meta,
            audio,
            duration_ms: x.duration.as_millis() as i64,
            chunks,
        }])
    }
}
