"""Fixtures of the inference tests: the patch classifier, trained once per session."""

from __future__ import annotations

import numpy as np
import pytest

from services.inference.tests.support import (
    TrainedClassifier,
    export_onnx,
    export_torchscript,
    random_patches,
    train_patch_classifier,
)


@pytest.fixture(scope="session")
def classifier(tmp_path_factory: pytest.TempPathFactory) -> TrainedClassifier:
    """The patch classifier of support.py, trained, exported to TorchScript and ONNX."""
    exported = tmp_path_factory.mktemp("classifier")
    network = train_patch_classifier()
    patches, labels = random_patches(256, np.random.default_rng(1))
    return TrainedClassifier(
        network=network,
        torchscript=export_torchscript(network, exported / "model.ts"),
        onnx=export_onnx(network, exported / "model.onnx"),
        patches=patches,
        labels=labels,
    )
