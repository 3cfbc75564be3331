"""The one parser of model specs ``<backend>:<name>[@<weights>]``."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from worker.encoders.base import ModelSpec
from worker.encoders.random_backend import RANDOM_DIM_MAX
from worker.errors import ConfigError

__all__ = ["parse_spec", "anchor", "anchored_spec", "BACKENDS", "spec_given_by"]

#: Backends this build can load.
BACKENDS = ("open_clip", "hf", "timm", "tiny", "random")


def parse_spec(text: str) -> ModelSpec:
    """Parse ``IMGSYNC_MODEL``.

    ``tiny`` (or ``tiny@<weights file>``) is the test model and ``random:<dim>`` the control of
    ``imgsync evaluate``; otherwise ``backend:name`` with an optional ``@weights`` (a pretrained tag,
    a hub id or a local path). The name may itself contain ``:`` (open_clip's ``hf-hub:org/repo``
    and ``local-dir:/path``); ``timm:<model>.<tag>`` (timm's own naming) is ``timm:<model>@<tag>``.

    Raises:
        ConfigError: empty parts, an unknown backend (the message lists the valid backends), a name
            given to ``tiny``, or a ``random`` spec that is not ``random:<dim>``.
    """
    raw = text.strip()
    if raw == "tiny" or raw.startswith("tiny@"):
        weights = raw.partition("@")[2] or None
        return ModelSpec("tiny", "imgsync-tiny", weights)
    backend, sep, rest = raw.partition(":")
    if not sep or not rest:
        raise ConfigError(
            f"IMGSYNC_MODEL={text!r} is not <backend>:<name>[@<weights>] "
            f"(backends: {', '.join(BACKENDS)}; e.g. open_clip:ViT-B-32@openai, or tiny)"
        )
    if backend not in BACKENDS:
        raise ConfigError(f"IMGSYNC_MODEL={text!r}: unknown backend {backend!r}; valid: {', '.join(BACKENDS)}")
    name, at, weights = rest.rpartition("@") if "@" in rest else (rest, "", "")
    if at and not weights:
        raise ConfigError(f"IMGSYNC_MODEL={text!r}: empty weights after '@'")
    if not name:
        raise ConfigError(f"IMGSYNC_MODEL={text!r}: empty model name")
    if backend == "tiny":
        raise ConfigError(
            f"IMGSYNC_MODEL={text!r}: the tiny test model takes no name; write tiny (or tiny@/path/to/weights.pt)"
        )
    if backend == "random" and (at or not (name.isascii() and name.isdecimal() and 2 <= int(name) <= RANDOM_DIM_MAX)):
        raise ConfigError(
            f"IMGSYNC_MODEL={text!r}: the random control is random:<dim>, dim an integer in 2..{RANDOM_DIM_MAX} "
            "and no @weights, e.g. random:64"
        )
    if backend == "timm" and not weights and "." in name:  # timm's own <model>.<pretrained tag> naming
        name, _, weights = name.partition(".")
    return ModelSpec(backend, name, weights or None)


def anchor(spec: ModelSpec) -> ModelSpec:
    """``spec`` with each local path in it (a weights file, an ``hf`` or open_clip ``local-dir:``
    folder) made absolute, so that a spec recorded in the ledger means the same model to a worker
    started in another folder. Hub ids, tags and paths that do not exist stay as written."""
    from pathlib import Path

    def absolute(value: str) -> str:
        local = Path(value).expanduser()
        return str(local.absolute()) if local.exists() else value

    name, weights = spec.name, spec.weights
    if name.startswith("local-dir:"):
        name = "local-dir:" + absolute(name.removeprefix("local-dir:"))
    elif spec.backend == "hf" and not weights:
        name = absolute(name)
    return ModelSpec(spec.backend, name, absolute(weights) if weights else None)


def anchored_spec(text: str) -> str:
    """:func:`anchor` of a spec's text, as text (what the ledger records)."""
    return str(anchor(parse_spec(text)))


@contextmanager
def spec_given_by(option: str) -> Iterator[None]:
    """Spec errors raised inside name ``option`` (e.g. ``--model``) where the spec came from, instead
    of IMGSYNC_MODEL."""
    try:
        yield
    except ConfigError as exc:
        raise ConfigError(str(exc).replace("IMGSYNC_MODEL", option)) from exc
