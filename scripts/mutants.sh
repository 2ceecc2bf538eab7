#!/usr/bin/env bash
# The mutation proof: builds oncepay once per deliberate bug (a cargo feature `mutant-*`), runs
# each test layer against it, and prints which layers killed it. Fails if a bug survives the
# layer that exists to catch it.
#
#   bash scripts/mutants.sh             # every mutant
#   bash scripts/mutants.sh no-fencing  # just one
set -uo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target/mutants}"
export CARGO_TERM_COLOR=never
export INSTA_UPDATE=no

# mutant | layers meant to kill it | does the core crate have the feature?
MUTANTS=(
  "check-then-act|loom api|core"
  "lease-boundary|decision-table model|core"
  "no-fencing|loom model|core"
  "fingerprint-ignores-body|api|core"
  "refund-check-outside-transaction|loom api|core"
  "store-transient-5xx|api|root"
  "tenant-not-in-scope|api|root"
)
LAYERS=(decision-table model loom api)

run_layer() {
  local layer=$1 feature=$2 scope=$3
  local build=()
  [ -n "${NO_RUN:-}" ] && build=(--no-run)
  case "$layer" in
    decision-table)
      [ "$scope" = core ] || return 2
      cargo test -q -p oncepay-core --features "$feature" --test decision_table "${build[@]}" ;;
    model)
      cargo test -q --features "$feature" --test stores "${build[@]}" ;;
    loom)
      [ "$scope" = core ] || return 2
      RUSTFLAGS="--cfg loom" LOOM_MAX_PREEMPTIONS=3 CARGO_TARGET_DIR="$CARGO_TARGET_DIR/loom" \
        cargo test -q -p oncepay-core --release --features "$feature" --test loom "${build[@]}" ;;
    api)
      cargo test -q --features "$feature" --test api "${build[@]}" ;;
  esac
}

only="${1:-}"
failed=0
rows=()
for entry in "${MUTANTS[@]}"; do
  IFS='|' read -r name meant scope <<<"$entry"
  [ -n "$only" ] && [ "$only" != "$name" ] && continue
  feature="mutant-$name"
  row="| $name |"
  for layer in "${LAYERS[@]}"; do
    echo "== $name: $layer" >&2
    # Build first: a mutant that does not compile proves nothing and must not count as killed.
    NO_RUN=1 run_layer "$layer" "$feature" "$scope" >/dev/null 2>&1
    code=$?
    if [ "$code" -eq 2 ]; then
      row="$row n/a |"
      continue
    elif [ "$code" -ne 0 ]; then
      echo "$name does not build for the $layer layer" >&2
      exit 2
    fi
    run_layer "$layer" "$feature" "$scope" >/dev/null 2>&1
    case $? in
      0) verdict="survived" ;;
      *) verdict="**killed**" ;;
    esac
    if [[ " $meant " == *" $layer "* ]]; then
      verdict="$verdict (meant to)"
      [[ "$verdict" == \*\*killed* ]] || failed=1
    fi
    row="$row $verdict |"
  done
  rows+=("$row")
done

echo
echo "| mutant | decision table | model | loom | api |"
echo "|---|---|---|---|---|"
printf '%s\n' "${rows[@]}"
if [ "$failed" -ne 0 ]; then
  echo "a mutant survived a layer meant to kill it" >&2
  exit 1
fi
