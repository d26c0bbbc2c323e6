"""Shared harness of the reliability suites (docs/reliability.md C2-C7).

- :mod:`reliability.stamps`: 512-byte stamped blocks (seq, lba, generation, crc32) and their
  vectorised decoding.
- :mod:`reliability.oracle`: the expected-state oracle (RocksDB style): per LBA, the content
  at the last acknowledged flush plus every write issued after it.
- :mod:`reliability.chain`: seeded chain configurations, building a chain, the verification
  run after every crash (reopen RO/RW, check(), ``qemu-img check``, oracle, backing hashes).
- :mod:`reliability.workload`: the seeded operation generator shared by the kill worker, the
  power-loss simulator and the fault matrix.
- :mod:`reliability.worker`: the process that the kill harness SIGKILLs (``python -m``).
- :mod:`reliability.killer`: one kill lane (``python -m``; runs workers, kills, verifies).
- :mod:`reliability.powerloss`: the barrier recorder and crash-image builder (C3).
- :mod:`reliability.summary`: the one-line figures printed at the end of the pytest run.

Everything is derived from a seed; every failure message carries the seed and the crash point
(hook, kill delay, barrier index, variant), which together replay the case.
"""
