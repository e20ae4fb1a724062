"""Export to / import from a Hugging Face model folder (LlamaForCausalLM, or Qwen3ForCausalLM with QK-norm).

Our parameter names are HF's minus the "model." prefix and RoPE uses HF's rotate-half layout, so export is
a rename. The folder loads in transformers, vLLM and llama.cpp's convert_hf_to_gguf.py. Chat turns end with
<|end|>, so generation_config.json lists it (and <|eos|>) as end-of-sequence ids.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .config import GenerateConfig, ModelConfig
from .errors import UserError
from .model import GPT, rope_tables
from .chat_format import CHAT_TEMPLATE, SPECIAL_TOKENS
from .tokenizer import Tokenizer

BOS_ID, EOS_ID, PAD_ID, END_ID = (SPECIAL_TOKENS.index(t) for t in ("<|bos|>", "<|eos|>", "<|pad|>", "<|end|>"))
SUPPORTED = {"LlamaForCausalLM": "llama", "Qwen3ForCausalLM": "qwen3"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def hf_config(cfg: ModelConfig, dtype: str = "float32", tok: Tokenizer | None = None) -> dict:
    """transformers' config.json; token ids from `tok` (default: chatforge's own specials)."""
    bos, eos, pad = (tok.bos_id, list(tok.stop_ids), tok.pad_id) if tok is not None else (BOS_ID, [END_ID, EOS_ID], PAD_ID)
    arch = "Qwen3ForCausalLM" if cfg.qk_norm else "LlamaForCausalLM"
    c = {
        "architectures": [arch],
        "model_type": SUPPORTED[arch],
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.n_embd,
        "intermediate_size": cfg.hidden(),
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_kv_head,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.seq_len,
        "rms_norm_eps": cfg.norm_eps,
        # Both spellings: transformers >= 5 reads rope_parameters, older readers (vLLM, llama.cpp) rope_theta.
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": pad,
        "initializer_range": cfg.init_std,
        "use_cache": True,
        "torch_dtype": dtype,
        "dtype": dtype,
    }
    if arch == "LlamaForCausalLM":
        c.update(mlp_bias=False, pretraining_tp=1)
    else:
        c.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layer,
                 layer_types=["full_attention"] * cfg.n_layer)
    return c


def _sampling(g: GenerateConfig) -> dict:
    """transformers' names for the run's sampling settings (temperature 0 = greedy; 0 means "off" for both)."""
    if g.temperature <= 0:
        return {"do_sample": False}
    out = {"do_sample": True, "temperature": g.temperature, "top_k": g.top_k, "top_p": g.top_p}
    if g.repetition_penalty != 1.0:
        out["repetition_penalty"] = g.repetition_penalty
    return out


def export_hf(model: GPT, tok_dir: Path, out_dir: Path, meta: dict | None = None, dtype: str = "float32",
              generation: GenerateConfig | None = None) -> Path:
    """Write a transformers-loadable model folder to out_dir and return it; generation_config.json carries the
    run's sampling settings (`generation`, default the config defaults)."""
    if dtype not in DTYPES:
        raise UserError(f"export dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}")
    tok_dir, out_dir = Path(tok_dir), Path(out_dir)
    if not (tok_dir / "tokenizer.json").is_file():
        raise UserError(f"no tokenizer.json in {tok_dir}: run `chatforge tokenizer` first")
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = model.cfg
    tok = Tokenizer.load(tok_dir)

    tensors = {}
    for name, p in model.state_dict().items():
        if cfg.tie_embeddings and name == "lm_head.weight":
            continue  # tied: HF re-ties lm_head to embed_tokens from tie_word_embeddings
        hf_name = name if name.startswith("lm_head.") else f"model.{name}"
        tensors[hf_name] = p.detach().to("cpu", DTYPES[dtype]).contiguous().clone()
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})

    hfc = hf_config(cfg, dtype, tok)
    (out_dir / "config.json").write_text(json.dumps(hfc, indent=2) + "\n")
    gen = {"bos_token_id": hfc["bos_token_id"], "eos_token_id": hfc["eos_token_id"], "pad_token_id": hfc["pad_token_id"],
           **_sampling(generation or GenerateConfig())}
    (out_dir / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")

    shutil.copyfile(tok_dir / "tokenizer.json", out_dir / "tokenizer.json")
    tcfg_path = tok_dir / "tokenizer_config.json"
    tcfg = json.loads(tcfg_path.read_text()) if tcfg_path.is_file() else {}
    tcfg.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
    if tok.native:
        tcfg.setdefault("bos_token", "<|bos|>")
        tcfg.setdefault("eos_token", "<|eos|>")
        tcfg.setdefault("pad_token", "<|pad|>")
        tcfg.setdefault("chat_template", CHAT_TEMPLATE)
    tcfg.setdefault("model_max_length", cfg.seq_len)
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tcfg, indent=2) + "\n")

    arch = hfc["architectures"][0]
    fmt = ("`<|bos|><|user|>...<|end|><|assistant|>`" if tok.native else "the model's own") + \
        f" (the tokenizer's chat_template); replies end with `{tok.id_to_token(tok.end_id)}`."
    lines = [f"# chatforge model ({arch})", "",
             f"{model.num_params():,} parameters, {cfg.n_layer} layers, width {cfg.n_embd}, "
             f"context {cfg.seq_len} tokens. Chat format: {fmt}"]
    if meta:
        lines += ["", "Training metadata:", "", "```json", json.dumps(meta, indent=2, default=str), "```"]
    (out_dir / "README.md").write_text("\n".join(lines) + "\n")
    return out_dir


