"""The method registry: a method is one class and one ``@register_method`` line.

The built-in methods are registered by importing their modules explicitly in
``_register_builtin_methods`` (never through a ``from x import *`` side effect), the first time
the registry is asked for anything.
"""

from __future__ import annotations

import difflib
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from pydantic import ValidationError

from bidistill.errors import ConfigError
from bidistill.models.base import Method, MethodDims

_METHODS: dict[str, type[Method]] = {}


def register_method(name: str) -> Callable[[type[Method]], type[Method]]:
    """Class decorator: make a ``Method`` subclass available as ``name``."""

    def register(cls: type[Method]) -> type[Method]:
        if name in _METHODS and _METHODS[name] is not cls:
            warnings.warn(f"method {name!r} registered twice; the later one wins", stacklevel=2)
        cls.name = name
        _METHODS[name] = cls
        return cls

    return register


def _register_builtin_methods() -> None:
    from bidistill.models import bd, composite, fusion, shaspec, unimodal  # noqa: F401


def list_methods() -> list[str]:
    """The registered method names, sorted."""
    _register_builtin_methods()
    return sorted(_METHODS)


def get_method_class(name: str) -> type[Method]:
    """The class registered as ``name``; a ``ConfigError`` listing the valid names otherwise."""
    _register_builtin_methods()
    if name not in _METHODS:
        hint = difflib.get_close_matches(name, list(_METHODS), n=1)
        did_you_mean = f" Did you mean '{hint[0]}'?" if hint else ""
        raise ConfigError(
            f"unknown method '{name}'.{did_you_mean} Valid methods: {', '.join(sorted(_METHODS))}"
        )
    return _METHODS[name]


def create_method(
    name: str,
    *,
    in_dim: int,
    clinical_dim: int,
    n_clinical_features: int,
    feature_slices: Sequence[Sequence[int]],
    patch_encoder: Callable[[], Any] | None = None,
    n_classes: int = 2,
    **options: Any,
) -> Method:
    """Build a method by name with validated options (``None`` options are dropped so that the
    method's defaults apply); ``patch_encoder`` (end-to-end mode) gives each aggregator its own
    trainable patch encoder."""
    validated = validate_options(name, options)
    dims = MethodDims(
        in_dim=int(in_dim),
        clinical_dim=int(clinical_dim),
        n_clinical_features=int(n_clinical_features),
        feature_slices=tuple((int(a), int(b)) for a, b in feature_slices),
        patch_encoder=patch_encoder,
        n_classes=int(n_classes),
    )
    method = get_method_class(name)(dims, validated)
    method.add_clinical_read()
    return method


def validate_options(name: str, options: dict[str, Any]) -> Any:
    """The method's validated options model (run before any work, so typos fail fast)."""
    cls = get_method_class(name)
    given = {k: v for k, v in options.items() if v is not None}
    try:
        return cls.Options.model_validate(given)
    except ValidationError as err:
        valid = ", ".join(cls.Options.model_fields)
        problems = []
        for e in err.errors():
            key = ".".join(str(p) for p in e["loc"])
            if e["type"] == "extra_forbidden":
                hint = difflib.get_close_matches(key, list(cls.Options.model_fields), n=1)
                tip = f" (did you mean '{hint[0]}'?)" if hint else ""
                problems.append(f"unknown option '{key}'{tip}")
            else:
                problems.append(f"option '{key}': {e['msg']} (got {e.get('input')!r})")
        raise ConfigError(
            f"method '{name}': " + "; ".join(problems) + f". Valid options: {valid}"
        ) from None


# Options added after runs were first recorded, each with the value that builds the model of
# before. At that value an option is left out of a run's fingerprint: a run made before the
# option existed recorded no value for it, and the model it trained is the one the new version
# would train, so an upgrade does not retrain it (a changed default still does).
ADDED_OPTIONS: dict[str, Any] = {"instance_layers": 1, "lambda_slide": 0.0}


def resolved_options(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """Every option's value, defaults included: what a run records of a method, so that a
    method whose config leaves an option unset retrains when a new version changes its default
    (the model it would train is another one)."""
    return validate_options(name, options).model_dump(mode="json")


def fingerprinted_options(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """``resolved_options`` less each of ``ADDED_OPTIONS`` at its value of before: what a run's
    fingerprint compares."""
    resolved = resolved_options(name, options)
    return {k: v for k, v in resolved.items() if k not in ADDED_OPTIONS or ADDED_OPTIONS[k] != v}


def check_method_configs(methods: Sequence[Any], *, source: Any) -> None:
    """Validate every configured method's name and options before any work starts (``source``:
    the config file, named in the error)."""
    for method in methods:
        try:
            validate_options(method.name, method.options)
        except ConfigError as err:
            raise ConfigError(f"{source}: methods: {err}") from None
