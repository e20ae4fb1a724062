"""HellaSwag scoring speed: chatforge score_multiple_choice vs a plain transformers loop on the exported model.

Same weights, same token ids, same items (the 1000-item validation sample in ../shared/data/hellaswag);
the per-ending log-likelihoods must agree. The model is randomly initialised (speed, not accuracy) unless
--run-dir points at a trained run (its tokenizer and pretrain checkpoint are used).
    python benchmarks/bench_eval.py [--items 200 --layers 4 --width 256 --device cpu] [--run-dir runs/x]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from chatforge import tasks as bm
from chatforge.config import ModelConfig, TokenizerConfig
from chatforge.distributed import pick_device
from chatforge.export import export_hf
from chatforge.model import GPT
from chatforge.tokenizer import Tokenizer

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@torch.inference_mode()
def hf_scores(hf, hf_tok, items, device, bos_id: int) -> list[list[float]]:
    """The textbook loop: one item at a time, its endings padded into one batch."""
    out = []
    for it in items:
        ctx = [bos_id] + hf_tok(it["context"], add_special_tokens=False)["input_ids"]
        conts = [hf_tok(e, add_special_tokens=False)["input_ids"] for e in it["endings"]]
        seqs = [ctx + c for c in conts]
        width = max(len(s) for s in seqs)
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        mask = torch.zeros(len(seqs), width, dtype=torch.long)
        for r, s in enumerate(seqs):
            ids[r, :len(s)] = torch.tensor(s)
            mask[r, :len(s)] = 1
        logp = F.log_softmax(hf(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float(), -1)
        row = []
        for r, c in enumerate(conts):
            pos = torch.arange(len(ctx) - 1, len(ctx) - 1 + len(c), device=device)
            row.append(float(logp[r, pos, torch.tensor(c, device=device)].sum()))
        out.append(row)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=200)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=16, help="chatforge sequences per forward pass")
    ap.add_argument("--run-dir", type=Path, default=None)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    import transformers

    path = DATA / "hellaswag" / "hellaswag_val_sample1000_raw.jsonl"
    if not path.is_file():
        raise SystemExit(f"{path} is absent: this benchmark needs ../shared/data")
    items = bm.load_items(path, "hellaswag")[:args.items]
    device = pick_device(args.device)

    if args.run_dir:
        from chatforge.checkpoint import load_model, resolve_checkpoint

        tok = Tokenizer.load(args.run_dir / "tokenizer")
        model, _ = load_model(resolve_checkpoint(args.run_dir / "pretrain" / "ckpt", "best"), device)
    else:
        # A BPE vocabulary from TinyStories (never from the eval items), a random model of the given shape.
        text = (DATA / "tinystories" / "tinystories_v1_train_first1000.txt").read_text()
        tok = Tokenizer.train([text], TokenizerConfig(vocab_size=4096, min_frequency=2))
        torch.manual_seed(0)
        model = GPT(ModelConfig(n_layer=args.layers, n_head=args.heads, n_kv_head=args.heads, n_embd=args.width,
                                seq_len=256, vocab_size=tok.vocab_size, init_std=0.1)).to(device)
    model.eval()

    with tempfile.TemporaryDirectory() as d:
        tok.save(Path(d) / "tok")
        export_hf(model.cpu(), Path(d) / "tok", Path(d) / "hf")
        model.to(device)
        hf = transformers.AutoModelForCausalLM.from_pretrained(Path(d) / "hf", dtype=torch.float32).to(device).eval()
        hf_tok = transformers.AutoTokenizer.from_pretrained(Path(d) / "hf")

    warm = items[:4]
    bm.score_multiple_choice(model, tok, warm, device=device)
    hf_scores(hf, hf_tok, warm, device, tok.bos_id)

    sync()
    t = time.perf_counter()
    ours = bm.score_multiple_choice(model, tok, items, device=device, batch_size=args.batch_size)
    sync()
    t_ours = time.perf_counter() - t
    t = time.perf_counter()
    theirs = hf_scores(hf, hf_tok, items, device, tok.bos_id)
    sync()
    t_hf = time.perf_counter() - t

    # Agreement: same ids and weights must give the same choices (up to float ties) and log-likelihoods.
    reqs = [([tok.bos_id] + tok.encode(it["context"]), tok.encode(e)) for it in items for e in it["endings"]]
    ll = bm.continuation_logprobs(model, reqs, device=device, batch_size=args.batch_size)
    flat = [v for row in theirs for v in row]
    max_diff = max(abs(a - b) for a, b in zip(ll, flat))
    hf_pred = [max(range(len(r)), key=r.__getitem__) for r in theirs]
    agree = sum(p["pred"] == h for p, h in zip(ours["predictions"], hf_pred)) / len(items)
    hf_acc = sum(h == it["label"] for h, it in zip(hf_pred, items)) / len(items)

    n = len(items)
    print(f"model: {model.num_params() / 1e6:.2f}M params, device {device}, {n} HellaSwag items x 4 endings")
    print(f"chatforge score_multiple_choice: {n / t_ours:8.1f} items/s ({t_ours:.2f} s), acc {ours['acc']:.4f}, "
          f"acc_norm {ours['acc_norm']:.4f}")
    print(f"transformers per-item loop:      {n / t_hf:8.1f} items/s ({t_hf:.2f} s), acc {hf_acc:.4f}")
    print(f"max |log-likelihood difference|: {max_diff:.2e}; same choice on {agree:.1%} of items; "
          f"speed ratio chatforge/transformers: {t_hf / t_ours:.2f}x")
    assert max_diff < 1e-3, "log-likelihoods differ between chatforge and transformers"


if __name__ == "__main__":
    from chatforge.machine import describe
    print(describe(), flush=True)
    main()
