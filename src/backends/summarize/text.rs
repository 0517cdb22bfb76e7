//! Text handling shared by the backends: cleaning ASR output, splitting a
//! timed transcript into timed sentences, and turning a sentence into
//! content terms (stopwords dropped, words stemmed).

use std::collections::HashSet;
use std::sync::OnceLock;

use rust_stemmers::{Algorithm, Stemmer};

use super::TimedText;

/// A sentence that runs on past this many words is closed at the next
/// segment boundary: ASR without punctuation would otherwise give one
/// sentence per transcript.
const SOFT_MAX_WORDS: usize = 30;
/// ... and closed anywhere past this many.
const HARD_MAX_WORDS: usize = 60;

/// A sentence with the time its first word starts and its last word ends.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Sentence {
    pub text: String,
    pub start_ms: i64,
    pub end_ms: i64,
}

/// Removes what ASR writes for non-speech (`[Music]`, `(applause)`, `♪`)
/// and collapses whitespace. Whole-segment parentheses are dropped, inline
/// ones are kept: people do say things in parentheses.
pub(crate) fn clean(text: &str) -> String {
    let trimmed = text.trim();
    if trimmed.starts_with('(') && trimmed.ends_with(')') && !trimmed[1..].contains('(') {
        return String::new();
    }
    let mut out = String::with_capacity(trimmed.len());
    let mut depth = 0usize;
    for c in trimmed.chars() {
        match c {
            '[' => depth += 1,
            ']' if depth > 0 => depth -= 1,
            '♪' | '♫' | '\u{FFFD}' => out.push(' '),
            // CJK sentence marks are not followed by a space; one is added
            // so that the word splitter sees the sentence end.
            '。' | '！' | '？' if depth == 0 => {
                out.push(c);
                out.push(' ');
            }
            _ if depth == 0 => out.push(c),
            _ => {}
        }
    }
    out.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Splits a transcript into sentences, each timed by interpolating within
/// its segments (ASR gives times per segment, not per word).
pub(crate) fn sentences(segments: &[TimedText]) -> Vec<Sentence> {
    let mut order: Vec<usize> = (0..segments.len()).collect();
    // Stable: equal starts keep the order they came in.
    order.sort_by_key(|&i| segments[i].start_ms);

    let mut out = Vec::new();
    let mut words: Vec<String> = Vec::new();
    let mut start_ms = 0i64;
    let mut end_ms = 0i64;
    let mut close = |words: &mut Vec<String>, start_ms: i64, end_ms: i64| {
        if !words.is_empty() {
            out.push(Sentence {
                text: words.join(" "),
                start_ms,
                end_ms: end_ms.max(start_ms),
            });
            words.clear();
        }
    };

    for i in order {
        let seg = &segments[i];
        let text = clean(&seg.text);
        if text.is_empty() {
            continue;
        }
        let seg_start = seg.start_ms;
        let duration = (seg.end_ms - seg.start_ms).max(0) as f64;
        let total_chars = text.chars().count().max(1) as f64;
        let at = |chars: usize| seg_start + (duration * chars as f64 / total_chars).round() as i64;

        let mut offset = 0usize; // in chars
        for word in text.split(' ') {
            let len = word.chars().count();
            if words.is_empty() {
                start_ms = at(offset);
            }
            end_ms = at(offset + len);
            words.push(word.to_string());
            offset += len + 1;
            if ends_sentence(word) || words.len() >= HARD_MAX_WORDS {
                close(&mut words, start_ms, end_ms);
            }
        }
        if words.len() >= SOFT_MAX_WORDS {
            close(&mut words, start_ms, end_ms);
        }
    }
    close(&mut words, start_ms, end_ms);
    out
}

/// Whether a word closes its sentence: terminal punctuation, not an
/// abbreviation such as "Dr." or "e.g.".
fn ends_sentence(word: &str) -> bool {
    let core = word.trim_end_matches(['"', '\'', '”', '’', ')', ']', '»']);
    let Some(last) = core.chars().last() else {
        return false;
    };
    if matches!(last, '!' | '?' | '…' | '。' | '！' | '？') {
        return true;
    }
    if last != '.' {
        return false;
    }
    let stem = core.trim_end_matches('.').to_lowercase();
    const ABBREVIATIONS: &[&str] = &[
        "mr", "mrs", "ms", "dr", "prof", "st", "vs", "e.g", "i.e", "jr", "sr", "approx", "fig",
        "u.s", "cf", "mt", "ft",
    ];
    // "J. Smith" is an initial; "so do I." is not.
    let initial = stem.chars().count() == 1 && stem.chars().all(char::is_alphabetic) && stem != "i";
    !(initial || ABBREVIATIONS.contains(&stem.as_str()))
}

/// A content word: its stem (the identity used for scoring) and the form
/// in which it was written (for titles).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Term {
    pub stem: String,
    pub surface: String,
}

/// Turns text into content terms.
pub(crate) struct Analyzer {
    stemmer: Stemmer,
}

impl Analyzer {
    pub fn new() -> Self {
        Self {
            stemmer: Stemmer::create(Algorithm::English),
        }
    }

    /// The content terms of `text` in order. Words are letters and digits
    /// with inner apostrophes or hyphens; stopwords, speech fillers, single
    /// letters and plain numbers are dropped. Runs of CJK characters, which
    /// have no spaces, become overlapping character pairs.
    pub fn terms(&self, text: &str) -> Vec<Term> {
        let mut out = Vec::new();
        let mut word = String::new();
        let mut cjk = String::new();
        for c in text.chars().chain(std::iter::once(' ')) {
            let c = if c == '’' { '\'' } else { c };
            if is_cjk(c) {
                self.push_word(&mut word, &mut out);
                cjk.push(c);
                continue;
            }
            push_cjk(&mut cjk, &mut out);
            let inner = (c == '\'' || c == '-') && !word.is_empty();
            if c.is_alphanumeric() || inner {
                word.push(c);
            } else {
                self.push_word(&mut word, &mut out);
            }
        }
        out
    }

