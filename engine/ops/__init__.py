"""Bulk operations over open Images: commit, stream (pull), convert (export), diff, measure.

Every operation works on the coalesced runs that ``Image.extents()`` returns and copies in
chunks of :data:`CHUNK` bytes, so Python runs per extent and per chunk, never per cluster.
Long copies take ``progress(done_bytes, total_bytes)``.  These functions know images, not
repositories: which volume to merge into which, and the journal around it, live in
``engine.repository``.
"""

from engine.ops._copy import CHUNK, Meter, copy_runs, nonzero_blocks
from engine.ops._hooks import kill_point
from engine.ops.commit import commit
from engine.ops.convert import convert, convert_new, write_raw
from engine.ops.diff import Change, allocated_ranges, annotate
from engine.ops.measure import allocated_bytes, layer_runs
from engine.ops.merge import MergePlan, merge_costs, plan_merge, pull
from engine.ops.stream import stream

__all__ = ["CHUNK", "Change", "MergePlan", "Meter", "allocated_bytes", "allocated_ranges",
           "annotate", "commit", "convert", "convert_new", "copy_runs", "kill_point",
           "layer_runs", "merge_costs", "nonzero_blocks", "plan_merge", "pull", "stream",
           "write_raw"]
