"""Fit the scaling law of sparse pre-training, L(N, D) = E + A / N^alpha + B / D^beta, where N is the
*average* active parameter count over training (Jin et al.: with it, one law fits dense and sparse
runs) and D the tokens trained on.

As in Chinchilla (Hoffmann et al., appendix D.2): fit log L with L = exp(LSE(a - alpha log N,
b - beta log D, e)), A = e^a, B = e^b, E = e^e, minimising a Huber loss (delta 1e-3) with L-BFGS from a
grid of starting points, in float64.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from dataclasses import dataclass
from typing import NamedTuple, Sequence

from trainer_plugins import ConfigError

FIT_PARAMS = 5


class Point(NamedTuple):
    run: str
    n: float  # average active parameters
    d: float  # tokens
    loss: float


def load_points(runs: Sequence[str], loss: str = "eval") -> list[Point]:
    """One point per run, from its sparsity.json (written at the end of a run with --sparse)."""
    points = []
    for run in runs:
        path = os.path.join(run, "sparsity.json") if os.path.isdir(run) else run
        try:
            with open(path) as f:
                record = json.load(f)
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"fit-scaling: cannot read {path}: {exc}") from exc
        value = record.get(f"{loss}_loss")
        if value is None:
            raise ConfigError(f"fit-scaling: {path} has no {loss} loss (run with evaluation, or use --loss train)")
        if not record.get("tokens"):
            raise ConfigError(f"fit-scaling: {path} does not record the tokens trained on")
        points.append(Point(run, float(record["avg_params"]), float(record["tokens"]), float(value)))
    if len(points) < FIT_PARAMS:
        raise ConfigError(f"fit-scaling: the law has {FIT_PARAMS} constants; give at least {FIT_PARAMS} runs "
                          f"(got {len(points)}), with different sizes and token counts")
    return points


@dataclass(frozen=True)
class Law:
    E: float
    A: float
    B: float
    alpha: float
    beta: float
    residual: float  # RMS of log-loss residuals over the fitted points

    def predict(self, n: float, d: float) -> float:
        return self.E + self.A / n ** self.alpha + self.B / d ** self.beta

    def as_dict(self) -> dict:
        return {"E": self.E, "A": self.A, "B": self.B, "alpha": self.alpha, "beta": self.beta,
                "rms_log_residual": self.residual}

    def describe(self) -> str:
        return (f"L(N, D) = {self.E:.4f} + {self.A:.4g} / N^{self.alpha:.4f} + {self.B:.4g} / D^{self.beta:.4f}"
                f"   (N = average active parameters, D = tokens; RMS log residual {self.residual:.4f})")


def fit(points: Sequence[Point]) -> Law:
    import torch

    log_n = torch.tensor([math.log(p.n) for p in points], dtype=torch.float64)
    log_d = torch.tensor([math.log(p.d) for p in points], dtype=torch.float64)
    log_l = torch.tensor([math.log(p.loss) for p in points], dtype=torch.float64)

    def objective(x):  # x: (..., 5) -> (...) Huber loss summed over the points
        a, b, e, alpha, beta = x.unbind(-1)
        terms = torch.stack([a[..., None] - alpha[..., None] * log_n, b[..., None] - beta[..., None] * log_d,
                             e[..., None].expand(*e.shape, len(log_n))])
        pred = torch.logsumexp(terms, dim=0)
        return torch.nn.functional.huber_loss(pred, log_l.expand_as(pred), delta=1e-3, reduction="none").sum(-1)

    # Chinchilla's grid of starting points, descended together with Adam, then the best few refined
    # one by one with L-BFGS (the loss surface has flat valleys where A and alpha trade off).
    grid = torch.tensor(list(itertools.product([0.0, 5.0, 10.0, 15.0, 20.0], [0.0, 5.0, 10.0, 15.0, 20.0],
                                               [-1.0, 0.0, 1.0], [0.25, 0.5, 1.0, 1.5], [0.25, 0.5, 1.0, 1.5])),
                        dtype=torch.float64)
    x = grid.clone().requires_grad_(True)
    adam = torch.optim.Adam([x], lr=0.02)
    for _ in range(1500):
        adam.zero_grad()
        objective(x).sum().backward()
        adam.step()
    with torch.no_grad():
        values = objective(x)
    values = torch.where(torch.isfinite(values), values, torch.full_like(values, float("inf")))
    best = None
    for index in values.argsort()[:8].tolist():
        y = x[index].detach().clone().requires_grad_(True)
        lbfgs = torch.optim.LBFGS([y], max_iter=500, tolerance_grad=1e-14, tolerance_change=1e-16,
                                  line_search_fn="strong_wolfe")

        def closure():
            lbfgs.zero_grad()
            value = objective(y)
            value.backward()
            return value

        lbfgs.step(closure)
        with torch.no_grad():
            value = float(objective(y))
        if math.isfinite(value) and (best is None or value < best[0]):
            best = (value, y.detach().clone())
    a, b, e, alpha, beta = best[1].tolist()
    law = Law(E=math.exp(e), A=math.exp(a), B=math.exp(b), alpha=alpha, beta=beta, residual=0.0)
    residual = math.sqrt(sum((math.log(law.predict(p.n, p.d)) - math.log(p.loss)) ** 2 for p in points) / len(points))
    return Law(law.E, law.A, law.B, law.alpha, law.beta, residual)
