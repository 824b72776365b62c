"""Benchmark problems ("cases"), the estimators under test and the peer implementations.

A case builds, for one configuration (inner steps K, width, meta-batch B, dtype, device, seed),
a :class:`Bench`: a fixed bilevel problem over a batch of B tasks with two entry points,

* ``bench.ours(estimator)`` -> ``(meta_grad, result)``: ONE hypergradient (the mean over the B
  tasks of ``bl.hypergrad``) with one of our estimators;
* ``bench.peer(name)`` -> ``meta_grad``: the same meta-gradient computed by a peer library
  (``benchmarks/peers/maml.py``), on the same model and tasks (Conv4 cases only).

Data are drawn in float64 from a seeded generator and rounded ONCE to the benchmark dtype; a
float64 bench of the same configuration uses those rounded values, so the float64 reference
(``bl.Unrolled`` in float64, the exact derivative of the K-step objective) is for exactly the
problem that was timed.

Cases
-----
``mlp``       MAML-style regression with an MLP (iMAML proximal form so that every estimator is
              defined): hparams θ = the MLP's initial weights, inner loss = support MSE +
              (reg/2)‖w − θ‖², w_0 = θ, K steps of GD, outer loss = query MSE. Tasks are random
              regression functions; the B tasks are batched with ``torch.func.vmap`` over
              ``bl.hypergrad`` (``--batching loop`` for a Python loop). MLP in → width → width
              → 1 (tanh), NTK parametrisation (x @ W / √fan_in) so that one inner learning rate
              is stable at every width.
``mlp_hpo``   Hyperparameter optimisation with a handful of hyperparameters (for ForwardMode):
              hparams = per-layer log weight decay (3) + log inner learning rate (1); inner
              params = the MLP weights from a fixed init (``params0``); inner loss = train MSE +
              Σ_l ½·exp(log_wd_l)·‖W_l‖²; outer = validation MSE. B datasets, vmapped.
``conv4``     The Conv4 few-shot task batch, 5-way 1-shot, 15 queries per class, 28x28 random
              "Omniglot-like" images (class prototype + noise), ``meta.models.Conv4`` (plain-op
              batch norm), through the meta layer's ``meta.IMAML`` learner (proximal inner loss
              with reg = 2, GD lr 0.1, iMAML's defaults) so that every estimator is defined;
              tasks looped (the meta layer's default on CPU; vmapped on CUDA, its default
              there).
``conv4_maml`` The Conv4 MAML meta-step (``meta.MAML``: plain support cross-entropy, w_0 = θ,
              GD lr 0.4) — what the peer libraries compute; their MAML meta-gradients are
              compared with ours here. Implicit-type estimators are not defined on this problem
              (the inner loss does not depend on θ, so the implicit gradient is 0) and are
              recorded as skipped with that reason.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

import bilevel as bl

# ----------------------------------------------------------------------------- names

#: our estimators, in report order
ESTIMATORS = ["Unrolled", "Truncated", "Checkpointed", "Implicit-CG", "Implicit-Neumann",
              "ForwardMode", "FirstOrder", "HistoryFree"]
#: estimators whose memory must not grow with K (the flatness claim)
FLAT_ESTIMATORS = ["Implicit-CG", "Implicit-Neumann", "ForwardMode", "HistoryFree"]
#: peers -> (function name in benchmarks.peers.maml, first_order, our matching estimator)
PEERS: dict[str, tuple[str, bool, str]] = {
    "plain": ("meta_grad_plain", False, "Unrolled"),
    "higher": ("meta_grad_higher", False, "Unrolled"),
    "torchopt": ("meta_grad_torchopt", False, "Unrolled"),
    "torchopt_functional": ("meta_grad_torchopt_functional", False, "Unrolled"),
    "learn2learn": ("meta_grad_learn2learn", False, "Unrolled"),
    "plain_fo": ("meta_grad_plain", True, "FirstOrder"),
    "higher_fo": ("meta_grad_higher", True, "FirstOrder"),
    "torchopt_fo": ("meta_grad_torchopt", True, "FirstOrder"),
    "learn2learn_fo": ("meta_grad_learn2learn", True, "FirstOrder"),
    "imaml_plain": ("imaml_grad_plain", False, "Implicit-CG"),
    "imaml_torchopt": ("imaml_grad_torchopt", False, "Implicit-CG"),
}
#: peer -> library module it needs (for the availability check)
PEER_LIBRARY = {"plain": None, "higher": "higher", "torchopt": "torchopt",
                "torchopt_functional": "torchopt", "learn2learn": "learn2learn"}
#: ForwardMode costs one tangent per hyperparameter element: run it only below this size
FORWARD_MAX_HPARAMS = 64


def peer_library(peer: str) -> str:
    """``"higher_fo"`` -> ``"higher"``, ``"imaml_torchopt"`` -> ``"torchopt"``."""
    base = peer.removesuffix("_fo")
    if base.startswith("imaml_"):
        base = base.removeprefix("imaml_")
    return base


@dataclass(frozen=True)
class CaseSpec:
    """Static description of a case: defaults and which methods it runs."""

    name: str
    description: str
    width: int                      # default width (MLP hidden units / Conv4 filters)
    meta_batch: int                 # default number of tasks
    inner_lr: float
    reg: float                      # proximal strength (0: none)
    linsolve_iters: int             # CG / Neumann / HistoryFree iterations
    batching: str                   # "vmap" or "loop"
    peers: tuple[str, ...] = ()
    not_defined: dict[str, str] = field(default_factory=dict)  # estimator -> why skipped


_NO_IMPLICIT = ("not defined on the plain MAML problem: its inner loss does not depend on θ "
                "(θ only sets w_0), so the implicit hypergradient is identically 0; see case "
                "conv4 (iMAML proximal problem) for the implicit estimators")

CASES: dict[str, CaseSpec] = {
    "mlp": CaseSpec("mlp", "MAML-style MLP regression, iMAML proximal inner loss (reg 1), "
                    "support/query 20/20, in 8 -> width -> width -> 1 (tanh), GD lr 0.1, "
                    "tasks vmapped", width=128, meta_batch=4, inner_lr=0.1, reg=1.0,
                    linsolve_iters=20, batching="vmap"),
    "mlp_hpo": CaseSpec("mlp_hpo", "MLP regression HPO: 3 per-layer log weight decays + log "
                        "inner lr (4 hparams), inner params from a fixed init, train/val 64/64, "
                        "GD lr exp(log_lr)=0.1, datasets vmapped", width=128, meta_batch=4,
                        inner_lr=0.1, reg=0.0, linsolve_iters=20, batching="vmap"),
    "conv4": CaseSpec("conv4", "Conv4 (meta.models.Conv4) 5-way 1-shot, 15 queries, 28x28 "
                      "random images, meta.IMAML problem (proximal reg 2, GD lr 0.1, CG 5), "
                      "tasks looped on CPU", width=64, meta_batch=4, inner_lr=0.1, reg=2.0,
                      linsolve_iters=5, batching="loop", peers=("imaml_plain", "imaml_torchopt")),
    "conv4_maml": CaseSpec("conv4_maml", "Conv4 MAML meta-step (meta.MAML: support CE, GD lr "
                           "0.4, second order), 5-way 1-shot, 15 queries, 28x28 random images, "
                           "tasks looped on CPU", width=64, meta_batch=4, inner_lr=0.4, reg=0.0,
                           linsolve_iters=5, batching="loop",
                           peers=("plain", "higher", "torchopt", "torchopt_functional",
                                  "learn2learn", "plain_fo", "higher_fo", "torchopt_fo",
                                  "learn2learn_fo"),
                           not_defined={"Implicit-CG": _NO_IMPLICIT,
                                        "Implicit-Neumann": _NO_IMPLICIT,
                                        "HistoryFree": _NO_IMPLICIT}),
}


class Skip(Exception):
    """This configuration is not run; the message says why (recorded, never dropped)."""


def make_estimator(name: str, inner_steps: int, spec: CaseSpec) -> bl.Estimator:
    """The estimator ``name`` as benchmarked on ``spec`` with K = ``inner_steps``."""
    n = spec.linsolve_iters
    if name == "Unrolled":
        return bl.Unrolled()
    if name == "Truncated":
        return bl.Truncated(min(5, inner_steps))
    if name == "Checkpointed":
        return bl.Checkpointed()
    if name == "Implicit-CG":  # fixed iteration count (iMAML/peers' convention), no early stop
        return bl.Implicit(bl.CG(iters=n, tol=0.0))
    if name == "Implicit-Neumann":  # step = the inner lr: = Truncated(n+1) at the fixed point
        return bl.Implicit(bl.Neumann(iters=n, alpha=spec.inner_lr))
    if name == "ForwardMode":
        return bl.ForwardMode()
    if name == "FirstOrder":
        return bl.FirstOrder()
    if name == "HistoryFree":
        return bl.HistoryFree(iters=n)
    raise KeyError(f"unknown estimator {name!r}; known: {ESTIMATORS}")


# ----------------------------------------------------------------------------- helpers


def _mse(pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # written out: forward-over-reverse through F.mse_loss fails on torch 2.13 (ZeroTensors)
    diff = pred.reshape(y.shape) - y
    return (diff * diff).mean()


def _mlp_init(sizes: list[int], gen: torch.Generator) -> dict[str, torch.Tensor]:
    params = {}
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        params[f"w{i}"] = torch.randn(a, b, generator=gen, dtype=torch.float64)
        params[f"b{i}"] = 0.1 * torch.randn(b, generator=gen, dtype=torch.float64)
    return params


def mlp_forward(params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """tanh MLP in the NTK parametrisation: h ← tanh(h @ W / √fan_in + b)."""
    n = len(params) // 2
    h = x
    for i in range(n):
        w = params[f"w{i}"]
        h = h @ w / math.sqrt(w.shape[0]) + params[f"b{i}"]
        if i < n - 1:
            h = torch.tanh(h)
    return h


def _numel(tree: Any) -> int:
    return sum(t.numel() for t in torch.utils._pytree.tree_leaves(tree))


def _cast(tree: Any, dtype: torch.dtype, device: torch.device) -> Any:
    return torch.utils._pytree.tree_map(
        lambda t: t.to(device=device, dtype=dtype) if t.is_floating_point()
        else t.to(device=device), tree)


def _round_trip(tree: Any, dtype: torch.dtype) -> Any:
    """Round float64 data to ``dtype`` once (float64 benches see the rounded values)."""
    return torch.utils._pytree.tree_map(
        lambda t: t.to(dtype).to(torch.float64) if t.is_floating_point() else t, tree)


def _mean_grad(res: bl.HypergradResult) -> dict[str, torch.Tensor]:
    return {k: g.mean(0) for k, g in res.grad.items()}


def _batched(fn: Callable, batching: str, *args: torch.Tensor) -> bl.HypergradResult:
    """``fn`` over the leading (task) dim of ``args``: vmap, or a loop + stack."""
    if batching == "vmap":
        return torch.func.vmap(fn)(*args)
    results = [fn(*(a[i] for a in args)) for i in range(args[0].shape[0])]
    return torch.utils._pytree.tree_map(lambda *xs: torch.stack(xs), results[0], *results[1:])


# ----------------------------------------------------------------------------- Bench


@dataclass
class Bench:
    """One configured problem: ``ours(estimator)`` / ``peer(name)`` compute the meta-gradient."""

    case: str
    spec: CaseSpec
    inner_steps: int
    width: int
    meta_batch: int
    dtype: torch.dtype
    device: torch.device
    params: int                      # inner parameter elements per task (d)
    hparams: int                     # hyperparameter elements (P)
    ours_fn: Callable[[bl.Estimator], tuple[dict, bl.HypergradResult]]
    peer_fn: Callable[[str], dict] | None = None
    batching: str = "vmap"
    vmapped: bool = True             # results must be checked with bl.check_result afterwards
    extra: dict[str, Any] = field(default_factory=dict)

    def ours(self, estimator: bl.Estimator) -> tuple[dict, bl.HypergradResult]:
        return self.ours_fn(estimator)

    def peer(self, name: str) -> dict:
        if self.peer_fn is None or name not in self.spec.peers:
            raise Skip(f"peer {name!r} is not part of case {self.case!r} "
                       f"(peers here: {list(self.spec.peers) or 'none'})")
        return self.peer_fn(name)

    def check_method(self, method: str) -> None:
        """Raise :class:`Skip` when ``method`` is not meaningful / not defined on this bench."""
        if method in self.spec.not_defined:
            raise Skip(self.spec.not_defined[method])
        if method == "ForwardMode" and self.hparams > FORWARD_MAX_HPARAMS:
            raise Skip(f"ForwardMode needs one tangent per hyperparameter element; this case has "
                       f"{self.hparams} hyperparameters (> {FORWARD_MAX_HPARAMS}): meaningful only "
                       f"for a handful, see case mlp_hpo")
        if method not in ESTIMATORS and method not in self.spec.peers:
            if method in PEERS:
                here = list(self.spec.peers) or ("none: the peers implement Conv4 few-shot "
                                                  "classification only")
                raise Skip(f"peer {method!r} is not run on case {self.case!r} (peers here: "
                           f"{here})")
            raise Skip(f"unknown method {method!r}")


def static_skip_reason(case: str, method: str) -> str | None:
    """Why ``method`` is never run on ``case`` at any K/width/batch (None: it is run).
    The suite records these once per (case, method) instead of starting a process each."""
    spec = CASES[case]
    if method in spec.not_defined:
        return spec.not_defined[method]
    if method == "ForwardMode" and case != "mlp_hpo":
        return (f"ForwardMode needs one tangent per hyperparameter element; case {case} "
                f"meta-learns every network weight (thousands or more, > {FORWARD_MAX_HPARAMS}):"
                f" meaningful only for a handful, see case mlp_hpo")
    if method in PEERS and method not in spec.peers:
        return (f"peer {method!r} is not run on case {case!r}: the peers implement Conv4 "
                f"few-shot classification only")
    return None


def build(case: str, inner_steps: int, width: int | None = None, meta_batch: int | None = None,
          dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", seed: int = 0,
          batching: str | None = None, round_to: torch.dtype | None = None) -> Bench:
    """Build ``case`` for K = ``inner_steps``.

    ``round_to``: the dtype the data were rounded to (defaults to ``dtype``); a float64
    reference bench of a float32 run passes ``dtype=float64, round_to=float32``.
    """
    if case not in CASES:
        raise KeyError(f"unknown case {case!r}; known: {sorted(CASES)}")
    spec = CASES[case]
    if not isinstance(inner_steps, int) or inner_steps < 1:
        raise ValueError(f"inner_steps must be a positive int, got {inner_steps!r}")
    width = spec.width if width is None else width
    meta_batch = spec.meta_batch if meta_batch is None else meta_batch
    if batching in (None, "default"):  # Conv4: the meta layer's default (loop on CPU, vmap on CUDA)
        batching = ("vmap" if torch.device(device).type == "cuda" else "loop") \
            if case.startswith("conv4") else spec.batching
    if batching not in ("vmap", "loop"):
        raise ValueError(f"batching must be 'vmap' or 'loop', got {batching!r}")
    round_to = dtype if round_to is None else round_to
    device = torch.device(device)
    builder = {"mlp": _build_mlp, "mlp_hpo": _build_mlp_hpo, "conv4": _build_conv4,
               "conv4_maml": _build_conv4}[case]
    return builder(spec, inner_steps, width, meta_batch, dtype, device, seed, batching, round_to)


# ----------------------------------------------------------------------------- mlp


def _regression_tasks(gen: torch.Generator, tasks: int, n_support: int, n_query: int,
                      in_features: int) -> tuple[torch.Tensor, ...]:
    """Random smooth regression functions y = sin(x·a) + 0.5·cos(x·b)."""
    a = torch.randn(tasks, in_features, 1, generator=gen, dtype=torch.float64) / math.sqrt(
        in_features) * 2
    b = torch.randn(tasks, in_features, 1, generator=gen, dtype=torch.float64) / math.sqrt(
        in_features) * 2

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(tasks, n, in_features, generator=gen, dtype=torch.float64)
        y = torch.sin(x @ a) + 0.5 * torch.cos(x @ b)
        return x, y.squeeze(-1)

    xs, ys = draw(n_support)
    xq, yq = draw(n_query)
    return xs, ys, xq, yq


def _build_mlp(spec, K, width, B, dtype, device, seed, batching, round_to) -> Bench:
    gen = torch.Generator().manual_seed(seed)
    sizes = [8, width, width, 1]
    theta = _mlp_init(sizes, gen)
    data = _regression_tasks(gen, B, 20, 20, sizes[0])
    theta, data = _round_trip((theta, data), round_to)
    theta, data = _cast((theta, data), dtype, device)

    loss = lambda w, h, b: _mse(mlp_forward(w, b[0]), b[1])  # noqa: E731
    inner = bl.proximal(loss, spec.reg) if spec.reg else loss
    problem = bl.BilevelProblem(inner, loss, init=lambda h: h)
    solver = bl.GradientDescent(spec.inner_lr, K)

    def ours(est: bl.Estimator):
        def one(xs, ys, xq, yq):
            return bl.hypergrad(problem, theta, (xs, ys), (xq, yq), solver=solver,
                                estimator=est, check=False)

        res = _batched(one, batching, *data)
        return _mean_grad(res), res

    d = _numel(theta)
    return Bench("mlp", spec, K, width, B, dtype, device, params=d, hparams=d, ours_fn=ours,
                 batching=batching, vmapped=True, extra={"sizes": sizes})


# ----------------------------------------------------------------------------- mlp_hpo


def _build_mlp_hpo(spec, K, width, B, dtype, device, seed, batching, round_to) -> Bench:
    gen = torch.Generator().manual_seed(seed)
    sizes = [8, width, width, 1]
    w0 = _mlp_init(sizes, gen)
    data = _regression_tasks(gen, B, 64, 64, sizes[0])
    layers = len(sizes) - 1
    hparams = {"log_wd": torch.full((layers,), math.log(1e-2), dtype=torch.float64),
               "log_lr": torch.tensor(math.log(spec.inner_lr), dtype=torch.float64)}
    w0, data, hparams = _round_trip((w0, data, hparams), round_to)
    w0, data, hparams = _cast((w0, data, hparams), dtype, device)

    def train(w, h, b):
        # ½·Σ exp(log_wd)·‖W‖², the ½ applied last: torch.func.jvp of `0.5 * (0-d float32
        # tensor)` returns a float64 tangent on torch 2.13 (wrapped-number promotion), which
        # breaks ForwardMode in float32
        decay = sum(h["log_wd"][i].exp() * (w[f"w{i}"] ** 2).sum() for i in range(layers)) / 2
        return _mse(mlp_forward(w, b[0]), b[1]) + decay

    val = lambda w, h, b: _mse(mlp_forward(w, b[0]), b[1])  # noqa: E731
    problem = bl.BilevelProblem(train, val)
    solver = bl.GradientDescent(lambda h: h["log_lr"].exp(), K)

    def ours(est: bl.Estimator):
        def one(xs, ys, xq, yq):
            return bl.hypergrad(problem, hparams, (xs, ys), (xq, yq), solver=solver,
                                estimator=est, params0=w0, check=False)

        res = _batched(one, batching, *data)
        return _mean_grad(res), res

    return Bench("mlp_hpo", spec, K, width, B, dtype, device, params=_numel(w0),
                 hparams=_numel(hparams), ours_fn=ours, batching=batching, vmapped=True,
                 extra={"sizes": sizes})


# ----------------------------------------------------------------------------- conv4


def omniglot_like(gen: torch.Generator, tasks: int, ways: int = 5, shots: int = 1,
                  queries: int = 15, size: int = 28) -> tuple[torch.Tensor, ...]:
    """Random few-shot episodes shaped like Omniglot: per task and class a random prototype
    image, each example = prototype + 0.5·noise. ``x [tasks, n, 1, size, size]`` float64,
    ``y [tasks, n]`` int64 (class-major order)."""
    protos = torch.randn(tasks, ways, 1, size, size, generator=gen, dtype=torch.float64)

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(ways).repeat_interleave(n).expand(tasks, -1).contiguous()
        x = protos[:, y[0]] + 0.5 * torch.randn(tasks, ways * n, 1, size, size, generator=gen,
                                                 dtype=torch.float64)
        return x, y

    xs, ys = draw(shots)
    xq, yq = draw(queries)
    return xs, ys, xq, yq


def _build_conv4(spec, K, width, B, dtype, device, seed, batching, round_to) -> Bench:
    try:
        import meta
        from meta.models import Conv4
    except ImportError as e:  # helper C's layer not there yet
        raise Skip(f"the meta layer is not importable ({e}); case {spec.name} needs "
                   f"meta.models.Conv4 and meta.MAML/meta.IMAML") from e
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Conv4(in_channels=1, out_features=5, hidden=width).double()
    data = omniglot_like(gen, B)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(round_to).double())
    data = _round_trip(data, round_to)
    model = model.to(device=device, dtype=dtype)
    xs, ys, xq, yq = _cast(data, dtype, device)
    batch = meta.TaskBatch((xs, ys), (xq, yq))
    vectorize = batching == "vmap"

    def learner(est: bl.Estimator | None):
        if spec.name == "conv4":
            return meta.IMAML(model, inner_lr=spec.inner_lr, inner_steps=K, reg=spec.reg,
                              cg_iters=spec.linsolve_iters, estimator=est, vectorize=vectorize)
        return meta.MAML(model, inner_lr=spec.inner_lr, inner_steps=K, estimator=est,
                         vectorize=vectorize)

    def ours(est: bl.Estimator):
        grads, res = learner(est).meta_gradient(batch)
        return grads, res

    def peer(name: str) -> dict:
        from benchmarks.peers import maml as peers

        fn_name, first_order, _ = PEERS[name]
        fn = getattr(peers, fn_name)
        if name.startswith("imaml_"):
            return fn(model, xs, ys, xq, yq, spec.inner_lr, K, spec.reg, spec.linsolve_iters)
        return fn(model, xs, ys, xq, yq, spec.inner_lr, K, first_order=first_order)

    d = _numel(list(model.parameters()))
    return Bench(spec.name, spec, K, width, B, dtype, device, params=d, hparams=d, ours_fn=ours,
                 peer_fn=peer, batching=batching, vmapped=False,
                 extra={"ways": 5, "shots": 1, "queries": 15, "image": 28, "model": model,
                        "learner": learner})
