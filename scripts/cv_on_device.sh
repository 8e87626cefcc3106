#!/usr/bin/env bash
# Cross-validation models trained on a lent GPU machine (the device tool's `run`), brought back here.
#
# The GPU machine has PyTorch and SciPy, but neither MONAI nor the data; a call carries at most
# 64 MiB (this repository is about 24 MB of it) and brings back at most 8 files of 16 MiB each.
# So a call carries the prepared cases and MONAI's wheel, not the CPU checkpoints (23 MB each),
# and brings back each model's weights as one file (about 4 MB) and every card in cards.json:
# up to seven models per call (the five folds and two members).
#
#   # here, once: MONAI's wheel (pure Python) into .whl/, which git ignores
#   bash scripts/cv_on_device.sh wheel
#   # on the device, every fold and member at once, at most 480 s each:
#   #   run(command="bash scripts/cv_on_device.sh train cv/mr 480 all",
#   #       carry=[".whl", "cv/mr/cases.npz", "cv/mr/plan.json"], timeout_s=560)
#   # here: the models that came back, into cv/mr (stop a CPU run of the same models first)
#   bash scripts/cv_on_device.sh unpack cv/mr FILES_AT
set -euo pipefail
EPOCHS=${EPOCHS:-250}
MEMBERS=${MEMBERS:-2}
DEVICE=${DEVICE:-cuda}  # DEVICE=cpu: a dry run here
PRECISION=${PRECISION:-fp32}  # bf16: autocast; a model resumes only in the precision it started in

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
        --epochs "$EPOCHS" --time-budget "$budget" --device "$DEVICE" --precision "$PRECISION" --jobs 7 || true
    for log in "$work"/*.log; do echo "$log: $(tail -n 1 "$log")"; done
    bash "$0" collect "$work" "$OUT"
    ls -la "$OUT"
    ;;
collect)
    # at most 8 files come back: the weights one file per model, the cards together
    python3 - "$2" "$3" <<'PY'
import json, pathlib, shutil, sys
work, out = map(pathlib.Path, sys.argv[1:])
cards = {}
for card in sorted(work.glob("*/model_card.json")):
    cards[card.parent.name] = json.loads(card.read_text())
    shutil.copy(card.parent / "model.pt", out / f"{card.parent.name}.pt")
(out / "cards.json").write_text(json.dumps(cards))
PY
    ;;
unpack)
    work=$2 back=$3
    python3 - "$work" "$back" "$EPOCHS" <<'PY'
import json, pathlib, shutil, sys
work, back, epochs = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), int(sys.argv[3])
for name, card in json.loads((back / "cards.json").read_text()).items():
    run = card["training"]["epochs_run"]
    if run < epochs:
        print(f"{name}: {run} of {epochs} epochs (cut short by the time budget): not taken")
        continue
    (work / name).mkdir(parents=True, exist_ok=True)
    shutil.copy(back / f"{name}.pt", work / name / "model.pt")
    (work / name / "model_card.json").write_text(json.dumps(card, indent=1) + "\n")
    (work / name / "checkpoint.pt").unlink(missing_ok=True)  # the CPU run's, now superseded
    print(f"{name}: {run} epochs, taken")
PY
    ;;
*)
    sed -n '2,15p' "$0"
    exit 2
    ;;
esac
