//! Word error rate: how far a transcript is from what was said, for tests
//! and benchmarks, and the word normalisation the stitcher matches on.

/// Splits text into normalised words: lowercase, apostrophes dropped
/// (`Don't` = `dont`), every other non-alphanumeric character a separator
/// (so `well-known` = `well known`, and punctuation disappears).
pub fn normalize_words(text: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut current = String::new();
    for c in text.chars() {
        if c.is_alphanumeric() {
            current.extend(c.to_lowercase());
        } else if c == '\'' || c == '\u{2019}' {
            // Part of the word; dropping it makes "don't" and "dont" equal.
        } else if !current.is_empty() {
            words.push(std::mem::take(&mut current));
        }
    }
    if !current.is_empty() {
        words.push(current);
    }
    words
}

/// Word error rate of `hypothesis` against `reference`: the fewest word
/// substitutions, deletions and insertions that turn one into the other
/// (Levenshtein over normalised words), divided by the reference's word
/// count. 0.0 is perfect; it can exceed 1.0 when the hypothesis adds many
/// words. An empty reference gives 0.0 for an empty hypothesis, else 1.0.
pub fn word_error_rate(reference: &str, hypothesis: &str) -> f64 {
    let r = normalize_words(reference);
    let h = normalize_words(hypothesis);
    if r.is_empty() {
        return if h.is_empty() { 0.0 } else { 1.0 };
    }
    // One row of the edit-distance table at a time.
    let mut previous: Vec<usize> = (0..=h.len()).collect();
    let mut current = vec![0; h.len() + 1];
    for (i, rw) in r.iter().enumerate() {
        current[0] = i + 1;
        for (j, hw) in h.iter().enumerate() {
            let substitution = previous[j] + usize::from(rw != hw);
            current[j + 1] = substitution.min(previous[j + 1] + 1).min(current[j] + 1);
        }
        std::mem::swap(&mut previous, &mut current);
    }
    previous[h.len()] as f64 / r.len() as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalisation_ignores_case_and_punctuation() {
        assert_eq!(
            normalize_words("Don't stop -- it's WELL-known, ok?"),
            vec!["dont", "stop", "its", "well", "known", "ok"]
        );
        assert!(normalize_words(" ... ").is_empty());
    }

    #[test]
    fn identical_text_has_no_errors() {
        assert_eq!(word_error_rate("The cat sat.", "the cat  sat"), 0.0);
    }

    #[test]
    fn substitutions_deletions_and_insertions_count_once_each() {
        // One substitution in four words.
        assert_eq!(
            word_error_rate("the cat sat down", "the bat sat down"),
            0.25
        );
        // One deletion.
        assert_eq!(word_error_rate("the cat sat down", "the cat down"), 0.25);
        // Two insertions.
        assert_eq!(
            word_error_rate("the cat sat down", "oh the cat sat down now"),
            0.5
        );
        // Everything wrong, and more.
        assert_eq!(word_error_rate("a b", "c d e f"), 2.0);
    }

    #[test]
    fn empty_references() {
        assert_eq!(word_error_rate("", ""), 0.0);
        assert_eq!(word_error_rate("", "words"), 1.0);
        assert_eq!(word_error_rate("two words", ""), 1.0);
    }
}
