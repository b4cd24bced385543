#!/usr/bin/env bash
# Guardrail's benchmark suite (`./build.sh bench` calls this). See bench/README.md.
#
# Assumes the artifacts are built (./build.sh); finds them through
#   GUARDRAIL_WASM (target/wasm32-wasip1/release/guardrail.wasm), GUARDRAIL_BIN (target/release/guardrail),
#   ENVOY_BIN (.venv/bin/envoy), relative paths taken from the repository root.
# Installs wrk and h2load (Debian packages) if missing; builds the trivial comparison filter
# (bench/trivial-filter → target/bench-trivial) before measuring anything. The criterion bench
# (target/release/guardrail-bench, from bench/decide) is built by ./build.sh with the CLI.
#
# Settings (environment): BENCH_ONLY=overhead,accuracy,propagation,scale,decide,replay,fleet,token,console (default: all),
# BENCH_DURATION (4 s per wrk run), BENCH_ROUNDS (4), BENCH_CONFIGS (abcdhi), BENCH_WARMUP (2 s, per run), BENCH_CONNECTIONS (16),
# BENCH_THREADS (2), BENCH_APPS (1000), BENCH_RULES (20), BENCH_CHANGES (100), BENCH_POLL_MS (2),
# BENCH_SCALE_APPS (1000,10000), BENCH_ACCURACY_APPS (20), BENCH_ACCURACY_QUOTA (50),
# BENCH_RESULTS (bench/results.json), BENCH_KEEP=1 (keep the work directory with configs and logs).
# BENCH_PERF=1 (perf profile per configuration), BENCH_ALT_WASM=FILE (A/B: (g) is (f) with that build;
# BENCH_ONLY=ab: both builds in one Envoy, taking turns, see bench/README.md "Profiling"),
# BENCH_PIN (1: the Envoy under test alone on the last CPU), BENCH_REQUEST_APPS (apps the requests come from),
# BENCH_BODY_BYTES (the upstream's response body; default 3 bytes),
# BENCH_HOSTCALLS="headers*20 ..." (price each host call); see bench/README.md "Profiling".
# BENCH_FLEET_NODES (1000; 10000 for the goal), BENCH_FLEET_COMPANIONS (1,2): the fleet part (bench/README.md "Fleet").
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

abs() { case "$1" in /*) printf '%s\n' "$1" ;; *) printf '%s\n' "$ROOT/$1" ;; esac; }
export GUARDRAIL_WASM="$(abs "${GUARDRAIL_WASM:-target/wasm32-wasip1/release/guardrail.wasm}")"
export GUARDRAIL_BIN="$(abs "${GUARDRAIL_BIN:-target/release/guardrail}")"
export ENVOY_BIN="$(abs "${ENVOY_BIN:-.venv/bin/envoy}")"
target_dir="$(abs "${CARGO_TARGET_DIR:-target}")"
export TRIVIAL_WASM="$target_dir/bench-trivial/wasm32-wasip1/release/trivial_filter.wasm"
ONLY="${BENCH_ONLY:-overhead,accuracy,propagation,scale,decide,replay,fleet,token,console}"

say() { printf '==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }
wants() { [[ ",$ONLY," == *",$1,"* ]]; }

[[ -f "$GUARDRAIL_WASM" ]] || die "GUARDRAIL_WASM: $GUARDRAIL_WASM does not exist; build it with ./build.sh"
[[ -x "$ENVOY_BIN" ]] || die "ENVOY_BIN: $ENVOY_BIN does not exist; ./build.sh installs Envoy into .venv"
PYTHON="$(dirname "$ENVOY_BIN")/python"
[[ -x "$PYTHON" ]] || PYTHON="$ROOT/.venv/bin/python"
[[ -x "$PYTHON" ]] || die "no Python in .venv (bench.py needs PyJWT and cryptography from it); run ./build.sh"

# --- load generators (Debian: wrk, nghttp2-client for h2load) ---
if ! command -v wrk >/dev/null 2>&1 || ! command -v h2load >/dev/null 2>&1; then
  sudo=()
  if [[ "$(id -u)" != 0 ]]; then
    command -v sudo >/dev/null 2>&1 || die "wrk/h2load are missing and neither root nor sudo is available: apt-get install wrk nghttp2-client"
    sudo=(sudo)
  fi
  say "installing wrk and h2load (apt-get install wrk nghttp2-client)"
  export DEBIAN_FRONTEND=noninteractive
  "${sudo[@]}" apt-get install -y -q wrk nghttp2-client >/dev/null 2>&1 \
    || { "${sudo[@]}" apt-get update -q >/dev/null && "${sudo[@]}" apt-get install -y -q wrk nghttp2-client >/dev/null; } \
    || die "could not install wrk and nghttp2-client"
fi

# --- builds, before anything is measured ---
if wants overhead || wants scale; then
  say "building the trivial comparison filter (bench/trivial-filter)"
  cargo build --quiet --release --target wasm32-wasip1 \
    --manifest-path bench/trivial-filter/Cargo.toml --target-dir "$target_dir/bench-trivial"
fi
# The criterion bench is one of the artifacts ./build.sh makes (with the CLI, sharing its
# dependencies and its build settings, which live there only).
if wants decide && [[ ! -x "$target_dir/release/guardrail-bench" ]]; then
  die "$target_dir/release/guardrail-bench does not exist; build it with ./build.sh"
fi

# The fleet simulator (bench/fleet): a workspace member built with the CLI's release settings.
if wants fleet && [[ ! -x "$target_dir/release/guardrail-fleet" ]]; then
  say "building the fleet simulator (cargo build --release -p guardrail-fleet)"
  cargo build --quiet --release -p guardrail-fleet
fi

exec "$PYTHON" "$ROOT/bench/bench.py" --only "$ONLY" "$@"
