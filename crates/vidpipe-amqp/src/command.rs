//! The legacy commands and their validation.
//!
//! The old system's producers publish JSON to one queue per service:
//! `{"url": ..., "requested_by": ..., "options": {...}}` on the discovery
//! queue, and `{"video_id": ..., ...}` on the later stages' queues to
//! restart a known video at that stage. A message may also name its stage
//! explicitly (`"stage"` or `"start_stage"`, in vidpipe's or the old
//! services' words), which then wins over the queue's.
//!
//! Every message is treated as hostile: size-capped, parsed, and checked
//! field by field. A message that fails gets a [`Malformed`] with a short
//! machine-readable [`reason`] (the dead-letter header) and a detail for
//! people. Unknown extra fields are ignored: old producers send more than
//! the adapter needs.
//!
//! A command's id makes redeliveries harmless: the AMQP `message-id` when
//! the publisher set one, else a hash of the body and the delivery's
//! identity (queue, exchange, routing key and the publisher-set
//! properties). Both are the same on every redelivery of a message, and on
//! a publisher's retry of it.

use std::collections::BTreeMap;

use serde_json::Value;
use sha2::{Digest, Sha256};

/// The reasons a message is dead-lettered (the `x-vidpipe-reason` header).
pub mod reason {
    /// Larger than the configured maximum.
    pub const TOO_LARGE: &str = "too_large";
    /// Not JSON (or not UTF-8).
    pub const BAD_JSON: &str = "bad_json";
    /// JSON, but not an object.
    pub const NOT_AN_OBJECT: &str = "not_an_object";
    /// A required field (`url`, `video_id`) is missing or empty.
    pub const MISSING_FIELD: &str = "missing_field";
    /// A field has the wrong type or an unacceptable value.
    pub const BAD_FIELD: &str = "bad_field";
    /// The URL is not an absolute http(s) URL without credentials.
    pub const BAD_URL: &str = "bad_url";
    /// The message names a stage that does not exist.
    pub const UNKNOWN_STAGE: &str = "unknown_stage";
}

/// Longest URL accepted.
const MAX_URL_BYTES: usize = 4096;
/// Longest video id, `requested_by`, option key.
const MAX_NAME_BYTES: usize = 256;

/// A pipeline stage, in vidpipe's words and the old services'.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stage {
    /// Resolve a URL into videos (the old DiscoveryService).
    Discover,
    /// Fetch the media (DownloadService).
    Download,
    /// Extract the audio (AudioExtractionService).
    ExtractAudio,
    /// Speech recognition (TranscriptionService).
    Transcribe,
    /// Summaries (SummarizationService).
    Summarize,
}

impl Stage {
    /// Every stage, in pipeline order.
    pub const ALL: [Stage; 5] = [
        Stage::Discover,
        Stage::Download,
        Stage::ExtractAudio,
        Stage::Transcribe,
        Stage::Summarize,
    ];

    /// vidpipe's name (a command's `start_stage`, the routing keys of the
    /// event mirror).
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Discover => "discover",
            Stage::Download => "download",
            Stage::ExtractAudio => "extract-audio",
            Stage::Transcribe => "transcribe",
            Stage::Summarize => "summarize",
        }
    }

    /// The old system's queue for this stage (the default queue name).
    pub fn legacy_queue(self) -> &'static str {
        match self {
            Stage::Discover => "discovery_queue",
            Stage::Download => "download_queue",
            Stage::ExtractAudio => "audio_extraction_queue",
            Stage::Transcribe => "transcription_queue",
            Stage::Summarize => "summarization_queue",
        }
    }

    /// A stage by any of its names: vidpipe's (`extract-audio`), the old
    /// service's (`AudioExtractionService`, `audio_extraction`) or its
    /// queue's (`audio_extraction_queue`); case, `_` and `-` do not matter.
    pub fn parse(name: &str) -> Option<Stage> {
        let key: String = name
            .trim()
            .chars()
            .filter(|c| !matches!(c, '_' | '-' | ' '))
            .flat_map(char::to_lowercase)
            .collect();
        let key = key
            .strip_suffix("queue")
            .or_else(|| key.strip_suffix("service"))
            .unwrap_or(&key);
        Some(match key {
            "discover" | "discovery" => Stage::Discover,
            "download" => Stage::Download,
            "extractaudio" | "audioextraction" | "audio" => Stage::ExtractAudio,
            "transcribe" | "transcription" => Stage::Transcribe,
            "summarize" | "summarise" | "summarization" | "summarisation" => Stage::Summarize,
            _ => return None,
        })
    }
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a message cannot become a command.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}: {detail}")]
pub struct Malformed {
    /// One of [`reason`]'s constants, or a sink's own reason.
    pub reason: &'static str,
    /// What is wrong, for people (never the whole message).
    pub detail: String,
}

