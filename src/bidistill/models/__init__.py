"""Models: MIL aggregators, the clinical encoder, BD and the baselines, the method registry.

Tensors in, logits out: nothing here reads or writes files.
"""

from bidistill.models.aggregators import (
    Aggregate,
    GatedAttentionMIL,
    MeanPoolMIL,
    TransMIL,
    make_aggregator,
    masked_softmax,
)
from bidistill.models.base import Method, MethodDims, MethodOptions, Stage, distillation_kl
from bidistill.models.batch import Batch, Output
from bidistill.models.blocks import ClinicalMLP, FusionHead
from bidistill.models.registry import create_method, get_method_class, list_methods, register_method

__all__ = [
    "Aggregate",
    "Batch",
    "ClinicalMLP",
    "FusionHead",
    "GatedAttentionMIL",
    "MeanPoolMIL",
    "Method",
    "MethodDims",
    "MethodOptions",
    "Output",
    "Stage",
    "TransMIL",
    "create_method",
    "distillation_kl",
    "get_method_class",
    "list_methods",
    "make_aggregator",
    "masked_softmax",
    "register_method",
]
