"""The chat format: special tokens, the chat template, and imported models' own templates.

Special tokens are ids 0..6 in SPECIAL_TOKENS order. A conversation renders as

    <|bos|><|system|>{sys}<|end|><|user|>{q}<|end|><|assistant|>{a}<|end|><|user|>...

and the generation prompt appends `<|assistant|>`. The loss mask is 1 on assistant content tokens and on the
`<|end|>` that closes each assistant turn (so the model learns to stop), 0 everywhere else. The rendering
itself is Tokenizer.render_chat; an imported model's conversations go through its own template (ChatTemplate).
"""
from __future__ import annotations

import json

from tokenizers import Tokenizer as HFTokenizer

from .errors import UserError

SPECIAL_TOKENS = ["<|bos|>", "<|eos|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
BOS, EOS, PAD, SYSTEM, USER, ASSISTANT, END = SPECIAL_TOKENS
ROLE_TOKENS = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}

# transformers' apply_chat_template with this template reproduces render_chat's text exactly.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + message['role'] + ': use system, user or assistant') }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def check_messages(messages: list[dict]) -> None:
    """The message list every chat format accepts: role system/user/assistant, string content, system first."""
    for n, m in enumerate(messages):
        if not isinstance(m, dict):
            raise UserError(f"message {n}: expected {{'role': ..., 'content': ...}}, got {type(m).__name__}")
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str) or role not in ROLE_TOKENS:
            raise UserError(f"message {n}: role {role!r} is not one of system, user, assistant")
        if not isinstance(content, str):
            raise UserError(f"message {n}: content must be a string, got {type(content).__name__}")
        if role == "system" and n != 0:
            raise UserError(f"message {n}: a system message may only come first")


class ChatTemplate:
    """An imported model's own Jinja chat template, rendered as transformers' apply_chat_template does.

    Ids: the rendered text tokenized with special tokens recognised (as transformers does), so "<|im_end|>"
    typed inside a message is read as the token, as in transformers and llama.cpp. Loss mask: each assistant
    turn's span is the text that rendering the conversation up to that turn adds to rendering the turns
    before it with the generation prompt; the mask covers that span up to and including its end-of-turn
    token (not a newline the template writes after it).
    """

    def __init__(self, tok):  # tok: the Tokenizer this template belongs to
        import jinja2
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise jinja2.exceptions.TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: __import__("datetime").datetime.now().strftime(fmt)
        try:
            self._template = env.from_string(tok.chat_template)
        except jinja2.exceptions.TemplateError as e:
            raise UserError(f"the model's chat template does not parse: {e}") from None
        name = lambda i: tok.hf.id_to_token(i) if i is not None else None  # noqa: E731
        self._vars = {"bos_token": name(tok.bos_id) or "", "eos_token": name(tok.eos_id) or "",
                      "pad_token": name(tok.pad_id) or ""}
        self._eot = name(tok.end_id) or ""
        self._tok = tok
        self._hf = HFTokenizer.from_str(tok._json)  # specials in the rendered text are read as tokens

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        import jinja2
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         tools=None, documents=None, **self._vars)
        except jinja2.exceptions.TemplateError as e:
            raise UserError(f"the model's chat template refused the conversation: {e}") from None

    def render_ids(self, messages: list[dict], add_generation_prompt: bool) -> tuple[list[int], list[int]]:
        text = self.render(messages, add_generation_prompt)
        spans = []
        for k, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = self.render(messages[:k], add_generation_prompt=True)
            upto = self.render(messages[:k + 1])
            if not (upto.startswith(before) and text.startswith(upto)):
                raise UserError("the model's chat template does not render a conversation turn by turn, so the "
                                "assistant's tokens cannot be told apart for the loss")
            seg = upto[len(before):]
            j = seg.rfind(self._eot) if self._eot else -1
            spans.append((len(before), len(before) + (j + len(self._eot) if j >= 0 else len(seg))))
        enc = self._hf.encode(text, add_special_tokens=False)
        ids = list(enc.ids)
        mask = [int(any(a <= start < b for a, b in spans)) for start, _ in enc.offsets]
        if self._tok.add_bos and (not ids or ids[0] != self._tok.bos_id):
            ids, mask = [self._tok.bos_id, *ids], [0, *mask]
        return ids, mask
