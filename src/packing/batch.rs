//! [`PackedBatch`]: one bin of documents laid end to end, ready for a varlen forward.
//!
//! Shapes: T packed tokens, N documents. For document k of length l_k starting at s_k:
//! - `tokens[s_k + i]` = token i of the document;
//! - `targets[s_k + i]` = token i + 1 when i + 1 < l_k and token i + 1 is a label, else
//!   [`IGNORE_INDEX`]: the last token of a document predicts nothing, so targets never cross a
//!   boundary, and masked (prompt) tokens are never predicted;
//! - `position_ids[s_k + i]` = i (restart per document; RoPE reads them);
//! - `cu_seqlens` = [0, l_0, l_0 + l_1, ..., T] (N + 1 entries, i32), `max_seqlen` = max l_k.

use super::PackingError;
use crate::data::TokenStore;

/// Target of a position that predicts nothing (PyTorch's cross-entropy convention).
pub const IGNORE_INDEX: i32 = -100;

/// A packed micro-batch of T tokens from N documents.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PackedBatch {
    /// [T] token ids, documents end to end.
    pub tokens: Vec<u32>,
    /// [T] next-token targets, [`IGNORE_INDEX`] where nothing is predicted.
    pub targets: Vec<i32>,
    /// [T] position within the document.
    pub position_ids: Vec<i32>,
    /// [N + 1] document boundaries.
    pub cu_seqlens: Vec<i32>,
    /// Longest document.
    pub max_seqlen: usize,
    /// Targets that are not [`IGNORE_INDEX`] (this batch's share of the loss normaliser).
    pub num_targets: usize,
    /// [N] the documents, in order.
    pub doc_ids: Vec<u32>,
}

impl PackedBatch {
    /// Lay out the documents of `bin` (from a [`super::Plan`]) from `store`.
    pub fn assemble(bin: &[u32], store: &TokenStore) -> Result<PackedBatch, PackingError> {
        let num_docs = store.num_docs();
        let mut total = 0usize;
        for &doc in bin {
            if doc as usize >= num_docs {
                return Err(PackingError::DocOutOfRange {
                    what: "bin",
                    doc,
                    num_docs,
                });
            }
            let len = store.doc_len(doc as usize);
            if len == 0 {
                return Err(PackingError::EmptyDocument { doc });
            }
            total += len;
        }
        if total > i32::MAX as usize {
            return Err(PackingError::BatchTooLarge { tokens: total });
        }

        let mut b = PackedBatch {
            tokens: Vec::with_capacity(total),
            targets: Vec::with_capacity(total),
            position_ids: Vec::with_capacity(total),
            cu_seqlens: Vec::with_capacity(bin.len() + 1),
            max_seqlen: 0,
            num_targets: 0,
            doc_ids: bin.to_vec(),
        };
        b.cu_seqlens.push(0);
        for &doc in bin {
            let toks = store.tokens(doc as usize);
            let l = toks.len();
            for (i, &tok) in toks.iter().enumerate() {
                if tok > i32::MAX as u32 {
                    return Err(PackingError::TokenOutOfRange {
                        doc,
                        index: i,
                        token: tok,
                    });
                }
                // Token i predicts token i + 1 of the same document, if that one is a label.
                let target = if i + 1 < l && store.is_label(doc as usize, i + 1) {
                    b.num_targets += 1;
                    toks[i + 1] as i32
                } else {
                    IGNORE_INDEX
                };
                b.tokens.push(tok);
                b.targets.push(target);
                b.position_ids.push(i as i32);
            }
            b.cu_seqlens.push(b.tokens.len() as i32);
            b.max_seqlen = b.max_seqlen.max(l);
        }
        Ok(b)
    }

    /// T.
    pub fn num_tokens(&self) -> usize {
        self.tokens.len()
    }

    /// N.
    pub fn num_docs(&self) -> usize {
        self.doc_ids.len()
    }
}

#[cfg(test)]
mod tests {
    use super::super::cu_seqlens::{cu_seqlens_from_doc_ids, cu_seqlens_from_position_ids};
    use super::*;
    use crate::data::Document;
    use proptest::prelude::*;

    fn store() -> TokenStore {
        TokenStore::from_documents(&[
            Document::new(vec![1, 2, 3]),
            Document {
                tokens: vec![4, 5, 6, 7],
                labels: Some(vec![false, false, true, true]),
            },
            Document::new(vec![8]),
        ])
    }

    #[test]
    fn layout_of_three_documents() {
        let b = PackedBatch::assemble(&[1, 0, 2], &store()).unwrap();
        assert_eq!(b.tokens, vec![4, 5, 6, 7, 1, 2, 3, 8]);
        let i = IGNORE_INDEX;
        // Doc 1: 4 predicts nothing (5 is prompt), 5 -> 6, 6 -> 7, 7 is last.
        assert_eq!(b.targets, vec![i, 6, 7, i, 2, 3, i, i]);
        assert_eq!(b.position_ids, vec![0, 1, 2, 3, 0, 1, 2, 0]);
        assert_eq!(b.cu_seqlens, vec![0, 4, 7, 8]);
        assert_eq!(b.max_seqlen, 4);
        assert_eq!(b.num_targets, 4);
        assert_eq!(b.num_tokens(), 8);
        assert_eq!(b.doc_ids, vec![1, 0, 2]);
    }

