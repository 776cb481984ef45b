"""Error text that may be shown to clients: one line, and no server paths.

Job errors come from exceptions raised deep in the worker (OSError on a full disk,
checkpoint loading, numpy); their messages name files by absolute path. Clients get
the same message with the models and results directories written as `<models>` and
`<results>` and any other absolute path as `<path>`.
"""

from __future__ import annotations

import errno
import re
from collections.abc import Mapping
from pathlib import Path

MAX_CHARS = 500
_SEGMENT = r"[^\s/'\"`,;:()<>\[\]{}]+"
_ABSOLUTE_PATH = re.compile(rf"(?<![\w.~+-])/(?:{_SEGMENT}/)*{_SEGMENT}/?")


def redact_paths(text: str, roots: Mapping[str | Path, str] | None = None) -> str:
    """`text` with the given roots replaced by their labels and other absolute paths by `<path>`."""
    for root, label in sorted((roots or {}).items(), key=lambda kv: -len(str(kv[0]))):
        prefix = str(root).rstrip("/")
        if prefix:
            text = text.replace(prefix, label)
    return _ABSOLUTE_PATH.sub("<path>", text)


def describe_error(exc: BaseException, roots: Mapping[str | Path, str] | None = None) -> str:
    """One line for a client: `No space left on device (ENOSPC)` rather than the file it hit."""
    if isinstance(exc, OSError) and exc.strerror:
        code = errno.errorcode.get(exc.errno or 0)
        text = exc.strerror + (f" ({code})" if code else "")
    else:
        text = f"{type(exc).__name__}: {exc}"
    text = redact_paths(" ".join(text.split()), roots)
    return text if len(text) <= MAX_CHARS else text[: MAX_CHARS - 1] + "…"
