//! Puts the transcripts of overlapping chunks back into one transcript.
//!
//! Chunks overlap (by a second or two) so that no word is lost at a cut; the
//! price is that the words spoken in the overlap come back twice, and the
//! copies at a chunk's very edge are often garbled (a word cut in half).
//! For each border we therefore:
//!
//! 1. split the segments into words with times interpolated over their
//!    segment (services give segment times only, and speech is roughly
//!    uniform within a segment);
//! 2. align the words at the end of the previous chunk with those at the
//!    start of the next one (a local alignment, Smith-Waterman, over
//!    normalised words), which finds the doubled words even when the edges
//!    differ;
//! 3. cut in the middle of the aligned stretch, so each side keeps the words
//!    farthest from its own edge;
//! 4. if nothing aligns (silence, or the two copies disagree too much), cut
//!    at the middle of the overlap by time instead.
//!
//! Then Whisper's repetition loops are collapsed (the same segment repeated
//! back to back, or a phrase repeated three or more times within a
//! segment), and the language is decided by a vote weighted by each chunk's
//! duration, so that a short intro in another language (or music that
//! Whisper guesses wrong) does not decide for the whole recording.

use super::wer::normalize_words;
use super::{ChunkTranscript, Segment, Transcript};

/// How far (in words) from a border the alignment looks.
const WINDOW_WORDS: usize = 60;
/// How far (in ms) beyond the overlap the alignment looks, at least: word
/// times are interpolated, so they can be off by a few seconds.
const MIN_SLACK_MS: i64 = 5_000;
/// Alignment scores.
const MATCH: i32 = 2;
const MISMATCH: i32 = -1;
const GAP: i32 = -1;
/// An alignment counts if it matched this many words and scored this much
/// (two adjacent matching words, or three with a substitution between).
const MIN_MATCHES: usize = 2;
const MIN_SCORE: i32 = 3;

/// Stitches chunk transcripts into one.
///
/// Each chunk comes with its offset in the recording and its overlap with
/// the previous chunk (both in milliseconds; the first chunk's overlap is
/// ignored). Chunk timestamps are relative to the chunk; the result's are
/// relative to the recording.
pub fn stitch(chunks: Vec<(i64, i64, ChunkTranscript)>) -> Transcript {
    let mut chunks = chunks;
    chunks.sort_by_key(|(offset, _, _)| *offset);

    let mut words: Vec<Word> = Vec::new();
    let mut votes: Vec<(String, i64)> = Vec::new();
    let mut duration_ms = 0;
    let mut next_segment = 0;
    for (index, (offset, overlap, chunk)) in chunks.into_iter().enumerate() {
        let span = chunk.segments.iter().map(|s| s.end_ms).max().unwrap_or(0);
        let weight = if chunk.duration_ms > 0 {
            chunk.duration_ms
        } else {
            span
        };
        duration_ms = duration_ms.max(offset + chunk.duration_ms.max(span));
        if let Some(language) = chunk.language.filter(|l| !l.is_empty()) {
            match votes.iter_mut().find(|(l, _)| *l == language) {
                Some((_, w)) => *w += weight,
                None => votes.push((language, weight)),
            }
        }
        let incoming = split_words(&chunk.segments, offset, &mut next_segment);
        if index > 0 && overlap > 0 && !words.is_empty() && !incoming.is_empty() {
            join(&mut words, incoming, offset, overlap);
        } else {
            words.extend(incoming);
        }
    }

    let segments = collapse_repeats(build_segments(&words));
    let duration_ms = duration_ms.max(segments.last().map_or(0, |s| s.end_ms));
    // The heaviest language; the earliest wins a tie (`max_by_key` keeps the
    // last maximum, so iterate in reverse).
    let language = votes
        .into_iter()
        .rev()
        .max_by_key(|(_, weight)| *weight)
        .map(|(language, _)| language);
    Transcript {
        language,
        segments,
        duration_ms,
    }
}

/// A word with its interpolated absolute time and its source segment.
#[derive(Debug, Clone)]
struct Word {
    text: String,
    /// Lowercase, punctuation stripped; empty for punctuation-only tokens,
    /// which never match.
    norm: String,
    start: i64,
    end: i64,
    segment: usize,
}

