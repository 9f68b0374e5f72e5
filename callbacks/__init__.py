"""Lightning callbacks of rerule-lightning: the ReRULE replay callback and its ablations.

``from callbacks import HardCaseReplayCallback`` (or ``class_path: callbacks.HardCaseReplayCallback`` in YAML).
The buffer's decisions (hardness, priority, eviction, counts) are plain Python in :mod:`callbacks.buffer`.
"""

from callbacks.prompt_replay import PromptReplayCallback
from callbacks.replay import HardCaseReplayCallback, RandomReplayCallback
from callbacks.replay_base import ReplayCallback

__all__ = ["HardCaseReplayCallback", "PromptReplayCallback", "RandomReplayCallback", "ReplayCallback"]
