//! `TokenStore`: the tokenised corpus as three flat arrays, in memory or memory-mapped.
//!
//! On disk (one directory per cache key, little-endian):
//! - `tokens.u32`: every document's tokens, end to end;
//! - `offsets.u64`: N + 1 offsets into `tokens` (document i is `offsets[i]..offsets[i+1]`);
//! - `labels.bits`: one bit per token, set when that token counts as a *label* (it may be
//!   predicted from the tokens before it); prompt tokens and `-100` labels are clear.
//! - `meta.json`: the [`DataReport`] of the build that wrote it.

use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use serde::{Deserialize, Serialize};

use super::DataError;

/// One document as a reader produced it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Document {
    pub tokens: Vec<u32>,
    /// `labels[i]`: token i counts in the loss (as the target of position i - 1).
    /// `None` means every token does.
    pub labels: Option<Vec<bool>>,
}

impl Document {
    pub fn new(tokens: Vec<u32>) -> Self {
        Self {
            tokens,
            labels: None,
        }
    }
    pub fn len(&self) -> usize {
        self.tokens.len()
    }
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }
    /// Whether token i counts as a label.
    pub fn is_label(&self, i: usize) -> bool {
        self.labels.as_ref().is_none_or(|l| l[i])
    }
}

/// What the build did to the raw documents; stored with the cache so a reused cache reports it too.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataReport {
    /// Documents read from the source.
    pub docs_read: u64,
    /// Empty documents (no tokens) skipped.
    pub empty_skipped: u64,
    /// Documents longer than the limit that were split (each counts once).
    pub split: u64,
    /// Documents longer than the limit that were truncated.
    pub truncated: u64,
    /// Documents longer than the limit that were dropped.
    pub dropped: u64,
    /// Documents in the store.
    pub docs: u64,
    /// Tokens in the store.
    pub tokens: u64,
    /// Tokens that count as labels.
    pub label_tokens: u64,
}

enum Words<T: 'static> {
    Owned(Vec<T>),
    Mapped(Mmap),
}

impl<T: Copy + 'static> Words<T> {
    fn as_slice(&self) -> &[T] {
        match self {
            Words::Owned(v) => v,
            Words::Mapped(m) => {
                let bytes: &[u8] = m;
                let n = bytes.len() / std::mem::size_of::<T>();
                // SAFETY: mmap regions are page-aligned (so aligned for u32/u64), `n` whole
                // elements fit in the mapping, and u32/u64 have no invalid bit patterns.
                unsafe { std::slice::from_raw_parts(bytes.as_ptr() as *const T, n) }
            }
        }
    }
}

/// The corpus: flat tokens, document offsets, label bits.
pub struct TokenStore {
    tokens: Words<u32>,
    offsets: Words<u64>,
    labels: Words<u8>,
    report: DataReport,
    dir: Option<PathBuf>,
}

impl std::fmt::Debug for TokenStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenStore")
            .field("docs", &self.num_docs())
            .field("tokens", &self.num_tokens())
            .field("dir", &self.dir)
            .finish()
    }
}

/// Appends documents to the three flat arrays of an in-memory [`TokenStore`], one at a time, so
/// a build never holds the corpus twice.
#[derive(Debug, Default)]
pub(crate) struct StoreBuilder {
    tokens: Vec<u32>,
    offsets: Vec<u64>,
    label_bits: Vec<u8>,
    label_tokens: u64,
}

impl StoreBuilder {
    /// Append one document (an empty one becomes an empty entry; callers skip those first).
    pub(crate) fn push(&mut self, doc: &Document) {
        self.push_range(doc, 0..doc.len());
    }

    /// Append tokens `range` of `doc`, with their label bits, as one document.
    pub(crate) fn push_range(&mut self, doc: &Document, range: std::ops::Range<usize>) {
        if self.offsets.is_empty() {
            self.offsets.push(0);
        }
        self.tokens.reserve(range.len());
        for i in range {
            let tok = doc.tokens[i];
            let pos = self.tokens.len();
            if pos / 8 >= self.label_bits.len() {
                self.label_bits.push(0u8);
            }
            if doc.is_label(i) {
                self.label_bits[pos / 8] |= 1 << (pos % 8);
                self.label_tokens += 1;
            }
            self.tokens.push(tok);
        }
        self.offsets.push(self.tokens.len() as u64);
    }

