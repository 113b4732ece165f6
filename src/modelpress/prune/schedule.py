"""Gradual pruning schedules: sparsity as a function of the training step.

The polynomial decay of Zhu & Gupta (2017) prunes fast early, while the network can still
recover, and slowly near the target:

    s(t) = s_f + (s_i - s_f) * (1 - (t - t0) / (t1 - t0)) ** power,   t0 <= t <= t1

and the masks are recomputed every `frequency` steps. `steps` counts training forward passes.

    >>> sched = PolynomialSchedule(initial_sparsity=0.0, steps=200, frequency=20)
    >>> [round(sched.sparsity_at(t, final=0.8), 3) for t in (0, 100, 200)]
    [0.0, 0.7, 0.8]
"""

from __future__ import annotations

from dataclasses import dataclass

from modelpress.core.config import Config
from modelpress.core.errors import ConfigError


@dataclass(frozen=True)
class PolynomialSchedule(Config):
    """Sparsity rising from `initial_sparsity` to the pass's target over `steps` training steps."""

    initial_sparsity: float = 0.0
    steps: int = 100  # training forward passes from begin_step until the final sparsity is reached
    begin_step: int = 0
    frequency: int = 10  # masks are recomputed every `frequency` steps
    power: float = 3.0

    def validate(self) -> None:
        if not 0.0 <= self.initial_sparsity < 1.0:
            raise ConfigError(f"initial_sparsity must be in [0, 1), got {self.initial_sparsity}")
        if self.steps < 1:
            raise ConfigError(f"steps must be >= 1, got {self.steps}")
        if self.begin_step < 0:
            raise ConfigError(f"begin_step must be >= 0, got {self.begin_step}")
        if self.frequency < 1:
            raise ConfigError(f"frequency must be >= 1, got {self.frequency}")
        if self.power <= 0:
            raise ConfigError(f"power must be > 0, got {self.power}")

    def sparsity_at(self, step: int, final: float) -> float:
        """Target sparsity after `step` training steps."""
        if step < self.begin_step:
            return 0.0
        progress = min(1.0, (step - self.begin_step) / self.steps)
        return final + (self.initial_sparsity - final) * (1.0 - progress) ** self.power

    def is_update_step(self, step: int) -> bool:
        """Whether masks are recomputed at `step` (every `frequency` steps inside the schedule)."""
        end = self.begin_step + self.steps
        return self.begin_step <= step <= end and (step - self.begin_step) % self.frequency == 0


def check_final(initial: float, final: float) -> None:
    """A schedule must not lower sparsity: masks only grow."""
    if initial > final:
        raise ConfigError(f"schedule initial_sparsity {initial} is above the final sparsity {final}")
