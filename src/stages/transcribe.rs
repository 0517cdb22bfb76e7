//! transcribe: every audio chunk through the configured ASR backend, the
//! pieces stitched on one timeline, and the transcript stored as txt, srt,
//! vtt and json (segments with timestamps).

use crate::backends::asr::{self, AudioInput, Backend, formats};
use crate::records::{AudioExtracted, VideoTranscribed};
use crate::store::blobs::BlobStore;
use crate::template::{Context, Stage, StageError};

/// The transcribe stage.
pub struct Transcribe {
    /// Audio in, transcripts out.
    pub blobs: BlobStore,
    /// The ASR service.
    pub asr: Backend,
}

impl Stage for Transcribe {
    type Input = AudioExtracted;
    type Output = VideoTranscribed;
    const NAME: &'static str = "transcribe";
    const INPUT: &'static str = "video.audio-extracted";
    const OUTPUT: &'static str = "video.transcribed";

    async fn process(
        &self,
        a: AudioExtracted,
        ctx: &Context,
    ) -> Result<Vec<VideoTranscribed>, StageError> {
        // Local files for the uploads (copies in scratch from S3).
        let files = self
            .blobs
            .local_all(a.chunks.iter().map(|c| c.blob.uri.clone()).collect())
            .await?;
        let inputs: Vec<AudioInput<'_>> = a
            .chunks
            .iter()
            .zip(&files)
            .map(|(c, file)| AudioInput {
                path: file.path(),
                offset_ms: c.offset_ms,
                duration_ms: c.duration_ms,
            })
            .collect();
        let transcript = asr::transcribe_chunks(&self.asr, &inputs, &ctx.cancel).await?;
        let (id, generation) = (&a.meta.video_id, a.meta.generation);
        for (name, body, kind) in [
            ("transcript.txt", formats::txt(&transcript), "text/plain"),
            (
                "transcript.srt",
                formats::srt(&transcript),
                "application/x-subrip",
            ),
            ("transcript.vtt", formats::vtt(&transcript), "text/vtt"),
        ] {
            self.blobs
                .put_bytes(id, generation, name, body.as_bytes(), kind)
                .await?;
        }
        let json = formats::json(&transcript);
        let blob = self
            .blobs
            .put_bytes(
                id,
                generation,
                "transcript.json",
                json.as_bytes(),
                "application/json",
            )
            .await?;
        Ok(vec![VideoTranscribed {
            meta: a.meta,
            transcript: blob,
            language: transcript.language.clone(),
            duration_ms: a.duration_ms,
            segments: transcript.segments.len() as i32,
        }])
    }
}
