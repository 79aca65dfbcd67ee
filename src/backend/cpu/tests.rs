//! Backend-level tests of `CpuBackend`: the += / overwrite contract, leading-elements-only
//! writes, error paths; determinism and a timing of one layer (ignored by default) in
//! `layer.rs`.

use super::testutil::*;
use super::*;

mod layer;

fn f32s(rng: &mut rand_chacha::ChaCha8Rng, n: usize) -> Vec<f32> {
    randn(rng, n).iter().map(|&x| x as f32).collect()
}

fn cu_of(lens: &[usize]) -> Vec<i32> {
    let mut cu = vec![0i32];
    for &l in lens {
        cu.push(cu.last().unwrap() + l as i32);
    }
    cu
}

fn attn_dims(lens: &[usize], h: usize, hkv: usize, d: usize) -> AttnDims {
    AttnDims {
        t: lens.iter().sum(),
        h,
        hkv,
        d,
        n_docs: lens.len(),
        max_seqlen: lens.iter().copied().max().unwrap_or(0),
    }
}

/// `b == 2 a` up to f32 rounding (a second `+=` adds in a different order than the first).
fn doubled(a: &[f32], b: &[f32]) -> bool {
    let scale = a.iter().fold(1e-30f32, |m, x| m.max(x.abs()));
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(x, y)| (2.0 * x - y).abs() <= 1e-6 * scale)
}

