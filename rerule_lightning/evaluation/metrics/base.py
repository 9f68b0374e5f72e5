"""Shared machinery of the metric classes: float64 states that survive device moves, and mean metrics."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat


class Float64Metric(Metric):
    """A ``Metric`` whose states are float64 and whose ``dtype`` stays float64 after ``.to(device)``.

    torchmetrics creates an empty ``self.dtype`` tensor for a ``"cat"`` state on a rank that saw no data;
    ``Metric._apply`` would otherwise reset ``dtype`` to float32 on a device move, and a float32 empty state
    all-gathered next to float64 ones from other ranks corrupts the gather. ``set_dtype`` still works.
    """

    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._state_dtype = torch.float64
        self._dtype = torch.float64

    def set_dtype(self, dst_type: str | torch.dtype) -> Metric:
        """Convert all states to ``dst_type`` (see ``Metric.set_dtype``) and keep it as the state dtype."""
        out = super().set_dtype(dst_type)
        self._state_dtype = self._dtype
        return out

    def _apply(self, fn: Callable, exclude_state: Sequence[str] = "") -> torch.nn.Module:
        this = super()._apply(fn, exclude_state)
        if hasattr(this, "_state_dtype"):
            this._dtype = this._state_dtype
        return this

    def _values(self, values: Sequence[float] | Tensor) -> Tensor:
        """``values`` as a flat state-dtype tensor on this metric's device, ``[N]``."""
        return torch.as_tensor(values, dtype=self._state_dtype, device=self.device).detach().reshape(-1)

    def _cat(self, state: Tensor | list[Tensor]) -> Tensor:
        """A ``"cat"`` state as one ``[N]`` tensor (empty when nothing was added)."""
        if isinstance(state, list):
            if not state:
                return torch.zeros(0, dtype=self._state_dtype, device=self.device)
            return dim_zero_cat(state).reshape(-1)
        return state.reshape(-1)

    def _synced_cat(self, name: str) -> Tensor:
        """The global (all-rank) contents of ``"cat"`` state ``name``; local when not distributed."""
        if self._is_synced:
            return self._cat(getattr(self, name)).clone()
        with self.sync_context(dist_sync_fn=self.dist_sync_fn, should_sync=self._to_sync):
            return self._cat(getattr(self, name)).clone()


class MeanOfItems(Float64Metric):
    """Mean of per-item values, with ``"sum"`` states (``total``, ``count``); items that are ``nan`` are
    skipped. ``compute`` gives ``nan`` before any item was added."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def _add(self, values: Sequence[float] | Tensor) -> None:
        v = self._values(values)  # [N]
        v = v[~torch.isnan(v)]  # [N']
        self.total += v.sum()
        self.count += v.numel()

    def compute(self) -> Tensor:
        """Mean over all items seen (on all ranks)."""
        if self.count == 0:
            return torch.tensor(math.nan, dtype=self.total.dtype, device=self.total.device)
        return self.total / self.count


__all__ = ["Float64Metric", "MeanOfItems"]
