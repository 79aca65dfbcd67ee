//! The op cases: one `c.case(..)` entry per op and direction, grouped by family.

use rand::Rng;

use super::harness::{cu_of, positions_of, ragged_lengths, CaseError, CaseRun, Cases, Io};
use super::model_case::{model_case, ModelOutputs};
use crate::backend::cpu::CpuBackend;
use crate::backend::{AdamWStep, AdamWTensor, AttnDims, Backend, GradWrite};
use crate::model::rope_inv_freq;
use crate::packing::IGNORE_INDEX;

/// Op-level shapes: C, V, F and the packed batch of the op cases.
const C: usize = 256;
const V: usize = 1000;
const F: usize = 688;
const OP_DOCS: usize = 12;
const OP_TOKENS: usize = 1100;

/// Every case on backend `be`, inputs from `seed`.
pub fn op_cases<B: Backend>(be: &B, seed: u64, only: Option<&str>) -> Vec<CaseRun> {
    let mut c = Cases {
        be,
        seed,
        only,
        runs: Vec::new(),
        act: false,
    };
    op_list(&mut c);
    c.act = true;
    op_list(&mut c);
    c.runs
}

/// Every case; run once with full-precision buffers and once with activation-kind buffers
/// from `alloc_act` (see [`Io::input`] and [`Io::full`]).
fn op_list<B: Backend>(c: &mut Cases<B>) {
    // ------------------------------------------------------------ memory
    c.case("copy", "memory", |io| {
        let n = 4099;
        let x = io.randn(n, 1.0);
        // Full precision into activation kind: a conversion in the second pass.
        let xb = io.full(&x)?;
        let mut out = io.poisoned(n)?;
        io.be.copy(&mut out, &xb, n)?;
        io.output("dst", &out, n)
    });
    c.case("zero", "memory", |io| {
        let n = 4099;
        let x = io.randn(n, 1.0);
        let mut b = io.input(&x)?;
        io.be.zero(&mut b, n)?;
        io.output("buf", &b, n)
    });

    // ------------------------------------------------------------ embedding
    c.case("embedding_forward", "embedding", |io| {
        let t = OP_TOKENS + 7;
        let wte = io.randn(V * C, 1.0);
        let tokens: Vec<i32> = (0..t).map(|_| io.rng.random_range(0..V as i32)).collect();
        let (w, tok) = (io.full(&wte)?, io.input_idx(&tokens)?);
        let mut out = io.poisoned(t * C)?;
        io.be.embedding_forward(&mut out, &tok, &w, t, C)?;
        io.output("out", &out, t * C)
    });
    c.case("embedding_backward", "embedding", |io| {
        let t = OP_TOKENS + 7;
        // Half the tokens from a few ids: many rows add into the same dwte row.
        let tokens: Vec<i32> = (0..t)
            .map(|i| {
                let hi = if i % 2 == 0 { 8 } else { V as i32 };
                io.rng.random_range(0..hi)
            })
            .collect();
        let dout = io.randn(t * C, 1.0);
        let dwte0 = io.randn(V * C, 1.0);
        let (tok, d) = (io.input_idx(&tokens)?, io.input(&dout)?);
        let mut dwte = io.full(&dwte0)?;
        io.be.embedding_backward(&mut dwte, &d, &tok, t, C)?;
        io.output("dwte (+=)", &dwte, V * C)
    });

    // ------------------------------------------------------------ rmsnorm
    let t = OP_TOKENS + 3;
    // C = 256 takes the CUDA `_vec8` row kernels (C % 8 == 0), C + 4 the scalar ones.
    for cc in [C, C + 4] {
        let tag = if cc == C { "" } else { "[C%8!=0]" };
        c.case(format!("rmsnorm_forward{tag}"), "rmsnorm", |io| {
            let x = io.randn(t * cc, 2.0);
            let w = io.uniform(cc, 0.5, 1.5);
            let (xb, wb) = (io.input(&x)?, io.full(&w)?);
            let (mut out, mut rstd) = (io.poisoned(t * cc)?, io.poisoned_full(t)?);
            io.be
                .rmsnorm_forward(&mut out, &mut rstd, &xb, &wb, t, cc, 1e-5)?;
            io.output("out", &out, t * cc)?;
            io.output("rstd", &rstd, t)
        });
        // With the optional dx_copy (activation kind: the model's dres_act, the GEMMs' dout).
        // And dweight written over a poisoned buffer (the first micro-step).
        for (with_copy, write) in [
            (false, GradWrite::Add),
            (true, GradWrite::Add),
            (true, GradWrite::Overwrite),
        ] {
            let name = format!(
                "rmsnorm_backward{tag}{}{}",
                if with_copy { "[dx_copy]" } else { "" },
                if write == GradWrite::Overwrite {
                    "[overwrite]"
                } else {
                    ""
                }
            );
            c.case(name, "rmsnorm", |io| {
                let x = io.randn(t * cc, 2.0);
                let w = io.uniform(cc, 0.5, 1.5);
                let dout = io.randn(t * cc, 1.0);
                let rstd: Vec<f32> = x
                    .chunks(cc)
                    .map(|r| {
                        let ms = r.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / cc as f64;
                        (1.0 / (ms + 1e-5).sqrt()) as f32
                    })
                    .collect();
                let dx0 = io.randn(t * cc, 1.0);
                let dw0 = match write {
                    GradWrite::Add => io.randn(cc, 1.0),
                    GradWrite::Overwrite => vec![f32::NAN; cc],
                };
                let (xb, wb, db, rb) = (
                    io.input(&x)?,
                    io.full(&w)?,
                    io.input(&dout)?,
                    io.full(&rstd)?,
                );
                // dx is the model's dres: full precision.
                let (mut dx, mut dw) = (io.full(&dx0)?, io.full(&dw0)?);
                let mut cp = io.poisoned(t * cc)?;
                let copy = with_copy.then_some(&mut cp);
                io.be
                    .rmsnorm_backward(&mut dx, copy, &mut dw, &db, &xb, &wb, &rb, t, cc, write)?;
                io.output("dx (+=)", &dx, t * cc)?;
                io.output("dweight", &dw, cc)?;
                if with_copy {
                    io.output("dx_copy", &cp, t * cc)?;
                }
                Ok(())
            });
        }
    }

    // ------------------------------------------------------------ matmul
    for (tag, ic, oc, bias) in [
        ("", C, 3 * C / 2, false),
        ("[bias]", C, 3 * C / 2, true),
        ("[odd]", 100, 333, true),
    ] {
        let t = OP_TOKENS + 1;
        c.case(format!("matmul_forward{tag}"), "matmul", |io| {
            let x = io.randn(t * ic, 1.0);
            let w = io.randn(oc * ic, 0.1);
            let b = io.randn(oc, 1.0);
            let (xb, wb, bb) = (io.input(&x)?, io.input(&w)?, io.full(&b)?);
            let mut out = io.poisoned(t * oc)?;
            io.be
                .matmul_forward(&mut out, &xb, &wb, bias.then_some(&bb), t, ic, oc)?;
            io.output("out", &out, t * oc)
        });
        // The residual rides in the GEMM's C operand (no bias: the model has none there); the
        // odd shape gives rows only 2-byte aligned in bf16.
        if !bias || tag == "[odd]" {
            c.case(format!("matmul_forward_residual{tag}"), "matmul", |io| {
                let x = io.randn(t * ic, 1.0);
                let w = io.randn(oc * ic, 0.1);
                let r = io.randn(t * oc, 1.0);
                let (xb, wb, rb) = (io.input(&x)?, io.input(&w)?, io.input(&r)?);
                let mut out = io.poisoned(t * oc)?;
                io.be
                    .matmul_forward_residual(&mut out, &xb, &wb, &rb, t, ic, oc)?;
                io.output("out", &out, t * oc)
            });
        }
        c.case(format!("matmul_backward{tag}"), "matmul", |io| {
            let x = io.randn(t * ic, 1.0);
            let w = io.randn(oc * ic, 0.1);
            let dout = io.randn(t * oc, 1.0);
            let (dw0, db0) = (io.randn(oc * ic, 1.0), io.randn(oc, 1.0));
            let (xb, wb, dob) = (io.input(&x)?, io.input(&w)?, io.input(&dout)?);
            // dx is overwritten: poisoned, so a GEMM reading it (beta != 0) comes out NaN.
            let (mut dx, mut dw, mut db) = (io.poisoned(t * ic)?, io.full(&dw0)?, io.full(&db0)?);
            io.be.matmul_backward(
                &mut dx,
                &mut dw,
                bias.then_some(&mut db),
                &dob,
                &xb,
                &wb,
                t,
                ic,
                oc,
                GradWrite::Add,
            )?;
            io.output("dx", &dx, t * ic)?;
            io.output("dw (+=)", &dw, oc * ic)?;
            if bias {
                io.output("dbias (+=)", &db, oc)?;
            }
            Ok(())
        });
        // The two halves on their own (the model's Wdown backward runs them apart).
        c.case(format!("matmul_backward_input{tag}"), "matmul", |io| {
            let w = io.randn(oc * ic, 0.1);
            let dout = io.randn(t * oc, 1.0);
            let (wb, dob) = (io.input(&w)?, io.input(&dout)?);
            let mut dx = io.poisoned(t * ic)?;
            io.be.matmul_backward_input(&mut dx, &dob, &wb, t, ic, oc)?;
            io.output("dx", &dx, t * ic)
        });
        // Added into random gradients, and written over poisoned ones (the first micro-step).
        for write in [GradWrite::Add, GradWrite::Overwrite] {
            let (mode, op) = match write {
                GradWrite::Add => ("", "+="),
                GradWrite::Overwrite => ("[overwrite]", "="),
            };
            c.case(
                format!("matmul_backward_weight{tag}{mode}"),
                "matmul",
                |io| {
                    let x = io.randn(t * ic, 1.0);
                    let dout = io.randn(t * oc, 1.0);
                    let (dw0, db0) = match write {
                        GradWrite::Add => (io.randn(oc * ic, 1.0), io.randn(oc, 1.0)),
                        GradWrite::Overwrite => (vec![f32::NAN; oc * ic], vec![f32::NAN; oc]),
                    };
                    let (xb, dob) = (io.input(&x)?, io.input(&dout)?);
                    let (mut dw, mut db) = (io.full(&dw0)?, io.full(&db0)?);
                    io.be.matmul_backward_weight(
                        &mut dw,
                        bias.then_some(&mut db),
                        &dob,
                        &xb,
                        t,
                        ic,
                        oc,
                        write,
                    )?;
                    io.output(&format!("dw ({op})"), &dw, oc * ic)?;
                    if bias {
                        io.output(&format!("dbias ({op})"), &db, oc)?;
                    }
                    Ok(())
                },
            );
        }
    }

    // ------------------------------------------------------------ rope
    for d in [32usize, 128] {
        let (h, hkv) = (8usize, 2usize);
        c.case(format!("rope_forward[D={d}]"), "rope", |io| {
            let lens = ragged_lengths(&mut io.rng, OP_DOCS, OP_TOKENS, false);
            let dims = attn_dims(&lens, h, hkv, d);
            let qkv = io.randn(dims.t * dims.qkv_width(), 1.0);
            let pos = io.input_idx(&positions_of(&lens))?;
            let inv = io.full(&rope_inv_freq(10000.0, d))?;
            let mut b = io.input(&qkv)?;
            io.be.rope_forward(&mut b, &pos, &inv, dims)?;
            io.output("qkv", &b, dims.t * dims.qkv_width())
        });
        c.case(format!("rope_backward[D={d}]"), "rope", |io| {
            let lens = ragged_lengths(&mut io.rng, OP_DOCS, OP_TOKENS, false);
            let dims = attn_dims(&lens, h, hkv, d);
            let dqkv = io.randn(dims.t * dims.qkv_width(), 1.0);
            let pos = io.input_idx(&positions_of(&lens))?;
            let inv = io.full(&rope_inv_freq(500000.0, d))?;
            let mut b = io.input(&dqkv)?;
            io.be.rope_backward(&mut b, &pos, &inv, dims)?;
            io.output("dqkv", &b, dims.t * dims.qkv_width())
        });
    }

    // ------------------------------------------------------------ attention
    // D = 64 and 128 take the CUDA backend's flash kernels (when enabled), GQA included.
    for (d, h, hkv) in [
        (32usize, 8usize, 2usize),
        (64, 8, 8),
        (64, 8, 2),
        (128, 4, 1),
    ] {
        c.case(
            format!("attention_forward[D={d},H={h},Hkv={hkv}]"),
            "attention",
            |io| {
                let lens = ragged_lengths(&mut io.rng, OP_DOCS, OP_TOKENS, true);
                let dims = attn_dims(&lens, h, hkv, d);
                let qkv = io.randn(dims.t * dims.qkv_width(), 1.0);
                let (qb, cu) = (io.input(&qkv)?, io.input_idx(&cu_of(&lens))?);
                let (mut out, mut lse) =
                    (io.poisoned(dims.t * h * d)?, io.poisoned_full(h * dims.t)?);
                io.be
                    .attention_forward(&mut out, &mut lse, &qb, &cu, dims)?;
                io.output("out", &out, dims.t * h * d)?;
                io.output("lse", &lse, h * dims.t)
            },
        );
        c.case(
            format!("attention_backward[D={d},H={h},Hkv={hkv}]"),
            "attention",
            |io| {
                let b = backward_inputs(io, h, hkv, d)?;
                let mut dqkv = io.poisoned(b.dims.t * b.dims.qkv_width())?;
                io.be.attention_backward(
                    &mut dqkv, &b.dout, &b.qkv, &b.out, &b.lse, &b.cu, b.dims,
                )?;
                io.output("dqkv", &dqkv, b.dims.t * b.dims.qkv_width())
            },
        );
    }

    // Enough 128-row tiles x heads for several per block of the CUDA backend's persistent
    // warp-specialised kernels (D = 128 on Hopper): their buffers and stages wrap around
    // within a block.
    c.case(
        "attention_forward[D=128,H=16,Hkv=4,3000 tokens]".to_string(),
        "attention",
        |io| {
            let (h, hkv, d) = (16usize, 4usize, 128usize);
            let lens = ragged_lengths(&mut io.rng, 8, 3000, true);
            let dims = attn_dims(&lens, h, hkv, d);
            let qkv = io.randn(dims.t * dims.qkv_width(), 1.0);
            let (qb, cu) = (io.input(&qkv)?, io.input_idx(&cu_of(&lens))?);
            let (mut out, mut lse) = (io.poisoned(dims.t * h * d)?, io.poisoned_full(h * dims.t)?);
            io.be
                .attention_forward(&mut out, &mut lse, &qb, &cu, dims)?;
            io.output("out", &out, dims.t * h * d)?;
            io.output("lse", &lse, h * dims.t)
        },
    );

    c.case(
        "attention_backward[D=128,H=16,Hkv=4,3000 tokens]".to_string(),
        "attention",
        |io| {
            let b = backward_inputs_of(io, 16, 4, 128, 8, 3000)?;
            let mut dqkv = io.poisoned(b.dims.t * b.dims.qkv_width())?;
            io.be
                .attention_backward(&mut dqkv, &b.dout, &b.qkv, &b.out, &b.lse, &b.cu, b.dims)?;
            io.output("dqkv", &dqkv, b.dims.t * b.dims.qkv_width())
        },
    );

    // ------------------------------------------------------------ attention's and RoPE's backward
    // The CUDA backend fuses them on Hopper's wgmma kernels (the "[act]" pass's bf16 buffers);
    // elsewhere, and on the CPU, they are the two ops in a row. Positions run past 5000 in the
    // odd documents (a document may start anywhere, e.g. a continued one).
    // (H = Hkv: one query head per kv head, so no dK/dV item is split and the fused rotation
    // runs in the kernel's whole-tile store.)
    for (d, h, hkv, theta) in [
        (32usize, 8usize, 2usize, 10000.0),
        (64, 8, 2, 10000.0),
        (64, 4, 4, 10000.0),
        (128, 4, 1, 500000.0),
    ] {
        let positions = |lens: &[usize]| -> Vec<i32> {
            let mut at = 0;
            let mut p = positions_of(lens);
            for (i, &l) in lens.iter().enumerate() {
                if i % 2 == 1 {
                    p[at..at + l].iter_mut().for_each(|x| *x += 5000);
                }
                at += l;
            }
            p
        };
        c.case(
            format!("attention_rope_backward[D={d},H={h},Hkv={hkv}]"),
            "attention",
            |io| {
                // qkv stands for the rotated one.
                let b = backward_inputs(io, h, hkv, d)?;
                let pos = io.input_idx(&positions(&b.lens))?;
                let inv = io.full(&rope_inv_freq(theta, d))?;
                let mut dqkv = io.poisoned(b.dims.t * b.dims.qkv_width())?;
                io.be.attention_rope_backward(
                    &mut dqkv, &b.dout, &b.qkv, &b.out, &b.lse, &pos, &inv, &b.cu, b.dims,
                )?;
                io.output("dqkv", &dqkv, b.dims.t * b.dims.qkv_width())
            },
        );
    }

    // ------------------------------------------------------------ swiglu, add, scale
    let t = OP_TOKENS + 5;
    // F = 688 takes the CUDA `_vec8` kernels (F % 8 == 0), F + 2 the scalar ones.
    for ff in [F, F + 2] {
        let tag = if ff == F { "" } else { "[F%8!=0]" };
        c.case(format!("swiglu_forward{tag}"), "swiglu", |io| {
            let gu = io.randn(t * 2 * ff, 2.0);
            let g = io.input(&gu)?;
            let mut out = io.poisoned(t * ff)?;
            io.be.swiglu_forward(&mut out, &g, t, ff)?;
            io.output("out", &out, t * ff)
        });
        // With the optional output s (the forward's value, written in the same pass).
        for with_s in [false, true] {
            let name = format!("swiglu_backward{tag}{}", if with_s { "[s]" } else { "" });
            c.case(name, "swiglu", |io| {
                let gu = io.randn(t * 2 * ff, 2.0);
                let dout = io.randn(t * ff, 1.0);
                let (g, d) = (io.input(&gu)?, io.input(&dout)?);
                let (mut dgu, mut s) = (io.poisoned(t * 2 * ff)?, io.poisoned(t * ff)?);
                let s_out = with_s.then_some(&mut s);
                io.be.swiglu_backward(&mut dgu, s_out, &d, &g, t, ff)?;
                io.output("dgate_up", &dgu, t * 2 * ff)?;
                if with_s {
                    io.output("s", &s, t * ff)?;
                }
                Ok(())
            });
        }
    }
    // n = T C takes the CUDA `_vec8` add (n % 8 == 0), T C + 3 the scalar one.
    for (tag, n) in [("", t * C), ("[n%8!=0]", t * C + 3)] {
        c.case(format!("add_inplace{tag}"), "add", |io| {
            let (a0, x) = (io.randn(n, 1.0), io.randn(n, 1.0));
            let (mut a, xb) = (io.input(&a0)?, io.input(&x)?);
            io.be.add_inplace(&mut a, &xb, n)?;
            io.output("acc (+=)", &a, n)
        });
    }
    c.case("scale", "scale", |io| {
        let n = t * C + 1;
        let x = io.randn(n, 1.0);
        let mut b = io.full(&x)?;
        io.be.scale(&mut b, n, 0.37)?;
        io.output("buf", &b, n)
    });

    // ------------------------------------------------------------ classifier
    for (grads, write) in [
        (false, GradWrite::Add),
        (true, GradWrite::Add),
        (true, GradWrite::Overwrite),
    ] {
        let name = match (grads, write) {
            (false, _) => "classifier[loss only]",
            (true, GradWrite::Add) => "classifier[grads]",
            (true, GradWrite::Overwrite) => "classifier[grads][overwrite]",
        };
        c.case(name, "classifier", |io| {
            let t = OP_TOKENS + 9;
            let x = io.randn(t * C, 1.0);
            let w = io.randn(V * C, 0.1);
            // Every 7th target ignored, the last one too (a document end).
            let targets: Vec<i32> = (0..t)
                .map(|i| {
                    if i % 7 == 3 || i + 1 == t {
                        IGNORE_INDEX
                    } else {
                        io.rng.random_range(0..V as i32)
                    }
                })
                .collect();
            let n_targets = targets.iter().filter(|&&x| x >= 0).count();
            let (xb, wb, tb) = (io.input(&x)?, io.input(&w)?, io.input_idx(&targets)?);
            let mut losses = io.poisoned_full(t)?;
            let scale = 1.0 / n_targets as f32;
            if grads {
                let dw0 = match write {
                    GradWrite::Add => io.randn(V * C, 1e-3),
                    GradWrite::Overwrite => vec![f32::NAN; V * C],
                };
                let (mut dx, mut dw) = (io.poisoned(t * C)?, io.full(&dw0)?);
                io.be.classifier(
                    &mut losses,
                    Some((&mut dx, &mut dw)),
                    &xb,
                    &wb,
                    &tb,
                    scale,
                    t,
                    C,
                    V,
                    write,
                )?;
                io.output("losses", &losses, t)?;
                io.output("dx", &dx, t * C)?;
                io.output("dw", &dw, V * C)
            } else {
                io.be.classifier(
                    &mut losses,
                    None,
                    &xb,
                    &wb,
                    &tb,
                    scale,
                    t,
                    C,
                    V,
                    GradWrite::Add,
                )?;
                io.output("losses", &losses, t)
            }
        });
    }

    // ------------------------------------------------------------ optimizer
    // `[bf16]`: activation-kind buffers holding bf16 values (`train.bf16_grads`). Sizes with
    // and without whole 8-element vectors (the CUDA kernels per buffer), and all in whole
    // vectors (one launch over every buffer).
    let per_buffer = [1usize, 1000, 65_537, 300_001, 300_000];
    let one_launch = [1000usize, 65_536, 8, 300_000, 16];
    for (bf16, sizes) in [
        (false, per_buffer),
        (true, per_buffer),
        (false, one_launch),
        (true, one_launch),
    ] {
        let tag = format!(
            "{}{}",
            if bf16 { "[bf16]" } else { "" },
            if sizes == one_launch {
                "[one launch]"
            } else {
                ""
            }
        );
        c.case(format!("sum_squares{tag}"), "sum_squares", |io| {
            let data: Vec<Vec<f32>> = sizes.iter().map(|&n| io.randn(n, 0.01)).collect();
            let bufs = data
                .iter()
                .map(|d| match bf16 {
                    true => io.input(&bf16_values(d)),
                    false => io.full(d),
                })
                .collect::<Result<Vec<_>, _>>()?;
            let list: Vec<(&B::Buf, usize)> = bufs.iter().zip(sizes).collect();
            let s = io.be.sum_squares(&list)?;
            io.output_host("sum", vec![s as f32]);
            Ok(())
        });
    }
    // n odd: the CUDA scalar kernels; a multiple of 8: the 16-byte (vec8) kernel.
    for (tag, step, zero_moments, n) in [
        ("[step 1]", 1u64, true, 100_003usize),
        ("[step 7]", 7, false, 100_003),
        ("[step 7, n = 8k]", 7, false, 100_000),
    ] {
        c.case(format!("adamw{tag}"), "adamw", |io| {
            let p0 = io.randn(n, 0.02);
            let g = io.randn(n, 1e-3);
            let (m0, v0) = if zero_moments {
                (vec![0.0; n], vec![0.0; n])
            } else {
                let m = io.randn(n, 1e-3);
                let v = io.uniform(n, 1e-8, 1e-6);
                (m, v)
            };
            let (mut p, gb) = (io.full(&p0)?, io.full(&g)?);
            let (mut m, mut v) = (io.full(&m0)?, io.full(&v0)?);
            let hp = check_adamw_step(0.1, step);
            io.be.adamw(&mut p, &gb, &mut m, &mut v, n, hp)?;
            io.output("param", &p, n)?;
            io.output("m", &m, n)?;
            io.output("v", &v, n)
        });
    }

    // AdamW that also writes the working copy (activation-kind: f32 in the first pass, the
    // backend's activation precision in the second): param, m, v exactly as `adamw`, and the copy
    // equal to the new param rounded. With `[bf16 grad]` the gradient is activation-kind too
    // (`train.bf16_grads`), holding bf16 values so both sides read the same numbers.
    for (n, bf16_grad) in [
        (100_003usize, false),
        (100_000, false),
        (100_003, true),
        (100_000, true),
    ] {
        let tag = if bf16_grad { "[bf16 grad]" } else { "" };
        c.case(
            format!("adamw_with_copy[n = {n}]{tag}"),
            "adamw_copy",
            |io| {
                let p0 = io.randn(n, 0.02);
                let g = io.randn(n, 1e-3);
                let m0 = io.randn(n, 1e-3);
                let v0 = io.uniform(n, 1e-8, 1e-6);
                let gb = match bf16_grad {
                    true => io.input(&bf16_values(&g))?,
                    false => io.full(&g)?,
                };
                let mut p = io.full(&p0)?;
                let (mut m, mut v) = (io.full(&m0)?, io.full(&v0)?);
                let mut w = io.poisoned(n)?;
                let hp = check_adamw_step(0.1, 3);
                io.be
                    .adamw_with_copy(&mut p, &gb, &mut m, &mut v, &mut w, n, hp)?;
                io.output("param", &p, n)?;
                io.output("m", &m, n)?;
                io.output("v", &v, n)?;
                io.output("working copy", &w, n)
            },
        );
    }

    // Several tensors in one call (what the optimizer runs): f32 and bf16 (activation-kind)
    // gradients, with and without a working copy, each its own weight decay. Sizes all
    // multiples of 8 take the CUDA one-launch kernel; one odd size sends the call down the
    // per-tensor kernels.
    for sizes in [[4096usize, 8, 65_536, 1000], [4096, 8, 65_537, 1000]] {
        let tag = if sizes.iter().all(|n| n % 8 == 0) {
            "[one launch]"
        } else {
            "[per tensor]"
        };
        c.case(format!("adamw_tensors{tag}"), "adamw_copy", |io| {
            let mut bufs = Vec::new();
            for (k, &n) in sizes.iter().enumerate() {
                let g = io.randn(n, 1e-3);
                let grad = match k % 2 {
                    1 => io.input(&bf16_values(&g))?,
                    _ => io.full(&g)?,
                };
                let (p0, m0, v0) = (
                    io.randn(n, 0.02),
                    io.randn(n, 1e-3),
                    io.uniform(n, 1e-8, 1e-6),
                );
                let working = match k {
                    0 | 1 => Some(io.poisoned(n)?),
                    _ => None,
                };
                bufs.push((io.full(&p0)?, grad, io.full(&m0)?, io.full(&v0)?, working));
            }
            let mut tensors: Vec<AdamWTensor<'_, B::Buf>> = bufs
                .iter_mut()
                .zip(sizes)
                .enumerate()
                .map(|(k, ((p, g, m, v, w), n))| AdamWTensor {
                    param: p,
                    grad: g,
                    m,
                    v,
                    working: w.as_mut(),
                    n,
                    weight_decay: 0.05 * k as f32,
                })
                .collect();
            let hp = check_adamw_step(0.0, 5);
            io.be.adamw_tensors(&mut tensors, hp)?;
            drop(tensors);
            for (k, ((p, _, m, v, w), n)) in bufs.iter().zip(sizes).enumerate() {
                io.output(&format!("param {k}"), p, n)?;
                io.output(&format!("m {k}"), m, n)?;
                io.output(&format!("v {k}"), v, n)?;
                if let Some(w) = w {
                    io.output(&format!("working copy {k}"), w, n)?;
                }
            }
            Ok(())
        });
    }

    // ------------------------------------------------------------ the whole model
    c.case("model[forward_backward]", "model", |io| {
        model_case(io, ModelOutputs::Grads)
    });
    c.case("model[forward_backward][bf16 grads]", "model", |io| {
        model_case(io, ModelOutputs::ActGrads)
    });
    c.case("model[forward]", "model", |io| {
        model_case(io, ModelOutputs::Forward)
    });
}

