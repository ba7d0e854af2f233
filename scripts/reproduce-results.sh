#!/usr/bin/env bash
# Reproduce every number in docs/results.md: train LoFiT, ITI and random-heads adapters, then score them.
#
#   bash scripts/reproduce-results.sh [SECTION ...]
#
# Sections (default: all, in this order): mquake truthfulqa-f1 truthfulqa-f0 arc boolq truthfulqa-k10
# truthfulqa-k10-f1 arc-k10 boolq-k10 cross-task mquake-iti-alpha truthfulqa-seed2 truthfulqa-search
# mquake-search. Every run writes under runs/results/ and is skipped when its output already exists, so an
# interrupted run resumes where it stopped. On a 2-core CPU the whole set takes several hours (the TruthfulQA
# scoring pass alone is about 7 minutes per model); each section prints its wall time.
set -euo pipefail
cd "$(dirname "$0")/.."

M=${MODEL:-models/SmolLM2-135M-Instruct}
BIN=${BIN:-.venv/bin}
R=${RESULTS:-runs/results}
mkdir -p "$R"

# train OUT ARGS...: run lofit-train unless OUT already holds an adapter.
train() {
    local out=$1; shift
    [[ -f $out/adapter_config.json ]] && { echo "skip $out (exists)"; return; }
    "$BIN/lofit-train" --model "$M" --out "$out" --name "$(basename "$out")" "$@"
}

# iti OUT ARGS...: run the ITI baseline unless OUT already holds an adapter.
iti() {
    local out=$1; shift
    [[ -f $out/adapter_config.json ]] && { echo "skip $out (exists)"; return; }
    "$BIN/lofit-baseline" iti --model "$M" --out "$out" --name "$(basename "$out")" "$@"
}

# score OUT.json ARGS...: run lofit-eval unless the report exists.
score() {
    local out=$1; shift
    [[ -f $out ]] && { echo "skip $out (exists)"; return; }
    "$BIN/lofit-eval" --model "$M" --out "$out" "$@"
}

section_mquake() {
    # LoFiT at K = 3 % (8 heads) and 10 % (27 heads, stage 2 on the K = 3 % run's stage-1 ranking),
    # with ITI and random-heads baselines at both sizes. Scored on the 864 test cases by greedy generation.
    train "$R/mquake-lofit-k3" --task mquake --heads-percent 3
    train "$R/mquake-lofit-k10" --task mquake --heads-percent 10 --heads-from "$R/mquake-lofit-k3"
    iti "$R/mquake-iti-k3" --task mquake --heads-percent 3
    iti "$R/mquake-iti-k10" --task mquake --heads-percent 10
    train "$R/mquake-random-k3" --task mquake --heads-percent 3 --random-heads --seed 42
    train "$R/mquake-random-k10" --task mquake --heads-percent 10 --random-heads --seed 42
    score "$R/mquake.json" --task mquake \
        --adapter "$R/mquake-lofit-k3" --adapter "$R/mquake-iti-k3" --adapter "$R/mquake-random-k3" \
        --adapter "$R/mquake-lofit-k10" --adapter "$R/mquake-iti-k10" --adapter "$R/mquake-random-k10"
}

section_truthfulqa-f0() {
    # Fold 0 at K = 3 %: LoFiT with the paper's recipe (stage-2 lr 5e-2; until issue 22 this was the shipped
    # adapters/truthfulqa, docs/results-train.md), ITI and random heads with the same stage-2 learning rate.
    train "$R/truthfulqa-lofit-paper-k3-f0" --task truthfulqa --fold 0 --heads-percent 3 --lr-v 5e-2
    iti "$R/truthfulqa-iti-k3-f0" --task truthfulqa --fold 0 --heads-percent 3 --alpha 15
    train "$R/truthfulqa-random-k3-f0" --task truthfulqa --fold 0 --heads-percent 3 --lr-v 5e-2 \
        --random-heads --seed 42
    score "$R/truthfulqa-k3-f0.json" --task truthfulqa --fold 0 --adapter "$R/truthfulqa-lofit-paper-k3-f0" \
        --adapter "$R/truthfulqa-iti-k3-f0" --adapter "$R/truthfulqa-random-k3-f0"
}

section_truthfulqa-f1() {
    # Fold 1 at K = 3 %: the same three methods trained on fold 1's train split, scored on its test split.
    train "$R/truthfulqa-lofit-k3-f1" --task truthfulqa --fold 1 --heads-percent 3 --lr-v 5e-2
    iti "$R/truthfulqa-iti-k3-f1" --task truthfulqa --fold 1 --heads-percent 3 --alpha 15
    train "$R/truthfulqa-random-k3-f1" --task truthfulqa --fold 1 --heads-percent 3 --lr-v 5e-2 \
        --random-heads --seed 42
    score "$R/truthfulqa-k3-f1.json" --task truthfulqa --fold 1 --adapter "$R/truthfulqa-lofit-k3-f1" \
        --adapter "$R/truthfulqa-iti-k3-f1" --adapter "$R/truthfulqa-random-k3-f1"
}

