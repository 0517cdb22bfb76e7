//! The extractive summarizer: the offline default, pure CPU, deterministic.
//!
//! 1. The transcript is split into timed sentences ([`super::text`]).
//! 2. Each sentence becomes a TF-IDF vector over stemmed content words
//!    (stopwords and speech fillers removed), sentences being the documents.
//! 3. Centrality is TextRank: PageRank over a cosine-similarity graph in
//!    which each sentence keeps its strongest neighbours (so the graph stays
//!    O(n·k) however long the talk). It is weighted by priors: very short
//!    sentences ("Okay, so.") and very long run-ons score less, the opening
//!    scores a little more, questions a little less.
//! 4. Chapters come from topic shifts, TextTiling-style: the cosine between
//!    the windows of sentences before and after each gap, smoothed; gaps at
//!    deep valleys become boundaries, deepest first, as long as every
//!    chapter stays at least `min_chapter_ms` long.
//! 5. The summary and the key points are picked by maximal marginal
//!    relevance: high score, little overlap with what was already picked,
//!    so that near-duplicates are never picked twice and the picks spread
//!    over the chapters.
//!
//! Cost: building the similarity graph is O(Σ df²) over terms (at worst
//! O(n²) in sentences), everything else is O(n·k); a 25-minute talk takes
//! milliseconds.

use std::collections::HashMap;

use super::text::{self, Analyzer, Sentence};
use super::{Chapter, KeyPoint, Summary, TimedText};

/// The `backend` name in the summaries this module writes.
pub const BACKEND: &str = "extractive";

/// How much the extractive summarizer picks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtractiveOptions {
    /// Sentences in the summary paragraph.
    pub summary_sentences: usize,
    /// Key points, besides the summary's sentences.
    pub key_points: usize,
    /// The shortest chapter; also what stops a short talk from being cut up.
    pub min_chapter_ms: i64,
    /// At most this many chapters (1 = no chapter boundaries).
    pub max_chapters: usize,
}

impl Default for ExtractiveOptions {
    fn default() -> Self {
        Self {
            summary_sentences: 5,
            key_points: 8,
            min_chapter_ms: 60_000,
            max_chapters: 12,
        }
    }
}

/// PageRank damping, as in TextRank.
const DAMPING: f64 = 0.85;
/// Neighbours each sentence keeps in the similarity graph.
const NEIGHBOURS: usize = 40;
/// Trade-off between relevance and novelty when picking sentences.
const MMR_LAMBDA: f64 = 0.7;
/// Cosine at or above which two sentences count as saying the same thing.
const DUPLICATE_COSINE: f64 = 0.6;
/// Valleys shallower than this are noise, not topic shifts.
const MIN_DEPTH: f64 = 0.05;

/// Summarises a transcript without a model. Deterministic: the same input
/// gives the same summary. A transcript without words gives the
/// [`super::NO_SPEECH`] summary.
pub fn extractive(segments: &[TimedText], opts: &ExtractiveOptions) -> Summary {
    let sentences: Vec<Sentence> = text::sentences(segments)
        .into_iter()
        .filter(|s| s.text.chars().any(char::is_alphanumeric))
        .collect();
    if sentences.is_empty() {
        return Summary::no_speech(BACKEND);
    }
    let doc = Doc::new(&sentences);
    let scores = doc.scores();
    let starts = doc.chapter_starts(opts);
    let chapter_of = chapter_index(&starts, sentences.len());

    let picks = doc.pick(
        &scores,
        &chapter_of,
        opts.summary_sentences,
        opts.key_points,
    );
    let mut summary_idx: Vec<usize> = picks.iter().copied().take(opts.summary_sentences).collect();
    let mut point_idx: Vec<usize> = picks.iter().copied().skip(opts.summary_sentences).collect();
    summary_idx.sort_unstable();
    point_idx.sort_unstable();

    let summary = summary_idx
        .iter()
        .map(|&i| with_period(&sentences[i].text))
        .collect::<Vec<_>>()
        .join(" ");
    let key_points = point_idx
        .iter()
        .map(|&i| KeyPoint {
            text: with_period(&sentences[i].text),
            start_ms: sentences[i].start_ms,
        })
        .collect();
    let chapters = doc.chapters(&starts);

    Summary {
        summary,
        key_points,
        chapters,
        language: None,
        backend: BACKEND.to_string(),
    }
}

