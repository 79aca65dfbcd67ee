//! JSONL `{"input_ids": [...], "labels": [...]?}`: pre-tokenised documents.
//!
//! `labels`, when present, must be as long as `input_ids`; each label is either `-100` (not a
//! label: the token is context only) or equal to its input id (a label). Anything else means
//! the file was made with shifted labels or for another tokenizer, and is an error.

use serde_json::Value;

use super::reader::{kind_of, Reader, Record};
use super::{DataError, Document};

/// The label value that marks a token as context only (PyTorch's ignore index).
const IGNORE: i64 = -100;

pub(crate) struct TokenIdsReader {
    vocab: usize,
}

impl TokenIdsReader {
    pub fn new(vocab: usize) -> Self {
        Self { vocab }
    }

    fn token_id(&self, record: &Record<'_>, index: usize, v: &Value) -> Result<u32, DataError> {
        let id = v.as_u64().ok_or_else(|| {
            record.bad_field(
                "input_ids",
                format!(
                    "[{index}] = {v} is not a token id (a non-negative integer), found {}",
                    kind_of(v)
                ),
            )
        })?;
        if id >= self.vocab as u64 {
            return Err(DataError::TokenOutOfVocab {
                path: record.origin.path.to_path_buf(),
                line: record.origin.line,
                id,
                vocab: self.vocab,
            });
        }
        Ok(id as u32)
    }
}

impl Reader for TokenIdsReader {
    fn read(&self, record: &Record<'_>) -> Result<Document, DataError> {
        let tokens = record
            .array_field("input_ids")?
            .iter()
            .enumerate()
            .map(|(i, v)| self.token_id(record, i, v))
            .collect::<Result<Vec<u32>, _>>()?;
        let Some(labels) = record.optional_field("labels") else {
            return Ok(Document::new(tokens));
        };
        let labels = record.as_array("labels", labels)?;
        if labels.len() != tokens.len() {
            return Err(DataError::LabelCount {
                path: record.origin.path.to_path_buf(),
                line: record.origin.line,
                labels: labels.len(),
                input_ids: tokens.len(),
            });
        }
        let labels = labels
            .iter()
            .zip(&tokens)
            .enumerate()
            .map(|(index, (v, &input_id))| {
                let label = v.as_i64().ok_or_else(|| {
                    record.bad_field(
                        "labels",
                        format!("[{index}] = {v} is not an integer, found {}", kind_of(v)),
                    )
                })?;
                match label {
                    IGNORE => Ok(false),
                    l if l == input_id as i64 => Ok(true),
                    _ => Err(DataError::LabelMismatch {
                        path: record.origin.path.to_path_buf(),
                        line: record.origin.line,
                        index,
                        label,
                        input_id,
                    }),
                }
            })
            .collect::<Result<Vec<bool>, _>>()?;
        Ok(Document {
            tokens,
            labels: Some(labels),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::reader::read_file;

    fn read(lines: &str) -> Result<Vec<Document>, DataError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ids.jsonl");
        std::fs::write(&path, lines).unwrap();
        let mut docs = Vec::new();
        read_file(&path, &TokenIdsReader::new(100), |d, _| {
            docs.push(d);
            Ok(())
        })?;
        Ok(docs)
    }

    #[test]
    fn ids_and_labels_are_read() {
        let docs = read(
            "{\"input_ids\": [5, 6, 7], \"labels\": [-100, 6, 7]}\n\
             {\"input_ids\": [8, 9]}\n\
             {\"input_ids\": [8], \"labels\": null}\n",
        )
        .unwrap();
        assert_eq!(docs[0].tokens, vec![5, 6, 7]);
        assert_eq!(docs[0].labels, Some(vec![false, true, true]));
        assert_eq!(docs[1], Document::new(vec![8, 9]));
        assert_eq!(docs[2], Document::new(vec![8]));
    }

    #[test]
    fn label_mismatch_names_file_line_and_index() {
        let e =
            read("{\"input_ids\": [5]}\n{\"input_ids\": [5, 6, 7], \"labels\": [-100, 7, 7]}\n")
                .unwrap_err();
        assert!(
            matches!(
                e,
                DataError::LabelMismatch {
                    line: 2,
                    index: 1,
                    label: 7,
                    input_id: 6,
                    ..
                }
            ),
            "{e:?}"
        );
        let msg = e.to_string();
        assert!(msg.contains("ids.jsonl:2: labels[1] = 7"), "{msg}");
    }

    #[test]
    fn label_count_mismatch_is_an_error() {
        let msg = read("{\"input_ids\": [5, 6], \"labels\": [5]}\n")
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("ids.jsonl:1: 1 labels for 2 input_ids"),
            "{msg}"
        );
    }

    #[test]
    fn token_id_out_of_vocab_names_file_line_and_id() {
        let e = read("{\"input_ids\": [5]}\n{\"input_ids\": [5, 100]}\n").unwrap_err();
        assert!(
            matches!(
                e,
                DataError::TokenOutOfVocab {
                    line: 2,
                    id: 100,
                    vocab: 100,
                    ..
                }
            ),
            "{e:?}"
        );
        let msg = e.to_string();
        assert!(msg.contains("ids.jsonl:2: token id 100"), "{msg}");
        // Ids past u32 are reported as they are, not wrapped.
        let e = read("{\"input_ids\": [8589934592]}\n").unwrap_err();
        assert!(
            matches!(e, DataError::TokenOutOfVocab { id: 8589934592, .. }),
            "{e:?}"
        );
    }

    #[test]
    fn negative_or_fractional_id_is_a_bad_field() {
        for line in [
            "{\"input_ids\": [-1]}",
            "{\"input_ids\": [1.5]}",
            "{\"input_ids\": 3}",
        ] {
            let e = read(line).unwrap_err();
            assert!(
                matches!(
                    e,
                    DataError::BadField {
                        field: "input_ids",
                        line: 1,
                        ..
                    }
                ),
                "{line}: {e:?}"
            );
        }
    }

    #[test]
    fn missing_input_ids_names_the_field() {
        let msg = read("{\"ids\": [1]}\n").unwrap_err().to_string();
        assert!(
            msg.contains("ids.jsonl:1: missing field `input_ids`"),
            "{msg}"
        );
    }
}
