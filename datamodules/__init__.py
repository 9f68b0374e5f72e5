"""LightningDataModules and data sources: the embedded fictitious world (and, later, TOFU, MUSE, RWKU)."""

from datamodules.world import WorldConfig, generate_world

__all__ = ["WorldConfig", "generate_world"]