    /// Documents pushed so far.
    pub(crate) fn num_docs(&self) -> usize {
        self.offsets.len().saturating_sub(1)
    }

    /// The store, with `report`'s `docs`, `tokens` and `label_tokens` filled in from what was
    /// pushed (the caller owns the other counts).
    pub(crate) fn finish(mut self, mut report: DataReport) -> TokenStore {
        if self.offsets.is_empty() {
            self.offsets.push(0);
        }
        report.docs = self.num_docs() as u64;
        report.tokens = self.tokens.len() as u64;
        report.label_tokens = self.label_tokens;
        TokenStore {
            tokens: Words::Owned(self.tokens),
            offsets: Words::Owned(self.offsets),
            labels: Words::Owned(self.label_bits),
            report,
            dir: None,
        }
    }
}

const TOKENS: &str = "tokens.u32";
const OFFSETS: &str = "offsets.u64";
const LABELS: &str = "labels.bits";
const META: &str = "meta.json";

impl TokenStore {
    /// An in-memory store of these documents (empty ones included as given).
    pub fn from_documents(docs: &[Document]) -> Self {
        let mut builder = StoreBuilder::default();
        for doc in docs {
            builder.push(doc);
        }
        let report = DataReport {
            docs_read: docs.len() as u64,
            ..Default::default()
        };
        builder.finish(report)
    }

    /// Replace the report (the builder knows what it skipped, split or dropped).
    pub fn with_report(mut self, report: DataReport) -> Self {
        self.report = report;
        self
    }

    /// Write the store into `dir` (created) as the files described in the module doc.
    pub fn write_to(&self, dir: &Path) -> Result<(), DataError> {
        std::fs::create_dir_all(dir).map_err(|e| DataError::io(dir, e))?;
        let write = |name: &str, bytes: &[u8]| {
            let p = dir.join(name);
            std::fs::write(&p, bytes).map_err(|e| DataError::io(&p, e))
        };
        write_le(&dir.join(TOKENS), self.tokens.as_slice(), u32::to_le_bytes)?;
        write_le(
            &dir.join(OFFSETS),
            self.offsets.as_slice(),
            u64::to_le_bytes,
        )?;
        write(LABELS, self.labels.as_slice())?;
        let meta = serde_json::to_vec_pretty(&self.report).map_err(|e| DataError::Cache {
            path: dir.join(META),
            message: e.to_string(),
        })?;
        write(META, &meta)
    }

    /// Memory-map a store written by [`TokenStore::write_to`], checking that the files agree.
    pub fn open(dir: &Path) -> Result<Self, DataError> {
        let map = |name: &str| -> Result<Mmap, DataError> {
            let p = dir.join(name);
            let f = File::open(&p).map_err(|e| DataError::io(&p, e))?;
            // SAFETY: the cache files are written once under a temporary name and renamed into
            // place; nothing writes them while they are mapped.
            unsafe { Mmap::map(&f) }.map_err(|e| DataError::io(&p, e))
        };
        let meta_path = dir.join(META);
        let meta = std::fs::read(&meta_path).map_err(|e| DataError::io(&meta_path, e))?;
        let report: DataReport = serde_json::from_slice(&meta).map_err(|e| DataError::Cache {
            path: meta_path.clone(),
            message: e.to_string(),
        })?;
        let store = Self {
            tokens: Words::Mapped(map(TOKENS)?),
            offsets: Words::Mapped(map(OFFSETS)?),
            labels: Words::Mapped(map(LABELS)?),
            report,
            dir: Some(dir.to_path_buf()),
        };
        let offsets = store.offsets.as_slice();
        let bad = |message: String| DataError::Cache {
            path: dir.to_path_buf(),
            message,
        };
        if offsets.is_empty() || offsets[0] != 0 {
            return Err(bad("offsets must start with 0".into()));
        }
        if offsets.windows(2).any(|w| w[0] > w[1]) {
            return Err(bad("offsets are not sorted".into()));
        }
        let n_tok = store.tokens.as_slice().len() as u64;
        if *offsets.last().unwrap_or(&0) != n_tok {
            return Err(bad(format!(
                "offsets end at {} but there are {n_tok} tokens",
                offsets[offsets.len() - 1]
            )));
        }
        if (store.labels.as_slice().len() as u64) < n_tok.div_ceil(8) {
            return Err(bad("label bits are shorter than the tokens".into()));
        }
        if store.num_docs() as u64 != store.report.docs {
            return Err(bad(format!(
                "meta.json says {} documents, offsets hold {}",
                store.report.docs,
                store.num_docs()
            )));
        }
        Ok(store)
    }

