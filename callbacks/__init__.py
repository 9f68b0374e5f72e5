"""Lightning callbacks of rerule-lightning: the ReRULE replay callback and its ablations, the resumable
checkpoints of real runs (``ResumableCheckpoint``) and the MLflow completions table (``CompletionsTable``).

``from callbacks import HardCaseReplayCallback`` (or ``class_path: callbacks.HardCaseReplayCallback`` in YAML).
The buffer's decisions (hardness, priority, eviction, counts) are plain Python in :mod:`callbacks.buffer`.
"""

from callbacks.checkpointing import ResumableCheckpoint
from callbacks.prompt_replay import PromptReplayCallback
from callbacks.replay import HardCaseReplayCallback, RandomReplayCallback
from callbacks.replay_base import ReplayCallback

__all__ = ["HardCaseReplayCallback", "PromptReplayCallback", "RandomReplayCallback", "ReplayCallback",
           "ResumableCheckpoint"]
