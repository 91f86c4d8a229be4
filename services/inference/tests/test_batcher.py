"""The dynamic batcher on the trained classifier (TorchScript). A gate in front of the real
backend holds an execution open, so the tests control what queues behind it, and records
every batch the model ran."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from medimg_core.errors import (
    DeadlineExceeded,
    InvalidArgument,
    ResourceExhausted,
    Unavailable,
)
from medimg_inference.backends import Array, BackendOptions
from medimg_inference.batcher import DynamicBatcher
from medimg_inference.repository import ModelRepository
from services.inference.tests.support import (
    TORCHSCRIPT_DEPRECATED,
    GatedBackend,
    NanRefusingClassifier,
    TrainedClassifier,
    classifier_metadata,
    export_scripted,
    write_bundle,
)

pytestmark = pytest.mark.filterwarnings(TORCHSCRIPT_DEPRECATED)

MakeBatcher = Callable[..., tuple[DynamicBatcher, GatedBackend]]


@pytest.fixture
async def make_batcher(tmp_path: Path, classifier: TrainedClassifier) -> AsyncIterator[MakeBatcher]:
    """make_batcher(medimg=None, metadata=None, model_file=None): a started batcher over
    one gated TorchScript backend of the classifier (or of `model_file`)."""
    made: list[tuple[DynamicBatcher, GatedBackend]] = []

    def make(
        medimg: dict[str, Any] | None = None,
        *,
        metadata: dict[str, Any] | None = None,
        model_file: Path | None = None,
    ) -> tuple[DynamicBatcher, GatedBackend]:
        name = f"model{len(made)}"
        model = {"model.ts": model_file or classifier.torchscript}
        write_bundle(tmp_path, name, 1, metadata or classifier_metadata(medimg), model)
        config = ModelRepository(tmp_path).config(name)
        backend = GatedBackend.load(config, BackendOptions(intra_op_threads=1))
        batcher = DynamicBatcher(
            config.inputs, config.outputs, config.batching, [backend], name=name
        )
        batcher.start()
        made.append((batcher, backend))
        return batcher, backend

    yield make
    for batcher, backend in made:
        backend.gate.set()
        await batcher.close()


async def hold(batcher: DynamicBatcher, backend: GatedBackend, patch: Array) -> asyncio.Task[Any]:
    """Starts a request and returns once the model is executing it, held at the gate."""
    backend.gate.clear()
    backend.started.clear()
    request = asyncio.create_task(batcher.infer({"patch": patch}))
    assert await asyncio.to_thread(backend.started.wait, 10)
    return request


def assert_answers(
    classifier: TrainedClassifier, patches: Array, outputs: dict[str, Array]
) -> None:
    np.testing.assert_allclose(
        outputs["probabilities"], classifier.expected(patches), rtol=1e-5, atol=1e-6
    )


async def test_concurrent_requests_share_executions(
    make_batcher: MakeBatcher, classifier: TrainedClassifier
) -> None:
    batcher, backend = make_batcher({"max_batch_size": 8})
    patches = classifier.patches
    first = await hold(batcher, backend, patches[:1])
    # Fifteen requests of 1 to 3 rows each queue behind the held execution.
    sizes = [1, 2, 1, 3, 1, 1, 2, 1, 1, 3, 1, 2, 1, 1, 1]
    starts = np.cumsum([1, *sizes])
    queued = [
        asyncio.create_task(batcher.infer({"patch": patches[start : start + size]}))
        for start, size in zip(starts, sizes, strict=False)
    ]
    await asyncio.sleep(0.05)
    assert batcher.queued == len(sizes)

    backend.gate.set()
    results = await asyncio.gather(first, *queued)

    assert_answers(classifier, patches[:1], results[0])
    for start, size, outputs in zip(starts, sizes, results[1:], strict=False):
        assert_answers(classifier, patches[start : start + size], outputs)
    batch_rows = [len(batch) for batch in backend.executed]
    assert len(batch_rows) < 1 + len(sizes)
    assert max(batch_rows) <= 8
    statistics = batcher.statistics
    assert statistics.success_count == 1 + len(sizes)
    assert statistics.inference_count == 1 + sum(sizes) == sum(batch_rows)
    assert statistics.execution_count == len(batch_rows)
    assert sum(statistics.executions_by_batch_size.values()) == len(batch_rows)
    assert statistics.failure_count == 0
    assert statistics.queue_ns > 0 and statistics.compute_infer_ns > 0
    assert statistics.success_ns >= statistics.queue_ns + statistics.compute_infer_ns


@pytest.mark.parametrize(
    ("make_request", "expected_reason"),
    [
        pytest.param(lambda p: {"patch": p.astype(np.float64)}, "INPUT_DTYPE_MISMATCH", id="dtype"),
        pytest.param(lambda p: {"patch": p[:, :, :8, :8]}, "INPUT_SHAPE_MISMATCH", id="shape"),
        pytest.param(lambda p: {"patch": p[0]}, "INPUT_SHAPE_MISMATCH", id="no batch axis"),
        pytest.param(lambda p: {"image": p}, "MISSING_INPUT", id="missing input"),
        pytest.param(lambda p: {"patch": p, "mask": p}, "UNEXPECTED_INPUT", id="extra input"),
        pytest.param(lambda p: {"patch": [[0.0]]}, "INVALID_INPUT", id="not an array"),
        pytest.param(
            lambda p: {"patch": np.repeat(p, 9, axis=0)}, "INVALID_BATCH_SIZE", id="too many rows"
        ),
        pytest.param(lambda p: {"patch": p[:0]}, "INVALID_BATCH_SIZE", id="no rows"),
    ],
)
async def test_a_malformed_request_fails_alone_before_it_queues(
    make_batcher: MakeBatcher,
    classifier: TrainedClassifier,
    make_request: Callable[[Array], dict[str, Any]],
    expected_reason: str,
) -> None:
    batcher, backend = make_batcher({"max_batch_size": 8})
    patches = classifier.patches[:4]
    first = await hold(batcher, backend, patches[:1])
    neighbour = asyncio.create_task(batcher.infer({"patch": patches[1:3]}))

    with pytest.raises(InvalidArgument) as error:
        batcher.submit(make_request(patches[3:4]))
    backend.gate.set()

    assert error.value.reason == expected_reason
    assert_answers(classifier, patches[:1], await first)
    assert_answers(classifier, patches[1:3], await neighbour)
    assert batcher.statistics.failure_count == 1


async def test_a_request_the_model_refuses_fails_alone(
    tmp_path: Path, make_batcher: MakeBatcher, classifier: TrainedClassifier
) -> None:
    model = export_scripted(NanRefusingClassifier(classifier.network), tmp_path / "refusing.ts")
    batcher, backend = make_batcher({"max_batch_size": 8}, model_file=model)
    patches = classifier.patches[:4].copy()
    poisoned = patches[2:3].copy()
    poisoned[0, 0, 3, 3] = np.nan
    first = await hold(batcher, backend, patches[:1])
    queued = [
        asyncio.create_task(batcher.infer({"patch": patch}))
        for patch in (patches[1:2], poisoned, patches[3:4])
    ]
    await asyncio.sleep(0.05)

    backend.gate.set()
    before, bad, after = await asyncio.gather(*queued, return_exceptions=True)

    assert_answers(classifier, patches[:1], await first)
    assert isinstance(before, dict) and isinstance(after, dict)
    assert_answers(classifier, patches[1:2], before)
    assert_answers(classifier, patches[3:4], after)
    assert isinstance(bad, InvalidArgument)
    assert bad.reason == "MODEL_EXECUTION_FAILED"
    assert "the patch holds NaN" in bad.message
    # The held request, the batch of three that failed, then its requests one by one.
    assert [len(batch) for batch in backend.executed] == [1, 3, 1, 1, 1]
    assert (batcher.statistics.success_count, batcher.statistics.failure_count) == (3, 1)


async def test_a_full_queue_refuses_at_once(
    make_batcher: MakeBatcher, classifier: TrainedClassifier
) -> None:
    batcher, backend = make_batcher({"max_batch_size": 1, "queue_limit": 2})
    patches = classifier.patches[:4]
    first = await hold(batcher, backend, patches[:1])
    queued = [asyncio.create_task(batcher.infer({"patch": patches[i : i + 1]})) for i in (1, 2)]
    await asyncio.sleep(0)

    with pytest.raises(ResourceExhausted) as error:
        batcher.submit({"patch": patches[3:4]})  # raises here, without waiting
    backend.gate.set()

    assert error.value.reason == "QUEUE_FULL"
    for index, outputs in enumerate(await asyncio.gather(first, *queued)):
        assert_answers(classifier, patches[index : index + 1], outputs)
    assert backend.rows_executed == 3


async def test_an_expired_request_is_answered_and_never_executed(
    make_batcher: MakeBatcher, classifier: TrainedClassifier
) -> None:
    batcher, backend = make_batcher({"max_batch_size": 8})
    patches = classifier.patches[:3]
    first = await hold(batcher, backend, patches[:1])
    expiring = asyncio.create_task(
        batcher.infer({"patch": patches[1:2]}, deadline=time.monotonic() + 0.05)
    )
    patient = asyncio.create_task(batcher.infer({"patch": patches[2:3]}))

    # Answered at its deadline, while the model is still busy with the first request.
    with pytest.raises(DeadlineExceeded):
        await asyncio.wait_for(expiring, 5)
    assert not first.done()
    with pytest.raises(DeadlineExceeded):
        batcher.submit({"patch": patches[1:2]}, deadline=time.monotonic() - 1)
    backend.gate.set()
    await asyncio.gather(first, patient)

    executed = np.concatenate(backend.executed)
    np.testing.assert_array_equal(executed, patches[[0, 2]])
    assert (batcher.statistics.success_count, batcher.statistics.failure_count) == (2, 2)


async def test_execution_does_not_block_the_event_loop(
    make_batcher: MakeBatcher, classifier: TrainedClassifier
) -> None:
    batcher, backend = make_batcher()
    request = await hold(batcher, backend, classifier.patches[:1])

    # Were the model run on the loop, the loop would wait at the gate and these sleeps with it.
    started = time.monotonic()
    for _ in range(20):
        await asyncio.sleep(0.005)
    elapsed = time.monotonic() - started
    assert not request.done()
    backend.gate.set()

    assert elapsed < 2
    assert_answers(classifier, classifier.patches[:1], await request)


async def test_requests_of_different_sizes_run_in_separate_batches(
    make_batcher: MakeBatcher, classifier: TrainedClassifier
) -> None:
    # The classifier pools globally, so it takes any patch size when metadata says so.
    metadata = classifier_metadata({"max_batch_size": 8})
    metadata["network_data_format"]["inputs"]["patch"]["spatial_shape"] = ["*", "*"]
    batcher, backend = make_batcher(metadata=metadata)
    rng = np.random.default_rng(3)
    small = rng.normal(size=(2, 1, 16, 16)).astype(np.float32)
    large = rng.normal(size=(2, 1, 24, 24)).astype(np.float32)
    first = await hold(batcher, backend, small[:1])
    queued = [
        asyncio.create_task(batcher.infer({"patch": patch}))
        for patch in (small[1:], large[:1], small[:1], large[1:])
    ]
    await asyncio.sleep(0.05)

    backend.gate.set()
    results = await asyncio.gather(first, *queued)

    for patch, outputs in zip(
        (small[:1], small[1:], large[:1], small[:1], large[1:]), results, strict=True
    ):
        assert_answers(classifier, patch, outputs)
    assert [batch.shape for batch in backend.executed] == [
        (1, 1, 16, 16),
        (2, 1, 16, 16),
        (2, 1, 24, 24),
    ]


async def test_a_batch_waits_up_to_the_queue_delay_for_more_requests(
    make_batcher: MakeBatcher, classifier: TrainedClassifier
) -> None:
    batcher, backend = make_batcher({"max_batch_size": 3, "max_queue_delay_us": 2_000_000})
    patches = classifier.patches[:6]

    requests = []
    for index in range(3):
        requests.append(asyncio.create_task(batcher.infer({"patch": patches[index : index + 1]})))
        await asyncio.sleep(0.01)
    await asyncio.gather(*requests)
    # A full batch goes at once, without waiting out the delay.
    started = time.monotonic()
    await asyncio.gather(
        *(batcher.infer({"patch": patches[index : index + 1]}) for index in range(3, 6))
    )

    assert time.monotonic() - started < 1
    assert [len(batch) for batch in backend.executed] == [3, 3]


@pytest.mark.parametrize(("preferred", "batches"), [([2, 4], [1, 4, 1]), ([], [1, 5])])
async def test_the_largest_preferred_batch_size_runs_without_waiting_out_the_delay(
    make_batcher: MakeBatcher,
    classifier: TrainedClassifier,
    preferred: list[int],
    batches: list[int],
) -> None:
    batcher, backend = make_batcher(
        {"max_batch_size": 8, "max_queue_delay_us": 300_000, "preferred_batch_sizes": preferred}
    )
    patches = classifier.patches[:6]
    first = await hold(batcher, backend, patches[:1])
    queued = [
        asyncio.create_task(batcher.infer({"patch": patches[i : i + 1]})) for i in range(1, 6)
    ]
    await asyncio.sleep(0.05)  # all five wait behind the held batch
    backend.gate.set()
    for patch, answer in zip(patches, await asyncio.gather(first, *queued), strict=True):
        assert_answers(classifier, patch[None], answer)
    # Five queued rows: four of them (the largest preferred size) at once, the last one
    # after the delay; without preferred sizes, all five together.
    assert [len(batch) for batch in backend.executed] == batches


async def test_closing_answers_the_queue_and_refuses_new_requests(
    make_batcher: MakeBatcher, classifier: TrainedClassifier
) -> None:
    batcher, backend = make_batcher({"max_batch_size": 1})
    patches = classifier.patches[:3]
    first = await hold(batcher, backend, patches[:1])
    queued = asyncio.create_task(batcher.infer({"patch": patches[1:2]}))
    await asyncio.sleep(0)

    closing = asyncio.create_task(batcher.close())
    await asyncio.sleep(0)
    with pytest.raises(Unavailable) as error:
        batcher.submit({"patch": patches[2:3]})
    backend.gate.set()
    await closing

    assert error.value.reason == "MODEL_UNLOADING"
    assert_answers(classifier, patches[:1], await first)
    assert_answers(classifier, patches[1:2], await queued)


async def test_a_partial_batch_leaves_when_the_queue_delay_is_over(
    make_batcher: MakeBatcher, classifier: TrainedClassifier
) -> None:
    batcher, backend = make_batcher({"max_batch_size": 8, "max_queue_delay_us": 100_000})
    started = time.monotonic()

    await batcher.infer({"patch": classifier.patches[:2]})

    assert time.monotonic() - started >= 0.1
    assert [len(batch) for batch in backend.executed] == [2]
