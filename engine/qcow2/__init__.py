"""The QCOW2 format rules, one home for each (QEMU's ``docs/interop/qcow2.txt``).

- :mod:`engine.qcow2.spec`: every on-disk constant, offset, mask and limit.
- :mod:`engine.qcow2.args`: argument checks of the public API and the on-disk name codec.
- :mod:`engine.qcow2.header`: cluster 0 (header and extensions): parse, validate, encode.
- :mod:`engine.qcow2.snapshots`: the snapshot table: one parser (strict or lenient), one encoder.
- :mod:`engine.qcow2.bitmaps`: the bitmap directory: one reader with QEMU's load-time checks.
- :mod:`engine.qcow2.refblocks`: refcount blocks and reftable entries, every refcount width.
- :mod:`engine.qcow2.layout`: a new image's layout (QEMU's create-time allocator) and the size
  rules of create and resize.

Everything here is the cold path, in pure Python (plus numpy for whole refcount blocks): it
runs once per open or per metadata update, never per cluster.  Section numbers in comments
(§1.1, ...) refer to the project's ``docs/on-disk.md``.

Each module imports only modules listed before it (and ``engine.errors``); nothing here
imports the image, check or repository layers.
"""
