"""Generate the Python code of the .proto files beside this module: `python -m atop_proto.generate OUT_ROOT`.

OUT_ROOT is the folder that holds atop_proto/ (proto/ to regenerate in place, a temporary folder to compare).
"""

from __future__ import annotations

import sys
from pathlib import Path

from grpc_tools import protoc

HERE = Path(__file__).resolve().parent


def generate(out_root: Path) -> list[Path]:
    out_root.mkdir(parents=True, exist_ok=True)
    (out_root / HERE.name).mkdir(exist_ok=True)
    protos = sorted(HERE.glob("*.proto"))
    include = str(HERE.parent)
    args = [
        "protoc",
        f"-I{include}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *(str(p.relative_to(HERE.parent)) for p in protos),
    ]
    if protoc.main(args) != 0:
        raise SystemExit(f"protoc failed on {', '.join(p.name for p in protos)}")
    return sorted((out_root / HERE.name).glob("*_pb2*"))


if __name__ == "__main__":
    for path in generate(Path(sys.argv[1] if len(sys.argv) > 1 else HERE.parent)):
        print(path)
