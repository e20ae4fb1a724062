"""Terminal chat: streams replies, keeps multi-turn history, reads lines from stdin (interactive or piped).

Commands: /reset (forget the conversation), /system TEXT (set the system prompt), /quit (or end of input), /help.
"""
from __future__ import annotations

import sys
from typing import TextIO

from .engine import Engine
from .errors import UserError

HELP = "commands: /reset  /system TEXT  /quit  /help"


def run_chat(engine: Engine, system_prompt: str | None = None, max_new_tokens: int = 256, *,
             input_stream: TextIO | None = None, output_stream: TextIO | None = None, **sampling) -> list[dict]:
    """Chat until /quit or end of input; returns the final history (system message first, if any)."""
    inp = input_stream or sys.stdin
    out = output_stream or sys.stdout
    interactive = inp.isatty() and out.isatty()
    system = system_prompt
    history: list[dict] = []

    def messages() -> list[dict]:
        return ([{"role": "system", "content": system}] if system else []) + history

    if interactive:
        out.write(f"chatforge chat ({HELP})\n")
    while True:
        if interactive:
            out.write("\nyou> ")
            out.flush()
        line = inp.readline()
        if not line:  # end of input
            break
        line = line.rstrip("\r\n")
        if not line.strip():
            continue
        cmd, _, arg = line.strip().partition(" ")
        if cmd == "/quit" or cmd == "/exit":
            break
        if cmd == "/reset":
            history.clear()
            out.write("[history cleared]\n")
            continue
        if cmd == "/system":
            system = arg.strip() or None
            out.write("[system prompt set]\n" if system else "[system prompt cleared]\n")
            continue
        if cmd == "/help":
            out.write(HELP + "\n")
            continue
        history.append({"role": "user", "content": line})
        out.write("assistant> " if interactive else "")
        reply = []
        try:
            for delta in engine.chat_stream(messages(), max_new_tokens=max_new_tokens, **sampling):
                reply.append(delta)
                out.write(delta)
                out.flush()
        except UserError as e:
            history.pop()
            out.write(f"[error: {e}]\n")
            continue
        out.write("\n")
        out.flush()
        history.append({"role": "assistant", "content": "".join(reply)})
    return messages()
