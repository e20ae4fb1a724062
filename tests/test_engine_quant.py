"""Engine decode paths beyond plain fp32: the greedy bf16-screened head and weights="int4" (quant.Int4Weight)."""
from __future__ import annotations

import pytest
import torch

from chatforge import cpu_decode
from chatforge.engine import Engine
from chatforge.errors import UserError
from chatforge.quant import GROUP, Int4Weight, int4_available
from chatforge.tokenizer import Tokenizer
from test_engine import make_model, make_tok

pytestmark = pytest.mark.usefixtures("one_thread")
needs_int4 = pytest.mark.skipif(not int4_available(), reason="this torch has no CPU int4 kernel")

@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return make_tok()


def q4_1_grid(w: torch.Tensor) -> torch.Tensor:
    """w moved onto a GGUF Q4_1-like grid (per 32 inputs: d * q + m, q in 0..15) with bf16-exact d and m + 8 d,
    as an imported Q4_1 model's weights are (up to the scales' rounding): int4 then holds them exactly."""
    g = w.view(w.shape[0], -1, GROUP)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    d = ((hi - lo) / 15).bfloat16().float()
    zero = (lo + 8 * d).bfloat16().float()
    q = torch.round((g - zero) / d + 8).clamp(0, 15)
    return ((q - 8) * d + zero).view_as(w)


def decode_logits(engine: Engine, ids: list[int], greedy: bool = False) -> list[torch.Tensor]:
    """Teacher-forced single-row decode: the logits after each of ids[1:], from the engine's decode step."""
    cache = engine.new_cache(1, len(ids))
    engine.prefill(torch.tensor([ids[:1]]), cache)
    return [engine.decode_step(torch.tensor([[i]]), cache, greedy=greedy)[0].clone() for i in ids[1:]]


def force_screen(monkeypatch, on: bool) -> None:
    """The bf16-screened head whatever this CPU has (decode weights are built at the engine's first prefill)."""
    monkeypatch.setattr(cpu_decode, "bf16_matmul_fast", lambda: on)


# ---- quant.Int4Weight -------------------------------------------------------------------------------------
@needs_int4
def test_int4_kernel_layout_is_exact_on_the_grid():
    """The kernel computes x @ ((q - 8) * s + z).T: on-grid weights come back exactly (up to bf16 output)."""
    torch.manual_seed(0)
    w = q4_1_grid(torch.randn(48, 96))
    x = torch.randn(5, 96).bfloat16()
    want = x.float() @ w.t()
    got = Int4Weight(w)(x).float()
    # fp32 sums of exact products, then one rounding to bf16: relative 2^-8 of the result at most.
    assert (got - want).abs().max() <= 2 ** -8 * want.abs().max() + 1e-6


@needs_int4
def test_int4_error_is_within_half_a_step_and_odd_sizes_pad():
    torch.manual_seed(1)
    w = torch.randn(40, 64)  # 40 rows: not a multiple of 16, padded inside and cut from the output
    q = Int4Weight(w)
    eye = torch.eye(64).bfloat16()
    back = q(eye).float().t()  # (40, 64): the weights as the kernel sees them (bf16-rounded)
    assert back.shape == w.shape
    step = (w.view(40, 2, GROUP).amax(-1) - w.view(40, 2, GROUP).amin(-1)) / 15
    bound = (step / 2 + 2 ** -7 * w.view(40, 2, GROUP).abs().amax(-1)).repeat_interleave(GROUP, 1)
    assert ((back - w).abs() <= bound * 1.01 + 1e-6).all()
    with pytest.raises(ValueError, match="multiple of 32"):
        Int4Weight(torch.randn(16, 48))


# ---- Engine(weights="int4") ----------------------------------------------------------------------------------
@needs_int4
def test_int4_decode_logits_close_to_fp32_on_grid_weights(tok):
    """A model whose projections lie on the int4 grid (as an imported Q4_1 model's do): int4 decoding differs
    from fp32 only by bf16 activations (relative 2^-8 per rounding, a few per layer): logits within 3% of
    their range, and the same argmax wherever the fp32 top two are clearly apart."""
    model = make_model(tok)
    with torch.no_grad():
        for b in model.layers:
            for lin in (b.self_attn.q_proj, b.self_attn.k_proj, b.self_attn.v_proj, b.self_attn.o_proj,
                        b.mlp.gate_proj, b.mlp.up_proj, b.mlp.down_proj):
                lin.weight.copy_(q4_1_grid(lin.weight))
    ids = [tok.bos_id] + tok.encode("The quick brown fox jumps over the lazy dog. Hello world")
    ref = decode_logits(Engine(model, tok), ids)
    got = decode_logits(Engine(model, tok, weights="int4"), ids)
    for r, g in zip(ref, got):
        span = float(r.max() - r.min())
        assert float((r - g).abs().max()) <= 0.03 * span
        top2 = r.topk(2).values
        if float(top2[0] - top2[1]) > 0.06 * span:
            assert int(r.argmax()) == int(g.argmax())


