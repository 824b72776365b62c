import pytest

import bilevel as bl


@pytest.fixture(autouse=True)
def _rearm_once_only_warnings():
    """Every test sees the library's once-per-process warnings afresh."""
    bl.reset_warnings()
    yield
