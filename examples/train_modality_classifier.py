"""Trains a modality classifier on the real DICOM images that ship with pydicom and
pydicom-data, through the platform like any other data, and measures it on held-out series.

1. Every file of both corpora that holds pixel data is uploaded to ingest (de-identified at
   the door, as always); each file's outcome is counted.
2. Every series that ended up stored is looked up through ingest's pixel API: a series
   ingest cannot serve as one volume (instances of different sizes, for example) is left
   out, with ingest's reason.
3. The classes are the acquisition modalities with enough patients (`--min-patients`);
   `OT` (test patterns and character-set samples), `SEG`, `RTDOSE` and files without a
   modality are never classes (see docs/examples/train-modality-classifier.md).
4. A dataset of those series, labelled by their modality, split by patient pseudonym; a
   training job of a MONAI DenseNet121 on CPU, watched to its end.
5. The version is promoted; once the inference service serves it, every series of the test
   split (patients the job never saw) is predicted through the gateway as a clinician, and
   the accuracy is reported beside the majority-class baseline.

Run against a running platform (`.venv/bin/medimg up`), from the repository root:

    .venv/bin/python examples/train_modality_classifier.py [--epochs 30] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from collections import Counter, defaultdict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
import pydicom
from pydicom.data import data_manager, get_testdata_file
from rich.console import Console

from medimg.ingest.v1 import ingest_service_pb2 as ingest_pb
from medimg.ingest.v1 import ingest_service_pb2_grpc as ingest_grpc
from medimg.training.v1 import training_service_pb2 as training_pb
from medimg.training.v1 import training_service_pb2_grpc as training_grpc
from medimg_cli import mesh as meshlib
from medimg_cli.demo import chunks
from medimg_cli.pki import ensure_pki, mint_token
from medimg_cli.platform import default_state_dir, read_status
from medimg_cli.train import Lines, describe, follow, print_end

#: Never classes: not an acquisition modality of a patient's body (OT here is test
#: patterns and character-set samples; SEG and RTDOSE are derived objects).
NOT_CLASSES = frozenset({"OT", "SEG", "RTDOSE", "RTSTRUCT", "RTPLAN", "SR", "PR", "KO", ""})
Outcome = ingest_pb.InstanceResult.Outcome
_OUTCOMES = {v: Outcome.Name(v).removeprefix("OUTCOME_").lower() for v in Outcome.values()}
_KEPT = {Outcome.OUTCOME_STORED, Outcome.OUTCOME_DUPLICATE}
TIMEOUT = 300.0


@dataclass(frozen=True)
class Source:
    name: str
    path: Path
    modality: str


@dataclass
class Series:
    name: str
    modality: str
    files: list[str] = field(default_factory=list)
    pseudonym: str = ""
    shape: tuple[int, ...] = ()
    refused: str = ""


# The corpus ----------------------------------------------------------------------------


def corpus() -> list[Source]:
    """Every file of pydicom's test corpus and pydicom-data that reads as DICOM with pixel
    data, found by name and opened with get_testdata_file(name, download=False)."""
    roots = [Path(data_manager.DATA_ROOT) / "test_files"]
    roots += [Path(source.data_path) for source in data_manager.external_data_sources().values()]
    names = sorted(
        {p.name for root in roots for p in root.rglob("*") if p.is_file() and p.suffix != ".py"}
    )
    found = []
    for name in names:
        path = get_testdata_file(name, download=False)
        if path is None:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the corpus is full of deliberately odd files
            try:
                # Large values (the pixels) stay on disk: only their presence is wanted.
                dataset = pydicom.dcmread(str(path), defer_size=1024)
            except Exception:  # noqa: BLE001 - not DICOM, or too broken to read a header
                continue
            if not {"PixelData", "FloatPixelData", "DoubleFloatPixelData"} & set(dataset.dir()):
                continue
            found.append(Source(name, Path(str(path)), str(dataset.get("Modality", "") or "")))
    return found


# Calls ---------------------------------------------------------------------------------


@contextmanager
def channel(status: Mapping[str, Any], service: str) -> Iterator[grpc.Channel]:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=Path(status["ca"]).read_bytes(),
        private_key=Path(status["ops_key"]).read_bytes(),
        certificate_chain=Path(status["ops_cert"]).read_bytes(),
    )
    options = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]
    with grpc.secure_channel(status["services"][service]["sidecar"], credentials, options) as ch:
        yield ch


def user(state: Path, status: Mapping[str, Any], name: str, role: str) -> httpx.Client:
    """A REST client of the gateway with a dev JWT of `name` in `role`."""
    mesh = meshlib.load_mesh()
    pki = ensure_pki(state / "pki", mesh.trust_domain, mesh.namespace, mesh.all_identities())
    token = mint_token(
        pki,
        issuer=mesh.gateway.jwt_issuer,
        audience=mesh.gateway.jwt_audience,
        subject=name,
        roles=[role],
    )
    return httpx.Client(
        base_url=status["gateway"]["url"],
        headers={"Authorization": f"Bearer {token}"},
        timeout=TIMEOUT,
    )


def checked(response: httpx.Response) -> Any:
    if response.is_error:
        raise SystemExit(f"{response.request.method} {response.request.url}: {response.text}")
    return response.json()


# Steps ---------------------------------------------------------------------------------


def ingest(
    status: Mapping[str, Any], sources: list[Source], failures: list[str], reasons: Counter[str]
) -> tuple[Counter[str], dict[str, Series]]:
    """Uploads every file; the outcomes, and the series that hold a stored instance.

    One file per upload stream: a file that makes ingest fail the whole stream (rather than
    refuse that file alone) then costs only itself, and is counted as `failed <CODE>`.
    `reasons` counts the files not kept by outcome and ingest's reason."""
    outcomes: Counter[str] = Counter()
    series: dict[str, Series] = {}
    with channel(status, "ingest") as ch:
        stub = ingest_grpc.IngestServiceStub(ch)
        for source in sources:
            try:
                answer = stub.UploadInstances(chunks(source.path.read_bytes()), timeout=TIMEOUT)
            except grpc.RpcError as error:
                outcomes[f"failed {error.code().name}"] += 1
                failures.append(f"{source.name}: {describe(error)}")
                continue
            for result in answer.results:
                outcomes[_OUTCOMES[result.outcome]] += 1
                if result.outcome not in _KEPT:
                    reasons[f"{_OUTCOMES[result.outcome]} {result.reason}".strip()] += 1
                    continue
                name = result.instance.rsplit("/instances/", 1)[0]
                found = series.setdefault(name, Series(name, source.modality))
                found.files.append(source.name)
                if found.modality != source.modality:
                    found.refused = "MIXED_MODALITIES"
    return outcomes, series


