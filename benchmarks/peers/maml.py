"""One MAML meta-step, written the way each peer library's users write it.

Every ``meta_grad_<peer>`` has the same signature::

    meta_grad_<peer>(model, xs, ys, xq, yq, inner_lr, inner_steps, first_order=False)
        -> dict[str, Tensor]

* ``xs``: ``[tasks, n_support, C, H, W]``, ``ys``: ``[tasks, n_support]`` (int64), and
  ``xq``/``yq`` likewise for the query sets;
* for every task, ``inner_steps`` plain SGD steps (step size ``inner_lr``) on the support
  cross-entropy start from the model's parameters; the returned meta-gradient is the gradient,
  with respect to the model's parameters, of the **mean over tasks** of the query cross-entropy
  at the adapted parameters -- second order (differentiating through the inner gradients)
  unless ``first_order=True`` (FOMAML: inner gradients treated as constants);
* the result is keyed like ``model.named_parameters()`` (parameters with
  ``requires_grad=False`` are left out) and lives in the parameters' dtype/device.

Each peer loops over tasks in Python, as that library's own MAML example does.  The model is
left as it was found: parameter values, ``.grad`` attributes and train/eval mode.  Peers are
imported lazily; an unavailable one raises ``ImportError`` saying why, and
:func:`available_peers` reports them all without raising.

Peers
-----
``plain``
    What a user writes by hand: ``torch.func.functional_call`` and
    ``torch.autograd.grad(create_graph=True)``.  The reference the others are tested against.
``higher``
    ``higher.innerloop_ctx(model, SGD, copy_initial_weights=False,
    track_higher_grads=not first_order)`` and ``diffopt.step(loss)``, then
    ``query_loss.backward()`` (its MAML example).  First order: fast weights are detached at
    each step (``track_higher_grads=False``) and the meta-gradient is the query gradient at the
    final fast weights, the usual FOMAML recipe with higher.
``torchopt``
    ``torchopt.MetaSGD(model, lr)`` with ``extract_state_dict``/``recover_state_dict`` around
    each task (its ``maml_omniglot`` example).  ``MetaSGD.step`` always builds the graph of the
    inner gradients, so TorchOpt has no first-order switch there: with ``first_order=True`` this
    falls back to :func:`meta_grad_torchopt_functional`.
``torchopt_functional``
    TorchOpt's functional API: ``torchopt.sgd`` + ``opt.update(..., inplace=False)`` +
    ``torchopt.apply_updates(..., inplace=False)`` on a parameter tuple, with
    ``functional_call`` for the forward pass.
``learn2learn``
    ``l2l.algorithms.MAML(model, lr, first_order)``, ``learner = maml.clone()``,
    ``learner.adapt(loss)``, ``query_loss.backward()`` (its ``maml_omniglot`` example).
    learn2learn 0.2.0 imports ``gym`` and ``torchvision`` at top level without using them here;
    see ``_stubs.py`` for how that is handled when they are not installed.

There is also an iMAML-style implicit meta-gradient pair, :func:`imaml_grad_torchopt`
(``torchopt.diff.implicit.custom_root`` + ``torchopt.linear_solve.solve_cg``) and its hand-written
reference :func:`imaml_grad_plain`.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

__all__ = [
    "PEERS",
    "available_peers",
    "get_peer",
    "imaml_grad_plain",
    "imaml_grad_torchopt",
    "meta_grad_higher",
    "meta_grad_learn2learn",
    "meta_grad_plain",
    "meta_grad_torchopt",
    "meta_grad_torchopt_functional",
]

MetaGrad = Callable[..., dict[str, Tensor]]


# ----------------------------------------------------------------------------- helpers


def _import_peer(name: str):
    """Import a peer library, raising ``ImportError`` with an actionable message."""
    try:
        if name == "learn2learn":
            from ._stubs import import_learn2learn

            return import_learn2learn()
        return importlib.import_module(name)
    except Exception as exc:  # ImportError, but also e.g. a broken compiled extension
        raise ImportError(
            f"peer {name!r} is unavailable ({type(exc).__name__}: {exc}); "
            "see benchmarks/peers/INSTALL.md"
        ) from exc


def _trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _check(xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor, inner_steps: int) -> int:
    if xs.dim() < 2 or xq.dim() < 2 or ys.dim() != 2 or yq.dim() != 2:
        raise ValueError("expected xs/xq as [tasks, n, ...] and ys/yq as [tasks, n]")
    tasks = xs.shape[0]
    if not (xq.shape[0] == ys.shape[0] == yq.shape[0] == tasks):
        raise ValueError("xs, ys, xq, yq must share the leading (tasks) dimension")
    if xs.shape[:2] != ys.shape or xq.shape[:2] != yq.shape:
        raise ValueError("inputs and labels must agree on [tasks, n]")
    if inner_steps < 0:
        raise ValueError("inner_steps must be >= 0")
    return tasks


@contextlib.contextmanager
def _collect_dot_grad(model: nn.Module) -> Iterator[dict[str, Tensor]]:
    """Let peers ``.backward()`` into ``p.grad`` as their examples do, without side effects.

    Clears ``.grad`` on entry; on exit moves what accumulated into the yielded dict (zeros for
    parameters that received none) and restores the previous ``.grad`` attributes.
    """
    params = _trainable(model)
    saved = {n: p.grad for n, p in params}
    for _, p in params:
        p.grad = None
    out: dict[str, Tensor] = {}
    try:
        yield out
        for n, p in params:
            out[n] = p.grad if p.grad is not None else torch.zeros_like(p)
    finally:
        for n, p in params:
            p.grad = saved[n]


@contextlib.contextmanager
def _train_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.train()
    try:
        yield
    finally:
        model.train(was_training)


def _accumulate(total: list[Tensor] | None, grads: tuple[Tensor | None, ...]) -> list[Tensor]:
    if total is None:
        return [g.detach().clone() for g in grads]
    for t, g in zip(total, grads):
        t.add_(g.detach())
    return total


# ----------------------------------------------------------------------------- plain


def meta_grad_plain(
    model: nn.Module,
    xs: Tensor,
    ys: Tensor,
    xq: Tensor,
    yq: Tensor,
    inner_lr: float,
    inner_steps: int,
    first_order: bool = False,
) -> dict[str, Tensor]:
    """Hand-written MAML: ``functional_call`` + ``torch.autograd.grad(create_graph=True)``."""
    tasks = _check(xs, ys, xq, yq, inner_steps)
    named = _trainable(model)
    names = [n for n, _ in named]
    params = [p for _, p in named]
    frozen = {n: p for n, p in model.named_parameters() if not p.requires_grad}
    frozen.update(dict(model.named_buffers()))
    total: list[Tensor] | None = None
    with _train_mode(model):
        for t in range(tasks):
            fast = params
            for _ in range(inner_steps):
                logits = functional_call(model, ({**frozen, **dict(zip(names, fast))},), (xs[t],))
                loss = F.cross_entropy(logits, ys[t])
                grads = torch.autograd.grad(loss, fast, create_graph=not first_order)
                fast = [w - inner_lr * g for w, g in zip(fast, grads)]
            logits = functional_call(model, ({**frozen, **dict(zip(names, fast))},), (xq[t],))
            query_loss = F.cross_entropy(logits, yq[t]) / tasks
            total = _accumulate(total, torch.autograd.grad(query_loss, params))
    return dict(zip(names, total)) if total is not None else {}


# ----------------------------------------------------------------------------- higher


def meta_grad_higher(
    model: nn.Module,
    xs: Tensor,
    ys: Tensor,
    xq: Tensor,
    yq: Tensor,
    inner_lr: float,
    inner_steps: int,
    first_order: bool = False,
) -> dict[str, Tensor]:
    """MAML with ``higher.innerloop_ctx`` (facebookresearch/higher ``maml-omniglot`` example)."""
    higher = _import_peer("higher")
    tasks = _check(xs, ys, xq, yq, inner_steps)
    names = [n for n, _ in _trainable(model)]
    inner_opt = torch.optim.SGD(model.parameters(), lr=inner_lr)
    fo_total: list[Tensor] | None = None
    with _train_mode(model), _collect_dot_grad(model) as out:
        for t in range(tasks):
            with higher.innerloop_ctx(
                model, inner_opt, copy_initial_weights=False, track_higher_grads=not first_order
            ) as (fmodel, diffopt):
                for _ in range(inner_steps):
                    diffopt.step(F.cross_entropy(fmodel(xs[t]), ys[t]))
                query_loss = F.cross_entropy(fmodel(xq[t]), yq[t]) / tasks
                if first_order:
                    # fast weights are fresh leaves: the FOMAML gradient is the query gradient
                    # at the adapted weights (as with ``higher`` in test mode).
                    fast = [p for p in fmodel.parameters() if p.requires_grad]
                    fo_total = _accumulate(fo_total, torch.autograd.grad(query_loss, fast))
                else:
                    query_loss.backward()
    if first_order:
        return dict(zip(names, fo_total)) if fo_total is not None else {}
    return out


# ----------------------------------------------------------------------------- torchopt


def meta_grad_torchopt(
    model: nn.Module,
    xs: Tensor,
    ys: Tensor,
    xq: Tensor,
    yq: Tensor,
    inner_lr: float,
    inner_steps: int,
    first_order: bool = False,
) -> dict[str, Tensor]:
    """MAML with ``torchopt.MetaSGD`` (TorchOpt ``examples/few-shot/maml_omniglot.py``).

    ``first_order=True`` is delegated to :func:`meta_grad_torchopt_functional`, since
    ``MetaSGD.step`` always differentiates through the inner gradients.
    """
    torchopt = _import_peer("torchopt")
    if first_order:
        return meta_grad_torchopt_functional(
            model, xs, ys, xq, yq, inner_lr, inner_steps, first_order=True
        )
    tasks = _check(xs, ys, xq, yq, inner_steps)
    inner_opt = torchopt.MetaSGD(model, lr=inner_lr)
    with _train_mode(model), _collect_dot_grad(model) as out:
        for t in range(tasks):
            net_state = torchopt.extract_state_dict(model)
            opt_state = torchopt.extract_state_dict(inner_opt)
            try:
                for _ in range(inner_steps):
                    inner_opt.step(F.cross_entropy(model(xs[t]), ys[t]))
                query_loss = F.cross_entropy(model(xq[t]), yq[t]) / tasks
                query_loss.backward()
            finally:
                torchopt.recover_state_dict(model, net_state)
                torchopt.recover_state_dict(inner_opt, opt_state)
    return out


def meta_grad_torchopt_functional(
    model: nn.Module,
    xs: Tensor,
    ys: Tensor,
    xq: Tensor,
    yq: Tensor,
    inner_lr: float,
    inner_steps: int,
    first_order: bool = False,
) -> dict[str, Tensor]:
    """MAML with TorchOpt's functional optimiser API (``torchopt.sgd`` + ``apply_updates``)."""
    torchopt = _import_peer("torchopt")
    tasks = _check(xs, ys, xq, yq, inner_steps)
    named = _trainable(model)
    names = [n for n, _ in named]
    params = tuple(p for _, p in named)
    frozen = {n: p for n, p in model.named_parameters() if not p.requires_grad}
    frozen.update(dict(model.named_buffers()))

    def forward(weights: tuple[Tensor, ...], x: Tensor) -> Tensor:
        return functional_call(model, ({**frozen, **dict(zip(names, weights))},), (x,))

    inner_opt = torchopt.sgd(lr=inner_lr)
    with _train_mode(model), _collect_dot_grad(model) as out:
        for t in range(tasks):
            fast = params
            state = inner_opt.init(fast)
            for _ in range(inner_steps):
                loss = F.cross_entropy(forward(fast, xs[t]), ys[t])
                grads = torch.autograd.grad(loss, fast, create_graph=not first_order)
                updates, state = inner_opt.update(grads, state, inplace=False)
                fast = torchopt.apply_updates(fast, updates, inplace=False)
            query_loss = F.cross_entropy(forward(fast, xq[t]), yq[t]) / tasks
            query_loss.backward()
    return out


