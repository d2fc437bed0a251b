"""Extracting final answers from model responses.

The convention of math RLVR: the final answer is the content of the last ``\\boxed{...}``
in the response. Braces nest (``\\boxed{\\frac{1}{2}}``), so a regex is not enough.
"""

from __future__ import annotations

_BOXED_MARKERS = ("\\boxed{", "\\fbox{")


def extract_boxed(text: str) -> str | None:
    """Return the content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``.

    Nested braces are matched. Returns None when there is no complete boxed expression
    (no marker, or the response was truncated before the closing brace).
    """
    start = -1
    marker_len = 0
    for marker in _BOXED_MARKERS:
        pos = text.rfind(marker)
        if pos > start:
            start, marker_len = pos, len(marker)
    if start < 0:
        return None
    depth = 1
    i = start + marker_len
    begin = i
    while i < len(text):
        ch = text[i]
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[begin:i].strip()
        i += 1
    return None
