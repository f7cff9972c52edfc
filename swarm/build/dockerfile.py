"""Dockerfiles: parsing (BuildKit's own parser, through the ``dockerfile`` package) and
Docker's word expansion, with every error naming the file and the line.

The parser gives instructions with line numbers, flags and JSON/heredoc forms exactly as
Docker reads them (line continuations, the ``escape`` directive, heredocs). It accepts
things Docker later rejects (an unknown instruction, a flag no instruction has, ``ENV``
with no value); :func:`parse` rejects those here, before any step runs, so a malformed
Dockerfile fails fast with ``FILE:LINE: message``.

:class:`Lexer` is Docker's shell-word processor (``shell_parser.go``): quotes, the escape
character, ``$VAR``, ``${VAR}``, ``${VAR:-word}``, ``${VAR:+word}``, ``${VAR-word}``,
``${VAR+word}``, ``${VAR:?msg}`` and ``${VAR?msg}``. Docker applies it to the arguments of
ADD, COPY, ENV, EXPOSE, FROM, LABEL, STOPSIGNAL, USER, VOLUME, WORKDIR and ARG, never to
RUN, CMD or ENTRYPOINT (a shell expands those, with ARGs and ENVs in its environment).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import dockerfile as _bk

from swarm.errors import BuildError

DEFAULT_ESCAPE = "\\"
_DIRECTIVE_RE = re.compile(r"#\s*([a-zA-Z][a-zA-Z0-9_-]*)\s*=\s*(.*?)\s*$")
_NAME_CHARS = re.compile(r"[A-Za-z0-9_]")
_HEREDOC_ALONE_RE = re.compile(r"<<-?[\"']?([A-Za-z0-9_]+)[\"']?")

# Flags each instruction takes (Docker's names); anything else is an error.
ALLOWED_FLAGS: dict[str, frozenset[str]] = {
    "FROM": frozenset({"platform"}),
    "RUN": frozenset({"network"}),
    "COPY": frozenset({"from", "chown", "chmod", "link"}),
    "ADD": frozenset({"chown", "chmod", "link"}),
    "HEALTHCHECK": frozenset({"interval", "timeout", "start-period", "start-interval",
                              "retries"}),
}
KNOWN = frozenset({"FROM", "ARG", "ENV", "LABEL", "WORKDIR", "USER", "RUN", "COPY", "ADD",
                   "ENTRYPOINT", "CMD", "EXPOSE", "SHELL", "STOPSIGNAL", "HEALTHCHECK",
                   "VOLUME", "ONBUILD", "MAINTAINER"})
# Minimum number of arguments (after flags) per instruction.
MIN_ARGS = {"FROM": 1, "ARG": 1, "ENV": 1, "LABEL": 1, "WORKDIR": 1, "USER": 1, "RUN": 1,
            "COPY": 2, "ADD": 2, "EXPOSE": 1, "SHELL": 1, "STOPSIGNAL": 1, "HEALTHCHECK": 1,
            "VOLUME": 1, "MAINTAINER": 1}


@dataclass(frozen=True)
class Heredoc:
    name: str
    content: str
    expand: bool  # an unquoted delimiter: the content is subject to expansion


@dataclass
class Instruction:
    """One Dockerfile instruction, as parsed (nothing expanded yet)."""

    cmd: str  # upper case
    args: list[str]
    flags: dict[str, str]
    json: bool
    line: int
    original: str
    file: str
    heredocs: list[Heredoc] = field(default_factory=list)
    sub: Instruction | None = None  # ONBUILD's instruction

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"

    def error(self, message: str) -> BuildError:
        return BuildError(f"{self.where}: {self.cmd}: {message}")


@dataclass
class Dockerfile:
    instructions: list[Instruction]
    escape: str
    file: str


def _directives(text: str) -> dict[str, str]:
    """Parser directives: ``# name=value`` lines at the very top (Docker stops at the
    first line that is not one)."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        m = _DIRECTIVE_RE.fullmatch(line.strip())
        if not m:
            break
        out[m.group(1).lower()] = m.group(2)
    return out


def _split_flags(raw: tuple[str, ...], cmd: str, where: str) -> dict[str, str]:
    out: dict[str, str] = {}
    allowed = ALLOWED_FLAGS.get(cmd, frozenset())
    for f in raw:
        name, eq, value = f[2:].partition("=")
        if name == "mount" and cmd == "RUN":
            raise BuildError(f"{where}: RUN: --mount is not supported")
        if name not in allowed:
            raise BuildError(f"{where}: {cmd}: unknown flag --{name}")
        if name == "link" and not eq:
            value = "true"
        elif not eq:
            raise BuildError(f"{where}: {cmd}: flag --{name} needs a value (--{name}=...)")
        out[name] = value
    return out


