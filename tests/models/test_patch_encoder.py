"""End-to-end mode in models/: every method with trainable patch encoders in front of its
aggregators (a tiny real CNN, uint8 tiles), freezing, checkpointing, padding."""

import pytest
import torch
from torch import nn

from bidistill.models import Batch, create_method, list_methods
from bidistill.models.patch_encoder import (
    EncodedAggregator,
    PatchEncoder,
    PatchEncoderError,
    encoded_aggregators,
    freeze_parameters,
)

from .helpers import CLINICAL_DIM, FEATURE_SLICES, N_FEATURES

TILE, DIM = 12, 7


def tiny_cnn(batch_norm: bool = False) -> nn.Module:
    layers = [nn.Conv2d(3, 5, 3, padding=1)]
    layers += [nn.BatchNorm2d(5)] if batch_norm else []
    layers += [nn.ReLU(), nn.Conv2d(5, DIM, 3, stride=2), nn.ReLU()]
    return nn.Sequential(nn.Sequential(*layers), nn.AdaptiveAvgPool2d(1), nn.Flatten())


def scale(pixels: torch.Tensor) -> torch.Tensor:
    return pixels.float() / 255.0


def encoder_factory(**kwargs):
    return lambda: PatchEncoder(tiny_cnn(), scale, DIM, **kwargs)


def build_e2e(name: str, **options):
    torch.manual_seed(0)
    return create_method(
        name,
        in_dim=DIM,
        clinical_dim=CLINICAL_DIM,
        n_clinical_features=N_FEATURES,
        feature_slices=FEATURE_SLICES,
        patch_encoder=encoder_factory(),
        **options,
    )


def tile_batch(b: int = 3, n: int = 5, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    tiles = torch.randint(0, 256, (b, n, 3, TILE, TILE), generator=g, dtype=torch.uint8)
    valid = torch.arange(n)[None] < torch.tensor([n, 2, 4])[:b, None]
    present = torch.tensor([True, False, True])[:b]
    clinical = torch.randn(b, CLINICAL_DIM, generator=g)
    clinical_valid = torch.ones(b, N_FEATURES, dtype=torch.bool) & present[:, None]
    return Batch(tiles, valid, clinical, clinical_valid, present, torch.tensor([1, 0, 1])[:b])


@pytest.mark.parametrize("name", list_methods())
def test_every_method_trains_its_encoders_end_to_end(name):
    method = build_e2e(name).train()
    batch = tile_batch()
    encoders = encoded_aggregators(method)
    if name.startswith("clinical"):
        assert not encoders  # no slides, no encoder
    for stage in method.stages():
        method.set_stage(stage.name)
        method.zero_grad(set_to_none=True)
        out = method(batch)
        terms = method.loss(batch, out)
        assert torch.isfinite(out.logits).all() and torch.isfinite(terms["total"])
        terms["total"].backward()
    # Each aggregator has its own encoder, and training reached its first convolution.
    firsts = [m.encoder.backbone[0][0].weight for m in encoders.values()]
    assert len({id(w) for w in firsts}) == len(firsts)
    assert any(w.grad is not None and w.grad.abs().sum() > 0 for w in firsts) or not firsts


def test_bd_has_one_backbone_per_branch():
    method = build_e2e("bd")
    assert set(encoded_aggregators(method)) == {"aggregator_multi", "aggregator_single"}


def test_padding_changes_nothing():
    method = build_e2e("wsi-only").eval()
    batch = tile_batch()
    noisy = batch.bags.clone()
    noisy[~batch.tile_valid] = 200  # garbage in the padded slots
    padded = Batch(
        noisy,
        *[
            getattr(batch, f)
            for f in ("tile_valid", "clinical", "clinical_valid", "clinical_present", "labels")
        ],
    )
    with torch.no_grad():
        assert torch.allclose(method(batch).logits, method(padded).logits, atol=1e-6)


def test_features_instead_of_tiles_are_refused():
    method = build_e2e("wsi-only")
    with pytest.raises(ValueError, match=r"takes tiles \[B, N, 3, H, W\]"):
        method.model.aggregator(torch.zeros(2, 4, DIM), torch.ones(2, 4, dtype=torch.bool))


def test_freeze_until_a_block_freezes_it_and_what_comes_before():
    encoder = PatchEncoder(tiny_cnn(batch_norm=True), scale, DIM, freeze_until="0.1")
    frozen = {n for n, p in encoder.backbone.named_parameters() if not p.requires_grad}
    assert frozen == {"0.0.weight", "0.0.bias", "0.1.weight", "0.1.bias"}
    encoder.train()
    assert not encoder.backbone[0][1].training  # a frozen batch norm keeps its statistics
    assert encoder.backbone[0][3].training


def test_freeze_until_an_unknown_block_lists_the_blocks():
    with pytest.raises(PatchEncoderError, match=r"no block of that name.*0\.0, 0\.2"):
        freeze_parameters(tiny_cnn(), "layer9")


def test_checkpointing_gives_the_same_gradients():
    torch.manual_seed(1)
    plain = PatchEncoder(tiny_cnn(), scale, DIM)
    checkpointed = PatchEncoder(tiny_cnn(), scale, DIM, checkpointing=True)
    checkpointed.load_state_dict(plain.state_dict())  # same keys with checkpointing on
    tiles = torch.randint(0, 256, (4, 3, TILE, TILE), dtype=torch.uint8)
    for encoder in (plain, checkpointed):
        encoder.train()
        encoder(tiles).sum().backward()
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-6), name


def test_encoded_aggregator_reports_the_aggregator_size():
    method = build_e2e("wsi-only", hidden_dim=24, aggregator="abmil-count")
    module = method.model.aggregator
    assert isinstance(module, EncodedAggregator) and module.out_dim == 24 + 1  # and the count


def test_mixed_precision_trains_in_bfloat16_and_returns_float32_features():
    method = build_e2e("bd").train()
    batch = tile_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = method(batch)
        terms = method.loss(batch, out)
    terms["total"].float().backward()
    assert torch.isfinite(terms["total"].float())
    weight = method.aggregator_multi.encoder.backbone[0][0].weight
    assert weight.dtype == torch.float32 and weight.grad is not None
