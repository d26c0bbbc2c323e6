"""The result of a check, and the counters of one pass that build it.

:class:`CheckResult` is what ``qemu-img check`` reports (its JSON names, presence rules and
exit codes, its human text); :class:`_Pass` holds one run's counters and :class:`_Findings`
its finding lines, capped per kind of message.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

MAX_FINDINGS_PER_KIND = 10000
"""Detailed finding lines kept per kind of message; the rest are summarised in one line."""

# Repair modes, as QEMU's BdrvCheckMode bits.
_FIX_LEAKS = 1
_FIX_ERRORS = 2
_MODES: dict[str | None, int] = {None: 0, "leaks": _FIX_LEAKS, "all": _FIX_LEAKS | _FIX_ERRORS}


@dataclass
class CheckResult:
    """What a check found (and, after a repair, what remains), shaped like qemu-img's ImageCheck.

    Attributes:
        filename (str): the name given to :func:`check_file`.
        format (str): always "qcow2".
        check_errors (int): things the check could not examine (exit code 1).
        corruptions (int): inconsistencies that can lose data (exit code 2).
        leaks (int): clusters whose refcount is higher than their use (exit code 3).
        corruptions_fixed, leaks_fixed (int): what a repair fixed.
        image_end_offset (int): bytes: end of the highest cluster in use or refcounted.
        total_clusters (int): clusters of the virtual disk.
        allocated_clusters, fragmented_clusters, compressed_clusters (int): active-tree
            statistics, as qemu-img computes them.
        findings (list[str]): one human-readable line per problem found (and per repair).
        rebuilt (bool): the refcount structures were rebuilt.
    """

    filename: str
    format: str = "qcow2"
    check_errors: int = 0
    corruptions: int = 0
    leaks: int = 0
    corruptions_fixed: int = 0
    leaks_fixed: int = 0
    image_end_offset: int = 0
    total_clusters: int = 0
    allocated_clusters: int = 0
    fragmented_clusters: int = 0
    compressed_clusters: int = 0
    findings: list[str] = field(default_factory=list)
    rebuilt: bool = False

    @property
    def exit_code(self) -> int:
        """qemu-img check's exit code: 0 clean, 1 check errors (or the check could not
        complete), 2 corruptions, 3 only leaks. After a repair it describes the repaired image."""
        if self.check_errors:
            return 1
        if self.corruptions:
            return 2
        if self.leaks:
            return 3
        return 0

    def to_dict(self) -> dict[str, Any]:
        """The object ``qemu-img check --output=json`` prints: filename, format and check-errors
        always; every other count only when it is non-zero."""
        d: dict[str, Any] = {"filename": self.filename, "format": self.format, "check-errors": self.check_errors}
        for key, value in (("corruptions", self.corruptions), ("leaks", self.leaks),
                           ("corruptions-fixed", self.corruptions_fixed),
                           ("leaks-fixed", self.leaks_fixed),
                           ("image-end-offset", self.image_end_offset),
                           ("total-clusters", self.total_clusters),
                           ("allocated-clusters", self.allocated_clusters),
                           ("fragmented-clusters", self.fragmented_clusters),
                           ("compressed-clusters", self.compressed_clusters)):
            if value:
                d[key] = value
        return d

    def to_text(self) -> str:
        """The lines ``qemu-img check`` prints on stdout in human mode."""
        out: list[str] = []
        if self.corruptions_fixed or self.leaks_fixed:
            out.append("The following inconsistencies were found and repaired:\n\n"
                       f"    {self.leaks_fixed} leaked clusters\n"
                       f"    {self.corruptions_fixed} corruptions\n\n"
                       "Double checking the fixed image now...")
        if not (self.corruptions or self.leaks or self.check_errors):
            out.append("No errors were found on the image.")
        else:
            if self.corruptions:
                out.append(f"\n{self.corruptions} errors were found on the image.\n"
                           "Data may be corrupted, or further writes to the image may "
                           "corrupt it.")
            if self.leaks:
                out.append(f"\n{self.leaks} leaked clusters were found on the image.\n"
                           "This means waste of disk space, but no harm to data.")
            if self.check_errors:
                out.append(f"\n{self.check_errors} internal errors have occurred during the "
                           "check.")
        if self.total_clusters and self.allocated_clusters:
            out.append(f"{self.allocated_clusters}/{self.total_clusters} = "
                       f"{self.allocated_clusters * 100.0 / self.total_clusters:0.2f}% "
                       "allocated, "
                       f"{self.fragmented_clusters * 100.0 / self.allocated_clusters:0.2f}% "
                       "fragmented, "
                       f"{self.compressed_clusters * 100.0 / self.allocated_clusters:0.2f}% "
                       "compressed clusters")
        if self.image_end_offset:
            out.append(f"Image end offset: {self.image_end_offset}")
        return "\n".join(out) + "\n"


class _Findings:
    """Finding lines, capped at ``cap`` per kind of message."""

    def __init__(self, cap: int = MAX_FINDINGS_PER_KIND) -> None:
        self.cap = cap
        self._lines: list[str] = []
        self._count: dict[str, int] = {}

    def add(self, kind: str, line: str) -> None:
        n = self._count.get(kind, 0) + 1
        self._count[kind] = n
        if n <= self.cap:
            self._lines.append(line)

    def add_many(self, kind: str, total: int, lines: Iterable[str]) -> None:
        """Record ``total`` findings of one kind; ``lines`` yields the text of the first ones
        (it is only consumed up to the cap)."""
        if total <= 0:
            return
        n = self._count.get(kind, 0)
        room = max(0, self.cap - n)
        if room:
            for i, line in enumerate(lines):
                if i >= room:
                    break
                self._lines.append(line)
        self._count[kind] = n + total

    def lines(self) -> list[str]:
        out = list(self._lines)
        for kind, n in self._count.items():
            if n > self.cap:
                out.append(f"... {n - self.cap} more {kind} findings not listed")
        return out


class _Abort(Exception):
    """The check cannot complete (after _Pass.fail recorded why); qemu-img prints nothing."""


# The counters of a pass that a rebuild or the snapshot table check sets aside and restores.
_Counters = tuple[int, int, int, int, int]


class _Pass:
    """One run of QEMU's qcow2_co_check_locked: counters and findings."""

    def __init__(self, fd: int, path: str, fix: int, cap: int = MAX_FINDINGS_PER_KIND) -> None:
        self.fd = fd
        self.path = path
        self.fix = fix
        self.check_errors = 0
        self.corruptions = 0
        self.leaks = 0
        self.corruptions_fixed = 0
        self.leaks_fixed = 0
        self.allocated = 0
        self.fragmented = 0
        self.compressed = 0
        self.total_clusters = 0
        self.image_end_offset = 0
        self.rebuilt = False
        self.findings = _Findings(cap)

    def scratch(self) -> "_Pass":
        """A pass over the same file that only counts (a re-count inside a repair)."""
        return _Pass(self.fd, self.path, 0, self.findings.cap)

    def result(self, filename: str) -> CheckResult:
        return CheckResult(filename=filename, check_errors=self.check_errors,
                           corruptions=self.corruptions, leaks=self.leaks,
                           corruptions_fixed=self.corruptions_fixed,
                           leaks_fixed=self.leaks_fixed,
                           image_end_offset=self.image_end_offset,
                           total_clusters=self.total_clusters,
                           allocated_clusters=self.allocated,
                           fragmented_clusters=self.fragmented,
                           compressed_clusters=self.compressed,
                           findings=self.findings.lines(), rebuilt=self.rebuilt)

    def fail(self, message: str) -> "_Pass":
        """The check cannot complete (qemu-img prints no result and exits 1)."""
        self.check_errors += 1
        self.findings.add("fatal", message)
        return self

    def counters(self) -> _Counters:
        return (self.check_errors, self.corruptions, self.leaks, self.corruptions_fixed,
                self.leaks_fixed)

    def restore(self, saved: _Counters) -> None:
        (self.check_errors, self.corruptions, self.leaks, self.corruptions_fixed,
         self.leaks_fixed) = saved
