"""How text read from files, URLs and messages is shown on a terminal or in a log: every control character
spelled as an escape (a file name or a prompt cannot move the cursor, clear the screen or forge a second line),
secrets hidden, and the length bounded. The CLI's error lines (jobs.errors) and the engine's printed summaries
(the job's table, verify's lines) go through here; HTML pages escape with `html.escape` instead.
"""

from __future__ import annotations

import re

MESSAGE_CHARS = 1000  # a whole line is cut to this many characters (its start and its end kept)

# C0 and C1 controls, DEL, and the Unicode line separators and bidirectional overrides a terminal obeys.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def printable(text: str) -> str:
    """`text` with every control character spelled as an escape (`\\n`, `\\x1b`): safe on one terminal line."""
    return _CONTROL.sub(lambda m: _ESCAPES.get(m.group(), m.group().encode("unicode_escape").decode()), text)


def one_line(text: str, limit: int = MESSAGE_CHARS) -> str:
    """A whole message for a terminal: escaped and bounded; the end is kept, since it usually says why."""
    text = printable(text)
    if len(text) <= limit:
        return text
    tail = limit // 3
    return f"{text[: limit - tail - 1]}…{text[-tail:]}"


def safe_line(text: object, limit: int = MESSAGE_CHARS) -> str:
    """Any value as one line of a terminal or a log: redacted (pipeline.storage.redact_text), escaped, bounded."""
    from pipeline.storage import redact_text  # fsspec: not loaded by commands that fail before they need it

    return one_line(redact_text(str(text)) or "", limit)
