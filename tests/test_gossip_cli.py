"""``swarm peers`` and ``swarm status``: rendering (pure), and the error with no node."""

from __future__ import annotations

from pathlib import Path

from conftest import run_cli
from swarm.gossip.cli import peers_table, status_text

PEERS = [
    {"name": "aaaabbbbccccdddd", "addr": "10.0.0.1:7077", "state": "alive", "self": True,
     "incarnation": 3, "meta": {"cpu": 15, "mem": 40, "ctr": 2, "gpu": [],
                                "warm": {"0123456789abcdef": 100, "fedcba9876543210": 35}}},
    {"name": "1111222233334444", "addr": "10.0.0.2:7077", "state": "suspect",
     "incarnation": 1, "meta": {"cpu": 90, "mem": 70, "ctr": 0,
                                "gpu": [["NVIDIA H100", 81559, 100, 50],
                                        ["NVIDIA H100", 81559, 100, 30]]}},
    {"name": "5555666677778888", "addr": "10.0.0.3:7077", "state": "dead",
     "incarnation": 4, "meta": {}},
]


def test_peers_table() -> None:
    out = peers_table(PEERS).splitlines()
    assert out[0].split()[:3] == ["NODE", "ADDRESS", "STATE"]
    assert out[1].startswith("aaaabbbbcccc*") and "0123456789ab:100%" in out[1]
    assert "2x NVIDIA H100 40%" in out[2] and "suspect" in out[2]
    assert "dead" in out[3] and out[3].count(" - ") >= 3


def test_status_text() -> None:
    text = status_text({"name": "n", "addr": "a:1", "members": {"alive": 3, "suspect": 1,
                                                                "dead": 0},
                        "health": 0, "dropped_datagrams": {"replayed": 2}})
    assert "3 alive, 1 suspect, 0 dead" in text and "replayed 2" in text


def test_peers_without_a_node_is_a_clear_error(tmp_path: Path) -> None:
    res = run_cli(["peers", "--json"], exit_code=11, state_dir=tmp_path)
    assert "no swarm node runs" in res.stderr
    run_cli(["status"], exit_code=11, state_dir=tmp_path)
