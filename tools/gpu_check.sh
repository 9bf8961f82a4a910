#!/usr/bin/env bash
# The GPU checks of docs/benchmarks.md ("GPU"), as one prepared command for a lent GPU machine.
#
#   tools/gpu_check.sh wheels   here, with network: the peer the bench compares against (higher, pure Python)
#                               downloaded into .whl/ (git-ignored)
#   tools/gpu_check.sh          on the GPU machine (device tool: run, carry [".whl"]): the peer installed from
#                               .whl/ when present, then the device tests and the bench, each under a time
#                               limit; the logs in $OUT (the device tool's) or gpu-out/
#
# The GPU machine has python3 with torch and pytest and no network; nothing else is needed there.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if [ "${1:-}" = wheels ]; then
    PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
               --platform manylinux2014_x86_64)
    exec "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${PLATFORMS[@]}" -d .whl -r requirements-bench.txt
fi

out=${OUT:-gpu-out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
    if "$PY" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/peers \
            .whl/*.whl; then
        export PYTHONPATH=/tmp/peers${PYTHONPATH:+:$PYTHONPATH}
    else
        echo "the peers in .whl/ did not install (built for another Python?): the bench skips them" | tee "$out/peers.txt"
    fi
else
    echo "no .whl/: the bench skips the peers (tools/gpu_check.sh wheels, here, then carry .whl)" | tee "$out/peers.txt"
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  "$PY" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, torch.cuda.get_device_name())"
} 2>&1 | tee "$out/gpu.txt"
# The limits add up to under 10 minutes, one device command's limit.
timeout 150 "$PY" -m pytest -q tests/test_device.py 2>&1 | tee "$out/test_device.log"
timeout 45 "$PY" tools/bench.py --device cuda --busy 2>&1 | tee "$out/busy.log"  # launch-bound or not
timeout 60 "$PY" tools/bench.py --device cuda --configuration launch 2>&1 | tee "$out/launch.log"
timeout 330 "$PY" tools/bench.py --device cuda 2>&1 | tee "$out/bench.log"
