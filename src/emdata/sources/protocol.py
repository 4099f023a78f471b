"""The typed contract of a source module (checked by mypy in CI; see docs/architecture.md).

A source kind is a module, not a class: its functions are the verbs below, its ``Params`` a
frozen dataclass. mypy checks each built-in module against :class:`Source` (sources/__init__.py
assigns the module to a ``Source``-typed name under TYPE_CHECKING); plug-in kinds registered
through the ``emdata.sources`` entry-point group are checked at import by ``get_source``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from emdata.h5.collection import RawCollection
from emdata.params.schema import Section
from emdata.sources.fetch.context import FetchContext
from emdata.sources.fetch.record import FetchRecord
from emdata.formats.raw import RawVolume
from emdata.sources.fetch.files import FilePlan


class SourceParams(Protocol):
    """The typed form of ``datasets.<ds>.source``; ``to_dict()`` is the spec a fetch records."""

    def to_dict(self) -> dict[str, Any]: ...


class Source(Protocol):
    KIND: str

    def parse_params(self, sec: Section) -> Any:
        """``datasets.<ds>.source`` -> the kind's frozen Params (a :class:`SourceParams`); no network."""

    def plan(self, params: Any, ctx: FetchContext) -> list[FilePlan]:
        """What a fetch would transfer (files or objects, bytes, requests); metadata requests only."""

    def fetch(self, params: Any, ctx: FetchContext) -> FetchRecord:
        """Write everything into ``ctx.dest``; resumable; returns ``ctx.record(files, extra)``."""

    def open_volume(self, params: Any, raw: Path, dataset: str) -> RawVolume:
        """A lazy ZYX view of the fetched data (geometry reported where the format has it); no network."""

    def read_metadata(self, params: Any, raw: Path, dataset: str) -> dict[str, Any]:
        """Native metadata as found (tags, attributes, API answers), JSON-safe; no network."""


class DescribedSource(Source, Protocol):
    """A source that adds descriptive fields to the record (``describe`` is optional).

    ``describe`` returns a small flat JSON-safe dict (instrument, detector, paper DOI, names from
    the service, ...); it is stored as the root attribute ``description`` and as ``description``
    in the metadata record. Large or nested answers belong in ``read_metadata`` instead.
    """

    def describe(self, params: Any, raw: Path, dataset: str) -> dict[str, Any]: ...


class LabelledSource(Source, Protocol):
    """A source that also has label volumes on the image's grid (``open_labels`` is optional)."""

    def open_labels(self, params: Any, raw: Path, dataset: str) -> dict[str, RawVolume]: ...



class CollectionSource(Protocol):
    """A source whose datasets are collections of images with a table (``LAYOUT = "collection"``).

    Same verbs as :class:`Source`, with ``open_collection`` in place of ``open_volume``: the items
    (image id, path inside the image's group, a lazy RawVolume, stored shape, axes, pixel size,
    attributes) and one table row per image (see :mod:`emdata.h5.collection`).
    """

    KIND: str
    LAYOUT: str

    def parse_params(self, sec: Section) -> Any: ...

    def plan(self, params: Any, ctx: FetchContext) -> list[FilePlan]: ...

    def fetch(self, params: Any, ctx: FetchContext) -> FetchRecord: ...

    def open_collection(self, params: Any, raw: Path, dataset: str) -> RawCollection:
        """The images of the fetched data, each array opened lazily; no network."""

    def read_metadata(self, params: Any, raw: Path, dataset: str) -> dict[str, Any]: ...


class LocalSource(CollectionSource, Protocol):
    """A source that imports files the user has (``input_stamp`` is optional for any source).

    ``input_stamp(params, dataset)`` is a small JSON-able summary of the user's files, cheap to
    take (sizes and modification times, no hashing); it raises an EmdataError when the files are
    not there. ``fetch`` stores it as ``extra["input_stamp"]``. When the stamp differs, a later
    ``emdata fetch`` imports again instead of saying "up to date", and the ``inputs`` stage writes
    it to ``data/inputs/<ds>.json``, the file ``fetch@<ds>`` depends on, so ``dvc repro`` re-runs.
    """

    def input_stamp(self, params: Any, dataset: str) -> dict[str, Any]: ...
