"""Exports a trained network as the bundle the inference service loads (the contract is
`medimg_inference.repository`): `configs/metadata.json`, `models/model.ts` (TorchScript)
and `models/model.onnx` when the ONNX export runs and agrees with torch.

The exported model takes `image`, (N, 1, *image_size) float32 in [0, 1] after the
preprocessing that metadata.json names (MONAI axis order: columns, rows[, slices]), and
returns `pred`, float32 probabilities (the softmax is part of the model): (N, classes) for
a classifier, (N, labels, *image_size) for a segmenter, whose metadata says
`"task": "segmentation"` so that the inference service carries its label map back through
the inverse of the preprocessing onto the series' grid.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medimg_training import networks
from medimg_training.worker import preprocessing


class Probabilities(torch.nn.Module):
    def __init__(self, network: torch.nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.network(image), dim=1)


def load_weights(config: Mapping[str, Any]) -> torch.nn.Module:
    from medimg_training.worker import latest_checkpoint

    spec = config["spec"]
    model = networks.build(spec["network"]["name"], config["network_arguments"])
    checkpoint = latest_checkpoint(Path(config["job_dir"]))
    assert checkpoint is not None, "training saves a checkpoint before the export"
    model.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True)["model"])
    return model


def export(config: Mapping[str, Any], out: Path, metrics: Mapping[str, float]) -> None:
    spec = config["spec"]
    image_size = list(spec["image_size"])
    model = Probabilities(load_weights(config)).eval()
    (out / "models").mkdir(parents=True, exist_ok=True)
    (out / "configs").mkdir(parents=True, exist_ok=True)
    example = torch.rand(2, 1, *image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(example)
        try:
            scripted: Any = torch.jit.script(model)
        except Exception:  # noqa: BLE001 - not every MONAI network scripts; tracing covers the rest
            scripted = torch.jit.trace(model, example)  # type: ignore[no-untyped-call]
        scripted.save(str(out / "models" / "model.ts"))
    platform = (
        "onnx"
        if _export_onnx(model, example, expected, out / "models" / "model.onnx")
        else ("torchscript")
    )
    classes = list(config["class_names"])
    segmenting = config.get("task") == "segmentation"
    what = "segmentation" if segmenting else "classification"
    metadata = {
        "version": "0.1.0",
        "monai_version": _version("monai"),
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "optional_packages_version": {},
        "task": f"{what} of {', '.join(classes)}",
        "description": f"trained by trainingJobs/{config['job_id']} on {config['dataset']}",
        "authors": config["creator"],
        "copyright": "medimg",
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image", "format": "magnitude", "modality": "n/a",
                    "num_channels": 1, "spatial_shape": image_size, "dtype": "float32",
                    "value_range": [0, 1], "is_patch_data": False,
                    "channel_def": {"0": "image"},
                }
            },
            "outputs": {
                "pred": {
                    "type": "probabilities",
                    "format": "segmentation" if segmenting else "classes", "modality": "n/a",
                    "num_channels": len(classes),
                    "spatial_shape": image_size if segmenting else [], "dtype": "float32",
                    "value_range": [0, 1], "is_patch_data": False,
                    "channel_def": {str(i): name for i, name in enumerate(classes)},
                }
            },
        },
        "medimg": {
            "task": what,
            "platform": platform,
            # A 2D model's items are slices (many per series), a 3D model's whole volumes.
            "max_batch_size": 1 if segmenting and len(image_size) == 3 else 8,
            "labels": classes,
            "preprocessing": preprocessing(image_size),
            "postprocessing": [],
        },
        "medimg_training": {
            "training_job": f"trainingJobs/{config['job_id']}",
            "dataset": config["dataset"],
            "code_version": config["code_version"],
            "metrics": dict(metrics),
            "network": spec["network"]["name"],
            "network_arguments": config["network_arguments"],
        },
    }  # fmt: skip
    (out / "configs" / "metadata.json").write_text(json.dumps(metadata, indent=2))


def _export_onnx(
    model: torch.nn.Module, example: torch.Tensor, expected: torch.Tensor, path: Path
) -> bool:
    """Exports with a dynamic batch; keeps the file only if onnxruntime agrees with torch."""
    try:
        import onnxruntime

        torch.onnx.export(
            model,
            (example,),
            str(path),
            input_names=["image"],
            output_names=["pred"],
            dynamic_axes={"image": {0: "batch"}, "pred": {0: "batch"}},
            dynamo=False,
        )
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = session.run(["pred"], {"image": example.numpy()})[0]
        if np.allclose(got, expected.numpy(), atol=1e-4):
            return True
    except Exception:  # noqa: BLE001 - an exporter gap for this network: TorchScript alone serves it
        pass
    path.unlink(missing_ok=True)
    return False


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)
