"""The image index format: canonical encoding, validation, decoding of crafted bytes."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from swarm.digest import hash_bytes
from swarm.errors import UsageError
from swarm.fs.images import parse_name
from swarm.fs.index import Entry, Index, IndexError_, normalize_path

D = hash_bytes(b"x")


def small_index(config=None):
    return Index([
        Entry(b"/", "dir", 0o755),
        Entry(b"/bin", "dir", 0o755),
        Entry(b"/bin/sh", "file", 0o4755, size=1, digest=D, link=0),
        Entry(b"/bin/sh2", "file", 0o4755, size=1, digest=D, link=0),
        Entry(b"/lnk", "symlink", 0o777, target=b"../dangling", size=11),
        Entry(b"/dev-null", "char", 0o666, rdev=259),
        Entry(b"/fifo", "fifo", 0o600, xattrs={"user.b": b"2", "user.a": b"\x00\xff"}),
    ], config)


def test_encoding_is_canonical_and_id_is_its_digest():
    a = small_index({"Env": ["A=1"], "Cmd": ["sh"]})
    b = Index(reversed(list(a.entries)), {"Cmd": ["sh"], "Env": ["A=1"]})
    assert a.encode() == b.encode()
    assert a.image_id == hash_bytes(a.encode())
    back = Index.decode(a.encode())
    assert back.entries == a.entries and back.config == a.config
    assert back.image_id == a.image_id


def test_order_is_parents_first():
    idx = Index([Entry(b"/", "dir", 0o755), Entry(b"/a-b", "dir", 0o755),
                 Entry(b"/a", "dir", 0o755), Entry(b"/a/b", "fifo", 0o644)])
    assert [e.path for e in idx] == [b"/", b"/a", b"/a/b", b"/a-b"]


@pytest.mark.parametrize("entries, message", [
    ([Entry(b"/x", "dir", 0o755)], "no root"),
    ([Entry(b"/", "dir", 0o755), Entry(b"/a/b", "fifo", 0)], "parent"),
    ([Entry(b"/", "dir", 0o755), Entry(b"/f", "file", 0)], "digest"),
    ([Entry(b"/", "dir", 0o755), Entry(b"/l", "symlink", 0)], "target"),
    ([Entry(b"/", "dir", 0o755), Entry(b"/f", "file", 0, digest=D),
      Entry(b"/f", "fifo", 0)], "twice"),
    ([Entry(b"/", "dir", 0o755), Entry(b"/s", "socket", 0)], "kind"),
    ([Entry(b"/", "dir", 0o755), Entry(b"/f", "fifo", 0), Entry(b"/f/x", "fifo", 0)],
     "parent"),
])
def test_invalid_indexes_are_refused(entries, message):
    with pytest.raises(IndexError_, match=message):
        Index(entries)


@pytest.mark.parametrize("raw", [
    b"", b"\xc1", msgpack.packb({"v": 99, "entries": []}), msgpack.packb([1, 2, 3]),
    msgpack.packb({"v": 1, "entries": [[b"/", "dir"]]}),
    msgpack.packb({"v": 1, "entries": [["/", "dir", 1, 2, 3, 4, 5, None, None, 0, None,
                                        None, "extra"]]}),
])
def test_crafted_bytes_do_not_decode(raw):
    with pytest.raises(IndexError_):
        Index.decode(raw)


def test_normalize_path():
    assert normalize_path("") == b"/"
    assert normalize_path("./a//b/./c/") == b"/a/b/c"
    with pytest.raises(ValueError):
        normalize_path("a/../b")


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.binary(min_size=1, max_size=8).filter(
    lambda b: b"/" not in b and b"\0" not in b and b not in (b".", b"..")),
    st.sampled_from(["dir", "fifo", "symlink"]), st.integers(0, 0o7777),
    st.integers(0, 2**32 - 1), st.integers(-2**62, 2**62)), max_size=20))
def test_random_flat_indexes_round_trip(items):
    seen = {}
    for name, kind, mode, uid, mtime in items:
        seen[name] = Entry(b"/" + name, kind, mode, uid=uid, mtime_ns=mtime,
                           target=b"t" if kind == "symlink" else None)
    idx = Index([Entry(b"/", "dir", 0o755), *seen.values()])
    back = Index.decode(idx.encode())
    assert back.entries == idx.entries and back.image_id == idx.image_id


@pytest.mark.parametrize("ref, want", [
    ("debian", "debian:latest"), ("debian:12", "debian:12"),
    ("localhost:5000/a/b:v1.2", "localhost:5000/a/b:v1.2"), ("my-app_x:T_1", "my-app_x:T_1"),
])
def test_names(ref, want):
    assert parse_name(ref) == want


@pytest.mark.parametrize("ref", ["Debian", "a b", "x:", ":tag", "a//b", "a:b:c", "-a"])
def test_bad_names(ref):
    with pytest.raises(UsageError):
        parse_name(ref)
