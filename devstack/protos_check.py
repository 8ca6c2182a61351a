"""Fails (exit 1) when protos/gen differs from what protoc generates from protos/*.proto now."""

from __future__ import annotations

import filecmp
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ROOT / "protos"
GENERATED = SOURCES / "gen" / "influence" / "v1"


def main() -> int:
    protos = sorted(str(p.relative_to(SOURCES)) for p in (SOURCES / "influence" / "v1").glob("*.proto"))
    with tempfile.TemporaryDirectory() as out:
        args = [
            "protoc",
            f"-I{SOURCES}",
            f"-I{Path(protoc.__file__).parent / '_proto'}",
            f"--python_out={out}",
            f"--pyi_out={out}",
            f"--grpc_python_out={out}",
            *protos,
        ]
        if protoc.main(args) != 0:
            print("protoc failed", file=sys.stderr)
            return 1
        fresh = Path(out) / "influence" / "v1"
        expected = sorted(p.name for p in fresh.iterdir() if p.is_file())
        present = sorted(p.name for p in GENERATED.glob("*_pb2*.py*")) if GENERATED.exists() else []
        stale = [
            n
            for n in expected
            if n not in present or not filecmp.cmp(fresh / n, GENERATED / n, shallow=False)
        ]
        extra = [n for n in present if n not in expected]
    if stale or extra:
        print(f"protos/gen is stale ({', '.join(stale + extra)}): run `make protos`", file=sys.stderr)
        return 1
    print(f"protos/gen is up to date ({len(expected)} files)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
