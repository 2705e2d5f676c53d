"""Running per-feature mean and variance over a stream of row batches, in float64.

Chan et al.'s parallel update: a batch of m rows with mean b and sum of squared deviations
S_b joins a stream of n rows (mean a, S_a) as

    n' = n + m,  mean' = a + (b - a) m / n',  S' = S_a + S_b + (b - a)^2 n m / n'

so the statistics after any sequence of batches equal those of all rows at once (to
rounding), whatever the batch sizes. UltraEdit's lifelong normalisation keeps one per edited
layer over the [key, gradient] rows of every edit so far.
"""

from __future__ import annotations

import torch


class RunningMoments:
    """count, mean (d,) and M2 (d,): the sum of squared deviations from the mean, float64."""

    def __init__(self, size: int) -> None:
        self.count = 0
        self.mean = torch.zeros(size, dtype=torch.float64)
        self.m2 = torch.zeros(size, dtype=torch.float64)

    def update(self, rows: torch.Tensor) -> None:
        """Add the rows of `rows` (m, d) to the stream."""
        rows = rows.to(torch.float64).cpu()
        m = rows.shape[0]
        if m == 0:
            return
        batch_mean = rows.mean(0)
        batch_m2 = (rows - batch_mean).square().sum(0)
        total = self.count + m
        delta = batch_mean - self.mean
        self.mean = self.mean + delta * (m / total)
        self.m2 = self.m2 + batch_m2 + delta.square() * (self.count * m / total)
        self.count = total

    def std(self) -> torch.Tensor:
        """The sample standard deviation per feature (M2 / (count - 1); zero below two rows)."""
        if self.count < 2:
            return torch.zeros_like(self.m2)
        return (self.m2 / (self.count - 1)).sqrt()

    def normalise(self, rows: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
        """(rows - mean) / (std + eps), float64."""
        return (rows.to(torch.float64).cpu() - self.mean) / (self.std() + eps)

    def state(self) -> dict[str, torch.Tensor]:
        """Tensors that `load` restores exactly."""
        return {"count": torch.tensor([self.count], dtype=torch.int64),
                "mean": self.mean.clone(), "m2": self.m2.clone()}

    @classmethod
    def load(cls, state: dict[str, torch.Tensor]) -> RunningMoments:
        moments = cls(state["mean"].shape[0])
        moments.count = int(state["count"][0])
        moments.mean = state["mean"].to(torch.float64).clone()
        moments.m2 = state["m2"].to(torch.float64).clone()
        return moments
