"""The backends on real networks: a classifier trained in this session, exported to
TorchScript and ONNX, must answer as it does in process, in its own runtime and in OpenVINO;
a brain-extraction network shipped in the deepbet wheel serves from a bundle with no code
written for it; what cannot run here fails with a reason."""

from __future__ import annotations

import importlib.util
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from pydicom import dcmread
from pydicom.data import get_testdata_file

from medimg_core import cpus
from medimg_core.errors import FailedPrecondition, InvalidArgument
from medimg_inference.backends import (
    TORCH_CPU,
    Backend,
    BackendOptions,
    OpenVinoBackend,
    TorchScriptBackend,
    load_backend,
    on_torch_cpu,
)
from medimg_inference.repository import ModelRepository, Platform
from medimg_inference.serving import ModelServer
from services.inference.tests.support import (
    TORCHSCRIPT_DEPRECATED,
    TrainedClassifier,
    classifier_metadata,
    deepbet_model,
    metadata_json,
    tensor_json,
    write_bundle,
)

pytestmark = pytest.mark.filterwarnings(TORCHSCRIPT_DEPRECATED)

OPTIONS = BackendOptions(intra_op_threads=2)
MODEL_FILES = {Platform.TORCHSCRIPT: "model.ts", Platform.ONNX: "model.onnx"}
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here")


def _loaded(tmp_path: Path, metadata: dict[str, Any], files: dict[str, Any]) -> Backend:
    """Version 1 of model "patches" (this metadata.json and model files), loaded."""
    write_bundle(tmp_path, "patches", 1, metadata, files)
    return load_backend(ModelRepository(tmp_path).config("patches"), OPTIONS)


def _exported(classifier: TrainedClassifier, platform: Platform) -> Path:
    return classifier.torchscript if platform is Platform.TORCHSCRIPT else classifier.onnx


def test_the_classifier_learned_its_task(classifier: TrainedClassifier) -> None:
    predicted = classifier.expected(classifier.patches).argmax(axis=1)
    assert (predicted == classifier.labels).mean() > 0.9