def _heredocs(cmd: _bk.Command) -> list[Heredoc]:
    out = []
    for h in cmd.heredocs:
        quoted = re.search(rf"<<-?([\"']){re.escape(h.name)}\1", cmd.original) is not None
        out.append(Heredoc(h.name, h.content, expand=not quoted))
    return out


def _line_of_unterminated_heredoc(text: str) -> int:
    """The line of the last heredoc opening (the parser's error carries no line)."""
    last = 1
    for i, line in enumerate(text.splitlines(), 1):
        if "<<" in line and not line.lstrip().startswith("#"):
            last = i
    return last


def _convert(c: _bk.Command, file: str) -> Instruction:
    cmd = c.cmd.upper()
    where = f"{file}:{c.start_line}"
    if cmd not in KNOWN:
        raise BuildError(f"{where}: unknown instruction: {c.cmd}")
    if cmd == "ONBUILD":
        if not c.sub_cmd:
            raise BuildError(f"{where}: ONBUILD needs an instruction")
        sub_cmd = c.sub_cmd.upper()
        if sub_cmd in ("ONBUILD", "FROM", "MAINTAINER"):
            raise BuildError(f"{where}: ONBUILD: {sub_cmd} is not allowed as an ONBUILD "
                             "trigger")
        inner = _convert(_bk.Command(cmd=sub_cmd, sub_cmd=None, json=c.json,
                                     original=c.original.split(None, 1)[1],
                                     start_line=c.start_line, end_line=c.end_line,
                                     flags=c.flags, value=c.value, heredocs=c.heredocs), file)
        return Instruction("ONBUILD", [inner.original], {}, False, c.start_line, c.original,
                           file, sub=inner)
    flags = _split_flags(tuple(c.flags), cmd, where)
    args = [v for v in c.value if v != ""] if cmd != "ENV" else list(c.value)
    need = MIN_ARGS.get(cmd, 0)
    if len(args) < need:
        what = "an argument" if need == 1 else f"at least {need} arguments"
        raise BuildError(f"{where}: {cmd} needs {what}")
    if cmd == "ENV" and len(args) % 2:
        raise BuildError(f"{where}: ENV needs KEY=VALUE pairs")
    if cmd == "SHELL" and not c.json:
        raise BuildError(f"{where}: SHELL needs the JSON form, e.g. SHELL [\"/bin/sh\", \"-c\"]")
    if cmd == "FROM" and len(args) not in (1, 3):
        raise BuildError(f"{where}: FROM wants IMAGE [AS NAME], got {' '.join(args)!r}")
    if cmd == "FROM" and len(args) == 3 and args[1].upper() != "AS":
        raise BuildError(f"{where}: FROM wants IMAGE [AS NAME], got {' '.join(args)!r}")
    if cmd == "HEALTHCHECK" and args[0].upper() not in ("CMD", "NONE"):
        raise BuildError(f"{where}: HEALTHCHECK wants CMD ... or NONE")
    return Instruction(cmd, args, flags, bool(c.json), c.start_line, c.original, file,
                       _heredocs(c))


def parse(text: str, file: str = "Dockerfile") -> Dockerfile:
    """Parse and check a Dockerfile; BuildError ``FILE:LINE: message`` if it is malformed."""
    escape = _directives(text).get("escape", DEFAULT_ESCAPE)
    if escape not in ("\\", "`"):
        raise BuildError(f"{file}:1: invalid escape directive {escape!r}: want \\ or `")
    try:
        cmds = _bk.parse_string(text)
    except _bk.GoParseError as err:
        line = _line_of_unterminated_heredoc(text) if "heredoc" in str(err) else 1
        raise BuildError(f"{file}:{line}: {err}") from None
    instructions = [_convert(c, file) for c in cmds]
    if not instructions:
        raise BuildError(f"{file}:1: the Dockerfile has no instructions")
    for ins in instructions:
        if ins.cmd == "FROM":
            break
        if ins.cmd != "ARG":
            raise BuildError(f"{ins.where}: {ins.cmd} before the first FROM (only ARG may "
                             "come first)")
    else:
        raise BuildError(f"{file}:{instructions[-1].line}: the Dockerfile has no FROM")
    return Dockerfile(instructions, escape, file)


def parse_file(path: str | Path) -> Dockerfile:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as err:
        raise BuildError(f"{p}: cannot read the Dockerfile: {err.strerror}") from None
    except UnicodeDecodeError:
        raise BuildError(f"{p}: the Dockerfile is not UTF-8 text") from None
    return parse(text, str(p))


