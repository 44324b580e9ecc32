"""What a patch encoder is, as the registry knows it: ``EncoderSpec`` (timm's ``PretrainedCfg``
counterpart) and ``Preprocess``, the authors' preprocessing applied to whole batches on the
extraction device."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocess:
    """How a batch of tiles becomes model input (on the extraction device, batch at once).

    Tiles are square: resize to ``resize`` (default ``size``), centre-crop ``size``, scale to
    [0, 1] and normalise with ``mean``/``std``. Tiles already at the input size are not resized.
    """

    size: int = 224
    resize: int | None = None
    interpolation: Literal["bilinear", "bicubic"] = "bilinear"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 [B, 3, H, W] → float32 [B, 3, size, size]."""
        x = pixels.float().div_(255.0)
        side = self.resize or self.size
        if x.shape[-2:] != (side, side):
            x = nn.functional.interpolate(
                x, size=(side, side), mode=self.interpolation, antialias=True, align_corners=False
            )
            if self.interpolation == "bicubic":
                x = x.clamp_(0.0, 1.0)  # bicubic overshoots; PIL clips to the pixel range too
        if side != self.size:
            top = (side - self.size) // 2
            x = x[..., top : top + self.size, top : top + self.size]
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    def describe(self) -> str:
        """``224`` or ``256→224`` (resize, then centre crop)."""
        resize = f"{self.resize}→" if self.resize and self.resize != self.size else ""
        return f"{resize}{self.size}"


@dataclass(frozen=True)
class EncoderSpec:
    """One registry entry (the defaults are those of most published encoders): ``hub`` where
    pretrained weights come from, ``arch`` and ``kwargs`` the timm model that random init and
    local checkpoints build, ``preprocess`` None for the timm model's own, ``mpp`` None for any,
    ``wrap`` what turns the built model into one that returns [B, D]."""

    name: str
    summary: str
    dim: int | None
    licence: str
    hub: str
    arch: str
    preprocess: Preprocess | None = Preprocess(224)
    mpp: float | None = 0.5
    gated: bool = True
    kwargs: dict[str, Any] = field(default_factory=dict)
    wrap: Callable[[nn.Module], nn.Module] | None = None
    kind: Literal["timm", "transformers"] = "timm"

    @property
    def hub_repo(self) -> str | None:
        return self.hub.split(":", 1)[1] if self.hub.startswith("hf-hub:") else None
