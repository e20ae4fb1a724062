"""Language-model metrics: loss, perplexity, top-1/top-5 accuracy, bits per byte, each with a standard error.

`evaluate_lm` is the package's one evaluation (device, autocast, all ranks): training's periodic validation
loss and the eval stage both come from it.

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
import torch.nn as nn
import torch.nn.functional as F

from .data.loader import IGNORE
from .distributed import all_gather, autocast_ctx, pick_device

LN2 = math.log(2.0)
ACTIVE_SHARE = 0.95  # compute only up to each row's last target when that leaves out 5% of positions or more


class EmptyEvalError(ValueError):
    """No batches, or no target tokens in them (on any rank)."""


def forward_at_targets(model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The model's logits where batch["y"] has targets (!= -100), the target mask and the number of targets.

    When some targets are ignored the logits are (N, vocab), row-major over the targets (the head runs only
    there, and positions after a row's last target are skipped when that saves enough); else (B, T, vocab).
    """
    y = batch["y"]
    keep = y != IGNORE
    n = int(keep.sum())
    kwargs = {k: batch[k] for k in ("doc_ids", "position_ids") if batch.get(k) is not None}
    if 0 < n < keep.numel():
        active = keep.flip(1).cummax(1).values.flip(1)
        if int(active.sum()) < ACTIVE_SHARE * active.numel():
            kwargs["active"] = active
        return model(batch["x"], logits_at=keep, **kwargs), keep, n
    return model(batch["x"], **kwargs), keep, n


# Scored rows at a time: at most this many bytes of fp32 logits (a 16 x 2,048 batch of a 49k vocabulary would be
# 6.4 GB at once; then page faults, not arithmetic, set the pace).
LOGITS_BYTES = 512 * 2**20


class _Accumulator:
    """Per-row sums of NLL, tokens, target bytes and (with accuracy) top-1 and top-5 hits."""

    def __init__(self, accuracy: bool, token_bytes: torch.Tensor | None) -> None:
        self.accuracy, self.token_bytes = accuracy, token_bytes
        self.parts: dict[str, list[np.ndarray]] = {k: [] for k in ("nll", "top1", "top5", "count", "nbytes")}

    def _put(self, key: str, per_row: np.ndarray) -> None:
        self.parts[key].append(np.asarray(per_row, dtype=np.float64))

    def add(self, logits: torch.Tensor, keep: torch.Tensor, y: torch.Tensor) -> None:
        """logits (B, T, V) at every position, or (N, V) at the targets only (see forward_at_targets)."""
        logits = logits.float()
        B = y.shape[0]
        if logits.dim() == 3:
            safe_y = y.masked_fill(~keep, 0)
            nll = F.cross_entropy(logits.transpose(1, 2), safe_y, reduction="none") * keep
            # Row sums on the CPU in float64: MPS has no float64, and long evals need the precision.
            self._put("nll", nll.cpu().double().sum(1).numpy())
            self._put("count", keep.sum(1).cpu().numpy())
            if self.accuracy:
                top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices  # ties go to the lower id, like argmax
                self._put("top1", ((top[..., 0] == safe_y) & keep).sum(1).cpu().numpy())
                self._put("top5", ((top == safe_y.unsqueeze(-1)).any(-1) & keep).sum(1).cpu().numpy())
            if self.token_bytes is not None:
                self._put("nbytes", (self.token_bytes[safe_y.cpu()] * keep.cpu()).sum(1).numpy())
            return
        yk = y[keep]
        row = keep.nonzero()[:, 0].cpu().numpy()

        def per_row(values: torch.Tensor) -> np.ndarray:
            return np.bincount(row, weights=values.cpu().double().numpy(), minlength=B)

        self._put("nll", per_row(F.cross_entropy(logits, yk, reduction="none")))
        self._put("count", np.bincount(row, minlength=B))
        if self.accuracy:
            top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
            self._put("top1", per_row(top[:, 0] == yk))
            self._put("top5", per_row((top == yk.unsqueeze(-1)).any(-1)))
        if self.token_bytes is not None:
            self._put("nbytes", per_row(self.token_bytes[yk.cpu()]))

    def result(self) -> dict:
        # Every rank's rows, rank by rank: the same numbers as one process that scored them all.
        ranks = all_gather({k: np.concatenate(v) if v else np.zeros(0) for k, v in self.parts.items()})
        cols = {k: np.concatenate([r[k] for r in ranks]) for k in self.parts}
        if not len(cols["count"]):
            raise EmptyEvalError("no batches to evaluate")
        n = cols["count"]
        keep = n > 0
        n = n[keep]
        total = float(n.sum())
        if total == 0:
            raise EmptyEvalError("no target tokens to evaluate (every target is ignored)")

        def mean_se(key: str) -> tuple[float, float]:
            s = cols[key][keep]
            mean = float(s.sum() / total)
            k = len(s)
            if k < 2:
                return mean, float("nan")
            resid = s - mean * n
            return mean, float(math.sqrt(k / (k - 1) * float((resid ** 2).sum())) / total)

        loss, loss_se = mean_se("nll")
        out = {"loss": loss, "loss_se": loss_se, "ppl": math.exp(min(loss, 700.0))}
        if self.accuracy:
            (acc, acc_se), (top5, top5_se) = mean_se("top1"), mean_se("top5")
            out.update(acc=acc, acc_se=acc_se, top5=top5, top5_se=top5_se)
        out.update(tokens=int(total), sequences=int(keep.sum()))
        if self.token_bytes is not None:
            nbytes = float(cols["nbytes"].sum())
            out["bytes"] = int(nbytes)
            out["bpb"] = float(cols["nll"].sum()) / LN2 / nbytes if nbytes > 0 else float("nan")
        return out