fn malformed(reason: &'static str, detail: impl Into<String>) -> Malformed {
    Malformed {
        reason,
        detail: detail.into(),
    }
}

/// A valid legacy command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LegacyCommand {
    /// Idempotency key (see [`command_id`]).
    pub command_id: String,
    /// The queue it came from.
    pub queue: String,
    /// Where to start: [`Stage::Discover`] for a URL, else the stage to
    /// restart a known video at.
    pub stage: Stage,
    /// The URL: always set for [`Stage::Discover`]; optional otherwise.
    pub url: Option<String>,
    /// The video to restart: always set for the later stages.
    pub video_id: Option<String>,
    /// Who asked.
    pub requested_by: Option<String>,
    /// Free-form options; non-string JSON values as their JSON text.
    pub options: BTreeMap<String, String>,
}

impl LegacyCommand {
    /// Validates `body`, a message from `queue` (whose stage is
    /// `queue_stage`), into a command with id `command_id`.
    pub fn parse(
        queue: &str,
        queue_stage: Stage,
        body: &[u8],
        max_bytes: usize,
        command_id: String,
    ) -> Result<Self, Malformed> {
        if body.len() > max_bytes {
            return Err(malformed(
                reason::TOO_LARGE,
                format!("{} bytes, more than the limit of {max_bytes}", body.len()),
            ));
        }
        let value: Value = serde_json::from_slice(body)
            .map_err(|e| malformed(reason::BAD_JSON, format!("not valid JSON: {e}")))?;
        let Value::Object(map) = value else {
            return Err(malformed(
                reason::NOT_AN_OBJECT,
                format!("expected a JSON object, got {}", kind(&value)),
            ));
        };
        let stage = match map.get("stage").or_else(|| map.get("start_stage")) {
            None | Some(Value::Null) => queue_stage,
            Some(Value::String(s)) => Stage::parse(s).ok_or_else(|| {
                malformed(
                    reason::UNKNOWN_STAGE,
                    format!(
                        "no stage is called {:?} (stages: discover, download, extract-audio, transcribe, summarize)",
                        clip(s, 64)
                    ),
                )
            })?,
            Some(other) => {
                return Err(malformed(
                    reason::BAD_FIELD,
                    format!("`stage` must be a string, got {}", kind(other)),
                ));
            }
        };
        let url = optional_string(&map, "url", MAX_URL_BYTES)?;
        if let Some(url) = &url {
            check_url(url)?;
        }
        let video_id = optional_string(&map, "video_id", MAX_NAME_BYTES)?;
        if let Some(id) = &video_id
            && id.chars().any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(malformed(
                reason::BAD_FIELD,
                "`video_id` contains whitespace or control characters",
            ));
        }
        match stage {
            Stage::Discover if url.is_none() => {
                return Err(malformed(
                    reason::MISSING_FIELD,
                    "a discovery command needs `url`",
                ));
            }
            Stage::Discover => {}
            _ if video_id.is_none() => {
                return Err(malformed(
                    reason::MISSING_FIELD,
                    format!("a command to restart at {stage} needs `video_id`"),
                ));
            }
            _ => {}
        }
        let requested_by = optional_string(&map, "requested_by", MAX_NAME_BYTES)?;
        let options = match map.get("options") {
            None | Some(Value::Null) => BTreeMap::new(),
            Some(Value::Object(o)) => o
                .iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| {
                    if k.len() > MAX_NAME_BYTES {
                        return Err(malformed(
                            reason::BAD_FIELD,
                            format!("an option name is longer than {MAX_NAME_BYTES} bytes"),
                        ));
                    }
                    let text = match v {
                        Value::String(s) => s.clone(),
                        other => other.to_string(),
                    };
                    Ok((k.clone(), text))
                })
                .collect::<Result<_, _>>()?,
            Some(other) => {
                return Err(malformed(
                    reason::BAD_FIELD,
                    format!("`options` must be an object, got {}", kind(other)),
                ));
            }
        };
        Ok(Self {
            command_id,
            queue: queue.to_string(),
            stage,
            url,
            video_id: if stage == Stage::Discover {
                None
            } else {
                video_id
            },
            requested_by,
            options,
        })
    }
}

/// A string field that may be absent or null; empty counts as absent.
fn optional_string(
    map: &serde_json::Map<String, Value>,
    field: &str,
    max: usize,
) -> Result<Option<String>, Malformed> {
    match map.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.trim().is_empty() => Ok(None),
        Some(Value::String(s)) if s.len() > max => Err(malformed(
            reason::BAD_FIELD,
            format!("`{field}` is longer than {max} bytes"),
        )),
        Some(Value::String(s)) => Ok(Some(s.trim().to_string())),
        Some(other) => Err(malformed(
            reason::BAD_FIELD,
            format!("`{field}` must be a string, got {}", kind(other)),
        )),
    }
}

