"""swarm: run Python in containers on a peer-to-peer cluster, cold-starting in about a second."""

__version__ = "0.1.0"
