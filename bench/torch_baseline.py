#!/usr/bin/env python3
"""The PyTorch baseline of `packtrain bench`: the same training step on the same packed batches.

Reads the batches file written by `packtrain bench --batches FILE` (the model's shapes, the
step counts and every packed batch as cu_seqlens + token ids) and trains transformers'
`LlamaForCausalLM` built from a config of the same shapes:

- fp32 weights, bf16 autocast, `torch.optim.AdamW(fused=True)`, gradient clipping at 1.0 (as
  `packtrain bench`: train.grad_clip of both configs), gradient checkpointing when the batches
  file says `recompute` (packtrain recomputes each layer in its backward);
- packing through `position_ids` (restarting at 0 per document) with no attention mask:
  transformers then builds a block-diagonal causal mask from the position ids. With
  `--attn sdpa` (default) that mask is dense [T, T] and SDPA runs its masked kernel over the
  whole square; with `--attn flex` it is a flex-attention BlockMask that skips the blocks
  outside the documents (compiled by torch on the first step, a warm-up step);
- loss: sum of the token cross-entropies / targets, targets = next token within the document
  (-100 at each document's last token), exactly as packtrain's.

Before timing, one check that packing works: the logits of a document inside a packed batch
must equal its logits run alone (else the documents see each other and the result says so).

Reported, as one JSON line (and `--json FILE`): step time median and mean; tokens/s and MFU
from the median step (mean tokens of a timed step / median step time), and from all timed
steps (`*_all_steps`: timed tokens / timed seconds), MFU by packtrain's formula (6 N T with N = every parameter, plus
7 L^2 D H per document and layer for causal attention), peak memory
(`torch.cuda.max_memory_allocated`: tensors only, not the allocator's cache nor the context).

    python3 bench/torch_baseline.py --batches batches-llama-160m.json --json torch.json
"""

import argparse
import json
import math
import statistics
import sys
import time

import torch
import torch.nn.functional as F
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

FLOPS_FORMULA = ("6*N*T (N = all params incl. embedding and lm_head) + per document and layer "
                 "7*L^2*D*H (causal attention forward 2*L^2*D*H, backward 2.5x)")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", required=True, help="file written by packtrain bench --batches")
    p.add_argument("--json", help="also write the result line here")
    p.add_argument("--attn", choices=["sdpa", "flex"], default="sdpa",
                   help="transformers attention implementation (default sdpa)")
    p.add_argument("--recompute", choices=["auto", "on", "off"], default="auto",
                   help="gradient checkpointing (auto: as the batches file says)")
    p.add_argument("--steps", type=int, help="timed steps (default: the file's)")
    p.add_argument("--warmup", type=int, help="warm-up steps (default: the file's)")
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=3e-4)
    return p.parse_args()


def hf_config(m, attn):
    head_dim = m["head_dim"] or m["d_model"] // m["n_heads"]
    kw = dict(
        vocab_size=m["vocab_size"], hidden_size=m["d_model"], intermediate_size=m["ffn_dim"],
        num_hidden_layers=m["n_layers"], num_attention_heads=m["n_heads"],
        num_key_value_heads=m["n_kv_heads"], head_dim=head_dim,
        max_position_embeddings=max(4096, 2 * 16384), rms_norm_eps=m["rms_norm_eps"],
        tie_word_embeddings=m["tie_embeddings"], initializer_range=m["init_std"],
        attention_bias=m.get("qkv_bias", False), mlp_bias=False, use_cache=False,
        attn_implementation="flex_attention" if attn == "flex" else "sdpa",
    )
    try:
        return LlamaConfig(**kw, rope_parameters={"rope_type": "default",
                                                  "rope_theta": m["rope_theta"]})
    except TypeError:
        return LlamaConfig(**kw, rope_theta=m["rope_theta"])


def to_device_batch(rec, device):
    """input_ids, position_ids [1, T], targets [T], target count, cu_seqlens (list)."""
    cu = rec["cu_seqlens"]
    tokens = torch.tensor(rec["tokens"], dtype=torch.long)
    t = len(tokens)
    pos = torch.empty(t, dtype=torch.long)
    targets = torch.full((t,), -100, dtype=torch.long)
    for s, e in zip(cu[:-1], cu[1:]):
        pos[s:e] = torch.arange(e - s)
        if e - s > 1:
            targets[s:e - 1] = tokens[s + 1:e]
    n_targets = int((targets != -100).sum())
    return (tokens.view(1, t).to(device), pos.view(1, t).to(device), targets.to(device),
            n_targets, cu)


