"""A light 3D stage as a lever (issue 17: "more through-plane context ... or a light 3D stage"),
measured on the MR cross-validation folds without changing the product.

For each fold, a small 3D U-Net (MONAI's ``UNet``; 16-128 features, instance norm) is trained on
the fold's training patients, whole volumes at half the 2D network's in-plane resolution (4 mm,
80 x 80 x slices), so that it sees the whole abdomen at once where the 2.5D network sees five
slices. Each held-out patient is then segmented on the prepared 2 mm grid three ways: the 2D fold
model alone, the 3D network alone (probabilities taken back to 2 mm), and their mean probability
(as nnU-Net ensembles its 2D and 3D configurations), with the task's postprocessing, and scored
per structure. The 2D model's figures here are on the prepared grid, so they differ slightly from
``cross_validate.py evaluate``'s on the patient's own grid; the comparison is paired.

    python benchmarks/bench_3d_stage.py --work cv/mr --folds 0 1 --out cv/mr-3d --epochs 300
    # the same at the 2D network's 2 mm in-plane (one more level; about 5x the training time):
    python benchmarks/bench_3d_stage.py --work cv/mr --folds 0 1 --out cv/mr-3d-full --epochs 250 --full-resolution

Training checkpoints every epoch into ``--out``/fold<k>/ and resumes; one process per fold
(``--jobs``). The results land in ``--out``/results.json and print as a table.
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from LiverSegmentationLogic.inference.postprocessing import postprocess_labels
from LiverSegmentationLogic.inference.preprocessing import neighbour_stack
from LiverSegmentationLogic.inference.segmenter import Segmenter
from LiverSegmentationLogic.models.model_files import load_model
from LiverSegmentationLogic.models.tasks import load_task
from LiverSegmentationLogic.readouts.metrics import dice
from LiverSegmentationLogic.training.trainer import read_prepared_cases


def new_network(n_classes: int, seed: int, factor: int) -> torch.nn.Module:
    """The 3D U-Net for in-plane voxels ``factor`` times the prepared grid's 2 mm."""
    from monai.networks.nets import UNet

    # the first poolings in-plane only: the slices are 5-9 mm apart, voxels 2-4 mm wide
    channels, strides = (16, 32, 64, 128), ((1, 2, 2), (2, 2, 2), (2, 2, 2))
    if factor == 1:
        channels, strides = (16, 32, 64, 128, 192), ((1, 2, 2), (1, 2, 2), (2, 2, 2), (2, 2, 2))
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return UNet(spatial_dims=3, in_channels=1, out_channels=n_classes, channels=channels, strides=strides,
                    num_res_units=1, norm="instance")


def low_res(image: np.ndarray, factor: int) -> torch.Tensor:
    """(Z, H, W) prepared image -> (1, 1, Z', H / factor, W / factor), Z padded to a multiple of 4."""
    x = F.avg_pool2d(torch.from_numpy(image).float()[:, None], factor)[:, 0]
    pad = -len(x) % 4
    return F.pad(x[None, None], (0, 0, 0, 0, 0, pad))


def low_res_labels(labels: np.ndarray, n_classes: int, factor: int) -> torch.Tensor:
    """Class shares of each voxel of :func:`low_res`'s grid (soft targets), (1, C, Z', H', W')."""
    onehot = F.one_hot(torch.from_numpy(labels).long(), n_classes).permute(0, 3, 1, 2).float()
    soft = F.avg_pool2d(onehot, factor).permute(1, 0, 2, 3)[None]
    pad = -soft.shape[2] % 4
    soft = F.pad(soft, (0, 0, 0, 0, 0, pad))
    soft[:, 0, soft.shape[2] - pad:] = 1  # the padding slices are background
    return soft


