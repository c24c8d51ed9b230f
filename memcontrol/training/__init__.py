"""Fine-tuning: the on-disk cache of encoded training data and the inner loop."""

from .cache import CachedData, InMemoryDataset, cache_training_data, dataset_digest, encode_images, encode_prompts
from .loop import TrainConfig, TrainResult, finetune, pipeline_with_unet

__all__ = ["CachedData", "InMemoryDataset", "TrainConfig", "TrainResult", "cache_training_data", "dataset_digest",
           "encode_images", "encode_prompts", "finetune", "pipeline_with_unet"]