section_truthfulqa-k10() {
    # Fold 0 at K = 10 % (27 heads): stage 2 on the shipped adapter's stage-1 ranking (its top 160 heads),
    # the paper's default stage-2 learning rate; ITI at the same size.
    train "$R/truthfulqa-lofit-k10-f0" --task truthfulqa --fold 0 --heads-percent 10 \
        --heads-from "$R/truthfulqa-lofit-paper-k3-f0"
    iti "$R/truthfulqa-iti-k10-f0" --task truthfulqa --fold 0 --heads-percent 10 --alpha 15
    score "$R/truthfulqa-k10-f0.json" --task truthfulqa --fold 0 --no-base \
        --adapter "$R/truthfulqa-lofit-k10-f0" --adapter "$R/truthfulqa-iti-k10-f0"
}

section_truthfulqa-k10-f1() {
    # Fold 1 at K = 10 %: stage 2 on the fold-1 K = 3 % run's stage-1 ranking, ITI at the same size.
    train "$R/truthfulqa-lofit-k10-f1" --task truthfulqa --fold 1 --heads-percent 10 \
        --heads-from "$R/truthfulqa-lofit-k3-f1"
    iti "$R/truthfulqa-iti-k10-f1" --task truthfulqa --fold 1 --heads-percent 10 --alpha 15
    score "$R/truthfulqa-k10-f1.json" --task truthfulqa --fold 1 --no-base \
        --adapter "$R/truthfulqa-lofit-k10-f1" --adapter "$R/truthfulqa-iti-k10-f1"
}

section_truthfulqa-seed2() {
    # A second seed on fold 0 at K = 3 %: LoFiT (both stages) and random heads (a different draw of 8 heads),
    # with seed 7 where the tables above use 42; everything else as in truthfulqa-f0.
    train "$R/truthfulqa-lofit-k3-f0-s7" --task truthfulqa --fold 0 --heads-percent 3 --lr-v 5e-2 --seed 7
    train "$R/truthfulqa-random-k3-f0-s7" --task truthfulqa --fold 0 --heads-percent 3 --lr-v 5e-2 \
        --random-heads --seed 7
    score "$R/truthfulqa-k3-f0-s7.json" --task truthfulqa --fold 0 --no-base \
        --adapter "$R/truthfulqa-lofit-k3-f0-s7" --adapter "$R/truthfulqa-random-k3-f0-s7"
}

# instruction_task TASK PERCENT: LoFiT, ITI and random heads at K = PERCENT % on an instruction-format MC task,
# all scored in one lofit-eval run (the base model with K = 3 %). Every method sees the same INSTRUCT_TRAIN
# training rows (a seeded sample; the rest of the file is unused). K = 10 % LoFiT tunes offsets on the K = 3 %
# run's stage-1 ranking, as for MQuAKE. BoolQ is scored on a seeded sample of BOOLQ_EVAL of its 3,270
# validation questions (ARC on all 1,172 test questions).
INSTRUCT_TRAIN=${INSTRUCT_TRAIN:-300}
BOOLQ_EVAL=${BOOLQ_EVAL:-1000}
instruction_task() {
    local task=$1 k=$2 heads_from=() eval_args=()
    [[ $k == 3 ]] || { heads_from=(--heads-from "$R/$task-lofit-k3"); eval_args=(--no-base); }
    [[ $task == boolq ]] && eval_args+=(--limit "$BOOLQ_EVAL")
    train "$R/$task-lofit-k$k" --task "$task" --train-size "$INSTRUCT_TRAIN" --heads-percent "$k" "${heads_from[@]}"
    iti "$R/$task-iti-k$k" --task "$task" --limit "$INSTRUCT_TRAIN" --heads-percent "$k"
    train "$R/$task-random-k$k" --task "$task" --train-size "$INSTRUCT_TRAIN" --heads-percent "$k" \
        --random-heads --seed 42
    score "$R/$task-k$k.json" --task "$task" "${eval_args[@]}" \
        --adapter "$R/$task-lofit-k$k" --adapter "$R/$task-iti-k$k" --adapter "$R/$task-random-k$k"
}

section_arc() { instruction_task arc 3; }
section_boolq() { instruction_task boolq 3; }
section_arc-k10() { instruction_task arc 10; }
section_boolq-k10() { instruction_task boolq 10; }

