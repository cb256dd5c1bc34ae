"""Regenerate the Python code for protos/ into node/proto/ (committed; a test checks it is current).

Run `python -m rollshare.protogen` after editing a .proto file. Needs grpcio-tools.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
OUT = ROOT / "node" / "proto"


def generate(out_dir: Path) -> list[Path]:
    """Generate *_pb2.py, *_pb2.pyi and *_pb2_grpc.py for every .proto into out_dir."""
    from grpc_tools import protoc
    import grpc_tools

    protos = sorted((PROTO_ROOT / "rollshare" / "proto").glob("*.proto"))
    include = Path(grpc_tools.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        args = ["protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={tmp}", f"--pyi_out={tmp}",
                f"--grpc_python_out={tmp}"] + [str(p) for p in protos]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
        gen = Path(tmp) / "rollshare" / "proto"
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for f in sorted(gen.iterdir()):
            if f.suffix in (".py", ".pyi"):
                shutil.copy(f, out_dir / f.name)
                written.append(out_dir / f.name)
        return written


if __name__ == "__main__":
    for p in generate(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT):
        print(p.relative_to(ROOT) if p.is_relative_to(ROOT) else p)
