"""The backbone of end-to-end mode, from the encoder registry: built once, copied per aggregator.

A ``BackboneSpec`` records the starting weights and how they train in the run's metadata, so a
trained run rebuilds the architecture offline before loading its fine-tuned weights.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

from torch import nn

from bidistill.config import ExperimentConfig
from bidistill.errors import ConfigError
from bidistill.features.spec import Preprocess
from bidistill.models.patch_encoder import PatchEncoder, PatchEncoderError


@dataclass(frozen=True)
class BackboneSpec:
    """What a run's patch encoders are (saved in ``model.json`` under ``end_to_end.backbone``)."""

    encoder: str  # the registry name, as the config spelt it
    dim: int
    preprocess: dict[str, Any]  # features.spec.Preprocess's fields
    weights_sha256: str  # of the starting weights (pretrained, a checkpoint, or random)
    source: str  # where the starting weights came from
    random_init: bool
    freeze_until: str | None = None
    checkpointing: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BackboneSpec:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})

    def make_preprocess(self) -> Preprocess:
        p = self.preprocess  # JSON gives lists where Preprocess holds tuples
        return Preprocess(**{**p, "mean": tuple(p["mean"]), "std": tuple(p["std"])})


def load_backbone(config: ExperimentConfig) -> tuple[nn.Module, BackboneSpec]:
    """The configured encoder with its starting weights, and its spec."""
    from bidistill.features.extract import load_config_encoder

    encoder = load_config_encoder(config.features)
    e2e = config.training.end_to_end
    preprocess = encoder.preprocess
    if e2e.input_size is not None:  # tiles resized to this side, no crop
        preprocess = replace(preprocess, size=e2e.input_size, resize=None)
    spec = BackboneSpec(
        encoder=encoder.name,
        dim=encoder.dim,
        preprocess=asdict(preprocess),
        weights_sha256=encoder.weights_sha256,
        source=encoder.source,
        random_init=encoder.random_init,
        freeze_until=e2e.freeze_until,
        checkpointing=e2e.checkpointing,
    )
    model = encoder.model.train().requires_grad_(True)  # the registry hands it over frozen
    return model, spec


def patch_encoder_factory(
    model: nn.Module, spec: BackboneSpec, *, training: bool = True
) -> Callable[[], PatchEncoder]:
    """Each call gives a ``PatchEncoder`` holding its own copy of ``model`` (one per aggregator;
    ``ConfigError`` when ``freeze_until`` names no block of the encoder)."""
    preprocess = spec.make_preprocess()

    def make() -> PatchEncoder:
        try:
            return PatchEncoder(
                copy.deepcopy(model),
                preprocess,
                spec.dim,
                freeze_until=spec.freeze_until if training else None,
                checkpointing=spec.checkpointing and training,
            )
        except PatchEncoderError as err:
            raise ConfigError(f"training.end_to_end.{err}") from None

    return make


def architecture_factory(spec: BackboneSpec) -> Callable[[], PatchEncoder]:
    """Patch encoders of the run's architecture with untrained weights, for loading a trained
    run (its fine-tuned weights come from ``model.safetensors``; nothing is downloaded for
    registry and ``timm:`` names)."""
    from bidistill.features.encoders import build_architecture, encoder_spec

    model = build_architecture(encoder_spec(spec.encoder))
    return patch_encoder_factory(model, spec, training=False)
