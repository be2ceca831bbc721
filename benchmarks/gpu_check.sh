#!/usr/bin/env bash
# The GPU check of issue 34, on a bare GPU machine, in about 6 minutes: install the project
# from this checkout (nothing is fetched: the machine may have no network, so its own torch,
# transformers, timm, onnx and pytest are used), run the tests marked gpu, then
# benchmarks/gpu.py --quick. The log, the tests' JUnit XML and the tables (gpu.md, gpu.json)
# land in one folder: $OUT if set, else /tmp/vistra-gpu-check. Exit status 0 only if both
# parts passed.
#
#     bash benchmarks/gpu_check.sh                 # from the repository root, or anywhere
#     OUT=/tmp/check bash benchmarks/gpu_check.sh
#
# Then copy OUT/gpu.md and OUT/gpu.json to benchmarks/ and commit them, the GPU named.

set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/vistra-gpu-check}"
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
export PYTHONUNBUFFERED=1
PYTHON="${PYTHON:-python3}"
start=$SECONDS

echo "== the machine"
nvidia-smi || echo "nvidia-smi: not found"
"$PYTHON" -c "import sys, torch; print('python', sys.version.split()[0], '| torch',
torch.__version__, '| CUDA', torch.version.cuda, '| GPU seen:', torch.cuda.is_available())"

echo "== install (editable, no dependencies fetched)"
if ! "$PYTHON" -m pip install --quiet --no-deps --no-build-isolation -e .; then
    echo "pip could not install the project: importing it from src/ instead"
    export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PYTHON" - <<'EOF'
import importlib.util
import vistra
print("vistra", vistra.__version__, "from", vistra.__file__)
wanted = ["timm", "transformers", "onnx", "onnxruntime", "onnxscript", "safetensors", "yaml",
          "PIL", "matplotlib", "tensorboard", "pytest", "fastapi", "uvicorn"]
missing = [name for name in wanted if importlib.util.find_spec(name) is None]
print("missing here:", ", ".join(missing) or "none",
      "(timm: its benchmark rows are left out; fastapi/uvicorn: only `vistra serve` needs them)")
EOF

echo "== python -m pytest -m gpu"
# The gpu tests live in tests/test_gpu.py; naming the file spares collecting modules whose
# imports (fastapi, httpx, selenium) this machine may lack.
timeout 270 "$PYTHON" -m pytest -m gpu tests/test_gpu.py -p no:cacheprovider -rfEs \
    --junitxml="$OUT/pytest_gpu.xml"
tests=$?
echo "pytest exit status: $tests"

echo "== benchmarks/gpu.py --quick"
# gpu.md is rewritten after each configuration: a run stopped by the timeout keeps its rows.
timeout 270 "$PYTHON" benchmarks/gpu.py --quick --budget-s 120 --output "$OUT/gpu.md"
bench=$?
echo "gpu.py exit status: $bench"

echo "== done in $((SECONDS - start)) s: tests $tests, benchmark $bench; files in $OUT"
ls -l "$OUT"
[ "$tests" -eq 0 ] && [ "$bench" -eq 0 ]
