"""Helpers of the inference tests: bundles written to disk, and a small network trained here.

The network is real but small: `train_patch_classifier` trains it on the CPU, within the
test session, to tell 16x16 patches of the CT image in pydicom's test files (CT_small.dcm)
from patches of its MR image (MR_small.dcm). Each patch is normalized to zero mean and unit
variance first, so it must learn from texture and local contrast, not from absolute
intensities. It is evaluated on fresh random patches of the same two images, so its accuracy
says it learned these images, not that it would tell CT from MR in general. What the tests
need from it is weights that came out of training on real pixels, and a known answer to
compare the backends against.
"""

from __future__ import annotations

import json
import threading
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from pydicom import dcmread
from pydicom.data import get_testdata_file
from torch.jit._trace import TracerWarning

from medimg_inference.backends import Array, Backend, BackendOptions, Batch, load_backend
from medimg_inference.repository import METADATA_PATH, ModelConfig

PATCH = 16
CLASSES = ("CT", "MR")
#: TorchScript is deprecated in torch 2.13 (torch.export replaces it) yet still how MONAI
#: bundles ship networks; its functions say so with a DeprecationWarning on every call.
TORCHSCRIPT_DEPRECATED = r"ignore:`torch\.jit\.\w+` is deprecated:DeprecationWarning"

Float32Array = npt.NDArray[np.float32]


