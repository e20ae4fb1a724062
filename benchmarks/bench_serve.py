"""Serving load test: C concurrent clients send N chat requests in all; errors, p50/p95 latency, tokens/s.

By default it starts a server process on a small random model, twice: with continuous batching (--max-batch,
default 8) and one request at a time (--max-batch 1), and prints the throughput ratio. --url points it at a
running server instead (e.g. `chatforge serve`), --run loads a trained run.
    python benchmarks/bench_serve.py [--requests 200 --concurrency 8 --max-tokens 32 --stream --max-batch 8]
"""
from __future__ import annotations

import argparse
import inspect
import json
import socket
import statistics
import multiprocessing
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch


def run_server(args, port: int, max_batch: int) -> None:
    """Child process: build the engine and serve it (as `chatforge serve` does) until killed."""
    from chatforge.config import ModelConfig, TokenizerConfig
    from chatforge.engine import Engine
    from chatforge.model import GPT
    from chatforge.serve import serve
    from chatforge.tokenizer import Tokenizer

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.run:
        engine = Engine.from_run(Path(args.run), stage=args.stage, device=args.device)
    else:
        tok = Tokenizer.train([inspect.getsource(m) for m in (json, argparse, inspect)],
                              TokenizerConfig(vocab_size=2048, min_frequency=2))
        torch.manual_seed(0)
        cfg = ModelConfig(n_layer=4, n_embd=256, seq_len=512, vocab_size=tok.vocab_size, init_std=0.1)
        engine = Engine(GPT(cfg), tok, device=args.device)
    serve(engine, port=port, model_name="bench", max_batch=max_batch, log_level="warning")


def start_server(args, max_batch: int) -> tuple[str, multiprocessing.Process]:
    """A server in its own process, so the clients' threads do not share its interpreter lock."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = multiprocessing.get_context("spawn").Process(target=run_server, args=(args, port, max_batch),
                                                      daemon=True)
    proc.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return url, proc
        except httpx.HTTPError:
            pass
        if not proc.is_alive() or time.time() > deadline:
            raise SystemExit("the server did not start")
        time.sleep(0.2)


def one_request(client: httpx.Client, url: str, i: int, args) -> tuple[bool, float, int, float]:
    """-> (ok, latency s, completion tokens, time to first token s)."""
    body = {"model": "bench", "messages": [{"role": "user", "content": f"Request {i}: tell me a story."}],
            "max_tokens": args.max_tokens, "temperature": 0.8, "seed": i, "stream": args.stream}
    if args.stream:
        body["stream_options"] = {"include_usage": True}
    t0 = time.perf_counter()
    ttft, tokens = 0.0, 0
    try:
        if args.stream:
            with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
                if r.status_code != 200:
                    return False, time.perf_counter() - t0, 0, 0.0
                for line in r.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    obj = json.loads(line[6:])
                    if "error" in obj:
                        print("error:", obj["error"]["message"])
                        return False, time.perf_counter() - t0, 0, 0.0
                    if not ttft and obj["choices"] and obj["choices"][0]["delta"].get("content"):
                        ttft = time.perf_counter() - t0
                    if obj.get("usage"):
                        tokens = obj["usage"]["completion_tokens"]
        else:
            r = client.post(url + "/v1/chat/completions", json=body)
            if r.status_code != 200:
                return False, time.perf_counter() - t0, 0, 0.0
            tokens = r.json()["usage"]["completion_tokens"]
    except httpx.HTTPError as e:
        print("error:", e)
        return False, time.perf_counter() - t0, 0, 0.0
    return True, time.perf_counter() - t0, tokens, ttft


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=200, help="requests in all")
    ap.add_argument("--concurrency", type=int, default=8, help="concurrent clients")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--stream", action="store_true", help="use SSE streaming (also reports time to first token)")
    ap.add_argument("--url", help="benchmark a running server instead of starting one")
    ap.add_argument("--run", help="run dir to serve (default: a tiny random model)")
    ap.add_argument("--stage", default="finetune")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=1, help="torch threads in the server (0: torch's default)")
    ap.add_argument("--max-batch", type=int, default=8, help="the server's continuous batching width")
    args = ap.parse_args()
    if args.url:
        load(args, args.url.rstrip("/"), None)
        return
    rates = {mb: load(args, *start_server(args, mb), label=f"max_batch {mb}")
             for mb in dict.fromkeys([args.max_batch, 1])}
    if len(rates) == 2:
        print(f"throughput ratio, max_batch {args.max_batch} / one at a time: {rates[args.max_batch] / rates[1]:.2f}x")


def load(args, url: str, server, label: str = "") -> float:
    """Run the load against url; print the figures; return completion tokens/s."""
    client = httpx.Client(timeout=600, limits=httpx.Limits(max_connections=args.concurrency))
    t0 = time.perf_counter()
    with ThreadPoolExecutor(args.concurrency) as pool:
        results = list(pool.map(lambda i: one_request(client, url, i, args), range(args.requests)))
    wall = time.perf_counter() - t0
    ok = [r for r in results if r[0]]
    lat = sorted(r[1] for r in ok)
    tokens = sum(r[2] for r in ok)

    def pct(xs: list[float], p: float) -> float:
        return xs[min(len(xs) - 1, int(p * len(xs)))] if xs else float("nan")

    print(f"== {label or url}: {args.requests} requests, {args.concurrency} concurrent clients, "
          f"max_tokens {args.max_tokens}, {'streaming' if args.stream else 'non-streaming'}, {wall:.1f} s")
    print(f"errors: {len(results) - len(ok)}")
    print(f"latency p50 {pct(lat, 0.5) * 1000:.0f} ms, p95 {pct(lat, 0.95) * 1000:.0f} ms, "
          f"mean {statistics.fmean(lat) * 1000 if lat else float('nan'):.0f} ms")
    if args.stream:
        ttft = sorted(r[3] for r in ok if r[3])
        print(f"time to first token p50 {pct(ttft, 0.5) * 1000:.0f} ms, p95 {pct(ttft, 0.95) * 1000:.0f} ms")
    print(f"throughput: {len(ok) / wall:.1f} requests/s, {tokens / wall:.1f} completion tokens/s")
    if server is not None:
        server.terminate()
        server.join(timeout=10)
    return tokens / wall


if __name__ == "__main__":
    from chatforge.machine import describe
    print(describe(), flush=True)
    main()