/// Sentences from unpunctuated ASR get a full stop, so that the summary
/// reads as a paragraph.
fn with_period(s: &str) -> String {
    let s = s.trim();
    match s.chars().last() {
        Some(c) if c.is_alphanumeric() => format!("{s}."),
        _ => s.to_string(),
    }
}

/// For each sentence, the index of its chapter.
fn chapter_index(starts: &[usize], n: usize) -> Vec<usize> {
    let mut out = vec![0; n];
    for (c, &start) in starts.iter().enumerate() {
        let end = starts.get(c + 1).copied().unwrap_or(n);
        for slot in &mut out[start..end] {
            *slot = c;
        }
    }
    out
}

/// A sparse vector: (term id, weight), sorted by term id.
type Sparse = Vec<(u32, f64)>;

fn dot(a: &Sparse, b: &Sparse) -> f64 {
    let (mut i, mut j, mut sum) = (0, 0, 0.0);
    while i < a.len() && j < b.len() {
        match a[i].0.cmp(&b[j].0) {
            std::cmp::Ordering::Less => i += 1,
            std::cmp::Ordering::Greater => j += 1,
            std::cmp::Ordering::Equal => {
                sum += a[i].1 * b[j].1;
                i += 1;
                j += 1;
            }
        }
    }
    sum
}

/// The analysed transcript.
struct Doc<'a> {
    sentences: &'a [Sentence],
    /// Unit-length TF-IDF vector per sentence (empty without content words).
    vectors: Vec<Sparse>,
    /// Raw term counts per sentence, sorted by term id.
    counts: Vec<Vec<(u32, u32)>>,
    idf: Vec<f64>,
    /// The most frequent written form of each term, for titles.
    surfaces: Vec<String>,
    /// Words per sentence.
    words: Vec<usize>,
    /// Letters and digits of each sentence, lowercased: spots exact repeats.
    normalized: Vec<String>,
}

impl<'a> Doc<'a> {
    fn new(sentences: &'a [Sentence]) -> Self {
        let analyzer = Analyzer::new();
        let mut vocab: HashMap<String, u32> = HashMap::new();
        let mut forms: Vec<HashMap<String, usize>> = Vec::new();
        let mut counts = Vec::with_capacity(sentences.len());
        for s in sentences {
            let mut ids: Vec<u32> = Vec::new();
            for term in analyzer.terms(&s.text) {
                let next = vocab.len() as u32;
                let id = *vocab.entry(term.stem).or_insert(next);
                if id == next {
                    forms.push(HashMap::new());
                }
                *forms[id as usize].entry(term.surface).or_insert(0) += 1;
                ids.push(id);
            }
            ids.sort_unstable();
            let mut c: Vec<(u32, u32)> = Vec::new();
            for id in ids {
                match c.last_mut() {
                    Some((last, n)) if *last == id => *n += 1,
                    _ => c.push((id, 1)),
                }
            }
            counts.push(c);
        }

        let n = sentences.len() as f64;
        let mut df = vec![0u32; vocab.len()];
        for c in &counts {
            for &(t, _) in c {
                df[t as usize] += 1;
            }
        }
        let idf: Vec<f64> = df
            .iter()
            .map(|&d| ((1.0 + n) / (1.0 + f64::from(d))).ln() + 1.0)
            .collect();
        let vectors = counts
            .iter()
            .map(|c| {
                let mut v: Sparse = c
                    .iter()
                    .map(|&(t, k)| (t, (1.0 + f64::from(k).ln()) * idf[t as usize]))
                    .collect();
                let norm = v.iter().map(|(_, w)| w * w).sum::<f64>().sqrt();
                if norm > 0.0 {
                    v.iter_mut().for_each(|(_, w)| *w /= norm);
                }
                v
            })
            .collect();
        // Ties go to the alphabetically first form, for determinism.
        let surfaces = forms
            .into_iter()
            .map(|f| {
                f.into_iter()
                    .max_by(|a, b| a.1.cmp(&b.1).then_with(|| b.0.cmp(&a.0)))
                    .map(|(form, _)| form)
                    .unwrap_or_default()
            })
            .collect();
        Self {
            sentences,
            vectors,
            counts,
            idf,
            surfaces,
            words: sentences
                .iter()
                .map(|s| s.text.split(' ').count())
                .collect(),
            normalized: sentences
                .iter()
                .map(|s| {
                    s.text
                        .chars()
                        .filter(|c| c.is_alphanumeric())
                        .flat_map(char::to_lowercase)
                        .collect()
                })
                .collect(),
        }
    }