def _as_tensor_bytes(token_bytes) -> torch.Tensor | None:
    if token_bytes is None:
        return None
    return torch.as_tensor(np.asarray(token_bytes), dtype=torch.long)


@torch.no_grad()
def evaluate_lm(model: nn.Module, batches: Iterable[dict], *, device: str | torch.device | None = None,
                token_bytes: np.ndarray | None = None, accuracy: bool = True, progress: bool | str = False,
                precision: str = "fp32", total: int | None = None) -> dict:
    """Score next-token prediction on batches of dict(x=(B,T) ids, y=(B,T) targets, -100 = ignored): the one
    evaluation of the package, for training's periodic validation and for the eval stage.

    Runs on `device` (a torch.device or a name such as "auto"; default: where the model's weights are; the
    model is moved there), with bf16 autocast when precision="bf16" (logits are scored in fp32). Under a process group each rank scores its own batches and every rank gets
    the metrics of all of them. `model` may be wrapped (DDP, compiled blocks).

    Returns loss (mean NLL in nats per target token), ppl = exp(loss), with accuracy=True acc (top-1) and
    top5, each with `_se` (see module docstring), tokens, sequences, and, when `token_bytes` (UTF-8 bytes per
    token id) is given, bytes and bpb = total NLL in bits / total bytes of the target tokens. Optional batch
    keys `doc_ids` and `position_ids` are passed to the model (packed documents). Raises EmptyEvalError
    when there is nothing to score.
    """
    from tqdm.auto import tqdm

    weights_at = next((p.device for p in model.parameters()), torch.device("cpu"))
    device = weights_at if device is None else pick_device(device)
    if weights_at != device:
        model.to(device)
    was_training = model.training
    model.eval()
    acc = _Accumulator(accuracy, _as_tensor_bytes(token_bytes))
    try:
        with autocast_ctx(device, precision):
            desc = progress if isinstance(progress, str) else "eval"  # progress: a bar (a str names it); total: batches
            vocab = getattr(getattr(model, "cfg", None), "vocab_size", 0)
            for batch in tqdm(batches, desc=desc, total=total, disable=not progress, leave=False):
                batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                B, T = batch["y"].shape
                step = max(1, LOGITS_BYTES // max(T * vocab * 4, 1))  # rows whose fp32 logits fit the budget
                for i in range(0, B, step):  # per-row sums: splitting rows changes no number
                    part = {k: v[i:i + step] if isinstance(v, torch.Tensor) and v.shape[:1] == (B,) else v
                            for k, v in batch.items()}
                    logits, keep, _ = forward_at_targets(model, part)
                    acc.add(logits, keep, part["y"])
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


def evaluate_text(model: nn.Module, tok, texts: Sequence[str], seq_len: int, stride: int | None = None,
                  device: str | torch.device | None = None, *, batch_size: int = 8, add_bos: bool = False,
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