    fn push_word(&self, word: &mut String, out: &mut Vec<Term>) {
        let surface = word.trim_end_matches(['\'', '-']);
        let surface = surface.strip_suffix("'s").unwrap_or(surface);
        let lower = surface.to_lowercase();
        let keep = lower.chars().count() >= 2
            && !lower.chars().all(|c| c.is_ascii_digit())
            && !stopwords().contains(lower.as_str())
            && !stopwords().contains(lower.replace('\'', "").as_str());
        if keep {
            out.push(Term {
                stem: self.stemmer.stem(&lower).into_owned(),
                surface: surface.to_string(),
            });
        }
        word.clear();
    }
}

fn push_cjk(run: &mut String, out: &mut Vec<Term>) {
    let chars: Vec<char> = run.chars().collect();
    if chars.len() == 1 {
        out.push(Term {
            stem: run.clone(),
            surface: run.clone(),
        });
    }
    for pair in chars.windows(2) {
        let s: String = pair.iter().collect();
        out.push(Term {
            stem: s.clone(),
            surface: s,
        });
    }
    run.clear();
}

fn is_cjk(c: char) -> bool {
    matches!(c,
        '\u{3040}'..='\u{30FF}'   // hiragana, katakana
        | '\u{3400}'..='\u{4DBF}' // CJK extension A
        | '\u{4E00}'..='\u{9FFF}' // CJK unified ideographs
        | '\u{F900}'..='\u{FAFF}')
}

/// English function words plus the fillers of spoken language ("um",
/// "gonna", "you know" parts): they say nothing about the topic.
fn stopwords() -> &'static HashSet<&'static str> {
    static SET: OnceLock<HashSet<&'static str>> = OnceLock::new();
    SET.get_or_init(|| {
        const WORDS: &str = "a about above after again against all almost also although always am among an and another any anybody anyone anything anyway anyways are aren't around as at away back be became because become been before being below between both but by can can't cannot could couldn't did didn't do does doesn't doing don't done down during each either else enough etc even ever every everybody everyone everything few first for from further get gets getting go goes going gone got gotta gonna had hadn't has hasn't have haven't having he he'd he'll he's her here here's hers herself him himself his how how's however i i'd i'll i'm i've if in instead into is isn't it it'd it'll it's its itself just kind kinda know knew last less let let's like likely lot lots made make makes making many may maybe me might mine more most much must my myself need needs never new next no nobody none nor not nothing now of off often oh ok okay on once one ones only onto or other others otherwise our ours ourselves out over own perhaps please pretty probably put quite rather really right said same say saying says see seem seems shall she she'd she'll she's should shouldn't since so some somebody someone something sometimes somewhat soon sort still such sure take than that that's the their theirs them themselves then there there's these they they'd they'll they're they've thing things think this those though through thus to today together too took toward towards try trying two um umm uh uhm under until up upon us use used using very via want wanna was wasn't way we we'd we'll we're we've well went were weren't what what's whatever when where where's whether which while who who's whom whose why will with within without won't would wouldn't yeah yep yes yet you you'd you'll you're you've your yours yourself yourselves hmm huh mhm alright actually basically literally stuff bit lets ll ve re";
        WORDS.split_whitespace().collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(start_ms: i64, end_ms: i64, text: &str) -> TimedText {
        TimedText {
            start_ms,
            end_ms,
            text: text.to_string(),
        }
    }

    #[test]
    fn sentences_keep_times_across_segments() {
        let s = sentences(&[
            seg(0, 4000, "Hello there. This sentence"),
            seg(4000, 8000, "goes on. Dr. Smith agrees!"),
            seg(9000, 9500, "[Music]"),
        ]);
        let texts: Vec<&str> = s.iter().map(|s| s.text.as_str()).collect();
        assert_eq!(
            texts,
            [
                "Hello there.",
                "This sentence goes on.",
                "Dr. Smith agrees!"
            ]
        );
        assert_eq!(s[0].start_ms, 0);
        assert!(s[1].start_ms > 1000 && s[1].start_ms < 4000, "{s:?}");
        assert!(s[2].start_ms > 4000 && s[2].end_ms == 8000, "{s:?}");
    }

    #[test]
    fn unpunctuated_speech_is_cut_at_segment_boundaries() {
        let segs: Vec<TimedText> = (0..10)
            .map(|i| {
                seg(
                    i * 5000,
                    i * 5000 + 5000,
                    "and then we keep talking about the same thing for a while",
                )
            })
            .collect();
        let s = sentences(&segs);
        assert!(s.len() >= 3, "{}", s.len());
        assert!(
            s.iter()
                .all(|s| s.text.split(' ').count() <= HARD_MAX_WORDS)
        );
    }

    #[test]
    fn terms_drop_stopwords_and_stem() {
        let a = Analyzer::new();
        let t: Vec<String> = a
            .terms("Um, we're boiling the pasta's water; it boils at 100 degrees.")
            .into_iter()
            .map(|t| t.stem)
            .collect();
        assert_eq!(t, ["boil", "pasta", "water", "boil", "degre"]);
        let cjk = a.terms("意大利面");
        assert_eq!(cjk.len(), 3);
    }

    #[test]
    fn clean_drops_annotations() {
        assert_eq!(clean("  (applause) "), "");
        assert_eq!(clean("♪ la [Music] la ♪"), "la la");
        assert_eq!(clean("好。然后"), "好。 然后");
    }
}
