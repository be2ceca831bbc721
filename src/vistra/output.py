"""What vistra prints: JSON that strict parsers accept, and text any terminal can show.

Python's json writes NaN and Infinity, which are not JSON: one diverged loss would make a
whole `--json` report unreadable to jq, a browser or another language. And a file name that
is not valid UTF-8 reaches Python as lone surrogates, which printing refuses
(UnicodeEncodeError), losing every result after it.
"""

from __future__ import annotations

import json
import math
import os


def to_json(value: object, **kwargs) -> str:
    """json.dumps with NaN and infinities written as null; `kwargs` go to json.dumps."""
    return json.dumps(_finite(value), allow_nan=False, **kwargs)


def _finite(value: object) -> object:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    return value


def printable(text: str | os.PathLike) -> str:
    """`text` (or a path) with the bytes of a non-UTF-8 name shown as \\xNN escapes."""
    text = os.fspath(text)
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a lone surrogate that does not stand for a byte
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