@needs_int4
def test_int4_decode_random_weights_is_an_approximation(tok):
    """Off-grid (random) weights: 4-bit rounding of each group (error up to 1/30 of its range, compounded over
    layers of a deliberately sharp random model) - the logits move (~0.4 relative here) but stay correlated;
    a loose bound that only catches a broken layout: unrelated logits of the same size give ~1.4."""
    model = make_model(tok, seed=3)
    ids = [tok.bos_id] + tok.encode("Hello world, hello there! How are you")
    ref = torch.stack(decode_logits(Engine(model, tok), ids))
    got = torch.stack(decode_logits(Engine(model, tok, weights="int4"), ids))
    rel = float((ref - got).norm() / ref.norm())
    assert rel < 0.7, rel


@needs_int4
def test_int4_generate_sampling_and_batches_run(tok):
    model = make_model(tok)
    eng = Engine(model, tok, weights="int4")
    ids = [tok.bos_id] + tok.encode("Hello")
    out = eng.generate(ids, max_new_tokens=8, temperature=0.8, seed=0)[0]
    assert len(out) == 8 and all(0 <= t < model.cfg.vocab_size for t in out)
    assert eng.generate(ids, max_new_tokens=8, temperature=0.8, seed=0)[0] == out  # same seed, same tokens
    two = eng.generate([ids, ids + ids[1:]], max_new_tokens=4, temperature=0)  # batches decode in fp32
    assert two == Engine(model, tok).generate([ids, ids + ids[1:]], max_new_tokens=4, temperature=0)
    greedy = eng.generate(ids, max_new_tokens=4, temperature=0)[0]  # one row: the int4 weights
    streamed = eng.stream(ids, max_new_tokens=4, temperature=0)
    assert "".join(streamed) == tok.decode(greedy) and streamed.n_tokens == 4 and streamed.finish_reason == "length"


def test_weights_option_errors(tok):
    model = make_model(tok)
    with pytest.raises(UserError, match="not known"):
        Engine(model, tok, weights="int8")
    if int4_available():
        with pytest.raises(UserError, match="multiples of 32"):
            Engine(make_model(tok, n_embd=48, n_head=4, n_kv_head=2), tok, weights="int4")
        with pytest.raises(UserError, match="fp32"):
            Engine(make_model(tok).to(torch.bfloat16), tok, weights="int4")


# ---- greedy decoding through the bf16-screened head (fp32 weights) -----------------------------------------------
def test_greedy_head_keeps_the_fp32_argmax(tok, monkeypatch):
    """greedy_head reads a bf16 head and recomputes the rows near the top in fp32: its argmax must be the
    fp32 logits' argmax at every step, and its value there the fp32 value. Forced on whatever the CPU."""
    model = make_model(tok, seed=5, tie_embeddings=False)
    ids = [tok.bos_id] + tok.encode("The quick brown fox jumps over the lazy dog. " * 2)
    force_screen(monkeypatch, False)
    plain = Engine(model, tok)
    ref = decode_logits(plain, ids, greedy=True)  # no screen: exact logits whatever greedy says
    force_screen(monkeypatch, True)
    screened = Engine(model, tok)
    got = decode_logits(screened, ids, greedy=True)
    assert screened._decode[1].screen is not None
    for r, g in zip(ref, got):
        i = int(r.argmax())
        assert int(g.argmax()) == i
        assert abs(float(g[i] - r[i])) <= 1e-4 * float(r.abs().max())
    prompt = ids[:5]
    assert screened.generate(prompt, max_new_tokens=30, temperature=0)[0] == \
        plain.generate(prompt, max_new_tokens=30, temperature=0)[0]


def test_greedy_head_on_near_ties():
    """Rows whose logits differ by less than bf16's resolution: the screen must keep them all and pick the
    exact winner (a bf16-only head would see a tie and could pick either)."""
    torch.manual_seed(0)
    w = torch.randn(64, 32)
    h = torch.randn(1, 32)
    w[3] = 3 * h[0] / h.norm()  # the best row by far
    w[7] = w[3] * (1 + 1e-4)  # the same row up to a factor far below bf16's 2^-8: the exact winner
    with torch.inference_mode():
        got = cpu_decode.greedy_head(h.clone(), cpu_decode.screen_weights(w), w)
    exact = h @ w.t()
    assert int(got.argmax()) == int(exact.argmax()) == 7