def tensor_json(
    channels: int,
    spatial_shape: list[int | str],
    *,
    dtype: str = "float32",
    kind: str = "image",
    channel_def: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """One tensor of `network_data_format`, as the MONAI bundle specification writes it."""
    return {
        "type": kind,
        "format": "magnitude" if kind == "image" else "classes",
        "modality": "n/a",
        "num_channels": channels,
        "spatial_shape": spatial_shape,
        "dtype": dtype,
        "value_range": [],
        "is_patch_data": False,
        "channel_def": dict(channel_def or {"0": "image"}),
    }


def metadata_json(
    inputs: Mapping[str, Any], outputs: Mapping[str, Any], medimg: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """A complete metadata.json (the MONAI mandatory keys, then the tensors)."""
    metadata: dict[str, Any] = {
        "version": "0.1.0",
        "monai_version": "1.6.1",
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "optional_packages_version": {},
        "task": "test model",
        "description": "a model written by the medimg inference tests",
        "authors": "medimg",
        "copyright": "medimg",
        "network_data_format": {"inputs": dict(inputs), "outputs": dict(outputs)},
    }
    if medimg is not None:
        metadata["medimg"] = dict(medimg)
    return metadata


def write_bundle(
    root: Path,
    name: str,
    version: int,
    metadata: Mapping[str, Any] | str,
    model_files: Mapping[str, Path | bytes] | None = None,
) -> Path:
    """Writes `<root>/<name>/<version>/` with metadata.json (a dict, or raw text) and model
    files (file name under models/ -> a file to link to, or the bytes to write)."""
    bundle = root / name / str(version)
    (bundle / METADATA_PATH).parent.mkdir(parents=True, exist_ok=True)
    text = metadata if isinstance(metadata, str) else json.dumps(metadata, indent=2)
    (bundle / METADATA_PATH).write_text(text)
    (bundle / "models").mkdir(exist_ok=True)
    for file_name, content in (model_files or {}).items():
        target = bundle / "models" / file_name
        if isinstance(content, bytes):
            target.write_bytes(content)
        else:
            target.symlink_to(content.resolve())
    return bundle


class PatchClassifier(torch.nn.Module):
    """(N, 1, 16, 16) float32 normalized patches -> (N, 2) float32 class probabilities
    (CT, MR)."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Conv2d(1, 8, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(8, 16, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1),
            torch.nn.Flatten(),
            torch.nn.Linear(16, len(CLASSES)),
        )

    def forward(self, patch: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.layers(patch), dim=1)


def _images() -> list[Float32Array]:
    images = []
    for name in ("CT_small.dcm", "MR_small.dcm"):  # in CLASSES order
        path = get_testdata_file(name, download=False)
        assert isinstance(path, str), f"pydicom's wheel lacks {name}"
        images.append(dcmread(path).pixel_array.astype(np.float32))
    return images


def random_patches(
    count: int, rng: np.random.Generator, *, normalized: bool = True
) -> tuple[Float32Array, npt.NDArray[np.int64]]:
    """`count` random patches (N, 1, 16, 16) float32 and their labels (index into CLASSES).
    Near-uniform patches (air) are left out: they carry no texture to learn from."""
    images = _images()
    labels = rng.integers(len(images), size=count * 2)
    crops = []
    for label in labels:
        image = images[label]
        row, column = (rng.integers(0, size - PATCH + 1) for size in image.shape)
        crops.append(image[row : row + PATCH, column : column + PATCH])
    patches = np.stack(crops)[:, None]
    std = patches.std(axis=(1, 2, 3), keepdims=True)
    keep = std[:, 0, 0, 0] > 1.0
    if normalized:
        # What MONAI's NormalizeIntensity() does to one item: the bundle's preprocessing.
        patches = (patches - patches.mean(axis=(1, 2, 3), keepdims=True)) / std
    return patches[keep][:count].astype(np.float32), labels[keep][:count]


@contextmanager
def _torch_threads(count: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_patch_classifier(steps: int = 300) -> PatchClassifier:
    """The classifier of the module docstring, trained with Adam, in eval mode."""
    torch.manual_seed(0)
    patches, labels = random_patches(2048, np.random.default_rng(0))
    inputs, targets = torch.from_numpy(patches), torch.from_numpy(labels)
    network = PatchClassifier()
    optimizer = torch.optim.Adam(network.parameters(), lr=2e-2)
    # One thread: this network is too small for two to help, and the tests run beside others.
    with _torch_threads(1):
        for _ in range(steps):
            batch = torch.randint(0, len(inputs), (32,))
            loss = torch.nn.functional.cross_entropy(network.layers(inputs[batch]), targets[batch])
            optimizer.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
    return network.eval()


def export_torchscript(network: torch.nn.Module, path: Path) -> Path:
    example = torch.zeros(2, 1, PATCH, PATCH)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"`torch\.jit\.\w+` is deprecated", DeprecationWarning)
        torch.jit.trace(network, example).save(str(path))  # type: ignore[no-untyped-call]
    return path


def export_onnx(network: torch.nn.Module, path: Path) -> Path:
    """ONNX through torch.export, with a dynamic batch axis (its example batch must be at
    least 2, or torch.export specializes the size to 1)."""
    example = torch.zeros(2, 1, PATCH, PATCH)
    with warnings.catch_warnings():
        # Raised inside torch's own exporter (its pytree use), nothing this test can change.
        warnings.filterwarnings("ignore", r".*LeafSpec.* is deprecated", FutureWarning)
        program = torch.onnx.export(
            network,
            (example,),
            input_names=["patch"],
            output_names=["probabilities"],
            dynamic_shapes={"patch": {0: torch.export.Dim("batch")}},
            verbose=False,
        )
    assert program is not None
    program.save(str(path))
    return path


def classifier_metadata(medimg: Mapping[str, Any] | None = None) -> dict[str, Any]:
    return metadata_json(
        {"patch": tensor_json(1, [PATCH, PATCH])},
        {
            "probabilities": tensor_json(
                len(CLASSES),
                [],
                kind="probabilities",
                channel_def={str(index): name for index, name in enumerate(CLASSES)},
            )
        },
        {"preprocessing": [{"_target_": "NormalizeIntensity"}], **(medimg or {})},
    )


@dataclass(frozen=True)
class TrainedClassifier:
    """The trained network, in process and exported, with patches it has not seen."""

    network: PatchClassifier
    torchscript: Path
    onnx: Path
    patches: Float32Array
    labels: npt.NDArray[np.int64]

    def expected(self, patches: Float32Array) -> Float32Array:
        """The in-process network's probabilities, the reference for the backends."""
        with torch.inference_mode():
            probabilities: Float32Array = self.network(torch.tensor(patches)).numpy()
        return probabilities


def deepbet_model(name: str = "bbox_model.pt") -> Path | None:
    """A TorchScript network shipped in the deepbet wheel (under `<prefix>/data/models`), or
    None where deepbet is not installed."""
    try:
        path = Path(str(distribution("deepbet").locate_file(f"data/models/{name}")))
    except PackageNotFoundError:
        return None
    return path if path.is_file() else None


class NanRefusingClassifier(torch.nn.Module):
    """The trained classifier behind a check a real model might make: a batch holding a NaN
    raises, in TorchScript, as a model refusing its input does."""

    def __init__(self, classifier: PatchClassifier) -> None:
        super().__init__()
        self.classifier = classifier

    def forward(self, patch: torch.Tensor) -> torch.Tensor:
        if bool(torch.isnan(patch).any()):
            raise ValueError("the patch holds NaN")
        probabilities: torch.Tensor = self.classifier(patch)
        return probabilities


def export_scripted(network: torch.nn.Module, path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"`torch\.jit\.\w+` is deprecated", DeprecationWarning)
        torch.jit.script(network).save(str(path))  # type: ignore[no-untyped-call]
    return path


class GatedBackend(Backend):
    """A real backend whose executions wait for `gate` and are recorded, so a test can hold
    the model busy and see exactly which rows it ran. Executions happen in the batcher's
    threads, hence a threading.Event."""

    def __init__(self, inner: Backend) -> None:
        super().__init__(inner.config)
        self.inner = inner
        self.gate = threading.Event()
        self.gate.set()
        self.started = threading.Event()
        self.executed: list[Float32Array] = []

    @classmethod
    def load(cls, config: ModelConfig, options: BackendOptions) -> GatedBackend:
        return cls(load_backend(config, options))

    def execute(self, batch: Batch) -> dict[str, Array]:
        self.started.set()
        if not self.gate.wait(timeout=30):
            raise TimeoutError("the test never opened the gate")
        self.executed.append(np.array(batch["patch"]))
        return self.inner.execute(batch)

    def close(self) -> None:
        self.inner.close()

    @property
    def rows_executed(self) -> int:
        return sum(len(batch) for batch in self.executed)


#: The voxel value above which ThresholdSegmenter labels a voxel "bright".
THRESHOLD = 200.0


class ThresholdSegmenter(torch.nn.Module):
    """A 1x1x1 convolution whose two logits are (0, x - THRESHOLD): its argmax labels the
    voxels above THRESHOLD, an answer a test knows. (N, 1, X, Y, Z) -> (N, 2, X, Y, Z)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv3d(1, 2, 1)
        weight = torch.tensor([0.0, 1.0]).reshape(2, 1, 1, 1, 1)
        self.conv.weight = torch.nn.Parameter(weight)
        self.conv.bias = torch.nn.Parameter(torch.tensor([0.0, -THRESHOLD]))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.conv(image)
        return logits


def export_traced(network: torch.nn.Module, example: torch.Tensor, path: Path) -> Path:
    """`network` in eval mode, traced on `example` and saved as TorchScript."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"`torch\.jit\.\w+` is deprecated", DeprecationWarning)
        warnings.filterwarnings("ignore", category=TracerWarning)
        torch.jit.trace(network.eval(), example).save(str(path))  # type: ignore[no-untyped-call]
    return path


def segmenter_metadata(preprocessing: list[Any] | None = None) -> dict[str, Any]:
    """metadata.json of ThresholdSegmenter: any 3D size, labels background and bright."""
    spatial: list[int | str] = ["*", "*", "*"]
    return metadata_json(
        {"image": tensor_json(1, spatial)},
        {"logits": tensor_json(2, spatial, kind="segmentation")},
        {
            "labels": ["background", "bright"],
            "preprocessing": preprocessing or [],
            "postprocessing": [{"_target_": "AsDiscrete", "argmax": True}],
        },
    )
