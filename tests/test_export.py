"""Export to / import from Hugging Face: transformers loads our folder and computes the same logits."""
from __future__ import annotations

import json

import pytest
import torch

from chatforge.config import ModelConfig, TokenizerConfig
from chatforge.errors import UserError
from chatforge.export import export_hf, import_hf
from chatforge.model import GPT
from chatforge.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

CORPUS = ["The quick brown fox jumps over the lazy dog.", "Hello world, how are you today?",
          "Once upon a time there was a little model that wanted to talk."] * 5

pytestmark = pytest.mark.usefixtures("one_thread")



@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    Tokenizer.train(CORPUS, TokenizerConfig(kind="bpe", vocab_size=300, min_frequency=1)).save(d)
    return d


def tiny(vocab: int, **kw) -> GPT:
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=2, n_head=4, n_kv_head=2, n_embd=64, seq_len=64, vocab_size=vocab,
                      rope_theta=5000.0, norm_eps=1e-6, init_std=0.1, **kw)
    model = GPT(cfg).eval()
    with torch.no_grad():  # non-trivial norm weights, so a mis-mapped norm would show
        for n, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.3)
    return model


@pytest.mark.parametrize("qk_norm,tie,arch", [(False, True, "LlamaForCausalLM"), (False, False, "LlamaForCausalLM"),
                                             (True, True, "Qwen3ForCausalLM")])
def test_export_logits_match_transformers(tmp_path, tok_dir, qk_norm, tie, arch):
    tok = Tokenizer.load(tok_dir)
    model = tiny(tok.vocab_size, qk_norm=qk_norm, tie_embeddings=tie)
    out = export_hf(model, tok_dir, tmp_path / "hf", meta={"step": 7})
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == [arch]
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(hf).__name__ == arch
    ids = torch.randint(0, tok.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(ids)
        theirs = hf(ids).logits
    assert (ours - theirs).abs().max().item() < 1e-4
    # Round trip: importing our own export gives the same model back.
    back, bcfg = import_hf(out)
    assert bcfg.qk_norm == qk_norm and bcfg.tie_embeddings == tie
    with torch.no_grad():
        assert torch.equal(back(ids), ours)


def test_exported_tokenizer_matches_ours(tmp_path, tok_dir):
    tok = Tokenizer.load(tok_dir)
    out = export_hf(tiny(tok.vocab_size), tok_dir, tmp_path / "hf")
    hft = transformers.AutoTokenizer.from_pretrained(out)
    text = "Hello world, the quick brown fox! Ünïcödé 🙂 and   spaces\n\nnew line"
    assert hft.encode(text, add_special_tokens=False) == tok.encode(text)
    msgs = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "How are you?"}]
    text_hf = hft.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text_hf == tok.render_chat_text(msgs, add_generation_prompt=True)
    ids_hf = hft(text_hf, add_special_tokens=False)["input_ids"]
    assert ids_hf == tok.render_chat(msgs, add_generation_prompt=True)[0]
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [tok.end_id, tok.eos_id] and gen["pad_token_id"] == tok.pad_id


def test_import_transformers_llama(tmp_path):
    torch.manual_seed(0)
    hcfg = transformers.LlamaConfig(vocab_size=120, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                    rope_theta=20000.0, rms_norm_eps=1e-6, tie_word_embeddings=False)
    hf = transformers.LlamaForCausalLM(hcfg).eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            p.add_(torch.randn_like(p) * 0.05)  # default init leaves norms at 1: perturb everything
    hf.save_pretrained(tmp_path / "llama")
    model, cfg = import_hf(tmp_path / "llama")
    assert (cfg.n_layer, cfg.n_kv_head, cfg.intermediate_size, cfg.rope_theta) == (2, 2, 96, 20000.0)
    ids = torch.randint(0, 120, (2, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max().item() < 1e-4


def test_import_rejects_unsupported(tmp_path):
    hcfg = transformers.LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                    num_attention_heads=4, attention_bias=True)
    transformers.LlamaForCausalLM(hcfg).save_pretrained(tmp_path / "biased")
    with pytest.raises(UserError, match="attention_bias"):
        import_hf(tmp_path / "biased")
    d = tmp_path / "gpt2"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    with pytest.raises(UserError, match="not supported"):
        import_hf(d)
    c = json.loads((tmp_path / "biased" / "config.json").read_text())
    c.update(attention_bias=False, rope_scaling={"rope_type": "linear", "factor": 2.0})
    c.pop("rope_parameters", None)
    (tmp_path / "biased" / "config.json").write_text(json.dumps(c))
    with pytest.raises(UserError, match="rope_scaling"):
        import_hf(tmp_path / "biased")
