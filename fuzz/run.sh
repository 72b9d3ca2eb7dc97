#!/usr/bin/env bash
# Runs every fuzz target for a bounded time and fails on any crash, hang or panic.
#
#   FUZZ_SECONDS   time per target (default 60)
#   FUZZ_TIMEOUT   seconds one input may take before it counts as a hang (default 10)
#   FUZZ_RSS_MB    memory limit (default 2048)
#   FUZZ_TARGETS   which targets (default: all of them)
#
# The corpus (fuzz/corpus/<target>, not committed) is seeded from the examples by seed.sh;
# the inputs that once crashed a target (fuzz/regressions/<target>) are replayed first.
# Crashing inputs found now are written to fuzz/artifacts/<target>/.
set -uo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root/fuzz" || exit 1

seconds=${FUZZ_SECONDS:-60}
timeout=${FUZZ_TIMEOUT:-10}
rss=${FUZZ_RSS_MB:-2048}
targets=${FUZZ_TARGETS:-"event_validation segment_parse flow_parse template_compile link_verify"}
toolchain=${FUZZ_TOOLCHAIN:-nightly}

if ! rustup run "$toolchain" rustc --version >/dev/null 2>&1; then
    rustup toolchain install "$toolchain" --profile minimal || exit 1
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked || exit 1
fi

bash seed.sh >/dev/null || exit 1
echo "== building the fuzz targets (cargo +$toolchain fuzz build)"
cargo "+$toolchain" fuzz build || exit 1

declare -A dict=([segment_parse]=segment.dict [flow_parse]=flow.dict [template_compile]=template.dict)
logs="$root/fuzz/artifacts/logs"
mkdir -p "$logs"
failed=0
summary=()
for target in $targets; do
    corpora=("corpus/$target")
    [[ -d "regressions/$target" ]] && corpora+=("regressions/$target")
    options=(-max_total_time="$seconds" -timeout="$timeout" -rss_limit_mb="$rss" -print_final_stats=1)
    [[ -n "${dict[$target]:-}" ]] && options+=(-dict="dicts/${dict[$target]}")
    mkdir -p "artifacts/$target"
    before=$(find "artifacts/$target" -type f | wc -l)
    echo "== $target: ${seconds}s"
    cargo "+$toolchain" fuzz run "$target" "${corpora[@]}" -- "${options[@]}" >"$logs/$target.log" 2>&1
    status=$?
    found=$(( $(find "artifacts/$target" -type f | wc -l) - before ))
    runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$logs/$target.log" | tail -1 | grep -o '[0-9]*$')
    cov=$(grep -o ' cov: [0-9]*' "$logs/$target.log" | tail -1 | grep -o '[0-9]*$')
    ft=$(grep -o ' ft: [0-9]*' "$logs/$target.log" | tail -1 | grep -o '[0-9]*$')
    units=$(find "corpus/$target" -type f | wc -l)
    if [[ $status -ne 0 || $found -gt 0 ]]; then
        failed=1
        verdict="FAILED (exit $status, $found new artifact(s) in fuzz/artifacts/$target)"
        grep -E '^(==[0-9]+==ERROR|thread .* panicked|SUMMARY|ALARM|Test unit written)' "$logs/$target.log" | head -10
    else
        verdict="ok"
    fi
    summary+=("$(printf '%-18s %8s runs  cov %6s  ft %6s  corpus %5s  crashes %s  %s' \
        "$target" "${runs:-?}" "${cov:-?}" "${ft:-?}" "$units" "$found" "$verdict")")
done

echo
echo "== fuzz summary (${seconds}s per target, -timeout=$timeout, -rss_limit_mb=$rss; logs in fuzz/artifacts/logs)"
printf '%s\n' "${summary[@]}"
exit $failed
