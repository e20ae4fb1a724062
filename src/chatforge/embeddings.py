"""Looking inside a model's token embeddings: nearest neighbours and a 2-D map."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from .chat_format import SPECIAL_TOKENS
from .data.shards import open_shards
from .errors import UserError
from .tokenizer import Tokenizer


def token_counts(shard_dir: Path, vocab_size: int, chunk: int = 1 << 24) -> np.ndarray:
    """How often each token id occurs in a directory of token shards (e.g. RUN/tokens/train): int64, one per
    id. Reads the memory-mapped shards `chunk` tokens at a time, so memory stays flat whatever their size.
    The <|bos|> that opens every document is counted like any other id."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for shard in open_shards(Path(shard_dir), vocab_size=vocab_size):
        for a in range(0, len(shard.tokens), chunk):
            part = np.asarray(shard.tokens[a:a + chunk])
            counts += np.bincount(part, minlength=vocab_size)[:vocab_size]
            if len(part) and int(part.max()) >= vocab_size:  # header said vocab_size: the file is damaged
                raise UserError(f"{shard.path} holds token id {int(part.max())} >= vocab size {vocab_size}; "
                                "re-run `chatforge encode --force`")
    return counts


def _label(tok: Tokenizer, i: int) -> str:
    """A token as readable text; byte fragments of a character show as escapes, not U+FFFD."""
    if i < len(SPECIAL_TOKENS):
        return SPECIAL_TOKENS[i]
    b = tok.token_bytes()[i]
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError:
        return repr(b)[2:-1]


def nearest(model_embedding: torch.Tensor, tok: Tokenizer, word: str, k: int = 10) -> list[tuple[str, float]]:
    """The k tokens whose embeddings have the highest cosine similarity to `word`'s.

    A word that is several tokens is represented by the mean of their embeddings; its own tokens and the
    special tokens are left out of the answer.
    """
    emb = model_embedding.detach().float().cpu()
    ids = tok.encode(word)
    if not ids:
        raise UserError("give a non-empty word to look up")
    if emb.shape[0] < tok.vocab_size:
        raise UserError(f"embedding has {emb.shape[0]} rows but the tokenizer has {tok.vocab_size} tokens: "
                        "they are from different runs")
    query = emb[ids].mean(0)
    sims = torch.nn.functional.cosine_similarity(emb[: tok.vocab_size], query[None, :], dim=1)
    sims[: len(SPECIAL_TOKENS)] = -float("inf")
    sims[ids] = -float("inf")
    k = min(k, tok.vocab_size - len(SPECIAL_TOKENS) - len(set(ids)))
    vals, idx = torch.topk(sims, k)
    return [(_label(tok, int(i)), float(v)) for v, i in zip(vals, idx)]


def _visible(label: str) -> str:
    """Whitespace tokens made visible on a plot (a char tokenizer's " " and "\\n" are common tokens)."""
    return label.replace(" ", "\u2423").replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")


def plot_projection(emb: torch.Tensor, tok: Tokenizer, path_png: Path, n: int = 300,
                    counts: np.ndarray | None = None) -> Path:
    """Scatter n token embeddings on their first two principal components, each labelled with its text.

    With `counts` (token frequencies) the n most frequent tokens are shown; otherwise the first n learned
    tokens after the specials (for BPE, the earliest merges: the most frequent pairs of the training text).
    """
    import matplotlib
    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    emb = emb.detach().float().cpu()[: tok.vocab_size]
    first = len(SPECIAL_TOKENS) + (256 if tok.kind == "bpe" else 0)
    if counts is not None:
        counts = np.asarray(counts)[: tok.vocab_size]
        order = np.argsort(-counts, kind="stable")
        ids = [int(i) for i in order if i >= len(SPECIAL_TOKENS) and counts[i] > 0][:n]
    else:
        ids = list(range(first, tok.vocab_size))[:n] or list(range(len(SPECIAL_TOKENS), tok.vocab_size))[:n]
    if len(ids) < 3:
        raise UserError("need at least 3 tokens to plot an embedding projection")
    if emb.shape[0] < tok.vocab_size:
        raise UserError(f"embedding has {emb.shape[0]} rows but the tokenizer has {tok.vocab_size} tokens: "
                        "they are from different runs")
    x = emb[ids]
    x = x - x.mean(0, keepdim=True)
    # PCA by SVD of the centred matrix: the top right singular vectors are the principal axes.
    _, _, v = torch.linalg.svd(x, full_matrices=False)
    xy = (x @ v[:2].T).numpy()
    fig, ax = plt.subplots(figsize=(12, 12))
    ax.scatter(xy[:, 0], xy[:, 1], s=4, alpha=0.4)
    for (px, py), i in zip(xy, ids):
        ax.annotate(_visible(_label(tok, i)), (px, py), fontsize=7)
    ax.set_title(f"token embeddings: first 2 principal components ({len(ids)} tokens)")
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    path_png = Path(path_png)
    path_png.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():  # glyphs the default font lacks (CJK, emoji) draw as boxes, not errors
        warnings.simplefilter("ignore")
        fig.savefig(path_png, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path_png
