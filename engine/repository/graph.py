"""The volume graph: ancestry (a volume and the volumes under it), which chains read
through each volume, and each volume's role; pure functions over catalog rows."""

from __future__ import annotations

from typing import Iterable

from engine.catalog import ChainRow, VolumeRow
from engine.errors import ChainError, RepositoryError


def ancestry(vols: dict[str, VolumeRow], vid: str | None) -> list[VolumeRow]:
    """VID and the volumes under it, top first."""
    out: list[VolumeRow] = []
    seen: set[str] = set()
    while vid is not None:
        if vid in seen:
            raise ChainError(f"the catalog's parent links loop at volume {vid}")
        row = vols.get(vid)
        if row is None:
            raise RepositoryError(f"volume {vid} is missing from the catalog",
                                  hint="run 'cowchain chain check --repair'")
        out.append(row)
        seen.add(vid)
        vid = row.parent
    return out


def volume_users(vols: dict[str, VolumeRow], chains: Iterable[ChainRow]) -> dict[str, set[str]]:
    """For each volume id, the names of the chains that read through it."""
    users: dict[str, set[str]] = {}
    for c in chains:
        for top in (c.leaf, c.saved_leaf):
            if top is None:
                continue
            for v in ancestry(vols, top):
                users.setdefault(v.id, set()).add(c.name)
    return users


def roles(vols: dict[str, VolumeRow], chains: Iterable[ChainRow]) -> dict[str, str]:
    """Each volume's role, from the parent links and the chains' tops: "leaf" (no volume on
    top of it), "shared" (another chain than its own reads through it), "base" (no parent)
    or "internal"."""
    users = volume_users(vols, chains)
    has_child = {v.parent for v in vols.values() if v.parent}
    return {v.id: ("leaf" if v.id not in has_child else
                   "shared" if users.get(v.id, set()) - {v.chain} else
                   "base" if v.parent is None else "internal")
            for v in vols.values()}
