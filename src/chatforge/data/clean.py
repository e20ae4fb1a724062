"""Text cleaning that keeps code and prose intact.

Newlines and indentation carry meaning (Python blocks, poems, lists), so we never collapse them. What we do:
Unicode NFC (one byte form per visible character, so dedup and the tokenizer see one spelling), drop control
characters other than newline and tab, turn odd Unicode spaces into plain ones, strip trailing whitespace per
line, and cap runs of blank lines at two (PEP 8's gap between top-level definitions).
"""
from __future__ import annotations

import re
import unicodedata
from html.parser import HTMLParser

# C0/C1 control characters except \t (09) and \n (0a). \r is handled before (line endings -> \n).
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
# No-break, en/em/thin and similar spaces -> " ". U+3000 (ideographic space) is left: it is real CJK layout.
_ODD_SPACES = re.compile(r"[\u00a0\u1680\u2000-\u200a\u202f\u205f]")
_TRAILING_WS = re.compile(r"[ \t]+(?=\n)")
_MANY_BLANK_LINES = re.compile(r"\n{4,}")  # 3 newlines = 2 blank lines; more than that is noise
_LEADING_BLANK_LINES = re.compile(r"\A(?:[ \t]*\n)+")

# A small English list for the optional (off by default) stop-word removal; no NLTK download needed.
STOPWORDS = frozenset("""
a an the and or but if then else of at by for with about against between into through during before after
above below to from up down in out on off over under again further once here there when where why how all any
both each few more most other some such no nor not only own same so than too very s t can will just don should
now i me my myself we our ours ourselves you your yours yourself yourselves he him his himself she her hers
herself it its itself they them their theirs themselves what which who whom this that these those am is are was
were be been being have has had having do does did doing would could ought
""".split())
_STOPWORD_RE = re.compile(r"\b(?:" + "|".join(sorted(STOPWORDS, key=len, reverse=True)) + r")\b[ ]?",
                          re.IGNORECASE)


def clean_text(text: str) -> str:
    """Normalise one document (see module doc). Idempotent: clean_text(clean_text(x)) == clean_text(x)."""
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if not text.isascii():
        if not unicodedata.is_normalized("NFC", text):
            text = unicodedata.normalize("NFC", text)
        text = _ODD_SPACES.sub(" ", text)
        if "\ufeff" in text:  # byte-order marks left inside concatenated files
            text = text.replace("\ufeff", "")
    text = _CONTROL.sub("", text)
    text = _TRAILING_WS.sub("", text)
    text = _MANY_BLANK_LINES.sub("\n\n\n", text)
    text = _LEADING_BLANK_LINES.sub("", text)
    return text.rstrip()


def remove_stopwords(text: str) -> str:
    """Drop common English function words (destructive: only for classic bag-of-words uses)."""
    return _STOPWORD_RE.sub("", text)


def transform(text: str, lowercase: bool = False, stopwords: bool = False) -> str:
    """clean_text plus the optional, off-by-default lossy steps."""
    text = clean_text(text)
    if lowercase:
        text = text.lower()
    if stopwords:
        text = clean_text(remove_stopwords(text))
    return text


# ------------------------------------------------------------------------------------------- HTML

_SKIP_TAGS = {"script", "style", "noscript", "template", "svg", "head", "iframe", "object"}
# Tags that end a line of text; everything else (a, b, span, ...) is inline.
_BLOCK_TAGS = {"p", "div", "br", "hr", "li", "ul", "ol", "tr", "table", "section", "article", "header",
               "footer", "nav", "aside", "main", "blockquote", "pre", "h1", "h2", "h3", "h4", "h5", "h6",
               "dd", "dt", "dl", "figure", "figcaption", "form", "title", "body", "html"}
_PARAGRAPH_TAGS = {"p", "h1", "h2", "h3", "h4", "h5", "h6", "pre", "table", "blockquote", "ul", "ol"}
_WS_RUN = re.compile(r"\s+")
_VOID_TAGS = {"br", "hr", "img", "input", "meta", "link", "area", "base", "col", "embed", "source", "wbr"}


class _TextExtractor(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skip = 0  # depth inside script/style/...
        self.pre = 0  # depth inside <pre>: whitespace is content there

    def _break(self, n: int) -> None:
        """End the current line (n=1) or paragraph (n=2); consecutive breaks merge instead of stacking."""
        if not self.parts:
            return
        last = self.parts[-1]
        if last.strip("\n") == "":
            self.parts[-1] = "\n" * max(n, len(last))
        else:
            self.parts[-1] = last.rstrip(" ")
            self.parts.append("\n" * n)

    def handle_starttag(self, tag: str, attrs) -> None:
        if tag in _SKIP_TAGS and tag not in _VOID_TAGS:
            self.skip += 1
        if tag in _BLOCK_TAGS:
            self._break(2 if tag in _PARAGRAPH_TAGS else 1)
        elif tag in ("td", "th") and self.parts and not self.parts[-1].endswith("\n"):
            self.parts.append(" ")
        if tag == "pre":
            self.pre += 1

    def handle_endtag(self, tag: str) -> None:
        if tag in _SKIP_TAGS and self.skip:
            self.skip -= 1
        if tag == "pre" and self.pre:
            self.pre -= 1
        if tag in _BLOCK_TAGS:
            self._break(2 if tag in _PARAGRAPH_TAGS else 1)

    def handle_data(self, data: str) -> None:
        if self.skip:
            return
        if not self.pre:  # HTML collapses whitespace outside <pre>
            data = _WS_RUN.sub(" ", data)
            if not self.parts or self.parts[-1].endswith("\n"):
                data = data.lstrip(" ")
            if not data:
                return
        self.parts.append(data)


def html_to_text(html: str) -> str:
    """Visible text of an HTML page: script/style/head dropped, block elements on their own lines, entities
    decoded, <pre> kept verbatim. The standard library's tolerant parser copes with broken markup."""
    parser = _TextExtractor()
    parser.feed(html)
    parser.close()
    return "".join(parser.parts).strip()