def augment(x: torch.Tensor, y: torch.Tensor, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """In-plane rotation (+-15 deg) and scale (0.85-1.15), gamma (0.7-1.5), noise; as the 2D training."""
    angle = np.deg2rad(rng.uniform(-15, 15))
    scale = rng.uniform(0.85, 1.15)
    c, s = np.cos(angle) / scale, np.sin(angle) / scale
    theta = torch.tensor([[[c, -s, 0, 0], [s, c, 0, 0], [0, 0, 1, 0]]], dtype=torch.float32)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    y = F.grid_sample(y, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    y[:, 0] += 1 - y.sum(1)  # outside the image: background
    x = x.clamp(0, 1) ** float(np.exp(rng.uniform(np.log(0.7), np.log(1.5))))
    if rng.random() < 0.3:
        x = x + torch.randn(x.shape, generator=torch.Generator().manual_seed(int(rng.integers(2**31)))) * 0.03
    return x, y


def soft_dice_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    probs = torch.softmax(logits, 1)
    dims = (0, 2, 3, 4)
    overlap = (probs * target).sum(dims)
    dice_loss = 1 - ((2 * overlap + 1e-5) / (probs.sum(dims) + target.sum(dims) + 1e-5))[1:].mean()
    ce = -(target * torch.log_softmax(logits, 1)).sum(1).mean()
    return dice_loss + ce


def train_fold(work: str, out: str, fold: int, epochs: int, seed: int, factor: int) -> str:
    torch.set_num_threads(1)  # one process per fold
    plan = json.loads((Path(work) / "plan.json").read_text())
    held_out = set(plan["folds"][fold])
    n_classes = load_task(plan["task"]).n_classes
    cases = [c for c in read_prepared_cases(Path(work) / "cases.npz") if c.name not in held_out]
    data = [(low_res(c.image, factor), low_res_labels(c.labels, n_classes, factor)) for c in cases]
    folder = Path(out) / f"fold{fold}"
    folder.mkdir(parents=True, exist_ok=True)
    network = new_network(n_classes, seed + fold, factor)
    optimiser = torch.optim.AdamW(network.parameters(), lr=2e-3, weight_decay=1e-4)
    start, log = 0, []
    checkpoint = folder / "checkpoint.pt"
    if checkpoint.exists():
        state = torch.load(checkpoint, weights_only=True)
        network.load_state_dict(state["network"])
        optimiser.load_state_dict(state["optimiser"])
        start, log = int(state["epoch"]), json.loads(state["log"])
    for epoch in range(start, epochs):
        rng = np.random.default_rng([seed, fold, epoch])
        for group in optimiser.param_groups:
            group["lr"] = 2e-3 * (1 - epoch / epochs) ** 0.9
        network.train()
        t0, total = time.perf_counter(), 0.0
        for i in rng.permutation(len(data)):
            x, y = augment(*data[i], rng)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = network(x)
            loss = soft_dice_ce(logits.float(), y)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            total += float(loss.detach())
        log.append({"epoch": epoch + 1, "loss": total / len(data), "seconds": time.perf_counter() - t0})
        torch.save({"network": network.state_dict(), "optimiser": optimiser.state_dict(), "epoch": epoch + 1,
                    "log": json.dumps(log)}, checkpoint)
        print(f"fold {fold} epoch {epoch + 1}/{epochs} loss {log[-1]['loss']:.3f} {log[-1]['seconds']:.1f} s",
              flush=True)
    return str(checkpoint)


def probabilities_2d(segmenter: Segmenter, image: np.ndarray) -> torch.Tensor:
    """The 2D fold model's class probabilities on the prepared grid, (C, Z, H, W), batched and in
    the precision the segmenter would use."""
    k, step, out = segmenter.config.neighbours, segmenter.batch_size, []
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=segmenter.precision == "bf16"):
        for start in range(0, len(image), step):
            idx = np.arange(start, min(start + step, len(image)))
            out.append(torch.softmax(segmenter.network(torch.from_numpy(neighbour_stack(image, idx, k))).float(), 1))
    return torch.cat(out).permute(1, 0, 2, 3)


def probabilities_3d(network: torch.nn.Module, image: np.ndarray, factor: int) -> torch.Tensor:
    """The 3D network's class probabilities taken back to the prepared grid, (C, Z, H, W)."""
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        probs = torch.softmax(network(low_res(image, factor)).float(), 1)[0, :, : len(image)]
    return F.interpolate(probs, size=image.shape[1:], mode="bilinear", align_corners=False)


def evaluate(work: str, out: str, plan: dict, cases: dict, fold: int, seed: int, factor: int) -> list[dict]:
    """Dice per written class of each patient ``fold`` held out, for the 2D, 3D and averaged labels."""
    segmenter = Segmenter(load_model(Path(work) / f"fold{fold}"), device="cpu", precision="bf16", contrast_check=False)
    written = segmenter.output_labels.numpy()  # network class -> written label, as the segmenter writes
    network = new_network(len(written), seed + fold, factor)
    network.load_state_dict(torch.load(Path(out) / f"fold{fold}" / "checkpoint.pt", weights_only=True)["network"])
    network.eval()
    rows = []
    for name in plan["folds"][fold]:
        case = cases[name]
        reference = written[case.labels]
        p2, p3 = probabilities_2d(segmenter, case.image), probabilities_3d(network, case.image, factor)
        for way, probs in (("2D", p2), ("3D", p3), ("2D+3D", (p2 + p3) / 2)):
            labels = postprocess_labels(written[probs.argmax(0).numpy()], segmenter.rules)
            for c in segmenter.model.classes:
                rows.append({"patient": name, "fold": fold, "way": way, "structure": c["name"],
                             "dice": dice(labels == c["label"], reference == c["label"])})
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", required=True, help="a prepared, trained cross-validation folder (cv/mr)")
    p.add_argument("--out", required=True)
    p.add_argument("--folds", type=int, nargs="+", required=True)
    p.add_argument("--epochs", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--full-resolution", action="store_true", help="2 mm voxels in-plane instead of 4 mm")
    args = p.parse_args()
    factor = 1 if args.full_resolution else 2
    with ProcessPoolExecutor(args.jobs) as pool:
        runs = [pool.submit(train_fold, args.work, args.out, f, args.epochs, args.seed, factor) for f in args.folds]
        for run in runs:
            run.result()
    plan = json.loads((Path(args.work) / "plan.json").read_text())
    cases = {c.name: c for c in read_prepared_cases(Path(args.work) / "cases.npz")}
    rows = [r for f in args.folds for r in evaluate(args.work, args.out, plan, cases, f, args.seed, factor)]
    (Path(args.out) / "results.json").write_text(json.dumps(rows, indent=1))
    patients = list(dict.fromkeys(r["patient"] for r in rows))
    structures = list(dict.fromkeys(r["structure"] for r in rows))
    ways = ("2D", "3D", "2D+3D")
    print("| patient | structure | " + " | ".join(ways) + " |\n|---|---|---|---|---|")
    for name in patients:
        for structure in structures:
            scores = {r["way"]: r["dice"] for r in rows if r["patient"] == name and r["structure"] == structure}
            print(f"| {name} | {structure} | " + " | ".join(f"{scores[w]:.3f}" for w in ways) + " |")
    for title, skip in (("mean", None), ("mean without chaos-mr-t2/15", "chaos-mr-t2/15")):
        means = [np.mean([r["dice"] for r in rows if r["way"] == w and r["patient"] != skip]) for w in ways]
        print(f"| {title} | all | " + " | ".join(f"{m:.4f}" for m in means) + " |")


if __name__ == "__main__":
    main()
