"""Does llama.cpp read chatforge's GGUF export as chatforge means it? (llama-cpp-python, when importable)

Exports a run's model with `chatforge export --format gguf`, loads the file in llama.cpp and compares, with
chatforge's own engine on the same checkpoint:
  - tokenization of hard strings (code with deep indents, accents, CJK, emoji, CRLF, a special token's text),
    and llama.cpp's detokenization of chatforge's tokens back to the string;
  - greedy replies to chat questions rendered with the model's template (up to --new-tokens, or end-of-turn).
    python benchmarks/check_gguf_llama_cpp.py RUN [--stage finetune] [--outtype f32|f16|q8_0] [--question Q ...]
llama-cpp-python is never a test dependency (it compiles llama.cpp, ~25 min on 2 cores): without it this
prints one line and exits 0.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

HARD = ["def f(x):\n" + " " * 36 + "return x  # deep indent\n",
        "naïve café 日本語 🤖 <|im_end|> tabs\t\tand\r\nCRLF",
        "    for i in range(10):\n        print(i ** 2)\n",
        "1234567890 3.14159 -42 0x1F",
        "What does json.dumps do?"]
QUESTIONS = ["What does json.dumps do?", "Explain what the method abc.ABCMeta.register does.",
             "What is the ftplib.FTP class for?", "What does tarfile.TarInfo.tobuf do?"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--stage", default="auto", help="pretrain | finetune | import | auto (as chatforge export)")
    ap.add_argument("--outtype", default="f32", choices=["f32", "f16", "q8_0"])
    ap.add_argument("--new-tokens", type=int, default=40)
    ap.add_argument("--question", action="append", help="chat questions (default: four stdlib questions)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    try:
        from llama_cpp import Llama
    except ImportError:
        print("skipped: llama-cpp-python is not installed (pip install llama-cpp-python: compiles ~25 min)")
        return 0
    from chatforge.cli import main as cli
    from chatforge.engine import Engine
    from chatforge.machine import cpu
    from chatforge.paths import RunPaths
    from chatforge.tokenizer import Tokenizer
    from chatforge.use import chat_paths, load_run_model

    name, flags = cpu()
    torch.set_num_threads(args.threads)
    import llama_cpp
    print(f"CPU: {name}; flags: {' '.join(flags)}; torch {torch.__version__}, llama-cpp-python {llama_cpp.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        gg = Path(tmp) / f"model-{args.outtype}.gguf"
        if cli(["export", "--run-dir", str(args.run), "--stage", args.stage, "--format", "gguf",
                "--outtype", args.outtype, "--out", str(gg)]) != 0:
            return 2
        paths = chat_paths(RunPaths(args.run), args.stage)  # the model export wrote: the same choice
        run = paths.root
        tok = Tokenizer.load(paths.tokenizer)
        eng = Engine(load_run_model(paths, args.stage, "best")[0], tok, precision="fp32")
        llm = Llama(model_path=str(gg), n_ctx=eng.seq_len, n_threads=args.threads, verbose=False)
        tok_ok = 0
        for s in HARD:
            ours = tok.encode(s)
            theirs = llm.tokenize(s.encode(), add_bos=False, special=False)
            back = llm.detokenize(ours).decode("utf-8", "replace")
            tok_ok += ours == theirs and back == s
            if ours != theirs:
                print(f"  tokens differ on {s[:30]!r}: {len(ours)} vs {len(theirs)} tokens")
            elif back != s:
                long = [t for t in ours if int(tok.token_bytes_lengths()[t]) > 32]
                print(f"  llama.cpp detokenizes {s[:30]!r} as {back[:30]!r}"
                      + (f" (tokens over 32 bytes: {long})" if long else ""))
        same = 0
        questions = args.question or QUESTIONS
        for q in questions:
            ids = tok.render_chat([{"role": "user", "content": q}], add_generation_prompt=True)[0]
            ours = eng.generate(ids, max_new_tokens=args.new_tokens, temperature=0.0, stop_ids=tok.stop_ids)[0]
            llm.reset()
            theirs: list[int] = []
            for t in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, repeat_penalty=1.0):
                theirs.append(int(t))
                if t in tok.stop_ids or len(theirs) >= args.new_tokens:
                    break
            same += ours == theirs
            print(f"  {q!r}\n    chatforge: {tok.decode(ours)!r}\n    llama.cpp: {tok.decode(theirs)!r}")
        print(f"{run} ({args.outtype}): tokenization identical and round-trips {tok_ok}/{len(HARD)}; "
              f"greedy replies identical {same}/{len(questions)}")
        llm.close()
    return 0


if __name__ == "__main__":
    from chatforge.errors import UserError
    try:
        sys.exit(main())
    except UserError as e:  # a missing or unfinished run: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
