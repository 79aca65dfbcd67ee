//! JSONL records and the `Reader` trait the three file formats share.
//!
//! A JSONL file is read line by line (1-based numbers, blank lines skipped); each line must be a
//! JSON object, which becomes a [`Record`] that remembers its file and line so every later error
//! can name them. A format's [`Reader`] turns one record into one [`Document`] of *content*
//! tokens (no BOS/EOS) and label bits.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::Path;

use rayon::prelude::*;
use serde_json::{Map, Value};

use super::{DataError, Document};

/// Where a document came from: a file and a 1-based line (for the synthetic corpus, the pseudo
/// path `<synthetic>` and the document number).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Origin<'a> {
    pub path: &'a Path,
    pub line: usize,
}

impl std::fmt::Display for Origin<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.path.display(), self.line)
    }
}

/// One JSONL line: a JSON object and where it came from.
#[derive(Debug)]
pub(crate) struct Record<'a> {
    pub origin: Origin<'a>,
    fields: Map<String, Value>,
}

impl<'a> Record<'a> {
    /// Parse one line (without its newline); anything but a JSON object is an error.
    pub fn parse(origin: Origin<'a>, line: &[u8]) -> Result<Self, DataError> {
        let json = |message: String| DataError::Json {
            path: origin.path.to_path_buf(),
            line: origin.line,
            message,
        };
        match serde_json::from_slice::<Value>(line) {
            Ok(Value::Object(fields)) => Ok(Self { origin, fields }),
            Ok(other) => Err(json(format!(
                "expected a JSON object, found {}",
                kind_of(&other)
            ))),
            Err(e) => Err(json(e.to_string())),
        }
    }

    /// A required field.
    pub fn field(&self, name: &'static str) -> Result<&Value, DataError> {
        self.fields
            .get(name)
            .ok_or_else(|| DataError::MissingField {
                path: self.origin.path.to_path_buf(),
                line: self.origin.line,
                field: name,
            })
    }

    /// An optional field (absent and `null` are both `None`).
    pub fn optional_field(&self, name: &'static str) -> Option<&Value> {
        self.fields.get(name).filter(|v| !v.is_null())
    }

    /// A required string field.
    pub fn str_field(&self, name: &'static str) -> Result<&str, DataError> {
        let v = self.field(name)?;
        v.as_str()
            .ok_or_else(|| self.bad_field(name, format!("must be a string, found {}", kind_of(v))))
    }

    /// A required array field.
    pub fn array_field(&self, name: &'static str) -> Result<&[Value], DataError> {
        let v = self.field(name)?;
        self.as_array(name, v)
    }

    /// `v` (the value of field `name`) as an array.
    pub fn as_array<'v>(&self, name: &'static str, v: &'v Value) -> Result<&'v [Value], DataError> {
        v.as_array()
            .map(Vec::as_slice)
            .ok_or_else(|| self.bad_field(name, format!("must be an array, found {}", kind_of(v))))
    }

    /// The error for a field that is present but wrong.
    pub fn bad_field(&self, field: &'static str, message: String) -> DataError {
        DataError::BadField {
            path: self.origin.path.to_path_buf(),
            line: self.origin.line,
            field,
            message,
        }
    }
}

/// What a JSON value is, for error messages.
pub(crate) fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// One file format: a JSONL record to one document.
pub(crate) trait Reader: Sync {
    /// The record's content tokens (no BOS/EOS) and label bits; an empty document is returned
    /// as such (the limits skip and count it).
    fn read(&self, record: &Record<'_>) -> Result<Document, DataError>;
}

/// Lines handed to the parallel readers at a time.
const CHUNK_LINES: usize = 4096;

/// Read every record of a JSONL file with `reader` and hand the documents to `sink` in line
/// order. Records are parsed and read in parallel a chunk at a time, but errors and documents
/// reach the caller in file order, so the error reported is the first one in the file.
pub(crate) fn read_file(
    path: &Path,
    reader: &dyn Reader,
    mut sink: impl FnMut(Document, Origin<'_>) -> Result<(), DataError>,
) -> Result<(), DataError> {
    let mut lines = JsonlLines::open(path)?;
    loop {
        let chunk = lines.next_chunk(CHUNK_LINES)?;
        if chunk.is_empty() {
            return Ok(());
        }
        let docs: Vec<Result<Document, DataError>> = chunk
            .par_iter()
            .map(|(line, bytes)| {
                let record = Record::parse(Origin { path, line: *line }, bytes)?;
                reader.read(&record)
            })
            .collect();
        for ((line, _), doc) in chunk.iter().zip(docs) {
            sink(doc?, Origin { path, line: *line })?;
        }
    }
}

/// The non-blank lines of a file with their 1-based numbers, a chunk at a time.
struct JsonlLines<'a> {
    path: &'a Path,
    input: BufReader<File>,
    line: usize,
}

impl<'a> JsonlLines<'a> {
    fn open(path: &'a Path) -> Result<Self, DataError> {
        let f = File::open(path).map_err(|e| DataError::io(path, e))?;
        Ok(Self {
            path,
            input: BufReader::with_capacity(1 << 20, f),
            line: 0,
        })
    }