@pytest.mark.parametrize("accelerator", ["none", "openvino"])
@pytest.mark.parametrize("platform", [Platform.TORCHSCRIPT, Platform.ONNX])
@pytest.mark.parametrize("batch_size", [1, 7])
def test_a_backend_answers_as_the_network_does_in_process(
    tmp_path: Path,
    classifier: TrainedClassifier,
    platform: Platform,
    batch_size: int,
    accelerator: str,
) -> None:
    model_file = {MODEL_FILES[platform]: _exported(classifier, platform)}
    metadata = classifier_metadata({"accelerator": accelerator})
    backend = _loaded(tmp_path, metadata, model_file)
    assert isinstance(backend, OpenVinoBackend) is (accelerator == "openvino")
    patches = classifier.patches[:batch_size]

    outputs = backend.execute({"patch": patches})
    backend.close()

    assert list(outputs) == ["probabilities"]
    assert outputs["probabilities"].shape == (batch_size, 2)
    assert outputs["probabilities"].dtype == np.float32
    np.testing.assert_allclose(
        outputs["probabilities"], classifier.expected(patches), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("optimize", [True, False])
def test_torchscript_on_the_cpu_is_served_frozen_unless_told_not_to(
    tmp_path: Path, classifier: TrainedClassifier, optimize: bool
) -> None:
    metadata = classifier_metadata({"optimize": optimize})
    backend = _loaded(tmp_path, metadata, {"model.ts": classifier.torchscript})
    assert isinstance(backend, TorchScriptBackend)

    # Frozen: the weights are constants of the graph, no longer parameters.
    assert (not list(backend.module.parameters())) is optimize
    outputs = backend.execute({"patch": classifier.patches})
    np.testing.assert_allclose(
        outputs["probabilities"], classifier.expected(classifier.patches), rtol=1e-5, atol=1e-6
    )


def test_a_module_torch_cannot_freeze_is_served_as_stored(
    tmp_path: Path,
    classifier: TrainedClassifier,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def cannot(module: torch.jit.ScriptModule, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("freezing is not supported for this module")

    monkeypatch.setattr(torch.jit, "freeze", cannot)
    metadata = classifier_metadata({"optimize": True})
    backend = _loaded(tmp_path, metadata, {"model.ts": classifier.torchscript})
    assert isinstance(backend, TorchScriptBackend)

    assert list(backend.module.parameters())
    np.testing.assert_allclose(
        backend.execute({"patch": classifier.patches})["probabilities"],
        classifier.expected(classifier.patches),
        rtol=1e-5,
        atol=1e-6,
    )
    (warning,) = [r for r in caplog.records if "cannot freeze" in r.getMessage()]
    assert warning.fields == {"model": "patches", "version": 1, "error": "RuntimeError"}  # type: ignore[attr-defined]


@pytest.mark.parametrize("accelerator", ["none", "openvino"])
def test_read_only_inputs_are_accepted(
    tmp_path: Path, classifier: TrainedClassifier, accelerator: str
) -> None:
    # Arrays made from request bytes (np.frombuffer) are read-only.
    metadata = classifier_metadata({"accelerator": accelerator})
    backend = _loaded(tmp_path, metadata, {"model.ts": classifier.torchscript})
    patches = np.frombuffer(classifier.patches[:2].tobytes(), np.float32).reshape(2, 1, 16, 16)

    outputs = backend.execute({"patch": patches})

    np.testing.assert_allclose(outputs["probabilities"], classifier.expected(patches), atol=1e-6)


def test_openvino_sends_no_telemetry(
    tmp_path: Path, classifier: TrainedClassifier, monkeypatch: pytest.MonkeyPatch
) -> None:
    """OpenVINO's converter reports each conversion to Intel and keeps a client ID under
    ~/intel when its telemetry package is importable (it is installed: openvino needs it)
    and no consent file says no. The backend keeps it from being imported."""
    assert (
        importlib.util.find_spec("openvino_telemetry") is not None
        or "openvino_telemetry" in sys.modules
    )
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("CI", raising=False)  # the telemetry declines in CI of its own accord
    metadata = classifier_metadata({"accelerator": "openvino"})
    write_bundle(tmp_path, "patches", 1, metadata, {"model.ts": classifier.torchscript})

    load_backend(ModelRepository(tmp_path).config("patches"), OPTIONS).close()

    assert sys.modules["openvino_telemetry"] is None
    assert not (tmp_path / "home").exists()


@pytest.mark.parametrize("accelerator", ["none", "openvino"])
def test_a_replica_answers_as_the_first_and_openvino_converts_once(
    tmp_path: Path, classifier: TrainedClassifier, monkeypatch: pytest.MonkeyPatch, accelerator: str
) -> None:
    import openvino

    conversions: list[object] = []
    convert = openvino.convert_model

    def counted(*args: Any, **kwargs: Any) -> Any:
        conversions.append(args[0])
        return convert(*args, **kwargs)

    monkeypatch.setattr(openvino, "convert_model", counted)
    metadata = classifier_metadata({"accelerator": accelerator})
    first = _loaded(tmp_path, metadata, {"model.ts": classifier.torchscript})
    second = first.replicate(BackendOptions(intra_op_threads=1))
    first.close()  # a replica does not depend on the copy it came from
    patches = classifier.patches[:4]

    outputs = second.execute({"patch": patches})
    second.close()

    assert type(second) is type(first)
    assert len(conversions) == (1 if accelerator == "openvino" else 0)
    np.testing.assert_allclose(outputs["probabilities"], classifier.expected(patches), atol=1e-5)


def test_openvino_needs_the_declared_outputs_of_a_module(
    tmp_path: Path, classifier: TrainedClassifier
) -> None:
    metadata = classifier_metadata({"accelerator": "openvino"})
    outputs = metadata["network_data_format"]["outputs"]
    outputs["logits"] = outputs["probabilities"]
    write_bundle(tmp_path, "patches", 1, metadata, {"model.ts": classifier.torchscript})

    with pytest.raises(FailedPrecondition) as error:
        load_backend(ModelRepository(tmp_path).config("patches"), OPTIONS)

    assert error.value.reason == "MODEL_SIGNATURE_MISMATCH"
    assert "the module has 1 outputs, not 2" in error.value.message


def _brain_mr_volume() -> np.ndarray:
    """emri_small.dcm of pydicom-data: a real multi-frame head MR, (frames, rows, columns)."""
    path = get_testdata_file("emri_small.dcm", download=False)
    if path is None:
        pytest.skip("pydicom-data is not installed")
    return dcmread(path).pixel_array.astype(np.float32)


@pytest.mark.parametrize("accelerator", ["none", "openvino"])
async def test_deepbet_serves_from_a_bundle_without_code(tmp_path: Path, accelerator: str) -> None:
    """deepbet's bounding-box network (a TorchScript 3D U-Net, (N, 1, D, H, W) -> softmax
    (N, 2, D, H, W), each spatial size a multiple of 32) from its wheel, described by a
    metadata.json alone. Its intensity normalization is written as MONAI transforms in the
    bundle (the percentile window, z-score, then 0.226 x + 0.449 as deepbet.utils.normalize);
    the volume is resized to 64 cubed rather than resampled to RAS, so the mask only has to
    be plausible: some brain, not all of the volume."""
    network = deepbet_model()
    if network is None:
        pytest.skip("deepbet is not installed (scripts/setup.sh installs it)")
    volume = tensor_json(1, ["32*n", "32*n", "32*n"])
    mask = tensor_json(
        2, ["32*n", "32*n", "32*n"], kind="image", channel_def={"0": "background", "1": "brain"}
    )
    preprocessing = [
        {"_target_": "Resize", "spatial_size": [64, 64, 64]},
        {
            "_target_": "ScaleIntensityRangePercentiles",
            "lower": 0.5,
            "upper": 99.5,
            "b_min": 0.0,
            "b_max": 1.0,
            "clip": True,
        },
        {"_target_": "NormalizeIntensity"},
        {"_target_": "ScaleIntensity", "minv": None, "maxv": None, "factor": -0.774},
        {"_target_": "ShiftIntensity", "offset": 0.449},
    ]
    metadata = metadata_json(
        {"image": volume},
        {"pred": mask},
        {"max_batch_size": 2, "preprocessing": preprocessing, "accelerator": accelerator},
    )
    write_bundle(tmp_path, "deepbet", 1, metadata, {"model.ts": network})
    server = ModelServer(ModelRepository(tmp_path), OPTIONS)
    await server.load("deepbet")
    image = np.asarray(server.model("deepbet").preprocessing(_brain_mr_volume()[None]))

    outputs = await server.infer("deepbet", None, {"image": image[None]})
    with pytest.raises(InvalidArgument) as refused:  # 48 is no multiple of 32
        await server.infer("deepbet", 1, {"image": np.zeros((1, 1, 48, 48, 48), np.float32)})
    await server.close()

    prediction = outputs["pred"]
    assert prediction.shape == (1, 2, 64, 64, 64)
    np.testing.assert_allclose(prediction.sum(axis=1), 1.0, atol=1e-5)
    with torch.inference_mode():
        deepbet = torch.jit.load(str(network))  # type: ignore[no-untyped-call]
        expected = deepbet(torch.from_numpy(image[None])).numpy()
    # Served frozen, on oneDNN convolutions (see backends._optimized), or by OpenVINO: float
    # rounding differs.
    np.testing.assert_allclose(prediction, expected, atol=5e-4)
    brain_fraction = (prediction[0, 1] > 0.5).mean()
    assert 0.01 < brain_fraction < 0.6
    assert refused.value.reason == "MODEL_EXECUTION_FAILED"


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT present")
def test_a_tensorrt_engine_without_tensorrt_fails_clearly(tmp_path: Path) -> None:
    metadata = classifier_metadata({"device": "cuda"})
    write_bundle(tmp_path, "engine", 1, metadata, {"model.plan": b"serialized engine"})

    with pytest.raises(FailedPrecondition) as error:
        load_backend(ModelRepository(tmp_path).config("engine"), OPTIONS)

    assert error.value.reason == "TENSORRT_NOT_INSTALLED"
    assert "`tensorrt` package is not installed" in error.value.message


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT present")
def test_an_engine_to_build_from_onnx_without_tensorrt_fails_clearly(
    tmp_path: Path, classifier: TrainedClassifier
) -> None:
    metadata = classifier_metadata({"platform": "tensorrt", "device": "cuda"})
    write_bundle(tmp_path, "engine", 1, metadata, {"model.onnx": classifier.onnx})

    with pytest.raises(FailedPrecondition) as error:
        load_backend(ModelRepository(tmp_path).config("engine"), OPTIONS)

    assert error.value.reason == "TENSORRT_NOT_INSTALLED"
    assert "asks for a TensorRT engine built from model.onnx" in error.value.message


@pytest.mark.parametrize("accelerator", ["none", "openvino"])
@pytest.mark.parametrize("platform", [Platform.TORCHSCRIPT, Platform.ONNX])
def test_a_corrupt_model_file_cannot_load(
    tmp_path: Path, platform: Platform, accelerator: str
) -> None:
    metadata = classifier_metadata({"accelerator": accelerator})
    write_bundle(tmp_path, "broken", 1, metadata, {MODEL_FILES[platform]: b"\0junk"})

    with pytest.raises(FailedPrecondition) as error:
        load_backend(ModelRepository(tmp_path).config("broken"), OPTIONS)

    assert error.value.reason == "MODEL_FILE_UNLOADABLE"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        pytest.param(
            lambda inputs: inputs.update(image=inputs.pop("patch")),
            "the graph has no input 'image'",
            id="input name",
        ),
        pytest.param(
            lambda inputs: inputs["patch"].update(dtype="float64"),
            ", not float64",
            id="input dtype",
        ),
        pytest.param(
            lambda inputs: inputs["patch"].update(spatial_shape=[32, 32]),
            "input 'patch' has shape",
            id="input shape",
        ),
    ],
)
@pytest.mark.parametrize("accelerator", ["none", "openvino"])
def test_an_onnx_graph_must_match_its_metadata(
    tmp_path: Path,
    classifier: TrainedClassifier,
    change: Callable[[dict[str, Any]], object],
    message: str,
    accelerator: str,
) -> None:
    metadata = classifier_metadata({"accelerator": accelerator})
    change(metadata["network_data_format"]["inputs"])
    write_bundle(tmp_path, "patches", 1, metadata, {"model.onnx": classifier.onnx})

    with pytest.raises(FailedPrecondition) as error:
        load_backend(ModelRepository(tmp_path).config("patches"), OPTIONS)

    assert error.value.reason == "MODEL_SIGNATURE_MISMATCH"
    assert message in error.value.message


def test_a_torchscript_module_must_return_the_declared_outputs(
    tmp_path: Path, classifier: TrainedClassifier
) -> None:
    metadata = classifier_metadata()
    outputs = metadata["network_data_format"]["outputs"]
    outputs["logits"] = outputs["probabilities"]
    backend = _loaded(tmp_path, metadata, {"model.ts": classifier.torchscript})

    with pytest.raises(FailedPrecondition) as error:
        backend.execute({"patch": classifier.patches[:1]})

    assert error.value.reason == "MODEL_SIGNATURE_MISMATCH"


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is present")
@pytest.mark.parametrize("platform", [Platform.TORCHSCRIPT, Platform.ONNX])
def test_a_cuda_device_without_a_gpu_fails_clearly(
    tmp_path: Path, classifier: TrainedClassifier, platform: Platform
) -> None:
    model_file = {MODEL_FILES[platform]: _exported(classifier, platform)}
    write_bundle(tmp_path, "patches", 1, classifier_metadata({"device": "cuda"}), model_file)

    with pytest.raises(FailedPrecondition) as error:
        load_backend(ModelRepository(tmp_path).config("patches"), OPTIONS)

    assert error.value.reason == "DEVICE_UNAVAILABLE"


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize(
    ("precision", "tolerance"), [("fp32", 1e-5), ("fp16", 1e-2), ("bf16", 5e-2)]
)
def test_torchscript_on_cuda_answers_as_on_the_cpu(
    tmp_path: Path, classifier: TrainedClassifier, precision: str, tolerance: float
) -> None:
    metadata = classifier_metadata({"device": "cuda", "precision": precision})
    backend = _loaded(tmp_path, metadata, {"model.ts": classifier.torchscript})
    patches = classifier.patches[:8]

    outputs = backend.execute({"patch": patches})
    backend.close()

    # Reduced precision computes in fp16/bf16 but answers in the declared float32.
    assert outputs["probabilities"].dtype == np.float32
    np.testing.assert_allclose(
        outputs["probabilities"], classifier.expected(patches), atol=tolerance
    )


@pytest.mark.gpu
@needs_cuda
def test_tensorrt_builds_an_engine_from_onnx_once_per_gpu(
    tmp_path: Path, classifier: TrainedClassifier, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("tensorrt")
    from medimg_inference import backends

    builds: list[str] = []
    build = backends._build_engine

    def counted(tensorrt: Any, config: Any) -> bytes:
        builds.append(config.name)
        return build(tensorrt, config)

    monkeypatch.setattr(backends, "_build_engine", counted)
    metadata = classifier_metadata({"platform": "tensorrt", "device": "cuda", "max_batch_size": 8})
    write_bundle(tmp_path / "repository", "patches", 1, metadata, {"model.onnx": classifier.onnx})
    config = ModelRepository(tmp_path / "repository").config("patches")
    options = BackendOptions(intra_op_threads=2, engine_cache=tmp_path / "engines")
    patches = classifier.patches[:8]

    first = load_backend(config, options)
    outputs = first.execute({"patch": patches})
    second = first.replicate(options)  # from the cache: not built again
    again = second.execute({"patch": patches[:3]})
    first.close()
    second.close()

    assert builds == ["patches"]
    [engine] = (tmp_path / "engines").iterdir()
    gpu = torch.cuda.get_device_properties(0)
    assert engine.suffix == ".plan" and f"sm{gpu.major}{gpu.minor}" in engine.name
    np.testing.assert_allclose(outputs["probabilities"], classifier.expected(patches), atol=1e-4)
    np.testing.assert_allclose(again["probabilities"], outputs["probabilities"][:3], atol=1e-6)


@pytest.mark.gpu
@needs_cuda
def test_onnx_on_cuda_answers_as_on_the_cpu(tmp_path: Path, classifier: TrainedClassifier) -> None:
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has no CUDA provider (onnxruntime-gpu)")
    metadata = classifier_metadata({"device": "cuda"})
    backend = _loaded(tmp_path, metadata, {"model.onnx": classifier.onnx})
    patches = classifier.patches[:8]

    outputs = backend.execute({"patch": patches})

    np.testing.assert_allclose(outputs["probabilities"], classifier.expected(patches), atol=1e-4)


def test_torch_uses_the_threads_it_is_given(tmp_path: Path, classifier: TrainedClassifier) -> None:
    write_bundle(
        tmp_path, "patches", 1, classifier_metadata(), {"model.ts": classifier.torchscript}
    )
    try:
        load_backend(ModelRepository(tmp_path).config("patches"), BackendOptions(1))
        assert TORCH_CPU.threads_per_lane == 1
        assert TORCH_CPU.lanes == cpus.available()
        assert on_torch_cpu(torch.get_num_threads) == 1
    finally:
        TORCH_CPU.configure(OPTIONS.intra_op_threads)


def test_torch_cpu_work_runs_on_one_lane_whoever_asks() -> None:
    """Two OpenMP teams of every core halve torch's speed (see backends.TorchCpu): with
    executions that use every core, the work of every caller thread runs on the one lane,
    and nested calls do not wait on themselves."""
    cores = cpus.available()
    TORCH_CPU.configure(cores)

    def where() -> str:
        return threading.current_thread().name

    with ThreadPoolExecutor(4) as callers:
        names = set(callers.map(lambda _: on_torch_cpu(where), range(16)))
    assert len(names) == 1 and names.pop().startswith("torch-cpu")
    assert on_torch_cpu(on_torch_cpu, where).startswith("torch-cpu")
    assert on_torch_cpu(torch.get_num_threads) == cores


@pytest.mark.skipif(cpus.available() < 2, reason="needs 2 cores")
def test_with_one_thread_per_execution_the_lanes_run_at_once() -> None:
    TORCH_CPU.configure(1)
    lanes = cpus.available()
    together = threading.Barrier(lanes, timeout=30)

    def meet() -> tuple[str, int]:
        together.wait()  # passes only once every lane runs a call at the same time
        return threading.current_thread().name, torch.get_num_threads()

    try:
        with ThreadPoolExecutor(lanes) as callers:
            met = list(callers.map(lambda _: on_torch_cpu(meet), range(lanes)))
        assert len({name for name, _ in met}) == lanes
        assert {threads for _, threads in met} == {1}
    finally:
        TORCH_CPU.configure(OPTIONS.intra_op_threads)