def probe(status: Mapping[str, Any], series: dict[str, Series]) -> None:
    """Each series' volume header from ingest's pixel API (its pseudonym and shape), or the
    reason ingest refuses to serve it as one volume."""
    with channel(status, "ingest") as ch:
        stub = ingest_grpc.IngestServiceStub(ch)
        for found in series.values():
            if found.refused:
                continue
            call: Any = stub.GetSeriesPixels(
                ingest_pb.GetSeriesPixelsRequest(name=found.name), timeout=TIMEOUT
            )
            try:
                for message in call:
                    found.pseudonym = message.header.patient_pseudonym
                    found.shape = tuple(message.header.shape)
                    break
            except grpc.RpcError as error:
                found.refused = describe(error)
            finally:
                call.cancel()  # the header is all that is needed


def choose_classes(series: dict[str, Series], min_patients: int) -> list[str]:
    patients: dict[str, set[str]] = defaultdict(set)
    for found in series.values():
        if not found.refused and found.modality not in NOT_CLASSES:
            patients[found.modality].add(found.pseudonym)
    return sorted(m for m, p in patients.items() if len(p) >= min_patients)


def predict(
    clinician: httpx.Client, model: str, items: list[dict[str, Any]]
) -> list[tuple[str, str, float]]:
    """(truth, predicted, its probability) per item; `predicted` is `ERROR <reason>` where
    Predict refused the series."""
    answers = []
    for item in items:
        response = clinician.post(f"/v1/models/{model}:predict", json={"target": item["series"]})
        if response.is_error:
            details = response.json().get("details") or [{}]
            reason = details[0].get("reason", response.text)
            answers.append((item["label"], f"ERROR {reason}", 0.0))
            continue
        labels = response.json()["classification"]["labels"]
        best = max(labels, key=lambda label: label["probability"])
        answers.append((item["label"], best["label"], float(best["probability"])))
    return answers


