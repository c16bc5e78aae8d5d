#!/usr/bin/env bash
# The cargo-fuzz targets of fuzz/ (one per parser or state machine fed from outside; see
# README.md, "Fuzzing"). Needs the nightly toolchain and cargo-fuzz (scripts/setup.sh installs it).
#
#   scripts/fuzz.sh --smoke [SECONDS]        every target for SECONDS (default 4) each, two at a
#                                            time, from the checked-in seeds; fails on any crash.
#                                            A debug build without sanitizer (fast to build; debug
#                                            assertions and overflow checks on). CI runs this.
#   scripts/fuzz.sh --long SECONDS [TARGET…] each target (default all) for SECONDS, one after the
#                                            other, with AddressSanitizer in a release build,
#                                            growing fuzz/corpus/TARGET; prints executions and
#                                            crashes per target as a markdown table.
#   scripts/fuzz.sh --list                   the targets.
#
# Crashes are written to fuzz/artifacts/TARGET/ (reproduce: cargo +nightly fuzz run TARGET FILE,
# from fuzz/).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

# The fuzz targets link colo-vmm as a library; its reference guest is not needed.
export COLO_VMM_SKIP_GUEST=1

targets() {
    sed -n 's/^name = "\(.*\)"$/\1/p' fuzz/Cargo.toml | grep -v '^colo-fuzz$'
}

# The tools, or why not. The smoke skips visibly without them unless COLO_REQUIRE_ALL=1 (as
# the tests do); long runs always need them.
missing_tools() {
    if ! cargo +nightly --version >/dev/null 2>&1; then
        echo "the nightly toolchain is missing (rustup toolchain install nightly)"
    elif ! command -v cargo-fuzz >/dev/null; then
        echo "cargo-fuzz is missing (cargo install --locked cargo-fuzz; scripts/setup.sh does it)"
    fi
}

need_tools() {
    local why
    why=$(missing_tools)
    if [ -n "$why" ]; then
        echo "fuzz: $why" >&2
        exit 1
    fi
}

# libFuzzer options for one target: its dictionary, if it has one.
dict_for() {
    if [ -f "fuzz/dicts/$1.dict" ]; then
        echo "-dict=$root/fuzz/dicts/$1.dict"
    fi
}

smoke() {
    local seconds=${1:-4}
    local why
    why=$(missing_tools)
    if [ -n "$why" ]; then
        if [ "${COLO_REQUIRE_ALL:-}" = 1 ]; then
            echo "fuzz: $why (COLO_REQUIRE_ALL=1)" >&2
            exit 1
        fi
        echo "SKIPPED fuzz smoke: $why" >&2
        return 0
    fi
    (cd fuzz && cargo fmt -- --check)
    local target_dir=$root/target/fuzz-smoke
    work=$(mktemp -d /tmp/colo-fuzz-smoke.XXXXXX)
    trap 'rm -rf "$work"' EXIT
    echo "fuzz: building the targets (debug, no sanitizer)" >&2
    (cd fuzz && CARGO_PROFILE_DEV_DEBUG=0 cargo +nightly fuzz build --dev -s none --target-dir "$target_dir")
    local bin=$target_dir/x86_64-unknown-linux-gnu/debug
    # Each target runs on a copy of its seeds, so the checked-in corpus never changes.
    run_one() {
        local t=$1 seconds=$2 bin=$3 work=$4
        mkdir -p "$work/$t/corpus" "$work/$t/artifacts"
        if [ -d "fuzz/seeds/$t" ]; then
            cp -r "fuzz/seeds/$t/." "$work/$t/corpus/"
        fi
        # shellcheck disable=SC2046
        if "$bin/$t" "$work/$t/corpus" -max_total_time="$seconds" -timeout=20 -rss_limit_mb=2048 \
            -print_final_stats=1 -artifact_prefix="$work/$t/artifacts/" $(dict_for "$t") \
            >"$work/$t/log" 2>&1; then
            local runs
            runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$work/$t/log")
            echo "fuzz: $t: ${runs:-?} executions, no crash"
        else
            echo "fuzz: $t: CRASH" >&2
            # awk reads to the end: no early-closing reader after a producer under pipefail.
            { grep -E "panicked|ERROR|SUMMARY" -A4 "$work/$t/log" || tail -40 "$work/$t/log"; } | awk 'NR <= 40' >&2
            mkdir -p "fuzz/artifacts/$t"
            cp "$work/$t/artifacts/"* "fuzz/artifacts/$t/" 2>/dev/null || true
            echo "fuzz: $t: the input is in fuzz/artifacts/$t/ (cd fuzz; cargo +nightly fuzz run $t FILE)" >&2
            return 1
        fi
    }
    export -f run_one dict_for
    export root
    local failed=0
    targets | xargs -P 2 -I{} bash -c 'run_one "$@"' _ {} "$seconds" "$bin" "$work" || failed=1
    if [ "$failed" != 0 ]; then
        echo "fuzz: smoke failed" >&2
        exit 1
    fi
    echo "fuzz: smoke passed ($(targets | wc -l) targets, ${seconds}s each)"
}

long() {
    local seconds=$1
    shift
    need_tools
    local list
    if [ $# -gt 0 ]; then list=("$@"); else mapfile -t list < <(targets); fi
    echo "fuzz: building the targets (release, AddressSanitizer)" >&2
    (cd fuzz && cargo +nightly fuzz build >&2)
    echo "| target | seconds | executions | exec/s | corpus | crashes |"
    echo "|---|---|---|---|---|---|"
    local failed=0
    for t in "${list[@]}"; do
        mkdir -p "fuzz/corpus/$t" "fuzz/artifacts/$t"
        local log
        log=$(mktemp /tmp/colo-fuzz-long.XXXXXX)
        local crashes=0
        # shellcheck disable=SC2046
        (cd fuzz && cargo +nightly fuzz run "$t" "corpus/$t" $([ -d "seeds/$t" ] && echo "seeds/$t") -- \
            -max_total_time="$seconds" -timeout=20 -rss_limit_mb=2048 -print_final_stats=1 \
            $(dict_for "$t")) >"$log" 2>&1 || crashes=1
        local runs rate corpus
        runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
        rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log")
        corpus=$(find "fuzz/corpus/$t" -type f | wc -l)
        echo "| $t | $seconds | ${runs:-?} | ${rate:-?} | $corpus | $crashes |"
        if [ "$crashes" != 0 ]; then
            failed=1
            { grep -E "panicked|ERROR|SUMMARY|Test unit written" -A3 "$log" || tail -30 "$log"; } | awk 'NR <= 30' >&2
        fi
        rm -f "$log"
    done
    return "$failed"
}

case "${1:-}" in
--smoke) smoke "${2:-4}" ;;
--long)
    [ $# -ge 2 ] || { echo "usage: scripts/fuzz.sh --long SECONDS [TARGET...]" >&2; exit 2; }
    shift
    long "$@"
    ;;
--list) targets ;;
*)
    sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
    ;;
esac
