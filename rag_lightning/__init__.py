"""Retrieval-Augmented Generation (Lewis et al., 2020) with PyTorch Lightning and Hydra."""

from rag_lightning.resolvers import register_resolvers

__version__ = "0.1.0"

register_resolvers()