def baseline(train_labels: list[str], classes: list[str]) -> tuple[str, float] | None:
    """The class a model that ignores the image would answer (the commonest in training),
    or None when the training split is balanced (then chance is 1 / classes)."""
    ranked = Counter(train_labels).most_common()
    if len(ranked) < len(classes) or ranked[0][1] > ranked[1][1]:
        return ranked[0][0], ranked[0][1] / len(train_labels)
    return None


def main() -> int:  # noqa: PLR0912, PLR0915 - one walk through the platform, step by step
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--state", type=Path, default=None, help="the platform's state folder")
    parser.add_argument("--min-patients", type=int, default=3, help="patients a class needs")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--split-seed", default="modality-example")
    parser.add_argument("--model", default="modality-classifier")
    parser.add_argument("--gpus", type=int, default=0, help="GPUs for the job (CUDA torch)")
    parser.add_argument("--json", type=Path, help="write the figures here too")
    args = parser.parse_args()
    out = Console(soft_wrap=True, highlight=False)
    state = (args.state or default_state_dir()).resolve()
    status = read_status(state)
    if status is None:
        out.print(f"medimg is not running from {state}: start it with `medimg up`", style="red")
        return 2

    sources = corpus()
    out.print(f"1. {len(sources)} files with pixel data in pydicom's corpus and pydicom-data:")
    out.print("   by modality: " + _counts(Counter(s.modality or "(none)" for s in sources)))
    failures: list[str] = []
    reasons: Counter[str] = Counter()
    outcomes, series = ingest(status, sources, failures, reasons)
    out.print(f"   ingest: {_counts(outcomes)}")
    out.print(f"   not stored, by reason: {_counts(reasons)}")
    for failure in failures:
        out.print(f"   {failure}", style="red")

    probe(status, series)
    refused = [s for s in series.values() if s.refused]
    out.print(f"2. {len(series)} series stored; {len(refused)} not servable as one volume:")
    for found in refused:
        out.print(f"   {found.modality or '(none)'} {', '.join(found.files)}: {found.refused}")
    usable = {name: s for name, s in series.items() if not s.refused}
    table: dict[str, tuple[set[str], int]] = {}
    for found in usable.values():
        patients, count = table.get(found.modality or "(none)", (set(), 0))
        table[found.modality or "(none)"] = (patients | {found.pseudonym}, count + 1)
    out.print(
        "   servable series (patients) by modality: "
        + ", ".join(f"{m} {c} ({len(p)})" for m, (p, c) in sorted(table.items()))
    )

    classes = choose_classes(usable, args.min_patients)
    out.print(
        f"3. classes (acquisition modalities with >= {args.min_patients} patients): "
        f"{', '.join(classes)}"
    )
    if len(classes) < 2:
        out.print("   fewer than two classes: nothing to classify", style="red")
        return 1

    engineer = user(state, status, "example-engineer", "ml-engineer")
    items = [
        {"series": s.name, "label": s.modality} for s in usable.values() if s.modality in classes
    ]
    dataset = checked(
        engineer.post(
            "/v1/datasets",
            params={"datasetId": "pydicom-modality"},
            json={
                "task": "TASK_CLASSIFICATION",
                "classNames": classes,
                "items": items,
                "splitFractions": {"train": 0.6, "validation": 0.2, "test": 0.2},
                "splitSeed": args.split_seed,
                "description": "pydicom and pydicom-data test images, labelled by Modality",
            },
        )
    )
    per_split: dict[str, Counter[str]] = defaultdict(Counter)
    for item in dataset["items"]:
        per_split[item["split"].removeprefix("SPLIT_").lower()][item["label"]] += 1
    out.print(f"4. {dataset['name']}: {len(items)} series, split by patient:")
    for split in ("train", "validation", "test"):
        out.print(f"   {split:<10} {_counts(per_split[split]) or 'none'}")

    spec = {
        "dataset": dataset["name"],
        "network": {"name": "DenseNet121"},
        "imageSize": [args.image_size, args.image_size],
        "batchSize": args.batch_size,
        "epochs": args.epochs,
        "seed": "0",
        "model": args.model,
        "resources": {"processes": 1, "gpus": args.gpus},
        "mixedPrecision": args.gpus > 0,
    }
    job = checked(engineer.post("/v1/trainingJobs", json={"spec": spec}))
    device = f"{args.gpus} GPU" if args.gpus else "CPU"
    out.print(f"   {job['name']}: DenseNet121 2D, {args.epochs} epochs, on {device}")
    started = time.monotonic()
    with channel(status, "training") as ch:
        stub = training_grpc.TrainingServiceStub(ch)
        follow(stub, job["name"], Lines(out, 10.0), time.monotonic() + 6 * 3600)
        ended = stub.GetTrainingJob(training_pb.GetTrainingJobRequest(name=job["name"]))
    print_end(out, ended)
    if ended.state != training_pb.TrainingJob.STATE_SUCCEEDED:
        return 1
    version = ended.model_version

    checked(engineer.post(f"/v1/{version}:promote", json={}))
    clinician = user(state, status, "example-clinician", "clinician")
    number = version.rsplit("/", 1)[1]
    deadline = time.monotonic() + 120
    while clinician.get(f"/v1/models/{args.model}").json().get("loadedVersion") != number:
        if time.monotonic() > deadline:
            out.print(f"inference did not load {version} within 2 minutes", style="red")
            return 1
        time.sleep(0.5)
    train = [item for item in dataset["items"] if item["split"] == "SPLIT_TRAIN"]
    test = [item for item in dataset["items"] if item["split"] == "SPLIT_TEST"]
    fitted = predict(clinician, args.model, train)
    answers = predict(clinician, args.model, test)
    fit = sum(truth == predicted for truth, predicted, _ in fitted)
    correct = sum(truth == predicted for truth, predicted, _ in answers)
    out.print(f"5. {version} promoted and served; Predict as a clinician:")
    out.print(f"   training split (seen in training): {fit}/{len(train)} right")
    for truth, predicted, _ in sorted(fitted):
        if truth != predicted:
            out.print(f"     {truth} -> {predicted}")
    out.print(f"   test split (patients never seen): {correct}/{len(test)} right")
    for truth, predicted, probability in sorted(answers):
        out.print(f"     {truth} -> {predicted} ({probability:.2f})")
    guess = baseline([item["label"] for item in train], classes)
    if not test:
        out.print("   the test split is empty: no held-out accuracy", style="red")
    elif guess is None:
        out.print(
            f"   held-out accuracy {correct / len(test):.2f}; chance {1 / len(classes):.2f} "
            "(the training split is balanced)"
        )
    else:
        hits = sum(truth == guess[0] for truth, _, _ in answers)
        out.print(
            f"   held-out accuracy {correct / len(test):.2f}; always '{guess[0]}' (the "
            f"commonest training class) would get {hits / len(test):.2f}"
        )
    out.print(f"   {time.monotonic() - started:.0f} s from creating the job to these answers")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "files": len(sources),
                    "ingest": dict(outcomes),
                    "classes": classes,
                    "dataset": dataset["name"],
                    "splits": {k: dict(v) for k, v in per_split.items()},
                    "job": job["name"],
                    "model_version": version,
                    "validation_metrics": dict(ended.progress.metrics),
                    "train_accuracy": fit / len(train) if train else None,
                    "test": [{"truth": t, "predicted": p, "p": q} for t, p, q in answers],
                    "test_accuracy": correct / len(test) if test else None,
                },
                indent=2,
            )
        )
    return 0


def _counts(counter: Mapping[str, int]) -> str:
    return ", ".join(f"{key} {count}" for key, count in sorted(counter.items()))


if __name__ == "__main__":
    sys.exit(main())
