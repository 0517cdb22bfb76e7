//! summarize: a summary, key points and timestamped chapters of a
//! transcript, by the built-in extractive summarizer (offline, the default)
//! or an OpenAI-compatible chat model when one is configured. Stored as
//! markdown and json.

use crate::backends::asr::Transcript;
use crate::backends::summarize::{
    ChatSummarizer, ExtractiveOptions, Summary, TimedText, extractive,
};
use crate::records::{VideoSummarized, VideoTranscribed};
use crate::store::blobs::BlobStore;
use crate::template::{self, Context, Stage, StageError};

/// Which summarizer runs.
pub enum Summarizer {
    /// Built in, offline.
    Extractive(ExtractiveOptions),
    /// A chat-completions model.
    Chat(ChatSummarizer),
}

/// The summarize stage.
pub struct Summarize {
    /// Transcripts in, summaries out.
    pub blobs: BlobStore,
    /// The summarizer.
    pub summarizer: Summarizer,
}

impl Stage for Summarize {
    type Input = VideoTranscribed;
    type Output = VideoSummarized;
    const NAME: &'static str = "summarize";
    const INPUT: &'static str = "video.transcribed";
    const OUTPUT: &'static str = "video.summarized";

    async fn process(
        &self,
        t: VideoTranscribed,
        ctx: &Context,
    ) -> Result<Vec<VideoSummarized>, StageError> {
        let bytes = self.blobs.read(&t.transcript.uri).await?;
        let transcript: Transcript = serde_json::from_slice(&bytes).map_err(|e| {
            StageError::permanent(
                "bad_transcript",
                format!("the stored transcript does not parse: {e}"),
            )
        })?;
        let segments: Vec<TimedText> = transcript
            .segments
            .into_iter()
            .map(|s| TimedText {
                start_ms: s.start_ms,
                end_ms: s.end_ms,
                text: s.text,
            })
            .collect();
        let mut summary: Summary = match &self.summarizer {
            Summarizer::Extractive(opts) => {
                let opts = opts.clone();
                template::cpu(move || extractive(&segments, &opts)).await?
            }
            Summarizer::Chat(chat) => chat.summarize(&segments, &ctx.cancel).await?,
        };
        if summary.language.is_none() {
            summary.language = t.language.clone();
        }
        let (id, generation) = (&t.meta.video_id, t.meta.generation);
        let markdown = self
            .blobs
            .put_bytes(
                id,
                generation,
                "summary.md",
                summary.to_markdown(None).as_bytes(),
                "text/markdown",
            )
            .await?;
        let json = self
            .blobs
            .put_bytes(
                id,
                generation,
                "summary.json",
                summary.to_json().as_bytes(),
                "application/json",
            )
            .await?;
        Ok(vec![VideoSummarized {
            meta: t.meta,
            summary: json,
            markdown,
            backend: summary.backend,
        }])
    }
}
