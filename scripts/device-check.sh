#!/usr/bin/env bash
# GPU machine only: build with the Python module, then every test suite (CTest, pytest), then the
# extra steps named in $STEPS (space-separated): "prior" (the geometry prior's tests, GPU included), "crash" (why a
# plugin exception kills Python: a backtrace under cuda-gdb, the symbol bindings of the throw and the catch, the CPU/kernel features),
# "bench" (benchmarks/backend_md_accuracy.py, and md_benchmark's force-alone timings with sdpa and auto).
# Carry .whl (scripts/device-wheels.sh); "rest" also needs .whl-extra (gemmi, pdbfixer, pydssp, ...).
# Logs land in $OUT.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export BUILD=/tmp/flashipa-build OUT="${OUT:-/tmp/out}" PYTHONUNBUFFERED=1
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
t0=$(date +%s)
FLASHIPA_BUILD_PYTHON=ON bash scripts/device-build.sh || { cp $BUILD.log $OUT/ 2>/dev/null; exit 1; }
echo "build: $(( $(date +%s) - t0 )) s"
export PYTHONPATH=/tmp/site:$BUILD/python
export OMP_NUM_THREADS=4
STEPS="${STEPS:-tests}"

if [[ " $STEPS " == *" toolchain "* ]]; then
    echo "== toolchain: where the C++ runtime comes from"
    for name in libstdc++.so libstdc++.so.6 libstdc++.a; do echo "$name -> $(g++ -print-file-name=$name)"; done
    for lib in $BUILD/lib/*.so; do echo "$(basename $lib): $(readelf -d $lib | grep NEEDED | head -3 | sed 's/.*\[//; s/\]//' | tr '\n' ' ')"; done
    python3 - <<'EOF2' > /tmp/error_script.py
import sys; sys.path.insert(0, "tests/python")
from test_python_integration import ERROR_SCRIPT
print(ERROR_SCRIPT.format(platform="Reference"))
EOF2
    python3 /tmp/error_script.py > /tmp/error_script.out 2>&1; echo "error script rc=$?"; tail -2 /tmp/error_script.out
fi

if [[ " $STEPS " == *" crash "* ]]; then
    echo "== crash diagnosis"
    python3 - <<'EOF' > /tmp/error_script.py
import sys; sys.path.insert(0, "tests/python")
from test_python_integration import ERROR_SCRIPT
print(ERROR_SCRIPT.format(platform="Reference"))
EOF
    python3 /tmp/error_script.py; echo "plain rc=$?"
    # Hypotheses, one switch each: the C++ runtime's symbol resolution, the CPU's shadow stack, where the
    # throw happens (Context creation instead of getState), and a throw caught by our own SWIG module.
    LD_PRELOAD="$(ldconfig -p | grep 'libstdc++.so.6 ' | head -1 | awk '{print $NF}')" python3 /tmp/error_script.py > /dev/null 2>&1; echo "libstdc++ preloaded rc=$?"
    GLIBC_TUNABLES=glibc.cpu.x86_shstk=off python3 /tmp/error_script.py > /dev/null 2>&1; echo "shadow stack off rc=$?"
    GLIBC_TUNABLES=glibc.cpu.hwcaps=-SHSTK,-IBT python3 /tmp/error_script.py > /dev/null 2>&1; echo "hwcaps -SHSTK,-IBT rc=$?"
    python3 -c 'import openmm, openmmflashipa
s = openmm.System(); [s.addParticle(1.0) for _ in range(3)]
f = openmmflashipa.FlashIPAForce(); f.addResidue(0, 1, 2, 99, 0); s.addForce(f)
try:
    openmm.Context(s, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
except Exception as e: print("RAISED at Context creation:", e)' 2>&1 | tail -1; echo "throw at Context creation rc=${PIPESTATUS[0]}"
    python3 -c 'import openmmflashipa
try:
    openmmflashipa.FlashIPAForce().setAttentionBackend("nope")
except Exception as e: print("RAISED in our module:", type(e).__name__)' 2>&1 | tail -1; echo "throw caught by our SWIG module rc=${PIPESTATUS[0]}"
    python3 -c 'import openmm
s = openmm.System(); s.addParticle(1.0); f = openmm.CustomExternalForce("undefined_function(x)"); f.addParticle(0, []); s.addForce(f)
try:
    c = openmm.Context(s, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference")); c.setPositions([[0,0,0]]); c.getState(getEnergy=True)
except Exception as e: print("RAISED by OpenMM itself:", str(e)[:60])' 2>&1 | tail -1; echo "OpenMM-only throw rc=${PIPESTATUS[0]}"
    grep -o -w 'user_shstk\|shstk\|ibt' /proc/cpuinfo | sort | uniq -c
    python3 -c 'print(open("/proc/self/status").read())' | grep -i 'x86_\|shstk' || echo "no x86 feature lines"
    readelf -n "$(readlink -f "$(command -v python3)")" | grep -i 'x86 feature' || true
    ldd "$BUILD/lib/libOpenMMFlashIPA.so" | grep -E 'stdc|gcc_s|OpenMM|torch' ; ldd $BUILD/python/openmmflashipa/_openmmflashipa*.so | grep -E 'stdc|gcc_s'
    ls -la "$(ldconfig -p | grep 'libstdc++.so.6 ' | head -1 | awk '{print $NF}')"*
    LD_DEBUG=bindings python3 /tmp/error_script.py 2> $OUT/bindings.log >/dev/null
    grep -E "symbol \`(__cxa_throw|__cxa_begin_catch|__cxa_end_catch|__cxa_rethrow|_Unwind_RaiseException|_Unwind_Resume|__gxx_personality_v0|__cxa_call_terminate|__cxa_allocate_exception|_ZTISt9exception)'" $OUT/bindings.log \
        | sed -E 's/^ *[0-9]+: *//; s/binding file //' | sort | uniq -c | sort -rn | head -40
    timeout 120 cuda-gdb -batch -ex run -ex bt -ex 'info registers rip rsp' -ex 'x/8i $pc-16' -ex 'info sharedlibrary' \
        --args python3 /tmp/error_script.py > $OUT/gdb.log 2>&1
    grep -v '^\[New Thread\|^\[Thread .* exited\|^\[Detaching' $OUT/gdb.log | grep -B2 -A60 'signal SIG' | head -90
