"""Generates the Python stubs and the gateway's descriptor set from protos/.

Run from anywhere: `python libs/medimg-protos/generate.py`. The output is never
hand-edited and never committed; the set-up runs this before installing.
"""

from __future__ import annotations

import shutil
import sys
import sysconfig
from pathlib import Path

from grpc_tools import protoc

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
PROTOS = ROOT / "protos"
GOOGLEAPIS = ROOT / "third_party" / "googleapis"
#: The parts of Envoy's APIs medimg reads (each file says which and why).
ENVOY = ROOT / "third_party" / "envoy"
OUT = HERE / "src"
DESCRIPTOR_SET = OUT / "medimg_protos" / "descriptor_set.binpb"
#: Not generated (googleapis-common-protos has them) but in the descriptor set, so the
#: gateway can render error details (google.rpc.ErrorInfo) of a failed call as JSON.
ERROR_PROTOS = ["google/rpc/status.proto", "google/rpc/error_details.proto"]


def main() -> int:
    sources = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    generated = OUT / "medimg"
    if generated.exists():
        shutil.rmtree(generated)
    plugin = Path(sysconfig.get_path("scripts")) / "protoc-gen-mypy_grpc"
    well_known = Path(protoc.__file__).parent / "_proto"
    includes = [f"-I{PROTOS}", f"-I{GOOGLEAPIS}", f"-I{well_known}"]
    envoy = sorted(str(p.relative_to(ENVOY)) for p in ENVOY.rglob("*.proto"))
    stubs = [
        "protoc",
        *includes,
        f"-I{ENVOY}",
        f"--python_out={OUT}",
        f"--pyi_out={OUT}",
        f"--grpc_python_out={OUT}",
        f"--plugin=protoc-gen-mypy_grpc={plugin}",
        f"--mypy_grpc_out={OUT}",
        *sources,
        *envoy,
    ]
    descriptors = [
        "protoc",
        *includes,
        "--include_imports",
        "--include_source_info",
        f"--descriptor_set_out={DESCRIPTOR_SET}",
        *sources,
        *ERROR_PROTOS,
    ]
    if protoc.main(stubs) != 0 or protoc.main(descriptors) != 0:
        return 1
    for package in generated.rglob("*"):
        if package.is_dir():
            (package / "py.typed").touch()
    print(f"generated {len(sources) + len(envoy)} proto files into {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
