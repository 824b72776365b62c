"""Peer-library reference implementations (higher, TorchOpt, learn2learn) for benchmarks.

Nothing here is part of the ``bilevel``/``meta`` packages; see ``INSTALL.md``.
"""
