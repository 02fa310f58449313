#!/usr/bin/env bash
# CUDA check on a machine with an NVIDIA GPU: the CUDA probe, verification on CUDA (plain fp32 and
# TF32) and a CUDA benchmark of committed fixtures, rewritten by the tool itself; prints figures.
#
#   bash benchmarks/gpu_check.sh [WHEELS]
#
# WHEELS: an onnxruntime-gpu .whl, or a folder of wheels (onnxruntime-gpu, nvidia-*, nvidia-ml-py),
# installed offline (--no-index --no-deps) into the current Python first; without it the installed
# onnxruntime-gpu and CUDA libraries are used. The tool runs from this checkout (PYTHONPATH); its
# dependencies (onnx, onnx-graphsurgeon, numpy, typer, rich) must be installed. PYTHON picks the
# interpreter; results go to $OUT (default /tmp/gpu-check).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if [ -n "${1:-}" ]; then
    if [ -d "$1" ]; then set -- "$1"/*.whl; fi
    "$PY" -m pip install --quiet --no-index --no-deps --force-reinstall "$@" || exit 2
fi

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || echo "nvidia-smi: not found"
"$PY" - <<'EOF' || exit 2
import onnxruntime as ort
from rewriter.ort import cuda_status
s = cuda_status()
print(f"onnxruntime {ort.__version__} {ort.get_available_providers()}; CUDA: {s.cause} {s.reason}")
raise SystemExit(0 if s else 1)
EOF

timed() { local t0=$SECONDS; "$PY" -m rewriter "$@" > "$OUT/last.log" 2>&1; local rc=$?; echo "  [$((SECONDS - t0)) s, exit $rc] onnx-rewrite ${*:1:2}"; return $rc; }
for fixture in tests/fixtures/keras/method1_tf2onnx.onnx tests/fixtures/torch/conformer_conv_ts_dynamic.onnx; do
    name=$(basename "$fixture" .onnx)
    echo "== $name"
    timed "$fixture" -o "$OUT/$name.rw.onnx" --overwrite --providers cpu,cuda --bench-providers cuda --no-cache --report "$OUT/$name.rewrite.json" || tail -5 "$OUT/last.log"
    [ -f "$OUT/$name.rw.onnx" ] || continue
    timed verify "$fixture" "$OUT/$name.rw.onnx" --providers cuda --report "$OUT/$name.verify.json" || tail -5 "$OUT/last.log"
    timed verify "$fixture" "$OUT/$name.rw.onnx" --providers cuda --cuda-tf32 --report "$OUT/$name.verify-tf32.json" || tail -5 "$OUT/last.log"
    timed bench "$fixture" "$OUT/$name.rw.onnx" --providers cuda --report "$OUT/$name.bench.json" || tail -5 "$OUT/last.log"
    "$PY" - "$OUT" "$name" <<'EOF'
import json, sys
from pathlib import Path
out, name = Path(sys.argv[1]), sys.argv[2]
def load(kind):
    p = out / f"{name}.{kind}.json"
    return json.loads(p.read_text()) if p.exists() else {}
for kind in ("verify", "verify-tf32"):
    c = load(kind).get("verification", {}).get("providers", {}).get("cuda", {})
    print(f"  {kind}: {c.get('status')} max_abs={c.get('max_abs')} noise={c.get('noise_max_abs')} tol={c.get('tolerance')} {c.get('reason', '')}")
for kind in ("rewrite", "bench"):
    b = load(kind).get("benchmark", {}).get("cuda", {})
    if b.get("status") != "measured":
        print(f"  {kind} benchmark: {b.get('status')} {b.get('reason', '')}")
        continue
    mib = lambda t: "-" if not t or t.get("peak_device_bytes") is None else f"{t['peak_device_bytes'] / 2**20:.0f} MiB"
    bf, af = b["before"], b.get("after") or {}
    speedup = "-" if b.get("speedup") is None else f"{b['speedup']:.2f}x"
    print(f"  {kind} benchmark at {b['shapes']}: {bf['median_ms']:.4f} -> {af.get('median_ms', float('nan')):.4f} ms, "
          f"{speedup} ({b.get('verdict')}), device memory {mib(bf)} -> {mib(af)}, options {b.get('provider_options')}")
EOF
done