/// Parameter grads and the "+=" input grads double when a backward runs twice on zeroed
/// buffers; overwritten outputs come out the same even over garbage.
#[test]
fn backwards_accumulate_or_overwrite_as_the_trait_says() {
    let be = CpuBackend::new();
    let mut rng = rng(100);
    let (t, c, oc, v) = (37, 8, 6, 11);
    let x = f32s(&mut rng, t * c);
    let w = f32s(&mut rng, oc * c);
    let dout = f32s(&mut rng, t * oc);

    // matmul: dw, dbias +=; dx overwritten, even over NaN (beta 0: never read). The halves
    // on their own do the same as the whole.
    let (mut dx, mut dw, mut db) = (vec![f32::NAN; t * c], vec![0.0; oc * c], vec![0.0; oc]);
    be.matmul_backward(
        &mut dx,
        &mut dw,
        Some(&mut db),
        &dout,
        &x,
        &w,
        t,
        c,
        oc,
        GradWrite::Add,
    )
    .unwrap();
    let (dx1, dw1, db1) = (dx.clone(), dw.clone(), db.clone());
    assert!(dx1.iter().all(|v| v.is_finite()), "matmul dx overwrites");
    dx.fill(f32::NAN);
    be.matmul_backward_input(&mut dx, &dout, &w, t, c, oc)
        .unwrap();
    be.matmul_backward_weight(&mut dw, Some(&mut db), &dout, &x, t, c, oc, GradWrite::Add)
        .unwrap();
    assert_eq!(dx1, dx, "matmul dx");
    assert!(doubled(&dw1, &dw), "matmul dw {dw1:?} {dw:?}");
    assert!(doubled(&db1, &db), "matmul db");

    // rmsnorm: dx, dweight +=; dx_copy overwritten with the new dx.
    let weight = f32s(&mut rng, c);
    let g = f32s(&mut rng, t * c);
    let (mut out, mut rstd) = (vec![0.0; t * c], vec![0.0; t]);
    be.rmsnorm_forward(&mut out, &mut rstd, &x, &weight, t, c, 1e-5)
        .unwrap();
    let (mut dx, mut dwt, mut cp) = (vec![0.0; t * c], vec![0.0; c], vec![f32::NAN; t * c]);
    be.rmsnorm_backward(
        &mut dx,
        None,
        &mut dwt,
        &g,
        &x,
        &weight,
        &rstd,
        t,
        c,
        GradWrite::Add,
    )
    .unwrap();
    let (dx1, dwt1) = (dx.clone(), dwt.clone());
    be.rmsnorm_backward(
        &mut dx,
        Some(&mut cp),
        &mut dwt,
        &g,
        &x,
        &weight,
        &rstd,
        t,
        c,
        GradWrite::Add,
    )
    .unwrap();
    assert!(doubled(&dx1, &dx) && doubled(&dwt1, &dwt), "rmsnorm");
    assert_eq!(cp, dx, "rmsnorm dx_copy");

    // embedding: dwte +=.
    let tokens: Vec<i32> = (0..t as i32).map(|i| i % v as i32).collect();
    let mut dwte = vec![0.0; v * c];
    be.embedding_backward(&mut dwte, &g, &tokens, t, c).unwrap();
    let dwte1 = dwte.clone();
    be.embedding_backward(&mut dwte, &g, &tokens, t, c).unwrap();
    assert!(doubled(&dwte1, &dwte), "embedding");

    // classifier: dw +=, dx and losses overwritten.
    let wv = f32s(&mut rng, v * c);
    let targets: Vec<i32> = (0..t as i32)
        .map(|i| if i % 4 == 0 { -1 } else { i % v as i32 })
        .collect();
    let (mut losses, mut dx, mut dwv) =
        (vec![f32::NAN; t], vec![f32::NAN; t * c], vec![0.0; v * c]);
    be.classifier(
        &mut losses,
        Some((&mut dx, &mut dwv)),
        &x,
        &wv,
        &targets,
        0.5,
        t,
        c,
        v,
        GradWrite::Add,
    )
    .unwrap();
    let (l1, dx1, dwv1) = (losses.clone(), dx.clone(), dwv.clone());
    be.classifier(
        &mut losses,
        Some((&mut dx, &mut dwv)),
        &x,
        &wv,
        &targets,
        0.5,
        t,
        c,
        v,
        GradWrite::Add,
    )
    .unwrap();
    assert!(doubled(&dwv1, &dwv), "classifier dw");
    assert_eq!((l1, dx1), (losses.clone(), dx), "classifier losses, dx");
    let mut l2 = vec![f32::NAN; t];
    be.classifier(
        &mut l2,
        None,
        &x,
        &wv,
        &targets,
        0.5,
        t,
        c,
        v,
        GradWrite::Add,
    )
    .unwrap();
    assert_eq!(l2, losses, "classifier losses without grads");

    // attention and swiglu: overwritten, whatever was there.
    let lens = [1, 30, 6];
    let dims = attn_dims(&lens, 4, 2, 4);
    let cu = cu_of(&lens);
    let qkv = f32s(&mut rng, dims.t * dims.qkv_width());
    let da = f32s(&mut rng, dims.t * 16);
    let (mut o, mut lse) = (vec![f32::NAN; dims.t * 16], vec![f32::NAN; 4 * dims.t]);
    be.attention_forward(&mut o, &mut lse, &qkv, &cu, dims)
        .unwrap();
    let mut dqkv = vec![f32::NAN; qkv.len()];
    be.attention_backward(&mut dqkv, &da, &qkv, &o, &lse, &cu, dims)
        .unwrap();
    assert!(
        o.iter().chain(&lse).chain(&dqkv).all(|x| x.is_finite()),
        "attention overwrites"
    );
    let d1 = dqkv.clone();
    be.attention_backward(&mut dqkv, &da, &qkv, &o, &lse, &cu, dims)
        .unwrap();
    assert_eq!(d1, dqkv, "attention dqkv");
    let gu = f32s(&mut rng, t * 2 * c);
    let (mut dgu, mut sw) = (vec![f32::NAN; t * 2 * c], vec![f32::NAN; t * c]);
    be.swiglu_backward(&mut dgu, Some(&mut sw), &g, &gu, t, c)
        .unwrap();
    assert!(
        dgu.iter().chain(&sw).all(|x| x.is_finite()),
        "swiglu overwrites"
    );
}

