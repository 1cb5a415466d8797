#!/usr/bin/env bash
# The host's work per training step on a CubeCL backend, per thread: `perf record` over the
# steady steps of `dnal-train bench` (the warm-up, which compiles and autotunes, is left out by
# starting the record DELAY_S seconds in), then each thread's samples per step, split into
# work and waiting. burn 0.22 issues every operation from the caller's thread through burn's
# fusion server thread (`DSU-*`) to CubeCL's device server thread (`DSD-*`; driver threads it
# starts inherit the name); the threads wait by spinning on their channels, so a thread's CPU
# share alone does not say whether it works. Samples in the channels' and the scheduler's
# waiting functions are counted as waiting, everything else as work.
#
# With tiny images (the default) the kernels cost little and the figures are the host's cost
# of issuing a step. On Mesa's software Vulkan the driver's own threads run the kernels under
# the server's name; the server itself is marked.
#
# [BACKEND=wgpu] [MODEL=resnet56-cifar] [BATCH=1] [SIZE=4] [STEPS=200] [DELAY_S=35] [FREQ=499] \
#   [CUBECL_TOML=FILE] [BENCH_ARGS="--burn-sgd"] \
#   benches/gpu/host_work.sh DNAL_TRAIN_BINARY [LABEL]
set -euo pipefail
bin="${1:?usage: host_work.sh DNAL_TRAIN_BINARY [LABEL]}"
label="${2:-run}"
backend="${BACKEND:-wgpu}"
model="${MODEL:-resnet56-cifar}"
batch="${BATCH:-1}"
size="${SIZE:-4}"
steps="${STEPS:-200}"
delay_s="${DELAY_S:-35}"
freq="${FREQ:-499}"
command -v perf >/dev/null || { echo "host_work.sh needs perf (apt-get install linux-perf)" >&2; exit 2; }
[ -x "$bin" ] || { echo "host_work.sh: $bin is not an executable dnal-train" >&2; exit 2; }

out="$(mktemp -d)"
# CubeCL reads cubecl.toml from the folder it starts in: none, or CUBECL_TOML's (a profiling
# one would distort the figures).
if [ -n "${CUBECL_TOML:-}" ]; then cp "$CUBECL_TOML" "$out/cubecl.toml"; fi
# shellcheck disable=SC2086 # BENCH_ARGS holds several arguments or none
(cd "$out" && perf record -q -F "$freq" -o perf.data --delay "$((delay_s * 1000))" \
    "$bin" bench --backend "$backend" --model "$model" --batch "$batch" --size "$size" \
    --classes 10 --warmup 5 --steps "$steps" ${BENCH_ARGS:-} >bench.out 2>&1)
median=$(grep -o 'median [0-9.]*' "$out/bench.out" | awk '{print $2}')
[ -n "$median" ] || { cat "$out/bench.out" >&2; exit 1; }
span=$(perf script -i "$out/perf.data" -F time 2>/dev/null | sed -n '1p;$p' | tr -d ': ' | paste -sd' ')
perf report -i "$out/perf.data" --no-children --sort pid,sym -n -q -g none 2>/dev/null >"$out/report"
# shellcheck disable=SC2086 # $span holds the first and last sample times
python3 - "$label" "$median" $span "$freq" "$out/report" <<'PY'
import collections, re, sys
label, median, t0, t1, freq, report = sys.argv[1:7]
median, t0, t1, freq = float(median), float(t0), float(t1), float(freq)
steps = (t1 - t0) * 1000 / median
waiting = re.compile(r"submit_inner|Server::start|sched_yield|finish_task_switch|_raw_spin_unlock"
                     r"|irqentry_exit|do_syscall_64|schedule|nanosleep|futex|park")
busy, work, serves = collections.Counter(), collections.Counter(), set()
for line in open(report):
    m = re.match(r"\s*[\d.]+%\s+(\d+)\s+(\d+):(\S+)\s+\[.\]\s+(.*)", line)
    if not m:
        continue
    n, thread, symbol = int(m.group(1)), f"{m.group(3)}:{m.group(2)}", m.group(4)
    busy[thread] += n
    if not waiting.search(symbol):
        work[thread] += n
    # CubeCL's device server loop: tells its thread from the driver threads named after it.
    if "custom_channel::Server::start" in symbol and thread.startswith("DSD"):
        serves.add(thread)
per_step = lambda n: n / freq * 1000 / steps
print(f"{label}: step median {median:.1f} ms; {t1 - t0:.1f} s recorded, about {steps:.0f} steps")
for thread, n in busy.most_common(8):
    role = " (CubeCL's device server)" if thread in serves else ""
    print(f"  {thread:24s} on a CPU {per_step(n):7.1f} ms/step, working {per_step(work[thread]):7.1f}{role}")
PY
rm -rf "$out"
