"""Structural compression passes: pruning (unstructured, N:M, structured channels), low-rank factorisation,
weight clustering."""

from .cluster import ClusterConfig, ClusterPass, cluster_config
from .lowrank import LowRankConfig, LowRankPass, lowrank_config
from .unstructured import PruneConfig, PrunePass, prune_config

__all__ = [
    "ClusterConfig",
    "ClusterPass",
    "LowRankConfig",
    "LowRankPass",
    "PruneConfig",
    "PrunePass",
    "cluster_config",
    "lowrank_config",
    "prune_config",
]
