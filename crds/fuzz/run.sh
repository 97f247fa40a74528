#!/usr/bin/env bash
# Runs one of vireo-crds' fuzz targets (import_xml, manifest) for SECONDS
# (default 60) on the stable toolchain (RUSTC_BOOTSTRAP=1 lets cargo-fuzz
# pass its -Z sanitizer flags), with debug assertions and ASan, then prints
# libFuzzer's final statistics. Crashes land in artifacts/TARGET/.
#
#   crds/fuzz/run.sh import_xml|manifest [SECONDS]
#
# Needs `cargo install cargo-fuzz`.
set -euo pipefail
cd "$(dirname "$0")"
target="${1:?import_xml or manifest}"
secs="${2:-60}"
export RUSTC_BOOTSTRAP=1
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/work/target-crds-fuzz}"
mkdir -p "corpus/$target" "artifacts/$target"
cp -n "seeds/$target"/* "corpus/$target/" 2>/dev/null || true
log="$(mktemp)"
set +e
# -max_len: past the parsers' limits is what the unit tests cover; the
# fuzzer looks for panics and wrong results in descriptions of real sizes.
cargo fuzz run --debug-assertions "$target" "corpus/$target" -- \
    -max_total_time="$secs" -print_final_stats=1 -max_len=65536 -rss_limit_mb=2048 \
    2>&1 | tee "$log" | grep -E '^#[0-9]+.*(pulse|DONE)' | tail -n 3
status=${PIPESTATUS[0]}
set -e
echo "--- final statistics ---"
grep -E 'stat::(number_of_executed_units|average_exec_per_sec|peak_rss_mb)|DONE' "$log" | tail -n 4
grep -E 'ERROR|panicked|SUMMARY' "$log" | head -n 20 || true
echo "corpus: $(ls "corpus/$target" | wc -l) inputs; crashes: $(ls "artifacts/$target" | wc -l)"
rm -f "$log"
exit "$status"
