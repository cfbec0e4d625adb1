"""Publish: what the core hands to the transport."""

from __future__ import annotations

import pytest

from gateway.enrollment import Publish


def test_defaults_are_qos_1_not_retained() -> None:
    publish = Publish("fg/v1/enroll/a/resp", b"{}")
    assert (publish.qos, publish.retain) == (1, False)


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (("", b"{}"), ValueError),
        (("t", "text"), TypeError),
        (("t", b"{}", 3), ValueError),
    ],
)
def test_bad_publishes_are_refused(args: tuple[object, ...], error: type[Exception]) -> None:
    with pytest.raises(error):
        Publish(*args)  # type: ignore[arg-type]
