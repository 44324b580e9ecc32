"""Patch encoders by name: the registry (entries in ``zoo``, their spec in ``spec``), any timm
model (``timm:<name>``, ``hf-hub:<org>/<repo>``) or a local model folder, built with their
weights from the Hub (cached; ``HF_TOKEN`` for gated models), from ``features.checkpoint`` (fully
offline) or, for tests and demos only, a seeded random initialisation that every feature file
records.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import logging
import os
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from bidistill.errors import BidistillError
from bidistill.features.spec import EncoderSpec, Preprocess
from bidistill.features.zoo import builtin_encoders

log = logging.getLogger(__name__)

RANDOM_INIT_SEED = 0
HUB_PROBE_SECONDS = 2.0  # how long the Hub may take to accept a connection before "offline"
OFFLINE_FIX = (
    "; on a machine without internet, download the weights elsewhere and set "
    "`features.checkpoint` to the weights file, or set `features.random_init: true` to try the "
    "pipeline without pretrained weights (its features carry no knowledge)"
)


class EncoderError(BidistillError, ValueError):
    """An encoder that cannot be found, built or loaded; the message says what to do."""


_REGISTRY: dict[str, EncoderSpec] = {}


def register_encoder(spec: EncoderSpec) -> EncoderSpec:
    if spec.name in _REGISTRY:
        raise ValueError(f"encoder '{spec.name}' registered twice")
    _REGISTRY[spec.name] = spec
    return spec


for _spec in builtin_encoders():
    register_encoder(_spec)


def list_encoders() -> list[EncoderSpec]:
    """The registered encoders, in registration order."""
    return list(_REGISTRY.values())


def encoder_spec(name: str) -> EncoderSpec:
    """The spec for a config's ``features.encoder`` (an unknown name: ``EncoderError`` with the
    closest registry names)."""
    key = name.strip()
    if key.lower() in _REGISTRY:
        return _REGISTRY[key.lower()]
    if key.startswith("timm:"):
        return _generic_spec(name, hub=key, arch=key.removeprefix("timm:"))
    if key.startswith(("hf-hub:", "hf_hub:")):
        repo = key.split(":", 1)[1]
        return _generic_spec(name, hub=f"hf-hub:{repo}", arch=f"hf-hub:{repo}")
    if "/" in key or key.startswith(".") or Path(key).exists():
        return _local_spec(name, Path(key).expanduser())
    hint = difflib.get_close_matches(key.lower(), list(_REGISTRY), n=2, cutoff=0.5)
    did_you_mean = f" Did you mean {' or '.join(repr(h) for h in hint)}?" if hint else ""
    raise EncoderError(
        f"unknown encoder '{name}'.{did_you_mean} Registered: {', '.join(_REGISTRY)}; or use "
        "'timm:<model name>', 'hf-hub:<org>/<repo>' or a local model folder "
        "(`bidistill encoders` lists them with their dimensions)"
    )


def _generic_spec(name: str, *, hub: str, arch: str) -> EncoderSpec:
    return EncoderSpec(
        name=name,
        summary="a timm model, pooled features",
        dim=None,
        preprocess=None,
        mpp=None,
        licence="see the model's card",
        gated=False,
        hub=hub,
        arch=arch,
        kwargs={"num_classes": 0},
    )


def _local_spec(name: str, folder: Path) -> EncoderSpec:
    if not (folder / "config.json").is_file():
        raise EncoderError(
            f"{folder}: not a model folder (expected a timm config.json beside the weights, as "
            "a Hugging Face Hub download has). For a weights file of a registered architecture, "
            "set `features.encoder` to the architecture and `features.checkpoint` to the file"
        )
    where = f"local-dir:{folder.resolve()}"
    return _generic_spec(name, hub=where, arch=where)


@dataclass
class Encoder:
    """A ready patch encoder: ``model(preprocess(uint8 batch))`` → [B, dim]; ``name`` as the
    config spelt it (recorded in every feature file), ``source`` where the weights came from."""

    name: str
    spec: EncoderSpec
    model: nn.Module
    preprocess: Preprocess
    dim: int
    weights_sha256: str
    source: str
    random_init: bool


def load_encoder(
    name: str,
    *,
    checkpoint: str | Path | None = None,
    random_init: bool = False,
) -> Encoder:
    """Build an encoder with its weights, on the CPU, in eval mode; ``checkpoint`` is a local
    weights file (``.safetensors``, ``.bin``, ``.pth``) for the named architecture."""
    spec = encoder_spec(name)
    if checkpoint is not None and random_init:
        raise EncoderError("features.checkpoint and features.random_init exclude each other")
    if random_init:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            base = _with_hub_errors(spec, lambda: _create(spec, pretrained=False))
        source = f"random init (seed {RANDOM_INIT_SEED}): NOT pretrained"
    elif checkpoint is not None:
        base = _with_hub_errors(spec, lambda: _create(spec, pretrained=False))
        load_weights_file(base, Path(checkpoint), spec)
        source = f"checkpoint {Path(checkpoint).resolve()}"
    else:
        base = _with_hub_errors(spec, lambda: _create_pretrained(spec))
        source = spec.hub
    preprocess = spec.preprocess or _timm_preprocess(base)
    model = (spec.wrap(base) if spec.wrap else base).eval().requires_grad_(False)
    dim = _output_dim(model, preprocess)
    if spec.dim is not None and dim != spec.dim:
        raise EncoderError(f"encoder '{name}' gives {dim}-d features, expected {spec.dim}")
    return Encoder(
        name=name,
        spec=spec,
        model=model,
        preprocess=preprocess,
        dim=dim,
        weights_sha256=weights_digest(model),
        source=source,
        random_init=random_init,
    )


def build_architecture(spec: EncoderSpec) -> nn.Module:
    """The entry's model with untrained weights, returning [B, D] (build it under
    ``torch.device("meta")`` to check an architecture without memory or downloads)."""
    base = _create(spec, pretrained=False)
    return spec.wrap(base) if spec.wrap else base


def _create(spec: EncoderSpec, *, pretrained: bool) -> nn.Module:
    if spec.kind == "transformers":
        return _create_transformers(spec, pretrained=pretrained)
    import timm

    kwargs = dict(spec.kwargs)
    if kwargs.pop("swiglu", False):
        from timm.layers import SwiGLUPacked

        kwargs.update(mlp_layer=SwiGLUPacked, act_layer=nn.SiLU)
    if pretrained:
        target = spec.hub.removeprefix("timm:")
        return timm.create_model(target, pretrained=True, **kwargs)
    try:
        return timm.create_model(spec.arch, pretrained=False, **kwargs)
    except RuntimeError as err:  # timm: "Unknown model (...)"
        raise EncoderError(f"encoder '{spec.name}': {err}") from err


def _create_pretrained(spec: EncoderSpec) -> nn.Module:
    """The pretrained model: from the local Hugging Face cache when the weights are there (no
    network), else from the Hub when it answers within ``HUB_PROBE_SECONDS``; else an
    ``EncoderError`` at once, where the Hub client would retry for a minute first."""
    from huggingface_hub import constants

    try:
        with _hub_offline():
            return _create(spec, pretrained=True)
    except Exception as err:
        if not _not_in_cache(err):
            raise
    if constants.HF_HUB_OFFLINE or not _hub_reachable(constants.ENDPOINT):
        where = spec.hub_repo or spec.hub.removeprefix("timm:")
        reason = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "cannot be reached"
        raise EncoderError(
            f"encoder '{spec.name}': its weights ({where}) are not in the local Hugging Face "
            f"cache ({constants.HF_HUB_CACHE}) and the Hub ({constants.ENDPOINT}) {reason}"
            f"{OFFLINE_FIX}"
        )
    return _create(spec, pretrained=True)


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    """Hugging Face Hub calls answer from the local cache only, for the duration."""
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def _not_in_cache(err: BaseException) -> bool:
    """Whether a failure (or one it came from) says the files are not in the local cache."""
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, (LocalEntryNotFoundError, OfflineModeIsEnabled)):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _hub_reachable(endpoint: str, timeout: float = HUB_PROBE_SECONDS) -> bool:
    """Whether the Hub's host accepts a connection within ``timeout`` (name lookup included).

    Behind a proxy the host is not reached directly, so the Hub client is left to try.
    """
    from urllib.parse import urlsplit

    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urlsplit(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    answered: list[bool] = []

    def probe() -> None:
        with contextlib.suppress(OSError), socket.create_connection((url.hostname, port), timeout):
            answered.append(True)

    thread = threading.Thread(target=probe, daemon=True)  # a stuck name lookup is left behind
    thread.start()
    thread.join(timeout)
    return bool(answered)


def _create_transformers(spec: EncoderSpec, *, pretrained: bool) -> nn.Module:
    try:
        import transformers
    except ImportError as err:
        raise EncoderError(
            f"encoder '{spec.name}' needs the `transformers` package: "
            "pip install 'bidistill[transformers]'"
        ) from err
    if pretrained:
        return transformers.AutoModel.from_pretrained(spec.hub_repo)
    config = transformers.Dinov2Config(**spec.kwargs)
    return transformers.Dinov2Model(config)


def _with_hub_errors(spec: EncoderSpec, build: Callable[[], nn.Module]) -> nn.Module:
    try:
        return build()
    except Exception as err:
        raise _hub_error(spec, err) from err


def _hub_error(spec: EncoderSpec, err: Exception) -> Exception:
    """A download failure as a message that says what to do (gated, offline, unknown repo)."""
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    if isinstance(err, EncoderError):
        return err
    where = spec.hub_repo or spec.hub.removeprefix("timm:")
    if isinstance(err, GatedRepoError):
        return EncoderError(
            f"encoder '{spec.name}': the weights on the Hugging Face Hub ({where}) are gated. "
            f"Accept the licence at https://huggingface.co/{where} with your account, then make "
            "a token with read access and set it: `export HF_TOKEN=hf_...` (or `hf auth "
            f"login`){OFFLINE_FIX}"
        )
    if isinstance(err, RepositoryNotFoundError):
        return EncoderError(
            f"encoder '{spec.name}': no model '{where}' on the Hugging Face Hub (or it is "
            "private: set HF_TOKEN)"
        )
    text = f"{type(err).__name__}: {err}".splitlines()[0]
    if isinstance(err, (LocalEntryNotFoundError, OSError, ConnectionError)):
        return EncoderError(
            f"encoder '{spec.name}': cannot download its weights ({where}): {text}{OFFLINE_FIX}"
        )
    return EncoderError(f"encoder '{spec.name}': cannot build it ({text})")


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise EncoderError(f"{path}: checkpoint file not found (`features.checkpoint`)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise EncoderError(f"{path}: not a readable weights file ({err})") from err
    for key in ("state_dict", "model", "teacher"):  # common wrappers of training checkpoints
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise EncoderError(f"{path}: expected a state dict of tensors, got {type(state).__name__}")
    return {k.removeprefix("module."): v for k, v in state.items()}


_HEAD_PREFIXES = ("fc.", "head.", "classifier.", "pre_logits.")


def load_weights_file(model: nn.Module, path: Path, spec: EncoderSpec) -> None:
    """Load a local weights file into ``model`` (the unwrapped architecture), strictly."""
    state = _read_state_dict(path)
    result = model.load_state_dict(state, strict=False)
    # Classifier heads are not part of any embedding here: an ImageNet file may carry one that
    # the architecture lacks, or lack one that it has.
    missing = [k for k in result.missing_keys if not k.startswith(_HEAD_PREFIXES)]
    unexpected = [k for k in result.unexpected_keys if not k.startswith(_HEAD_PREFIXES)]
    if missing or unexpected:
        raise EncoderError(
            f"{path}: the weights do not fit encoder '{spec.name}' ({spec.arch}): "
            f"{len(missing)} missing keys (e.g. {missing[:3]}), {len(unexpected)} unexpected "
            f"(e.g. {unexpected[:3]}). Is it the weights file of this model?"
        )


def _timm_preprocess(model: nn.Module) -> Preprocess:
    """A timm model's evaluation preprocessing from its pretrained config."""
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=model)
    size = int(cfg["input_size"][-1])
    crop_pct = float(cfg.get("crop_pct") or 1.0)
    interpolation = "bicubic" if cfg.get("interpolation") == "bicubic" else "bilinear"
    return Preprocess(
        size=size,
        resize=int(round(size / crop_pct)),
        interpolation=interpolation,
        mean=tuple(float(v) for v in cfg["mean"]),
        std=tuple(float(v) for v in cfg["std"]),
    )


def _output_dim(model: nn.Module, preprocess: Preprocess) -> int:
    """D, from one forward pass of one blank input."""
    with torch.inference_mode():
        out = model(torch.zeros(1, 3, preprocess.size, preprocess.size))
    if out.ndim != 2:
        raise EncoderError(
            f"the encoder returns a tensor of shape {tuple(out.shape)}; expected [batch, D] "
            "(pooled features)"
        )
    return int(out.shape[-1])


def weights_digest(model: nn.Module) -> str:
    """SHA-256 over the parameters and buffers in name order (first 16 hex digits): of the
    tensors, not of a file, so the same weights give the same digest from the Hub or a file."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        data = tensor.detach().to("cpu").contiguous().reshape(-1)
        if data.numel():
            digest.update(data.view(torch.uint8).numpy())  # no copy: numpy shares the buffer
    return digest.hexdigest()[:16]
