"""The values the repository hands out: volumes, snapshots and the results of its
operations and of its check."""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field
import os
from typing import Any, Callable, Iterable, Union

from engine.catalog import VolumeFields
from engine.ops import Change

Progress = Callable[[int, int], None]
#: A file path as the public verbs take it.
PathArg = Union[str, "os.PathLike[str]"]


@dataclass(frozen=True)
class Volume(VolumeFields):
    """One volume of a chain, as the catalog records it.

    Attributes:
        id (str): uuid.   chain (str): the chain that created it.
        path (str): absolute path of the file.   format (str): "raw" or "qcow2".
        role (str): "leaf" (no volume on top of it), "shared" (used by another chain than
            its own, e.g. under a clone), "base" (no backing file) or "internal".
        parent (str | None): id of the volume it is backed by.
        legality (str): "LEGAL", or "ILLEGAL" while an operation is changing it.
        created (datetime): UTC.
    """

    created: _dt.datetime

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "chain": self.chain, "path": self.path, "format": self.format,
                "role": self.role, "parent": self.parent, "legality": self.legality,
                "created": _iso(self.created)}


@dataclass(frozen=True)
class Snapshot:
    """A point in a chain's history.

    Attributes:
        id (str): uuid.   chain (str): its chain.   created (datetime): UTC.
        description (str): free text.
        volume (str): id of the volume that was the leaf when it was taken; the snapshot's
            content is the chain read from that volume down.
    """

    id: str
    chain: str
    created: _dt.datetime
    description: str
    volume: str

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "chain": self.chain, "created": _iso(self.created),
                "description": self.description, "volume": self.volume}


@dataclass(frozen=True)
class MergeResult:
    """What ``Chain.delete_snapshot`` did.

    Attributes:
        snapshot (str): the deleted snapshot's id.
        direction (str): "commit" (the child volume was committed down into the snapshot's
            volume, and the child file removed) or "pull" (the snapshot volume's clusters
            were pulled up into its child, and the snapshot's file removed).
        removed_volume (str): id of the volume whose file is gone.
        kept_volume (str): id of the volume that now holds the merged content.
        copied_bytes (int): guest bytes the merge wrote (data and zero ranges).
        commit_bytes, pull_bytes (int): the two costs compared to choose the direction.
    """

    snapshot: str
    direction: str
    removed_volume: str
    kept_volume: str
    copied_bytes: int
    commit_bytes: int
    pull_bytes: int

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class ExportResult:
    """What ``Chain.export`` wrote.

    Attributes:
        path (str): the new image.   format (str): "raw" or "qcow2".
        size (int): virtual size, bytes.   snapshot (str | None): the exported snapshot.
        data_bytes (int): bytes of data written (zero ranges are not written).
    """

    path: str
    format: str
    size: int
    snapshot: str | None
    data_bytes: int

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class DiffResult(list[Change]):
    """What ``Chain.diff`` found: a list of ``Change(start, length, zero, data)``, sorted and
    disjoint, with the disk's size at each point (a resize in between changes it).

    Attributes:
        from_size, to_size (int): virtual size at the FROM and the TO point, bytes.
        size_changed (bool): the two differ.
    """

    def __init__(self, changes: Iterable[Change], from_size: int, to_size: int) -> None:
        super().__init__(changes)
        self.from_size = from_size
        self.to_size = to_size

    @property
    def size_changed(self) -> bool:
        return self.from_size != self.to_size

    def to_dict(self) -> dict[str, Any]:
        return {"from-size": self.from_size, "to-size": self.to_size,
                "changes": [c.to_dict() for c in self]}


@dataclass
class Problem:
    """One mismatch found by ``Repository.check``.

    Attributes:
        kind (str): a stable keyword (see ``Repository.check``).
        message (str): what is wrong, in one sentence.
        chain, volume, snapshot (str | None): what it is about.
        repaired (bool): ``check(repair=True)`` fixed it.
        repair (str | None): what the repair did, or why it could not.
        leaks_only (bool): only leaked clusters (harmless; repair reclaims them).
    """

    kind: str
    message: str
    chain: str | None = None
    volume: str | None = None
    snapshot: str | None = None
    repaired: bool = False
    repair: str | None = None
    leaks_only: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class RepositoryCheck:
    """The result of ``Repository.check``.

    Attributes:
        problems (list[Problem]): everything found, repaired or not.
        volumes (list[dict]): per volume: id, chain, path, format and the image check
            result (``qemu-img check`` JSON fields) or None for raw volumes.
        ok (bool): nothing is left unrepaired.
        exit_code (int): 0 clean (or all repaired), 2 problems remain, 3 only leaked
            clusters remain (the meanings of ``qemu-img check``'s codes).
    """

    problems: list[Problem] = field(default_factory=list)
    volumes: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not any(not p.repaired for p in self.problems)

    @property
    def exit_code(self) -> int:
        left = [p for p in self.problems if not p.repaired]
        if not left:
            return 0
        return 3 if all(p.leaks_only for p in left) else 2

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "exit_code": self.exit_code,
                "problems": [p.to_dict() for p in self.problems],
                "volumes": self.volumes}


def _iso(t: _dt.datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
