"""The registered patch encoders, as their authors publish them: Hub weights, the timm
architecture and keyword arguments that rebuild the model offline (the Hub config's
``model_args`` and the model card's extras), and the preprocessing of its model card.
"""

from __future__ import annotations

import torch
from torch import nn

from bidistill.features.spec import EncoderSpec, Preprocess

HOPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)
HOPTIMUS_STD = (0.211883, 0.230117, 0.177517)


class _Pooled(nn.Module):
    """Feature maps → global average pool → [B, C] (truncated CNNs)."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).mean(dim=(-2, -1))


class _ClassAndMeanPatchTokens(nn.Module):
    """A ViT's class token beside the mean of its patch tokens (registers left out): Virchow2's
    embedding as its model card defines it, [B, 2 x width]."""

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        self.vit = vit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.vit.forward_features(x)  # [B, 1 + registers + patches, width]
        patches = tokens[:, self.vit.num_prefix_tokens :]
        return torch.cat([tokens[:, 0], patches.mean(dim=1)], dim=-1)


class _HFClassToken(nn.Module):
    """A transformers vision model's class token, ``last_hidden_state[:, 0]`` (Phikon-v2)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).last_hidden_state[:, 0]


def _truncate_resnet50(model: nn.Module) -> nn.Module:
    # CLAM's resnet50_trunc: ImageNet ResNet-50 up to layer 3 (1024 channels), average-pooled.
    model.layer4 = nn.Identity()
    model.reset_classifier(0)
    return model


def _vgg_features(model: nn.Module) -> nn.Module:
    # The convolutional part only (512 channels), pooled: what the BCNB/BD papers' MIL consumes.
    return _Pooled(model.features)


def builtin_encoders() -> list[EncoderSpec]:
    """The built-in entries, in the order `bidistill encoders` lists them."""
    vit = {"img_size": 224, "init_values": 1e-5, "num_classes": 0}  # every ViT entry's
    optimus = {**vit, "dynamic_img_size": False}
    return [
        EncoderSpec(
            name="resnet50-trunc",
            summary="ImageNet ResNet-50 to layer 3, pooled (CLAM's baseline)",
            dim=1024,
            licence="BSD-3-Clause",
            gated=False,
            hub="timm:resnet50.tv_in1k",
            arch="resnet50",
            wrap=_truncate_resnet50,
        ),
        EncoderSpec(
            name="vgg16-bn",
            summary="ImageNet VGG16-BN convolutions, pooled (the BCNB and BD papers' backbone)",
            dim=512,
            licence="BSD-3-Clause",
            gated=False,
            hub="timm:vgg16_bn.tv_in1k",
            arch="vgg16_bn",
            wrap=_vgg_features,
        ),
        EncoderSpec(
            name="uni",
            summary="UNI ViT-L/16 (Mahmood Lab, 100k WSIs)",
            dim=1024,
            licence="CC-BY-NC-ND-4.0",
            hub="hf-hub:MahmoodLab/uni",
            arch="vit_large_patch16_224",
            kwargs={**vit, "patch_size": 16, "dynamic_img_size": True},
        ),
        EncoderSpec(
            name="uni2-h",
            summary="UNI2-h ViT-H/14 with 8 registers (Mahmood Lab, 350k WSIs)",
            dim=1536,
            licence="CC-BY-NC-ND-4.0",
            hub="hf-hub:MahmoodLab/UNI2-h",
            arch="vit_giant_patch14_224",
            kwargs={
                **vit,
                "patch_size": 14,
                "depth": 24,
                "num_heads": 24,
                "embed_dim": 1536,
                "mlp_ratio": 2.66667 * 2,
                "no_embed_class": True,
                "reg_tokens": 8,
                "dynamic_img_size": True,
                "swiglu": True,
            },
        ),
        EncoderSpec(
            name="virchow2",
            summary="Virchow2 ViT-H/14 (Paige): class token + mean of patch tokens",
            dim=2560,
            preprocess=Preprocess(224, interpolation="bicubic"),
            licence="CC-BY-NC-ND-4.0",
            hub="hf-hub:paige-ai/Virchow2",
            arch="vit_huge_patch14_224",
            kwargs={
                **vit,
                "reg_tokens": 4,
                "mlp_ratio": 5.3375,
                "global_pool": "",
                "dynamic_img_size": True,
                "swiglu": True,
            },
            wrap=_ClassAndMeanPatchTokens,
        ),
        *(
            EncoderSpec(
                name=f"h-optimus-{version}",
                summary=f"H-optimus-{version} ViT-g/14 with 4 registers (Bioptimus)",
                dim=1536,
                preprocess=Preprocess(224, mean=HOPTIMUS_MEAN, std=HOPTIMUS_STD),
                licence=licence,
                hub=f"hf-hub:bioptimus/H-optimus-{version}",
                arch="vit_giant_patch14_reg4_dinov2",
                kwargs=optimus,
            )
            for version, licence in (("0", "Apache-2.0"), ("1", "Bioptimus, non-commercial"))
        ),
        EncoderSpec(
            name="prov-gigapath",
            summary="Prov-GigaPath tile encoder ViT-g (Providence / Microsoft)",
            dim=1536,
            preprocess=Preprocess(224, resize=256, interpolation="bicubic"),
            licence="Apache-2.0",
            hub="hf-hub:prov-gigapath/prov-gigapath",
            arch="vit_giant_patch14_dinov2",
            kwargs={
                **vit,
                "in_chans": 3,
                "patch_size": 16,
                "embed_dim": 1536,
                "depth": 40,
                "num_heads": 24,
                "mlp_ratio": 5.33334,
                "global_pool": "token",
            },
        ),
        EncoderSpec(
            name="phikon-v2",
            summary="Phikon-v2 ViT-L/16 DINOv2 (Owkin): class token; needs `transformers`",
            dim=1024,
            licence="Owkin non-commercial",
            gated=False,
            hub="hf-hub:owkin/phikon-v2",
            arch="dinov2",
            kwargs={
                "hidden_size": 1024,
                "num_hidden_layers": 24,
                "num_attention_heads": 16,
                "patch_size": 16,
                "image_size": 224,
                "layerscale_value": 1e-5,
            },
            wrap=_HFClassToken,
            kind="transformers",
        ),
    ]
