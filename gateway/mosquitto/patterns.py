"""The main instance's ``acl_file``: every active device's own topics as ``%u`` patterns, so a
device that becomes active costs the broker nothing. Pure: ``render_device_patterns`` returns
the file's text, generated from ``gateway.acl`` (one source of truth for both brokers).

How the two rule sources of Mosquitto 2.0.11 combine (each point checked on a running 2.0.11
with the dynamic-security plugin and an ``acl_file`` side by side):

- The plugin is asked first. An ACL of the client's roles that matches decides for good,
  allow *or* explicit deny. When nothing matches (default deny) or the username has no dynsec
  client at all, the plugin defers and the ``acl_file`` decides: a pattern that matches allows,
  anything else is refused. An ``acl_file`` line cannot take away what a dynsec role grants.
- So an active device has no dynsec client: its certificate's CN is its username
  (``use_identity_as_username``), the patterns give it exactly its own topics, and a
  certificate client with no dynsec client is admitted like any other.
- Every identity that must get *less* than the patterns (quarantined, revoked) or other topics
  (operators, services) has a dynsec client whose role ends in explicit denies of everything at
  the lowest priority (``dynsec.deny_rest``): the plugin then decides alone and never defers
  to the patterns. A dynsec change applies to the very next message of a live session, without
  a reload and without a disconnect (``createClient`` on a live username does not kick).
- 2.0's ``acl_file`` grants every SUBSCRIBE it is asked about (its source: "FIXME - implement
  ACL subscription strings") and checks "read" on each message it delivers, retained ones
  included. An active device may therefore subscribe to ``#`` or another device's filter and
  gets a granted SUBACK, but receives only what the patterns let it read (its own commands and
  renewal answers, the CA and the CRL). Identities on dynsec get refused SUBACKs as before.
- The patterns are fixed: written at every start, never reloaded. (A reloaded ``acl_file``
  does apply to live sessions, but a SIGHUP also re-reads certificates and CRL and re-checks
  every connected client: the dynsec path is cheaper for the few identities that differ.)
- Mosquitto refuses every ACL check of a username containing ``+`` or ``#`` (CVE-2017-7650);
  identity names cannot contain them, nor ``/``.
"""

from __future__ import annotations

from gateway.acl import grants
from gateway.store import IdentityState

__all__ = ["USERNAME_PLACEHOLDER", "device_patterns", "render_device_patterns"]

USERNAME_PLACEHOLDER = "%u"
# A valid identity name no topic level of ours uses, replaced by %u level by level.
_SAMPLE = "fleetgate-pattern-sample"


def _subtree(root: tuple[str, ...]) -> str:
    return "/".join((*root, "#"))


def _as_pattern(topic: str) -> str:
    levels = topic.split("/")
    return "/".join(USERNAME_PLACEHOLDER if level == _SAMPLE else level for level in levels)


def device_patterns() -> tuple[tuple[str, str], ...]:
    """``(access, topic pattern)`` pairs, ``access`` being ``write`` or ``read``: what an active
    device may publish and receive, per ``gateway.acl.grants``."""
    granted = grants("device", _SAMPLE, IdentityState.ACTIVE)
    if granted.everything:  # an active device never gets everything; refuse to write that
        raise AssertionError("an active device's grants must be its own topics")
    writes = [*sorted(granted.publish_exact), *(_subtree(r) for r in granted.publish_subtrees)]
    reads = [*sorted(granted.receive_exact), *(_subtree(r) for r in granted.receive_subtrees)]
    return (
        *(("write", _as_pattern(topic)) for topic in writes),
        *(("read", _as_pattern(topic)) for topic in reads),
    )


def render_device_patterns() -> str:
    """The ``acl_file`` text of the main instance."""
    lines = [
        "# Written by Fleetgate at every start; edits are lost.",
        "# Active devices' own topics; every other identity is judged by dynamic security.",
        *(f"pattern {access} {topic}" for access, topic in device_patterns()),
        "",
    ]
    return "\n".join(lines)
