#!/usr/bin/env bash
# Reproduce benchmarks/results/<isa>/ (see benchmarks/README.md). Each JSON records its exact command in
# its "command" field. Artifacts go to $ART (default /tmp/doge-bench); a bench whose JSON exists is
# skipped (delete it to re-run).   usage: benchmarks/run.sh [export] [bench]   (both by default)
set -euo pipefail
ART=${ART:-/tmp/doge-bench}
# results are filed by the CPU's vector ISA (AVX2 vs AVX-512, VNNI for int8: different MLAS kernels)
TAG=${TAG:-$(python -c "from doge_export.bench_report import isa_tag, machine_info; print(isa_tag(machine_info()['cpu_isa']))")}
OUT=$(cd "$(dirname "$0")" && pwd)/results/$TAG
STEPS=${*:-"export bench"}
# the machine is shared: a higher priority (root only) keeps other jobs from preempting the bench
NICE=${NICE:-$( [ "$(id -u)" = 0 ] && echo "nice -n -10" )}
mkdir -p "$ART" "$OUT"

if [[ $STEPS == *export* ]]; then
  for model in doge-20m doge-60m; do
    # --no-validate: parity against PyTorch is the core tests' job (tests/test_parity.py); here the
    # fp32 artifact is only benchmarked, and the quantized ones measure their quality vs fp32
    doge-export onnx --model random:$model --out "$ART/$model" --force --no-validate
    for q in int8 int4; do
      doge-export onnx --model random:$model --out "$ART/$model-$q" --force --no-validate --quantize $q
    done
    # the faster, less accurate int4 (one scale per 64 input features instead of 32)
    doge-export onnx --model random:$model --out "$ART/$model-int4-b64" --force --no-validate --quantize int4 --quant-block 64
  done
fi

bench() {  # bench NAME ARTIFACT [options...]
  local name=$1 artifact=$2; shift 2
  [ -f "$OUT/$name.json" ] && return 0
  $NICE doge-export bench "$ART/$artifact" --prompt-len 128 --new-tokens 256 "$@" \
    --json "$OUT/$name.json" --plot "$OUT/$name.png" | tee "$OUT/$name.txt"
}

if [[ $STEPS == *bench* ]]; then
  # the C++ runtime (cpp/README.md): its onnxruntime-cpp row, from the -cpp runs below on
  PYTHON=${PYTHON:-$(command -v python)} bash "$(dirname "$0")/../cpp/build.sh"
  # One thread for every backend is the fair comparison on this shared 2-core machine: with two,
  # torch's OpenMP threads wait on each other whenever a neighbour's job preempts one of them
  # (generate() measured 5-15x slower under load). The first run shows the default settings.
  bench doge-20m-b1 doge-20m --batch 1 --probe-to 8000
  bench doge-20m-b1-threads1 doge-20m --batch 1 --threads 1
  for q in int8 int4 int4-b64; do
    bench doge-20m-$q-b1-threads1 doge-20m-$q --batch 1 --threads 1
  done
  bench doge-20m-b8-threads1 doge-20m --batch 8 --threads 1
  bench doge-60m-b1-threads1 doge-60m --batch 1 --threads 1 --probe-to 8000
  bench doge-60m-b8-threads1 doge-60m --batch 8 --threads 1
  for q in int8 int4 int4-b64; do
    bench doge-60m-$q-b1-threads1 doge-60m-$q --batch 1 --threads 1
  done
  # both cores for every backend, onnxruntime's threads spinning (fast on an idle machine only)
  bench doge-20m-b1-threads2-spin doge-20m --batch 1 --threads 2 --spin
  bench doge-20m-int4-b1-threads2-spin doge-20m-int4 --batch 1 --threads 2 --spin
  bench doge-20m-int4-b64-b1-threads2-spin doge-20m-int4-b64 --batch 1 --threads 2 --spin
  # Since the C++ runtime became a default backend every run above has its column. The AVX-512
  # recording predates that: its C++ column came from these runs (torch, the reference runner,
  # left out: the runs above have it)
  if [ "$TAG" = avx512-vnni ]; then
    cpp="--backends torch-generate,onnxruntime,onnxruntime-packed,onnxruntime-cpp"
    bench doge-20m-b1-threads1-cpp doge-20m --batch 1 --threads 1 $cpp
    bench doge-20m-int4-b64-b1-threads1-cpp doge-20m-int4-b64 --batch 1 --threads 1 $cpp
    bench doge-20m-b8-threads1-cpp doge-20m --batch 8 --threads 1 $cpp
    bench doge-60m-b1-threads1-cpp doge-60m --batch 1 --threads 1 $cpp
    bench doge-20m-b1-threads2-spin-cpp doge-20m --batch 1 --threads 2 --spin $cpp
  fi
fi