# ----------------------------------------------------------------------------- learn2learn


def meta_grad_learn2learn(
    model: nn.Module,
    xs: Tensor,
    ys: Tensor,
    xq: Tensor,
    yq: Tensor,
    inner_lr: float,
    inner_steps: int,
    first_order: bool = False,
) -> dict[str, Tensor]:
    """MAML with ``l2l.algorithms.MAML`` clone/adapt (learn2learn ``maml_omniglot`` example)."""
    l2l = _import_peer("learn2learn")
    tasks = _check(xs, ys, xq, yq, inner_steps)
    maml = l2l.algorithms.MAML(model, lr=inner_lr, first_order=first_order)
    with _train_mode(model), _collect_dot_grad(model) as out:
        for t in range(tasks):
            learner = maml.clone()
            for _ in range(inner_steps):
                learner.adapt(F.cross_entropy(learner(xs[t]), ys[t]))
            query_loss = F.cross_entropy(learner(xq[t]), yq[t]) / tasks
            query_loss.backward()
    return out


# ----------------------------------------------------------------------------- iMAML


def _check_imaml(reg: float, cg_iters: int) -> None:
    if not reg > 0:
        raise ValueError("reg must be > 0")
    if cg_iters < 1:
        raise ValueError("cg_iters must be >= 1")


