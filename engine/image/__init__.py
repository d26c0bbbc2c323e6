"""One QCOW2 or RAW image and its backing chain: open, create, locks, backing-name policy.

The rooms, each with one job:

- :mod:`~engine.image.image`: the :class:`Image` class (I/O calls, info, check, rebase,
  resize, reload).
- :mod:`~engine.image.api`: the public :func:`open` and :func:`create`.
- :mod:`~engine.image.chain`: opening one file and, level by level, its backing chain.
- :mod:`~engine.image.locks`: QEMU-compatible OFD byte-range locks.
- :mod:`~engine.image.naming`: the backing-name policy and path arguments.
- :mod:`~engine.image.files`: opening regular files, metadata written beside the core,
  header reads, the host's limits on file length and descriptors, a new file's sync.
- :mod:`~engine.image.extent`: :class:`Extent`, one run of ``Image.extents()``.
- :mod:`~engine.image.compress`: the decompressor the core calls for compressed clusters.

Imports inside point one way: ``api`` → ``image`` → ``chain`` → ``locks``, ``naming``,
``files``; all of them over ``engine.format``, ``engine.errors`` and the compiled core.
"""

from engine.image.api import create as create, open as open
from engine.image.chain import MAX_CHAIN_DEPTH as MAX_CHAIN_DEPTH
from engine.image.extent import Extent as Extent
from engine.image.image import Image as Image

# Also used as engine.image.NAME by tests and the fuzz targets (importing compress registers the core's decompressor).
from engine.image.chain import _geometry as _geometry
from engine.image.compress import _decompress as _decompress
from engine.image.files import _fs_max_file_size as _fs_max_file_size, _os_open as _os_open

__all__ = ["Image", "Extent", "open", "create", "MAX_CHAIN_DEPTH"]
