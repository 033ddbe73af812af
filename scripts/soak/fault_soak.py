#!/usr/bin/env python3
"""The fault soak: the whole service as separate processes, under faults, losing nothing.

Starts a Postgres of its own (initdb in a temporary folder), `sidbooth s3-server`, the API
(`sidbooth-api`), three workers (`sidbooth-worker`, tiny model) and a webhook receiver, then
submits JOBS jobs that run every stage (manual descriptions, LoRA training, generation,
evaluation). While they run, a chaos loop SIGKILLs a random worker every few seconds and starts
it again, restarts Postgres twice and takes storage away for 10 seconds twice, while clients
poll every job, follow event streams and receive webhooks. Afterwards it prints:

  jobs succeeded / failed (each failure's reason), artifacts missing, duplicated or orphaned
  in storage, webhook events lost or delivered under two ids, and how the API answered while
  Postgres was down (503 problem, never 500).

Loopback only, bounded in time (TIMEOUT). Build first:

  cargo build -p sidbooth-cli -p sidbooth-api -p sidbooth-worker
  python3 scripts/soak/fault_soak.py [--jobs 50] [--timeout 1200] [--bin-dir target/debug]

Exit status 0 when every figure meets the goal (all jobs succeeded, every other count 0).
"""

import argparse
import base64
import collections
import hashlib
import hmac
import http.server
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
PHOTOS = os.path.join(ROOT, "examples", "dog6")
S3_KEY, S3_SECRET, BUCKET = "soak-access", "soak-secret-key", "sidbooth"
TERMINAL = {"succeeded", "failed", "canceled"}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log(message):
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


class Postgres:
    """A server of the soak's own, restartable; as root it runs as the postgres user."""

    def __init__(self, folder):
        self.data = os.path.join(folder, "pg")
        self.port = free_port()
        self.as_postgres = os.geteuid() == 0
        os.makedirs(self.data)
        if self.as_postgres:
            shutil.chown(folder, "postgres")
            shutil.chown(self.data, "postgres")
        self.run("initdb", "-D", self.data, "-A", "trust", "-U", "postgres", "--no-sync")
        self.start()

    def run(self, tool, *args):
        command = [tool, *args]
        if self.as_postgres:
            command = ["runuser", "-u", "postgres", "--", *command]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def start(self):
        options = f"-p {self.port} -k {self.data} -c listen_addresses=127.0.0.1 -c max_connections=200"
        self.run("pg_ctl", "-D", self.data, "-o", options, "-l", self.data + ".log", "-w", "start")

    def stop(self, mode="fast"):
        self.run("pg_ctl", "-D", self.data, "-m", mode, "-w", "stop")

    def url(self, database="postgres"):
        return f"postgres://postgres@127.0.0.1:{self.port}/{database}"

    def psql(self, sql):
        out = subprocess.run(
            ["psql", "-X", "-q", "-At", "-F", "\t", self.url(), "-c", sql],
            check=True, capture_output=True, text=True,
        )
        return [line.split("\t") for line in out.stdout.splitlines() if line]


class Process:
    """One service process; kill() is SIGKILL, stop() SIGTERM then SIGKILL."""

    def __init__(self, name, command, env, logs):
        self.name, self.command, self.env = name, command, env
        self.log_path = os.path.join(logs, name + ".log")
        self.proc = None
        self.start()

    def start(self):
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(
                self.command, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def kill(self):
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self):
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()


def wait_tcp(port, seconds=30):
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"nothing listens on port {port} after {seconds} s")


def wait_http(url, seconds=60):
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except (urllib.error.URLError, ConnectionError, OSError):
            time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer within {seconds} s")


class Api:
    def __init__(self, base, key):
        self.base, self.key = base, key

    def request(self, method, path, body=None, headers=None, timeout=30):
        request = urllib.request.Request(self.base + path, data=body, method=method)
        request.add_header("Authorization", "Bearer " + self.key)
        for name, value in (headers or {}).items():
            request.add_header(name, value)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), e.read()

    def json(self, method, path, value=None):
        body = None if value is None else json.dumps(value).encode()
        status, headers, raw = self.request(
            method, path, body, {"Content-Type": "application/json"} if body else None
        )
        return status, headers, (json.loads(raw) if raw else None)


