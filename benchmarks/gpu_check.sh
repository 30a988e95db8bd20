#!/usr/bin/env bash
# The whole GPU check in one device call, on a machine with no package registry (make gpu-check runs this).
#
# Here first:   make gpu-wheels        (fills .gpu-wheels/ and checks that tree + wheels travel under 64 MiB)
# The call:     device run, command "bash benchmarks/gpu_check.sh", carry [".gpu-wheels"], timeout_s 590
# Then here:    cp <files_at>/gpu.json benchmarks/results/gpu.json && python benchmarks/write_benchmarks_md.py
#
# There: the carried wheels go into their own folder, ahead of the image's packages on PYTHONPATH (Transformers 5.24
# over the image's 5.17), hf_vram is used from this tree, nothing is fetched, and the check stops itself within its
# deadline. Its results land in benchmarks/results/gpu.json and, when the device tool's $OUT is set, in $OUT too.
# Arguments go to gpu_check.py (default: --deadline 460); a --dry-run (TRITON_INTERPRET=1, on the CPU) writes no
# BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
SITE=${GPU_SITE:-/tmp/hf_vram_site}
WHEELS=${GPU_WHEELS:-.gpu-wheels}
if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    echo "gpu-check: no wheels in $WHEELS; run 'make gpu-wheels' where a registry is reachable and carry the folder" >&2
    exit 2
fi
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
args=("$@")
[ ${#args[@]} -eq 0 ] && args=(--deadline 460)
status=0
timeout "${GPU_TIMEOUT:-540}" "$PY" benchmarks/gpu_check.py "${args[@]}" || status=$?
case " ${args[*]} " in
*" --dry-run "*) ;;
*)
    "$PY" benchmarks/write_benchmarks_md.py || status=$?
    if [ -n "${OUT:-}" ]; then cp benchmarks/results/gpu.json BENCHMARKS.md "$OUT"/ || status=$?; fi
    ;;
esac
exit $status
