#!/usr/bin/env bash
# Static checks: buf lint, buf breaking (against the previous commit of main), ruff, mypy.
set -euo pipefail
cd "$(dirname "$0")/.."

node_modules/.bin/buf lint
modules() { grep -E '^  - path:' | sort; }
if git rev-parse --verify --quiet HEAD~1 >/dev/null && git cat-file -e HEAD~1:buf.yaml 2>/dev/null; then
  if [ "$(git show HEAD~1:buf.yaml | modules)" = "$(modules < buf.yaml)" ]; then
    node_modules/.bin/buf breaking --against '.git#ref=HEAD~1'
  else
    # buf compares module by module and refuses workspaces with different module lists.
    echo "buf breaking: buf.yaml's modules changed since the previous commit; checked from the next"
  fi
else
  echo "buf breaking: no previous commit with protos to compare against"
fi
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy libs services tests bench
