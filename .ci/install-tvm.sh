#!/usr/bin/env bash
# Installs what onnxprune.targets and its tests need on a fresh machine. Idempotent: each step is skipped
# when its result is already there.
#   - pip: apache-tvm 0.27.0.post1 with apache-tvm-ffi pinned to 0.1.14.post1 (0.1.15.x segfaults in
#     tvm.ir.save_json, which MetaSchedule uses), psutil + cloudpickle + xgboost-cpu (MetaSchedule, its
#     cost model), tornado (TVM's RPC tracker: `--rpc` latency measurement).
#   - apt: g++ (x86 runner), the aarch64 cross toolchain + qemu-user (arm bundles), emscripten + lld +
#     nodejs (wasm bundles).
#   - the aarch64 TVM runtime (libtvm_runtime.so, libtvm_ffi.so) from the aarch64 wheels of the same
#     versions, fetched with `pip download` into $ONNXPRUNE_TVM_RUNTIME_CACHE (~/.cache/onnxprune/tvm-runtime);
#   - the wasm32 TVM runtime, built with emscripten into the same cache.
set -euo pipefail

PY="${PYTHON:-python3}"
TVM_VERSION=0.27.0.post1
FFI_VERSION=0.1.14.post1
CACHE="${ONNXPRUNE_TVM_RUNTIME_CACHE:-$HOME/.cache/onnxprune/tvm-runtime}"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1

have_pkg() { "$PY" -c "import importlib.metadata as m, sys; sys.exit(m.version('$1') != '$2')" 2>/dev/null; }

# 1. Python packages.
if ! have_pkg apache-tvm "$TVM_VERSION" || ! have_pkg apache-tvm-ffi "$FFI_VERSION" \
  || ! "$PY" -c "import psutil, cloudpickle, xgboost, tornado" 2>/dev/null; then
  "$PY" -m pip install -q "apache-tvm==$TVM_VERSION" "apache-tvm-ffi==$FFI_VERSION" psutil cloudpickle xgboost-cpu tornado
fi

# 2. Debian packages: cross toolchain, emulator, wasm toolchain.
APT_PKGS=(g++ gcc-aarch64-linux-gnu g++-aarch64-linux-gnu qemu-user-static emscripten lld nodejs)
missing=()
for p in "${APT_PKGS[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ "${#missing[@]}" -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# 3. TVM runtime for aarch64, from the registry's aarch64 wheels of the same versions.
fetch_runtime() {  # arch, pip platform tag
  local arch="$1" plat="$2" dest="$CACHE/$1"
  [ -f "$dest/libtvm_runtime.so" ] && [ -f "$dest/libtvm_ffi.so" ] && return 0
  local tmp
  tmp="$(mktemp -d)"
  "$PY" -m pip download -q --no-deps --only-binary :all: --platform "$plat" --python-version 3.11 \
    -d "$tmp" "apache-tvm==$TVM_VERSION" "apache-tvm-ffi==$FFI_VERSION"
  mkdir -p "$dest"
  "$PY" - "$tmp" "$dest" <<'EOF'
import sys, zipfile, pathlib
src, dest = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
want = {"tvm/lib/libtvm_runtime.so", "tvm_ffi/lib/libtvm_ffi.so"}
for whl in src.glob("*.whl"):
    with zipfile.ZipFile(whl) as z:
        for name in z.namelist():
            if name in want:
                (dest / pathlib.Path(name).name).write_bytes(z.read(name))
missing = [w for w in want if not (dest / pathlib.Path(w).name).is_file()]
sys.exit(f"runtime libraries missing from the wheels: {missing}" if missing else 0)
EOF
  rm -rf "$tmp"
}
fetch_runtime aarch64 manylinux_2_28_aarch64


# 4. The TVM runtime for wasm bundles, compiled once with emscripten (~5 min on 2 cores) into the same cache,
#    so the wasm tests only link the model against it (the first wasm compile would build it otherwise).
if [ ! -f "$CACHE/wasm32/libtvm_wasm_runtime.a" ]; then
  ONNXPRUNE_TVM_RUNTIME_CACHE="$CACHE" "$PY" -c "
import shutil, sys
from onnxprune.targets.wasm import wasm_runtime
emcc = shutil.which('emcc') or sys.exit('emcc not found')
print('install-tvm: wasm runtime', wasm_runtime(emcc))"
fi

echo "install-tvm: apache-tvm $TVM_VERSION, apache-tvm-ffi $FFI_VERSION, aarch64 + wasm32 runtimes in $CACHE"
