"""Non-finite guards: pure checks used by the training step to skip a poisoned optimizer step.

A step is *non-finite* when its loss or any gradient holds a NaN or an Inf. Such a step must not touch the
parameters or the optimizer state; after ``limit`` of them in a row the fit stops (:class:`NonFiniteError`).
:func:`guarded_optimizer_step` is that decision as the GRPO and the loss-based modules share it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

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


def guarded_optimizer_step(module: Any, optimizer: Any, loss: torch.Tensor, max_grad_norm: float) -> bool:
    """The end of a manual-optimization step shared by the training modules: after ``manual_backward(loss)``,
    decide (on every process alike) whether the loss and gradients are finite; if so clip to ``max_grad_norm``
    (0: no clipping) through ``module.clip_gradients``; if not, drop the gradients so that ``step()`` leaves the
    parameters and AdamW state as they are, and stop the fit once ``module.nonfinite`` is exhausted. The
    optimizer steps either way, so the step counts towards ``max_steps`` and batch schedules stay aligned.

    Args:
        module: The LightningModule (its ``model``, ``trainer``, ``nonfinite`` counter, ``clip_gradients``).
        optimizer: Its (Lightning-wrapped) optimizer.
        loss: The loss just back-propagated.
        max_grad_norm: Gradient-norm clip (0 disables).

    Returns:
        Whether the step was finite (applied).

    Raises:
        NonFiniteError: After ``module.nonfinite.limit`` non-finite steps in a row (having saved
            ``nonfinite_stop.ckpt``: :func:`stop_if_nonfinite_exhausted`).
    """
    finite = all_finite([loss.detach()]) and grads_finite(module.model.parameters())
    finite = bool(module.trainer.strategy.reduce_boolean_decision(finite, all=True))
    module.nonfinite.update(finite)
    if finite:
        if max_grad_norm > 0:
            module.clip_gradients(optimizer, gradient_clip_val=max_grad_norm, gradient_clip_algorithm="norm")
    else:
        stop_if_nonfinite_exhausted(module)
        optimizer.zero_grad(set_to_none=True)  # no gradient: step() leaves parameters and AdamW state as they are
    optimizer.step()
    return finite


def stop_if_nonfinite_exhausted(module: Any) -> None:
    """After ``max_consecutive_nonfinite`` skipped steps in a row: save the last good state as
    ``nonfinite_stop.ckpt`` (checkpoint directory, else the root dir) and raise :class:`NonFiniteError`."""
    if not module.nonfinite.exhausted:
        return
    trainer = module.trainer
    cb = trainer.checkpoint_callback
    directory = (cb.dirpath if cb is not None and cb.dirpath else None) or trainer.default_root_dir
    path = os.path.join(directory, "nonfinite_stop.ckpt")
    message = module.nonfinite.stop_message(path, module.global_step)
    module.nonfinite.consecutive = 0  # saved so: a run resumed from it starts afresh
    trainer.save_checkpoint(path)  # parameters are those of the last finite step
    raise NonFiniteError(message)
