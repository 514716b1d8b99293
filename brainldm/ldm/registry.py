"""One registry of the models built without a checkpoint download, by kind.

Every loader (:func:`~brainldm.ldm.loading.load_ldm`, :func:`~brainldm.ldm.loading.load_depth_ldm`,
:func:`~brainldm.ldm.captioner.load_captioner`, :func:`~brainldm.ldm.depth.load_depth_model`, and the CLIP that
scores reconstructions, :func:`~brainldm.analysis.extractors.clip_extractor`) asks here first: a registered name is
built by its builder; any other name is a Hub id or a local folder, loaded from pretrained weights.

The product registers nothing itself. Packages register their models under the entry-point group
:data:`ENTRY_POINT_GROUP` (a function that calls :func:`register`), loaded the first time a loader asks; brainldm's
offline wing registers its seeded random twins so (``pyproject.toml``). Adding a twin is one :func:`register` call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

KINDS = ("ldm", "depth_ldm", "captioner", "depth_model", "clip")
ENTRY_POINT_GROUP = "brainldm.models"


@dataclass(frozen=True)
class Builder:
    """How one model is built: ``build()`` returns it (on CPU, float32, in eval mode).

    ``rehearsal``: the real model's architecture with random weights, so its costs are real and its outputs are not;
    what scores its reconstructions is built at real size with random weights too. ``clip`` (an LDM's): the ``clip``
    entry that scores its reconstructions in place of CLIP ViT-L/14 (a model that ships its own image space).
    """

    build: Callable[[], Any]
    description: str
    rehearsal: bool = False
    clip: str | None = None


_REGISTRY: dict[str, dict[str, Builder]] = {kind: {} for kind in KINDS}
_loaded = False


def register(kind: str, name: str, build: Callable[[], Any], description: str, **options) -> None:
    """Register ``build`` as the way to make model ``name`` of ``kind`` (one of :data:`KINDS`); ``options`` are
    :class:`Builder`'s."""
    if kind not in KINDS:
        raise ValueError(f"unknown model kind {kind!r}; choose from {KINDS}")
    _REGISTRY[kind][name] = Builder(build, description, **options)


def _load_entry_points() -> None:
    global _loaded
    if not _loaded:
        _loaded = True  # first: a registering function may itself ask the registry
        for entry in entry_points(group=ENTRY_POINT_GROUP):
            entry.load()()


def builder(kind: str, name: str | None) -> Builder | None:
    """The registered builder of ``name`` (a str) of ``kind``, or None: then ``name`` is a Hub id or a folder."""
    _load_entry_points()
    return _REGISTRY[kind].get(str(name))


def names(kind: str) -> list[str]:
    """The names registered for ``kind``, in the order they were registered."""
    _load_entry_points()
    return list(_REGISTRY[kind])


def alternatives(kind: str) -> str:
    """The end of a loading error's advice: the registered names of ``kind`` a user could pass instead."""
    registered = names(kind)
    return f", or one built offline ({', '.join(registered)})" if registered else ""
