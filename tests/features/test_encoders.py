"""The encoder registry: every entry's architecture, names, weights files, the Hub path offline,
random init, preprocessing and the errors that tell users what to do."""

from __future__ import annotations

import pytest
import torch

from bidistill.features import encoders
from bidistill.features.encoders import (
    EncoderError,
    Preprocess,
    encoder_spec,
    list_encoders,
    load_encoder,
    weights_digest,
)
from bidistill.features.spec import IMAGENET_MEAN, IMAGENET_STD


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """The Hugging Face Hub as an offline machine sees it: only what is in the local cache."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


@pytest.mark.parametrize("spec", list_encoders(), ids=lambda s: s.name)
def test_every_registered_architecture_gives_its_stated_dimension(spec):
    # Built on the meta device: the real architecture and forward pass, no memory, no download.
    with torch.device("meta"):
        model = encoders.build_architecture(spec)
        out = model(torch.zeros(2, 3, spec.preprocess.size, spec.preprocess.size))
    assert tuple(out.shape) == (2, spec.dim)
    assert spec.mpp == 0.5 and spec.licence and spec.hub.startswith(("hf-hub:", "timm:"))


def test_unknown_names_suggest_the_closest_and_list_the_registry():
    with pytest.raises(EncoderError, match=r"unknown encoder 'uni3'\. Did you mean 'uni'"):
        encoder_spec("uni3")
    with pytest.raises(EncoderError, match="Registered: resnet50-trunc, vgg16-bn, uni"):
        encoder_spec("resnet")
    with pytest.raises(EncoderError, match="Unknown model"):
        load_encoder("timm:no_such_model_xyz", random_init=True)
    assert encoder_spec("UNI").name == "uni"  # registry names are case-insensitive


def test_random_init_is_seeded_and_says_so():
    a = load_encoder("timm:test_vit", random_init=True)
    b = load_encoder("timm:test_vit", random_init=True)
    assert a.random_init and "NOT pretrained" in a.source
    assert a.weights_sha256 == b.weights_sha256 and len(a.weights_sha256) == 16
    assert a.dim == 64 and a.preprocess.size == 160


def _save_trained_weights(arch: str, seed: int, path, **kwargs) -> torch.nn.Module:
    import timm

    torch.manual_seed(seed)
    model = timm.create_model(arch, pretrained=False, **kwargs).eval()
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(model.state_dict(), str(path))
    else:  # a training checkpoint: wrapped, with DataParallel's prefix
        torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, path)
    return model


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_a_local_weights_file_loads_through_the_registry(tmp_path, suffix):
    path = tmp_path / f"weights{suffix}"
    saved = _save_trained_weights("test_resnet", 7, path, num_classes=0)
    encoder = load_encoder("timm:test_resnet", checkpoint=path)
    assert encoder.weights_sha256 == weights_digest(saved)
    assert (
        encoder.weights_sha256 != load_encoder("timm:test_resnet", random_init=True).weights_sha256
    )
    assert str(path.resolve()) in encoder.source and not encoder.random_init
    x = torch.rand(3, 3, 64, 64)
    with torch.inference_mode():
        torch.testing.assert_close(encoder.model(x), saved(x))


def test_resnet50_trunc_loads_a_full_resnet50_file_and_cuts_it_at_layer3(tmp_path):
    path = tmp_path / "resnet50.safetensors"
    full = _save_trained_weights("resnet50", 3, path)  # an ImageNet-style file, with fc
    encoder = load_encoder("resnet50-trunc", checkpoint=path)
    assert encoder.dim == 1024
    x = torch.rand(2, 3, 96, 96)
    with torch.inference_mode():
        expected = full.layer3(
            full.layer2(full.layer1(full.maxpool(full.act1(full.bn1(full.conv1(x))))))
        )
        torch.testing.assert_close(encoder.model(x), expected.mean(dim=(-2, -1)))


def test_a_weights_file_of_another_model_is_refused(tmp_path):
    path = tmp_path / "other.safetensors"
    _save_trained_weights("test_vit", 0, path, num_classes=0)
    with pytest.raises(EncoderError, match=r"other\.safetensors: the weights do not fit encoder"):
        load_encoder("timm:test_resnet", checkpoint=path)
    with pytest.raises(EncoderError, match="checkpoint file not found"):
        load_encoder("timm:test_resnet", checkpoint=tmp_path / "gone.pth")


def _hub_snapshot(cache, repo: str, model: torch.nn.Module) -> None:
    """A model in the Hub cache layout, as `hf download` leaves it on an offline machine."""
    from timm.models import save_for_hf

    folder = cache / f"models--{repo.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    save_for_hf(model, str(folder / "snapshots" / commit), safe_serialization=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(commit)


def test_hf_hub_names_load_from_the_cache_offline(offline_hub, tmp_path):
    import timm

    torch.manual_seed(5)
    model = timm.create_model("test_vit", pretrained=False, num_classes=0).eval()
    _hub_snapshot(offline_hub, "lab/tiny-path-vit", model)
    encoder = load_encoder("hf-hub:lab/tiny-path-vit")
    assert encoder.weights_sha256 == weights_digest(model)
    assert encoder.source == "hf-hub:lab/tiny-path-vit" and encoder.dim == 64
    # A local folder (a download copied to an offline site) loads the same weights.
    from timm.models import save_for_hf

    save_for_hf(model, str(tmp_path / "folder"), safe_serialization=True)
    assert load_encoder(str(tmp_path / "folder")).weights_sha256 == weights_digest(model)
    with pytest.raises(EncoderError, match="not a model folder"):
        load_encoder(str(tmp_path))


def test_weights_that_cannot_be_downloaded_say_what_to_do(offline_hub):
    with pytest.raises(EncoderError) as err:
        load_encoder("uni")
    message = str(err.value)
    assert "encoder 'uni': its weights (MahmoodLab/uni) are not in the local" in message
    assert "HF_HUB_OFFLINE is set" in message
    assert "`features.checkpoint`" in message and "`features.random_init: true`" in message


def test_a_gated_repository_tells_the_user_to_accept_the_licence_and_set_a_token():
    from huggingface_hub.errors import GatedRepoError

    gated = GatedRepoError.__new__(GatedRepoError)  # as the Hub client raises it (HTTP 401)
    Exception.__init__(gated, "Access to model MahmoodLab/UNI2-h is restricted")
    message = str(encoders._hub_error(encoder_spec("uni2-h"), gated))
    assert "are gated" in message and "https://huggingface.co/MahmoodLab/UNI2-h" in message
    assert "HF_TOKEN" in message and "accept the licence" in message.lower()


def test_preprocess_resizes_crops_and_normalises_like_the_published_transforms():
    grey = torch.full((2, 256, 256, 3), 128, dtype=torch.uint8).permute(0, 3, 1, 2)
    out = Preprocess(224, resize=256, interpolation="bicubic")(grey)
    assert out.shape == (2, 3, 224, 224)
    expected = (128 / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(out[0, :, 100, 100], expected)
    ramp = torch.arange(256, dtype=torch.uint8).repeat(256, 1)[None, None].expand(1, 3, 256, 256)
    crop = Preprocess(128, resize=256, mean=(0, 0, 0), std=(1, 1, 1))(ramp)
    assert abs(float(crop[0, 0, 0, 0]) * 255 - 64) < 1e-3  # the centre crop starts at column 64
    assert Preprocess(224).describe() == "224" and Preprocess(224, resize=256).describe() == (
        "256→224"
    )
