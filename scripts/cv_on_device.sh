#!/usr/bin/env bash
# Cross-validation models trained on a lent GPU machine (the device tool's `run`), brought back here.
#
# The GPU machine has PyTorch and SciPy, but neither MONAI nor the data; a call carries at most
# 64 MiB (this repository is about 24 MB of it) and brings back at most 8 files of 16 MiB each.
# So a call carries the prepared cases and MONAI's wheel, not the CPU checkpoints (23 MB each),
# and brings back each finished model as two files (weights, card): four models per call.
#
#   # here, once: MONAI's wheel (pure Python) into .whl/, which git ignores
#   bash scripts/cv_on_device.sh wheel
#   # on the device, e.g. the first four folds at once, at most 480 s each:
#   #   run(command="bash scripts/cv_on_device.sh train cv/mr 480 0 1 2 3",
#   #       carry=[".whl", "cv/mr/cases.npz", "cv/mr/plan.json"], timeout_s=560)
#   # then "... train cv/mr 480 4 members" (fold 4 and the two members)
#   # here: the models that came back, into cv/mr (stop a CPU run of the same models first)
#   bash scripts/cv_on_device.sh unpack cv/mr FILES_AT
set -euo pipefail
EPOCHS=${EPOCHS:-250}
MEMBERS=${MEMBERS:-2}
DEVICE=${DEVICE:-cuda}  # DEVICE=cpu: a dry run here

case "${1:-}" in
wheel)
    exclude="$(git rev-parse --git-dir)/info/exclude"
    grep -qx /.whl/ "$exclude" 2>/dev/null || echo /.whl/ >> "$exclude"
    version=$(python -c "import monai; print(monai.__version__)")
    python -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl "monai==$version"
    ;;
train)
    work=$2 budget=$3
    shift 3
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
    # one process per model: a small 2D U-Net leaves the GPU idle between Python's steps
    python3 scripts/cross_validate.py train --work "$work" --folds-to-train "$@" --members "$MEMBERS" \
        --epochs "$EPOCHS" --time-budget "$budget" --device "$DEVICE" --jobs 7 || true
    for log in "$work"/*.log; do echo "$log: $(tail -n 1 "$log")"; done
    for card in "$work"/*/model_card.json; do
        name=$(basename "$(dirname "$card")")
        cp "$card" "$OUT/$name.json"
        cp "$(dirname "$card")/model.pt" "$OUT/$name.pt"
    done
    ls -la "$OUT"
    ;;
unpack)
    work=$2 back=$3
    for card in "$back"/*.json; do
        name=$(basename "$card" .json)
        epochs=$(python -c "import json, sys; print(json.load(open(sys.argv[1]))['training']['epochs_run'])" "$card")
        if [ "$epochs" -lt "$EPOCHS" ]; then
            echo "$name: $epochs of $EPOCHS epochs (cut short by the time budget): not taken"
            continue
        fi
        mkdir -p "$work/$name"
        cp "$back/$name.pt" "$work/$name/model.pt"
        cp "$card" "$work/$name/model_card.json"
        rm -f "$work/$name/checkpoint.pt"  # the CPU run's, now superseded
        echo "$name: $epochs epochs, taken"
    done
    ;;
*)
    sed -n '2,16p' "$0"
    exit 2
    ;;
esac