def multipart(spec, photos):
    boundary = "soak" + uuid.uuid4().hex
    parts = [
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"spec\"\r\n"
        f"Content-Type: application/json\r\n\r\n{json.dumps(spec)}\r\n".encode()
    ]
    for name, data in photos:
        parts.append(
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"images\"; "
            f"filename=\"{name}\"\r\nContent-Type: image/jpeg\r\n\r\n".encode() + data + b"\r\n"
        )
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


class Receiver(http.server.ThreadingHTTPServer):
    """Webhook receiver: verifies every signature, records (id, type, job, updated_at)."""

    daemon_threads = True

    def __init__(self):
        self.secret = None
        self.received = []
        self.bad_signatures = 0
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), ReceiverHandler)


class ReceiverHandler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        server = self.server
        msg_id = self.headers.get("webhook-id", "")
        stamp = self.headers.get("webhook-timestamp", "")
        key = base64.b64decode(server.secret.removeprefix("whsec_"))
        expected = base64.b64encode(
            hmac.new(key, f"{msg_id}.{stamp}.".encode() + body, hashlib.sha256).digest()
        ).decode()
        signatures = [s.removeprefix("v1,") for s in self.headers.get("webhook-signature", "").split()]
        event = json.loads(body)
        with server.lock:
            if expected not in signatures:
                server.bad_signatures += 1
            server.received.append(
                (msg_id, event["type"], event["data"]["id"], event["data"]["updated_at"])
            )
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


def follow_events(api, job_id, stop, seen):
    """Follows a job's SSE stream to its end, reconnecting with Last-Event-ID."""
    last = None
    while not stop.is_set():
        request = urllib.request.Request(f"{api.base}/v1/jobs/{job_id}/events")
        request.add_header("Authorization", "Bearer " + api.key)
        if last:
            request.add_header("Last-Event-ID", last)
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                event_id, kind, data = None, None, None
                for raw in response:
                    line = raw.decode().rstrip("\n")
                    if line.startswith("id:"):
                        event_id = line[3:].strip()
                    elif line.startswith("event:"):
                        kind = line[6:].strip()
                    elif line.startswith("data:"):
                        data = json.loads(line[5:].strip())
                    elif line == "" and event_id:
                        last = event_id
                        if kind == "status":
                            status = data["data"]["status"]
                            seen[job_id].append(status)
                            if status in TERMINAL:
                                return
                        event_id, kind, data = None, None, None
        except (urllib.error.URLError, ConnectionError, OSError, ValueError):
            pass
        time.sleep(0.5)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=50)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=1200, help="seconds for the whole run")
    parser.add_argument("--bin-dir", default=os.path.join(ROOT, "target", "debug"))
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args()
    binary = lambda name: os.path.join(args.bin_dir, name)  # noqa: E731
    for name in ["sidbooth", "sidbooth-api", "sidbooth-worker"]:
        if not os.access(binary(name), os.X_OK):
            sys.exit(f"{binary(name)} is missing: cargo build -p sidbooth-cli -p sidbooth-api -p sidbooth-worker")

    folder = tempfile.mkdtemp(prefix="sidbooth-soak-")
    logs = os.path.join(folder, "logs")
    os.makedirs(logs)
    processes = []
    started = time.time()
    try:
        report = run(args, folder, logs, binary, processes, started)
    finally:
        for p in processes:
            p.stop()
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
        else:
            log(f"kept {folder}")
    sys.exit(0 if report else 1)


def run(args, folder, logs, binary, processes, started):
    pg = Postgres(folder)
    try:
        return soak(args, folder, logs, binary, processes, started, pg)
    finally:
        for p in processes:
            p.stop()
        try:
            pg.stop("immediate")
        except subprocess.CalledProcessError:
            pass