/// The adapter's own URL check: absolute http(s), a host, no credentials,
/// nothing that could be taken for a command-line option. The sink may
/// refuse more (vidpipe normalises URLs).
fn check_url(url: &str) -> Result<(), Malformed> {
    let bad = |why: &str| malformed(reason::BAD_URL, format!("{:?}: {why}", clip(url, 120)));
    if url.starts_with('-') {
        return Err(bad("starts with '-'"));
    }
    if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(bad("contains whitespace or control characters"));
    }
    let parsed = url::Url::parse(url).map_err(|_| bad("not an absolute URL"))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(bad("only http and https URLs are accepted"));
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err(bad("no host"));
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(malformed(
            reason::BAD_URL,
            "credentials in URLs are not accepted",
        ));
    }
    Ok(())
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// At most `n` characters of `s`, for messages.
fn clip(s: &str, n: usize) -> String {
    s.chars().take(n).collect()
}

/// What identifies one published message across redeliveries: where it was
/// published to and the properties its publisher set. Not the delivery tag
/// or the redelivered flag, which change on every delivery.
#[derive(Debug, Clone, Default)]
pub struct DeliveryIdentity<'a> {
    /// The AMQP `message-id` property.
    pub message_id: Option<&'a str>,
    /// The queue the message was consumed from.
    pub queue: &'a str,
    /// The exchange it was published to.
    pub exchange: &'a str,
    /// Its routing key.
    pub routing_key: &'a str,
    /// `correlation-id`.
    pub correlation_id: Option<&'a str>,
    /// `app-id`.
    pub app_id: Option<&'a str>,
    /// `user-id`.
    pub user_id: Option<&'a str>,
    /// `type`.
    pub kind: Option<&'a str>,
    /// `timestamp` (seconds).
    pub timestamp: Option<u64>,
}

