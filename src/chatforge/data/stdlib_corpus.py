"""The default corpora: real text that every Python install carries, so `chatforge` runs with no download.

Pretraining: the standard library's own .py sources (code plus docstrings and comments, roughly 20-40 MB).
Fine-tuning: question/answer pairs built from docstrings with `ast` (modules are parsed, never imported).
"""
from __future__ import annotations

import ast
import functools
import hashlib
import re
import sysconfig
from collections.abc import Iterator
from pathlib import Path

# Folders that are tests, IDE/demo code or third-party packages rather than the library itself.
_SKIP_DIRS = {"test", "tests", "idle_test", "idlelib", "site-packages", "dist-packages", "__pycache__",
              "turtledemo", "_bundled", "__phello__"}
# Generated data tables, not prose or code anyone writes (pydoc topics is one ~700 KB string literal;
# encodings/cp*.py are charmap tables written by gencodec.py).
_SKIP_FILES = {"pydoc_data/topics.py"}
_MAX_FILE_BYTES = 400_000
_GENERATED = re.compile(rb"generated from|automatically generated|auto-generated|do not edit", re.IGNORECASE)
# Easter eggs whose text is not what it looks like (this.py is ROT13).
_SKIP_MODULES = {"this", "antigravity", "__main__", "__hello__"}

MAX_ANSWER_CHARS = 400

_QUESTION_TEMPLATES = {
    "function": ["What does {name} do?", "Explain what {name} does.", "What is the purpose of {name}?",
                 "Briefly, what does the Python function {name} do?"],
    "method": ["What does {name} do?", "Explain what the method {name} does.",
               "What is {name} used for?"],
    "class": ["What is {name}?", "What is the {name} class for?", "Describe the class {name}."],
}


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _stdlib_files() -> list[tuple[Path, str]]:
    """(path, posix relpath) of the library's .py files, sorted for the same order on every machine."""
    root = stdlib_root()
    out = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        relp = rel.as_posix()
        if any(part in _SKIP_DIRS or part.startswith("config-") for part in rel.parts[:-1]):
            continue
        if relp in _SKIP_FILES or not path.is_file() or path.stat().st_size > _MAX_FILE_BYTES:
            continue
        with open(path, "rb") as fh:
            if _GENERATED.search(fh.read(600)):
                continue
        out.append((path, relp))
    out.sort(key=lambda t: t[1])
    return out


def iter_stdlib_documents() -> Iterator[dict]:
    """{"text": file source, "source": "stdlib/<relpath>"} for each standard-library source file."""
    for path, rel in _stdlib_files():
        text = path.read_bytes().decode("utf-8", errors="replace")
        if text.strip():
            yield {"text": text, "source": f"stdlib/{rel}"}


def stdlib_texts(limit_chars: int = 300_000) -> list[str]:
    """The first stdlib documents, about limit_chars of real text: a quick offline corpus (tests, benchmarks)."""
    texts, n = [], 0
    for doc in iter_stdlib_documents():
        texts.append(doc["text"])
        n += len(doc["text"])
        if n >= limit_chars:
            break
    return texts


def _module_name(rel: str) -> str | None:
    """'email/mime/text.py' -> 'email.mime.text'; None for private modules (any part starting with _)."""
    parts = rel[:-3].split("/")
    if parts[-1] == "__init__":
        parts = parts[:-1]
    if not parts or any(p.startswith("_") for p in parts) or parts[-1] in _SKIP_MODULES:
        return None
    return ".".join(parts)


def _first_paragraph(doc: str) -> str | None:
    para = " ".join(re.split(r"\n\s*\n", doc.strip(), maxsplit=1)[0].split())
    # Too short to be an answer, or a C-style signature line ("f(x) -> y") rather than prose.
    if len(para) < 20 or re.match(r"^[\w.]+\(.*\)\s*(->|-->)", para):
        return None
    if len(para) > MAX_ANSWER_CHARS:
        cut = para[:MAX_ANSWER_CHARS]
        end = cut.rfind(". ")
        para = cut[: end + 1] if end > MAX_ANSWER_CHARS // 2 else cut.rsplit(" ", 1)[0] + " ..."
    return para


def _question(kind: str, name: str) -> str:
    templates = _QUESTION_TEMPLATES[kind]
    i = int.from_bytes(hashlib.blake2b(name.encode(), digest_size=4).digest(), "big") % len(templates)
    return templates[i].format(name=name)


def _top_level_defs(body: list[ast.stmt]) -> Iterator[ast.stmt]:
    """Definitions at module level, including those inside `if`/`try` blocks (platform-specific versions)."""
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            yield node
        elif isinstance(node, ast.If):
            yield from _top_level_defs(node.body)
            yield from _top_level_defs(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, node.orelse, node.finalbody, *(h.body for h in node.handlers)):
                yield from _top_level_defs(block)


def _module_examples(tree: ast.Module, module: str) -> Iterator[tuple[str, str]]:
    for node in _top_level_defs(tree.body):
        if node.name.startswith("_"):
            continue
        qual = f"{module}.{node.name}"
        is_class = isinstance(node, ast.ClassDef)
        doc = ast.get_docstring(node)
        answer = _first_paragraph(doc) if doc else None
        if answer:
            yield _question("class" if is_class else "function", qual), answer
        if is_class:
            for sub in node.body:
                if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef)) and not sub.name.startswith("_"):
                    sdoc = ast.get_docstring(sub)
                    sanswer = _first_paragraph(sdoc) if sdoc else None
                    if sanswer:
                        yield _question("method", f"{qual}.{sub.name}"), sanswer


@functools.lru_cache(maxsize=1)
def _all_chat_pairs() -> tuple[tuple[str, str], ...]:
    pairs: list[tuple[str, str]] = []
    seen: set[str] = set()
    for path, rel in _stdlib_files():
        module = _module_name(rel)
        if module is None:
            continue
        try:
            tree = ast.parse(path.read_bytes(), filename=rel)
        except (SyntaxError, ValueError):  # a few files are deliberately invalid or for other versions
            continue
        for q, a in _module_examples(tree, module):
            if q not in seen:  # first definition wins (e.g. platform-specific duplicates)
                seen.add(q)
                pairs.append((q, a))
    return tuple(pairs)


def stdlib_chat_examples(max_examples: int = 0) -> list[dict]:
    """Docstring Q&A: [{"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}] in file order.

    With max_examples, a hash-chosen subset (spread over all modules, not just the alphabetically first)
    keeps its file order.
    """
    pairs = list(_all_chat_pairs())
    if max_examples and max_examples < len(pairs):
        ranked = sorted(range(len(pairs)),
                        key=lambda i: hashlib.blake2b(pairs[i][0].encode(), digest_size=8).digest())
        keep = set(ranked[:max_examples])
        pairs = [p for i, p in enumerate(pairs) if i in keep]
    return [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            for q, a in pairs]