/// Splits segments into words, shifted by `offset`, with times spread over
/// each segment in proportion to the words' lengths.
fn split_words(segments: &[Segment], offset: i64, next_segment: &mut usize) -> Vec<Word> {
    let mut words = Vec::new();
    for segment in segments {
        let tokens: Vec<&str> = segment.text.split_whitespace().collect();
        if tokens.is_empty() {
            continue;
        }
        let id = *next_segment;
        *next_segment += 1;
        let start = offset + segment.start_ms;
        let length = (segment.end_ms - segment.start_ms).max(0);
        // +1 per token for the space after it: short words still take time.
        let weights: Vec<i64> = tokens
            .iter()
            .map(|t| t.chars().count() as i64 + 1)
            .collect();
        let total: i64 = weights.iter().sum();
        let mut before = 0;
        for (token, weight) in tokens.iter().zip(weights) {
            let after = before + weight;
            words.push(Word {
                text: (*token).to_owned(),
                norm: normalize_words(token).join(""),
                start: start + length * before / total,
                end: start + length * after / total,
                segment: id,
            });
            before = after;
        }
    }
    words
}

/// Appends `incoming` (the next chunk, starting at `offset` and overlapping
/// the previous one by `overlap` ms) to `words`, keeping one copy of the
/// overlap's words.
fn join(words: &mut Vec<Word>, incoming: Vec<Word>, offset: i64, overlap: i64) {
    let slack = overlap.max(MIN_SLACK_MS);
    // The previous chunk's last words, around and after the border...
    let tail_start = words
        .iter()
        .position(|w| w.end > offset - slack)
        .unwrap_or(words.len())
        .max(words.len().saturating_sub(WINDOW_WORDS));
    // ...and the next chunk's first words, up to a little after the overlap.
    let head_len = incoming
        .iter()
        .take_while(|w| w.start < offset + overlap + slack)
        .count()
        .min(WINDOW_WORDS);
    let tail = &words[tail_start..];
    let head = &incoming[..head_len];

    let aligned = align(
        &tail.iter().map(|w| w.norm.as_str()).collect::<Vec<_>>(),
        &head.iter().map(|w| w.norm.as_str()).collect::<Vec<_>>(),
    )
    .filter(|a| a.matches >= MIN_MATCHES && a.score >= MIN_SCORE)
    .filter(|a| {
        // The matched words must be the same stretch of audio, not the same
        // phrase said twice a minute apart.
        let matched: Vec<i64> = a
            .pairs
            .iter()
            .filter(|(i, j)| tail[*i].norm == head[*j].norm)
            .map(|(i, j)| (tail[*i].start - head[*j].start).abs())
            .collect();
        let mean = matched.iter().sum::<i64>() / matched.len().max(1) as i64;
        mean <= slack
    });

    match aligned {
        Some(alignment) => {
            // Cut in the middle of the aligned stretch: each side keeps the
            // words that were farthest from its edge when recognised.
            let (i, j) = alignment.pairs[alignment.pairs.len() / 2];
            words.truncate(tail_start + i + 1);
            words.extend(incoming.into_iter().skip(j + 1));
        }
        None => {
            // Nothing to align (silence, or garbled copies): cut by time at
            // the middle of the overlap.
            let cut = offset + overlap / 2;
            let mid = |w: &Word| (w.start + w.end) / 2;
            while words.last().is_some_and(|w| mid(w) >= cut) {
                words.pop();
            }
            words.extend(incoming.into_iter().filter(|w| mid(w) >= cut));
        }
    }
}

/// A local alignment: the aligned index pairs (substitutions included, gaps
/// not), in order.
#[derive(Debug)]
struct Alignment {
    pairs: Vec<(usize, usize)>,
    matches: usize,
    score: i32,
}

/// Smith-Waterman over words. `None` if no word matches.
fn align(a: &[&str], b: &[&str]) -> Option<Alignment> {
    let (n, m) = (a.len(), b.len());
    let width = m + 1;
    let mut h = vec![0i32; (n + 1) * width];
    let same = |i: usize, j: usize| !a[i].is_empty() && a[i] == b[j];
    let score_of = |i: usize, j: usize| if same(i, j) { MATCH } else { MISMATCH };
    let mut best = (0, 0, 0);
    for i in 1..=n {
        for j in 1..=m {
            let v = (h[(i - 1) * width + j - 1] + score_of(i - 1, j - 1))
                .max(h[(i - 1) * width + j] + GAP)
                .max(h[i * width + j - 1] + GAP)
                .max(0);
            h[i * width + j] = v;
            if v > best.0 {
                best = (v, i, j);
            }
        }
    }
    let (score, mut i, mut j) = best;
    if score == 0 {
        return None;
    }
    let mut pairs = Vec::new();
    while i > 0 && j > 0 && h[i * width + j] > 0 {
        let v = h[i * width + j];
        if v == h[(i - 1) * width + j - 1] + score_of(i - 1, j - 1) {
            pairs.push((i - 1, j - 1));
            i -= 1;
            j -= 1;
        } else if v == h[(i - 1) * width + j] + GAP {
            i -= 1;
        } else {
            j -= 1;
        }
    }
    pairs.reverse();
    let matches = pairs.iter().filter(|(i, j)| same(*i, *j)).count();
    Some(Alignment {
        pairs,
        matches,
        score,
    })
}