    fn len(&self) -> usize {
        self.sentences.len()
    }

    /// How much a sentence's length says about its worth: almost nothing
    /// is said in fewer than three content words, and a run-on of fifty
    /// words is a poor summary sentence.
    fn length_prior(&self, i: usize) -> f64 {
        let content = self.vectors[i].len();
        let base = match content {
            0 => 0.0,
            1 | 2 => 0.3,
            c => (c as f64 / 6.0).min(1.0),
        };
        let words = self.words[i] as f64;
        if words > 45.0 {
            base * 45.0 / words
        } else {
            base
        }
    }

    /// Final score per sentence: centrality times the priors.
    fn scores(&self) -> Vec<f64> {
        let n = self.len();
        let centrality = self.textrank();
        (0..n)
            .map(|i| {
                let position = if n > 1 {
                    i as f64 / (n - 1) as f64
                } else {
                    0.0
                };
                // Talks tend to say what they are about at the start.
                let lead = 1.0 + 0.2 * (1.0 - position / 0.15).max(0.0);
                let question = if self.sentences[i].text.ends_with('?') {
                    0.8
                } else {
                    1.0
                };
                (0.15 + 0.85 * centrality[i]) * self.length_prior(i) * lead * question
            })
            .collect()
    }

    /// TextRank centrality in [0, 1] (1 = the most central sentence).
    fn textrank(&self) -> Vec<f64> {
        let n = self.len();
        if n < 2 {
            return vec![1.0; n];
        }
        let mut postings: Vec<Vec<(u32, f64)>> = vec![Vec::new(); self.idf.len()];
        for (i, v) in self.vectors.iter().enumerate() {
            for &(t, w) in v {
                postings[t as usize].push((i as u32, w));
            }
        }
        // Similarities row by row through the inverted index, keeping each
        // sentence's strongest neighbours; edges go both ways.
        let mut acc = vec![0.0f64; n];
        let mut touched: Vec<u32> = Vec::new();
        let mut edges: Vec<(u32, u32, f64)> = Vec::new();
        for (i, v) in self.vectors.iter().enumerate() {
            for &(t, w) in v {
                for &(j, wj) in &postings[t as usize] {
                    if j as usize != i {
                        if acc[j as usize] == 0.0 {
                            touched.push(j);
                        }
                        acc[j as usize] += w * wj;
                    }
                }
            }
            touched.sort_unstable_by(|&a, &b| {
                acc[b as usize].total_cmp(&acc[a as usize]).then(a.cmp(&b))
            });
            for &j in touched.iter().take(NEIGHBOURS) {
                let w = acc[j as usize];
                edges.push((i as u32, j, w));
                edges.push((j, i as u32, w));
            }
            for j in touched.drain(..) {
                acc[j as usize] = 0.0;
            }
        }
        edges.sort_unstable_by_key(|e| (e.0, e.1));
        edges.dedup_by(|a, b| a.0 == b.0 && a.1 == b.1);

        let mut out_weight = vec![0.0f64; n];
        for &(i, _, w) in &edges {
            out_weight[i as usize] += w;
        }
        let mut rank = vec![1.0 / n as f64; n];
        let mut next = vec![0.0f64; n];
        for _ in 0..100 {
            next.iter_mut()
                .for_each(|r| *r = (1.0 - DAMPING) / n as f64);
            for &(i, j, w) in &edges {
                next[j as usize] += DAMPING * rank[i as usize] * w / out_weight[i as usize];
            }
            let change: f64 = rank.iter().zip(&next).map(|(a, b)| (a - b).abs()).sum();
            std::mem::swap(&mut rank, &mut next);
            if change < 1e-9 {
                break;
            }
        }
        let max = rank.iter().copied().fold(0.0, f64::max);
        if max > 0.0 {
            rank.iter_mut().for_each(|r| *r /= max);
        }
        rank
    }

