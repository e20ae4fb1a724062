"""Language-model metrics: loss, perplexity, top-1/top-5 accuracy, bits per byte, each with a standard error.

Standard errors. Tokens inside one sequence are correlated (a hard passage makes every token in it hard), so
treating every token as an independent sample would make the error bars far too small. We treat each
evaluated sequence (a batch row, or one sliding window of `evaluate_text`) as a cluster and report the
cluster-robust standard error of the token-weighted mean (the usual ratio-estimator formula):

    mean = sum_i s_i / sum_i n_i          s_i: summed metric of row i, n_i: scored tokens in row i
    se   = sqrt( k / (k - 1) * sum_i (s_i - mean * n_i)^2 ) / sum_i n_i        over the k rows with n_i > 0

With equal-length rows this is the plain standard error of the per-row means. With fewer than two rows
the standard error is undefined and reported as NaN.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

IGNORE = -100
LN2 = math.log(2.0)


class _Accumulator:
    """Per-row sums of NLL, top-1 hits, top-5 hits, tokens and target bytes."""

    def __init__(self) -> None:
        self.nll: list[np.ndarray] = []
        self.top1: list[np.ndarray] = []
        self.top5: list[np.ndarray] = []
        self.count: list[np.ndarray] = []
        self.nbytes: list[np.ndarray] = []

    def add(self, logits: torch.Tensor, y: torch.Tensor, token_bytes: torch.Tensor | None) -> None:
        logits = logits.float()
        valid = y != IGNORE
        safe_y = y.masked_fill(~valid, 0)
        nll = F.cross_entropy(logits.transpose(1, 2), safe_y, reduction="none") * valid
        k = min(5, logits.shape[-1])
        top = logits.topk(k, dim=-1).indices  # (B, T, k); ties go to the lower id, like argmax
        hit1 = (top[..., 0] == safe_y) & valid
        hit5 = (top == safe_y.unsqueeze(-1)).any(-1) & valid
        # Row sums on the CPU in float64/int64: MPS has no float64, and long evals need the precision.
        self.nll.append(nll.cpu().double().sum(1).numpy())
        self.top1.append(hit1.sum(1).cpu().numpy().astype(np.float64))
        self.top5.append(hit5.sum(1).cpu().numpy().astype(np.float64))
        self.count.append(valid.sum(1).cpu().numpy().astype(np.float64))
        if token_bytes is not None:
            b = token_bytes[safe_y.cpu()] * valid.cpu()
            self.nbytes.append(b.sum(1).numpy().astype(np.float64))

    def result(self) -> dict:
        if not self.count:
            raise ValueError("no batches to evaluate")
        n = np.concatenate(self.count)
        keep = n > 0
        n = n[keep]
        total = float(n.sum())
        if total == 0:
            raise ValueError("no target tokens to evaluate (every target is ignored)")

        def mean_se(parts: list[np.ndarray]) -> tuple[float, float]:
            s = np.concatenate(parts)[keep]
            mean = float(s.sum() / total)
            k = len(s)
            if k < 2:
                return mean, float("nan")
            resid = s - mean * n
            return mean, float(math.sqrt(k / (k - 1) * float((resid ** 2).sum())) / total)

        loss, loss_se = mean_se(self.nll)
        acc, acc_se = mean_se(self.top1)
        top5, top5_se = mean_se(self.top5)
        out = {"loss": loss, "loss_se": loss_se, "ppl": math.exp(min(loss, 700.0)),
               "acc": acc, "acc_se": acc_se, "top5": top5, "top5_se": top5_se,
               "tokens": int(total), "sequences": int(keep.sum())}
        if self.nbytes:
            nbytes = float(np.concatenate(self.nbytes).sum())
            nll_sum = float(np.concatenate(self.nll).sum())
            out["bytes"] = int(nbytes)
            out["bpb"] = nll_sum / LN2 / nbytes if nbytes > 0 else float("nan")
        return out


def _as_tensor_bytes(token_bytes) -> torch.Tensor | None:
    if token_bytes is None:
        return None
    return torch.as_tensor(np.asarray(token_bytes), dtype=torch.long)


@torch.inference_mode()
def evaluate_lm(model: torch.nn.Module, batches: Iterable[dict], *, device: str | torch.device = "cpu",
                token_bytes: np.ndarray | None = None, progress: bool = False) -> dict:
    """Score next-token prediction on batches of dict(x=(B,T) ids, y=(B,T) targets, -100 = ignored).

    Returns loss (mean NLL in nats per target token), ppl = exp(loss), acc (top-1), top5, each with `_se`
    (see module docstring), tokens, sequences, and, when `token_bytes` (UTF-8 bytes per token id) is given,
    bytes and bpb = total NLL in bits / total bytes of the target tokens. Optional batch keys `doc_ids`
    and `position_ids` are passed to the model (packed documents). Logits are scored in fp32.
    """
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    acc = _Accumulator()
    tb = _as_tensor_bytes(token_bytes)
    try:
        for batch in tqdm(batches, desc="eval", disable=not progress, leave=False):
            x = batch["x"].to(device)
            y = batch["y"].to(device)
            kwargs = {k: batch[k].to(device) for k in ("doc_ids", "position_ids") if batch.get(k) is not None}
            logits = model(x, **kwargs)
            acc.add(logits, y, tb)
    finally:
        model.train(was_training)
    return acc.result()


def sliding_windows(n_tokens: int, seq_len: int, stride: int) -> list[tuple[int, int, int]]:
    """Windows over one document of `n_tokens` ids as (start, end, first_scored).

    The model reads ids[start:end-1] and predicts ids[start+1:end]; only targets with index >= first_scored
    count, so every target index 1..n_tokens-1 is scored exactly once, with up to seq_len tokens of context
    (the Hugging Face "perplexity with a sliding window" recipe). stride == seq_len gives disjoint windows.
    """
    if seq_len < 1 or not 1 <= stride <= seq_len:
        raise ValueError(f"need 1 <= stride <= seq_len, got stride={stride}, seq_len={seq_len}")
    out = []
    scored_upto = 1  # next target index not yet scored
    start = 0
    while scored_upto < n_tokens:
        end = min(start + seq_len + 1, n_tokens)
        out.append((start, end, scored_upto))
        scored_upto = end
        start += stride
    return out


@torch.inference_mode()
def evaluate_text(model: torch.nn.Module, tok, texts: Sequence[str], seq_len: int, stride: int | None = None,
                  device: str | torch.device = "cpu", *, batch_size: int = 8, add_bos: bool = False,
                  progress: bool = False) -> dict:
    """Sliding-window evaluation of whole documents; returns the same dict as `evaluate_lm`.

    Each document is encoded on its own and never shares a window with another. stride (default seq_len)
    is how far each window moves: smaller strides give every scored token more context at more compute.
    Each token after the first is scored once (add_bos=True prepends BOS so the first is scored too).
    bpb divides by the real UTF-8 bytes of the scored tokens; for a byte-level tokenizer those add up to
    the document's bytes (less the first token's, unless add_bos).
    """
    stride = stride or seq_len
    pad_id = getattr(tok, "pad_id", 0)
    xs: list[list[int]] = []
    ys: list[list[int]] = []
    for text in texts:
        ids = tok.encode(text)
        if add_bos:
            ids = [tok.bos_id] + ids
        for start, end, first in sliding_windows(len(ids), seq_len, stride):
            x = ids[start:end - 1]
            y = [t if start + 1 + j >= first else IGNORE for j, t in enumerate(ids[start + 1:end])]
            xs.append(x)
            ys.append(y)
    if not xs:
        raise ValueError("no document has two or more tokens to evaluate")

    def batches():
        for i in range(0, len(xs), batch_size):
            bx, by = xs[i:i + batch_size], ys[i:i + batch_size]
            width = max(len(r) for r in bx)  # pad on the right: causal attention keeps padding invisible
            yield {"x": torch.tensor([r + [pad_id] * (width - len(r)) for r in bx], dtype=torch.long),
                   "y": torch.tensor([r + [IGNORE] * (width - len(r)) for r in by], dtype=torch.long)}

    return evaluate_lm(model, batches(), device=device, token_bytes=tok.token_bytes_lengths(), progress=progress)
