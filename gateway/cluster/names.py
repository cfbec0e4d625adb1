"""The name of a gateway of a cluster, checked alike where a gateway takes one (``--node``,
``ClusterMember``) and where the command line reads the metrics file named after it.

A node name goes into an MQTT client id (``fleetgate-<node>``), a broker username and a file
name inside the home (``metrics-<node>.prom``): letters, digits and ``_.-`` only, never a
leading ``-`` or ``.`` (an option, a hidden file, ``..``), at most 63 characters."""

from __future__ import annotations

import re

__all__ = ["NODE_NAME", "NODE_NAME_RULE"]

NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
# what an operator is told when a name does not fullmatch NODE_NAME
NODE_NAME_RULE = "letters, digits, '_', '.', '-', the first a letter or digit (max 63)"