/// Buffers longer than the dims: only the leading elements are read or written.
#[test]
fn ops_touch_only_the_leading_elements() {
    let be = CpuBackend::new();
    let mut rng = rng(101);
    let (t, c, oc) = (9, 4, 3);
    let extra = 5;
    let x = f32s(&mut rng, t * c + extra);
    let w = f32s(&mut rng, oc * c + extra);
    let mut out = vec![7.0; t * oc + extra];
    be.matmul_forward(&mut out, &x, &w, None, t, c, oc).unwrap();
    assert!(out[t * oc..].iter().all(|&y| y == 7.0), "matmul out tail");

    let lens = [3, 1, 5];
    let dims = attn_dims(&lens, 2, 1, 4);
    let mut cu = cu_of(&lens);
    cu.push(99); // beyond N + 1: never read
    let qkv = f32s(&mut rng, dims.t * dims.qkv_width() + extra);
    let mut o = vec![7.0; dims.t * 8 + extra];
    let mut lse = vec![7.0; 2 * dims.t + extra];
    be.attention_forward(&mut o, &mut lse, &qkv, &cu, dims)
        .unwrap();
    assert!(
        o[dims.t * 8..]
            .iter()
            .chain(&lse[2 * dims.t..])
            .all(|&y| y == 7.0),
        "attention tails"
    );

    let mut acc = vec![1.0; 10];
    be.add_inplace(&mut acc, &vec![1.0; 10], 4).unwrap();
    assert_eq!(acc, [2., 2., 2., 2., 1., 1., 1., 1., 1., 1.]);
    assert_eq!(
        be.sum_squares(&[(&acc, 4), (&acc, 6)]).unwrap(),
        16.0 + 16.0 + 2.0
    );
    be.scale(&mut acc, 2, 0.5).unwrap();
    assert_eq!(&acc[..3], &[1., 1., 2.]);
}

/// T = 0 (an empty micro-batch) or a zero width: every op succeeds and does nothing.
#[test]
fn zero_sized_dims_are_no_ops() {
    let be = CpuBackend::new();
    let (mut a, mut b, mut c) = (vec![0.0f32; 64], vec![0.0f32; 64], vec![0.0f32; 64]);
    let e: Vec<i32> = vec![];
    let z = vec![0.0f32; 64];
    for (t, k) in [(0, 4), (2, 0)] {
        be.embedding_forward(&mut a, &vec![0; t], &z, t, k).unwrap();
        be.embedding_backward(&mut a, &z, &vec![0; t], t, k)
            .unwrap();
        be.rmsnorm_forward(&mut a, &mut b, &z, &z, t, k, 1e-5)
            .unwrap();
        be.rmsnorm_backward(
            &mut a,
            Some(&mut c),
            &mut b,
            &z,
            &z,
            &z,
            &z,
            t,
            k,
            GradWrite::Add,
        )
        .unwrap();
        for (ic, oc) in [(k, 2), (2, k)] {
            be.matmul_forward(&mut a, &z, &z, Some(&z), t, ic, oc)
                .unwrap();
            be.matmul_backward(
                &mut a,
                &mut b,
                Some(&mut c),
                &z,
                &z,
                &z,
                t,
                ic,
                oc,
                GradWrite::Add,
            )
            .unwrap();
        }
        be.swiglu_forward(&mut a, &z, t, k).unwrap();
        be.swiglu_backward(&mut a, Some(&mut b), &z, &z, t, k)
            .unwrap();
        be.matmul_backward_input(&mut a, &z, &z, t, k, 2).unwrap();
        be.matmul_backward_weight(&mut a, Some(&mut b), &z, &z, t, 2, k, GradWrite::Add)
            .unwrap();
        be.classifier(
            &mut a,
            Some((&mut b, &mut c)),
            &z,
            &z,
            &vec![-1; t],
            1.0,
            t,
            k,
            2,
            GradWrite::Add,
        )
        .unwrap();
    }
    let dims = AttnDims {
        t: 0,
        h: 2,
        hkv: 1,
        d: 2,
        n_docs: 0,
        max_seqlen: 0,
    };
    be.rope_forward(&mut a, &e, &z, dims).unwrap();
    be.attention_forward(&mut a, &mut b, &z, &vec![0], dims)
        .unwrap();
    be.attention_backward(&mut a, &z, &z, &z, &z, &vec![0], dims)
        .unwrap();
    // An empty document inside a batch is allowed too.
    let dims = AttnDims {
        t: 2,
        n_docs: 3,
        max_seqlen: 1,
        ..dims
    };
    be.attention_forward(&mut a, &mut b, &z, &vec![0, 1, 1, 2], dims)
        .unwrap();
}

