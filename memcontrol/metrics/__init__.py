"""Memorization and quality metrics. Never imports training code: metrics judge models, whoever trained them."""

from .embedders import Embedder, build_embedder, cached_embed
from .memorization import copy_detection, distance_ratio, extraction, tiled_l2
from .nn_search import nearest_neighbours
from .noise_norm import noise_norm
from .quality import distance_name, frechet_distance, kid, quality_report

__all__ = ["Embedder", "build_embedder", "cached_embed", "copy_detection", "distance_ratio", "extraction",
           "distance_name", "frechet_distance", "kid", "nearest_neighbours", "noise_norm",
           "quality_report", "tiled_l2"]
