#!/usr/bin/env bash
# The GPU measurements of issue #20 in one command (at most 9 minutes), writing benchmarks/RESULTS-gpu.md:
#   bash benchmarks/gpu/run.sh                 # on the GPU machine (the `run` tool), from the repository root
#   bash benchmarks/gpu/run.sh --dry-run --out /tmp/RESULTS-gpu.md   # CPU, tiny sizes, to check the script works
# Each part runs under its own `timeout`; a part that fails or runs out of time leaves a line saying so and the
# others still run. Nothing is downloaded: the GPU machine has no network, it uses the repository copy and the
# environment that comes with it (PYTHON, default .venv-test/bin/python, else python).
set -u
cd "$(dirname "$0")/../.."
DRY=""
OUT="benchmarks/RESULTS-gpu.md"
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY="--dry-run" ;;
        --out) OUT="$2"; shift ;;
        *) echo "run.sh: unknown argument '$1' (use --dry-run, --out PATH)" >&2; exit 2 ;;
    esac
    shift
done
PYTHON="${PYTHON:-}"
if [ -z "$PYTHON" ]; then
    if [ -x .venv-test/bin/python ]; then PYTHON=.venv-test/bin/python; else PYTHON=python; fi
fi
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

# part NAME SECONDS FRAGMENT COMMAND...: runs COMMAND under `timeout`, keeps its fragment or a line saying why not.
part() {
    local name="$1" limit="$2" fragment="$3"
    shift 3
    # The dry run is a correctness check on a possibly busy CPU: the limits are the GPU run's budget.
    [ -n "$DRY" ] && limit=600
    echo "== $name (limit ${limit} s)" >&2
    local start=$SECONDS
    timeout --signal=TERM --kill-after=10 "$limit" "$@" >"$WORK/$name.log" 2>&1
    local rc=$?
    if [ $rc -eq 0 ] && [ -s "$fragment" ]; then
        cat "$fragment" >>"$WORK/body.md"
    elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
        printf '## %s\n\nNot measured: ran past its limit of %s s.\n' "$name" "$limit" >>"$WORK/body.md"
    else
        printf '## %s\n\nFailed (exit %s); the last lines of its output:\n\n```\n%s\n```\n' \
            "$name" "$rc" "$(tail -n 15 "$WORK/$name.log")" >>"$WORK/body.md"
    fi
    printf '\n' >>"$WORK/body.md"
    echo "   exit $rc after $((SECONDS - start)) s" >&2
}

: >"$WORK/body.md"
part "bf16 numerics" 100 "$WORK/numerics.md" \
    "$PYTHON" benchmarks/gpu/gpu_bench.py numerics $DRY --fragment "$WORK/numerics.md"
part "9B shapes: MPT" 130 "$WORK/nine_b.md" \
    "$PYTHON" benchmarks/gpu/gpu_bench.py nine-b $DRY --fragment "$WORK/nine_b.md"
# MPT cannot be compiled whole (transformers' MptAttention): compiled against eager on a LLaMA twin of its size.
part "9B shapes: compiled decoding, LLaMA twin" 150 "$WORK/nine_b_compiled.md" \
    "$PYTHON" benchmarks/gpu/gpu_bench.py nine-b-compiled $DRY --fragment "$WORK/nine_b_compiled.md"
# The evaluation and training benchmarks, both implementations on the GPU (same weights), each writing its own
# section into its fragment file; the dry run checks these command lines on the CPU at the tests' tiny settings.
if [ -z "$DRY" ]; then
    EVAL_ARGS=(--device cuda --shots 4 --num-samples 8)
    TRAIN_ARGS=(--device cuda --steps 2)
else
    EVAL_ARGS=(--device cpu --shots 1 --num-samples 2 --query-set-size 4 --batch-size 2)
    TRAIN_ARGS=(--device cpu --size tiny --batch-laion 1 --batch-mmc4 1 --steps 1)
fi
part "Evaluation benchmark" 90 "$WORK/eval.md" \
    "$PYTHON" benchmarks/bench_eval.py "${EVAL_ARGS[@]}" --tasks captioning --repeats 1 --out "$WORK/eval.md"
part "Training benchmark" 60 "$WORK/train.md" \
    "$PYTHON" benchmarks/bench_train.py "${TRAIN_ARGS[@]}" --repeats 1 --out "$WORK/train.md"

{
    printf '# GPU benchmarks\n\nWritten by `bash benchmarks/gpu/run.sh%s` on %s, %s.\n\n' \
        "${DRY:+ --dry-run}" "$(date -u '+%Y-%m-%d %H:%M UTC')" \
        "$("$PYTHON" -c 'import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU")' 2>/dev/null)"
    cat "$WORK/body.md"
} >"$OUT.tmp" && mv "$OUT.tmp" "$OUT"
echo "wrote $OUT" >&2
