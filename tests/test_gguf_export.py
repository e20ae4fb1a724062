"""GGUF export: read the file back with gguf's reader and check it against the model and tokenizer.

Besides per-tensor checks, a small numpy forward pass that follows llama.cpp's llama/qwen3 graphs (its rope
modes, its metadata keys) must reproduce our logits from the GGUF file alone.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from chatforge.chat_format import CHAT_TEMPLATE
from chatforge.checkpoint import save_checkpoint
from chatforge.cli import main
from chatforge.config import ModelConfig, TokenizerConfig
from chatforge.errors import UserError
from chatforge.gguf_export import export_gguf
from chatforge.tokenizer import Tokenizer
from test_export import CORPUS, tiny

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(CORPUS, TokenizerConfig(kind="bpe", vocab_size=300, min_frequency=1))


def field(reader, key):
    f = reader.get_field(key)
    assert f is not None, key
    return f.contents()


def read_tensors(reader) -> dict[str, tuple[np.ndarray, object]]:
    """name -> (fp32 array in numpy/torch (rows, cols) order, ggml type)."""
    out = {}
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists dimensions innermost first
        out[t.name] = (gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape), t.tensor_type)
    return out


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo convert_hf_to_gguf's llama q/k permutation (written here independently of the module)."""
    hd = w.shape[0] // n_head
    return w.reshape(n_head, hd // 2, 2, w.shape[1]).transpose(0, 2, 1, 3).reshape(w.shape)


def expected_names(cfg: ModelConfig) -> dict[str, str]:
    """GGUF name -> our parameter name."""
    m = {"token_embd.weight": "embed_tokens.weight", "output_norm.weight": "norm.weight"}
    if not cfg.tie_embeddings:
        m["output.weight"] = "lm_head.weight"
    per = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
           "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
           "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
    if cfg.qk_norm:
        per.update(attn_q_norm="self_attn.q_norm", attn_k_norm="self_attn.k_norm")
    for i in range(cfg.n_layer):
        m.update({f"blk.{i}.{k}.weight": f"layers.{i}.{v}.weight" for k, v in per.items()})
    return m


# ---- a numpy forward pass the way llama.cpp computes it, from the GGUF file alone -------------------

def _rms(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def _rope(x, n_rot, base, neox):
    """x: (T, H, D). llama.cpp NORM mode rotates pairs (2i, 2i+1); NEOX mode rotates (i, i + D/2)."""
    T, _, D = x.shape
    theta = np.arange(T)[:, None] * base ** (-np.arange(0, n_rot, 2) / n_rot)  # (T, D/2)
    cos, sin = np.cos(theta)[:, None, :], np.sin(theta)[:, None, :]
    x0, x1 = (x[..., :D // 2], x[..., D // 2:]) if neox else (x[..., 0::2], x[..., 1::2])
    r0, r1 = x0 * cos - x1 * sin, x0 * sin + x1 * cos
    if neox:
        return np.concatenate([r0, r1], -1)
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = r0, r1
    return out


def llama_cpp_forward(reader, ids: list[int]) -> np.ndarray:
    arch = field(reader, "general.architecture")
    k = lambda key: field(reader, f"{arch}.{key}")  # noqa: E731
    n_head, n_kv, eps = k("attention.head_count"), k("attention.head_count_kv"), k("attention.layer_norm_rms_epsilon")
    base, n_rot = k("rope.freq_base"), k("rope.dimension_count")
    w = {n: a.astype(np.float64) for n, (a, _) in read_tensors(reader).items()}
    x = w["token_embd.weight"][ids]
    T = len(ids)
    causal = np.triu(np.full((T, T), -np.inf), 1)
    for i in range(k("block_count")):
        b = lambda n: w[f"blk.{i}.{n}.weight"]  # noqa: E731
        h = _rms(x, b("attn_norm"), eps)
        q, kk, v = h @ b("attn_q").T, h @ b("attn_k").T, h @ b("attn_v").T
        q, kk, v = q.reshape(T, n_head, -1), kk.reshape(T, n_kv, -1), v.reshape(T, n_kv, -1)
        if arch == "qwen3":
            q, kk = _rms(q, b("attn_q_norm"), eps), _rms(kk, b("attn_k_norm"), eps)
        q, kk = _rope(q, n_rot, base, arch == "qwen3"), _rope(kk, n_rot, base, arch == "qwen3")
        rep = n_head // n_kv
        kk, v = np.repeat(kk, rep, axis=1), np.repeat(v, rep, axis=1)
        att = np.einsum("thd,shd->hts", q, kk) / np.sqrt(q.shape[-1]) + causal
        att = np.exp(att - att.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        x = x + np.einsum("hts,shd->thd", att, v).reshape(T, -1) @ b("attn_output").T
        h = _rms(x, b("ffn_norm"), eps)
        g = h @ b("ffn_gate").T
        x = x + (g / (1 + np.exp(-g)) * (h @ b("ffn_up").T)) @ b("ffn_down").T
    out = w.get("output.weight", w["token_embd.weight"])  # llama.cpp ties output to token_embd when absent
    return _rms(x, w["output_norm.weight"], eps) @ out.T


# ---- tests --------------------------------------------------------------------------------------

CASES = {"llama-tied": dict(), "llama-untied-odd-ffn": dict(tie_embeddings=False, intermediate_size=80),
         "qwen3": dict(qk_norm=True)}


@pytest.mark.parametrize("dtype", ["f32", "f16", "q8_0"])
@pytest.mark.parametrize("case", list(CASES))
def test_tensors_round_trip(tmp_path, tok, case, dtype):
    model = tiny(tok.vocab_size, **CASES[case])
    cfg = model.cfg
    path = export_gguf(model, tok, tmp_path / "m.gguf", dtype=dtype)
    reader = gguf.GGUFReader(path)
    arch = "qwen3" if cfg.qk_norm else "llama"
    assert field(reader, "general.architecture") == arch
    assert field(reader, "general.file_type") == {"f32": 0, "f16": 1, "q8_0": 7}[dtype]
    names = expected_names(cfg)
    tensors = read_tensors(reader)
    assert set(tensors) == set(names)
    sd = {n: p.detach().numpy() for n, p in model.state_dict().items()}
    for gname, ours in names.items():
        got, qtype = tensors[gname]
        want = sd[ours]
        assert got.shape == want.shape, gname
        if want.ndim == 1 or dtype == "f32":
            assert qtype == Q.F32, gname
        elif dtype == "f16":
            assert qtype == Q.F16, gname
        else:  # q8_0 needs rows that split into 32-value blocks; the rest stays f32 (ffn_down with 80 here)
            assert qtype == (Q.Q8_0 if want.shape[1] % 32 == 0 else Q.F32), gname
        if arch == "llama" and gname.endswith(("attn_q.weight", "attn_k.weight")):
            got = unpermute(got, cfg.n_head if "attn_q" in gname else cfg.n_kv_head)
        err = np.abs(got - want)
        if qtype == Q.F32:
            assert np.array_equal(got, want), gname
        elif qtype == Q.F16:
            assert err.max() < 1e-3, gname
        else:  # Q8_0: per 32-block scale d = max|w| / 127, error at most d/2 (+ d's own f16 rounding)
            d = np.abs(want).reshape(-1, 32).max(-1, keepdims=True) / 127
            assert (err.reshape(-1, 32) <= 0.6 * d + 1e-7).all(), gname
    if case == "llama-untied-odd-ffn" and dtype == "q8_0":
        assert tensors["blk.0.ffn_down.weight"][1] == Q.F32 and tensors["blk.0.ffn_up.weight"][1] == Q.Q8_0


@pytest.mark.parametrize("case", list(CASES))
def test_llama_cpp_style_forward_matches_our_logits(tmp_path, tok, case):
    model = tiny(tok.vocab_size, **CASES[case])
    reader = gguf.GGUFReader(export_gguf(model, tok, tmp_path / "m.gguf", dtype="f32"))
    ids = tok.encode("Hello world, the quick brown fox")[:20]
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0].double().numpy()
    theirs = llama_cpp_forward(reader, ids)
    assert np.abs(ours - theirs).max() < 1e-4


def test_metadata_and_vocabulary(tmp_path, tok):
    model = tiny(tok.vocab_size)
    cfg = model.cfg
    reader = gguf.GGUFReader(export_gguf(model, tok, tmp_path / "m.gguf", dtype="f16", name="tiny-chat"))
    assert field(reader, "general.name") == "tiny-chat"
    want = {"block_count": 2, "context_length": 64, "embedding_length": 64, "feed_forward_length": cfg.hidden(),
            "attention.head_count": 4, "attention.head_count_kv": 2, "rope.dimension_count": 16,
            "vocab_size": tok.vocab_size}
    for key, value in want.items():
        assert field(reader, f"llama.{key}") == value, key
    assert field(reader, "llama.rope.freq_base") == pytest.approx(5000.0)
    assert field(reader, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(1e-6)

    spec = json.loads(tok.hf.to_str())
    vocab = {t: i for t, i in spec["model"]["vocab"].items()}
    vocab.update({a["content"]: a["id"] for a in spec["added_tokens"]})
    by_id = sorted(vocab, key=vocab.get)
    assert len(by_id) == tok.vocab_size
    tokens = field(reader, "tokenizer.ggml.tokens")
    assert tokens == by_id and tokens[:7] == ["<|bos|>", "<|eos|>", "<|pad|>", "<|system|>", "<|user|>",
                                              "<|assistant|>", "<|end|>"]
    assert field(reader, "tokenizer.ggml.token_type") == [3] * 7 + [1] * (tok.vocab_size - 7)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    assert field(reader, "tokenizer.ggml.merges") == merges and len(merges) > 0
    assert field(reader, "tokenizer.ggml.model") == "gpt2"
    assert field(reader, "tokenizer.ggml.pre") == "llama-bpe"
    assert field(reader, "tokenizer.ggml.bos_token_id") == tok.bos_id
    assert field(reader, "tokenizer.ggml.eos_token_id") == tok.end_id  # replies end at <|end|>
    assert field(reader, "tokenizer.ggml.eot_token_id") == tok.end_id
    assert field(reader, "tokenizer.ggml.padding_token_id") == tok.pad_id
    assert field(reader, "tokenizer.ggml.add_bos_token") is True
    assert field(reader, "tokenizer.chat_template") == CHAT_TEMPLATE


def test_padded_embedding_rows_get_placeholder_tokens(tmp_path, tok):
    model = tiny(tok.vocab_size + 4)
    reader = gguf.GGUFReader(export_gguf(model, tok, tmp_path / "m.gguf"))
    tokens = field(reader, "tokenizer.ggml.tokens")
    assert len(tokens) == tok.vocab_size + 4 and tokens[-1] == f"[PAD{tok.vocab_size + 3}]"
    assert field(reader, "tokenizer.ggml.token_type")[-4:] == [int(gguf.TokenType.UNUSED)] * 4


def test_rejects_char_tokenizer_and_bad_outtype(tmp_path, tok):
    char = Tokenizer.train(CORPUS, TokenizerConfig(kind="char"))
    with pytest.raises(UserError, match="byte-level BPE"):
        export_gguf(tiny(char.vocab_size), char, tmp_path / "c.gguf")
    with pytest.raises(UserError, match="q4_0"):
        export_gguf(tiny(tok.vocab_size), tok, tmp_path / "q.gguf", dtype="q4_0")
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_cli_export_gguf_refuses_overwrite(tmp_path, tok, capsys):
    run = tmp_path / "run"
    tok.save(run / "tokenizer")
    save_checkpoint(run / "pretrain" / "ckpt", 1, tiny(tok.vocab_size), None, None, None, {}, val_loss=1.0)
    out = tmp_path / "model.gguf"
    assert main(["export", str(run), str(out), "--format", "gguf", "--outtype", "q8_0"]) == 0
    reader = gguf.GGUFReader(out)
    assert field(reader, "general.file_type") == 7
    before = out.read_bytes()
    capsys.readouterr()
    assert main(["export", str(run), str(out), "--format", "gguf"]) == 2
    assert "--force" in capsys.readouterr().err and out.read_bytes() == before
    assert main(["export", str(run), str(out), "--format", "gguf", "--force"]) == 0
    assert field(gguf.GGUFReader(out), "general.file_type") == 0  # f32 by default
    assert main(["export", str(run), "--format", "gguf", "--outtype", "f16"]) == 0  # default path in the run
    assert [p.suffix for p in (run / "export").iterdir()] == [".gguf"]