    pub fn num_docs(&self) -> usize {
        self.offsets.as_slice().len().saturating_sub(1)
    }
    pub fn num_tokens(&self) -> usize {
        self.tokens.as_slice().len()
    }
    /// Document lengths in tokens, the planner's input.
    pub fn lengths(&self) -> Vec<u32> {
        self.offsets
            .as_slice()
            .windows(2)
            .map(|w| (w[1] - w[0]) as u32)
            .collect()
    }
    pub fn doc_len(&self, doc: usize) -> usize {
        let o = self.offsets.as_slice();
        (o[doc + 1] - o[doc]) as usize
    }
    /// The tokens of one document. Panics if `doc >= num_docs()` (ids come from the plan).
    pub fn tokens(&self, doc: usize) -> &[u32] {
        let o = self.offsets.as_slice();
        &self.tokens.as_slice()[o[doc] as usize..o[doc + 1] as usize]
    }
    /// Whether token `i` of document `doc` counts as a label.
    pub fn is_label(&self, doc: usize, i: usize) -> bool {
        let pos = self.offsets.as_slice()[doc] as usize + i;
        self.labels.as_slice()[pos / 8] & (1 << (pos % 8)) != 0
    }
    /// The document back as a [`Document`] (labels always explicit).
    pub fn document(&self, doc: usize) -> Document {
        let tokens = self.tokens(doc).to_vec();
        let labels = (0..tokens.len()).map(|i| self.is_label(doc, i)).collect();
        Document {
            tokens,
            labels: Some(labels),
        }
    }
    pub fn report(&self) -> &DataReport {
        &self.report
    }
    /// The cache directory this store was mapped from, if any.
    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }
}

/// Write `words` little-endian to `path`, a chunk at a time (no second copy of the corpus).
fn write_le<T: Copy, const N: usize>(
    path: &Path,
    words: &[T],
    to_le: fn(T) -> [u8; N],
) -> Result<(), DataError> {
    use std::io::Write;
    let f = File::create(path).map_err(|e| DataError::io(path, e))?;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, f);
    let mut buf = Vec::with_capacity(N * 16384);
    for chunk in words.chunks(16384) {
        buf.clear();
        buf.extend(chunk.iter().flat_map(|&x| to_le(x)));
        w.write_all(&buf).map_err(|e| DataError::io(path, e))?;
    }
    w.flush().map_err(|e| DataError::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn docs() -> Vec<Document> {
        vec![
            Document::new(vec![1, 2, 3]),
            Document {
                tokens: vec![4, 5, 6, 7, 8, 9, 10, 11, 12],
                labels: Some(vec![
                    false, false, false, true, true, true, true, true, false,
                ]),
            },
            Document::new(vec![13]),
        ]
    }

    #[test]
    fn in_memory_store_gives_back_its_documents() {
        let d = docs();
        let s = TokenStore::from_documents(&d);
        assert_eq!(s.num_docs(), 3);
        assert_eq!(s.lengths(), vec![3, 9, 1]);
        assert_eq!(s.tokens(1), &d[1].tokens[..]);
        for (i, doc) in d.iter().enumerate() {
            for j in 0..doc.len() {
                assert_eq!(s.is_label(i, j), doc.is_label(j), "doc {i} token {j}");
            }
        }
        assert_eq!(s.report().label_tokens, 3 + 5 + 1);
    }

    #[test]
    fn written_store_maps_back_identically() {
        let dir = tempfile::tempdir().unwrap();
        let d = docs();
        TokenStore::from_documents(&d).write_to(dir.path()).unwrap();
        let s = TokenStore::open(dir.path()).unwrap();
        for (i, doc) in d.iter().enumerate() {
            let back = s.document(i);
            assert_eq!(back.tokens, doc.tokens);
            for j in 0..doc.len() {
                assert_eq!(back.is_label(j), doc.is_label(j));
            }
        }
    }

    #[test]
    fn corrupt_cache_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        TokenStore::from_documents(&docs())
            .write_to(dir.path())
            .unwrap();
        std::fs::write(dir.path().join(OFFSETS), [1u8; 16]).unwrap();
        let e = TokenStore::open(dir.path()).unwrap_err().to_string();
        assert!(e.contains("offsets"), "{e}");
    }
}
