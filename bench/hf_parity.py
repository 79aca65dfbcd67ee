#!/usr/bin/env python3
"""Parity of packtrain with transformers, both ways, on randomly initialised models (fp32, CPU).

1. transformers -> packtrain: a model saved by `save_pretrained` is evaluated by
   `packtrain eval`, which packs the documents into batches; each document's loss must equal
   transformers' loss of that document run alone (relative 1e-4).
2. packtrain -> transformers: the directory written by `packtrain eval --save` is loaded by
   transformers; its logits must equal the original model's (max abs 1e-5).
3. Text data through the model's own tokenizer: `packtrain eval --format text` must see the
   same ids as transformers' tokenizer (BOS from the tokenizer files) and give the same losses.

Models: Llama with grouped-query heads (untied), Llama with tied embeddings and llama3 rope
scaling, Qwen2 (q/k/v biases, saved in shards), Mistral.

    python3 -m venv /tmp/hf && /tmp/hf/bin/pip install torch transformers safetensors
    cargo build --release
    /tmp/hf/bin/python bench/hf_parity.py target/release/packtrain

Prints one line per model and check and a JSON summary; exits non-zero on a failure.
"""

import json
import os
import subprocess
import sys
import tempfile

import torch
import transformers
from transformers import (
    LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, PreTrainedTokenizerFast,
    Qwen2Config, Qwen2ForCausalLM,
)

# PACKTRAIN_EVAL_DEVICE=cuda runs packtrain's side on the GPU (bf16 tensor-core GEMMs): 2e-2.
DEVICE = os.environ.get("PACKTRAIN_EVAL_DEVICE", "cpu")
LOSS_RTOL = 1e-4
if DEVICE != "cpu":
    LOSS_RTOL = 2e-2
LOGIT_ATOL = 1e-5
N_DOCS = 24


def models():
    common = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                  num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=512,
                  initializer_range=0.1, bos_token_id=1, eos_token_id=2)
    yield "llama-gqa", LlamaForCausalLM(LlamaConfig(**common, tie_word_embeddings=False,
                                                    rms_norm_eps=1e-5, rope_theta=10000.0)), {}
    yield "llama-tied-llama3rope", LlamaForCausalLM(LlamaConfig(
        **common, tie_word_embeddings=True, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "llama3", "rope_theta": 50000.0, "factor": 8.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 64})), {}
    q = Qwen2ForCausalLM(Qwen2Config(**common, tie_word_embeddings=False, rms_norm_eps=1e-6,
                                     use_sliding_window=False))
    with torch.no_grad():
        for layer in q.model.layers:
            for p in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                p.bias.normal_(0.0, 0.3)
    yield "qwen2-bias-sharded", q, {"max_shard_size": "100KB"}
    yield "mistral", MistralForCausalLM(MistralConfig(**common, tie_word_embeddings=False,
                                                      sliding_window=None)), {}


def random_docs(vocab, seed):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 200, (N_DOCS,), generator=g).tolist()
    lengths[0] = 1  # a document with no target
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def hf_doc_losses(model, docs):
    """(loss_sum, targets) of each document run alone."""
    out = []
    with torch.no_grad():
        for ids in docs:
            if len(ids) < 2:
                out.append((0.0, 0))
                continue
            x = torch.tensor([ids])
            r = model(input_ids=x, labels=x)
            out.append((float(r.loss) * (len(ids) - 1), len(ids) - 1))
    return out


def packtrain_eval(binary, model_dir, data, extra):
    out = data + ".losses.jsonl"
    cmd = [binary, "eval", "--model", model_dir, "--data", data, "--out", out,
           "--tokens-per-batch", "512", "--device", DEVICE] + extra
    subprocess.run(cmd, check=True)
    with open(out) as f:
        return [json.loads(line) for line in f]


