"""The build context: ``.dockerignore`` and COPY/ADD source globs, as Docker matches them.

Patterns are Go ``filepath.Match`` patterns (``*`` and ``?`` stay within one path
component, ``[...]`` classes) plus ``**`` for any number of components, as Docker's
``patternmatcher`` reads them. In ``.dockerignore`` a later pattern wins, ``!`` re-includes,
and a path is excluded when it or one of its parent directories matches.
"""

from __future__ import annotations

import posixpath
import re
from functools import lru_cache
from pathlib import Path

from swarm.errors import BuildError

DOCKERIGNORE = ".dockerignore"


@lru_cache(maxsize=512)
def pattern_regex(pattern: str) -> re.Pattern[str]:
    """A compiled regex for a Docker path pattern (a clean relative path)."""
    out = []
    i, n = 0, len(pattern)
    while i < n:
        ch = pattern[i]
        if ch == "*":
            if pattern.startswith("**", i):
                i += 2
                if i < n and pattern[i] == "/":
                    out.append("(?:.*/)?")  # zero or more whole components
                    i += 1
                else:
                    out.append(".*")
                continue
            out.append("[^/]*")
        elif ch == "?":
            out.append("[^/]")
        elif ch == "[":
            end = pattern.find("]", i + 1)
            if end < 0:
                raise ValueError(f"unterminated [ in pattern {pattern!r}")
            body = pattern[i + 1:end]
            if body.startswith("^") or body.startswith("!"):
                body = "^" + body[1:]
            out.append("[" + body.replace("\\", "\\\\") + "]")
            i = end
        elif ch == "\\" and i + 1 < n:
            out.append(re.escape(pattern[i + 1]))
            i += 1
        else:
            out.append(re.escape(ch))
        i += 1
    return re.compile("".join(out))


def clean(path: str) -> str:
    """A context-relative path: no leading "/", no "..", "." for the root."""
    c = posixpath.normpath("/" + path).lstrip("/")
    return c or "."


class Ignore:
    """The rules of a ``.dockerignore``."""

    def __init__(self, patterns: list[tuple[bool, str]]) -> None:
        self.patterns = patterns  # (negated, clean pattern)

    @classmethod
    def load(cls, context: Path) -> Ignore:
        path = context / DOCKERIGNORE
        pats: list[tuple[bool, str]] = []
        try:
            text = path.read_text()
        except FileNotFoundError:
            return cls(pats)
        except OSError as err:
            raise BuildError(f"{path}: cannot read: {err.strerror}") from None
        for lineno, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            neg = line.startswith("!")
            body = clean(line[1:].strip() if neg else line)
            try:
                pattern_regex(body)
            except ValueError as err:
                raise BuildError(f"{path}:{lineno}: {err}") from None
            pats.append((neg, body))
        return cls(pats)

    def excluded(self, rel: str) -> bool:
        """Whether context path ``rel`` (clean, relative) is left out of the context."""
        if not self.patterns or rel == ".":
            return False
        parts = rel.split("/")
        candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        result = False
        for neg, pat in self.patterns:
            rx = pattern_regex(pat)
            if any(rx.fullmatch(c) for c in candidates):
                result = not neg
        return result