    /// Picks `summary + points` sentences by maximal marginal relevance, in
    /// order of picking. Near-duplicates of a pick are never picked;
    /// sentences without content words only when nothing else is left for
    /// the summary.
    fn pick(
        &self,
        scores: &[f64],
        chapter_of: &[usize],
        summary: usize,
        points: usize,
    ) -> Vec<usize> {
        let n = self.len();
        let max_score = scores.iter().copied().fold(0.0, f64::max);
        let norm = if max_score > 0.0 { max_score } else { 1.0 };
        let mut max_sim = vec![0.0f64; n];
        let mut blocked = vec![false; n];
        let mut per_chapter: HashMap<usize, usize> = HashMap::new();
        let mut picks: Vec<usize> = Vec::new();
        while picks.len() < summary + points {
            let for_summary = picks.len() < summary;
            let best = (0..n)
                .filter(|&i| !blocked[i])
                .filter(|&i| !self.vectors[i].is_empty() || (for_summary && picks.is_empty()))
                .map(|i| {
                    let spread = per_chapter.get(&chapter_of[i]).copied().unwrap_or(0) as f64;
                    let value = MMR_LAMBDA * scores[i] / norm
                        - (1.0 - MMR_LAMBDA) * max_sim[i]
                        - 0.05 * spread;
                    (i, value)
                })
                // Highest value; the earlier sentence on ties.
                .max_by(|a, b| a.1.total_cmp(&b.1).then(b.0.cmp(&a.0)));
            let Some((p, _)) = best else { break };
            picks.push(p);
            *per_chapter.entry(chapter_of[p]).or_insert(0) += 1;
            for i in 0..n {
                if blocked[i] {
                    continue;
                }
                let sim = dot(&self.vectors[i], &self.vectors[p]);
                max_sim[i] = max_sim[i].max(sim);
                if i == p || sim >= DUPLICATE_COSINE || self.normalized[i] == self.normalized[p] {
                    blocked[i] = true;
                }
            }
        }
        picks
    }