section_mquake-iti-alpha() {
    # ITI's alpha for MQuAKE (K = 3 %), chosen on the 95 validation cases (the alpha = 15 that suits TruthfulQA
    # breaks this model on MQuAKE); the best alpha is then scored on the test cases.
    local alphas=(1 2 5 10) adapters=()
    for a in "${alphas[@]}"; do
        iti "$R/mquake-iti-k3-a$a" --task mquake --heads-percent 3 --alpha "$a"
        adapters+=(--adapter "$R/mquake-iti-k3-a$a")
    done
    score "$R/mquake-iti-alpha-val.json" --task mquake --split val "${adapters[@]}"
    local best
    best=$("$BIN/python" -c 'import json, sys
rows = [r for r in json.load(open(sys.argv[1]))["results"] if r["adapter"]]
print(max(rows, key=lambda r: r["exact_match"])["adapter"])' "$R/mquake-iti-alpha-val.json")
    echo "best ITI alpha on validation: $best"
    score "$R/mquake-iti-alpha-test.json" --task mquake --no-base --adapter "$best"
}

section_truthfulqa-search() {
    # Issue 22, both folds at K = 3 %: stage 2 searched on the validation split over the paper-recipe run's
    # stage-1 ranking (truthfulqa-f0 / truthfulqa-f1 train those): every incorrect answer paired with the best
    # one (--pairs all), 2 epochs with the best epoch kept, stage-2 lr 1e-2 or 5e-2. Fold 0's winner is the
    # shipped adapters/truthfulqa (its name field set to truthfulqa). The baselines get the same search: random
    # heads (seed 42) with the same stage-2 grid, and ITI with its alpha chosen on the same validation
    # questions. Each fold's three winners are scored on that fold's test split.
    local f
    for f in 0 1; do
        local source="$R/truthfulqa-lofit-paper-k3-f$f"
        [[ $f == 1 ]] && source="$R/truthfulqa-lofit-k3-f1"
        [[ -f $source/adapter_config.json ]] || section_truthfulqa-f$f
        local stage2=(--task truthfulqa --fold "$f" --heads-percent 3 --pairs all --epochs-v 2 --select-epoch best
                      --search lr_v=1e-2,5e-2)
        train "$R/truthfulqa-lofit-search-k3-f$f" "${stage2[@]}" --heads-from "$source"
        train "$R/truthfulqa-random-search-k3-f$f" "${stage2[@]}" --random-heads --seed 42
        iti "$R/truthfulqa-iti-search-k3-f$f" --task truthfulqa --fold "$f" --heads-percent 3 \
            --search-alpha 1,5,10,15,20
        score "$R/truthfulqa-search-k3-f$f.json" --task truthfulqa --fold "$f" --no-base \
            --adapter "$R/truthfulqa-lofit-search-k3-f$f"
        score "$R/truthfulqa-random-search-k3-f$f.json" --task truthfulqa --fold "$f" --no-base \
            --adapter "$R/truthfulqa-random-search-k3-f$f"
        score "$R/truthfulqa-iti-search-k3-f$f.json" --task truthfulqa --fold "$f" --no-base \
            --adapter "$R/truthfulqa-iti-search-k3-f$f"
    done
}

section_mquake-search() {
    # Issue 22 on MQuAKE: stage 2 searched on the 95 validation cases (exact match) over the K = 3 % run's
    # stage-1 ranking (section mquake trains it): K 3 % or 10 %, stage-2 lr 1e-2 or 5e-2, 5 epochs with the
    # best kept. The grid holds the paper recipe's settings (10 %, 1e-2), and keeping the best epoch scores at
    # least its last epoch, so the winner is at least the recipe on validation. The winner is the shipped
    # adapters/mquake (its name field set to mquake), scored on the 864 test cases.
    [[ -f $R/mquake-lofit-k3/adapter_config.json ]] || section_mquake
    train "$R/mquake-lofit-search" --task mquake --heads-from "$R/mquake-lofit-k3" --select-epoch best \
        --search heads_percent=3,10 lr_v=1e-2,5e-2
    score "$R/mquake-search.json" --task mquake --no-base --adapter "$R/mquake-lofit-search"
}

section_cross-task() {
    # The paper's cross-task localisation: offsets tuned on MQuAKE with TruthfulQA's heads, and on
    # TruthfulQA (fold 0) with MQuAKE's heads, each compared to its own task's heads.
    train "$R/mquake-lofit-k3-heads-truthfulqa" --task mquake --heads-percent 3 \
        --heads-from "$R/truthfulqa-lofit-paper-k3-f0"
    train "$R/truthfulqa-lofit-k3-f0-heads-mquake" --task truthfulqa --fold 0 --heads-percent 3 --lr-v 5e-2 \
        --heads-from "$R/mquake-lofit-k3"
    score "$R/cross-task-mquake.json" --task mquake --no-base --adapter "$R/mquake-lofit-k3-heads-truthfulqa"
    score "$R/cross-task-truthfulqa.json" --task truthfulqa --fold 0 --no-base \
        --adapter "$R/truthfulqa-lofit-k3-f0-heads-mquake"
}

sections=("$@")
[[ ${#sections[@]} -eq 0 ]] && sections=(mquake truthfulqa-f1 truthfulqa-f0 arc boolq truthfulqa-k10 truthfulqa-k10-f1
    arc-k10 boolq-k10 cross-task mquake-iti-alpha truthfulqa-seed2 truthfulqa-search mquake-search)
for section in "${sections[@]}"; do
    declare -F "section_$section" >/dev/null || { echo "unknown section: $section" >&2; exit 2; }
done
for section in "${sections[@]}"; do
    start=$SECONDS
    echo "=== $section ($(date -u +%H:%M:%S))"
    "section_$section"
    echo "=== $section done in $((SECONDS - start)) s"
done
