"""Learned BPE tokens are capped at 32 bytes, even on text full of long whitespace runs."""
from chatforge.config import TokenizerConfig
from chatforge.tokenizer import Tokenizer


def test_learned_tokens_at_most_32_bytes():
    # 40- and 64-space indentation repeated many times: uncapped BPE would merge each run into one token.
    lines = [" " * 40 + f"x = {i}" for i in range(300)] + [" " * 64 + "return y" for _ in range(300)]
    lines += ["=" * 80, "-" * 80] * 100
    tok = Tokenizer.train(["\n".join(lines)] * 3, TokenizerConfig(kind="bpe", vocab_size=400, min_frequency=2))
    lengths = [len(b) for b in tok.token_bytes()]
    assert max(lengths) <= 32  # uncapped, this corpus learns an 81-byte token
    assert max(lengths) > 16  # long runs are still merged up to near the cap
    text = " " * 40 + "x = 7\n" + "=" * 80
    assert tok.decode(tok.encode(text)) == text