/// Groups consecutive words of one source segment back into segments, with
/// start times kept in order and segments not overlapping.
fn build_segments(words: &[Word]) -> Vec<Segment> {
    let mut segments: Vec<Segment> = Vec::new();
    let mut current: Option<(usize, Segment)> = None;
    for w in words {
        match &mut current {
            Some((id, segment)) if *id == w.segment => {
                segment.end_ms = segment.end_ms.max(w.end);
                segment.text.push(' ');
                segment.text.push_str(&w.text);
            }
            _ => {
                if let Some((_, done)) = current.take() {
                    segments.push(done);
                }
                current = Some((
                    w.segment,
                    Segment {
                        start_ms: w.start,
                        end_ms: w.end,
                        text: w.text.clone(),
                    },
                ));
            }
        }
    }
    if let Some((_, done)) = current {
        segments.push(done);
    }
    // Interpolated times on either side of a border can cross by a little.
    let mut previous_end = 0;
    for s in &mut segments {
        s.start_ms = s.start_ms.max(previous_end.min(s.end_ms));
        s.end_ms = s.end_ms.max(s.start_ms);
        previous_end = s.end_ms;
    }
    segments
}

/// Collapses Whisper's repetition loops: a segment whose text equals the
/// one before it is dropped, and a phrase repeated back to back within a
/// segment (three times or more, four for a single word) is kept once.
fn collapse_repeats(segments: Vec<Segment>) -> Vec<Segment> {
    let mut out: Vec<Segment> = Vec::with_capacity(segments.len());
    for mut segment in segments {
        segment.text = collapse_phrase_loops(&segment.text);
        let norm = normalize_words(&segment.text);
        let repeated = out
            .last()
            .is_some_and(|prev| !norm.is_empty() && normalize_words(&prev.text) == norm);
        if !repeated {
            out.push(segment);
        }
    }
    out
}

/// The longest phrase checked for loops, in words.
const MAX_LOOP_WORDS: usize = 12;