fn op_of(r: Result<(), BackendError>) -> &'static str {
    match r {
        Err(BackendError::Shape { op, .. }) => op,
        other => panic!("expected a shape error, got {other:?}"),
    }
}

#[test]
fn short_buffers_are_shape_errors_naming_the_op() {
    let be = CpuBackend::new();
    let short = vec![0.0f32; 3];
    let ok = vec![0.0f32; 64];
    let (mut a, mut b) = (vec![0.0f32; 64], vec![0.0f32; 64]);
    let tok = vec![0i32; 4];
    let (t, c) = (4, 4);
    assert_eq!(
        op_of(be.embedding_forward(&mut a, &tok, &short, t, c)),
        "embedding_forward"
    );
    assert_eq!(
        op_of(be.embedding_backward(&mut a, &short, &tok, t, c)),
        "embedding_backward"
    );
    assert_eq!(
        op_of(be.rmsnorm_forward(&mut a, &mut b, &short, &ok, t, c, 1e-5)),
        "rmsnorm_forward"
    );
    let mut s = short.clone();
    assert_eq!(
        op_of(be.rmsnorm_backward(
            &mut a,
            None,
            &mut s,
            &ok,
            &ok,
            &ok,
            &ok,
            t,
            c,
            GradWrite::Add
        )),
        "rmsnorm_backward"
    );
    let mut s2 = short.clone();
    assert_eq!(
        op_of(be.rmsnorm_backward(
            &mut a,
            Some(&mut s2),
            &mut b,
            &ok,
            &ok,
            &ok,
            &ok,
            t,
            c,
            GradWrite::Add
        )),
        "rmsnorm_backward"
    );
    assert_eq!(
        op_of(be.matmul_forward(&mut a, &ok, &ok, Some(&short), t, c, c)),
        "matmul_forward"
    );
    assert_eq!(
        op_of(be.matmul_backward(
            &mut a,
            &mut b,
            None,
            &short,
            &ok,
            &ok,
            t,
            c,
            c,
            GradWrite::Add
        )),
        "matmul_backward_input"
    );
    assert_eq!(
        op_of(be.matmul_backward(
            &mut a,
            &mut b,
            None,
            &ok,
            &short,
            &ok,
            t,
            c,
            c,
            GradWrite::Add
        )),
        "matmul_backward_weight"
    );
    assert_eq!(
        op_of(be.swiglu_forward(&mut a, &short, t, c)),
        "swiglu_forward"
    );
    assert_eq!(
        op_of(be.swiglu_backward(&mut s, None, &ok, &ok, t, c)),
        "swiglu_backward"
    );
    let mut s2 = short.clone();
    assert_eq!(
        op_of(be.swiglu_backward(&mut a, Some(&mut s2), &ok, &ok, t, c)),
        "swiglu_backward"
    );
    assert_eq!(op_of(be.add_inplace(&mut a, &short, 10)), "add_inplace");
    let mut l = vec![0.0; 4];
    assert_eq!(
        op_of(be.classifier(
            &mut l,
            Some((&mut s, &mut b)),
            &ok,
            &ok,
            &tok,
            1.0,
            t,
            c,
            4,
            GradWrite::Add
        )),
        "classifier"
    );
    assert_eq!(op_of(be.scale(&mut s, 10, 1.0)), "scale");
    let hp = AdamWStep {
        lr: 1e-3,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.0,
        grad_scale: 1.0,
        step: 1,
    };
    assert_eq!(
        op_of(be.adamw(&mut a, &short, &mut b, &mut l, 10, hp)),
        "adamw"
    );
    assert_eq!(
        op_of(be.sum_squares(&[(&ok, 1), (&short, 4)]).map(|_| ())),
        "sum_squares"
    );
    assert_eq!(op_of(be.download(&short, 4).map(|_| ())), "download");
    assert_eq!(op_of(be.copy(&mut a, &short, 4)), "copy");
    assert_eq!(op_of(be.zero(&mut s, 4)), "zero");
    assert_eq!(op_of(be.upload(&mut s, &[0.0; 4])), "upload");

    let dims = attn_dims(&[2, 2], 2, 1, 2);
    let cu = cu_of(&[2, 2]);
    let pos = vec![0i32; 4];
    let mut sh = short.clone();
    assert_eq!(
        op_of(be.rope_forward(&mut sh, &pos, &ok, dims)),
        "rope_forward"
    );
    assert_eq!(
        op_of(be.rope_backward(&mut a, &pos, &vec![], dims)),
        "rope_backward"
    );
    assert_eq!(
        op_of(be.attention_forward(&mut a, &mut sh, &ok, &cu, dims)),
        "attention_forward"
    );
    assert_eq!(
        op_of(be.attention_backward(&mut a, &ok, &ok, &ok, &short, &cu, dims)),
        "attention_backward"
    );
    assert_eq!(
        op_of(be.attention_forward(&mut a, &mut b, &ok, &vec![0, 2], dims)),
        "attention_forward"
    );
}