def heredoc_alone(ins: Instruction) -> Heredoc | None:
    """The heredoc of ``RUN <<EOF`` with nothing else on the line (its content is the
    script), else None (``RUN cmd <<EOF`` feeds the heredoc to cmd's stdin: sh does it)."""
    if len(ins.heredocs) == 1 and len(ins.args) == 1 and _HEREDOC_ALONE_RE.fullmatch(
            ins.args[0].strip()):
        return ins.heredocs[0]
    return None


# --------------------------------------------------------------------------- expansion
class LexError(ValueError):
    """A word Docker's lexer rejects (unterminated quote, bad ${...}); the caller adds
    file and line."""


class Lexer:
    """Docker's word processing: quote removal, escapes and variable expansion."""

    def __init__(self, escape: str = DEFAULT_ESCAPE) -> None:
        self.escape = escape

    def word(self, text: str, env: Mapping[str, str]) -> str:
        """One word: quotes removed, variables expanded (ENV values, COPY paths, ...)."""
        return "".join(self._process(text, env, split=False)[0])

    def words(self, text: str, env: Mapping[str, str]) -> list[str]:
        """Whitespace-separated words, each processed like :meth:`word`."""
        return self._process(text, env, split=True)[0]

    def _process(self, text: str, env: Mapping[str, str], *, split: bool,
                 stop: str | None = None, pos: int = 0) -> tuple[list[str], int]:
        words: list[str] = []
        cur: list[str] = []
        in_word = False
        n = len(text)
        i = pos
        while i < n:
            ch = text[i]
            if stop is not None and ch == stop:
                break
            if split and ch in " \t\n":
                if in_word:
                    words.append("".join(cur))
                    cur, in_word = [], False
                i += 1
                continue
            in_word = True
            if ch == self.escape:
                if i + 1 < n:
                    cur.append(text[i + 1])
                    i += 2
                else:
                    cur.append(ch)
                    i += 1
            elif ch == "'":
                end = text.find("'", i + 1)
                if end < 0:
                    raise LexError("unexpected end of statement while looking for matching "
                                   "single-quote")
                cur.append(text[i + 1:end])
                i = end + 1
            elif ch == '"':
                i = self._double(text, i + 1, env, cur)
            elif ch == "$":
                i = self._dollar(text, i + 1, env, cur)
            else:
                cur.append(ch)
                i += 1
        if in_word or not split:
            words.append("".join(cur))
        return words, i

    def _double(self, text: str, i: int, env: Mapping[str, str], cur: list[str]) -> int:
        n = len(text)
        while i < n:
            ch = text[i]
            if ch == '"':
                return i + 1
            if ch == "$":
                i = self._dollar(text, i + 1, env, cur)
                continue
            if ch == self.escape and i + 1 < n and text[i + 1] in ('"', "$", self.escape):
                cur.append(text[i + 1])
                i += 2
                continue
            cur.append(ch)
            i += 1
        raise LexError("unexpected end of statement while looking for matching double-quote")

    def _dollar(self, text: str, i: int, env: Mapping[str, str], cur: list[str]) -> int:
        n = len(text)
        if i >= n:
            cur.append("$")
            return i
        if text[i] != "{":
            j = i
            while j < n and _NAME_CHARS.match(text[j]):
                j += 1
            if j == i:
                cur.append("$")
                return i
            cur.append(env.get(text[i:j], ""))
            return j
        j = i + 1
        while j < n and _NAME_CHARS.match(text[j]):
            j += 1
        name = text[i + 1:j]
        if not name:
            raise LexError(f"bad substitution in {text!r}")
        if j >= n:
            raise LexError(f"missing '}}' in {text!r}")
        if text[j] == "}":
            cur.append(env.get(name, ""))
            return j + 1
        colon = text[j] == ":"
        op_at = j + 1 if colon else j
        if op_at >= n or text[op_at] not in "-+?":
            raise LexError(f"unsupported modifier in ${{{name}...}} of {text!r}")
        op = text[op_at]
        parts, end = self._process(text, env, split=False, stop="}", pos=op_at + 1)
        if end >= n:
            raise LexError(f"missing '}}' in {text!r}")
        word = "".join(parts)
        value = env.get(name)
        is_set = value is not None and (value != "" or not colon)
        if op == "-":
            cur.append(value if is_set and value is not None else word)
        elif op == "+":
            cur.append(word if is_set else "")
        else:  # "?"
            if not is_set:
                raise LexError(f"{name}: {word or 'is not allowed to be unset'}")
            cur.append(value or "")
        return end + 1
