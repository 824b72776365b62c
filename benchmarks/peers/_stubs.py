"""Process-local placeholder modules for learn2learn's unused top-level imports.

``import learn2learn`` (0.2.0) eagerly imports ``learn2learn.gym`` (needs ``gym``) and
``learn2learn.vision`` (needs ``torchvision``).  Neither is used by
``learn2learn.algorithms.MAML`` / ``learn2learn.utils.clone_module`` / ``update_module``,
which is all the MAML benchmark touches.  There is no CPU ``torchvision`` wheel matching
torch 2.13 here, so instead of installing them we register *inert* placeholder modules
in ``sys.modules`` -- only inside the process that calls :func:`import_learn2learn`, only
for the top-level names that are genuinely missing, only for the duration of that import,
and never on disk.

Any attribute of a placeholder module is a fresh placeholder class (so ``class X(gym.Env)``,
``register(...)`` and ``from torchvision import transforms`` all succeed at import time);
nothing the MAML benchmark runs ever touches them (any real use would fail downstream).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types

STUB_ROOTS = ("gym", "torchvision")
_MARK = "__bilevel_peer_stub__"


class _StubMeta(type):
    def __getattr__(cls, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return _make_class(f"{cls.__qualname__}.{name}")


class _StubBase(metaclass=_StubMeta):
    """Inert: constructing, calling or reading attributes of it just yields more placeholders.

    learn2learn calls some of these at import time (``gym.envs.registration.register(...)``),
    so they must not raise; nothing that the MAML benchmark executes ever reaches them.
    """

    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, *args, **kwargs):
        return _make_class(f"{type(self).__qualname__}()")()

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return _make_class(f"{type(self).__qualname__}.{name}")()


def _make_class(qualname: str) -> type:
    return _StubMeta(qualname.rsplit(".", 1)[-1], (_StubBase,), {"__qualname__": qualname})


class _StubModule(types.ModuleType):
    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        value = _make_class(f"{self.__name__}.{name}")
        setattr(self, name, value)
        return value


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".", 1)[0] in _active_roots:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _StubModule(spec.name)
        setattr(module, _MARK, True)
        module.__path__ = []  # a package, so dotted sub-imports resolve through us
        return module

    def exec_module(self, module):
        parent, _, child = module.__name__.rpartition(".")
        if parent:
            setattr(sys.modules[parent], child, module)


_active_roots: set[str] = set()
_finder = _StubFinder()


def is_stub(module: types.ModuleType) -> bool:
    return bool(getattr(module, _MARK, False))


def import_learn2learn() -> types.ModuleType:
    """``import learn2learn``, placeholding ``gym``/``torchvision`` only if they are missing.

    The placeholders exist only while ``learn2learn`` executes its top-level imports: afterwards
    the finder is removed from ``sys.meta_path`` and the placeholder modules are purged from
    ``sys.modules`` (learn2learn's own modules keep their references), so later
    ``import torchvision`` / ``pytest.importorskip("torchvision")`` in the same process still
    see the truth.  Returns the imported ``learn2learn`` module.
    """
    if "learn2learn" in sys.modules:
        return sys.modules["learn2learn"]
    missing = [
        r for r in STUB_ROOTS if r not in sys.modules and importlib.util.find_spec(r) is None
    ]
    if not missing:
        return importlib.import_module("learn2learn")
    _active_roots.update(missing)
    sys.meta_path.append(_finder)  # appended: a real package, if present, always wins
    try:
        return importlib.import_module("learn2learn")
    finally:
        sys.meta_path.remove(_finder)
        _active_roots.clear()
        for name in [n for n, m in sys.modules.items() if m is not None and is_stub(m)]:
            del sys.modules[name]