/// The AdamW hyper-parameters of the optimizer cases, with weight decay `wd` at step `step`.
fn check_adamw_step(wd: f32, step: u64) -> AdamWStep {
    AdamWStep {
        lr: 3e-4,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: wd,
        grad_scale: 0.7,
        step,
    }
}

/// `x` rounded to bf16 (nearest even) and widened back: values a bf16 buffer holds exactly.
fn bf16_values(x: &[f32]) -> Vec<f32> {
    x.iter()
        .map(|&v| half::bf16::from_f32(v).to_f32())
        .collect()
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

/// out `[T, H D]` and lse `[H, T]` of the CPU backend.
/// An attention backward case's inputs on `io`'s backend: ragged documents (lengths `lens`),
/// random qkv and dout, and out and lse of the reference for that qkv (the same for both
/// backends).
struct BackwardInputs<B: Backend> {
    lens: Vec<usize>,
    dims: AttnDims,
    qkv: B::Buf,
    out: B::Buf,
    lse: B::Buf,
    dout: B::Buf,
    cu: B::IdxBuf,
}

fn backward_inputs<B: Backend>(
    io: &mut Io<B>,
    h: usize,
    hkv: usize,
    d: usize,
) -> Result<BackwardInputs<B>, CaseError> {
    backward_inputs_of(io, h, hkv, d, OP_DOCS, OP_TOKENS)
}

/// [`backward_inputs`] over `docs` documents of `tokens` in all.
fn backward_inputs_of<B: Backend>(
    io: &mut Io<B>,
    h: usize,
    hkv: usize,
    d: usize,
    docs: usize,
    tokens: usize,
) -> Result<BackwardInputs<B>, CaseError> {
    let lens = ragged_lengths(&mut io.rng, docs, tokens, true);
    let dims = attn_dims(&lens, h, hkv, d);
    let qkv = io.randn(dims.t * dims.qkv_width(), 1.0);
    let dout = io.randn(dims.t * h * d, 1.0);
    let cu = cu_of(&lens);
    let (out, lse) = reference_attention(&qkv, &cu, dims)?;
    Ok(BackwardInputs {
        dims,
        qkv: io.input(&qkv)?,
        out: io.input(&out)?,
        lse: io.full(&lse)?,
        dout: io.input(&dout)?,
        cu: io.input_idx(&cu)?,
        lens,
    })
}

fn reference_attention(
    qkv: &[f32],
    cu: &[i32],
    dims: AttnDims,
) -> Result<(Vec<f32>, Vec<f32>), CaseError> {
    let cpu = CpuBackend::new();
    let mut out = vec![0.0; dims.t * dims.h * dims.d];
    let mut lse = vec![0.0; dims.h * dims.t];
    cpu.attention_forward(&mut out, &mut lse, &qkv.to_vec(), &cu.to_vec(), dims)?;
    Ok((out, lse))
}
