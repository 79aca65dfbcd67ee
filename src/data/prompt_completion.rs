//! JSONL `{"prompt": "...", "completion": "..."}`: prompt tokens are not labels.
//!
//! Prompt and completion are tokenised separately and concatenated, so the boundary between
//! masked and trained tokens is exactly where the two strings meet (a merge across it could
//! otherwise put one token half in the prompt).

use super::reader::{Reader, Record};
use super::tokenizer::TextTokenizer;
use super::{DataError, Document};

pub(crate) struct PromptCompletionReader<'t> {
    tokenizer: &'t TextTokenizer,
}

impl<'t> PromptCompletionReader<'t> {
    pub fn new(tokenizer: &'t TextTokenizer) -> Self {
        Self { tokenizer }
    }
}

impl Reader for PromptCompletionReader<'_> {
    fn read(&self, record: &Record<'_>) -> Result<Document, DataError> {
        let prompt = record.str_field("prompt")?;
        let completion = record.str_field("completion")?;
        let mut tokens = self.tokenizer.encode(prompt, record.origin)?;
        let n_prompt = tokens.len();
        tokens.extend(self.tokenizer.encode(completion, record.origin)?);
        let labels = (0..tokens.len()).map(|i| i >= n_prompt).collect();
        Ok(Document {
            tokens,
            labels: Some(labels),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, DataFormat};
    use crate::data::reader::read_file;
    use crate::data::tokenizer::write_tiny_tokenizer;

    fn read(lines: &str) -> Result<Vec<Document>, DataError> {
        let dir = tempfile::tempdir().unwrap();
        let tok = TextTokenizer::load(&write_tiny_tokenizer(dir.path())).unwrap();
        let path = dir.path().join("pc.jsonl");
        std::fs::write(&path, lines).unwrap();
        let mut docs = Vec::new();
        read_file(&path, &PromptCompletionReader::new(&tok), |d, _| {
            docs.push(d);
            Ok(())
        })?;
        Ok(docs)
    }

    #[test]
    fn prompt_tokens_are_masked_exactly() {
        let docs =
            read("{\"prompt\": \"what is the cat?\", \"completion\": \"the cat sat\"}\n").unwrap();
        assert_eq!(docs[0].tokens, vec![11, 12, 6, 7, 13, 6, 7, 8]);
        let labels: Vec<bool> = (0..8).map(|i| docs[0].is_label(i)).collect();
        assert_eq!(
            labels,
            vec![false, false, false, false, false, true, true, true]
        );
    }

    #[test]
    fn missing_completion_names_file_line_and_field() {
        let msg =
            read("{\"prompt\": \"hello\", \"completion\": \"world\"}\n{\"prompt\": \"hello\"}\n")
                .unwrap_err()
                .to_string();
        assert!(
            msg.contains("pc.jsonl:2: missing field `completion`"),
            "{msg}"
        );
    }

    #[test]
    fn through_load_bos_is_masked_and_eos_is_a_label() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("pc.jsonl");
        std::fs::write(
            &data,
            "{\"prompt\": \"hello\", \"completion\": \"world\"}\n{\"prompt\": \"\", \"completion\": \"\"}\n",
        )
        .unwrap();
        let mut c = Config::default();
        c.data.format = DataFormat::PromptCompletion;
        c.data.paths = vec![data];
        c.data.tokenizer = Some(write_tiny_tokenizer(dir.path()));
        c.data.cache_dir = dir.path().join("cache");
        c.data.bos_token_id = Some(1);
        c.data.eos_token_id = Some(2);
        let s = crate::data::load(&c).unwrap();
        assert_eq!(s.num_docs(), 1);
        assert_eq!(s.report().empty_skipped, 1);
        assert_eq!(s.tokens(0), &[1, 4, 5, 2]);
        let labels: Vec<bool> = (0..4).map(|i| s.is_label(0, i)).collect();
        assert_eq!(labels, vec![false, false, true, true]);
        assert_eq!(s.report().label_tokens, 2);
    }
}
