"""Execution backends: run one batch of named arrays through a model file.

Every backend has the lifecycle of a Triton backend: `load` (once, from a ModelConfig),
`execute` (a batch in, a batch out; called from one thread at a time, never on the event
loop) and `close`. A batch maps each input name of the model to a numpy array whose axis 0
is the batch axis, followed by the tensor's own axes (channel first), in the dtype the
metadata declares; the outputs come back the same way. Backends import their runtime when
they load, so a missing optional runtime (TensorRT) fails only the models that need it,
with FAILED_PRECONDITION, and never falls back to another device or runtime silently.
A model with an accelerator (medimg.accelerator) runs in it, or does not load.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import sys
import tempfile
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self, TypeVar

import numpy as np
import numpy.typing as npt

from medimg_core import cpus
from medimg_core.errors import FailedPrecondition
from medimg_inference.repository import (
    Accelerator,
    ModelConfig,
    Platform,
    Precision,
    TensorSpec,
    warmup_shape,
)

if TYPE_CHECKING:
    import onnxruntime
    import openvino
    import torch

T = TypeVar("T")

log = logging.getLogger(__name__)


class TorchCpu(Executor):
    """The threads ("lanes") that run all of torch's CPU work in this process: executions,
    warmup, and MONAI pre- and postprocessing.

    torch's CPU wheels use GNU OpenMP, which gives each thread that runs a parallel region a
    team of worker threads of its own: two threads whose teams each span every core halve
    each other's speed. So lanes x threads per lane never exceed the cores. By default an
    execution may use every core, and there is one lane that everything takes turns on.
    With fewer threads per execution (`configure`; the setting
    `MEDIMG_INFERENCE_INTRA_OP_THREADS`) there are as many lanes as fit, and a model with as
    many instances runs that many batches at once, as TorchServe's single-thread workers
    do; torch's intra-op parallelism scales poorly on networks of many small operators
    (DenseNet), so on few cores this serves more (bench/inference_throughput.py)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self.threads_per_lane = 0

    @property
    def lanes(self) -> int:
        return max(1, _available_cores() // max(self.threads_per_lane, 1))

    def configure(self, threads_per_lane: int) -> None:
        """Lanes of `threads_per_lane` threads each, as many as the cores hold (at least
        one). Work already submitted finishes on the lanes it was given."""
        with self._lock:
            self._configure(threads_per_lane)

    def _configure(self, threads_per_lane: int) -> None:
        if threads_per_lane == self.threads_per_lane:
            return
        old, self.threads_per_lane = self._pool, threads_per_lane
        self._pool = ThreadPoolExecutor(
            self.lanes,
            thread_name_prefix="torch-cpu",
            initializer=_start_lane,
            initargs=(threads_per_lane,),
        )
        if old is not None:
            old.shutdown(wait=False)

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        with self._lock:
            if self._pool is None:
                self._configure(_available_cores())
            assert self._pool is not None
            return self._pool.submit(fn, *args, **kwargs)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            if self._pool is not None:
                self._pool.shutdown(wait, cancel_futures=cancel_futures)
            self._pool, self.threads_per_lane = None, 0


_on_torch_cpu = threading.local()


def _start_lane(threads: int) -> None:
    import torch

    _on_torch_cpu.active = True
    # OpenMP's team size is a per-thread setting: this lane's alone.
    torch.set_num_threads(threads)


TORCH_CPU = TorchCpu()


def on_torch_cpu(work: Callable[..., T], *args: Any) -> T:
    """`work(*args)` run on a lane of TORCH_CPU, waited for; at once when called from one."""
    if getattr(_on_torch_cpu, "active", False):
        return work(*args)
    return TORCH_CPU.submit(work, *args).result()


#: A tensor of any dtype; axis 0 is the batch axis.
Array = npt.NDArray[Any]
Batch = Mapping[str, Array]


def _available_cores() -> int:
    # The pod's CPU limit, not the node's cores (medimg_core.cpus).
    return cpus.available()


#: The engine cache's directory under the local model repository (no model has this name).
ENGINE_CACHE = ".engines"


@dataclass(frozen=True)
class BackendOptions:
    """How backends use the machine. `intra_op_threads` is the threads one execution may use
    (a TORCH_CPU lane's team, shared by every torch CPU model of the process, and each ONNX
    Runtime session's); size it with the instances in mind, as instances x threads beyond
    the cores only adds contention."""

    intra_op_threads: int = field(default_factory=_available_cores)
    #: Where TensorRT engines built from ONNX files are kept, one per file, GPU and TensorRT
    #: version; None: built at every load and kept nowhere.
    engine_cache: Path | None = None


class Backend(ABC):
    """One loaded copy of a model."""

    def __init__(self, config: ModelConfig) -> None:
        self.config = config

    @classmethod
    @abstractmethod
    def load(cls, config: ModelConfig, options: BackendOptions) -> Self:
        """Loads the model file; FAILED_PRECONDITION if it cannot run here."""

    @abstractmethod
    def execute(self, batch: Batch) -> dict[str, Array]:
        """Runs one batch: every input of the model by name, all with the same batch size.
        Returns every output of the model by name, with that batch size in axis 0."""

    @abstractmethod
    def close(self) -> None:
        """Frees the model; the backend is not used afterwards."""

    def replicate(self, options: BackendOptions) -> Backend:
        """One more copy of this model, for one more instance: by default loaded again;
        a backend that can skip part of its load for a copy does (OpenVINO's conversion)."""
        return type(self).load(self.config, options)


def load_backend(config: ModelConfig, options: BackendOptions) -> Backend:
    """A loaded backend for the model's platform, or its accelerator's. Blocking (reads and
    compiles the model): call it from a thread."""
    if config.execution.accelerator is Accelerator.OPENVINO:
        return OpenVinoBackend.load(config, options)
    backends: dict[Platform, type[Backend]] = {
        Platform.TORCHSCRIPT: TorchScriptBackend,
        Platform.ONNX: OnnxRuntimeBackend,
        Platform.TENSORRT: TensorRTBackend,
    }
    return backends[config.execution.platform].load(config, options)


def _unloadable(config: ModelConfig, error: Exception) -> FailedPrecondition:
    return FailedPrecondition(
        "MODEL_FILE_UNLOADABLE",
        f"{config.execution.model_file.name} cannot be loaded: {type(error).__name__}: {error}",
        model=config.name,
        version=config.version,
    )


def _mismatch(config: ModelConfig, message: str) -> FailedPrecondition:
    return FailedPrecondition(
        "MODEL_SIGNATURE_MISMATCH",
        f"the model file does not match metadata.json: {message}",
        model=config.name,
        version=config.version,
    )


def _device_unavailable(config: ModelConfig, message: str) -> FailedPrecondition:
    return FailedPrecondition(
        "DEVICE_UNAVAILABLE", message, model=config.name, version=config.version
    )


def _torch_device(config: ModelConfig) -> torch.device:
    import torch

    device = torch.device(config.execution.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise _device_unavailable(config, "medimg.device is cuda but torch sees no CUDA GPU")
        index = device.index or 0
        if index >= torch.cuda.device_count():
            raise _device_unavailable(
                config,
                f"medimg.device is cuda:{index} but torch sees "
                f"{torch.cuda.device_count()} CUDA GPU(s)",
            )
    return device


def _writable(array: Array) -> Array:
    """`array`, copied only if torch cannot share it: arrays made from request bytes are
    read-only, and torch.from_numpy warns about (and cannot protect) those."""
    return np.require(array, requirements=("C_CONTIGUOUS", "WRITEABLE"))


class TorchScriptBackend(Backend):
    """A TorchScript module (models/model.ts) on the CPU or a CUDA GPU.

    The module is called with the inputs positionally, in metadata order, each a tensor of
    the declared dtype; it returns one tensor, a tuple or list in output order, or a dict by
    output name. With precision fp16/bf16 (CUDA only) the weights and the floating-point
    inputs are cast to it and the outputs cast back to their declared dtype."""

    def __init__(
        self, config: ModelConfig, module: torch.jit.ScriptModule, device: torch.device
    ) -> None:
        super().__init__(config)
        self.module = module
        self.device = device
        self.compute_dtype = _torch_compute_dtype(config.execution.precision)

    @classmethod
    def load(cls, config: ModelConfig, options: BackendOptions) -> Self:
        import torch

        device = _torch_device(config)
        if device.type == "cpu":
            # One lane configuration per process: every torch CPU model shares it.
            TORCH_CPU.configure(options.intra_op_threads)
        try:
            module = torch.jit.load(  # type: ignore[no-untyped-call]
                str(config.execution.model_file), map_location=device
            )
        except Exception as error:  # torch raises RuntimeError, ValueError, zip errors...
            raise _unloadable(config, error) from error
        module.eval()
        if device.type == "cpu" and config.execution.optimize:
            module = _optimized(config, module)
        backend = cls(config, module, device)
        if backend.compute_dtype is not None:
            module.to(backend.compute_dtype)
        return backend

    def execute(self, batch: Batch) -> dict[str, Array]:
        if self.device.type == "cpu":
            return on_torch_cpu(self._execute, batch)
        return self._execute(batch)

    def _execute(self, batch: Batch) -> dict[str, Array]:
        import torch

        with torch.inference_mode():
            arguments = [self._tensor(batch[spec.name]) for spec in self.config.inputs]
            result = self.module(*arguments)
            tensors = self._by_name(result)
            return {spec.name: _numpy(tensors[spec.name], spec) for spec in self.config.outputs}

    def close(self) -> None:
        del self.module
        if self.device.type == "cuda":
            import torch

            torch.cuda.empty_cache()

    def _tensor(self, array: Array) -> torch.Tensor:
        import torch

        tensor = torch.from_numpy(_writable(array)).to(self.device)
        if self.compute_dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(self.compute_dtype)
        return tensor

    def _by_name(self, result: Any) -> Mapping[str, torch.Tensor]:
        import torch

        names = [spec.name for spec in self.config.outputs]
        if isinstance(result, torch.Tensor):
            result = (result,)
        if isinstance(result, tuple | list) and len(result) == len(names):
            return dict(zip(names, result, strict=True))
        if isinstance(result, Mapping) and all(name in result for name in names):
            return result
        raise _mismatch(
            self.config,
            f"the module returned {_describe(result)}, not the {len(names)} declared "
            f"output(s) {', '.join(names)}",
        )


def _optimized(config: ModelConfig, module: torch.jit.ScriptModule) -> torch.jit.ScriptModule:
    """The module frozen (weights as constants, conv and norm folded where they can be) with
    torch's CPU inference passes: its convolutions run on oneDNN at every batch size, where
    torch's own choice runs small 3D inputs (a UNet's batch of one, its first layers) on a
    much slower native convolution (bench/README, inference run 3). The same network:
    outputs agree to float rounding.
    A module torch cannot freeze is served as stored, and the log says so."""
    import torch

    try:
        optimized: torch.jit.ScriptModule = torch.jit.optimize_for_inference(
            torch.jit.freeze(module)
        )
    except (RuntimeError, NotImplementedError) as error:  # what torch.jit raises
        log.warning(
            "serving the model as stored: torch cannot freeze it",
            extra={"fields": {"model": config.name, "version": config.version,
                              "error": type(error).__name__}},
        )  # fmt: skip
        return module
    return optimized


def _torch_compute_dtype(precision: Precision) -> torch.dtype | None:
    import torch

    return {Precision.FP32: None, Precision.FP16: torch.float16, Precision.BF16: torch.bfloat16}[
        precision
    ]


def _numpy(tensor: torch.Tensor, spec: TensorSpec) -> Array:
    import torch

    declared = torch.from_numpy(np.empty(0, spec.dtype)).dtype
    # Cast on the device: numpy has no bfloat16, and the copy to the host is then smaller.
    return tensor.to(declared).cpu().numpy()


def _describe(result: Any) -> str:
    if isinstance(result, tuple | list):
        return f"a {type(result).__name__} of {len(result)}"
    if isinstance(result, Mapping):
        return f"a dict of {', '.join(map(str, result))}"
    return type(result).__name__


#: ONNX tensor element types, as onnxruntime spells them, and their numpy dtypes.
_ONNX_DTYPES: Mapping[str, np.dtype[Any]] = {
    f"tensor({onnx_name})": np.dtype(numpy_name)
    for onnx_name, numpy_name in (
        ("bool", "bool"),
        ("uint8", "uint8"),
        ("uint16", "uint16"),
        ("uint32", "uint32"),
        ("uint64", "uint64"),
        ("int8", "int8"),
        ("int16", "int16"),
        ("int32", "int32"),
        ("int64", "int64"),
        ("float16", "float16"),
        ("float", "float32"),
        ("double", "float64"),
    )
}


class OnnxRuntimeBackend(Backend):
    """An ONNX model (models/model.onnx) in ONNX Runtime: the CPU provider, or the CUDA
    provider (onnxruntime-gpu) for a cuda device. The graph's inputs and outputs must carry
    the names, dtypes and ranks (batch axis first) that metadata.json declares."""

    def __init__(self, config: ModelConfig, session: onnxruntime.InferenceSession) -> None:
        super().__init__(config)
        self.session = session
        self.output_names = [spec.name for spec in config.outputs]

    @classmethod
    def load(cls, config: ModelConfig, options: BackendOptions) -> Self:
        import onnxruntime

        session_options = onnxruntime.SessionOptions()
        session_options.intra_op_num_threads = options.intra_op_threads
        session_options.inter_op_num_threads = 1
        # Idle pool threads otherwise spin on the cores that the event loop and the other
        # instances need.
        session_options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers: list[str | tuple[str, dict[str, Any]]] = ["CPUExecutionProvider"]
        if config.execution.uses_cuda:
            if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
                raise _device_unavailable(
                    config,
                    "medimg.device is cuda but this onnxruntime has no CUDAExecutionProvider "
                    "(it comes with the onnxruntime-gpu package)",
                )
            device_id = int(config.execution.device.partition(":")[2] or 0)
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": device_id}))
        try:
            session = onnxruntime.InferenceSession(
                str(config.execution.model_file), sess_options=session_options, providers=providers
            )
        except Exception as error:  # onnxruntime's own exception types, not exported
            raise _unloadable(config, error) from error
        # ONNX Runtime falls back to the CPU when the CUDA provider fails to start.
        if config.execution.uses_cuda and "CUDAExecutionProvider" not in session.get_providers():
            raise _device_unavailable(config, "onnxruntime could not start its CUDA provider")
        _check_signature(config, "input", config.inputs, _onnxruntime_tensors(session.get_inputs()))
        _check_signature(
            config, "output", config.outputs, _onnxruntime_tensors(session.get_outputs())
        )
        return cls(config, session)

    def execute(self, batch: Batch) -> dict[str, Array]:
        feed = {spec.name: batch[spec.name] for spec in self.config.inputs}
        results = self.session.run(self.output_names, feed)
        return dict(zip(self.output_names, results, strict=True))

    def close(self) -> None:
        del self.session


@dataclass(frozen=True)
class _GraphTensor:
    """A graph's input or output as its runtime reports it."""

    name: str
    #: The runtime's own name for its element type (for messages).
    type: str
    dtype: np.dtype[Any] | None
    #: Sizes, batch axis first; -1 where dynamic.
    shape: tuple[int, ...]


def _onnxruntime_tensors(tensors: Sequence[onnxruntime.NodeArg]) -> list[_GraphTensor]:
    # ONNX shapes hold ints for fixed sizes and names (or None) for dynamic ones.
    return [
        _GraphTensor(
            tensor.name,
            tensor.type,
            _ONNX_DTYPES.get(tensor.type),
            tuple(size if isinstance(size, int) else -1 for size in tensor.shape),
        )
        for tensor in tensors
    ]


def _check_signature(
    config: ModelConfig, kind: str, specs: Sequence[TensorSpec], tensors: Sequence[_GraphTensor]
) -> None:
    """That the graph has each declared input or output by name, with its dtype, and for an
    input its rank and fixed sizes; and no input the metadata leaves out."""
    graph = {tensor.name: tensor for tensor in tensors}
    for spec in specs:
        tensor = graph.get(spec.name)
        if tensor is None:
            raise _mismatch(
                config,
                f"the graph has no {kind} {spec.name!r} (it has {', '.join(graph) or 'none'})",
            )
        if tensor.dtype != spec.dtype:
            raise _mismatch(config, f"{kind} {spec.name!r} is {tensor.type}, not {spec.dtype}")
        declared = [-1, *spec.shape]
        if kind == "input" and (
            len(tensor.shape) != len(declared)
            or any(
                -1 not in (ours, theirs) and ours != theirs
                for ours, theirs in zip(declared, tensor.shape, strict=True)
            )
        ):
            shown = ", ".join("?" if size == -1 else str(size) for size in tensor.shape)
            raise _mismatch(
                config,
                f"input {spec.name!r} has shape ({shown}) in the graph, metadata.json "
                f"declares (batch, {', '.join(map(str, spec.shape))})",
            )
    if kind == "input" and len(graph) != len(specs):
        extra = sorted(set(graph) - {spec.name for spec in specs})
        raise _mismatch(config, f"the graph also needs input(s) {', '.join(extra)}")


def _openvino() -> Any:
    """The openvino module, with its usage telemetry off. OpenVINO's converter reports every
    conversion to Intel unless a consent file says no (and writes a client ID under
    ~/intel); without the `openvino_telemetry` package it uses a stub that does nothing.
    None in sys.modules makes that import fail in this process, whatever is installed."""
    sys.modules["openvino_telemetry"] = None  # type: ignore[assignment]
    import openvino

    return openvino


#: OpenVINO's CPU settings: one stream of the threads an execution may use, in fp32 (CPUs
#: with AMX or AVX512-BF16 would otherwise compute in bf16), and no thread pinning: each
#: instance compiles a model of its own, and pinned, all of them would share the first core.
_OPENVINO_CPU = {
    "NUM_STREAMS": 1,
    "PERFORMANCE_HINT": "LATENCY",
    "INFERENCE_PRECISION_HINT": "f32",
    "ENABLE_CPU_PINNING": False,
}


class OpenVinoBackend(Backend):
    """A TorchScript or ONNX model file run by OpenVINO on the CPU (medimg.accelerator
    "openvino", as Triton's OpenVINO cpu_execution_accelerator), converted and compiled for
    this CPU when it loads, with a dynamic batch axis. A TorchScript module takes its inputs
    in metadata order and returns its outputs in it; an ONNX graph matches them by name, as
    in ONNX Runtime."""

    def __init__(
        self,
        config: ModelConfig,
        model: openvino.Model,
        compiled: openvino.CompiledModel,
        inputs: Sequence[int | str],
    ) -> None:
        super().__init__(config)
        #: Converted and reshaped, kept for `replicate` (the CPU plugin shares its weights).
        self.model = model
        self.compiled = compiled
        self.request = compiled.create_infer_request()
        self.inputs = inputs
        self.outputs = (
            list(compiled.outputs)
            if config.execution.platform is Platform.TORCHSCRIPT
            else [compiled.output(spec.name) for spec in config.outputs]
        )

    @classmethod
    def load(cls, config: ModelConfig, options: BackendOptions) -> Self:
        ov = _openvino()
        core = ov.Core()
        torchscript = config.execution.platform is Platform.TORCHSCRIPT
        try:
            model = _torchscript_for_openvino(ov, config) if torchscript else (
                core.read_model(str(config.execution.model_file))
            )  # fmt: skip
        except Exception as error:  # torch's and OpenVINO's own exception types
            raise _unloadable(config, error) from error
        if torchscript:
            for kind, specs, ports in (
                ("inputs", config.inputs, model.inputs),
                ("outputs", config.outputs, model.outputs),
            ):
                if len(ports) != len(specs):
                    raise _mismatch(config, f"the module has {len(ports)} {kind}, not {len(specs)}")
            inputs: list[int | str] = list(range(len(config.inputs)))
        else:
            _check_signature(config, "input", config.inputs, _openvino_tensors(model.inputs))
            _check_signature(config, "output", config.outputs, _openvino_tensors(model.outputs))
            inputs = [spec.name for spec in config.inputs]
        try:
            model.reshape({
                model.input(key): ov.PartialShape([-1, *spec.shape])
                for key, spec in zip(inputs, config.inputs, strict=True)
            })  # fmt: skip
        except Exception as error:  # OpenVINO raises RuntimeError and its own types
            raise _unloadable(config, error) from error
        return cls(config, model, _openvino_compile(core, config, model, options), inputs)

    def replicate(self, options: BackendOptions) -> OpenVinoBackend:
        """A copy compiled from the model already converted: a TorchScript file is not
        traced and converted again per instance."""
        compiled = _openvino_compile(_openvino().Core(), self.config, self.model, options)
        return OpenVinoBackend(self.config, self.model, compiled, self.inputs)

    def execute(self, batch: Batch) -> dict[str, Array]:
        feed = {
            key: batch[spec.name] for key, spec in zip(self.inputs, self.config.inputs, strict=True)
        }
        # The request reads the arrays in place; its results are copies, which the batcher
        # may keep while this request runs the next batch.
        results = self.request.infer(feed, share_inputs=True)
        return {
            spec.name: np.asarray(results[port]).astype(spec.dtype, copy=False)
            for spec, port in zip(self.config.outputs, self.outputs, strict=True)
        }

    def close(self) -> None:
        del self.request
        del self.compiled
        del self.model


def _openvino_compile(
    core: openvino.Core, config: ModelConfig, model: openvino.Model, options: BackendOptions
) -> openvino.CompiledModel:
    """The model compiled for this CPU, with its own stream of `intra_op_threads` threads."""
    try:
        return core.compile_model(
            model, "CPU", {**_OPENVINO_CPU, "INFERENCE_NUM_THREADS": options.intra_op_threads}
        )
    except Exception as error:  # OpenVINO raises RuntimeError and its own types
        raise _unloadable(config, error) from error


def _torchscript_for_openvino(ov: Any, config: ModelConfig) -> openvino.Model:
    """The TorchScript module converted to an OpenVINO model, traced on zeros of the declared
    dtypes and a batch of one at the warmup shapes."""
    import torch

    module = torch.jit.load(str(config.execution.model_file), map_location="cpu")  # type: ignore[no-untyped-call]
    module.eval()
    example = tuple(
        torch.from_numpy(np.zeros((1, *warmup_shape(spec)), spec.dtype)) for spec in config.inputs
    )
    model: openvino.Model = ov.convert_model(module, example_input=example)
    return model


def _openvino_tensors(ports: Sequence[openvino.Output]) -> list[_GraphTensor]:
    return [
        _GraphTensor(
            port.get_any_name(),
            str(port.get_element_type().get_type_name()),
            np.dtype(port.get_element_type().to_dtype()),
            tuple(size.get_length() if size.is_static else -1 for size in port.get_partial_shape()),
        )
        for port in ports
    ]


class TensorRTBackend(Backend):
    """A TensorRT engine on a CUDA GPU, through the TensorRT 10/11 tensor API, with torch
    allocating the device buffers: the serialized engine of models/model.plan, or one built
    from models/model.onnx (see `_engine_from_onnx`). Needs the `tensorrt` package, which is
    imported only here."""

    def __init__(self, config: ModelConfig, engine: Any, device: torch.device) -> None:
        super().__init__(config)
        self.engine = engine
        self.context = engine.create_execution_context()
        self.device = device

    @classmethod
    def load(cls, config: ModelConfig, options: BackendOptions) -> Self:
        from_onnx = config.execution.model_file.suffix == ".onnx"
        try:
            import tensorrt
        except ImportError as error:
            what = "asks for a TensorRT engine built from" if from_onnx else "is a TensorRT engine"
            raise FailedPrecondition(
                "TENSORRT_NOT_INSTALLED",
                f"model {config.name} version {config.version} {what} "
                f"{config.execution.model_file.name} but the `tensorrt` package is not "
                "installed",
                model=config.name,
                version=config.version,
            ) from error
        if not config.execution.uses_cuda:
            raise _device_unavailable(config, 'a TensorRT engine needs medimg.device "cuda"')
        device = _torch_device(config)
        if from_onnx:
            plan = _engine_from_onnx(tensorrt, config, options, device)
        else:
            plan = config.execution.model_file.read_bytes()
        runtime = tensorrt.Runtime(tensorrt.Logger(tensorrt.Logger.WARNING))
        engine = runtime.deserialize_cuda_engine(plan)
        if engine is None:
            raise _unloadable(config, ValueError("TensorRT could not deserialize the engine"))
        names = {engine.get_tensor_name(index) for index in range(engine.num_io_tensors)}
        missing = [
            spec.name for spec in (*config.inputs, *config.outputs) if spec.name not in names
        ]
        if missing:
            raise _mismatch(config, f"the engine has no tensor(s) {', '.join(missing)}")
        return cls(config, engine, device)

    def execute(self, batch: Batch) -> dict[str, Array]:
        import tensorrt
        import torch

        with torch.cuda.device(self.device):
            keep_alive = []
            for spec in self.config.inputs:
                tensor = torch.from_numpy(_writable(batch[spec.name])).to(self.device)
                keep_alive.append(tensor)
                self.context.set_input_shape(spec.name, tuple(tensor.shape))
                self.context.set_tensor_address(spec.name, tensor.data_ptr())
            outputs = {}
            for spec in self.config.outputs:
                dtype = np.dtype(tensorrt.nptype(self.engine.get_tensor_dtype(spec.name)))
                outputs[spec.name] = torch.from_numpy(np.empty(0, dtype)).new_empty(
                    tuple(self.context.get_tensor_shape(spec.name)), device=self.device
                )
                self.context.set_tensor_address(spec.name, outputs[spec.name].data_ptr())
            stream = torch.cuda.current_stream(self.device)
            if not self.context.execute_async_v3(stream.cuda_stream):
                raise RuntimeError("TensorRT could not enqueue the batch")
            stream.synchronize()
            return {
                name: _numpy(tensor, self.config.outputs[index])
                for index, (name, tensor) in enumerate(outputs.items())
            }

    def close(self) -> None:
        del self.context
        del self.engine


def _engine_from_onnx(
    tensorrt: Any, config: ModelConfig, options: BackendOptions, device: torch.device
) -> bytes:
    """The serialized engine of the model's ONNX file for this GPU: from the engine cache,
    or built now and stored there. An engine runs only on the GPU model and TensorRT
    version it was built with, so both name it, with the file's SHA-256 and the largest
    batch it takes."""
    import torch

    onnx = config.execution.model_file
    gpu = torch.cuda.get_device_properties(device)
    key = "-".join((
        hashlib.sha256(onnx.read_bytes()).hexdigest()[:32],
        re.sub(r"[^A-Za-z0-9]+", "_", gpu.name).strip("_"),
        f"sm{gpu.major}{gpu.minor}",
        f"trt{tensorrt.__version__}",
        f"b{config.batching.max_batch_size}",
    ))  # fmt: skip
    cached = options.engine_cache / f"{key}.plan" if options.engine_cache else None
    if cached is not None and cached.is_file():
        return cached.read_bytes()
    with torch.cuda.device(device):
        plan = _build_engine(tensorrt, config)
    if cached is not None:
        try:
            _store_engine(cached, plan)
        except OSError as error:  # a full disk costs the next load a build, not this one
            log.warning(
                "the TensorRT engine was built but could not be cached",
                extra={"fields": {"model": config.name, "error_type": type(error).__name__}},
            )
    return plan


def _store_engine(path: Path, plan: bytes) -> None:
    """Writes the engine under `path` whole or not at all, whoever reads it meanwhile."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=".building-")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(plan)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _build_engine(tensorrt: Any, config: ModelConfig) -> bytes:
    """An engine built from the ONNX file, in the precision of its graph (TensorRT 11 has no
    reduced-precision flags: an fp16 engine comes from an fp16 ONNX file), for batches of 1
    to max_batch_size, tuned for the largest (the repository allows fixed shapes only)."""
    logger = tensorrt.Logger(tensorrt.Logger.WARNING)
    builder = tensorrt.Builder(logger)
    network = builder.create_network(0)
    parser = tensorrt.OnnxParser(network, logger)
    # From the file, so that weights kept as external data beside it are found.
    if not parser.parse_from_file(str(config.execution.model_file)):
        errors = "; ".join(
            str(parser.get_error(index).desc()) for index in range(parser.num_errors)
        )
        raise _unloadable(config, ValueError(f"TensorRT cannot parse the ONNX file: {errors}"))
    build = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    largest = config.batching.max_batch_size
    for spec in config.inputs:
        profile.set_shape(
            spec.name, (1, *spec.shape), (largest, *spec.shape), (largest, *spec.shape)
        )
    build.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, build)
    if plan is None:
        raise _unloadable(config, RuntimeError("TensorRT could not build an engine (see its log)"))
    return bytes(plan)
