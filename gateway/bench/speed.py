"""How fast this machine is right now: the CPU time a fixed workload takes.

On the shared VMs these benchmarks run on, the same work costs a third more or less CPU time
from one minute to the next (the host's other tenants share caches, memory bandwidth and
clock). A benchmark that compares rounds run minutes apart measures that drift along with the
effect it looks for. Run just before each round, the probe says how fast the machine was, so
the rounds can also be compared in units of the probe; the raw figures stay what they are.
"""

from __future__ import annotations

import hashlib
import json
import time

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

__all__ = ["speed_probe"]

_ROUNDS = 500  # about 50 ms of CPU per run on the 2-core VMs of docs/benchmarks.md


def _workload(key: ec.EllipticCurvePrivateKey) -> None:
    """An enrollment's mix in miniature: signatures made and checked (C), JSON and hashing of
    request-sized documents, small Python objects."""
    public = key.public_key()
    document = {
        "type": "enroll",
        "id": "req-0001",
        "device": "th-sensor-0001",
        "firmware": {"version": "1.4.2", "digest": "ab" * 32},
        "csr": "A" * 600,
    }
    for n in range(_ROUNDS):
        document["id"] = f"req-{n:04d}"
        text = json.dumps(document, sort_keys=True)
        data = hashlib.sha256(text.encode()).digest()
        signature = key.sign(data, ec.ECDSA(hashes.SHA256()))
        public.verify(signature, data, ec.ECDSA(hashes.SHA256()))
        parsed = json.loads(text)
        _ = {f"{k}-{n}": v for k, v in parsed.items()}


def speed_probe(runs: int = 3) -> float:
    """CPU milliseconds of this thread for the fixed workload: the least of ``runs`` runs (an
    interruption only adds time; the least is the machine's speed)."""
    if isinstance(runs, bool) or not isinstance(runs, int) or runs < 1:
        raise ValueError("runs must be a positive int")
    key = ec.generate_private_key(ec.SECP256R1())
    best = float("inf")
    for _ in range(runs):
        began = time.thread_time()
        _workload(key)
        best = min(best, time.thread_time() - began)
    return best * 1000
