"""Dockerfile parsing, word expansion, .dockerignore matching and the pure tree helpers of
the builder. No root, no containers."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from swarm.build.context import Ignore, pattern_regex
from swarm.build.dockerfile import Lexer, LexError, heredoc_alone, parse
from swarm.build.upper import apply_upper
from swarm.errors import BuildError
from swarm.fs.index import Entry, Index
from swarm.store import Store

# --------------------------------------------------------------------------- malformed
MALFORMED = [
    ("FROM debian\nRUN echo ok\nFRUM x\n", 3, "unknown instruction"),
    ("# comment\nRUN echo before from\nFROM debian\n", 2, "before the first FROM"),
    ("FROM debian\n\nENV\n", 3, "ENV needs"),
    ("FROM debian\nCOPY onlyone\n", 2, "COPY needs at least 2"),
    ("FROM debian\nCOPY --bogus=1 a b\n", 2, "unknown flag --bogus"),
    ("FROM debian\nRUN --mount=type=cache,target=/x true\n", 2, "--mount"),
    ("FROM debian AS\n", 1, "FROM wants IMAGE"),
    ("FROM debian\nRUN true\nRUN <<EOF\necho never closed\n", 3, "unterminated heredoc"),
    ("FROM debian\nSHELL /bin/bash -c\n", 2, "SHELL needs the JSON form"),
    ("FROM debian\nHEALTHCHECK --interval=5s curl x\n", 2, "HEALTHCHECK wants CMD"),
    ("ARG X=1\n", 1, "no FROM"),
    ("# escape=x\nFROM debian\n", 1, "invalid escape"),
    ("FROM debian\nONBUILD FROM other\n", 2, "not allowed"),
]


@pytest.mark.parametrize(("text", "line", "what"), MALFORMED)
def test_malformed_dockerfiles_name_file_and_line(text: str, line: int, what: str) -> None:
    with pytest.raises(BuildError) as err:
        parse(text, "ctx/Dockerfile")
    assert str(err.value).startswith(f"ctx/Dockerfile:{line}:"), str(err.value)
    assert what in str(err.value)


def test_parse_forms_continuations_heredocs_and_escape_directive() -> None:
    df = parse("# escape=`\nARG BASE=debian\nFROM ${BASE} AS build\n"
               "RUN echo a `\n  && echo b\nRUN [\"sh\", \"-c\", \"echo json\"]\n"
               "RUN <<EOF\necho script\nEOF\nCOPY --chown=1:2 --from=build a b /dst/\n")
    assert df.escape == "`"
    cmds = [(i.cmd, i.line) for i in df.instructions]
    assert cmds == [("ARG", 2), ("FROM", 3), ("RUN", 4), ("RUN", 6), ("RUN", 7), ("COPY", 10)]
    run_cont, run_json, run_here, copy = df.instructions[2:]
    assert run_cont.args == ["echo a   && echo b"] and not run_cont.json
    assert run_json.json and run_json.args == ["sh", "-c", "echo json"]
    h = heredoc_alone(run_here)
    assert h is not None and h.content == "echo script\n" and h.expand
    assert copy.flags == {"chown": "1:2", "from": "build"}


@pytest.mark.parametrize(("word", "want"), [
    ("$A", "1"), ("${A}x", "1x"), ('"$A y"', "1 y"), ("'$A'", "$A"), ("${NOPE:-def}", "def"),
    ("${EMPTY:-d}", "d"), ("${EMPTY-d}", ""), ("${A:+yes}", "yes"), ("${NOPE:+yes}", ""),
    ("a\\ b", "a b"), ('"a\\"b"', 'a"b'), ("$", "$"), ("${A:-${B}}", "1"),
    ("${NOPE:-${B}}", "two"), ("pre$B-post", "pretwo-post"),
])
def test_lexer_expands_like_docker(word: str, want: str) -> None:
    assert Lexer().word(word, {"A": "1", "B": "two", "EMPTY": ""}) == want


def test_lexer_words_and_errors() -> None:
    lx = Lexer()
    assert lx.words('a "b c" $A', {"A": "x y"}) == ["a", "b c", "x y"]
    with pytest.raises(LexError):
        lx.word("'unterminated", {})
    with pytest.raises(LexError):
        lx.word("${NOPE:?must be set}", {})
    assert Lexer("`").word("a`$b", {}) == "a$b"


# --------------------------------------------------------------------------- .dockerignore
def test_dockerignore_patterns_and_exceptions(tmp_path: Path) -> None:
    (tmp_path / ".dockerignore").write_text(
        "# comment\n*.log\n**/secret*\nbuild\n!build/keep.txt\n/docs/*.md\n!docs/README.md\n")
    ig = Ignore.load(tmp_path)
    assert ig.excluded("x.log") and not ig.excluded("sub/x.log")
    assert ig.excluded("secret.txt") and ig.excluded("a/b/secret.key")
    assert ig.excluded("build") and ig.excluded("build/out.o")
    assert not ig.excluded("build/keep.txt")
    assert ig.excluded("docs/guide.md") and not ig.excluded("docs/README.md")
    assert not ig.excluded("src/main.py")


def test_pattern_regex_is_go_filepath_match() -> None:
    assert pattern_regex("a/*.txt").fullmatch("a/b.txt")
    assert not pattern_regex("a/*.txt").fullmatch("a/b/c.txt")
    assert pattern_regex("a/**/c.txt").fullmatch("a/c.txt")
    assert pattern_regex("a/**/c.txt").fullmatch("a/x/y/c.txt")
    assert pattern_regex("f?le[0-9]").fullmatch("file7")
    assert not pattern_regex("f?le[!0-9]").fullmatch("file7")


# --------------------------------------------------------------------------- upper dirs
def _lower() -> Index:
    d = b"\x11" * 32
    return Index([
        Entry(b"/", "dir", 0o755), Entry(b"/etc", "dir", 0o755),
        Entry(b"/etc/keep", "file", 0o644, size=1, digest=d),
        Entry(b"/etc/gone", "file", 0o644, size=1, digest=d),
        Entry(b"/opt", "dir", 0o755), Entry(b"/opt/old", "dir", 0o755),
        Entry(b"/opt/old/f", "file", 0o644, size=1, digest=d),
        Entry(b"/var", "dir", 0o755), Entry(b"/var/a", "file", 0o644, size=1, digest=d),
        Entry(b"/var/b", "file", 0o644, size=1, digest=d),
        Entry(b"/l1", "file", 0o644, size=1, digest=d, link=0),
        Entry(b"/l2", "file", 0o644, size=1, digest=d, link=0),
    ])


@pytest.mark.root
def test_apply_upper_whiteouts_opaque_dirs_links_and_mount_points(tmp_path: Path) -> None:
    up = tmp_path / "upper"
    (up / "etc").mkdir(parents=True)
    os.mknod(up / "etc" / "gone", stat.S_IFCHR | 0o600, os.makedev(0, 0))  # whiteout
    (up / "etc" / "hosts").write_text("")  # runc's mount point
    (up / "etc" / "resolv.conf").write_text("nameserver 1.1.1.1\n")  # bind-mounted
    (up / "opt").mkdir()
    (up / "opt" / "old").mkdir()
    os.setxattr(up / "opt" / "old", "trusted.overlay.opaque", b"y")
    (up / "opt" / "old" / "new").write_text("n")
    (up / "var").mkdir()
    (up / "var" / "a").write_text("changed")
    (up / "proc").mkdir()  # runc's mount point, the lower has none
    (up / "h1").write_text("same inode")
    os.link(up / "h1", up / "h2")
    os.mknod(up / "l2", stat.S_IFCHR | 0o600, os.makedev(0, 0))
    with Store(tmp_path / "store") as store, store.batch() as batch:
        entries, stats = apply_upper(_lower(), up, batch)
    by = {e.path: e for e in entries}
    Index(entries)  # a valid tree
    assert b"/etc/gone" not in by and b"/etc/keep" in by
    assert b"/etc/hosts" not in by and b"/etc/resolv.conf" not in by
    assert b"/proc" not in by
    assert b"/opt/old/f" not in by and b"/opt/old/new" in by
    assert by[b"/var/a"].size == len("changed") and b"/var/b" in by
    assert by[b"/h1"].link is not None and by[b"/h1"].link == by[b"/h2"].link
    assert by[b"/l1"].link is None  # its group lost its other member
    assert stats.removed == 3  # /etc/gone, /opt/old/f, /l2
