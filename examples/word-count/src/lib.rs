//! Example activity `word-count`: counts the words of a UTF-8 text input blob, returns the
//! most frequent ones and writes every word with its count to a CSV output blob.
//!
//! A word is a run of Unicode alphanumeric characters, lowercased. An apostrophe (`'` or
//! `’`) between two alphanumeric characters belongs to the word and is stored as `'`, so
//! "Don’t" and "don't" count as one word.

use std::collections::HashMap;
use std::io::{BufRead, Write};

use bgw_guest::{Context, Error, InputBlob, Result};
use serde::{Deserialize, Serialize};

/// Bytes read between two progress reports and cancellation checks.
const PROGRESS_INTERVAL: u64 = 1024 * 1024;

#[derive(Deserialize)]
struct Payload {
    /// Number of most frequent words in the result.
    #[serde(default = "default_top")]
    top: usize,
}

fn default_top() -> usize {
    10
}

#[derive(Serialize)]
struct WordCount {
    #[cfg(feature = "v2")]
    version: u32,
    total_words: u64,
    unique_words: usize,
    lines: u64,
    bytes: u64,
    top: Vec<WordFrequency>,
    /// Word with the maximum character count, the alphabetically first on a tie. `null` when
    /// the text has no words.
    #[cfg(feature = "v2")]
    longest_word: Option<String>,
}

#[derive(Serialize)]
struct WordFrequency {
    word: String,
    count: u64,
}

/// Totals gathered while reading the text.
#[derive(Default)]
struct Tally {
    counts: HashMap<String, u64>,
    total_words: u64,
    lines: u64,
    bytes: u64,
}

fn word_count(ctx: &mut Context, payload: Payload) -> Result<WordCount> {
    let input = ctx.input().ok_or_else(|| {
        Error::invalid_input(
            "word-count requires an input blob with UTF-8 text, but the task has none",
        )
    })?;
    let tally = count_words(ctx, input)?;

    let frequencies = sort_by_frequency(tally.counts);
    write_csv(ctx, &frequencies)?;

    #[cfg(feature = "v2")]
    let longest_word = longest_word(&frequencies);
    let unique_words = frequencies.len();
    let top = frequencies
        .into_iter()
        .take(payload.top)
        .map(|(word, count)| WordFrequency { word, count })
        .collect();

    Ok(WordCount {
        #[cfg(feature = "v2")]
        version: 2,
        total_words: tally.total_words,
        unique_words,
        lines: tally.lines,
        bytes: tally.bytes,
        top,
        #[cfg(feature = "v2")]
        longest_word,
    })
}

/// Reads the input line by line, counting words, lines and bytes, and reports progress.
fn count_words(ctx: &Context, mut input: InputBlob) -> Result<Tally> {
    let size = input.len();
    let mut tally = Tally::default();
    let mut line = Vec::new();
    let mut next_report = PROGRESS_INTERVAL;

    loop {
        line.clear();
        let read = input.read_until(b'\n', &mut line)?;
        if read == 0 {
            break;
        }

        let text = std::str::from_utf8(&line).map_err(|error| {
            Error::invalid_input(format!(
                "input blob is not valid UTF-8: invalid byte at offset {} (line {})",
                tally.bytes + error.valid_up_to() as u64,
                tally.lines + 1
            ))
        })?;
        tally.total_words += add_words(text, &mut tally.counts);
        tally.lines += 1;
        tally.bytes += read as u64;

        if tally.bytes >= next_report {
            next_report = tally.bytes + PROGRESS_INTERVAL;
            report_progress(ctx, tally.bytes, size)?;
        }
    }

    ctx.progress(100, &format!("read {} bytes", tally.bytes));
    Ok(tally)
}

fn report_progress(ctx: &Context, read: u64, size: u64) -> Result<()> {
    if ctx.is_cancelled() {
        return Err(Error::failed(format!(
            "task was cancelled after reading {read} of {size} bytes"
        )));
    }
    let percent = (read.saturating_mul(100) / size.max(1)).min(99) as u8;
    ctx.progress(percent, &format!("read {read} of {size} bytes"));
    Ok(())
}