fn collapse_phrase_loops(text: &str) -> String {
    let tokens: Vec<&str> = text.split_whitespace().collect();
    let norms: Vec<String> = tokens.iter().map(|t| normalize_words(t).join("")).collect();
    let mut keep = Vec::with_capacity(tokens.len());
    let mut i = 0;
    'outer: while i < tokens.len() {
        for n in 1..=MAX_LOOP_WORDS.min((tokens.len() - i) / 3) {
            let phrase = &norms[i..i + n];
            if phrase.iter().any(String::is_empty) {
                continue;
            }
            let mut reps = 1;
            while i + (reps + 1) * n <= tokens.len()
                && &norms[i + reps * n..i + (reps + 1) * n] == phrase
            {
                reps += 1;
            }
            let enough = if n == 1 { 4 } else { 3 };
            if reps >= enough {
                // Keep the last copy: it carries the phrase's final
                // punctuation ("go. go. go." -> "go.").
                keep.extend_from_slice(&tokens[i + (reps - 1) * n..i + reps * n]);
                i += reps * n;
                continue 'outer;
            }
        }
        keep.push(tokens[i]);
        i += 1;
    }
    keep.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(start_ms: i64, end_ms: i64, text: &str) -> Segment {
        Segment {
            start_ms,
            end_ms,
            text: text.into(),
        }
    }

    fn chunk(language: &str, duration_ms: i64, segments: Vec<Segment>) -> ChunkTranscript {
        ChunkTranscript {
            language: Some(language.into()),
            segments,
            duration_ms,
        }
    }

    fn text(t: &Transcript) -> String {
        t.segments
            .iter()
            .map(|s| s.text.as_str())
            .collect::<Vec<_>>()
            .join(" ")
    }

    #[test]
    fn chunks_are_shifted_by_their_offsets() {
        let t = stitch(vec![
            (
                0,
                0,
                chunk(
                    "en",
                    10_000,
                    vec![seg(0, 4000, "One two."), seg(5000, 9000, "Three.")],
                ),
            ),
            (
                10_000,
                0,
                chunk("en", 8000, vec![seg(1000, 3000, "Four five.")]),
            ),
        ]);
        assert_eq!(
            t.segments,
            vec![
                seg(0, 4000, "One two."),
                seg(5000, 9000, "Three."),
                seg(11_000, 13_000, "Four five."),
            ]
        );
        assert_eq!(t.duration_ms, 18_000);
        assert_eq!(t.language.as_deref(), Some("en"));
    }

    #[test]
    fn overlap_words_are_kept_once() {
        // Chunk 1 covers 0-12 s, chunk 2 starts at 10 s: "brown fox jumps"
        // was spoken in the overlap and recognised by both.
        let t = stitch(vec![
            (
                0,
                0,
                chunk(
                    "en",
                    12_000,
                    vec![
                        seg(0, 5000, "A story begins here."),
                        seg(6000, 12_000, "The quick brown fox jumps"),
                    ],
                ),
            ),
            (
                10_000,
                2000,
                chunk(
                    "en",
                    10_000,
                    vec![
                        seg(0, 6000, "brown fox jumps over the lazy dog."),
                        seg(7000, 9000, "The end."),
                    ],
                ),
            ),
        ]);
        assert_eq!(
            text(&t),
            "A story begins here. The quick brown fox jumps over the lazy dog. The end."
        );
        let starts: Vec<i64> = t.segments.iter().map(|s| s.start_ms).collect();
        assert!(starts.windows(2).all(|w| w[0] <= w[1]), "{starts:?}");
        let last = t.segments.last().expect("segments");
        assert_eq!((last.start_ms, last.end_ms), (17_000, 19_000));
    }

    #[test]
    fn garbled_edges_are_dropped_with_the_duplicate() {
        // Each chunk mangles the word cut at its edge ("jum", "ox").
        let t = stitch(vec![
            (
                0,
                0,
                chunk(
                    "en",
                    12_000,
                    vec![seg(0, 12_000, "the quick brown fox jumps over the la")],
                ),
            ),
            (
                10_000,
                2000,
                chunk(
                    "en",
                    8000,
                    vec![seg(0, 8000, "ox jumps over the lazy dog and runs away")],
                ),
            ),
        ]);
        assert_eq!(
            text(&t),
            "the quick brown fox jumps over the lazy dog and runs away"
        );
    }

    #[test]
    fn without_a_textual_match_the_overlap_is_cut_in_the_middle() {
        let t = stitch(vec![
            (
                0,
                0,
                chunk(
                    "en",
                    10_000,
                    vec![seg(0, 4000, "alpha"), seg(8500, 10_000, "bravo")],
                ),
            ),
            (
                8000,
                2000,
                chunk(
                    "en",
                    6000,
                    vec![seg(0, 800, "charlie"), seg(1500, 4000, "delta")],
                ),
            ),
        ]);
        // Cut at 9 s: "bravo" (mid 9.25 s) goes, "charlie" (mid 8.4 s) goes.
        assert_eq!(text(&t), "alpha delta");
    }

    #[test]
    fn repeated_segments_collapse() {
        let t = stitch(vec![(
            0,
            0,
            chunk(
                "en",
                30_000,
                vec![
                    seg(0, 2000, "Hello."),
                    seg(2000, 4000, "Thank you."),
                    seg(4000, 6000, "thank you"),
                    seg(6000, 8000, "Thank you."),
                    seg(8000, 9000, "Bye."),
                ],
            ),
        )]);
        assert_eq!(
            t.segments,
            vec![
                seg(0, 2000, "Hello."),
                seg(2000, 4000, "Thank you."),
                seg(8000, 9000, "Bye.")
            ]
        );
    }

    #[test]
    fn phrase_loops_within_a_segment_collapse() {
        assert_eq!(
            collapse_phrase_loops("So I said I will go. I will go. I will go. I will go. Then"),
            "So I said I will go. Then"
        );
        assert_eq!(collapse_phrase_loops("the the the the end"), "the end");
        // Ordinary repetition stays.
        assert_eq!(
            collapse_phrase_loops("very very good, no no"),
            "very very good, no no"
        );
        assert_eq!(collapse_phrase_loops("go go go"), "go go go");
    }

    #[test]
    fn language_is_voted_by_duration_not_taken_from_the_start() {
        let t = stitch(vec![
            (
                0,
                0,
                chunk("de", 10_000, vec![seg(0, 9000, "Hallo zusammen.")]),
            ),
            (
                10_000,
                0,
                chunk("en", 30_000, vec![seg(0, 9000, "Welcome.")]),
            ),
            (
                40_000,
                0,
                chunk("fr", 20_000, vec![seg(0, 9000, "Bonjour.")]),
            ),
            (60_000, 0, chunk("en", 5_000, vec![seg(0, 4000, "Bye.")])),
        ]);
        assert_eq!(t.language.as_deref(), Some("en"));
        assert_eq!(t.duration_ms, 65_000);
        // A tie goes to the earlier language.
        let t = stitch(vec![
            (0, 0, chunk("de", 10_000, vec![])),
            (10_000, 0, chunk("en", 10_000, vec![])),
        ]);
        assert_eq!(t.language.as_deref(), Some("de"));
        assert!(t.segments.is_empty());
    }

    #[test]
    fn nothing_in_nothing_out() {
        let t = stitch(Vec::new());
        assert_eq!(t.language, None);
        assert!(t.segments.is_empty());
        assert_eq!(t.duration_ms, 0);
    }
}
