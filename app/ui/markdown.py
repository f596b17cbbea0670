"""Markdown to the HTML subset QTextBrowser renders, with Pygments-highlighted code blocks.

Raw HTML in model output is escaped, never interpreted, and images are never loaded: an image
becomes the text "[image: ALT]", a link to its address only when that is http(s) (opened in the
browser if the user clicks it). Each fenced code block gets a header
with its language and a ``copy:N`` link; the caller keeps `RenderedMarkdown.code_blocks` to
answer that link.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from typing import Any

from markdown_it import MarkdownIt
from pygments import highlight
from pygments.formatters import HtmlFormatter
from pygments.lexers import get_lexer_by_name, guess_lexer
from pygments.util import ClassNotFound

COPY_SCHEME = "copy"
WEB_SCHEMES = ("http", "https")


@dataclass(frozen=True)
class CodePalette:
    """Colours of code blocks for one theme."""

    pygments_style: str
    block_background: str
    header_background: str
    header_text: str
    inline_background: str
    link: str
    table_border: str


LIGHT_CODE = CodePalette("friendly", "#f6f8fa", "#eaeef2", "#57606a", "#eff1f3", "#0a66c2", "#d0d7de")
DARK_CODE = CodePalette("github-dark", "#161b22", "#21262d", "#8b949e", "#2d333b", "#4c9ded", "#30363d")


@dataclass
class RenderedMarkdown:
    """HTML for a QTextBrowser plus the raw text of each code block (for copy links)."""

    html: str
    code_blocks: list[str] = field(default_factory=list)


class MarkdownRenderer:
    """Renders Markdown for one theme; reusable across messages."""

    def __init__(self, palette: CodePalette = LIGHT_CODE) -> None:
        self.palette = palette
        self._formatter = HtmlFormatter(style=palette.pygments_style, noclasses=True, nowrap=True)
        self._md = MarkdownIt("commonmark", {"html": False, "linkify": False, "breaks": False})
        self._md.enable(["table", "strikethrough"])

    def render(self, text: str) -> RenderedMarkdown:
        """Render `text` (possibly an unfinished stream) to HTML with highlighted code."""
        tokens = self._md.parse(text)
        code_blocks: list[str] = []
        # The rules are swapped per call to collect this call's code blocks.
        rules: dict[str, Any] = self._md.renderer.rules  # type: ignore[attr-defined]
        saved = {name: rules.get(name) for name in ("fence", "code_block", "code_inline", "table_open", "image")}
        rules["fence"] = lambda toks, idx, *_: self._code_block(toks[idx].content, toks[idx].info, code_blocks)
        rules["code_block"] = lambda toks, idx, *_: self._code_block(toks[idx].content, "", code_blocks)
        rules["code_inline"] = lambda toks, idx, *_: self._inline_code(toks[idx].content)
        rules["image"] = self._image_placeholder
        rules["table_open"] = lambda *_: (
            f'<table border="1" cellspacing="0" cellpadding="4" '
            f'style="border-color:{self.palette.table_border}; border-style:solid;">\n'
        )
        try:
            body = self._md.renderer.render(tokens, self._md.options, {})
        finally:
            for name, rule in saved.items():
                if rule is None:
                    rules.pop(name, None)
                else:
                    rules[name] = rule
        return RenderedMarkdown(body, code_blocks)

    def _image_placeholder(self, tokens: Any, idx: int, options: Any, env: Any) -> str:
        """An image as a text placeholder (a link only to a web address): nothing is loaded."""
        token = tokens[idx]
        alt = self._md.renderer.renderInlineAsText(token.children or [], options, env)  # type: ignore[attr-defined]
        label = html.escape(f"[image: {alt.strip() or 'no description'}]")
        src = str(token.attrGet("src") or "")
        if src.partition(":")[0].lower() in WEB_SCHEMES:
            return f'<a href="{html.escape(src, quote=True)}">{label}</a>'
        return label

    def _inline_code(self, code: str) -> str:
        return (
            f'<code style="background-color:{self.palette.inline_background};">'
            f"{html.escape(code)}</code>"
        )

    def _code_block(self, code: str, info: str, code_blocks: list[str]) -> str:
        language = info.strip().split()[0] if info.strip() else ""
        code = code.rstrip("\n")
        index = len(code_blocks)
        code_blocks.append(code)
        highlighted = highlight(code, self._lexer_for(language, code), self._formatter).rstrip("\n")
        p = self.palette
        label = html.escape(language) if language else "code"
        # Qt's rich text ignores most CSS on <pre>, but honours table cell backgrounds.
        return (
            f'<table width="100%" cellspacing="0" cellpadding="6" '
            f'style="margin-top:6px; margin-bottom:6px;">'
            f'<tr><td bgcolor="{p.header_background}">'
            f'<span style="color:{p.header_text};">{label}</span>'
            f'&nbsp;&nbsp;&nbsp;<a href="{COPY_SCHEME}:{index}" style="color:{p.link};">Copy</a>'
            f"</td></tr>"
            f'<tr><td bgcolor="{p.block_background}"><pre style="margin:0;">{highlighted}</pre></td></tr>'
            f"</table>\n"
        )

    def _lexer_for(self, language: str, code: str) -> Any:
        try:
            if language:
                return get_lexer_by_name(language, stripnl=False)
            return guess_lexer(code, stripnl=False) if len(code) > 40 else get_lexer_by_name("text")
        except ClassNotFound:
            return get_lexer_by_name("text", stripnl=False)


def copy_link_index(url: str) -> int | None:
    """Return N for a ``copy:N`` link, None for any other URL."""
    scheme, _, rest = url.partition(":")
    if scheme != COPY_SCHEME or not rest.isdigit():
        return None
    return int(rest)
