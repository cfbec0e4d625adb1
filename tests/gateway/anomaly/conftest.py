"""Fixtures of the anomaly engine tests (the rig itself lives in ``anomaly_rig``)."""

from __future__ import annotations

import pytest
from anomaly_rig import Rig


@pytest.fixture
def rig() -> Rig:
    return Rig()