def soak(args, folder, logs, binary, processes, started, pg):
    base_env = dict(os.environ, RUST_LOG="info,sqlx=warn,aws=warn,hyper=warn")
    db_env = {"DATABASE_URL": pg.url()}
    subprocess.run([binary("sidbooth"), "migrate"], env={**base_env, **db_env}, check=True,
                   stdout=subprocess.DEVNULL)
    key = subprocess.run([binary("sidbooth"), "keys", "create", "--tenant", "soak"],
                         env={**base_env, **db_env}, check=True, capture_output=True,
                         text=True).stdout.strip()

    s3_port = free_port()
    s3_dir = os.path.join(folder, "s3")
    s3_env = {**base_env, "AWS_ACCESS_KEY_ID": S3_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET}
    s3 = Process("s3-server", [binary("sidbooth"), "s3-server", "--dir", s3_dir,
                               "--bind", f"127.0.0.1:{s3_port}", "--bucket", BUCKET], s3_env, logs)
    processes.append(s3)
    wait_tcp(s3_port)

    service_env = {
        **s3_env, **db_env,
        "SIDBOOTH_S3_ENDPOINT": f"http://127.0.0.1:{s3_port}", "SIDBOOTH_S3_BUCKET": BUCKET,
        "SIDBOOTH_LEASE_SECS": "4", "SIDBOOTH_HEARTBEAT_SECS": "0.5", "SIDBOOTH_POLL_SECS": "0.5",
        "SIDBOOTH_MAX_ATTEMPTS": "20", "SIDBOOTH_RETRY_BASE_SECS": "0.2",
        "SIDBOOTH_RETRY_MAX_SECS": "3",
    }
    api_port = free_port()
    api_env = {
        **service_env, "SIDBOOTH_API_BIND": f"127.0.0.1:{api_port}",
        "SIDBOOTH_WEBHOOK_ALLOW_PRIVATE_TARGETS": "true",
        "SIDBOOTH_WEBHOOK_RETRY_BASE_SECS": "0.5", "SIDBOOTH_WEBHOOK_RETRY_MAX_SECS": "5",
        "SIDBOOTH_MAX_QUEUED_JOBS": "0", "SIDBOOTH_JOB_POSTS_PER_MINUTE": "0",
        "SIDBOOTH_AUTH_FAILURES_PER_MINUTE": "0",
    }
    api = Process("api", [binary("sidbooth-api")], api_env, logs)
    processes.append(api)
    wait_http(f"http://127.0.0.1:{api_port}/healthz")
    client = Api(f"http://127.0.0.1:{api_port}", key)

    receiver = Receiver()
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    status, _, hook = client.json(
        "POST", "/v1/webhooks", {"url": f"http://127.0.0.1:{receiver.server_address[1]}/hook"}
    )
    assert status == 201, (status, hook)
    receiver.secret = hook["secret"]

    worker_env = {**service_env, "SIDBOOTH_TINY_MODEL": "5", "SIDBOOTH_TINY_EVALUATORS": "0",
                  "SIDBOOTH_CHECKPOINT_EVERY": "3", "SIDBOOTH_SHUTDOWN_MODE": "release"}
    workers = [Process(f"worker-{i}", [binary("sidbooth-worker")], worker_env, logs)
               for i in range(args.workers)]
    processes.extend(workers)

    manual = json.load(open(os.path.join(PHOTOS, "manual-descriptions.json")))
    photos = [(name, open(os.path.join(PHOTOS, name), "rb").read()) for name in ["00.jpg", "01.jpg"]]
    spec = {
        "subject_class": "dog", "token": "sks",
        "descriptions": {"case": "sid", "source": "manual", "texts": manual["descriptions"][:2]},
        "stages": ["describe", "train", "generate", "evaluate"],
        "train": {"steps": 6, "rank": 2, "seed": 0},
        "generate": {"prompts": ["a sks dog on the beach"], "images_per_prompt": 1, "steps": 4,
                     "seed": 0},
    }
    body, content_type = multipart(spec, photos)

    stop = threading.Event()
    answers = collections.Counter()          # (phase, status, problem type) of every poll
    phase = {"name": "normal"}
    job_ids = []
    seen = collections.defaultdict(list)

    def submit(i):
        while True:
            at = phase["name"]
            status, headers, raw = client.request(
                "POST", "/v1/jobs", body,
                {"Content-Type": content_type, "Idempotency-Key": f"soak-{i}"},
            )
            if status in (200, 202):
                return json.loads(raw)["id"]
            answers[(at, status, problem_type(raw))] += 1
            time.sleep(1.0)

    def poller():
        while not stop.is_set():
            for job_id in list(job_ids):
                # The phase when the request left: an answer can take the acquire timeout.
                at = phase["name"]
                status, _, raw = client.request("GET", f"/v1/jobs/{job_id}", timeout=15)
                answers[(at, status, problem_type(raw))] += 1
            time.sleep(1.0)

    log(f"submitting {args.jobs} jobs")
    for i in range(args.jobs):
        job_ids.append(submit(i))
    for _ in range(2):
        threading.Thread(target=poller, daemon=True).start()
    followers = [threading.Thread(target=follow_events, args=(client, j, stop, seen), daemon=True)
                 for j in job_ids[:10]]
    for f in followers:
        f.start()

    faults = collections.Counter()

    def chaos():
        t0 = time.time()
        schedule = [(20, "postgres"), (45, "storage"), (75, "postgres"), (105, "storage")]
        while not stop.is_set():
            time.sleep(random.uniform(3, 6))
            if stop.is_set():
                return
            now = time.time() - t0
            if schedule and now >= schedule[0][0]:
                _, what = schedule.pop(0)
                if what == "postgres":
                    phase["name"] = "postgres down"
                    log("chaos: restarting Postgres")
                    pg.stop("fast")
                    time.sleep(5)
                    pg.start()
                    phase["name"] = "normal"
                else:
                    phase["name"] = "storage down"
                    log("chaos: storage unreachable for 10 s")
                    s3.kill()
                    time.sleep(10)
                    s3.start()
                    phase["name"] = "normal"
                faults[what] += 1
                continue
            victim = random.choice(workers)
            victim.kill()
            faults["worker killed"] += 1
            time.sleep(0.5)
            victim.start()

    chaos_thread = threading.Thread(target=chaos, daemon=True)
    chaos_thread.start()

    deadline = started + args.timeout
    statuses = {}
    while time.time() < deadline:
        rows = query(pg, "SELECT id, status, coalesce(error->>'code', ''), "
                         "coalesce(error->>'message', '') FROM jobs")
        if rows is not None:
            statuses = {r[0]: r for r in rows}
            done = sum(1 for r in rows if r[1] in TERMINAL)
            if done == len(job_ids) and not schedule_left(chaos_thread, faults):
                break
        time.sleep(3)
    stop.set()
    chaos_thread.join(timeout=30)
    for w in workers:
        if w.proc.poll() is not None:
            w.start()
    if s3.proc.poll() is not None:
        s3.start()
    log("jobs settled; waiting for the webhook outbox to drain")
    for _ in range(60):
        pending = query(pg, "SELECT count(*) FROM webhook_deliveries WHERE status = 'pending'")
        if pending and pending[0][0] == "0":
            break
        time.sleep(1)
    for f in followers:
        f.join(timeout=5)

    return report(pg, s3_dir, job_ids, statuses, receiver, answers, seen, faults, started)


