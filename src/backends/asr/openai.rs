//! OpenAI-compatible transcription: `POST {base}/audio/transcriptions`.
//!
//! Works with OpenAI and with faster-whisper-server (the local stack's ASR
//! server). That server reads the model from the form field `model_name`
//! and ignores OpenAI's `model`, so both are sent. The audio is streamed
//! from disk, not read into memory. The answer is `verbose_json`:
//! `{language, duration, text, segments: [{start, end, text}]}`.

use std::path::Path;

use reqwest::header::{AUTHORIZATION, HeaderValue};
use reqwest::multipart::{Form, Part};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use super::http::{self, Policy};
use super::{Asr, AsrError, AsrOptions, ChunkTranscript, Segment, audio, normalize_language};

/// A client of one OpenAI-compatible transcription endpoint. Clones share
/// the connection pool and the concurrency limit.
#[derive(Debug, Clone)]
pub struct OpenAiAsr {
    policy: Policy,
    url: url::Url,
    model: String,
    api_key: Option<SecretString>,
    language: Option<String>,
}

impl OpenAiAsr {
    /// A client for `base_url` (ending in `/v1`, as in `asr_url`) and
    /// `model`. The key, if any, is sent as a bearer token; a local server
    /// needs none.
    pub fn new(
        base_url: &str,
        model: &str,
        api_key: Option<SecretString>,
        opts: AsrOptions,
    ) -> Result<Self, AsrError> {
        let base = http::parse_base("the ASR URL", base_url)?;
        let mut url = base.clone();
        // Joining keeps the base's path (`/v1`) whether or not it ends in
        // a slash.
        url.set_path(&format!(
            "{}/audio/transcriptions",
            base.path().trim_end_matches('/')
        ));
        url.set_query(None);
        let model = model.trim();
        if model.is_empty() {
            return Err(AsrError::Config("the ASR model name is empty".into()));
        }
        let api_key = api_key.filter(|k| !k.expose_secret().trim().is_empty());
        Ok(Self {
            policy: Policy::new("openai", &url, &opts)?,
            url,
            model: model.to_owned(),
            api_key,
            // Whisper takes ISO 639-1 codes only ("en", not "en-US").
            language: opts.language.as_deref().and_then(normalize_language),
        })
    }

    /// One multipart request with the chunk streamed from disk.
    async fn request(&self, chunk: &Path) -> Result<reqwest::RequestBuilder, AsrError> {
        let input = |message: String| AsrError::Input {
            path: chunk.display().to_string(),
            message,
        };
        let file = tokio::fs::File::open(chunk)
            .await
            .map_err(|e| input(format!("cannot open: {e}")))?;
        let len = file
            .metadata()
            .await
            .map_err(|e| input(format!("cannot stat: {e}")))?
            .len();
        // The service infers the container from the file name's extension.
        let file_name = chunk.file_name().map_or_else(
            || "audio.wav".to_owned(),
            |n| n.to_string_lossy().into_owned(),
        );
        let part = Part::stream_with_length(file, len)
            .file_name(file_name)
            .mime_str(mime_for(chunk))
            .map_err(|e| AsrError::Config(format!("audio MIME type: {e}")))?;
        let mut form = Form::new()
            .part("file", part)
            .text("model", self.model.clone())
            .text("model_name", self.model.clone())
            .text("response_format", "verbose_json")
            .text("timestamp_granularities[]", "segment");
        if let Some(language) = &self.language {
            form = form.text("language", language.clone());
        }
        let mut request = self.policy.client.post(self.url.clone()).multipart(form);
        if let Some(key) = &self.api_key {
            let mut value = HeaderValue::from_str(&format!("Bearer {}", key.expose_secret()))
                // The error would not hold the key, but say so plainly.
                .map_err(|_| AsrError::Config("the ASR API key has invalid characters".into()))?;
            // Keeps the header out of reqwest's and hyper's debug output.
            value.set_sensitive(true);
            request = request.header(AUTHORIZATION, value);
        }
        Ok(request)
    }

    fn parse(&self, body: &[u8]) -> Result<Verbose, AsrError> {
        serde_json::from_slice(body).map_err(|e| AsrError::BadResponse {
            endpoint: self.policy.endpoint.clone(),
            message: format!("not a verbose_json transcription: {e}"),
        })
    }
}

impl Asr for OpenAiAsr {
    fn name(&self) -> &str {
        "openai"
    }

    async fn transcribe<'a>(
        &'a self,
        chunk: &'a Path,
        cancel: &'a CancellationToken,
    ) -> Result<ChunkTranscript, AsrError> {
        let started = std::time::Instant::now();
        let secret = self.api_key.as_ref().map(|k| k.expose_secret());
        let answer = self
            .policy
            .send(cancel, secret, || self.request(chunk))
            .await?;
        let answer = self.parse(&answer.body)?;
        // The file's header is read only when the server leaves out
        // `duration`.
        let fallback_ms = match answer.duration {
            Some(_) => None,
            None => audio::probe(chunk).await.and_then(|i| i.duration_ms),
        };
        let transcript = answer.into_chunk(fallback_ms, self.language.as_deref());
        tracing::debug!(
            backend = "openai",
            segments = transcript.segments.len(),
            audio_ms = transcript.duration_ms,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "chunk transcribed"
        );
        Ok(transcript)
    }
}

fn mime_for(path: &Path) -> &'static str {
    let ext = path
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    match ext.as_str() {
        "wav" => "audio/wav",
        "flac" => "audio/flac",
        "mp3" => "audio/mpeg",
        "ogg" | "oga" | "opus" => "audio/ogg",
        "m4a" | "mp4" => "audio/mp4",
        "webm" => "audio/webm",
        _ => "application/octet-stream",
    }
}