    /// Up to `max` non-blank lines (without line endings); empty at the end of the file.
    fn next_chunk(&mut self, max: usize) -> Result<Vec<(usize, Vec<u8>)>, DataError> {
        let mut chunk = Vec::new();
        while chunk.len() < max {
            let mut buf = Vec::new();
            let n = self
                .input
                .read_until(b'\n', &mut buf)
                .map_err(|e| DataError::io(self.path, e))?;
            if n == 0 {
                break;
            }
            self.line += 1;
            while matches!(buf.last(), Some(b'\n' | b'\r')) {
                buf.pop();
            }
            if buf.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            chunk.push((self.line, buf));
        }
        Ok(chunk)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reader of `{"n": k}` records: a document of k tokens, all 7.
    struct Count;
    impl Reader for Count {
        fn read(&self, record: &Record<'_>) -> Result<Document, DataError> {
            let n = record.field("n")?;
            let n = n
                .as_u64()
                .ok_or_else(|| record.bad_field("n", "must be a count".into()))?;
            Ok(Document::new(vec![7; n as usize]))
        }
    }

    fn read(text: &str) -> (Result<(), DataError>, Vec<(usize, usize)>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("in.jsonl");
        std::fs::write(&path, text).unwrap();
        let mut got = Vec::new();
        let r = read_file(&path, &Count, |doc, origin| {
            got.push((origin.line, doc.len()));
            Ok(())
        });
        (r, got)
    }

    #[test]
    fn lines_are_numbered_from_one_and_blank_lines_skipped() {
        let (r, got) = read("{\"n\": 1}\n\n   \r\n{\"n\": 3}\r\n{\"n\": 0}");
        r.unwrap();
        assert_eq!(got, vec![(1, 1), (4, 3), (5, 0)]);
    }

    #[test]
    fn malformed_line_names_file_and_line() {
        let (r, got) = read("{\"n\": 1}\n{\"n\": 2\n{\"n\": 3}\n");
        let e = r.unwrap_err();
        assert!(matches!(e, DataError::Json { line: 2, .. }), "{e:?}");
        let msg = e.to_string();
        assert!(msg.contains("in.jsonl:2: malformed JSON"), "{msg}");
        assert_eq!(
            got,
            vec![(1, 1)],
            "documents before the bad line are delivered"
        );
    }

    #[test]
    fn non_object_line_is_malformed() {
        let (r, _) = read("[1, 2]\n");
        let msg = r.unwrap_err().to_string();
        assert!(
            msg.contains("in.jsonl:1") && msg.contains("expected a JSON object"),
            "{msg}"
        );
    }

    #[test]
    fn missing_field_names_file_line_and_field() {
        let (r, _) = read("{\"n\": 1}\n{\"m\": 1}\n");
        let e = r.unwrap_err();
        assert!(
            matches!(
                e,
                DataError::MissingField {
                    line: 2,
                    field: "n",
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(e.to_string().contains("in.jsonl:2: missing field `n`"));
    }

    #[test]
    fn first_error_in_the_file_wins_across_chunks() {
        let mut text = String::new();
        for _ in 0..CHUNK_LINES + 10 {
            text.push_str("{\"n\": 1}\n");
        }
        text.push_str("{\"n\": \"x\"}\n{\"bad\n");
        let (r, got) = read(&text);
        let e = r.unwrap_err();
        assert!(
            matches!(e, DataError::BadField { line, .. } if line == CHUNK_LINES + 11),
            "{e:?}"
        );
        assert_eq!(got.len(), CHUNK_LINES + 10);
    }

    #[test]
    fn missing_file_names_the_path() {
        let e = read_file(Path::new("/nonexistent/x.jsonl"), &Count, |_, _| Ok(())).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/x.jsonl"), "{e}");
    }
}