fi

# "tests" = "cuda" (the GPU suites: what only this machine can check) + "rest" (everything else).
[[ " $STEPS " == *" tests "* ]] && STEPS="$STEPS cuda rest"
cudaSuites() {
    echo "== CTest (CUDA suites)"
    (cd $BUILD && ctest -j4 --timeout 300 --output-on-failure -L cuda 2>&1 | tee $OUT/ctest-cuda.log | grep -E 'tests passed|Failed|\*\*\*|Not Run|Timeout' | head -30)
    echo "== pytest (CUDA and Python-integration files)"
    timeout 300 python3 -m pytest -q -p no:cacheprovider tests/python/test_cuda_platform.py tests/python/test_python_integration.py 2>&1 | tee $OUT/pytest-cuda.log | tail -15
}
restSuites() {
    echo "== CTest (the rest)"
    (cd $BUILD && ctest -j6 --timeout 300 --output-on-failure -LE cuda 2>&1 | tee $OUT/ctest.log | grep -E 'tests passed|Failed|\*\*\*|Not Run|Timeout' | head -30)
    # pytest runs one test at a time: the files are dealt, largest first, to PYTEST_SHARDS processes (default 6)
    # of two threads each, so the suite fits in a call.
    local shards="${PYTEST_SHARDS:-6}" files part k i
    echo "== pytest (the rest, $shards processes)"
    mapfile -t files < <(ls -S tests/python/test_*.py | grep -v -e test_cuda_platform.py -e test_python_integration.py)
    for ((k = 0; k < shards; k++)); do
        part=(); for ((i = k; i < ${#files[@]}; i += shards)); do part+=("${files[$i]}"); done
        [ ${#part[@]} -gt 0 ] && OMP_NUM_THREADS=2 timeout "${PYTEST_TIMEOUT:-420}" python3 -m pytest -q -p no:cacheprovider "${part[@]}" ${PYTEST_ARGS:-} > $OUT/pytest-$k.log 2>&1 &
    done
    wait
    for ((k = 0; k < shards; k++)); do [ -f $OUT/pytest-$k.log ] && { grep -E '^(FAILED|ERROR)' $OUT/pytest-$k.log; tail -1 $OUT/pytest-$k.log; }; done | tee $OUT/pytest.log
}
# Both: side by side (the CUDA suites are mostly GPU time, the rest CPU time), each one's lines printed together.
if [[ " $STEPS " == *" cuda "* && " $STEPS " == *" rest "* ]]; then
    cudaSuites > $OUT/cuda-suites.txt 2>&1 &
    restSuites > $OUT/rest-suites.txt 2>&1
    wait
    cat $OUT/cuda-suites.txt $OUT/rest-suites.txt; rm -f $OUT/cuda-suites.txt $OUT/rest-suites.txt
elif [[ " $STEPS " == *" cuda "* ]]; then
    cudaSuites
elif [[ " $STEPS " == *" rest "* ]]; then
    restSuites
fi
if [[ " $STEPS " == *" prior "* ]]; then
    # The geometry prior's tests, whose exclusion term also runs in blocks on the GPU (not in the cuda label).
    echo "== CTest (geometry prior)"
    (cd $BUILD && ctest --timeout 120 --output-on-failure -R GeometryPrior 2>&1 | tee $OUT/ctest-prior.log | grep -E 'tests passed|Failed|\*\*\*' | head -10)
fi
if [[ " $STEPS " == *" bench "* ]]; then
    # The default backend's accuracy in MD and its model time against sdpa, side by side in one run.
    echo "== backend_md_accuracy"
    timeout 200 python3 benchmarks/backend_md_accuracy.py --nve-ps ${NVE_PS:-4} --out $OUT/backend_md_accuracy_h100.md 2>&1 | tail -25
    for backend in sdpa auto; do
        echo "== md_benchmark force alone, backend $backend"
        timeout 150 python3 benchmarks/md_benchmark.py --kinds force --variants a,e --lengths ${BENCH_LENGTHS:-2048,8192} \
            --backend $backend --max-seconds 4 --out $OUT/md_benchmark_$backend.md 2>&1 | grep -E '^\|' | tail -6
    done
fi
echo "total: $(( $(date +%s) - t0 )) s"
