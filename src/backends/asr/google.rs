//! Google Cloud Speech-to-Text v1, synchronous `speech:recognize`.
//!
//! The chunk goes inline as base64 `audio.content` (LINEAR16 WAV or FLAC),
//! with `enableWordTimeOffsets` so that segments get real timestamps. The
//! synchronous method takes at most one minute of audio (and 10 MB), which
//! is why chunks for this backend must be short; a longer chunk is refused
//! here, before it costs a request. The API key goes in the
//! `x-goog-api-key` header rather than the `?key=` query, so that it never
//! appears in URLs, proxies' logs or our error messages.
//!
//! Each result (Google splits at pauses) becomes one segment: from its first
//! word's `startTime` to its last word's `endTime` (or its `resultEndTime`).

use std::path::Path;

use base64::Engine as _;
use reqwest::header::{CONTENT_TYPE, HeaderValue};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::audio::{self, AudioInfo, Encoding};
use super::http::{self, Policy};
use super::{Asr, AsrError, AsrOptions, ChunkTranscript, Segment, normalize_language};

/// Longest audio the synchronous method accepts.
const MAX_AUDIO_MS: i64 = 60_000;
/// Largest inline content the API accepts (before base64).
const MAX_CONTENT_BYTES: u64 = 10 * 1024 * 1024;
/// Language when none is configured: v1 requires one.
const DEFAULT_LANGUAGE: &str = "en-US";

/// A client of Speech-to-Text v1. Clones share the connection pool and the
/// concurrency limit.
#[derive(Debug, Clone)]
pub struct GoogleAsr {
    policy: Policy,
    url: url::Url,
    api_key: SecretString,
    language_code: String,
}

impl GoogleAsr {
    /// A client for `endpoint` (`https://speech.googleapis.com`, or a
    /// regional or test endpoint) with an API key.
    pub fn new(endpoint: &str, api_key: SecretString, opts: AsrOptions) -> Result<Self, AsrError> {
        let base = http::parse_base("the Google Speech endpoint", endpoint)?;
        if api_key.expose_secret().trim().is_empty() {
            return Err(AsrError::Config("the Google API key is empty".into()));
        }
        let mut url = base.clone();
        let path = base.path().trim_end_matches('/');
        // Accept the endpoint with or without its version.
        let path = path.strip_suffix("/v1").unwrap_or(path);
        url.set_path(&format!("{path}/v1/speech:recognize"));
        url.set_query(None);
        Ok(Self {
            policy: Policy::new("google", &url, &opts)?,
            url,
            api_key,
            language_code: opts
                .language
                .filter(|l| !l.trim().is_empty())
                .unwrap_or_else(|| DEFAULT_LANGUAGE.to_owned()),
        })
    }

    /// Checks the chunk's header before anything is sent: the format and
    /// length Google would refuse are refused here, for free.
    async fn check(&self, chunk: &Path) -> Result<(&'static str, AudioInfo), AsrError> {
        let input = |message: String| input_error(chunk, message);
        let len = tokio::fs::metadata(chunk)
            .await
            .map_err(|e| input(format!("cannot stat: {e}")))?
            .len();
        if len > MAX_CONTENT_BYTES {
            return Err(input(format!(
                "{len} bytes is more than Google's synchronous recognition takes \
                 ({MAX_CONTENT_BYTES}); use shorter chunks"
            )));
        }
        let info = audio::probe(chunk)
            .await
            .ok_or_else(|| input("not a readable WAV or FLAC file".into()))?;
        let encoding = match info.encoding {
            Encoding::Linear16 => "LINEAR16",
            Encoding::Flac => "FLAC",
            Encoding::OtherWav => {
                return Err(input(
                    "Google takes 16-bit PCM WAV (LINEAR16) or FLAC; this WAV holds another \
                     sample format"
                        .into(),
                ));
            }
        };
        if let Some(ms) = info.duration_ms.filter(|ms| *ms > MAX_AUDIO_MS) {
            return Err(input(format!(
                "{ms} ms of audio is more than Google's synchronous recognition takes \
                 ({MAX_AUDIO_MS} ms); use chunks of at most a minute"
            )));
        }
        Ok((encoding, info))
    }