def schedule_left(chaos_thread, faults):
    """The chaos loop still has Postgres restarts or storage outages to make."""
    return chaos_thread.is_alive() and (faults["postgres"] < 2 or faults["storage"] < 2)


def problem_type(raw):
    try:
        return json.loads(raw).get("type", "").rsplit("/", 1)[-1]
    except (ValueError, AttributeError):
        return ""


def query(pg, sql):
    try:
        return pg.psql(sql)
    except subprocess.CalledProcessError:
        return None


def report(pg, s3_dir, job_ids, statuses, receiver, answers, seen, faults, started):
    succeeded = [j for j in job_ids if statuses.get(j, [None, ""])[1] == "succeeded"]
    failed = [statuses[j] for j in job_ids if j in statuses and statuses[j][1] != "succeeded"]
    referenced = collections.Counter()
    for (key,) in pg.psql("SELECT object_key FROM artifacts UNION ALL SELECT object_key FROM job_images"):
        referenced[key] += 1
    bucket = os.path.join(s3_dir, BUCKET)
    stored = set()
    for directory, dirs, files in os.walk(bucket):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            if not name.startswith("."):
                stored.add(os.path.relpath(os.path.join(directory, name), bucket))
    missing = [k for k in referenced if k not in stored]
    duplicated = [k for k, n in referenced.items() if n > 1]
    # Objects no row points at; a job's working files (checkpoints, upload records) are the
    # worker's own and do not count.
    orphaned = [k for k in stored if k not in referenced and "/work/" not in k]

    messages = {r[0]: r for r in pg.psql("SELECT id, event_type, job_id FROM webhook_messages")}
    received_ids = collections.Counter(r[0] for r in receiver.received)
    lost = [m for m in messages if m not in received_ids]
    repeats = sum(n - 1 for n in received_ids.values())
    by_change = collections.defaultdict(set)
    for msg_id, event_type, job_id, updated_at in receiver.received:
        by_change[(job_id, event_type, updated_at)].add(msg_id)
    two_ids = [c for c, ids in by_change.items() if len(ids) > 1]
    status_events = int(pg.psql("SELECT count(*) FROM job_events WHERE kind = 'status'")[0][0])
    sse_ended = sum(1 for statuses_seen in seen.values() if statuses_seen and statuses_seen[-1] in TERMINAL)

    print()
    print(f"fault soak: {len(job_ids)} jobs, {time.time() - started:.0f} s, faults: "
          + ", ".join(f"{what} x{n}" for what, n in sorted(faults.items())))
    print(f"  jobs succeeded / failed:           {len(succeeded)} / {len(failed)}")
    for row in failed:
        print(f"    {row[0]}: {row[1]} {row[2]} {row[3][:160]}")
    print(f"  objects in storage / referenced:   {len(stored)} / {len(referenced)}")
    print(f"  artifacts missing in storage:      {len(missing)}")
    print(f"  objects referenced twice:          {len(duplicated)}")
    print(f"  orphaned objects:                  {len(orphaned)}")
    for k in orphaned[:10]:
        print(f"    {k}")
    print(f"  webhook messages / status events:  {len(messages)} / {status_events}")
    print(f"  webhook events lost:               {len(lost)}")
    print(f"  webhook events under two ids:      {len(two_ids)}")
    print(f"  webhook repeats (same id again):   {repeats} (at least once: allowed)")
    print(f"  webhook signatures that failed:    {receiver.bad_signatures}")
    print(f"  event streams followed to the end: {sse_ended} / {len(seen) or 10}")
    print("  API answers by phase (status, problem type):")
    for (phase, status, kind), n in sorted(answers.items()):
        print(f"    {phase:14} {status} {kind or '-':12} {n}")
    server_errors = sum(n for (_, status, _), n in answers.items() if status >= 500 and status != 503)
    unavailable_other = sum(n for (_, status, kind), n in answers.items() if status == 503 and kind != "unavailable")
    print(f"  5xx other than 503 unavailable:    {server_errors + unavailable_other}")
    ok = (len(succeeded) == len(job_ids) and not missing and not duplicated and not orphaned
          and not lost and not two_ids and receiver.bad_signatures == 0
          and server_errors + unavailable_other == 0)
    print(f"  goal met: {'yes' if ok else 'no'}")
    return ok


if __name__ == "__main__":
    main()
