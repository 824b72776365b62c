"""Small pure functions over pytrees of tensors (dicts, lists, tuples; nesting allowed).

Every function works leaf by leaf; the vector-space helpers (:func:`tree_dot`, :func:`tree_norm`)
treat a pytree as the concatenation of its flattened leaves.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.utils._pytree as _pt

PyTree = Any

tree_map = _pt.tree_map
tree_leaves = _pt.tree_leaves
tree_flatten = _pt.tree_flatten
tree_unflatten = _pt.tree_unflatten
tree_structure = _pt.tree_structure


def tree_add(a: PyTree, b: PyTree) -> PyTree:
    return tree_map(torch.add, a, b)


def tree_sub(a: PyTree, b: PyTree) -> PyTree:
    return tree_map(torch.sub, a, b)


def tree_scale(a: PyTree, s: float | torch.Tensor) -> PyTree:
    return tree_map(lambda x: x * s, a)


def tree_axpy(alpha: float | torch.Tensor, x: PyTree, y: PyTree) -> PyTree:
    """``alpha * x + y``."""
    return tree_map(lambda xi, yi: alpha * xi + yi, x, y)


def tree_zeros_like(a: PyTree) -> PyTree:
    return tree_map(torch.zeros_like, a)


def tree_detach(a: PyTree) -> PyTree:
    return tree_map(lambda x: x.detach() if isinstance(x, torch.Tensor) else x, a)


def tree_dot(a: PyTree, b: PyTree) -> torch.Tensor:
    """``<a, b> = sum_i <a_i, b_i>`` over all leaves (a 0-d tensor)."""
    terms = [torch.sum(x * y) for x, y in zip(tree_leaves(a), tree_leaves(b), strict=True)]
    return torch.stack(terms).sum()


def tree_norm(a: PyTree) -> torch.Tensor:
    """Euclidean norm of the concatenated leaves."""
    return torch.sqrt(tree_dot(a, a))


def tree_where(cond: torch.Tensor, a: PyTree, b: PyTree) -> PyTree:
    """Leafwise ``torch.where(cond, a, b)`` with a 0-d boolean ``cond`` (vmap friendly)."""
    return tree_map(lambda x, y: torch.where(cond, x, y), a, b)


def tree_numel(a: PyTree) -> int:
    return sum(x.numel() for x in tree_leaves(a))


def tree_paths(a: PyTree) -> list[tuple[str, Any]]:
    """``[(path, leaf), ...]`` with readable paths such as ``"['layer']['weight']"``."""
    return [(_pt.keystr(path), leaf) for path, leaf in _pt.tree_flatten_with_path(a)[0]]


def tree_basis(a: PyTree) -> PyTree:
    """The standard basis of the space of ``a``: a pytree like ``a`` whose leaves carry a new
    leading dimension of size ``n = tree_numel(a)`` (row ``i`` is the ``i``-th unit vector)."""
    leaves, spec = tree_flatten(a)
    n = sum(x.numel() for x in leaves)
    ref = leaves[0]
    eye = torch.eye(n, dtype=ref.dtype, device=ref.device)
    out, start = [], 0
    for x in leaves:
        out.append(eye[:, start : start + x.numel()].reshape(n, *x.shape).to(x.dtype))
        start += x.numel()
    return tree_unflatten(out, spec)


def tree_from_vector(vec: torch.Tensor, like: PyTree) -> PyTree:
    """Split a flat vector into a pytree shaped like ``like``."""
    leaves, spec = tree_flatten(like)
    out, start = [], 0
    for x in leaves:
        out.append(vec[start : start + x.numel()].reshape(x.shape).to(x.dtype))
        start += x.numel()
    return tree_unflatten(out, spec)


def tree_to_vector(a: PyTree) -> torch.Tensor:
    return torch.cat([x.reshape(-1) for x in tree_leaves(a)])