    /// One request with the chunk inline. Built per attempt, inside the
    /// concurrency permit, so that chunks queued behind the limit do not
    /// sit in memory as base64.
    async fn request(
        &self,
        chunk: &Path,
        encoding: &'static str,
        info: AudioInfo,
    ) -> Result<reqwest::RequestBuilder, AsrError> {
        let bytes = tokio::fs::read(chunk)
            .await
            .map_err(|e| input_error(chunk, format!("cannot read: {e}")))?;
        let body = json!({
            "config": {
                "encoding": encoding,
                "sampleRateHertz": info.sample_rate,
                "audioChannelCount": info.channels,
                "languageCode": self.language_code,
                "enableWordTimeOffsets": true,
                "enableAutomaticPunctuation": true,
            },
            "audio": {
                "content": base64::engine::general_purpose::STANDARD.encode(&bytes),
            },
        });
        drop(bytes);
        let body = serde_json::to_vec(&body)
            .map_err(|e| input_error(chunk, format!("cannot encode the request: {e}")))?;
        let mut key = HeaderValue::from_str(self.api_key.expose_secret())
            .map_err(|_| AsrError::Config("the Google API key has invalid characters".into()))?;
        key.set_sensitive(true);
        Ok(self
            .policy
            .client
            .post(self.url.clone())
            .header("x-goog-api-key", key)
            .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
            .body(body))
    }
}

fn input_error(chunk: &Path, message: String) -> AsrError {
    AsrError::Input {
        path: chunk.display().to_string(),
        message,
    }
}

impl Asr for GoogleAsr {
    fn name(&self) -> &str {
        "google"
    }

    async fn transcribe<'a>(
        &'a self,
        chunk: &'a Path,
        cancel: &'a CancellationToken,
    ) -> Result<ChunkTranscript, AsrError> {
        let (encoding, info) = self.check(chunk).await?;
        let secret = Some(self.api_key.expose_secret());
        let answer = self
            .policy
            .send(cancel, secret, || self.request(chunk, encoding, info))
            .await?;
        let response: RecognizeResponse =
            serde_json::from_slice(&answer.body).map_err(|e| AsrError::BadResponse {
                endpoint: self.policy.endpoint.clone(),
                message: format!("not a speech:recognize response: {e}"),
            })?;
        Ok(response.into_chunk(info.duration_ms, &self.language_code))
    }
}

