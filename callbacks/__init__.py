"""Lightning callbacks of rerule-lightning: the ReRULE replay callback and its ablations.

``from callbacks import HardCaseReplayCallback`` (or ``class_path: callbacks.HardCaseReplayCallback`` in YAML).
"""

from callbacks.replay import HardCaseReplayCallback, RandomReplayCallback

__all__ = ["HardCaseReplayCallback", "RandomReplayCallback"]
