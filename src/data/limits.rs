//! What every document goes through on its way into the store, whatever its format:
//! the vocabulary check, the empty-document skip and the long-document policy, all counted.

use std::path::Path;

use super::reader::Origin;
use super::store::StoreBuilder;
use super::{DataError, DataReport, Document, TokenStore};
use crate::config::LongDocuments;

/// The per-document rules of `[data]` and the store they feed.
pub(crate) struct Limits {
    max_doc_tokens: usize,
    policy: LongDocuments,
    vocab: usize,
    store: StoreBuilder,
    report: DataReport,
}

impl Limits {
    pub fn new(max_doc_tokens: usize, policy: LongDocuments, vocab: usize) -> Self {
        Self {
            max_doc_tokens: max_doc_tokens.max(1),
            policy,
            vocab,
            store: StoreBuilder::default(),
            report: DataReport::default(),
        }
    }

    /// Take one document as read: skip it if empty, check its ids, then keep, split, truncate
    /// or drop it by length. A split document becomes pieces of `max_doc_tokens` tokens and a
    /// shorter last piece (even of one token), each its own document.
    pub fn push(&mut self, doc: Document, origin: Origin<'_>) -> Result<(), DataError> {
        self.report.docs_read += 1;
        if doc.is_empty() {
            self.report.empty_skipped += 1;
            tracing::debug!(%origin, "empty document skipped");
            return Ok(());
        }
        if let Some(&id) = doc.tokens.iter().find(|&&t| t as usize >= self.vocab) {
            return Err(DataError::TokenOutOfVocab {
                path: origin.path.to_path_buf(),
                line: origin.line,
                id: id.into(),
                vocab: self.vocab,
            });
        }
        let (len, max) = (doc.len(), self.max_doc_tokens);
        if len <= max {
            self.store.push(&doc);
            return Ok(());
        }
        tracing::debug!(%origin, len, limit = max, policy = ?self.policy, "long document");
        match self.policy {
            LongDocuments::Split => {
                self.report.split += 1;
                for start in (0..len).step_by(max) {
                    self.store.push_range(&doc, start..(start + max).min(len));
                }
            }
            LongDocuments::Truncate => {
                self.report.truncated += 1;
                self.store.push_range(&doc, 0..max);
            }
            LongDocuments::Drop => self.report.dropped += 1,
        }
        Ok(())
    }

    /// The in-memory store and its report; an error if no document is left.
    pub fn finish(self) -> Result<TokenStore, DataError> {
        if self.store.num_docs() == 0 {
            let r = &self.report;
            return Err(DataError::NoDocuments {
                docs_read: r.docs_read,
                empty_skipped: r.empty_skipped,
                dropped: r.dropped,
                limit: self.max_doc_tokens,
            });
        }
        Ok(self.store.finish(self.report))
    }
}

/// The origin of synthetic document `i` (for messages; line = i + 1).
pub(crate) fn synthetic_origin(i: usize) -> Origin<'static> {
    Origin {
        path: Path::new("<synthetic>"),
        line: i + 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(line: usize) -> Origin<'static> {
        Origin {
            path: Path::new("d.jsonl"),
            line,
        }
    }

    /// Documents of these lengths (tokens 10, 11, ...; label bits alternate) through the limits.
    fn run(policy: LongDocuments, max: usize, lens: &[usize]) -> Result<TokenStore, DataError> {
        let mut limits = Limits::new(max, policy, 1000);
        for (i, &n) in lens.iter().enumerate() {
            let doc = Document {
                tokens: (0..n as u32).map(|t| 10 + t).collect(),
                labels: Some((0..n).map(|t| t % 2 == 1).collect()),
            };
            limits.push(doc, at(i + 1))?;
        }
        limits.finish()
    }

    #[test]
    fn empty_documents_are_skipped_and_counted() {
        let s = run(LongDocuments::Split, 8, &[3, 0, 2, 0]).unwrap();
        assert_eq!(s.lengths(), vec![3, 2]);
        let r = s.report();
        assert_eq!((r.docs_read, r.empty_skipped, r.docs), (4, 2, 2));
    }

    #[test]
    fn split_cuts_into_pieces_and_keeps_a_last_piece_of_one() {
        let s = run(LongDocuments::Split, 4, &[3, 9, 4]).unwrap();
        assert_eq!(s.lengths(), vec![3, 4, 4, 1, 4]);
        assert_eq!(s.tokens(2), &[14, 15, 16, 17]);
        assert_eq!(s.tokens(3), &[18]);
        // Label bits follow their tokens into the pieces.
        assert!(!s.is_label(2, 0) && s.is_label(2, 1));
        assert!(!s.is_label(3, 0));
        let r = s.report();
        assert_eq!((r.docs_read, r.split, r.truncated, r.dropped), (3, 1, 0, 0));
        assert_eq!((r.docs, r.tokens), (5, 16));
    }

    #[test]
    fn truncate_keeps_the_first_max_tokens() {
        let s = run(LongDocuments::Truncate, 4, &[3, 9, 5]).unwrap();
        assert_eq!(s.lengths(), vec![3, 4, 4]);
        assert_eq!(s.tokens(1), &[10, 11, 12, 13]);
        let r = s.report();
        assert_eq!((r.docs_read, r.split, r.truncated, r.dropped), (3, 0, 2, 0));
        assert_eq!(r.tokens, 11);
    }

    #[test]
    fn drop_leaves_long_documents_out() {
        let s = run(LongDocuments::Drop, 4, &[3, 9, 4, 5]).unwrap();
        assert_eq!(s.lengths(), vec![3, 4]);
        let r = s.report();
        assert_eq!((r.docs_read, r.split, r.truncated, r.dropped), (4, 0, 0, 2));
        assert_eq!(r.docs, 2);
    }

    #[test]
    fn everything_dropped_is_an_error_with_the_counts() {
        let e = run(LongDocuments::Drop, 4, &[0, 9]).unwrap_err();
        assert!(
            matches!(
                e,
                DataError::NoDocuments {
                    docs_read: 2,
                    empty_skipped: 1,
                    dropped: 1,
                    limit: 4
                }
            ),
            "{e:?}"
        );
    }

    #[test]
    fn token_id_out_of_vocab_names_file_line_and_id() {
        let mut limits = Limits::new(8, LongDocuments::Split, 100);
        limits.push(Document::new(vec![1, 99]), at(1)).unwrap();
        let e = limits
            .push(Document::new(vec![1, 100, 7]), at(2))
            .unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("d.jsonl:2: token id 100") && msg.contains("model.vocab_size = 100"),
            "{msg}"
        );
    }

    #[test]
    fn synthetic_origin_counts_from_one() {
        assert_eq!(synthetic_origin(4).to_string(), "<synthetic>:5");
    }
}