/// `RecognizeResponse` of the v1 REST API (the fields we use).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RecognizeResponse {
    #[serde(default)]
    results: Vec<RecognitionResult>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RecognitionResult {
    #[serde(default)]
    alternatives: Vec<Alternative>,
    #[serde(default)]
    result_end_time: Option<ProtoDuration>,
    #[serde(default)]
    language_code: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Alternative {
    #[serde(default)]
    transcript: String,
    #[serde(default)]
    words: Vec<WordInfo>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct WordInfo {
    #[serde(default)]
    start_time: Option<ProtoDuration>,
    #[serde(default)]
    end_time: Option<ProtoDuration>,
}

/// A protobuf Duration: `"1.500s"` in REST JSON; `{seconds, nanos}` as some
/// proxies and client libraries render it.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum ProtoDuration {
    Text(String),
    Parts {
        #[serde(default)]
        seconds: serde_json::Value,
        #[serde(default)]
        nanos: i64,
    },
}

impl ProtoDuration {
    fn ms(&self) -> Option<i64> {
        let seconds = match self {
            ProtoDuration::Text(s) => s.trim().strip_suffix('s')?.parse::<f64>().ok()?,
            ProtoDuration::Parts { seconds, nanos } => {
                let whole = match seconds {
                    serde_json::Value::String(s) => s.parse::<f64>().ok()?,
                    serde_json::Value::Number(n) => n.as_f64()?,
                    serde_json::Value::Null => 0.0,
                    _ => return None,
                };
                whole + *nanos as f64 / 1e9
            }
        };
        (seconds.is_finite() && seconds >= 0.0).then(|| (seconds * 1000.0).round() as i64)
    }
}

impl RecognizeResponse {
    fn into_chunk(self, duration_ms: Option<i64>, requested: &str) -> ChunkTranscript {
        let clamp = |t: i64| duration_ms.map_or(t, |d| t.min(d));
        let mut segments = Vec::new();
        // Which language covered the most audio, for a chunk that mixes.
        let mut votes: Vec<(String, i64)> = Vec::new();
        let mut previous_end = 0;
        for result in self.results {
            let result_end = result.result_end_time.as_ref().and_then(ProtoDuration::ms);
            let Some(best) = result.alternatives.into_iter().next() else {
                previous_end = result_end.unwrap_or(previous_end);
                continue;
            };
            let text = best.transcript.trim();
            let first = best.words.first().and_then(|w| w.start_time.as_ref()?.ms());
            let last = best.words.last().and_then(|w| w.end_time.as_ref()?.ms());
            let start = clamp(first.unwrap_or(previous_end));
            let end = clamp(last.or(result_end).unwrap_or(start)).max(start);
            previous_end = result_end.unwrap_or(end);
            if text.is_empty() {
                continue;
            }
            if let Some(language) = result.language_code.as_deref().and_then(normalize_language) {
                match votes.iter_mut().find(|(l, _)| *l == language) {
                    Some((_, weight)) => *weight += end - start,
                    None => votes.push((language, end - start)),
                }
            }
            segments.push(Segment {
                start_ms: start,
                end_ms: end,
                text: text.to_owned(),
            });
        }
        // Earliest wins a tie: `max_by_key` keeps the last maximum, so
        // iterate in reverse.
        let language = votes
            .into_iter()
            .rev()
            .max_by_key(|(_, weight)| *weight)
            .map(|(language, _)| language)
            .or_else(|| normalize_language(requested));
        ChunkTranscript {
            language,
            segments,
            duration_ms: duration_ms.unwrap_or(previous_end),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proto_durations_parse_in_both_renderings() {
        let d = |v: serde_json::Value| {
            serde_json::from_value::<ProtoDuration>(v)
                .expect("a duration")
                .ms()
        };
        assert_eq!(d(json!("1.500s")), Some(1500));
        assert_eq!(d(json!("2s")), Some(2000));
        assert_eq!(d(json!("0.100s")), Some(100));
        assert_eq!(d(json!({"seconds": "3", "nanos": 250_000_000})), Some(3250));
        assert_eq!(d(json!({"nanos": 5_000_000})), Some(5));
        assert_eq!(d(json!("soon")), None);
    }

    #[test]
    fn results_become_segments_with_word_times() {
        let response: RecognizeResponse = serde_json::from_value(json!({
            "results": [
                {"alternatives": [{"transcript": "hello world", "confidence": 0.9,
                    "words": [
                        {"startTime": "0.300s", "endTime": "0.800s", "word": "hello"},
                        {"startTime": "0.800s", "endTime": "1.400s", "word": "world"}]}],
                 "resultEndTime": "1.600s", "languageCode": "en-us"},
                {"alternatives": [{"transcript": " no words here "}],
                 "resultEndTime": "4s", "languageCode": "en-us"},
                {"alternatives": [], "resultEndTime": "5s"}
            ],
            "totalBilledTime": "5s"
        }))
        .expect("valid response");
        let t = response.into_chunk(Some(4500), "en-US");
        assert_eq!(t.language.as_deref(), Some("en"));
        assert_eq!(t.duration_ms, 4500);
        assert_eq!(
            t.segments,
            vec![
                Segment {
                    start_ms: 300,
                    end_ms: 1400,
                    text: "hello world".into()
                },
                // No words: from the previous result's end to its own end.
                Segment {
                    start_ms: 1600,
                    end_ms: 4000,
                    text: "no words here".into()
                },
            ]
        );
    }

    #[test]
    fn an_empty_response_is_an_empty_transcript() {
        let response: RecognizeResponse = serde_json::from_str("{}").expect("valid");
        let t = response.into_chunk(Some(2000), "de-DE");
        assert!(t.segments.is_empty());
        assert_eq!(t.language.as_deref(), Some("de"));
    }

    #[test]
    fn endpoints_get_the_versioned_method_path() {
        for endpoint in [
            "https://speech.googleapis.com",
            "https://speech.googleapis.com/v1/",
        ] {
            let g = GoogleAsr::new(endpoint, "k".into(), AsrOptions::default()).expect("valid");
            assert_eq!(
                g.url.as_str(),
                "https://speech.googleapis.com/v1/speech:recognize"
            );
        }
        assert!(matches!(
            GoogleAsr::new(
                "https://speech.googleapis.com",
                "".into(),
                AsrOptions::default()
            ),
            Err(AsrError::Config(_))
        ));
    }
}