    /// The first sentence of each chapter (always starting with 0).
    fn chapter_starts(&self, opts: &ExtractiveOptions) -> Vec<usize> {
        let n = self.len();
        if opts.max_chapters <= 1 || n < 6 {
            return vec![0];
        }
        let depths = self.valley_depths();
        // Candidates: local minima of the smoothed similarity, deeper than
        // the mean valley (TextTiling's cut-off) and than the noise floor.
        let mut candidates: Vec<(usize, f64)> = depths
            .iter()
            .enumerate()
            .filter_map(|(g, d)| d.map(|d| (g, d)))
            .collect();
        if candidates.is_empty() {
            return vec![0];
        }
        let mean = candidates.iter().map(|c| c.1).sum::<f64>() / candidates.len() as f64;
        let cutoff = mean.max(MIN_DEPTH);
        candidates.retain(|c| c.1 >= cutoff);
        candidates.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));

        let last_ms = self.end_ms();
        let min_ms = opts.min_chapter_ms.max(0);
        let mut starts: Vec<usize> = vec![0];
        for (g, _) in candidates {
            if starts.len() >= opts.max_chapters {
                break;
            }
            let at = starts.partition_point(|&s| s < g);
            let prev = starts[at - 1];
            let next = starts.get(at).copied();
            let t = self.sentences[g].start_ms;
            let prev_ms = self.sentences[prev].start_ms;
            let next_ms = next.map_or(last_ms, |s| self.sentences[s].start_ms);
            let next_idx = next.unwrap_or(n);
            // At least two sentences and min_chapter_ms on either side.
            if g - prev >= 2 && next_idx - g >= 2 && t - prev_ms >= min_ms && next_ms - t >= min_ms
            {
                starts.insert(at, g);
            }
        }
        starts
    }

    /// For each gap g (between sentences g-1 and g), the depth of the
    /// valley in lexical cohesion there, if g is a local minimum.
    fn valley_depths(&self) -> Vec<Option<f64>> {
        let n = self.len();
        let w = (n / 10).clamp(3, 8);
        let vocab = self.idf.len();
        let (mut left, mut right) = (vec![0.0f64; vocab], vec![0.0f64; vocab]);
        let (mut lt, mut rt): (Vec<u32>, Vec<u32>) = (Vec::new(), Vec::new());
        let add = |acc: &mut Vec<f64>, touched: &mut Vec<u32>, v: &Sparse| {
            for &(t, x) in v {
                if acc[t as usize] == 0.0 {
                    touched.push(t);
                }
                acc[t as usize] += x;
            }
        };
        // Cohesion across each gap: cosine of the summed sentence vectors
        // of the windows on either side (index 0 is unused).
        let mut cohesion = vec![0.0f64; n];
        for (g, slot) in cohesion.iter_mut().enumerate().skip(1) {
            for v in &self.vectors[g.saturating_sub(w)..g] {
                add(&mut left, &mut lt, v);
            }
            for v in &self.vectors[g..(g + w).min(n)] {
                add(&mut right, &mut rt, v);
            }
            let dot: f64 = lt
                .iter()
                .map(|&t| left[t as usize] * right[t as usize])
                .sum();
            let nl: f64 = lt.iter().map(|&t| left[t as usize].powi(2)).sum();
            let nr: f64 = rt.iter().map(|&t| right[t as usize].powi(2)).sum();
            *slot = if nl > 0.0 && nr > 0.0 {
                dot / (nl.sqrt() * nr.sqrt())
            } else {
                0.0
            };
            for t in lt.drain(..) {
                left[t as usize] = 0.0;
            }
            for t in rt.drain(..) {
                right[t as usize] = 0.0;
            }
        }
        // Smoothing over three gaps removes single-sentence dips.
        let smooth: Vec<f64> = (0..n)
            .map(|g| {
                if g == 0 {
                    return 0.0;
                }
                let (a, b) = (g.saturating_sub(1).max(1), (g + 1).min(n - 1));
                cohesion[a..=b].iter().sum::<f64>() / (b - a + 1) as f64
            })
            .collect();
        // Depth: how far the cohesion climbs back up on both sides.
        (0..n)
            .map(|g| {
                if g == 0 {
                    return None;
                }
                let s = smooth[g];
                let is_min = (g == 1 || smooth[g - 1] >= s) && (g == n - 1 || smooth[g + 1] >= s);
                if !is_min {
                    return None;
                }
                let mut l = g;
                while l > 1 && smooth[l - 1] >= smooth[l] {
                    l -= 1;
                }
                let mut r = g;
                while r < n - 1 && smooth[r + 1] >= smooth[r] {
                    r += 1;
                }
                let depth = (smooth[l] - s) + (smooth[r] - s);
                (depth > 0.0).then_some(depth)
            })
            .collect()
    }

    fn end_ms(&self) -> i64 {
        self.sentences.iter().map(|s| s.end_ms).max().unwrap_or(0)
    }

    /// Chapters from their first sentences: contiguous, titled by their
    /// most distinctive words, summarised by their most central sentence.
    fn chapters(&self, starts: &[usize]) -> Vec<Chapter> {
        let n = self.len();
        let mut total = vec![0u32; self.idf.len()];
        for c in &self.counts {
            for &(t, k) in c {
                total[t as usize] += k;
            }
        }
        let end_ms = self.end_ms();
        starts
            .iter()
            .enumerate()
            .map(|(c, &first)| {
                let last = starts.get(c + 1).copied().unwrap_or(n);
                let start_ms = if c == 0 {
                    self.sentences[0].start_ms
                } else {
                    self.sentences[first].start_ms
                };
                let end = starts
                    .get(c + 1)
                    .map_or(end_ms, |&s| self.sentences[s].start_ms);
                Chapter {
                    start_ms,
                    end_ms: end.max(start_ms),
                    title: self.title(first..last, &total, c + 1),
                    summary: with_period(&self.sentences[self.central(first..last)].text),
                }
            })
            .collect()
    }

    /// Two to four capitalised keywords: frequent in the chapter, rare
    /// elsewhere (tf · idf · the share of the word's uses in this chapter).
    fn title(&self, range: std::ops::Range<usize>, total: &[u32], number: usize) -> String {
        let mut tf: HashMap<u32, u32> = HashMap::new();
        for c in &self.counts[range] {
            for &(t, k) in c {
                *tf.entry(t).or_insert(0) += k;
            }
        }
        let mut ranked: Vec<(u32, bool, f64)> = tf
            .into_iter()
            .map(|(t, k)| {
                let k = f64::from(k);
                let share = k / f64::from(total[t as usize].max(1));
                (t, k >= 2.0, k * self.idf[t as usize] * share)
            })
            .collect();
        // Words said at least twice first, then by score, then by id so
        // that the order never depends on the hash map.
        ranked.sort_by(|a, b| b.1.cmp(&a.1).then(b.2.total_cmp(&a.2)).then(a.0.cmp(&b.0)));
        let mut words: Vec<String> = Vec::new();
        for (t, _, _) in ranked {
            let word = capitalise(&self.surfaces[t as usize]);
            if !words.iter().any(|w| w.eq_ignore_ascii_case(&word)) {
                words.push(word);
            }
            if words.len() == 3 {
                break;
            }
        }
        if words.is_empty() {
            format!("Part {number}")
        } else {
            words.join(", ")
        }
    }

    /// The sentence closest to the centroid of its range, weighted by the
    /// length prior.
    fn central(&self, range: std::ops::Range<usize>) -> usize {
        let mut centroid: HashMap<u32, f64> = HashMap::new();
        for v in &self.vectors[range.clone()] {
            for &(t, w) in v {
                *centroid.entry(t).or_insert(0.0) += w;
            }
        }
        let mut best = (range.start, f64::MIN);
        for i in range {
            let sim: f64 = self.vectors[i]
                .iter()
                .map(|(t, w)| w * centroid.get(t).copied().unwrap_or(0.0))
                .sum();
            let value = sim * self.length_prior(i);
            if value > best.1 {
                best = (i, value);
            }
        }
        best.0
    }
}

