//! JSONL `{"text": "..."}`: one document per line, every token a label.

use super::reader::{Reader, Record};
use super::tokenizer::TextTokenizer;
use super::{DataError, Document};

pub(crate) struct TextReader<'t> {
    tokenizer: &'t TextTokenizer,
}

impl<'t> TextReader<'t> {
    pub fn new(tokenizer: &'t TextTokenizer) -> Self {
        Self { tokenizer }
    }
}

impl Reader for TextReader<'_> {
    fn read(&self, record: &Record<'_>) -> Result<Document, DataError> {
        let text = record.str_field("text")?;
        Ok(Document::new(self.tokenizer.encode(text, record.origin)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::reader::{read_file, Origin};
    use crate::data::tokenizer::write_tiny_tokenizer;

    fn read(lines: &str) -> Result<Vec<Document>, DataError> {
        let dir = tempfile::tempdir().unwrap();
        let tok = TextTokenizer::load(&write_tiny_tokenizer(dir.path())).unwrap();
        let path = dir.path().join("t.jsonl");
        std::fs::write(&path, lines).unwrap();
        let mut docs = Vec::new();
        read_file(&path, &TextReader::new(&tok), |d, _: Origin<'_>| {
            docs.push(d);
            Ok(())
        })?;
        Ok(docs)
    }

    #[test]
    fn text_becomes_tokens_all_labels() {
        let docs = read("{\"text\": \"hello world\", \"id\": 7}\n{\"text\": \"\"}\n").unwrap();
        assert_eq!(docs, vec![Document::new(vec![4, 5]), Document::new(vec![])]);
    }

    #[test]
    fn missing_text_names_file_line_and_field() {
        let e = read("{\"text\": \"hello\"}\n{\"txt\": \"hello\"}\n").unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("t.jsonl:2: missing field `text`"), "{msg}");
    }

    #[test]
    fn text_of_the_wrong_type_names_the_field() {
        let msg = read("{\"text\": [1]}\n").unwrap_err().to_string();
        assert!(
            msg.contains("t.jsonl:1: field `text` must be a string, found an array"),
            "{msg}"
        );
    }

    #[test]
    fn malformed_line_names_file_and_line() {
        let msg = read("{\"text\": \"a\"}\n{\"text\": \"a\"\n")
            .unwrap_err()
            .to_string();
        assert!(msg.contains("t.jsonl:2: malformed JSON"), "{msg}");
    }
}
