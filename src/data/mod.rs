//! From files (or the built-in synthetic corpus) to a [`TokenStore`].
//!
//! The pipeline, in order (one file per stage):
//! 1. `cache`: hash the inputs (file contents, tokenizer) and settings into a key; if
//!    `cache_dir/<key>` exists, memory-map it and stop there.
//! 2. `reader`: each non-blank JSONL line becomes a `Record` (a JSON object and its file:line);
//!    a format's `Reader` turns it into a [`Document`] of content tokens and label bits:
//!    `text`, `prompt_completion` (tokenised by `tokenizer`), `chat` (rendered by its template,
//!    tokenised with offsets), `token_ids`. Or `synthetic` generates the documents.
//! 3. `tokenizer::Specials`: BOS before, EOS after each non-empty document (text formats only).
//! 4. `limits`: token ids checked against the vocabulary, empty documents skipped, long ones
//!    split, truncated or dropped, everything counted in a [`DataReport`].
//! 5. `cache`: the store is written to a temporary directory in `cache_dir`, renamed into place
//!    and memory-mapped.

mod cache;
pub mod chat;
mod limits;
mod prompt_completion;
mod reader;
mod store;
mod synthetic;
mod text;
mod token_ids;
mod tokenizer;

pub use cache::{cache_key, CACHE_FORMAT_VERSION};
pub use store::{DataReport, Document, TokenStore};
pub use synthetic::synthetic_lengths;

use std::path::{Path, PathBuf};

use crate::config::{Config, DataFormat};

/// A data error names the file (and line) or the cache directory at fault.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    // ---- files and the cache ----
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("token cache {path}: {message}")]
    Cache { path: PathBuf, message: String },

    // ---- one JSONL record ----
    #[error("{path}:{line}: malformed JSON: {message}")]
    Json {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("{path}:{line}: missing field `{field}`")]
    MissingField {
        path: PathBuf,
        line: usize,
        field: &'static str,
    },
    #[error("{path}:{line}: field `{field}` {message}")]
    BadField {
        path: PathBuf,
        line: usize,
        field: &'static str,
        message: String,
    },
    #[error(
        "{path}:{line}: token id {id} is out of the vocabulary (must be < model.vocab_size = {vocab})"
    )]
    TokenOutOfVocab {
        path: PathBuf,
        line: usize,
        id: u64,
        vocab: usize,
    },
    #[error(
        "{path}:{line}: labels[{index}] = {label} but input_ids[{index}] = {input_id} \
         (a label must be -100 or equal its input id)"
    )]
    LabelMismatch {
        path: PathBuf,
        line: usize,
        index: usize,
        label: i64,
        input_id: u32,
    },
    #[error("{path}:{line}: {labels} labels for {input_ids} input_ids (must be as many)")]
    LabelCount {
        path: PathBuf,
        line: usize,
        labels: usize,
        input_ids: usize,
    },

    // ---- the tokenizer ----
    #[error("tokenizer file {path} not found (data.tokenizer)")]
    TokenizerMissing { path: PathBuf },
    #[error("tokenizer {path}: {message}")]
    Tokenizer { path: PathBuf, message: String },
    #[error("{path}:{line}: tokenizer failed: {message}")]
    Tokenize {
        path: PathBuf,
        line: usize,
        message: String,
    },

    // ---- the corpus as a whole ----
    #[error("synthetic corpus: {message}")]
    Synthetic { message: String },
    #[error(
        "no documents left: {docs_read} read, {empty_skipped} empty, {dropped} dropped as longer \
         than data.max_doc_tokens = {limit}"
    )]
    NoDocuments {
        docs_read: u64,
        empty_skipped: u64,
        dropped: u64,
        limit: usize,
    },
}

