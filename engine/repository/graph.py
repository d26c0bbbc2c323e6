"""The volume graph: ancestry (a volume and the volumes under it), which chains read
through each volume, and each volume's role; pure functions over catalog rows.

A volume's role depends only on the volumes stacked on it (has it a child; which chains'
leaves lie over it), so the roles of the volumes over a volume are computed exactly from
those rows alone (``Catalog.volumes_over``): the operations recompute the part of the graph
they changed, never the whole repository."""

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


def line_to(vols: dict[str, VolumeRow], top: str, stop: str) -> list[str] | None:
    """TOP and the volumes under it down to STOP (not included), top first; None when the
    parent links from TOP leave VOLS (or loop) before they reach STOP."""
    out: list[str] = []
    vid: str | None = top
    while vid != stop:
        row = vols.get(vid) if vid is not None else None
        if row is None or len(out) > len(vols):
            return None
        out.append(row.id)
        vid = row.parent
    return out


def _tops(c: ChainRow) -> list[str]:
    return [top for top in (c.leaf, c.saved_leaf) if top is not None]


def volume_users(vols: dict[str, VolumeRow], chains: Iterable[ChainRow]) -> dict[str, set[str]]:
    """For each volume id, the names of the chains that read through it."""
    users: dict[str, set[str]] = {}
    for c in chains:
        for top in _tops(c):
            for v in ancestry(vols, top):
                users.setdefault(v.id, set()).add(c.name)
    return users


def users_over(over: dict[str, VolumeRow], chains: Iterable[ChainRow]) -> dict[str, set[str]]:
    """``volume_users`` for the volumes of OVER (a volume and everything stacked on it,
    ``Catalog.volumes_over``), from the chains whose tops are in OVER: a chain reads through
    a volume exactly when its leaf (or saved leaf) lies over it."""
    users: dict[str, set[str]] = {}
    for c in chains:
        for top in _tops(c):
            vid: str | None = top
            while vid in over and c.name not in users.setdefault(vid, set()):
                users[vid].add(c.name)
                vid = over[vid].parent
    return users


def role(v: VolumeRow, has_child: bool, users: set[str]) -> str:
    """The role rule: "leaf" (no volume on top of it), "shared" (another chain than its own
    reads through it), "base" (no parent) or "internal"."""
    return ("leaf" if not has_child else
            "shared" if users - {v.chain} else
            "base" if v.parent is None else "internal")


def roles(vols: dict[str, VolumeRow], chains: Iterable[ChainRow], *,
          local: bool = False) -> dict[str, str]:
    """Each volume's role (``role``), from the parent links and the chains' tops.  LOCAL:
    VOLS is one volume and everything over it (``users_over``), CHAINS those with a top
    among them; exact for each of VOLS."""
    users = users_over(vols, chains) if local else volume_users(vols, chains)
    has_child = {v.parent for v in vols.values() if v.parent}
    return {v.id: role(v, v.id in has_child, users.get(v.id, set())) for v in vols.values()}
