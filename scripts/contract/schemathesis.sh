#!/usr/bin/env bash
# The API against its own served document: schemathesis (`pip install schemathesis` into
# SCHEMATHESIS, default a venv at ~/.cache/sidbooth-bench/schemathesis) generates requests from
# /openapi.yaml with a valid key and runs every check (status codes and content types in the
# document, response schemas, no 5xx, ...). Prints schemathesis' summary; exits non-zero on a
# failed check.
#
#   cargo build -p sidbooth-cli -p sidbooth-api
#   bash scripts/contract/schemathesis.sh      # MAX_EXAMPLES=50
set -euo pipefail
cd "$(dirname "$0")/../.."

MAX_EXAMPLES=${MAX_EXAMPLES:-50}
VENV=${SCHEMATHESIS:-$HOME/.cache/sidbooth-bench/schemathesis}
if [ ! -x "$VENV/bin/schemathesis" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q schemathesis
fi
# Limits out of the way: the checks are about the contract, not about quotas.
export SIDBOOTH_JOB_POSTS_PER_MINUTE=0 SIDBOOTH_MAX_QUEUED_JOBS=0 SIDBOOTH_AUTH_FAILURES_PER_MINUTE=0
# shellcheck source=scripts/lib/stack.sh
source scripts/lib/stack.sh

"$VENV/bin/schemathesis" run "$API/openapi.yaml" --url "$API" \
  --checks all --max-examples "$MAX_EXAMPLES" --request-timeout 30 \
  -H "Authorization: Bearer $KEY"
