//! Renders a [`Transcript`] for people and players: plain text, SubRip
//! (`.srt`), WebVTT (`.vtt`) and JSON (`vidpipe show --format ...`).

use super::Transcript;

/// One line per segment.
pub fn txt(transcript: &Transcript) -> String {
    let mut out = String::new();
    for segment in &transcript.segments {
        out.push_str(&one_line(&segment.text));
        out.push('\n');
    }
    out
}

/// SubRip: numbered cues, `HH:MM:SS,mmm` times, a blank line after each.
pub fn srt(transcript: &Transcript) -> String {
    let mut out = String::new();
    for (n, segment) in transcript.segments.iter().enumerate() {
        out.push_str(&format!(
            "{}\n{} --> {}\n{}\n\n",
            n + 1,
            timestamp(segment.start_ms, ','),
            timestamp(segment.end_ms, ','),
            one_line(&segment.text)
        ));
    }
    out
}

/// WebVTT: the `WEBVTT` header, then cues with `HH:MM:SS.mmm` times. Cue
/// text escapes `&`, `<` and `>`, which WebVTT reads as markup, and never
/// contains `-->`.
pub fn vtt(transcript: &Transcript) -> String {
    let mut out = String::from("WEBVTT\n\n");
    for segment in &transcript.segments {
        let text = one_line(&segment.text)
            .replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;");
        out.push_str(&format!(
            "{} --> {}\n{}\n\n",
            timestamp(segment.start_ms, '.'),
            timestamp(segment.end_ms, '.'),
            text
        ));
    }
    out
}

/// The transcript as pretty-printed JSON:
/// `{"language", "segments": [{"start_ms", "end_ms", "text"}], "duration_ms"}`.
pub fn json(transcript: &Transcript) -> String {
    // Serialising plain strings and integers cannot fail; an empty object
    // keeps the signature simple should that ever change.
    serde_json::to_string_pretty(transcript).unwrap_or_else(|_| "{}".to_owned())
}

/// `HH:MM:SS<sep>mmm`; hours grow past two digits rather than wrap, and
/// negative times (which no segment should have) print as zero.
fn timestamp(ms: i64, separator: char) -> String {
    let ms = ms.max(0);
    let (hours, rest) = (ms / 3_600_000, ms % 3_600_000);
    let (minutes, rest) = (rest / 60_000, rest % 60_000);
    let (seconds, millis) = (rest / 1000, rest % 1000);
    format!("{hours:02}:{minutes:02}:{seconds:02}{separator}{millis:03}")
}

/// Cue text on one line: a blank line would end the cue early in both
/// formats.
fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::super::Segment;
    use super::*;

    fn transcript() -> Transcript {
        Transcript {
            language: Some("en".into()),
            segments: vec![
                Segment {
                    start_ms: 0,
                    end_ms: 2500,
                    text: "Hello there.".into(),
                },
                Segment {
                    start_ms: 62_345,
                    end_ms: 3_723_004,
                    text: "Fish & <chips>\n\nlater.".into(),
                },
            ],
            duration_ms: 3_800_000,
        }
    }

    #[test]
    fn timestamps_use_each_formats_separator() {
        assert_eq!(timestamp(62_345, ','), "00:01:02,345");
        assert_eq!(timestamp(62_345, '.'), "00:01:02.345");
        assert_eq!(timestamp(3_723_004, '.'), "01:02:03.004");
        assert_eq!(timestamp(360_000_000, ','), "100:00:00,000");
        assert_eq!(timestamp(-5, ','), "00:00:00,000");
    }

    #[test]
    fn srt_has_numbered_cues() {
        assert_eq!(
            srt(&transcript()),
            "1\n00:00:00,000 --> 00:00:02,500\nHello there.\n\n\
             2\n00:01:02,345 --> 01:02:03,004\nFish & <chips> later.\n\n"
        );
    }

    #[test]
    fn vtt_has_the_header_and_escapes_markup() {
        assert_eq!(
            vtt(&transcript()),
            "WEBVTT\n\n\
             00:00:00.000 --> 00:00:02.500\nHello there.\n\n\
             00:01:02.345 --> 01:02:03.004\nFish &amp; &lt;chips&gt; later.\n\n"
        );
    }

    #[test]
    fn txt_and_json() {
        assert_eq!(txt(&transcript()), "Hello there.\nFish & <chips> later.\n");
        let parsed: Transcript = serde_json::from_str(&json(&transcript())).expect("valid JSON");
        assert_eq!(parsed, transcript());
        assert!(
            vtt(&Transcript {
                language: None,
                segments: vec![],
                duration_ms: 0
            })
            .starts_with("WEBVTT\n")
        );
    }
}