/// Adds each word of `text` to `counts` and returns how many words it had.
fn add_words(text: &str, counts: &mut HashMap<String, u64>) -> u64 {
    let mut added = 0;
    let mut word = String::new();
    let mut apostrophe_pending = false;

    for c in text.chars() {
        if c.is_alphanumeric() {
            if apostrophe_pending {
                word.push('\'');
                apostrophe_pending = false;
            }
            word.extend(c.to_lowercase());
        } else if is_apostrophe(c) && !word.is_empty() && !apostrophe_pending {
            // Kept only if an alphanumeric character follows.
            apostrophe_pending = true;
        } else {
            apostrophe_pending = false;
            added += finish_word(&mut word, counts);
        }
    }
    added + finish_word(&mut word, counts)
}

fn is_apostrophe(c: char) -> bool {
    c == '\'' || c == '\u{2019}'
}

/// Counts `word` if it is not empty and clears it. Returns 1 when a word was counted.
fn finish_word(word: &mut String, counts: &mut HashMap<String, u64>) -> u64 {
    if word.is_empty() {
        return 0;
    }
    match counts.get_mut(word.as_str()) {
        Some(count) => *count += 1,
        None => {
            counts.insert(word.clone(), 1);
        }
    }
    word.clear();
    1
}

/// Sorts by count, highest first, then by word in code point order.
fn sort_by_frequency(counts: HashMap<String, u64>) -> Vec<(String, u64)> {
    let mut frequencies: Vec<(String, u64)> = counts.into_iter().collect();
    frequencies.sort_unstable_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    frequencies
}

/// Writes `word,count` and one row per word to the output blob. Words contain only
/// alphanumeric characters and apostrophes, so no field needs CSV quoting.
fn write_csv(ctx: &Context, frequencies: &[(String, u64)]) -> Result<()> {
    let mut output = ctx.output();
    output.write_all(b"word,count\n")?;
    for (word, count) in frequencies {
        writeln!(output, "{word},{count}")?;
    }
    output.flush()?;
    Ok(())
}

#[cfg(feature = "v2")]
fn longest_word(frequencies: &[(String, u64)]) -> Option<String> {
    frequencies
        .iter()
        .map(|(word, _)| word)
        .max_by(|a, b| {
            let by_length = a.chars().count().cmp(&b.chars().count());
            by_length.then_with(|| b.cmp(a))
        })
        .cloned()
}

bgw_guest::export_activity!(word_count);

// Native tests: `cargo test -p word-count --target x86_64-unknown-linux-gnu`.
#[cfg(test)]
mod tests {
    use super::*;

    fn counts_of(text: &str) -> (u64, Vec<(String, u64)>) {
        let mut counts = HashMap::new();
        let total = add_words(text, &mut counts);
        (total, sort_by_frequency(counts))
    }

    fn pairs(expected: &[(&str, u64)]) -> Vec<(String, u64)> {
        expected.iter().map(|(w, c)| (w.to_string(), *c)).collect()
    }

    #[test]
    fn words_are_lowercased_and_sorted() {
        let (total, frequencies) = counts_of("The cat saw the Dog; the dog ran.");
        assert_eq!(total, 8);
        assert_eq!(
            frequencies,
            pairs(&[("the", 3), ("dog", 2), ("cat", 1), ("ran", 1), ("saw", 1)])
        );
    }

    #[test]
    fn inner_apostrophes_stay_in_word() {
        let (_, frequencies) = counts_of("Don’t don't 'quoted' dogs' rock''n");
        assert_eq!(
            frequencies,
            pairs(&[
                ("don't", 2),
                ("dogs", 1),
                ("n", 1),
                ("quoted", 1),
                ("rock", 1)
            ])
        );
    }

    #[test]
    fn unicode_letters_and_digits_form_words() {
        let (total, frequencies) = counts_of("Ärger über 42 Äpfel, ÄRGER!");
        assert_eq!(total, 5);
        assert_eq!(
            frequencies,
            pairs(&[("ärger", 2), ("42", 1), ("äpfel", 1), ("über", 1)])
        );
    }

    #[test]
    fn text_without_words_counts_zero() {
        let (total, frequencies) = counts_of(" -- ' ... ");
        assert_eq!(total, 0);
        assert!(frequencies.is_empty());
    }

    #[cfg(feature = "v2")]
    #[test]
    fn longest_word_breaks_ties_alphabetically() {
        let (_, frequencies) = counts_of("bbb aaa cc");
        assert_eq!(longest_word(&frequencies).as_deref(), Some("aaa"));
    }
}
