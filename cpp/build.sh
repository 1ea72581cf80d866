#!/usr/bin/env bash
# Build cpp/build/doge_run, the C++ reference runtime, against the ONNX Runtime library of a
# Python environment (the onnxruntime wheel ships libonnxruntime.so; no other ORT install needed).
#
#   bash cpp/build.sh                      # uses python3 on PATH
#   PYTHON=.venv/bin/python bash cpp/build.sh
#   ORT_LIB=/path/to/libonnxruntime.so.1.x bash cpp/build.sh   # another ONNX Runtime (>= 1.21)
#
# Headers: ONNX Runtime's C/C++ API headers and nlohmann/json are not on PyPI; they are fetched
# once from Debian's archive (packages libonnxruntime-dev 1.21 and nlohmann-json3-dev, checked
# against pinned sha256 sums) into cpp/third_party/, which git ignores. The 1.21 API is a subset
# of every later library's (ONNX Runtime's C API is versioned and backward compatible).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
python=${PYTHON:-python3}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
third=$here/third_party
debs=(
  "pool/main/o/onnxruntime/libonnxruntime-dev_1.21.0+dfsg-1_amd64.deb 14f7d959d5deacbcf1504830d4189f91fc67382b399ed9ae9d3aa9c4050ced08"
  "pool/main/n/nlohmann-json3/nlohmann-json3-dev_3.11.3-2.1_all.deb 741a6a32f61a14eaf9560ba1814b27da8e78fa3b9bed9e8867ab46316ddf3793"
)

fetch_headers() {
  local tmp
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' RETURN
  for entry in "${debs[@]}"; do
    read -r path sum <<<"$entry"
    echo "fetching $mirror/$path" >&2
    "$python" - "$mirror/$path" "$tmp/pkg.deb" <<'PY' || return 1
import sys, time, urllib.request
for attempt in range(3):  # a flaky network gets two more tries
    try:
        with urllib.request.urlopen(sys.argv[1], timeout=120) as r:
            data = r.read()
        break
    except OSError as exc:
        if attempt == 2:
            sys.exit(f"{sys.argv[1]}: {exc}")
        time.sleep(5)
open(sys.argv[2], "wb").write(data)
PY
    echo "$sum  $tmp/pkg.deb" | sha256sum --check --quiet - \
      || { echo "error: $path does not match its pinned sha256" >&2; return 1; }
    dpkg-deb -x "$tmp/pkg.deb" "$tmp/root"
  done
  mkdir -p "$third.tmp/include"
  cp -r "$tmp/root/usr/include/onnxruntime" "$tmp/root/usr/include/nlohmann" "$third.tmp/include/"
  rm -rf "$third" && mv "$third.tmp" "$third"
}

[ -f "$third/include/onnxruntime/onnxruntime_cxx_api.h" ] || fetch_headers \
  || { echo "error: could not fetch the ONNX Runtime headers from $mirror (set DEBIAN_MIRROR)" >&2; exit 1; }

ort_lib=${ORT_LIB:-$("$python" -c 'import glob, os, onnxruntime as o
print(sorted(glob.glob(os.path.join(os.path.dirname(o.__file__), "capi", "libonnxruntime.so*")))[0])' 2>/dev/null)} \
  || { echo "error: $python has no onnxruntime with its libonnxruntime.so: set PYTHON=.venv/bin/python" \
            "(the project's environment) or ORT_LIB=/path/to/libonnxruntime.so.1.x" >&2; exit 1; }
[ -f "$ort_lib" ] || { echo "error: ORT_LIB=$ort_lib is not a file" >&2; exit 1; }
mkdir -p "$here/build/lib"
# the library's soname is libonnxruntime.so.1; the wheel ships only the versioned file
ln -sf "$ort_lib" "$here/build/lib/libonnxruntime.so.1"
# the runtime as a static library (everything but main.cpp), then the programs that link it
objects=()
for src in "$here"/src/*.cpp; do
  [ "$(basename "$src")" = main.cpp ] && continue
  obj=$here/build/obj/$(basename "${src%.cpp}").o
  mkdir -p "$here/build/obj"
  g++ -std=c++17 -O2 -Wall -Wextra -I"$third/include" -c "$src" -o "$obj"
  objects+=("$obj")
done
rm -f "$here/build/libdoge_runtime.a" && ar rcs "$here/build/libdoge_runtime.a" "${objects[@]}"
link() {  # link NAME SOURCE: a program over the library and ONNX Runtime
  g++ -std=c++17 -O2 -Wall -Wextra -I"$third/include" -I"$here/src" "$2" "$here/build/libdoge_runtime.a" \
    "$here/build/lib/libonnxruntime.so.1" -Wl,-rpath,"$here/build/lib" -o "$here/build/$1.tmp"
  mv "$here/build/$1.tmp" "$here/build/$1"
}
link doge_run "$here/src/main.cpp"
link embed "$here/examples/embed.cpp"
echo "built $here/build/doge_run, libdoge_runtime.a, embed (ONNX Runtime: $ort_lib)" >&2
