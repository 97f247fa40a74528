#!/usr/bin/env bash
# Runs the virtio fuzz target for SECONDS (default 60) on the stable
# toolchain (RUSTC_BOOTSTRAP=1 lets cargo-fuzz pass its -Z sanitizer flags),
# optimised with debug assertions and overflow checks, ASan on,
# then prints libFuzzer's final statistics: executions, exec/s, coverage
# (cov = edges, ft = features) and the corpus size. Crashes land in
# artifacts/virtio_queue_devices/.
#
#   vmm/devices/fuzz/run.sh [SECONDS] [JOBS]
#
# Needs `cargo install cargo-fuzz`.
set -euo pipefail
cd "$(dirname "$0")"
secs="${1:-60}"
jobs="${2:-1}"
export RUSTC_BOOTSTRAP=1
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/work/target-virtio}"
mkdir -p corpus/virtio_queue_devices artifacts/virtio_queue_devices
# Seed inputs (bring-up plus one valid request per device) live in seeds/.
cp -n seeds/* corpus/virtio_queue_devices/ 2>/dev/null || true
log="$(mktemp)"
set +e
parallel=()
if [ "$jobs" -gt 1 ]; then
    # Each job logs to fuzz-N.log; libFuzzer copies it to stdout at its end.
    parallel=(-jobs="$jobs" -workers="$jobs")
fi
cargo fuzz run --debug-assertions virtio_queue_devices corpus/virtio_queue_devices -- \
    -max_total_time="$secs" -print_final_stats=1 "${parallel[@]}" \
    -max_len=16384 -rss_limit_mb=2048 2>&1 | tee "$log" | grep -E '^#[0-9]+.*(pulse|DONE|NEW)' | tail -n 5
status=${PIPESTATUS[0]}
set -e
echo "--- final statistics ---"
grep -E 'stat::|DONE|cov:' "$log" | grep -E 'stat::|DONE' | tail -n 12
grep -E 'ERROR|panicked|SUMMARY' "$log" | head -n 20 || true
echo "corpus: $(ls corpus/virtio_queue_devices | wc -l) inputs; crashes: $(ls artifacts/virtio_queue_devices | wc -l)"
rm -f "$log"
exit "$status"
