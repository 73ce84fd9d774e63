"""Retrieval-Augmented Generation (Lewis et al., 2020) with PyTorch Lightning and Hydra."""

import logging

from rag_lightning.config import register_configs
from rag_lightning.resolvers import register_resolvers

__version__ = "0.1.0"

register_resolvers()
register_configs()
# faiss logs which CPU build it tried at INFO on every import
logging.getLogger("faiss.loader").setLevel(logging.WARNING)
