"""Writes generated/ from protos/: Python messages, gRPC stubs and .pyi stubs (mypy-protobuf), and
generated/nexus/descriptors.binpb: every proto with the files it imports, comments included, as a
FileDescriptorSet, which server reflection answers from (the Python modules drop the comments).

Run: python protos/generate.py [--out DIR]. generated/ is only ever written by this script.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
DEFAULT_OUT = PROTO_ROOT.parent / "generated"
# The descriptor set, under generated/ (the `nexus` package, so an installed service has it too).
DESCRIPTOR_SET = Path("nexus", "descriptors.binpb")


def proto_files() -> list[Path]:
    return sorted(PROTO_ROOT.rglob("*.proto"))


def generate(out: Path) -> None:
    from grpc_tools import protoc
    import grpc_tools

    if out.exists():
        shutil.rmtree(out)
    (out / DESCRIPTOR_SET).parent.mkdir(parents=True)
    bindir = Path(sys.executable).parent
    include = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--plugin=protoc-gen-mypy={bindir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bindir / 'protoc-gen-mypy_grpc'}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
        "--include_imports",
        "--include_source_info",
        f"--descriptor_set_out={out / DESCRIPTOR_SET}",
        *(str(p.relative_to(PROTO_ROOT)) for p in proto_files()),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    # Regular packages, so setuptools ships them and `from nexus.work.v1 import work_pb2` works.
    for folder in [out, *(p for p in out.rglob("*") if p.is_dir())]:
        if folder != out:
            (folder / "__init__.py").touch()
    (out / "README.md").write_text(
        "Written by `python protos/generate.py` from `protos/`. Do not edit by hand.\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    generate(parser.parse_args().out)


if __name__ == "__main__":
    main()
