"""``swarm status`` and ``swarm peers [--json]``: what gossip says, asked of the running node.

Both go through the node's local API (``gossip.status``, ``gossip.peers``), since only the
node process holds the membership. The table is rendered by a pure function, tested
without a node.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import click

from swarm.errors import NodeNotRunning


def _ask(obj: Any, method: str) -> Any:
    from swarm.cli_node import _call, node_running

    if not node_running(obj.state_dir):
        raise NodeNotRunning(f"no swarm node runs on {obj.state_dir} (start one with "
                             "`swarm up` or `swarm join`)")
    obj.close()
    return asyncio.run(_call(obj.state_dir, method, {}))


def _gpus(meta: dict[str, Any]) -> str:
    gpus = meta.get("gpu") or []
    if not isinstance(gpus, list) or not gpus:
        return "-"
    models = sorted({str(g[0]) for g in gpus if isinstance(g, list) and g})
    util = [g[3] for g in gpus if isinstance(g, list) and len(g) == 4]
    avg = f" {sum(util) // len(util)}%" if util else ""
    return f"{len(gpus)}x {'/'.join(models)}{avg}"


def _warmest(meta: dict[str, Any], top: int = 3) -> str:
    warm = meta.get("warm") or {}
    if not isinstance(warm, dict) or not warm:
        return "-"
    best = sorted(warm.items(), key=lambda kv: -kv[1])[:top]
    return " ".join(f"{k[:12]}:{v}%" for k, v in best)


def _pct(meta: dict[str, Any], key: str) -> str:
    v = meta.get(key)
    return f"{v}%" if isinstance(v, int) else "-"


def peers_table(peers: list[dict[str, Any]]) -> str:
    """The ``swarm peers`` table; this node is marked with ``*``."""
    header = ("NODE", "ADDRESS", "STATE", "CPU", "MEM", "GPUS", "CTRS", "WARMEST IMAGES")
    rows = [header]
    for p in peers:
        meta = p.get("meta") or {}
        rows.append((p["name"][:12] + ("*" if p.get("self") else ""), p["addr"], p["state"],
                     _pct(meta, "cpu"), _pct(meta, "mem"), _gpus(meta),
                     str(meta.get("ctr", "-")), _warmest(meta)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r[:-1], widths, strict=True))
                     + "  " + r[-1] for r in rows)


def status_text(doc: dict[str, Any]) -> str:
    m = doc.get("members", {})
    lines = [f"node       {doc.get('name')} at {doc.get('addr')}",
             f"members    {m.get('alive', 0)} alive, {m.get('suspect', 0)} suspect, "
             f"{m.get('dead', 0)} dead",
             f"health     {doc.get('health', 0)} (0 is healthy; timeouts scale by it + 1)",
             f"gossip     {doc.get('bytes_sent', 0)} bytes sent, "
             f"{doc.get('bytes_received', 0)} received"]
    drops = doc.get("dropped_datagrams") or {}
    if drops:
        lines.append("dropped    " + ", ".join(f"{k} {v}" for k, v in sorted(drops.items())))
    return "\n".join(lines)


@click.command("peers")
@click.option("--json", "as_json", is_flag=True, help="A JSON list, one object per node.")
@click.pass_obj
def peers_cmd(obj: Any, as_json: bool) -> None:
    """Members of the cluster as this node sees them: state (alive, suspect, dead), load,
    GPUs, containers and warmest images."""
    peers = _ask(obj, "gossip.peers")
    click.echo(json.dumps(peers, indent=2) if as_json else peers_table(peers))


@click.command("status")
@click.option("--json", "as_json", is_flag=True, help="JSON instead of text.")
@click.pass_obj
def status_cmd(obj: Any, as_json: bool) -> None:
    """This node and a summary of the cluster."""
    doc = _ask(obj, "gossip.status")
    click.echo(json.dumps(doc, indent=2) if as_json else status_text(doc))


def register(cli: click.Group) -> None:
    for cmd in (status_cmd, peers_cmd):
        cli.add_command(cmd)