/// `verbose_json`, tolerant of servers that send only `{text}`.
#[derive(Debug, Deserialize)]
struct Verbose {
    #[serde(default)]
    language: Option<String>,
    #[serde(default)]
    duration: Option<f64>,
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    segments: Option<Vec<VerboseSegment>>,
}

#[derive(Debug, Deserialize)]
struct VerboseSegment {
    start: f64,
    end: f64,
    #[serde(default)]
    text: String,
    #[serde(default)]
    avg_logprob: Option<f64>,
    #[serde(default)]
    no_speech_prob: Option<f64>,
}

/// Seconds (as JSON numbers) to whole milliseconds, never negative.
fn ms(seconds: f64) -> i64 {
    if seconds.is_finite() && seconds > 0.0 {
        (seconds * 1000.0).round().min(i64::MAX as f64) as i64
    } else {
        0
    }
}

impl Verbose {
    fn into_chunk(self, fallback_ms: Option<i64>, requested: Option<&str>) -> ChunkTranscript {
        let duration_ms = self.duration.map(ms).or(fallback_ms).unwrap_or(0);
        // A timestamp past the end of the audio means nothing; Whisper's
        // last segment sometimes overshoots by a few hundred milliseconds.
        let clamp = |t: i64| {
            if duration_ms > 0 {
                t.min(duration_ms)
            } else {
                t
            }
        };
        let segments = match self.segments {
            Some(segments) => segments
                .into_iter()
                .filter(|s| !is_silence(s))
                .filter_map(|s| {
                    let text = s.text.trim();
                    let start = clamp(ms(s.start));
                    (!text.is_empty()).then(|| Segment {
                        start_ms: start,
                        end_ms: clamp(ms(s.end)).max(start),
                        text: text.to_owned(),
                    })
                })
                .collect(),
            None => {
                let text = self.text.as_deref().unwrap_or("").trim();
                if text.is_empty() {
                    Vec::new()
                } else {
                    vec![Segment {
                        start_ms: 0,
                        end_ms: duration_ms,
                        text: text.to_owned(),
                    }]
                }
            }
        };
        let language = self
            .language
            .as_deref()
            .and_then(normalize_language)
            .or_else(|| requested.map(str::to_owned));
        ChunkTranscript {
            language,
            segments,
            duration_ms,
        }
    }
}

/// Whisper's own rule for a window it should not have transcribed: likely
/// no speech and a low-confidence decode ("Thank you." over silence).
fn is_silence(s: &VerboseSegment) -> bool {
    matches!(
        (s.no_speech_prob, s.avg_logprob),
        (Some(no_speech), Some(logprob)) if no_speech > 0.6 && logprob < -1.0
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str, fallback: Option<i64>) -> ChunkTranscript {
        serde_json::from_str::<Verbose>(json)
            .expect("valid verbose_json")
            .into_chunk(fallback, None)
    }

    #[test]
    fn verbose_json_maps_to_segments() {
        let t = parse(
            r#"{"task":"transcribe","language":"english","duration":6.29,
                "text":" One. Two.","segments":[
                {"id":0,"start":0.0,"end":2.5,"text":" One.","avg_logprob":-0.3,"no_speech_prob":0.1},
                {"id":1,"start":2.5,"end":6.4,"text":" Two.","avg_logprob":-0.3,"no_speech_prob":0.1},
                {"id":2,"start":6.0,"end":6.2,"text":"  "}]}"#,
            None,
        );
        assert_eq!(t.language.as_deref(), Some("en"));
        assert_eq!(t.duration_ms, 6290);
        assert_eq!(
            t.segments,
            vec![
                Segment {
                    start_ms: 0,
                    end_ms: 2500,
                    text: "One.".into()
                },
                // Clamped to the audio's end.
                Segment {
                    start_ms: 2500,
                    end_ms: 6290,
                    text: "Two.".into()
                },
            ]
        );
    }

    #[test]
    fn text_without_segments_becomes_one_segment() {
        let t = parse(r#"{"text":" Hello there. "}"#, Some(4000));
        assert_eq!(t.language, None);
        assert_eq!(t.duration_ms, 4000);
        assert_eq!(
            t.segments,
            vec![Segment {
                start_ms: 0,
                end_ms: 4000,
                text: "Hello there.".into()
            }]
        );
        assert!(parse(r#"{"text":""}"#, None).segments.is_empty());
    }

    #[test]
    fn hallucinated_silence_is_dropped() {
        let t = parse(
            r#"{"language":"en","duration":30,"segments":[
                {"start":0,"end":30,"text":"Thank you.","avg_logprob":-1.4,"no_speech_prob":0.9}]}"#,
            None,
        );
        assert!(t.segments.is_empty(), "{t:?}");
    }

    #[test]
    fn construction_checks_the_url_and_model() {
        let opts = AsrOptions::default();
        assert!(matches!(
            OpenAiAsr::new("not a url", "m", None, opts.clone()),
            Err(AsrError::Config(_))
        ));
        assert!(matches!(
            OpenAiAsr::new("ftp://h/v1", "m", None, opts.clone()),
            Err(AsrError::Config(_))
        ));
        assert!(matches!(
            OpenAiAsr::new("http://h/v1", " ", None, opts.clone()),
            Err(AsrError::Config(_))
        ));
        let asr = OpenAiAsr::new("http://h:8000/v1/", "m", None, opts).expect("valid");
        assert_eq!(asr.url.as_str(), "http://h:8000/v1/audio/transcriptions");
    }

    #[test]
    fn debug_output_hides_the_key() {
        let asr = OpenAiAsr::new(
            "http://h/v1",
            "m",
            Some("sk-canary-123".into()),
            AsrOptions::default(),
        )
        .expect("valid");
        assert!(!format!("{asr:?}").contains("sk-canary-123"));
    }
}
