"""The episodic data layer: image stores, readers, samplers and frozen evaluation episodes."""

from metarobust.data.episode import Episode, EpisodeBatch
from metarobust.data.sampler import BatchSampler, EpisodicSampler
from metarobust.data.store import ImageStore, StoreDataset

__all__ = ["BatchSampler", "Episode", "EpisodeBatch", "EpisodicSampler", "ImageStore", "StoreDataset"]
