"""Atheris entry point: ``python fuzz/run.py TARGET [libFuzzer options] [CORPUS_DIR ...]``.

TARGET is one of fuzz/targets.py's TARGETS (header, read, check, write, ext, backing). An
EngineError is the allowed outcome and is caught inside the target; any other exception,
signal, hang (-timeout) or memory blow-up (-rss_limit_mb) is reported by libFuzzer and the
input saved (-artifact_prefix). See fuzz/README.md.
"""

import os
import sys

import atheris

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

if len(sys.argv) < 2 or sys.argv[1].startswith("-"):
    sys.exit("usage: python fuzz/run.py TARGET [libFuzzer options] [corpus dirs]")
TARGET = sys.argv.pop(1)

with atheris.instrument_imports():
    import engine.check  # noqa: F401
    import engine.format  # noqa: F401
    import engine.image  # noqa: F401

import targets  # noqa: E402

fn = targets.TARGETS[TARGET]


def one_input(data: bytes) -> None:
    fn(data)


atheris.Setup(sys.argv, one_input)
atheris.Fuzz()
