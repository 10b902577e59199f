"""Secrets out of every text mlcanary writes: audit rows, history notes, reasons, messages, errors.

Two layers: patterns that look like credentials wherever they come from (a URL's ``user:password@``,
token-like query parameters, ``Bearer`` tokens, Slack webhook paths), and the values the hooks read
from Airflow connections (:func:`register`), replaced wherever they appear.
"""

from __future__ import annotations

import re
import threading

MASK = "***"
_PATTERNS = [
    (re.compile(r"(?P<keep>\b[a-z][a-z0-9+.-]*://)[^/\s:@'\"]+(?::[^/\s@'\"]*)?@", re.I), r"\g<keep>" + MASK + "@"),
    (
        re.compile(
            r"(?P<keep>[?&;](?:[a-z0-9_.-]*(?:token|secret|password|passwd|pwd|api[_-]?key|apikey|signature|sig"
            r"|credential|auth)[a-z0-9_.-]*|key|code)=)[^&;\s'\"#]+",
            re.I,
        ),
        r"\g<keep>" + MASK,
    ),
    (re.compile(r"(?P<keep>\bBearer\s+)[A-Za-z0-9._~+/=-]+", re.I), r"\g<keep>" + MASK),
    (re.compile(r"(?P<keep>hooks\.slack\.com/services/)[^\s'\"]+", re.I), r"\g<keep>" + MASK),
]
_known: set[str] = set()
_lock = threading.Lock()


def register(*secrets: object) -> None:
    """Values to replace wherever they appear (a connection's password, a token); short ones are
    ignored, they would mask ordinary words."""
    with _lock:
        _known.update(s for s in (str(v) for v in secrets if v) if len(s) >= 6)


def redact(text: str) -> str:
    """``text`` with every registered secret and everything that looks like a credential masked."""
    for secret in sorted(_known, key=len, reverse=True):
        text = text.replace(secret, MASK)
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text