def _rope_theta(c: dict) -> float:
    params = c.get("rope_parameters") or {}
    return float(params.get("rope_theta", c.get("rope_theta", 10000.0)))


def _check_supported(c: dict, path: Path) -> str:
    archs = c.get("architectures") or []
    arch = next((a for a in archs if a in SUPPORTED), None)
    if arch is None:
        mt = c.get("model_type")
        arch = {v: k for k, v in SUPPORTED.items()}.get(mt)
    if arch is None:
        raise UserError(f"{path}: architecture {archs or c.get('model_type')} is not supported; "
                        f"import handles {', '.join(SUPPORTED)}")
    problems = []
    scaling = c.get("rope_scaling")
    params = c.get("rope_parameters") or {}
    if scaling or params.get("rope_type", "default") != "default":
        problems.append("rope_scaling (only plain RoPE is implemented)")
    if c.get("attention_bias"):
        problems.append("attention_bias=true")
    if c.get("mlp_bias"):
        problems.append("mlp_bias=true")
    if c.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={c['hidden_act']}")
    if c.get("use_sliding_window"):
        problems.append("sliding-window attention")
    if c.get("pretraining_tp", 1) != 1:
        problems.append("pretraining_tp != 1")
    heads = c["num_attention_heads"]
    hd = c.get("head_dim") or c["hidden_size"] // heads
    if hd * heads != c["hidden_size"]:
        problems.append(f"head_dim {hd} * {heads} heads != hidden_size {c['hidden_size']}")
    if problems:
        raise UserError(f"{path}: unsupported model features: {'; '.join(problems)}")
    return arch


def _load_weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    single = hf_dir / "model.safetensors"
    index = hf_dir / "model.safetensors.index.json"
    if single.is_file():
        return load_file(str(single))
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        out: dict[str, torch.Tensor] = {}
        for f in files:
            out.update(load_file(str(hf_dir / f)))
        return out
    raise UserError(f"{hf_dir}: no model.safetensors (or sharded index); only safetensors weights are read")


def import_hf(hf_dir: Path) -> tuple[GPT, ModelConfig]:
    """Build a GPT from a Llama/Qwen3 Hugging Face folder (config.json + safetensors), fp32 on the CPU."""
    hf_dir = Path(hf_dir)
    cpath = hf_dir / "config.json"
    if not cpath.is_file():
        raise UserError(f"{hf_dir}: no config.json; give a Hugging Face model folder")
    c = json.loads(cpath.read_text())
    arch = _check_supported(c, cpath)
    heads = c["num_attention_heads"]
    cfg = ModelConfig(
        n_layer=c["num_hidden_layers"], n_head=heads, n_kv_head=c.get("num_key_value_heads") or heads,
        n_embd=c["hidden_size"], intermediate_size=c["intermediate_size"],
        seq_len=c.get("max_position_embeddings", 2048), vocab_size=c["vocab_size"], rope_theta=_rope_theta(c),
        norm_eps=c.get("rms_norm_eps", 1e-6), qk_norm=arch == "Qwen3ForCausalLM",
        tie_embeddings=bool(c.get("tie_word_embeddings", False)), dropout=0.0)
    weights = _load_weights(hf_dir)
    state = {}
    for name, t in weights.items():
        if name.startswith("model."):
            state[name[len("model."):]] = t.float()
        elif name == "lm_head.weight":
            state[name] = t.float()
        else:
            raise UserError(f"{hf_dir}: unexpected tensor {name}")
    if cfg.tie_embeddings:
        state.pop("lm_head.weight", None)  # tied: lm_head is embed_tokens (re-tied below)
    elif "lm_head.weight" not in state:
        raise UserError(f"{hf_dir}: tie_word_embeddings is false but there is no lm_head.weight")
    with torch.device("meta"):
        model = GPT(cfg)
    model = model.to_empty(device="cpu")
    # Non-persistent RoPE tables are not in the state dict: rebuild them for real after to_empty.
    model.rope_cos, model.rope_sin = rope_tables(cfg.head_dim, cfg.seq_len, cfg.rope_theta)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (cfg.tie_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise UserError(f"{hf_dir}: weights do not match the config (missing {missing[:5]}, "
                        f"unexpected {unexpected[:5]})")
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    return model.eval(), cfg
