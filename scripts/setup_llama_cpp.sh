#!/usr/bin/env bash
# Build llama.cpp once from the llama-cpp-python sdist on PyPI and cache it in the venv:
#   VENV/llama.cpp/bin   libllama.so + ggml libraries, llama-bench, llama-completion
#   llama_cpp            the Python bindings, installed without a second build (they load VENV/llama.cpp/bin)
# Idempotent: a stamp naming the version skips everything on the next run.
# Cost: about 5-8 minutes on 2 cores (compiling llama.cpp); cmake/ninja come from PyPI when missing.
set -euo pipefail
VENV="$(cd "${1:?usage: setup_llama_cpp.sh VENV [CONSTRAINTS]}" && pwd)"  # absolute: the bindings link to DEST
CONSTRAINTS="${2:-constraints.txt}"
PY="$VENV/bin/python"
VERSION="$(sed -n 's/^llama-cpp-python==//p' "$CONSTRAINTS")"
DEST="$VENV/llama.cpp"
STAMP="$DEST/.built-$VERSION"
[ -f "$STAMP" ] && exit 0

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
echo "llama.cpp: building llama-cpp-python $VERSION's vendored llama.cpp into $DEST (a few minutes, once)" >&2
"$PY" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$work"
tar -xzf "$work"/llama_cpp_python-*.tar.gz -C "$work"
src="$(echo "$work"/llama_cpp_python-*/)"

# cmake >= 3.21 and ninja: the system's if new enough, else PyPI's wheels in the venv.
if ! cmake --version 2>/dev/null | awk 'NR==1{split($3,v,"."); exit !(v[1]>3 || (v[1]==3 && v[2]>=21))}'; then
    "$PY" -m pip install -q "cmake>=3.21" ninja
fi
export PATH="$VENV/bin:$PATH"
gen=()
command -v ninja >/dev/null && gen=(-G Ninja)

build="$work/build"
cmake -S "$src/vendor/llama.cpp" -B "$build" "${gen[@]}" -DCMAKE_BUILD_TYPE=Release \
    -DBUILD_SHARED_LIBS=ON -DCMAKE_BUILD_RPATH_USE_ORIGIN=ON \
    -DLLAMA_BUILD_COMMON=ON -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF >"$work/cmake.log" \
    || { cat "$work/cmake.log" >&2; exit 1; }
cmake --build "$build" --target llama-bench llama-completion -j "$(nproc)" >"$work/build.log" \
    || { tail -50 "$work/build.log" >&2; exit 1; }

rm -rf "$DEST"
mkdir -p "$DEST"
cp -a "$build/bin" "$DEST/bin"
# The bindings: no second compile (LLAMA_BUILD=OFF), the libraries linked in from DEST/bin.
CMAKE_ARGS="-DLLAMA_BUILD=OFF" "$PY" -m pip install -q --no-cache-dir "$work"/llama_cpp_python-*.tar.gz
lib="$("$PY" -c 'import importlib.util, pathlib; print(pathlib.Path(importlib.util.find_spec("llama_cpp").origin).parent / "lib")')"
mkdir -p "$lib"
ln -sf "$DEST"/bin/*.so* "$lib"/
"$PY" -c 'import llama_cpp; print("llama.cpp: bindings", llama_cpp.__version__, "load", llama_cpp.llama_cpp._lib._name)' >&2
touch "$STAMP"
