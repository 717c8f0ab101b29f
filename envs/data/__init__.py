"""Scene sources: the trajdata adapter, the scene cache, and the bundled "towns" dataset.

>>> from envs.data import open_dataset
>>> val = open_dataset("towns", "val")      # first call builds the cache through trajdata
>>> scene = val[0]                          # a Scene with its MapData attached
"""

from envs.data.scene_cache import SceneDataset, known_datasets, open_dataset, trafficgym_home

__all__ = ["SceneDataset", "known_datasets", "open_dataset", "trafficgym_home"]
