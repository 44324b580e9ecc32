"""End-to-end mode: a trainable patch encoder in front of a MIL aggregator. Every aggregator a
method builds gets its own encoder (``EncodedAggregator``), so BD has one backbone per branch as
the BD paper had, and every baseline works unchanged. Nothing here reads files: the training
stage builds the backbone (``training.backbone``) and hands over a factory."""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint, checkpoint_sequential

from bidistill.models.aggregators import Aggregate

log = logging.getLogger(__name__)

FREEZE_ALL = "all"


class PatchEncoderError(ValueError):
    """A setting the backbone cannot honour (e.g. an unknown ``freeze_until`` block)."""


class _CheckpointedSequential(nn.Sequential):
    """An ``nn.Sequential`` that recomputes its activations in the backward pass (training
    only); same children, so the same state-dict keys as the module it replaces."""

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and torch.is_grad_enabled()):
            return super().forward(x)
        segments = max(1, int(math.sqrt(len(self))))
        return checkpoint_sequential(self, segments, x, use_reentrant=False)


class PatchEncoder(nn.Module):
    """uint8 tiles ``[n, 3, H, W]`` → features ``[n, D]``: preprocessing, then the backbone.

    ``preprocess`` resizes and normalises on the tiles' device, as the encoder's authors do;
    ``freeze_until`` freezes the backbone up to and including a named module (or ``"all"``),
    its batch-norm layers kept in eval mode; with ``checkpointing`` batch-norm statistics are
    updated twice per step (as with timm's own): a momentum of m acts like 2m.
    """

    def __init__(
        self,
        backbone: nn.Module,
        preprocess: Callable[[Tensor], Tensor],
        dim: int,
        *,
        freeze_until: str | None = None,
        checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.preprocess = preprocess
        self.dim = dim
        self.frozen = freeze_parameters(backbone, freeze_until) if freeze_until else []
        self._whole_checkpoint = checkpointing and not _enable_checkpointing(backbone)
        self.channels_last = True

    def forward(self, tiles: Tensor) -> Tensor:
        x = self.preprocess(tiles)
        if self.channels_last and x.device.type in ("cuda", "cpu"):
            x = x.contiguous(memory_format=torch.channels_last)
        if self._whole_checkpoint and self.training and torch.is_grad_enabled():
            # Recompute needs an input that requires grad to produce gradients for the weights.
            return checkpoint(self.backbone, x.requires_grad_(), use_reentrant=False)
        return self.backbone(x)

    def train(self, mode: bool = True) -> PatchEncoder:
        super().train(mode)
        if mode and self.frozen:
            for module in self.backbone.modules():
                params = list(module.parameters(recurse=False))
                if params and not any(p.requires_grad for p in params):
                    module.eval()  # a frozen batch-norm keeps its running statistics
        return self


def freeze_parameters(backbone: nn.Module, until: str) -> list[str]:
    """Freeze every parameter registered before the end of module ``until`` (or all of them);
    the frozen parameters' names."""
    names = [name for name, _ in backbone.named_parameters()]
    if until == FREEZE_ALL:
        last = len(names) - 1
    else:
        inside = [i for i, n in enumerate(names) if n.startswith(f"{until}.")]
        if not inside:
            raise PatchEncoderError(
                f"freeze_until '{until}': the encoder has no block of that name with "
                f"parameters; its blocks: {', '.join(block_names(backbone))} (or 'all')"
            )
        last = max(inside)
    frozen = names[: last + 1]
    for name, param in backbone.named_parameters():
        if name in frozen:
            param.requires_grad_(False)
    return frozen


def block_names(backbone: nn.Module, depth: int = 2) -> list[str]:
    """Named modules with parameters down to ``depth`` levels (what ``freeze_until`` takes)."""
    found = []
    for name, module in backbone.named_modules():
        if name and name.count(".") < depth and any(True for _ in module.parameters()):
            found.append(name)
    return found


def _enable_checkpointing(backbone: nn.Module) -> bool:
    """Turn on the backbone's own gradient checkpointing (timm's), or checkpoint its body in
    segments when that is an ``nn.Sequential`` (VGG's convolutions); False when neither."""
    for module in backbone.modules():
        setter = getattr(module, "set_grad_checkpointing", None)
        if callable(setter):
            try:
                setter(True)
            except (AssertionError, NotImplementedError, RuntimeError):
                continue
            return True
    for parent in backbone.modules():
        for name, child in parent.named_children():
            if type(child) is nn.Sequential and len(child) > 2:
                setattr(parent, name, _CheckpointedSequential(*child))
                return True
    return False


class EncodedAggregator(nn.Module):
    """A patch encoder, then a MIL aggregator: tiles in, one ``Aggregate`` out. Only the valid
    tiles are encoded, so padding never changes the result."""

    def __init__(self, encoder: PatchEncoder, aggregator: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.aggregator = aggregator
        self.out_dim = aggregator.out_dim
        self._remember = False  # see ``remember_encodings``
        self._last: tuple[Tensor, Tensor] | None = None

    def forward(self, bags: Tensor, tile_valid: Tensor) -> Aggregate:
        """bags: uint8 [B, N, 3, H, W]; tile_valid: bool [B, N]."""
        if bags.dim() != 5:
            raise ValueError(
                f"an end-to-end method takes tiles [B, N, 3, H, W], got {tuple(bags.shape)}"
            )
        if self._last is not None and self._last[0] is bags:
            return self.aggregator(self._last[1], tile_valid)
        features = torch.zeros(
            *tile_valid.shape, self.encoder.dim, device=bags.device, dtype=torch.float32
        )
        if tile_valid.any():
            encoded = self.encoder(bags[tile_valid])
            features = features.index_put((tile_valid,), encoded.to(features.dtype))
        if self._remember:
            self._last = (bags, features)
        return self.aggregator(features, tile_valid)


@contextlib.contextmanager
def remember_encodings(method: nn.Module) -> Iterator[None]:
    """Prediction: a batch of tiles passed again (with its clinical data withheld) reuses its
    encoded tiles instead of running the backbone twice. Use under ``no_grad`` only."""
    modules = list(encoded_aggregators(method).values())
    for module in modules:
        module._remember = True
    try:
        yield
    finally:
        for module in modules:
            module._remember, module._last = False, None


def encoded_aggregators(method: nn.Module) -> dict[str, EncodedAggregator]:
    """The method's encoder + aggregator pairs by module path (``aggregator_multi``,
    ``model.aggregator``, ...), in registration order."""
    return {n: m for n, m in method.named_modules() if isinstance(m, EncodedAggregator)}


def patch_encoder_parameters(method: nn.Module) -> set[int]:
    """ids of the parameters inside the method's patch encoders (for parameter groups)."""
    return {id(p) for m in method.modules() if isinstance(m, PatchEncoder) for p in m.parameters()}
