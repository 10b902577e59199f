"""Text from the data (segment values, reasons) made inert for where it is shown."""

from __future__ import annotations

import re

_MARKDOWN = re.compile(r"([\\`*_{}\[\]()<>#+\-!|~&])")


def slack_text(text: str) -> str:
    """Slack's three control characters (``&``, ``<``, ``>``) as entities: a segment value such as
    ``<!channel>`` or ``<https://x|click>`` shows as typed instead of pinging or linking."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def markdown_text(text: str) -> str:
    """Every Markdown (and HTML) control character backslash-escaped (CommonMark allows it for any
    ASCII punctuation), so ``[x](https://evil)`` or ``**`` shows as typed."""
    return _MARKDOWN.sub(r"\\\1", text)