def step_flops(m, n_params, cu):
    t = cu[-1]
    dh = (m["head_dim"] or m["d_model"] // m["n_heads"]) * m["n_heads"]
    attn = sum(7.0 * (e - s) ** 2 * dh * m["n_layers"] for s, e in zip(cu[:-1], cu[1:]))
    return 6.0 * n_params * t, attn


def loss_of(model, ids, pos, targets, n_targets):
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = model(input_ids=ids, position_ids=pos, use_cache=False).logits
    return F.cross_entropy(logits[0].float(), targets, ignore_index=-100,
                           reduction="sum") / max(n_targets, 1)


@torch.no_grad()
def packing_check(model, batch):
    """Max |logit difference| of the second document of `batch`, packed (with its neighbours)
    vs alone, in fp32: ~1e-6 of the logits when the mask keeps documents apart; a leak
    changes them by much more (attention then averages over the other document too)."""
    ids, pos, _, _, cu = batch
    k = 1 if len(cu) > 2 else 0  # the second document, when there are two
    s, e = cu[k], cu[k + 1]
    end = cu[min(k + 2, len(cu) - 1)]  # and the one after it
    packed = model(input_ids=ids[:, :end], position_ids=pos[:, :end],
                   use_cache=False).logits[0, s:e].float()
    alone = model(input_ids=ids[:, s:e], position_ids=pos[:, s:e],
                  use_cache=False).logits[0].float()
    diff = (packed - alone).abs().max().item()
    spread = (alone - alone.mean()).abs().max().item()
    return diff, diff <= 1e-3 * max(spread, 1e-6)


def main():
    args = parse_args()
    if not torch.cuda.is_available():
        sys.exit("torch_baseline.py needs a CUDA GPU")
    with open(args.batches) as f:
        spec = json.load(f)
    m = spec["config"]
    warmup = spec["warmup"] if args.warmup is None else args.warmup
    steps = spec["steps"] if args.steps is None else args.steps
    recompute = {"auto": spec["recompute"], "on": True, "off": False}[args.recompute]
    records = spec["batches"]
    if len(records) < warmup + steps:
        sys.exit(f"{args.batches} holds {len(records)} batches, {warmup + steps} needed")
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = False

    torch.manual_seed(spec.get("seed", 0))
    config = hf_config(m, args.attn)
    with device:
        model = LlamaForCausalLM(config)
    model.float().train()
    if recompute:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), eps=1e-8,
                            weight_decay=0.1, fused=True)
    batches = [to_device_batch(r, device) for r in records[:warmup + steps]]

    diff, packed_ok = packing_check(model, batches[0])
    print(f"packing check: max |logits packed - alone| = {diff:.3e} "
          f"({'ok' if packed_ok else 'DOCUMENTS SEE EACH OTHER'})", file=sys.stderr)

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for i, (ids, pos, targets, n_targets, cu) in enumerate(batches):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = loss_of(model, ids, pos, targets, n_targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip, foreach=True)
        opt.step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
        print(f"step {i + 1}/{len(batches)}{' (warm-up)' if i < warmup else ''}: "
              f"{times[-1] * 1e3:.1f} ms, loss {losses[-1]:.4f}", file=sys.stderr)

    timed = times[warmup:]
    timed_batches = batches[warmup:]
    secs = sum(timed)
    tokens = sum(b[4][-1] for b in timed_batches)
    dense = attn = 0.0
    for b in timed_batches:
        d, a = step_flops(m, n_params, b[4])
        dense += d
        attn += a
    n = len(timed)
    step_median = statistics.median(timed)
    peak = torch.cuda.max_memory_allocated()
    result = {
        "impl": "torch",
        "model": spec["model"],
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "params": n_params,
        "recompute": recompute,
        "attn": args.attn,
        "attention": ("flex_attention, BlockMask from position_ids (document mask)"
                      if args.attn == "flex" else
                      "sdpa, dense [T, T] block-diagonal causal mask from position_ids"),
        "packing_check_max_abs_diff": diff,
        "packing_ok": packed_ok,
        "precision": "fp32 weights, bf16 autocast, fused AdamW",
        "tokens_per_micro_batch": spec["tokens_per_micro_batch"],
        "warmup": warmup,
        "steps": n,
        "tokens_per_step": tokens / n,
        "docs_per_step": sum(len(b[4]) - 1 for b in timed_batches) / n,
        "step_ms_median": step_median * 1e3,
        "step_ms_mean": statistics.mean(timed) * 1e3,
        "tokens_per_s": tokens / n / step_median,
        "tokens_per_s_all_steps": tokens / secs,
        "flops_6nt_per_step": dense / n,
        "flops_attn_per_step": attn / n,
        "mfu": (dense + attn) / n / step_median / spec["peak_flops"],
        "mfu_all_steps": (dense + attn) / secs / spec["peak_flops"],
        "peak_flops": spec["peak_flops"],
        "peak_mem_bytes": peak,
        "peak_mem_gib": peak / 2 ** 30,
        "peak_mem_method": "torch.cuda.max_memory_allocated over the steps",
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "flops_formula": FLOPS_FORMULA,
    }
    line = json.dumps(result)
    print(line)
    if args.json:
        with open(args.json, "w") as f:
            f.write(line + "\n")
    if not all(math.isfinite(x) for x in losses):
        sys.exit("non-finite loss")


if __name__ == "__main__":
    main()