impl DataError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        DataError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Build (or reuse from the cache) the token store a config describes, and log its report.
///
/// The store is memory-mapped from `data.cache_dir/<cache_key>`. Ranks that load the same
/// config at once may each build it; the first rename wins and the others map that one.
pub fn load(config: &Config) -> Result<TokenStore, DataError> {
    let (store, built) = cache::load_or_build(config, || build(config))?;
    let r = store.report();
    tracing::info!(
        cache = %store.dir().map(|d| d.display().to_string()).unwrap_or_default(),
        reused = !built,
        docs_read = r.docs_read,
        empty_skipped = r.empty_skipped,
        split = r.split,
        truncated = r.truncated,
        dropped = r.dropped,
        docs = r.docs,
        tokens = r.tokens,
        label_tokens = r.label_tokens,
        "data ready"
    );
    Ok(store)
}

/// Read and tokenise (or generate) the corpus a config describes, in memory, without the cache.
pub fn build(config: &Config) -> Result<TokenStore, DataError> {
    let d = &config.data;
    let vocab = config.model.vocab_size;
    let mut limits = limits::Limits::new(d.max_doc_tokens, d.long_documents, vocab);
    let specials = tokenizer::Specials::new(d.bos_token_id, d.eos_token_id);
    match d.format {
        DataFormat::Synthetic => {
            synthetic::generate(&d.synthetic, vocab, config.seed, &mut limits)?;
        }
        DataFormat::Text => {
            let tok = tokenizer::TextTokenizer::load(tokenizer_path(config)?)?;
            let reader = text::TextReader::new(&tok);
            read_files(&d.paths, &reader, &specials, &mut limits)?;
        }
        DataFormat::PromptCompletion => {
            let tok = tokenizer::TextTokenizer::load(tokenizer_path(config)?)?;
            let reader = prompt_completion::PromptCompletionReader::new(&tok);
            read_files(&d.paths, &reader, &specials, &mut limits)?;
        }
        DataFormat::Chat => {
            let template = d.chat_template.as_deref().unwrap_or_default();
            let reader = chat::ChatReader::load(tokenizer_path(config)?, template)?;
            // The template writes the end markers: BOS only, never an EOS after the conversation.
            let specials = tokenizer::Specials::new(d.bos_token_id, None);
            read_files(&d.paths, &reader, &specials, &mut limits)?;
        }
        DataFormat::Tokens => {
            // Pre-tokenised data carries its own special tokens: no BOS/EOS added.
            let reader = token_ids::TokenIdsReader::new(vocab);
            read_files(&d.paths, &reader, &tokenizer::Specials::none(), &mut limits)?;
        }
    }
    limits.finish()
}

fn tokenizer_path(config: &Config) -> Result<&Path, DataError> {
    config
        .data
        .tokenizer
        .as_deref()
        .ok_or_else(|| DataError::TokenizerMissing {
            path: PathBuf::from("(data.tokenizer is unset)"),
        })
}