#[test]
fn bad_dims_and_indices_are_shape_errors() {
    let be = CpuBackend::new();
    let ok = vec![0.0f32; 256];
    let (mut a, mut b) = (vec![0.0f32; 256], vec![0.0f32; 256]);
    let lens = [3, 5];
    let good = attn_dims(&lens, 4, 2, 4);
    let cu = cu_of(&lens);
    assert!(be.attention_forward(&mut a, &mut b, &ok, &cu, good).is_ok());
    let msg = |r: Result<(), BackendError>| r.unwrap_err().to_string();
    // Hkv does not divide H.
    let m = msg(be.attention_forward(&mut a, &mut b, &ok, &cu, AttnDims { h: 3, ..good }));
    assert!(
        m.starts_with("attention_forward: ") && m.contains("Hkv dividing H"),
        "{m}"
    );
    // cu_seqlens not ending at T, not starting at 0, decreasing, a document over max_seqlen.
    let m = msg(be.attention_forward(&mut a, &mut b, &ok, &vec![0, 3, 7], good));
    assert!(m.contains("must end at T = 8"), "{m}");
    let m = msg(be.attention_backward(&mut a, &ok, &ok, &ok, &ok, &vec![1, 3, 8], good));
    assert!(
        m.starts_with("attention_backward") && m.contains("must be 0"),
        "{m}"
    );
    let long = AttnDims {
        max_seqlen: 100,
        ..good
    };
    let m = msg(be.attention_forward(&mut a, &mut b, &ok, &vec![0, 9, 8], long));
    assert!(m.contains("decreases"), "{m}");
    let m = msg(be.attention_forward(
        &mut a,
        &mut b,
        &ok,
        &cu,
        AttnDims {
            max_seqlen: 4,
            ..good
        },
    ));
    assert!(m.contains("max_seqlen"), "{m}");
    // RoPE needs an even head dim.
    let pos = vec![0i32; 8];
    let m = msg(be.rope_forward(&mut a, &pos, &ok, AttnDims { d: 3, ..good }));
    assert!(m.contains("must be even"), "{m}");
    // Token outside the table, negative token, target >= V.
    let m = msg(be.embedding_forward(&mut a, &vec![0, 5], &vec![0.0; 8], 2, 2));
    assert!(m.contains("tokens[1] = 5"), "{m}");
    let m = msg(be.embedding_backward(&mut a, &ok, &vec![-1, 0], 2, 2));
    assert!(m.contains("tokens[0] = -1"), "{m}");
    let mut l = vec![0.0; 2];
    let m = msg(be.classifier(
        &mut l,
        None,
        &ok,
        &ok,
        &vec![-100, 4],
        1.0,
        2,
        2,
        4,
        GradWrite::Add,
    ));
    assert!(m.contains("targets[1] = 4"), "{m}");
    // AdamW's step is 1-based.
    let hp = AdamWStep {
        lr: 1e-3,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.0,
        grad_scale: 1.0,
        step: 0,
    };
    let (mut m1, mut v1) = (vec![0.0; 4], vec![0.0; 4]);
    assert!(msg(be.adamw(&mut a, &ok, &mut m1, &mut v1, 4, hp)).contains("1-based"));
    // Overflowing dims.
    assert!(msg(be.matmul_forward(&mut a, &ok, &ok, None, usize::MAX, 2, 2)).contains("overflow"));
}

