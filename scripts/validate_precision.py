"""Check the shipped models in bf16 against fp32 on every available patient, and record the result
in each model card (``precision.bf16``), which ``--precision auto`` reads.

    python scripts/validate_precision.py [--data ../shared/data] [--models Resources/Models] [--dry-run]

Each model segments each patient of its domain twice, in fp32 and under bf16 autocast, through
the whole pipeline. bf16 counts as validated for a model when, on every patient and class, its
Dice against the reference differs from fp32's by at most 0.001. The card also gets the smallest
agreement between the two labelmaps (Dice of bf16 labels against fp32 labels) and the CPU that
ran the check. On a CPU without native bf16 the check is slow (bf16 is emulated) but its result is
the same: the labels do not depend on how bf16 is computed, only on the rounding it does.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
TOLERANCE = 0.001


def cases_of(model_card: dict, data: Path, work: Path) -> list[tuple[str, Path, dict[str, list[int]]]]:
    """(case name, image path, label path, class name -> reference label values) of the model's domain."""
    from LiverSegmentationLogic.io.datasets import convert_chaos_ct

    if model_card.get("modality") == "MR":
        reference = {"liver": [1], "right kidney": [2], "left kidney": [3], "spleen": [4]}
        return [(f"chaos-mr-t2/{p.name[6:-7]}", p, p.with_name(p.name.replace("image", "label")), reference)
                for p in sorted((data / "chaos-mr-t2").glob("image_*.nii.gz"))]
    lits = {"liver": [1, 2], "lesion": [2]}  # a LiTS liver includes its lesions
    cases = [(f"lits-ct/{p.name[6:-7]}", p, p.with_name(p.name.replace("image", "label")), lits)
             for p in sorted((data / "lits-ct").glob("image_*.nii.gz"))]
    if (data / "chaos-ct-1").exists():
        chaos = convert_chaos_ct(data / "chaos-ct-1", work / "chaos-ct")
        cases.append(("chaos-ct/1", chaos.images[0], chaos.label, {"liver": [1], "lesion": []}))
    return cases


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--models", type=Path, default=REPO / "Resources" / "Models")
    parser.add_argument("--only", nargs="*", help="model names (default: every model folder)")
    parser.add_argument("--dry-run", action="store_true", help="print, do not write the cards")
    args = parser.parse_args()

    from LiverSegmentationLogic.inference.segmenter import Segmenter, native_bf16
    from LiverSegmentationLogic.io.volumes import read_volume
    from LiverSegmentationLogic.models.catalog import CARD_NAME
    from LiverSegmentationLogic.models.model_files import load_model
    from LiverSegmentationLogic.readouts.metrics import dice

    work = Path(tempfile.mkdtemp(prefix="liverseg-precision-"))
    folders = sorted(p.parent for p in args.models.glob(f"*/{CARD_NAME}"))
    folders = [f for f in folders if not args.only or f.name in args.only]
    print(f"CPU {platform.processor() or platform.machine()}, native bf16: {native_bf16()}")
    records = {}  # weights sha256 -> record
    for folder in folders:
        model = load_model(folder)
        # the labels of one pass are what bf16 could change: the contrast check adds nothing to it
        fp32 = Segmenter(model, device="cpu", precision="fp32", contrast_check=False)
        bf16 = Segmenter(model, device="cpu", precision="bf16", contrast_check=False)
        worst_difference, worst_agreement, checked = 0.0, 1.0, []
        for name, image_path, label_path, reference in cases_of(model.card, args.data, work):
            image = read_volume(image_path)
            truth = np.rint(read_volume(label_path, validate=False).array).astype(np.int64)
            a, b = fp32.segment(image).labels, bf16.segment(image).labels
            for c in model.classes:
                if c["name"] not in reference:
                    continue
                ref = np.isin(truth, reference[c["name"]])
                difference = abs(dice(b == c["label"], ref) - dice(a == c["label"], ref))
                agreement = dice(b == c["label"], a == c["label"])
                worst_difference = max(worst_difference, difference)
                worst_agreement = min(worst_agreement, agreement)
                print(f"{model.name_version} {name} {c['name']}: Dice difference {difference:.5f}, "
                      f"bf16 vs fp32 labels {agreement:.5f}", flush=True)
            checked.append(name)
        record = {
            "validated": bool(checked) and worst_difference <= TOLERANCE,
            "rule": f"on every case and class, |Dice(bf16) - Dice(fp32)| against the reference <= {TOLERANCE}",
            "largest_dice_difference": round(worst_difference, 5),
            "smallest_label_agreement": round(worst_agreement, 5),
            "cases": checked,
            "checked_on": f"{platform.processor() or platform.machine()} (native bf16: {native_bf16()})",
            "date": datetime.date.today().isoformat(),
            "command": "python scripts/validate_precision.py",
        }
        print(f"{model.name_version}: {json.dumps(record)}", flush=True)
        earlier = records.get(model.card["sha256"])  # the same weights under another view: keep the worse
        if earlier:
            record.update(validated=record["validated"] and earlier["validated"],
                          largest_dice_difference=max(record["largest_dice_difference"],
                                                      earlier["largest_dice_difference"]),
                          smallest_label_agreement=min(record["smallest_label_agreement"],
                                                       earlier["smallest_label_agreement"]))
        records[model.card["sha256"]] = record
    if args.dry_run:
        return
    # every card with checked weights, a cascade's copy of its first stage (roi/) included
    for card_path in sorted(args.models.glob(f"*/{CARD_NAME}")) + sorted(args.models.glob(f"*/*/{CARD_NAME}")):
        card = json.loads(card_path.read_text())
        if card.get("sha256") in records:
            card["precision"] = dict(card.get("precision", {}), bf16=records[card["sha256"]])
            card_path.write_text(json.dumps(card, indent=2) + "\n")
            print(f"recorded in {card_path}")


if __name__ == "__main__":
    main()
