//! `cu_seqlens` from the two encodings other tools speak: `position_ids` that restart at 0
//! per document, and a document-id mask where 0 is padding.
//!
//! `cu_seqlens = [0, l0, l0 + l1, ..., T]` (i32): document k is tokens `cu[k]..cu[k + 1]` of
//! the (unpadded) packed stream. Empty input gives `[0]`.

/// Document starts are the positions equal to 0; the first token always starts a document
/// (so `[3, 4, 0, 1]` is two documents, `[0, 2]`). Lengths must fit in i32.
pub fn cu_seqlens_from_position_ids(position_ids: &[i32]) -> Vec<i32> {
    let mut cu = vec![0];
    for (j, &p) in position_ids.iter().enumerate().skip(1) {
        if p == 0 {
            cu.push(j as i32);
        }
    }
    if !position_ids.is_empty() {
        cu.push(position_ids.len() as i32);
    }
    cu
}

/// Document ids per token, 0 = padding (`1,1,2,2,2,3,0,0` gives `[0, 2, 5, 6]`). Padding is
/// left out wherever it is, so offsets index the stream without padding; a document starts
/// where the id differs from the previous non-padding id. Lengths must fit in i32.
pub fn cu_seqlens_from_doc_ids(doc_ids: &[i32]) -> Vec<i32> {
    let mut cu = vec![0];
    let mut kept = 0i32;
    let mut prev = None;
    for &id in doc_ids {
        if id == 0 {
            continue;
        }
        if prev.is_some_and(|p| p != id) {
            cu.push(kept);
        }
        prev = Some(id);
        kept += 1;
    }
    if kept > 0 {
        cu.push(kept);
    }
    cu
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn doc_ids_example_from_design() {
        assert_eq!(
            cu_seqlens_from_doc_ids(&[1, 1, 2, 2, 2, 3, 0, 0]),
            vec![0, 2, 5, 6]
        );
    }

    #[test]
    fn empty_and_all_padding() {
        assert_eq!(cu_seqlens_from_position_ids(&[]), vec![0]);
        assert_eq!(cu_seqlens_from_doc_ids(&[]), vec![0]);
        assert_eq!(cu_seqlens_from_doc_ids(&[0, 0, 0]), vec![0]);
    }

    #[test]
    fn padding_anywhere_is_left_out() {
        assert_eq!(cu_seqlens_from_doc_ids(&[0, 1, 1, 0, 2]), vec![0, 2, 3]);
        assert_eq!(cu_seqlens_from_doc_ids(&[1, 0, 1]), vec![0, 2]);
        assert_eq!(cu_seqlens_from_doc_ids(&[5, 5, 0, 0]), vec![0, 2]);
    }

    #[test]
    fn single_tokens_and_odd_starts() {
        assert_eq!(cu_seqlens_from_position_ids(&[0, 0, 0]), vec![0, 1, 2, 3]);
        assert_eq!(cu_seqlens_from_doc_ids(&[1, 2, 1]), vec![0, 1, 2, 3]);
        // The stream starts a document even mid-count (a truncated first document).
        assert_eq!(cu_seqlens_from_position_ids(&[3, 4, 0, 1]), vec![0, 2, 4]);
        assert_eq!(cu_seqlens_from_position_ids(&[7]), vec![0, 1]);
    }

    proptest! {
        /// Both encodings of the same packing give the same cu_seqlens (trailing padding
        /// on the doc-id side changes nothing).
        #[test]
        fn converters_agree(lens in prop::collection::vec(1usize..50, 0..20), pad in 0usize..5) {
            let mut positions = Vec::new();
            let mut ids = Vec::new();
            let mut expect = vec![0i32];
            for (k, &l) in lens.iter().enumerate() {
                positions.extend(0..l as i32);
                ids.extend(std::iter::repeat_n(k as i32 + 1, l));
                expect.push(expect.last().unwrap() + l as i32);
            }
            ids.extend(std::iter::repeat_n(0, pad));
            prop_assert_eq!(cu_seqlens_from_position_ids(&positions), expect.clone());
            prop_assert_eq!(cu_seqlens_from_doc_ids(&ids), expect);
        }
    }
}