def compare_losses(name, want, got):
    assert len(want) == len(got), f"{name}: {len(got)} documents, expected {len(want)}"
    worst = 0.0
    for i, ((s, k), g) in enumerate(zip(want, got)):
        assert g["targets"] == k, f"{name} doc {i}: {g['targets']} targets, expected {k}"
        if k:
            worst = max(worst, abs(g["loss_sum"] - s) / abs(s))
    return worst


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    binary = os.path.abspath(sys.argv[1])
    torch.manual_seed(0)
    summary = {"device": DEVICE, "torch": torch.__version__, "transformers": transformers.__version__, "models": {}}
    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        for name, model, save_kwargs in models():
            model = model.float().eval()
            src = os.path.join(tmp, name)
            model.save_pretrained(src, **save_kwargs)
            docs = random_docs(model.config.vocab_size, 7)
            data = os.path.join(tmp, name + ".jsonl")
            with open(data, "w") as f:
                for d in docs:
                    f.write(json.dumps({"input_ids": d}) + "\n")

            # 1. transformers -> packtrain (packed batches)
            saved = os.path.join(tmp, name + "-packtrain")
            got = packtrain_eval(binary, src, data, ["--save", saved, "--save-max-shard-size", "100KB"])
            loss_rel = compare_losses(name, hf_doc_losses(model, docs), got)

            # 2. packtrain -> transformers (logits of the reloaded model)
            back, info = type(model).from_pretrained(saved, dtype=torch.float32,
                                                     output_loading_info=True)
            back.eval()
            problems = {k: v for k, v in info.items() if v}
            assert not problems, f"{name}: transformers loading {saved}: {problems}"
            x = torch.randint(0, model.config.vocab_size, (2, 64),
                              generator=torch.Generator().manual_seed(5))
            with torch.no_grad():
                logit_diff = float((back(input_ids=x).logits - model(input_ids=x).logits).abs().max())
            row = {"loss_max_rel_diff": loss_rel, "logits_max_abs_diff": logit_diff,
                   "saved_files": sorted(os.listdir(saved))}
            ok = loss_rel <= LOSS_RTOL and logit_diff <= LOGIT_ATOL
            failed |= not ok
            print(f"{name:24s} losses max rel diff {loss_rel:.2e}  reloaded logits max abs diff "
                  f"{logit_diff:.2e}  {'ok' if ok else 'FAIL'}")
            summary["models"][name] = row

        # 3. text through the model's tokenizer (BOS added as transformers' tokenizer adds it)
        name = "llama-gqa"
        src = os.path.join(tmp, name)
        model = LlamaForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
        tok = word_tokenizer(model.config.vocab_size)
        tok.save_pretrained(src)
        words = sorted(w for w in tok.get_vocab() if w.isalpha())
        g = torch.Generator().manual_seed(3)
        texts = [" ".join(words[i] for i in torch.randint(0, len(words), (n,), generator=g).tolist())
                 for n in torch.randint(1, 60, (N_DOCS,), generator=g).tolist()]
        data = os.path.join(tmp, "text.jsonl")
        with open(data, "w") as f:
            for t in texts:
                f.write(json.dumps({"text": t}) + "\n")
        ids = [tok(t)["input_ids"] for t in texts]
        assert all(i[0] == tok.bos_token_id for i in ids), "the tokenizer should add BOS"
        got = packtrain_eval(binary, src, data, [])
        text_rel = compare_losses("text", hf_doc_losses(model, ids), got)
        ok = text_rel <= LOSS_RTOL and [g["tokens"] for g in got] == [len(i) for i in ids]
        failed |= not ok
        print(f"{'text (tokenizer, BOS)':24s} losses max rel diff {text_rel:.2e}  "
              f"{'ok' if ok else 'FAIL'}")
        summary["text"] = {"loss_max_rel_diff": text_rel}
    print(json.dumps(summary))
    sys.exit(1 if failed else 0)


def word_tokenizer(vocab_size):
    """A word-level fast tokenizer whose post-processor adds <s> (as Llama's does)."""
    from tokenizers import Tokenizer, models as tm, pre_tokenizers, processors
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for i in range(3, vocab_size):
        vocab["w" + "".join(chr(ord("a") + int(c)) for c in str(i))] = i
    t = Tokenizer(tm.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    t.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                     special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


if __name__ == "__main__":
    main()