/// The command id of a message: its `message-id` when the publisher set a
/// non-empty one, else `amqp:` and 32 hex digits of a SHA-256 over the
/// delivery identity and the body. Two messages with the same body,
/// route and properties but no message id are taken for one command (a
/// publisher's retry); a publisher that means two must tell them apart by
/// a message id or a timestamp.
pub fn command_id(identity: &DeliveryIdentity<'_>, body: &[u8]) -> String {
    if let Some(id) = identity.message_id.map(str::trim).filter(|s| !s.is_empty()) {
        return id.to_string();
    }
    let mut h = Sha256::new();
    // Each part is length-prefixed so that no two different identities
    // can concatenate to the same bytes.
    let mut part = |tag: u8, bytes: &[u8]| {
        h.update([tag]);
        h.update((bytes.len() as u64).to_be_bytes());
        h.update(bytes);
    };
    part(b'q', identity.queue.as_bytes());
    part(b'e', identity.exchange.as_bytes());
    part(b'r', identity.routing_key.as_bytes());
    for (tag, value) in [
        (b'c', identity.correlation_id),
        (b'a', identity.app_id),
        (b'u', identity.user_id),
        (b't', identity.kind),
    ] {
        if let Some(v) = value {
            part(tag, v.as_bytes());
        }
    }
    if let Some(ts) = identity.timestamp {
        part(b's', &ts.to_be_bytes());
    }
    part(b'b', body);
    let digest = hex::encode(h.finalize());
    format!("amqp:{}", &digest[..32])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(queue_stage: Stage, body: &str) -> Result<LegacyCommand, Malformed> {
        LegacyCommand::parse("q", queue_stage, body.as_bytes(), 1024, "id".into())
    }

    #[test]
    fn a_discovery_command_keeps_its_fields() {
        let c = parse(
            Stage::Discover,
            r#"{"url": " https://example.com/a.mp4 ", "requested_by": "ops",
                "options": {"lang": "en", "max": 3, "x": null, "nested": {"a": 1}}, "extra": 1}"#,
        )
        .unwrap();
        assert_eq!(c.stage, Stage::Discover);
        assert_eq!(c.url.as_deref(), Some("https://example.com/a.mp4"));
        assert_eq!(c.video_id, None);
        assert_eq!(c.requested_by.as_deref(), Some("ops"));
        assert_eq!(c.options["lang"], "en");
        assert_eq!(c.options["max"], "3");
        assert_eq!(c.options["nested"], r#"{"a":1}"#);
        assert!(!c.options.contains_key("x"));
    }

    #[test]
    fn a_stage_queue_restarts_a_known_video() {
        let c = parse(Stage::Transcribe, r#"{"video_id": "yt:abc"}"#).unwrap();
        assert_eq!(c.stage, Stage::Transcribe);
        assert_eq!(c.video_id.as_deref(), Some("yt:abc"));
        let c = parse(
            Stage::Discover,
            r#"{"video_id": "yt:abc", "stage": "AudioExtractionService"}"#,
        )
        .unwrap();
        assert_eq!(c.stage, Stage::ExtractAudio);
    }

    #[test]
    fn malformed_messages_name_their_reason() {
        for (stage, body, want) in [
            (Stage::Discover, "{not json", reason::BAD_JSON),
            (Stage::Discover, "\u{0}\u{1}", reason::BAD_JSON),
            (Stage::Discover, "[1, 2]", reason::NOT_AN_OBJECT),
            (Stage::Discover, r#""https://x.y/""#, reason::NOT_AN_OBJECT),
            (
                Stage::Discover,
                r#"{"requested_by": "a"}"#,
                reason::MISSING_FIELD,
            ),
            (Stage::Discover, r#"{"url": ""}"#, reason::MISSING_FIELD),
            (
                Stage::Download,
                r#"{"url": "https://x.y/a"}"#,
                reason::MISSING_FIELD,
            ),
            (Stage::Discover, r#"{"url": 42}"#, reason::BAD_FIELD),
            (
                Stage::Discover,
                r#"{"url": "https://x.y/", "options": [1]}"#,
                reason::BAD_FIELD,
            ),
            (
                Stage::Discover,
                r#"{"url": "https://x.y/", "requested_by": {}}"#,
                reason::BAD_FIELD,
            ),
            (Stage::Download, r#"{"video_id": "a b"}"#, reason::BAD_FIELD),
            (
                Stage::Discover,
                r#"{"url": "ftp://x.y/a"}"#,
                reason::BAD_URL,
            ),
            (Stage::Discover, r#"{"url": "not a url"}"#, reason::BAD_URL),
            (Stage::Discover, r#"{"url": "/relative"}"#, reason::BAD_URL),
            (
                Stage::Discover,
                r#"{"url": "-oProxyCommand=x"}"#,
                reason::BAD_URL,
            ),
            (
                Stage::Discover,
                r#"{"url": "http://u:p@x.y/"}"#,
                reason::BAD_URL,
            ),
            (
                Stage::Download,
                r#"{"video_id": "v", "stage": "dance"}"#,
                reason::UNKNOWN_STAGE,
            ),
            (
                Stage::Download,
                r#"{"video_id": "v", "stage": 3}"#,
                reason::BAD_FIELD,
            ),
        ] {
            let got = parse(stage, body).expect_err(body);
            assert_eq!(got.reason, want, "{body}: {got}");
        }
        let big = format!(r#"{{"url": "https://x.y/{}"}}"#, "a".repeat(2000));
        assert_eq!(
            parse(Stage::Discover, &big).unwrap_err().reason,
            reason::TOO_LARGE
        );
    }

    #[test]
    fn credentials_never_appear_in_the_reason() {
        let got = parse(Stage::Discover, r#"{"url": "http://u:hunter2@x.y/"}"#).unwrap_err();
        assert!(!got.detail.contains("hunter2"), "{got}");
    }

    #[test]
    fn stages_parse_by_any_name() {
        for s in Stage::ALL {
            assert_eq!(Stage::parse(s.as_str()), Some(s));
            assert_eq!(Stage::parse(s.legacy_queue()), Some(s));
        }
        assert_eq!(Stage::parse("DiscoveryService"), Some(Stage::Discover));
        assert_eq!(Stage::parse("audio_extraction"), Some(Stage::ExtractAudio));
        assert_eq!(Stage::parse("Summarization"), Some(Stage::Summarize));
        assert_eq!(Stage::parse("publish"), None);
    }

    #[test]
    fn command_ids_survive_redelivery_and_tell_messages_apart() {
        let id = DeliveryIdentity {
            queue: "discovery_queue",
            routing_key: "discovery_queue",
            ..Default::default()
        };
        let a = command_id(&id, b"{\"url\":\"https://x.y/a\"}");
        assert!(a.starts_with("amqp:") && a.len() == 37, "{a}");
        assert_eq!(a, command_id(&id, b"{\"url\":\"https://x.y/a\"}"));
        assert_ne!(a, command_id(&id, b"{\"url\":\"https://x.y/b\"}"));
        let later = DeliveryIdentity {
            timestamp: Some(1),
            ..id.clone()
        };
        assert_ne!(a, command_id(&later, b"{\"url\":\"https://x.y/a\"}"));
        let other_queue = DeliveryIdentity {
            queue: "download_queue",
            ..id.clone()
        };
        assert_ne!(a, command_id(&other_queue, b"{\"url\":\"https://x.y/a\"}"));
        let with_id = DeliveryIdentity {
            message_id: Some("m-1"),
            ..id
        };
        assert_eq!(command_id(&with_id, b"anything"), "m-1");
    }
}