/// The trait's default `matmul_forward_residual` is the GEMM then the add, bitwise; a short
/// residual is a shape error naming the op.
#[test]
fn matmul_forward_residual_is_matmul_then_add() {
    let be = CpuBackend::new();
    let (t, ic, oc) = (5, 7, 3);
    let x: Vec<f32> = (0..t * ic).map(|i| (i as f32 * 0.37).sin()).collect();
    let w: Vec<f32> = (0..oc * ic).map(|i| (i as f32 * 0.11).cos()).collect();
    let r: Vec<f32> = (0..t * oc).map(|i| i as f32 * 0.5 - 3.0).collect();
    let mut fused = vec![f32::NAN; t * oc];
    be.matmul_forward_residual(&mut fused, &x, &w, &r, t, ic, oc)
        .unwrap();
    let mut apart = vec![0.0; t * oc];
    be.matmul_forward(&mut apart, &x, &w, None, t, ic, oc)
        .unwrap();
    be.add_inplace(&mut apart, &r, t * oc).unwrap();
    assert_eq!(fused, apart);
    let short = vec![0.0; t * oc - 1];
    let err = be
        .matmul_forward_residual(&mut fused, &x, &w, &short, t, ic, oc)
        .unwrap_err();
    assert!(err.to_string().contains("matmul_forward_residual"), "{err}");
    assert!(
        fused.iter().all(|v| v.is_finite()),
        "out untouched on error"
    );
}

/// `GradWrite::Overwrite` (the first micro-step) gives, from NaN-poisoned gradients, exactly
/// what `GradWrite::Add` gives from zeroed ones, for every op that writes a weight gradient.
#[test]
fn overwrite_equals_add_into_zeros() {
    let be = CpuBackend::new();
    let (t, ic, oc, v) = (13, 6, 5, 11);
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    let run = |write: GradWrite, start: f32| {
        let mut r = rng(42);
        let (x, dout) = (f32s(&mut r, t * ic), f32s(&mut r, t * oc));
        let (mut dw, mut db) = (vec![start; oc * ic], vec![start; oc]);
        be.matmul_backward_weight(&mut dw, Some(&mut db), &dout, &x, t, ic, oc, write)
            .unwrap();
        let (w, rstd) = (f32s(&mut r, ic), vec![0.7; t]);
        let (mut dx, mut dweight) = (vec![0.0; t * ic], vec![start; ic]);
        be.rmsnorm_backward(&mut dx, None, &mut dweight, &x, &x, &w, &rstd, t, ic, write)
            .unwrap();
        let wv = f32s(&mut r, v * ic);
        let targets: Vec<i32> = (0..t as i32).map(|i| (i * 3) % v as i32).collect();
        let (mut losses, mut dxc, mut dwc) = (vec![0.0; t], vec![0.0; t * ic], vec![start; v * ic]);
        be.classifier(
            &mut losses,
            Some((&mut dxc, &mut dwc)),
            &x,
            &wv,
            &targets,
            0.1,
            t,
            ic,
            v,
            write,
        )
        .unwrap();
        [dw, db, dweight, dwc]
    };
    let (over, add) = (
        run(GradWrite::Overwrite, f32::NAN),
        run(GradWrite::Add, 0.0),
    );
    for (o, a) in over.iter().zip(&add) {
        assert_eq!(bits(o), bits(a));
        assert!(o.iter().all(|x| x.is_finite()));
    }
}
