"""The qemu-img verbs on standalone image files, as documented Python functions.

Each function takes file names (and the options of the qemu-img verb of the same name) and
returns what ``qemu-img --output=json`` prints, as plain dicts and lists, so a script written
for qemu-img's JSON reads ours unchanged.  Images are opened through :func:`engine.open`: the
backing-name policy, QEMU's image locks (``force_share`` is qemu-img's ``-U``) and the typed
errors of :mod:`engine.errors` apply.  The ``cowchain img`` command group (``engine/cli_img.py``)
only parses arguments and prints these results.
"""

from engine.img.bench import BenchResult, bench
from engine.img.check import check
from engine.img.compare import CompareResult, compare
from engine.img.convert import convert
from engine.img.create import create, parse_options
from engine.img.info import info, info_text
from engine.img.map import map_entries, map_human, map_json_text
from engine.img.measure import measure
from engine.img.modify import amend, commit, rebase, resize
from engine.img.snapshot import (snapshot_apply, snapshot_create, snapshot_delete, snapshot_list,
                                 snapshot_text)

__all__ = ["BenchResult", "CompareResult", "amend", "bench", "check", "commit", "compare",
           "convert", "create", "info", "info_text", "map_entries", "map_human",
           "map_json_text", "measure", "parse_options", "rebase", "resize", "snapshot_apply",
           "snapshot_create", "snapshot_delete", "snapshot_list", "snapshot_text"]