fn capitalise(word: &str) -> String {
    let mut chars = word.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn transcript(sentences: &[&str], ms_each: i64) -> Vec<TimedText> {
        sentences
            .iter()
            .enumerate()
            .map(|(i, s)| TimedText {
                start_ms: i as i64 * ms_each,
                end_ms: (i as i64 + 1) * ms_each,
                text: s.to_string(),
            })
            .collect()
    }

    #[test]
    fn no_words_is_no_speech() {
        for segs in [
            Vec::new(),
            transcript(&["", "  ", "[Music]", "♪ ♪", "..."], 1000),
        ] {
            let s = extractive(&segs, &ExtractiveOptions::default());
            assert_eq!(s.summary, super::super::NO_SPEECH);
            assert!(s.key_points.is_empty() && s.chapters.is_empty());
        }
    }

    #[test]
    fn single_sentence() {
        let segs = transcript(&["Welcome to the channel about woodworking"], 4000);
        let s = extractive(&segs, &ExtractiveOptions::default());
        assert_eq!(s.summary, "Welcome to the channel about woodworking.");
        assert!(s.key_points.is_empty());
        assert_eq!(s.chapters.len(), 1);
        assert_eq!((s.chapters[0].start_ms, s.chapters[0].end_ms), (0, 4000));
        assert!(
            s.chapters[0].title.contains("Woodworking"),
            "{}",
            s.chapters[0].title
        );
    }

    #[test]
    fn only_fillers_still_summarised() {
        let segs = transcript(&["Okay.", "Yeah, right.", "Um."], 1000);
        let s = extractive(&segs, &ExtractiveOptions::default());
        assert!(!s.summary.is_empty());
        assert_ne!(s.summary, super::super::NO_SPEECH);
        assert!(s.key_points.is_empty());
        assert_eq!(s.chapters.len(), 1);
    }

    #[test]
    fn repeated_sentences_are_not_picked_twice() {
        let mut lines = vec!["The river floods the valley every spring."; 6];
        lines.extend([
            "Farmers plant rice after the water recedes.",
            "Fish spawn in the flooded fields.",
        ]);
        let s = extractive(&transcript(&lines, 3000), &ExtractiveOptions::default());
        let all: Vec<&str> = std::iter::once(s.summary.as_str())
            .chain(s.key_points.iter().map(|k| k.text.as_str()))
            .collect();
        let joined = all.join(" ");
        assert_eq!(joined.matches("The river floods").count(), 1, "{joined}");
    }

    #[test]
    fn deterministic() {
        let lines: Vec<String> = (0..60)
            .map(|i| {
                format!(
                    "Sentence {i} talks about topic {} and detail {}.",
                    ["alpha", "beta", "gamma"][i % 3],
                    i % 7
                )
            })
            .collect();
        let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
        let segs = transcript(&refs, 5000);
        let opts = ExtractiveOptions {
            min_chapter_ms: 20_000,
            ..Default::default()
        };
        let a = extractive(&segs, &opts);
        for _ in 0..3 {
            assert_eq!(extractive(&segs, &opts), a);
        }
    }
}