def imaml_grad_plain(
    model: nn.Module,
    xs: Tensor,
    ys: Tensor,
    xq: Tensor,
    yq: Tensor,
    inner_lr: float,
    inner_steps: int,
    reg: float,
    cg_iters: int,
) -> dict[str, Tensor]:
    """Hand-written iMAML meta-gradient (Rajeswaran et al. 2019), the reference for TorchOpt's.

    Per task: ``phi`` = ``inner_steps`` SGD steps, from ``theta``, on the proximal support loss
    ``L_s(phi) + reg/2 ||phi - theta||^2``; then ``cg_iters`` conjugate-gradient iterations
    (from zero, no early stop) on ``(H + reg I) v = grad L_q(phi)`` with ``H`` the support
    Hessian at ``phi``; the task's meta-gradient is ``reg * v``.  Averaged over tasks.
    """
    tasks = _check(xs, ys, xq, yq, inner_steps)
    _check_imaml(reg, cg_iters)
    named = _trainable(model)
    names = [n for n, _ in named]
    theta = [p.detach() for _, p in named]
    frozen = {n: p for n, p in model.named_parameters() if not p.requires_grad}
    frozen.update(dict(model.named_buffers()))

    def loss_at(weights: list[Tensor], x: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(functional_call(model, ({**frozen, **dict(zip(names, weights))},),
                                               (x,)), y)

    def prox(weights: list[Tensor], t: int) -> Tensor:
        penalty = sum(torch.sum((w - th) ** 2) for w, th in zip(weights, theta))
        return loss_at(weights, xs[t], ys[t]) + 0.5 * reg * penalty

    def vdot(a: list[Tensor], b: list[Tensor]) -> Tensor:
        return sum(torch.sum(u * v) for u, v in zip(a, b))

    total = [torch.zeros_like(th) for th in theta]
    with _train_mode(model):
        for t in range(tasks):
            phi = [th.clone().requires_grad_() for th in theta]
            for _ in range(inner_steps):
                grads = torch.autograd.grad(prox(phi, t), phi)
                with torch.no_grad():
                    phi = [w - inner_lr * g for w, g in zip(phi, grads)]
                phi = [w.requires_grad_() for w in phi]
            b = [g.detach() for g in torch.autograd.grad(loss_at(phi, xq[t], yq[t]), phi)]
            grad_prox = torch.autograd.grad(prox(phi, t), phi, create_graph=True)

            def matvec(v: list[Tensor], grad_prox=grad_prox, phi=phi) -> list[Tensor]:
                return list(torch.autograd.grad(grad_prox, phi, v, retain_graph=True))

            # Conjugate gradient from x0 = 0, exactly cg_iters iterations (unless converged).
            x = [torch.zeros_like(u) for u in b]
            r = [u.clone() for u in b]
            p = [u.clone() for u in b]
            gamma = vdot(r, r)
            for _ in range(cg_iters):
                if gamma == 0:
                    break
                ap = matvec(p)
                alpha = gamma / vdot(p, ap)
                x = [xi + alpha * pi for xi, pi in zip(x, p)]
                r = [ri - alpha * api for ri, api in zip(r, ap)]
                gamma_new = vdot(r, r)
                p = [ri + (gamma_new / gamma) * pi for ri, pi in zip(r, p)]
                gamma = gamma_new
            for acc, xi in zip(total, x):
                acc.add_(reg * xi / tasks)
    return dict(zip(names, total))


def imaml_grad_torchopt(
    model: nn.Module,
    xs: Tensor,
    ys: Tensor,
    xq: Tensor,
    yq: Tensor,
    inner_lr: float,
    inner_steps: int,
    reg: float,
    cg_iters: int,
) -> dict[str, Tensor]:
    """iMAML meta-gradient with ``torchopt.diff.implicit.custom_root`` and ``solve_cg``.

    Follows TorchOpt's ``examples/iMAML/imaml_omniglot_functional.py`` (which uses
    ``functorch.make_functional``; here ``torch.func.functional_call``): the optimality condition
    is ``torch.func.grad`` of the proximal support objective w.r.t. the task parameters, the
    inner solver is ``inner_steps`` of ``torchopt.sgd``, and the linear solve is
    ``torchopt.linear_solve.solve_cg(maxiter=cg_iters, rtol=0, atol=0)`` -- the same problem as
    :func:`imaml_grad_plain`.
    """
    torchopt = _import_peer("torchopt")
    tasks = _check(xs, ys, xq, yq, inner_steps)
    _check_imaml(reg, cg_iters)
    named = _trainable(model)
    names = [n for n, _ in named]
    meta_params = tuple(p for _, p in named)
    frozen = {n: p for n, p in model.named_parameters() if not p.requires_grad}
    frozen.update(dict(model.named_buffers()))

    def fmodel(params: tuple[Tensor, ...], x: Tensor) -> Tensor:
        return functional_call(model, ({**frozen, **dict(zip(names, params))},), (x,))

    def imaml_objective(params, meta_params, x, y):
        penalty = sum(torch.sum(torch.square(p1 - p2)) for p1, p2 in zip(params, meta_params))
        return F.cross_entropy(fmodel(params, x), y) + 0.5 * reg * penalty

    @torchopt.diff.implicit.custom_root(
        torch.func.grad(imaml_objective, argnums=0),
        argnums=1,
        solve=torchopt.linear_solve.solve_cg(maxiter=cg_iters, rtol=0.0, atol=0.0),
    )
    def inner_solver(params, meta_params, x, y):
        inner_opt = torchopt.sgd(lr=inner_lr)
        opt_state = inner_opt.init(params)
        with torch.enable_grad():
            for _ in range(inner_steps):
                loss = imaml_objective(params, meta_params, x, y)
                grads = torch.autograd.grad(loss, params)
                updates, opt_state = inner_opt.update(grads, opt_state, inplace=True)
                params = torchopt.apply_updates(params, updates, inplace=True)
        return params

    with _train_mode(model), _collect_dot_grad(model) as out:
        for t in range(tasks):
            init = tuple(p.detach().clone().requires_grad_() for p in meta_params)
            optimal = inner_solver(init, meta_params, xs[t], ys[t])
            query_loss = F.cross_entropy(fmodel(optimal, xq[t]), yq[t]) / tasks
            query_loss.backward()
    return out


# ----------------------------------------------------------------------------- registry

PEERS: dict[str, MetaGrad] = {
    "plain": meta_grad_plain,
    "higher": meta_grad_higher,
    "torchopt": meta_grad_torchopt,
    "torchopt_functional": meta_grad_torchopt_functional,
    "learn2learn": meta_grad_learn2learn,
}

_MODULE_OF = {
    "plain": None,
    "higher": "higher",
    "torchopt": "torchopt",
    "torchopt_functional": "torchopt",
    "learn2learn": "learn2learn",
}


def _version(module) -> str:
    version = getattr(module, "__version__", None)
    if version is None:
        from importlib.metadata import PackageNotFoundError
        from importlib.metadata import version as dist_version

        try:
            version = dist_version(module.__name__)
        except PackageNotFoundError:
            version = "unknown version"
    return str(version)


def available_peers() -> dict[str, tuple[bool, str]]:
    """``{peer: (ok, reason)}``; ``reason`` is the library version if ok, else why not."""
    result: dict[str, tuple[bool, str]] = {}
    for peer, module_name in _MODULE_OF.items():
        if module_name is None:
            result[peer] = (True, f"torch {torch.__version__} (torch.func)")
            continue
        try:
            module = _import_peer(module_name)
        except ImportError as exc:
            result[peer] = (False, str(exc))
        else:
            note = ""
            if module_name == "learn2learn":
                from ._stubs import STUB_ROOTS

                missing = [r for r in STUB_ROOTS if importlib.util.find_spec(r) is None]
                if missing:
                    note = f" (imported with placeholder {'/'.join(missing)}; see _stubs.py)"
            result[peer] = (True, f"{module_name} {_version(module)}{note}")
    return result


def get_peer(name: str) -> MetaGrad:
    try:
        return PEERS[name]
    except KeyError:
        raise KeyError(f"unknown peer {name!r}; known: {sorted(PEERS)}") from None
