#!/usr/bin/env bash
# Profiles decide() inside V8, where Envoy runs it: builds core/examples/decide_loop.rs for
# wasm32-wasip1 (release, symbols kept), writes the bench policy (1,000 apps, RULES rules) and
# 4,000 requests as bench.py makes them, runs ITERATIONS decisions in Node with --cpu-prof and
# prints the functions with the most self time.
#
#   bench/profile-decide.sh [RULES (20)] [ITERATIONS (300000)]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
rules="${1:-20}" iterations="${2:-300000}"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
command -v node >/dev/null || { echo "error: node is needed (apt-get install nodejs)" >&2; exit 1; }
target_dir="${CARGO_TARGET_DIR:-$ROOT/target}"
CARGO_PROFILE_RELEASE_STRIP=false cargo build --quiet --release --target wasm32-wasip1 -p guardrail-core --example decide_loop
work="$(mktemp -d)"
trap '[[ -n "${KEEP:-}" ]] || rm -rf "$work"' EXIT
"$PYTHON" - "$work" "$rules" <<'PY'
import json, random, sys
sys.path.insert(0, "bench")
import bench, policy_gen as gen
work, rules = sys.argv[1], int(sys.argv[2])
rng = random.Random(6)
key = bench.issuer()
tokens = [key.token(gen.app_id(i)) for i in rng.sample(range(1000), 200)]
open(f"{work}/policy.json", "w").write(json.dumps(bench.bench_policy(apps=1000, rules=rules)))
open(f"{work}/requests.tsv", "w").write("".join(f"{p}\t{n}\t{v}\n" for p, n, v in gen.requests(rng, 4000, 1000, tokens)))
PY
node --no-warnings --cpu-prof --cpu-prof-dir="$work/prof" bench/wasi-run.mjs \
  "$target_dir/wasm32-wasip1/release/examples/decide_loop.wasm" "$work" "$work/policy.json" "$work/requests.tsv" "$iterations"
"$PYTHON" - "$work/prof" <<'PY'
import collections, glob, json, re, sys
profile = json.load(open(sorted(glob.glob(sys.argv[1] + "/*.cpuprofile"))[-1]))
names = {n["id"]: n["callFrame"]["functionName"] or "(anonymous)" for n in profile["nodes"]}
samples = collections.Counter(names[s] for s in profile["samples"])
total = sum(samples.values())
print("self time  function")
for name, n in samples.most_common(30):
    print(f"{100 * n / total:8.1f}%  {re.sub(r'17h[0-9a-f]{16}E$', '', name)[:120]}")
PY
