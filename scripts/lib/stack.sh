# Sourced by scripts that need the API running as its own process: a fresh database on the
# local Postgres, `sidbooth s3-server` and `sidbooth-api` (no worker), an API key, and a trap that
# stops them and drops the database. Sets API, KEY, DATABASE_URL and work (a temporary folder).
# Extra API settings come from the caller's environment (exported SIDBOOTH_* variables).
BIN_DIR=${BIN_DIR:-target/debug}
SERVER=${SIDBOOTH_TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}
DB=sidbooth_stack_$$
work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  psql -q "$SERVER" -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" || true
  rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
psql -q "$SERVER" -c "CREATE DATABASE $DB"
export DATABASE_URL="${SERVER%/*}/$DB"
export AWS_ACCESS_KEY_ID=stack AWS_SECRET_ACCESS_KEY=stack-secret
"$BIN_DIR/sidbooth" migrate >/dev/null
KEY=$("$BIN_DIR/sidbooth" keys create --tenant stack 2>/dev/null)

s3_port=$(free_port)
"$BIN_DIR/sidbooth" s3-server --dir "$work/s3" --bind "127.0.0.1:$s3_port" --bucket sidbooth \
  >"$work/s3.log" 2>&1 &
pids+=($!)
api_port=$(free_port)
SIDBOOTH_S3_ENDPOINT="http://127.0.0.1:$s3_port" SIDBOOTH_API_BIND="127.0.0.1:$api_port" \
  RUST_LOG=${RUST_LOG:-warn} \
  "$BIN_DIR/sidbooth-api" >"$work/api.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 100); do curl -sf "http://127.0.0.1:$api_port/readyz" >/dev/null && break; sleep 0.2; done
API="http://127.0.0.1:$api_port"

