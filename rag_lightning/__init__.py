"""Retrieval-Augmented Generation (Lewis et al., 2020) with PyTorch Lightning and Hydra."""

__version__ = "0.1.0"