/// Every record of every file through `reader`, BOS/EOS, then the limits, in file and line order.
fn read_files(
    paths: &[PathBuf],
    reader: &dyn reader::Reader,
    specials: &tokenizer::Specials,
    limits: &mut limits::Limits,
) -> Result<(), DataError> {
    for path in paths {
        reader::read_file(path, reader, |doc, origin| {
            // Emptiness is judged on the content, before BOS/EOS make every document non-empty.
            let doc = if doc.is_empty() {
                doc
            } else {
                specials.wrap(doc)
            };
            limits.push(doc, origin)
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::LongDocuments;

    fn text_config(dir: &Path, lines: &str) -> Config {
        let data = dir.join("data.jsonl");
        std::fs::write(&data, lines).unwrap();
        let mut c = Config::default();
        c.data.format = DataFormat::Text;
        c.data.paths = vec![data];
        c.data.tokenizer = Some(tokenizer::write_tiny_tokenizer(dir));
        c.data.cache_dir = dir.join("cache");
        c
    }

    #[test]
    fn text_corpus_loads_with_bos_eos_and_report() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = text_config(
            dir.path(),
            "{\"text\": \"hello world\"}\n\n{\"text\": \"\"}\n{\"text\": \"the cat sat on the mat\"}\n",
        );
        c.data.bos_token_id = Some(1);
        c.data.eos_token_id = Some(2);
        c.data.max_doc_tokens = 5;
        c.data.long_documents = LongDocuments::Truncate;
        let s = load(&c).unwrap();
        assert_eq!(s.num_docs(), 2);
        assert_eq!(s.tokens(0), &[1, 4, 5, 2]);
        assert_eq!(s.tokens(1), &[1, 6, 7, 8, 9]);
        assert!(!s.is_label(0, 0) && s.is_label(0, 1) && s.is_label(0, 3));
        let r = s.report();
        assert_eq!((r.docs_read, r.empty_skipped, r.truncated), (3, 1, 1));
        assert_eq!((r.docs, r.tokens, r.label_tokens), (2, 9, 7));
        assert!(s.dir().unwrap().starts_with(dir.path().join("cache")));
    }

    #[test]
    fn error_in_second_file_names_that_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = text_config(dir.path(), "{\"text\": \"hello\"}\n");
        let second = dir.path().join("second.jsonl");
        std::fs::write(&second, "{\"text\": \"hello\"}\n{\"text\": 5}\n").unwrap();
        c.data.paths.push(second);
        let e = build(&c).unwrap_err().to_string();
        assert!(e.contains("second.jsonl:2") && e.contains("`text`"), "{e}");
    }

    #[test]
    fn nothing_left_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let c = text_config(dir.path(), "{\"text\": \"\"}\n");
        let e = build(&c).unwrap_err();
        assert!(
            matches!(
                e,
                DataError::NoDocuments {
                    docs_read: 1,
                    empty_skipped: 1,
                    ..
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn tokenizer_id_out_of_vocab_names_file_line_and_id() {
        let dir = tempfile::tempdir().unwrap();
        let c = text_config(
            dir.path(),
            "{\"text\": \"hello\"}\n{\"text\": \"a big cat\"}\n",
        );
        let e = load(&c).unwrap_err();
        assert!(
            matches!(
                e,
                DataError::TokenOutOfVocab {
                    line: 2,
                    id: 600,
                    vocab: 512,
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(e.to_string().contains("data.jsonl:2: token id 600"), "{e}");
    }

    #[test]
    fn missing_tokenizer_names_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = text_config(dir.path(), "{\"text\": \"hello\"}\n");
        c.data.tokenizer = Some(dir.path().join("absent/tokenizer.json"));
        let e = load(&c).unwrap_err().to_string();
        assert!(
            e.contains("absent/tokenizer.json") && e.contains("not found"),
            "{e}"
        );
    }

    #[test]
    fn long_documents_follow_the_policy_through_load() {
        let dir = tempfile::tempdir().unwrap();
        // 7 tokens, 2 tokens, 5 tokens; limit 3.
        let lines = "{\"text\": \"the cat sat on the mat ?\"}\n\
                     {\"text\": \"hello world\"}\n\
                     {\"text\": \"what is the cat ?\"}\n";
        for (policy, lengths, counts) in [
            (LongDocuments::Split, vec![3, 3, 1, 2, 3, 2], (2, 0, 0)),
            (LongDocuments::Truncate, vec![3, 2, 3], (0, 2, 0)),
            (LongDocuments::Drop, vec![2], (0, 0, 2)),
        ] {
            let mut c = text_config(dir.path(), lines);
            c.data.max_doc_tokens = 3;
            c.data.long_documents = policy;
            let s = load(&c).unwrap();
            assert_eq!(s.lengths(), lengths, "{policy:?}");
            let r = s.report();
            assert_eq!((r.split, r.truncated, r.dropped), counts, "{policy:?}");
            assert_eq!(r.docs_read, 3);
        }
    }

    #[test]
    fn default_config_builds_the_synthetic_corpus() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = Config::default();
        c.data.synthetic.num_docs = 200;
        c.data.cache_dir = dir.path().to_path_buf();
        let s = load(&c).unwrap();
        assert_eq!(s.num_docs(), 200);
        assert_eq!(s.report().label_tokens, s.num_tokens() as u64);
    }
}
