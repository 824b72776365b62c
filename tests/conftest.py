import pytest

import bilevel as bl


@pytest.fixture(autouse=True)
def _rearm_once_only_warnings():
    """Every test sees the library's once-per-process warnings afresh."""
    bl.reset_warnings()
    yield


@pytest.fixture(params=["autograd", "torch.func"])
def autodiff_mode(request):
    """Run a test on both derivative back ends of ``bl.autodiff`` (plain autograd at the top
    level, the default, and torch.func everywhere)."""
    previous = bl.autodiff.set_eager(request.param == "autograd")
    yield request.param
    bl.autodiff.set_eager(previous)
