"""Non-finite guards: pure checks used by the training step to skip a poisoned optimizer step.

A step is *non-finite* when its loss or any gradient holds a NaN or an Inf. Such a step must not touch the
parameters or the optimizer state; after ``limit`` of them in a row the fit stops (:class:`NonFiniteError`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch


class NonFiniteError(RuntimeError):
    """Raised when too many consecutive optimizer steps had a non-finite loss or gradient."""


def all_finite(tensors: Iterable[torch.Tensor | None]) -> bool:
    """Whether every given tensor (``None`` entries are ignored) holds only finite values."""
    flags = [torch.isfinite(t).all() for t in tensors if t is not None]
    return bool(torch.stack(flags).all()) if flags else True


def grads_finite(params: Iterable[torch.nn.Parameter]) -> bool:
    """Whether every existing gradient of ``params`` is finite (parameters without a gradient are skipped)."""
    return all_finite(p.grad for p in params)


@dataclass
class NonFiniteCounter:
    """Counts skipped steps: ``total`` over the run, ``consecutive`` since the last good step.

    Attributes:
        limit: Consecutive non-finite steps tolerated before :meth:`update` raises.
        total: Non-finite (skipped) steps so far.
        consecutive: Non-finite steps since the last finite one.
    """

    limit: int
    total: int = 0
    consecutive: int = 0

    def update(self, finite: bool) -> None:
        """Record one step; a finite step resets ``consecutive``."""
        if finite:
            self.consecutive = 0
            return
        self.total += 1
        self.consecutive += 1

    @property
    def exhausted(self) -> bool:
        """Whether the run has reached ``limit`` non-finite steps in a row."""
        return self.limit > 0 and self.consecutive >= self.limit

    def stop_message(self, checkpoint: str, step: int) -> str:
        """The error raised when :attr:`exhausted`, naming the flag and the last good checkpoint."""
        return (f"{self.consecutive} optimizer steps in a row had a NaN/Inf loss or gradient (skipped so far: "
                f"{self.total}; limit model.max_consecutive_nonfinite={self.limit}); stopped at global step "
                f"{step}. The last good state is in {checkpoint}. Check rewards and learning rate, then resume "
                f"with --ckpt_path {checkpoint}")

    def state_dict(self) -> dict[str, int]:
        """Plain ints (checkpoints load with ``weights_only=True``)."""
        return {"total": self.total, "consecutive": self.consecutive}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restore the counters saved by :meth:`state_dict`."""
        self.total, self.consecutive = int(state["total"]), int(state["consecutive"])
