"""The one error root of swarm, and the CLI exit code of each user-facing error.

Every error a user can see is a ``SwarmError`` subclass with a one-line message. The CLI
prints ``swarm: error: <message>`` and exits with the class's ``exit_code``; nothing else
in the project maps errors to exit codes.
"""

from __future__ import annotations


class SwarmError(Exception):
    """Root of every error swarm raises on purpose. ``str(err)`` is one line for the user."""

    exit_code = 1


class UsageError(SwarmError):
    """The user asked for something malformed (a bad flag value, a bad name)."""

    exit_code = 2


class NotFound(SwarmError):
    """A named thing (image, blob, container) does not exist."""

    exit_code = 3


class BlobMissing(NotFound):
    """A digest is not in the local store (and, where sources were tried, not there either)."""

    def __init__(self, digest_hex: str, where: str = "the local store") -> None:
        super().__init__(f"blob {digest_hex} is not in {where}")
        self.digest_hex = digest_hex


class CorruptBlob(SwarmError):
    """Bytes read back or received do not hash to the digest they were asked for."""

    exit_code = 4

    def __init__(self, digest_hex: str, got_hex: str | None = None, where: str = "store") -> None:
        detail = f" (hashes to {got_hex})" if got_hex else ""
        super().__init__(f"blob {digest_hex} from {where} is corrupt{detail}")
        self.digest_hex = digest_hex


class StoreError(SwarmError):
    """The store cannot be opened or written (disk full, bad path, incompatible version)."""

    exit_code = 5


class ImportRefused(SwarmError):
    """An image source is malformed or hostile; the message names the offending entry."""

    exit_code = 6


class BuildError(SwarmError):
    """A build step failed or a recipe/Dockerfile is invalid; the message names file and line."""

    exit_code = 7


class RuntimeFailure(SwarmError):
    """A container could not be created, started or cleaned up."""

    exit_code = 8


class MountError(SwarmError):
    """A FUSE or overlay mount could not be made or removed."""

    exit_code = 9


class PeerError(SwarmError):
    """Talking to another node failed: it is unreachable, went away, or broke the protocol."""

    exit_code = 10


class ProtocolError(PeerError):
    """A frame or message is malformed, too large, replayed or out of order."""


class AuthFailed(PeerError):
    """The other side could not prove it holds the cluster's join token (or we could not)."""


class RpcTimeout(PeerError):
    """A request to a peer or to the local node got no answer in time."""


class RemoteError(PeerError):
    """The other side answered a request with an error; ``code`` says which kind."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class NodeNotRunning(SwarmError):
    """No ``swarm node`` answers on this state directory's socket."""

    exit_code = 11
