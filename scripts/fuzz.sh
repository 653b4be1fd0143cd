#!/usr/bin/env bash
# Run tunsec's cargo fuzz targets (fuzz/), one after the other, each for
# TUNSEC_FUZZ_SECONDS seconds (default 15; scripts/test.sh runs this), and
# print each target's executions and coverage. Any crash, leak, timeout
# (10 s per input) or out-of-memory (2 GiB) fails the run; libFuzzer leaves
# the input in fuzz/artifacts/TARGET/.
#
#   scripts/fuzz.sh [TARGET...]
#   TUNSEC_FUZZ_SECONDS=600 scripts/fuzz.sh        # the long run
#   TUNSEC_FUZZ_SECONDS=0 scripts/fuzz.sh          # build only
#
# cargo-fuzz is installed with `cargo install cargo-fuzz` when missing
# (about 1.5 minutes). The toolchain is stable: RUSTC_BOOTSTRAP=1 lets
# cargo fuzz use the nightly flags it needs (-Zsanitizer=address). The
# first build takes about 9 minutes on 2 cores, later ones seconds.
# Corpora grow in fuzz/corpus/TARGET (kept between runs, not committed);
# seeds are made afresh in fuzz/seeds/TARGET by scripts/fuzz-seeds.py.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

seconds=${TUNSEC_FUZZ_SECONDS:-15}
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    targets=(inbound outbound reassembly setkey control xfrm pcap gro)
fi

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "scripts/fuzz.sh: installing cargo-fuzz (cargo install cargo-fuzz)" >&2
    cargo install --locked cargo-fuzz
fi

export RUSTC_BOOTSTRAP=1
# The fuzz crate is its own workspace with its own target directory.
unset CARGO_TARGET_DIR
cargo fuzz build
python3 scripts/fuzz-seeds.py
[ "$seconds" -gt 0 ] || exit 0

logs=fuzz/artifacts/logs
mkdir -p "$logs"
summary=()
for t in "${targets[@]}"; do
    mkdir -p "fuzz/corpus/$t"
    log="$logs/$t.log"
    echo "scripts/fuzz.sh: $t for ${seconds}s" >&2
    if ! cargo fuzz run "$t" "fuzz/corpus/$t" "fuzz/seeds/$t" -- \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
        >"$log" 2>&1; then
        tail -n 40 "$log" >&2
        echo "scripts/fuzz.sh: $t FAILED (input in fuzz/artifacts/$t/, log $log)" >&2
        exit 1
    fi
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
    done_line=$(grep -E '^#[0-9]+[[:space:]]+DONE' "$log" | tail -n 1)
    cov=$(sed -E -n 's/.* cov: ([0-9]+) ft: ([0-9]+) corp: ([0-9]+).*/cov \1 ft \2 corpus \3/p' <<<"$done_line")
    summary+=("$(printf '%-11s %4ss  %10s execs  %s' "$t" "$seconds" "$execs" "$cov")")
done
printf '%s\n' "${summary[@]}"
