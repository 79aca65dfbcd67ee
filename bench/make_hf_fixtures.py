#!/usr/bin/env python3
"""Write the transformers fixtures that `cargo test --test hf_interop` checks packtrain against.

Each fixture is a tiny randomly initialised model saved by transformers' `save_pretrained`
(so the directory is exactly what the Hub would give us) plus `expected.json`: a few token
sequences and, for each, transformers' loss (the document run alone) and logits, all fp32.
The tests then need no Python.

    python3 -m venv /tmp/hf && /tmp/hf/bin/pip install torch transformers safetensors
    /tmp/hf/bin/python bench/make_hf_fixtures.py tests/fixtures

Fixtures (each well under 100 KB):
- hf_tiny_llama: Llama, grouped-query heads (4 q, 2 kv), untied lm_head, f32, one file.
- hf_tiny_llama3_rope: Llama, tied embeddings, rope_scaling llama3, head_dim 16, saved in bf16
  (the expected numbers are from the bf16 weights upcast to f32).
- hf_tiny_qwen2: Qwen2 (q/k/v biases), f16, sharded in two files with an index.
"""

import datetime
import json
import os
import sys

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

DOC_LENGTHS = [9, 1, 5, 13]  # a length-1 document has no target
LOGIT_DOCS = 2  # logits are stored for the first documents only (size)


def docs_for(vocab, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in DOC_LENGTHS]


def reference(model, docs):
    """Per-document loss (each document alone) and logits, fp32."""
    out = {"doc_loss_sum": [], "doc_loss_mean": [], "doc_targets": [], "logits": []}
    model = model.float().eval()
    with torch.no_grad():
        for i, ids in enumerate(docs):
            x = torch.tensor([ids])
            r = model(input_ids=x, labels=x if len(ids) > 1 else None)
            logits = r.logits[0].float()
            k = len(ids) - 1
            if k > 0:
                mean = float(r.loss)  # transformers' own loss: mean over the k targets
                s = float(torch.nn.functional.cross_entropy(logits[:-1], x[0, 1:], reduction="sum"))
            else:
                mean, s = None, 0.0
            out["doc_loss_sum"].append(s)
            out["doc_loss_mean"].append(mean)
            out["doc_targets"].append(k)
            if i < LOGIT_DOCS:
                out["logits"].append(logits.reshape(-1).tolist())
    return out


def write(root, name, model, docs, save_kwargs, load_dtype=None):
    d = os.path.join(root, name)
    os.makedirs(d, exist_ok=True)
    for f in os.listdir(d):
        os.remove(os.path.join(d, f))
    model.save_pretrained(d, **save_kwargs)
    # The reference numbers come from what was saved, read back as transformers reads it.
    cls = type(model)
    reloaded = cls.from_pretrained(d, dtype=load_dtype or torch.float32)
    exp = {
        "generated_by": "bench/make_hf_fixtures.py",
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "vocab_size": model.config.vocab_size,
        "docs": docs,
    }
    exp.update(reference(reloaded, docs))
    with open(os.path.join(d, "expected.json"), "w") as f:
        json.dump(exp, f)
        f.write("\n")
    size = sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d))
    print(f"{d}: {sorted(os.listdir(d))}, {size} bytes")


def main():
    root = sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures"
    torch.manual_seed(1234)

    cfg = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
        initializer_range=0.2, bos_token_id=1, eos_token_id=2,
    )
    m = LlamaForCausalLM(cfg)
    write(root, "hf_tiny_llama", m, docs_for(64, 1), {})

    cfg = LlamaConfig(
        vocab_size=32, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=256,
        rms_norm_eps=1e-6, tie_word_embeddings=True, initializer_range=0.2,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500.0, "factor": 8.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 32},
    )
    m = LlamaForCausalLM(cfg).to(torch.bfloat16)
    write(root, "hf_tiny_llama3_rope", m, docs_for(32, 2), {}, load_dtype=torch.bfloat16)

    cfg = Qwen2Config(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
        rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False,
        initializer_range=0.2, use_sliding_window=False,
    )
    m = Qwen2ForCausalLM(cfg)
    with torch.no_grad():
        for layer in m.model.layers:  # transformers initialises biases to 0: make them count
            for p in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                p.bias.normal_(0.0, 0.5)
    m = m.to(torch.float16)
    write(root, "hf_tiny_qwen2", m, docs_for(32, 3), {"max_shard_size": "8KB"},
          load_dtype=torch.float16)


if __name__ == "__main__":
    main()
