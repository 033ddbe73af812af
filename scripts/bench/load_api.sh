#!/usr/bin/env bash
# Load on the API with wrk: GET /v1/jobs/{id} and POST /v1/jobs (one photo, manual
# description), each for DURATION seconds at CONNECTIONS, against `sidbooth-api` with `sidbooth s3-server`
# and a fresh database on the local Postgres. No worker runs: the posted jobs stay queued.
#
#   cargo build -p sidbooth-cli -p sidbooth-api    # or --release with BIN_DIR=target/release
#   bash scripts/bench/load_api.sh                 # DURATION=10 CONNECTIONS=16 THREADS=2
set -euo pipefail
cd "$(dirname "$0")/../.."

DURATION=${DURATION:-10}
CONNECTIONS=${CONNECTIONS:-16}
THREADS=${THREADS:-2}
SIDBOOTH_JOB_POSTS_PER_MINUTE=0 SIDBOOTH_MAX_QUEUED_JOBS=0
export SIDBOOTH_JOB_POSTS_PER_MINUTE SIDBOOTH_MAX_QUEUED_JOBS
# shellcheck source=scripts/lib/stack.sh
source scripts/lib/stack.sh

spec='{"subject_class":"dog","descriptions":{"case":"sid","source":"manual","texts":["a photo of sks dog sitting in front of an orange wall"]}}'
job=$(curl -sf -H "Authorization: Bearer $KEY" -F "spec=$spec;type=application/json" \
  -F "images=@examples/dog6/00.jpg" "$API/v1/jobs")
id=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["id"])' "$job")

# The multipart body of the POST, built once; wrk sends it on every request.
python3 - "$work/body" "$spec" <<'PY'
import sys
path, spec = sys.argv[1], sys.argv[2]
photo = open("examples/dog6/00.jpg", "rb").read()
b = b"sidboothload"
body = (b"--" + b + b'\r\nContent-Disposition: form-data; name="spec"\r\nContent-Type: application/json\r\n\r\n'
        + spec.encode() + b"\r\n--" + b + b'\r\nContent-Disposition: form-data; name="images"; filename="00.jpg"\r\n'
        b"Content-Type: image/jpeg\r\n\r\n" + photo + b"\r\n--" + b + b"--\r\n")
open(path, "wb").write(body)
PY
cat >"$work/post.lua" <<LUA
local f = io.open("$work/body", "rb")
wrk.method = "POST"
wrk.body = f:read("*all")
f:close()
wrk.headers["Authorization"] = "Bearer $KEY"
wrk.headers["Content-Type"] = "multipart/form-data; boundary=sidboothload"
LUA
cat >"$work/report.lua" <<'LUA'
done = function(summary, latency, requests)
  local codes = {}
  io.write(string.format("  %d requests in %.1f s = %.0f/s; p50 %.2f ms, p99 %.2f ms; errors: connect %d, read %d, status %d, timeout %d\n",
    summary.requests, summary.duration / 1e6, summary.requests / (summary.duration / 1e6),
    latency:percentile(50) / 1000, latency:percentile(99) / 1000,
    summary.errors.connect, summary.errors.read, summary.errors.status, summary.errors.timeout))
end
LUA
cat "$work/post.lua" "$work/report.lua" >"$work/post-report.lua"
printf 'wrk.headers["Authorization"] = "Bearer %s"\n' "$KEY" | cat - "$work/report.lua" >"$work/get-report.lua"

echo "GET /v1/jobs/{id}: $DURATION s, $CONNECTIONS connections, $THREADS threads"
wrk -t"$THREADS" -c"$CONNECTIONS" -d"${DURATION}s" -s "$work/get-report.lua" "$API/v1/jobs/$id" | tail -n 1
echo "POST /v1/jobs (one $(stat -c %s examples/dog6/00.jpg)-byte photo): $DURATION s, $CONNECTIONS connections"
wrk -t"$THREADS" -c"$CONNECTIONS" -d"${DURATION}s" -s "$work/post-report.lua" "$API/v1/jobs" | tail -n 1
echo "jobs stored: $(psql -At "$DATABASE_URL" -c 'SELECT count(*) FROM jobs')"
