#!/usr/bin/env bash
# The GPU device check, in one run on a machine with an NVIDIA GPU (docs/gpu.md).
#
#   bash bench/gpu-check.sh pack    # HERE (no GPU needed): build the cuda example binary and the
#                                   # cuda mpt-server, put them xz-compressed in
#                                   # bench/gpu-check-bin/ (git-ignored)
#   bash bench/gpu-check.sh run     # THERE (GPU, torch + transformers, no Rust, no network):
#                                   # unpack, find the CUDA libraries, run bench/gpu_check.py
#   bash bench/gpu-check.sh smoke   # HERE: the same Python checks on the CPU at toy sizes, with a
#                                   # CPU build (tests this script and the binary's CPU paths)
#
# After `pack`, copy the checkout with bench/gpu-check-bin/ to the GPU machine and run `run`
# there. The log is also written to $OUT/gpu-check.log when $OUT is set. Expected time: about
# 5-7 minutes (machine start not included); gpu_check.py prints a summary table last.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PACKED=bench/gpu-check-bin/gpu_check.xz
PACKED_SERVER=bench/gpu-check-bin/mpt-server.xz

pack() {
    eval "$(bash .ci/cuda-toolkit.sh)"
    # sm_90 PTX for H100/H200 cards (the driver JIT-compiles it at load).
    export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
    CARGO_TARGET_DIR=target/cuda nice -n 10 \
        cargo build --release -p mpt-engine --features cuda --example gpu_check
    CARGO_TARGET_DIR=target/cuda nice -n 10 cargo build --release -p mpt-server --features cuda
    mkdir -p bench/gpu-check-bin
    grep -qxF /bench/gpu-check-bin/ .git/info/exclude 2>/dev/null ||
        echo /bench/gpu-check-bin/ >>.git/info/exclude
    strip -o bench/gpu-check-bin/gpu_check target/cuda/release/examples/gpu_check
    xz -T0 -9 -f bench/gpu-check-bin/gpu_check
    strip -o bench/gpu-check-bin/mpt-server target/cuda/release/mpt-server
    xz -T0 -9 -f bench/gpu-check-bin/mpt-server
    git rev-parse HEAD >bench/gpu-check-bin/COMMIT
    ls -l "$PACKED" "$PACKED_SERVER"
    echo "next: copy the checkout with bench/gpu-check-bin/ to the GPU machine and run there: bash bench/gpu-check.sh run"
}

run() {
    local bin=/tmp/gpu-check/gpu_check
    mkdir -p /tmp/gpu-check
    xz -dc "$PACKED" >"$bin"
    chmod +x "$bin"
    local server=()
    if [[ -f "$PACKED_SERVER" ]]; then
        xz -dc "$PACKED_SERVER" >/tmp/gpu-check/mpt-server
        chmod +x /tmp/gpu-check/mpt-server
        server=(--server /tmp/gpu-check/mpt-server)
    fi
    echo "binary built from commit $(cat bench/gpu-check-bin/COMMIT 2>/dev/null || echo unknown)"
    # cuBLAS, cuRAND and cudart 13 from the Python wheels; libcuda.so.1 from the driver.
    local libs
    libs="$(python3 - <<'EOF'
import glob, os
dirs = []
try:
    import nvidia
    for root in nvidia.__path__:
        dirs += sorted(glob.glob(os.path.join(root, "*", "lib")))
except ImportError:
    pass
dirs += [d for d in ("/usr/local/nvidia/lib64", "/usr/local/nvidia/lib", "/usr/local/cuda/lib64")
         if os.path.isdir(d)]
print(":".join(dirs))
EOF
)"
    export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    if ldd "$bin" "${server[@]:1}" | grep "not found"; then
        echo "missing shared libraries (LD_LIBRARY_PATH=$LD_LIBRARY_PATH)" >&2
        exit 2
    fi
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv || true
    local log=/tmp/gpu-check/gpu-check.log rc=0
    PYTHONUNBUFFERED=1 python3 bench/gpu_check.py "$bin" "${server[@]}" 2>&1 | tee "$log" || rc=$?
    if [[ -n "${OUT:-}" ]]; then cp "$log" "$OUT/gpu-check.log"; fi
    return "$rc"
}

smoke() {
    cargo build --release -p mpt-engine --example gpu_check
    cargo build --release -p mpt-server
    local python=python3
    [[ -x .venv-ref/bin/python ]] && python=.venv-ref/bin/python
    PYTHONUNBUFFERED=1 "$python" bench/gpu_check.py target/release/examples/gpu_check \
        --server target/release/mpt-server --smoke
}

case "${1:-}" in
    pack) pack ;;
    run) run ;;
    smoke) smoke ;;
    *)
        echo "usage: bash bench/gpu-check.sh pack|run|smoke (see the header)" >&2
        exit 2
        ;;
esac
