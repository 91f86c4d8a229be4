"""Generates the Python stubs and the gateway's descriptor set from protos/.

Run from anywhere: `python libs/medimg-protos/generate.py`. The output is never
hand-edited and never committed; the set-up runs this before installing.
"""

from __future__ import annotations

import re
import shutil
import sys
import sysconfig
import tempfile
from pathlib import Path

from grpc_tools import protoc

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
PROTOS = ROOT / "protos"
GOOGLEAPIS = ROOT / "third_party" / "googleapis"
#: KServe v2 / Open Inference Protocol, as Triton publishes it: its files import each other
#: by bare name ("model_config.proto"), so they are compiled from their own directory and
#: keep Triton's file names. tritonclient registers the very same files in the protobuf
#: pool; under other names, importing both in one process would fail on duplicate symbols.
KSERVE = PROTOS / "inference"
#: The Python package the KServe stubs go into (`inference.grpc_service_pb2`).
KSERVE_PACKAGE = "inference"
#: The parts of Envoy's APIs medimg reads (each file says which and why).
ENVOY = ROOT / "third_party" / "envoy"
OUT = HERE / "src"
DESCRIPTOR_SET = OUT / "medimg_protos" / "descriptor_set.binpb"
#: Not generated (googleapis-common-protos has them) but in the descriptor set, so the
#: gateway can render error details (google.rpc.ErrorInfo) of a failed call as JSON.
ERROR_PROTOS = ["google/rpc/status.proto", "google/rpc/error_details.proto"]


def main() -> int:
    sources = sorted(
        str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto") if not p.is_relative_to(KSERVE)
    )
    kserve = sorted(p.name for p in KSERVE.glob("*.proto"))
    generated = [OUT / "medimg", OUT / KSERVE_PACKAGE]
    for package in generated:
        if package.exists():
            shutil.rmtree(package)
    plugin = Path(sysconfig.get_path("scripts")) / "protoc-gen-mypy_grpc"
    well_known = Path(protoc.__file__).parent / "_proto"
    includes = [f"-I{PROTOS}", f"-I{KSERVE}", f"-I{GOOGLEAPIS}", f"-I{well_known}"]
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
        *kserve,
        *ERROR_PROTOS,
    ]
    if protoc.main(stubs) != 0 or protoc.main(descriptors) != 0:
        return 1
    if not _generate_kserve(kserve, includes, plugin):
        return 1
    for root in generated:
        for package in (root, *root.rglob("*")):
            if package.is_dir():
                (package / "py.typed").touch()
    print(f"generated {len(sources) + len(kserve) + len(envoy)} proto files into {OUT}")
    return 0


def _generate_kserve(files: list[str], includes: list[str], plugin: Path) -> bool:
    """The KServe stubs, in the `inference` package. protoc writes them as top-level modules
    (their proto paths have no directory), so they are moved there and their imports of
    each other made absolute, as tritonclient does with its copy."""
    with tempfile.TemporaryDirectory() as tmp:
        command = [
            "protoc",
            *includes,
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            f"--plugin=protoc-gen-mypy_grpc={plugin}",
            f"--mypy_grpc_out={tmp}",
            *files,
        ]
        if protoc.main(command) != 0:
            return False
        modules = "|".join(re.escape(Path(name).stem + "_pb2") for name in files)
        sibling = re.compile(rf"^import ({modules}) as ", re.MULTILINE)
        package = OUT / KSERVE_PACKAGE
        package.mkdir()
        (package / "__init__.py").write_text("")
        for stub in sorted(Path(tmp).iterdir()):
            text = sibling.sub(rf"from {KSERVE_PACKAGE} import \1 as ", stub.read_text())
            (package / stub.name).write_text(text)
    return True


if __name__ == "__main__":
    sys.exit(main())