    #[test]
    fn empty_bin_is_an_empty_batch() {
        let b = PackedBatch::assemble(&[], &store()).unwrap();
        assert_eq!(b.num_tokens(), 0);
        assert_eq!(b.cu_seqlens, vec![0]);
        assert_eq!(b.max_seqlen, 0);
    }

    #[test]
    fn bad_doc_id_is_an_error() {
        let e = PackedBatch::assemble(&[0, 7], &store()).unwrap_err();
        assert_eq!(
            e,
            PackingError::DocOutOfRange {
                what: "bin",
                doc: 7,
                num_docs: 3
            }
        );
        assert!(e.to_string().contains("7"), "{e}");
    }

    #[test]
    fn empty_document_is_an_error() {
        let s = TokenStore::from_documents(&[Document::new(vec![1]), Document::new(vec![])]);
        let e = PackedBatch::assemble(&[0, 1], &s).unwrap_err();
        assert_eq!(e, PackingError::EmptyDocument { doc: 1 });
    }

    #[test]
    fn token_beyond_i32_is_an_error() {
        let s = TokenStore::from_documents(&[Document::new(vec![1, u32::MAX])]);
        let e = PackedBatch::assemble(&[0], &s).unwrap_err();
        assert!(
            matches!(
                e,
                PackingError::TokenOutOfRange {
                    doc: 0,
                    index: 1,
                    ..
                }
            ),
            "{e}"
        );
    }

    fn arb_docs() -> impl Strategy<Value = Vec<Document>> {
        prop::collection::vec(
            prop::collection::vec((0u32..1000, any::<bool>()), 1..30).prop_map(|v| Document {
                tokens: v.iter().map(|p| p.0).collect(),
                labels: Some(v.iter().map(|p| p.1).collect()),
            }),
            1..12,
        )
    }

    proptest! {
        #[test]
        fn assembled_batches_keep_documents_apart(docs in arb_docs(), seed in any::<u64>()) {
            let s = TokenStore::from_documents(&docs);
            // A bin: some documents in a seed-dependent order, possibly repeated.
            let bin: Vec<u32> = (0..docs.len() as u64 + 3)
                .map(|k| ((seed.wrapping_mul(k + 1) >> 7) % docs.len() as u64) as u32)
                .collect();
            let b = PackedBatch::assemble(&bin, &s).unwrap();
            let t = b.num_tokens();
            prop_assert_eq!(b.targets.len(), t);
            prop_assert_eq!(b.position_ids.len(), t);
            prop_assert_eq!(b.cu_seqlens.len(), bin.len() + 1);
            prop_assert_eq!(*b.cu_seqlens.last().unwrap() as usize, t);

            let mut expect_targets = 0;
            for (k, &doc) in bin.iter().enumerate() {
                let d = &docs[doc as usize];
                let (s0, s1) = (b.cu_seqlens[k] as usize, b.cu_seqlens[k + 1] as usize);
                prop_assert_eq!(s1 - s0, d.len());
                prop_assert_eq!(&b.tokens[s0..s1], &d.tokens[..]);
                for i in 0..d.len() {
                    // Positions restart at 0 per document.
                    prop_assert_eq!(b.position_ids[s0 + i], i as i32);
                    // Targets: the next token of the same document, if it is a label.
                    let want = if i + 1 < d.len() && d.is_label(i + 1) {
                        expect_targets += 1;
                        d.tokens[i + 1] as i32
                    } else {
                        IGNORE_INDEX
                    };
                    prop_assert_eq!(b.targets[s0 + i], want);
                }
                // Never across a boundary.
                prop_assert_eq!(b.targets[s1 - 1], IGNORE_INDEX);
            }
            prop_assert_eq!(b.num_targets, expect_targets);
            prop_assert_eq!(b.num_targets, b.targets.iter().filter(|&&x| x != IGNORE_INDEX).count());
            prop_assert_eq!(b.max_seqlen, bin.iter().map(|&d| docs[d as usize].len()).max().unwrap());

            // cu_seqlens agrees with both public converters.
            prop_assert_eq!(cu_seqlens_from_position_ids(&b.position_ids), b.cu_seqlens.clone());
            let mut ids = Vec::new();
            for k in 0..bin.len() {
                let n = (b.cu_seqlens[k + 1] - b.cu_seqlens[k]) as usize;
                // Alternate 1/2 so neighbours differ even for a repeated doc.
                ids.extend(std::iter::repeat_n(k as i32 % 2 + 1, n));
            }
            ids.extend([0, 0]);
            prop_assert_eq!(cu_seqlens_from_doc_ids(&ids), b.cu_seqlens.clone());
        }
    }
}
