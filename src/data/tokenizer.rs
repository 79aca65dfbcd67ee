//! The text tokenizer (a Hugging Face `tokenizer.json`) and the BOS/EOS wrapper.
//!
//! Text is encoded *without* the tokenizer's own special tokens (its post-processor): BOS and
//! EOS come only from `data.bos_token_id` / `data.eos_token_id`, so a run never gets two BOS by
//! accident and the ids in the store are exactly the ones the config names.

use std::path::Path;

use super::reader::Origin;
use super::{DataError, Document};

/// A loaded `tokenizer.json`.
pub(crate) struct TextTokenizer {
    inner: tokenizers::Tokenizer,
}

impl TextTokenizer {
    /// Load `path`; a missing file is [`DataError::TokenizerMissing`] naming it.
    pub fn load(path: &Path) -> Result<Self, DataError> {
        let bytes = std::fs::read(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => DataError::TokenizerMissing {
                path: path.to_path_buf(),
            },
            _ => DataError::io(path, e),
        })?;
        let inner =
            tokenizers::Tokenizer::from_bytes(&bytes).map_err(|e| DataError::Tokenizer {
                path: path.to_path_buf(),
                message: e.to_string(),
            })?;
        Ok(Self { inner })
    }

    /// The ids of `text` (no special tokens added); errors name the record's file and line.
    pub fn encode(&self, text: &str, origin: Origin<'_>) -> Result<Vec<u32>, DataError> {
        let encoding = self
            .inner
            .encode(text, false)
            .map_err(|e| DataError::Tokenize {
                path: origin.path.to_path_buf(),
                line: origin.line,
                message: e.to_string(),
            })?;
        Ok(encoding.get_ids().to_vec())
    }
}

/// BOS before and EOS after a document. EOS counts as a label (the model learns to stop);
/// BOS does not (nothing before it predicts it).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Specials {
    bos: Option<u32>,
    eos: Option<u32>,
}

impl Specials {
    pub fn new(bos: Option<u32>, eos: Option<u32>) -> Self {
        Self { bos, eos }
    }

    pub fn none() -> Self {
        Self::default()
    }

    /// `doc` with BOS and EOS added (as configured).
    pub fn wrap(&self, doc: Document) -> Document {
        if self.bos.is_none() && self.eos.is_none() {
            return doc;
        }
        let n = doc.len() + self.bos.is_some() as usize + self.eos.is_some() as usize;
        let mut tokens = Vec::with_capacity(n);
        tokens.extend(self.bos);
        tokens.extend_from_slice(&doc.tokens);
        tokens.extend(self.eos);
        // Label bits are only materialised when some bit is clear.
        let labels = if self.bos.is_none() && doc.labels.is_none() {
            None
        } else {
            let mut labels = Vec::with_capacity(n);
            if self.bos.is_some() {
                labels.push(false);
            }
            labels.extend((0..doc.len()).map(|i| doc.is_label(i)));
            if self.eos.is_some() {
                labels.push(true);
            }
            Some(labels)
        };
        Document { tokens, labels }
    }
}

/// Write a tiny word-level `tokenizer.json` into `dir` and return its path. Words: `hello`=4,
/// `world`=5, `the`=6, `cat`=7, `sat`=8, `on`=9, `mat`=10, `what`=11, `is`=12, `?`=13, `big`=600;
/// anything else is `[UNK]`=3. Whitespace and punctuation split words.
#[cfg(test)]
pub(crate) fn write_tiny_tokenizer(dir: &Path) -> std::path::PathBuf {
    let json = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [],
        "normalizer": null,
        "pre_tokenizer": { "type": "Whitespace" },
        "post_processor": null,
        "decoder": null,
        "model": {
            "type": "WordLevel",
            "vocab": {
                "[UNK]": 3, "hello": 4, "world": 5, "the": 6, "cat": 7, "sat": 8, "on": 9,
                "mat": 10, "what": 11, "is": 12, "?": 13, "big": 600
            },
            "unk_token": "[UNK]"
        }
    });
    let path = dir.join("tokenizer.json");
    std::fs::write(&path, json.to_string()).unwrap();
    path
}

#[cfg(test)]
mod tests {
    use super::*;

    fn origin() -> Origin<'static> {
        Origin {
            path: Path::new("x.jsonl"),
            line: 3,
        }
    }

    #[test]
    fn tiny_tokenizer_encodes_words() {
        let dir = tempfile::tempdir().unwrap();
        let tok = TextTokenizer::load(&write_tiny_tokenizer(dir.path())).unwrap();
        assert_eq!(
            tok.encode("what is the cat? zebra", origin()).unwrap(),
            vec![11, 12, 6, 7, 13, 3]
        );
        assert!(tok.encode("", origin()).unwrap().is_empty());
    }

    #[test]
    fn missing_tokenizer_file_names_the_path() {
        let e = TextTokenizer::load(Path::new("/nonexistent/tok/tokenizer.json"))
            .err()
            .unwrap();
        assert!(matches!(e, DataError::TokenizerMissing { .. }), "{e:?}");
        let msg = e.to_string();
        assert!(
            msg.contains("/nonexistent/tok/tokenizer.json") && msg.contains("not found"),
            "{msg}"
        );
    }

    #[test]
    fn unreadable_tokenizer_names_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        std::fs::write(&path, "{ not a tokenizer").unwrap();
        let msg = TextTokenizer::load(&path).err().unwrap().to_string();
        assert!(
            msg.starts_with(&format!("tokenizer {}", path.display())),
            "{msg}"
        );
    }

    #[test]
    fn bos_is_not_a_label_eos_is() {
        let doc = Document {
            tokens: vec![7, 8, 9],
            labels: Some(vec![false, true, true]),
        };
        let w = Specials::new(Some(1), Some(2)).wrap(doc.clone());
        assert_eq!(w.tokens, vec![1, 7, 8, 9, 2]);
        assert_eq!(w.labels, Some(vec![false, false, true, true, true]));

        let w = Specials::new(None, Some(2)).wrap(Document::new(vec![7]));
        assert_eq!((w.tokens, w.labels), (vec![7, 2], None));
        let w = Specials::new(Some(1), None).wrap(Document::new(vec![7]));
        assert_eq!((w.tokens, w.labels), (vec![1, 7], Some(vec![false, true])));
        assert_eq!(Specials::none().wrap(doc.clone()), doc);
    }
}
