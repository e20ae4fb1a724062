"""Export to a single GGUF file for llama.cpp (and tools built on it: Ollama, LM Studio, ...).

Written with the `gguf` package, laid out as llama.cpp's convert_hf_to_gguf.py would lay out our HF export:
- architecture "llama" (or "qwen3" when the model has QK-norm), llama.cpp's tensor names;
- "llama" ropes interleaved pairs while we (like HF) rotate halves, so q/k rows are permuted exactly as
  convert_hf_to_gguf does; "qwen3" ropes halves (NEOX), so its weights go as they are;
- tokenizer "gpt2" (byte-level BPE) with pre-tokenizer "llama-bpe": our split regex is Llama-3's;
- f16/q8_0 keep 1-D tensors (norms) in f32, and q8_0 keeps a matrix whose rows do not split into 32-value
  blocks in f32, as llama.cpp does.

Chat turns end with <|end|>, so it is both the end-of-sequence and the end-of-turn token: llama.cpp stops a
reply on either. Use llama.cpp's `--jinja` so the embedded chat template is run as written (without it,
llama.cpp guesses a built-in template from the tokens it sees, and would pick Phi-3's, which adds newlines).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from .config import GenerateConfig
from .errors import UserError
from .model import GPT
from .chat_format import CHAT_TEMPLATE, SPECIAL_TOKENS
from .tokenizer import Tokenizer, _hf_split_pattern
from .tokenizer_train import SPLIT_PATTERN

OUTTYPES = ("f32", "f16", "q8_0")


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Rotate-half rows -> interleaved-pair rows within each head (convert_hf_to_gguf's LlamaModel.permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of _permute: a llama GGUF's attn_q/attn_k back to our (HF) row order."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(model: GPT, arch: str) -> list[tuple[str, np.ndarray]]:
    """(llama.cpp name, fp32 array) for every weight, q/k permuted for "llama"."""
    cfg = model.cfg
    sd = {k: v.detach().to("cpu", torch.float32).numpy() for k, v in model.state_dict().items()}
    out = [("token_embd.weight", sd["embed_tokens.weight"]), ("output_norm.weight", sd["norm.weight"])]
    if not cfg.tie_embeddings:  # tied: llama.cpp reuses token_embd when "output" is absent
        out.append(("output.weight", sd["lm_head.weight"]))
    names = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
             "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}
    for i in range(cfg.n_layer):
        for ours, theirs in names.items():
            w = sd.get(f"layers.{i}.{ours}.weight")
            if w is None:
                continue  # q_norm/k_norm exist only with QK-norm
            if arch == "llama" and theirs in ("attn_q", "attn_k"):
                w = _permute(w, cfg.n_head if theirs == "attn_q" else cfg.n_kv_head)
            out.append((f"blk.{i}.{theirs}.weight", w))
    return out


def check_tokenizer(tok: Tokenizer) -> dict:
    """Raise UserError unless llama.cpp can run `tok` as "gpt2" + "llama-bpe"; return its tokenizer.json."""
    if tok.kind != "bpe":
        raise UserError(f"GGUF export needs a byte-level BPE tokenizer; this run's is {tok.kind!r}-level "
                        "(use --format hf)")
    spec = json.loads(tok.hf.to_str())
    if spec["model"].get("type") != "BPE":
        raise UserError("GGUF export needs a byte-level BPE tokenizer (use --format hf)")
    if (getattr(tok, "chat", None) or {}).get("pre"):
        return spec  # imported from a GGUF file: its own pre-tokenizer name goes back into the file
    if _hf_split_pattern(tok.hf) != SPLIT_PATTERN:
        raise UserError("the tokenizer's split regex is not Llama-3's, so llama.cpp has no pre-tokenizer for it "
                        "(use --format hf)")
    return spec


def _vocab(tok: Tokenizer, n_vocab: int) -> tuple[list[str], list[int], list[str]]:
    """Token strings (byte-level, as in tokenizer.json), their llama.cpp token types, and the merges."""
    import gguf

    spec = check_tokenizer(tok)
    if n_vocab < tok.vocab_size:
        raise UserError(f"model has {n_vocab} embeddings but the tokenizer {tok.vocab_size} tokens")
    special = set(getattr(tok, "special_ids", range(len(SPECIAL_TOKENS))))
    tokens, types = [], []
    for i in range(n_vocab):
        t = tok.hf.id_to_token(i) if i < tok.vocab_size else None
        if t is None:  # embedding rows past the tokenizer (padding): named like convert_hf_to_gguf does
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(t)
            types.append(gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    return tokens, types, merges


def export_gguf(model: GPT, tok: Tokenizer, out_path: Path, dtype: str = "f32", name: str = "chatforge",
                generation: GenerateConfig | None = None) -> Path:
    """Write model + tokenizer + chat template to one GGUF file at out_path and return it; `generation`'s
    sampling goes to general.sampling.* (llama.cpp's defaults for the model; temperature 0 = greedy)."""
    import gguf
    from gguf import GGMLQuantizationType as Q

    if dtype not in OUTTYPES:
        raise UserError(f"GGUF outtype {dtype!r} is not supported; use one of {', '.join(OUTTYPES)}")
    cfg = model.cfg
    arch = "qwen3" if cfg.qk_norm else "llama"
    tokens, types, merges = _vocab(tok, cfg.vocab_size)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp-{os.getpid()}")  # no half-written file at out_path
    w = gguf.GGUFWriter(str(tmp), arch)

    w.add_name(name)
    w.add_block_count(cfg.n_layer)
    w.add_context_length(cfg.seq_len)
    w.add_embedding_length(cfg.n_embd)
    w.add_feed_forward_length(cfg.hidden())
    w.add_head_count(cfg.n_head)
    w.add_head_count_kv(cfg.n_kv_head)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype]
    w.add_file_type(ftype)
    if generation is not None:
        w.add_sampling_temp(max(generation.temperature, 0.0))
        w.add_sampling_top_k(generation.top_k)
        w.add_sampling_top_p(generation.top_p)
        w.add_sampling_penalty_repeat(generation.repetition_penalty)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre((getattr(tok, "chat", None) or {}).get("pre") or "llama-bpe")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    native = getattr(tok, "native", True)
    end = tok.end_id
    # Ours: <|end|> closes every reply and <|eos|> is never trained on, so <|end|> is the eos llama.cpp needs.
    eos = end if native or tok.eos_id is None else tok.eos_id
    for add, i in ((w.add_bos_token_id, tok.bos_id), (w.add_eos_token_id, eos), (w.add_eot_token_id, end),
                   (w.add_pad_token_id, tok.pad_id)):
        if i is not None:  # an imported tokenizer may lack one
            add(i)
    w.add_add_bos_token(bool(getattr(tok, "add_bos", True)))
    w.add_add_eos_token(False)
    template = getattr(tok, "chat_template", CHAT_TEMPLATE)
    if template:
        w.add_chat_template(template)

    for tname, arr in gguf_tensors(model, arch):
        if arr.ndim == 1 or dtype == "f32":
            w.add_tensor(tname, arr.astype(np.float32))
        elif dtype == "f16":
            w.add_tensor(tname, arr.astype(np.float16))
        elif arr.shape[-1] % 32 == 0:  # q8_0 quantizes rows in blocks of 32 values
            w.add_tensor(tname, gguf.quants.quantize(arr, Q.Q8_0), raw_dtype=Q.Q8_0)
        else:
            w.add_tensor(tname, arr.astype(np.float32))

    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
    return out_path
