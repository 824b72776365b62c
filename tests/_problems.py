"""Closed-form test problems (ALGORITHMS.md §9), float64."""

from __future__ import annotations

from dataclasses import dataclass

import torch

import bilevel as bl

DT = torch.float64


def spd(d: int, gen: torch.Generator, lo: float = 0.3, hi: float = 3.0) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, d, dtype=DT, generator=gen))
    return q @ torch.diag(torch.linspace(lo, hi, d, dtype=DT)) @ q.T


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def mpow(m: torch.Tensor, k: int) -> torch.Tensor:
    return torch.linalg.matrix_power(m, k)


@dataclass
class MAMLQuadratic:
    """§9.1: L^s = ½(φ−a)ᵀA(φ−a), L^q = ½(φ−b)ᵀQ(φ−b), φ_0 = θ, K GD steps of size α."""

    A: torch.Tensor
    Q: torch.Tensor
    a: torch.Tensor
    b: torch.Tensor
    alpha: float
    K: int

    @classmethod
    def make(cls, d: int = 5, K: int = 6, alpha: float = 0.2, seed: int = 0) -> MAMLQuadratic:
        g = torch.Generator().manual_seed(seed)
        return cls(spd(d, g), spd(d, g), torch.randn(d, dtype=DT, generator=g),
                   torch.randn(d, dtype=DT, generator=g), alpha, K)

    @property
    def d(self) -> int:
        return self.A.shape[0]

    def problem(self) -> bl.BilevelProblem:
        A, Q, a, b = self.A, self.Q, self.a, self.b
        return bl.BilevelProblem(
            inner_loss=lambda p, h, batch: 0.5 * (p["w"] - a) @ A @ (p["w"] - a),
            outer_loss=lambda p, h, batch: 0.5 * (p["w"] - b) @ Q @ (p["w"] - b),
            init=lambda h: {"w": h["theta"]},
        )

    def solver(self) -> bl.GradientDescent:
        return bl.GradientDescent(lr=self.alpha, steps=self.K)

    def P(self, k: int) -> torch.Tensor:
        return mpow(torch.eye(self.d, dtype=DT) - self.alpha * self.A, k)

    def phi_K(self, theta: torch.Tensor) -> torch.Tensor:
        return self.a + self.P(self.K) @ (theta - self.a)

    def maml_grad(self, theta: torch.Tensor) -> torch.Tensor:
        return self.P(self.K).T @ self.Q @ (self.phi_K(theta) - self.b)

    def truncated_grad(self, theta: torch.Tensor, T: int) -> torch.Tensor:
        return self.P(T).T @ self.Q @ (self.phi_K(theta) - self.b)

    def fo_grad(self, theta: torch.Tensor) -> torch.Tensor:
        return self.Q @ (self.phi_K(theta) - self.b)


@dataclass
class IMAMLQuadratic:
    """§9.3: φ* = argmin L^s(φ) + (reg/2)‖φ − θ‖²; ∇F = reg (A + reg I)⁻¹ Q(φ* − b)."""

    A: torch.Tensor
    Q: torch.Tensor
    a: torch.Tensor
    b: torch.Tensor
    reg: float

    @classmethod
    def make(cls, d: int = 5, reg: float = 2.0, seed: int = 1) -> IMAMLQuadratic:
        g = torch.Generator().manual_seed(seed)
        return cls(spd(d, g), spd(d, g), torch.randn(d, dtype=DT, generator=g),
                   torch.randn(d, dtype=DT, generator=g), reg)

    def problem(self) -> bl.BilevelProblem:
        A, Q, a, b = self.A, self.Q, self.a, self.b
        support = lambda p, h, batch: 0.5 * (p["w"] - a) @ A @ (p["w"] - a)  # noqa: E731
        return bl.BilevelProblem(
            inner_loss=bl.proximal(support, self.reg, center=lambda h: {"w": h["theta"]}),
            outer_loss=lambda p, h, batch: 0.5 * (p["w"] - b) @ Q @ (p["w"] - b),
            init=lambda h: {"w": h["theta"]},
        )

    def phi_star(self, theta: torch.Tensor) -> torch.Tensor:
        eye = torch.eye(self.A.shape[0], dtype=DT)
        return torch.linalg.solve(self.A + self.reg * eye, self.A @ self.a + self.reg * theta)

    def grad(self, theta: torch.Tensor) -> torch.Tensor:
        eye = torch.eye(self.A.shape[0], dtype=DT)
        return self.reg * torch.linalg.solve(self.A + self.reg * eye,
                                             self.Q @ (self.phi_star(theta) - self.b))
