"""Benchmark: end-to-end training throughput, and which part limits it.

Three figures on the same synthetic patch-folder cohort (``bidistill.synthetic.patches``,
tiles stored as PNG files, tiled by ``bidistill tile``), so that the bottleneck is visible:

1. the data loader alone: bags per second read, decoded, augmented and collated by the
   loader's worker processes (what ``training.num_workers`` buys);
2. the model alone: training steps (forward, loss, backward, optimiser) of ``wsi-only`` with its
   patch encoder, on bags of random tiles already on the device;
3. training as ``bidistill train`` runs it (``train_log.csv``'s training time of an epoch).

On the CPU the encoder is a small one (``timm:resnet18``, random weights, 112 px inputs). On a GPU
(``--device cuda``, or when one is found) the script also times VGG16-BN, the papers' backbone,
on 256 px tiles resized to 224, bags of 10, in float32 and with bf16 mixed precision (and with
gradient checkpointing): patches per second and peak GPU memory for each.

Usage:
    python benchmarks/bench_end_to_end.py              # CPU, about 2-3 minutes on 2 cores
    python benchmarks/bench_end_to_end.py --device cuda --workers 8

Writes ``benchmarks/results/end_to_end.json`` (or ``--out``) and prints a table.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import yaml

RESULTS = Path(__file__).resolve().parent / "results" / "end_to_end.json"
CPU_ENCODER, CPU_INPUT, CPU_TILE = "timm:resnet18", 112, 128
GPU_ENCODER, GPU_INPUT, GPU_TILE = "vgg16-bn", 224, 256


def make_cohort(folder: Path, *, tile: int, encoder: str, input_size: int, args) -> Path:
    """A tiled patch-folder cohort and its end-to-end config (wsi-only, one epoch)."""
    from bidistill.config import load_config
    from bidistill.slides.stage import tile_from_config
    from bidistill.synthetic.patches import make_patch_cohort

    path = make_patch_cohort(
        folder, patients=args.patients, seed=0, tile=tile, tiles=(args.tiles, args.tiles)
    )
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    raw["features"] = {"encoder": encoder, "random_init": True}
    raw["methods"] = ["wsi-only"]
    raw["training"].update(
        {"epochs": 1, "batch_size": args.micro_batch, "num_workers": args.workers}
    )
    raw["training"]["device"] = args.device
    raw["training"]["end_to_end"].update(
        {"bag_size": args.bag_size, "micro_batch": args.micro_batch, "input_size": input_size}
    )
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    tile_from_config(load_config(path), progress=False)
    return path


def loader_rate(config, *, workers: int, seconds: float) -> tuple[float, float]:
    """Bags and tiles per second of the pixel loader alone (training bags, augmented)."""
    import numpy as np
    import torch

    from bidistill.cohort import load_cohort
    from bidistill.training.tile_bags import (
        TileBags,
        tile_index_from_config,
        tile_loader,
        training_bags,
    )

    cohort = load_cohort(config.cohort)
    ids = [str(p) for p in cohort.patients.index]
    slides = {str(p): list(s) for p, s in cohort.slides.groupby("patient_id")["slide_id"]}
    index = tile_index_from_config(config, [slides[p] for p in ids])
    n = len(ids)
    dataset = TileBags(
        index, np.zeros((n, 1)), np.ones((n, 1), bool), np.ones(n, bool), np.zeros(n, int),
        augment=config.training.end_to_end.augment, cache_dir=None,
    )  # fmt: skip
    loader = tile_loader(dataset, workers=workers, device=torch.device("cpu"))
    e2e = config.training.end_to_end
    bags = tiles = 0
    start = None
    epoch = 0
    while start is None or time.perf_counter() - start < seconds:
        plan = training_bags(
            [index.n_tiles(i) for i in range(n)], ids, seed=0, epoch=epoch,
            bag_size=e2e.bag_size, limit=None, augment=True,
        )  # fmt: skip
        mb = e2e.micro_batch
        loader.batch_sampler.set_plan([plan[i : i + mb] for i in range(0, len(plan), mb)])
        for batch in loader:
            if start is None:  # the first batch pays for starting the workers
                start = time.perf_counter()
                continue
            bags += len(batch["bags"])
            tiles += int(batch["tile_valid"].sum())
        epoch += 1
    elapsed = time.perf_counter() - start
    dataset.close()
    return bags / elapsed, tiles / elapsed


def model_rate(
    encoder: str, *, tile: int, input_size: int, device, precision, args, checkpointing=False
) -> dict:
    """Training steps of wsi-only on random tiles already on the device."""
    import torch

    from bidistill.config import EndToEndConfig
    from bidistill.devices import autocast
    from bidistill.features.encoders import load_encoder
    from bidistill.features.spec import Preprocess
    from bidistill.models import create_method
    from bidistill.models.patch_encoder import PatchEncoder

    loaded = load_encoder(encoder, random_init=True)
    model = loaded.model.train().requires_grad_(True)
    preprocess = Preprocess(input_size, mean=loaded.preprocess.mean, std=loaded.preprocess.std)

    def factory():
        return PatchEncoder(model, preprocess, loaded.dim, checkpointing=checkpointing)

    method = create_method(
        "wsi-only", in_dim=loaded.dim, clinical_dim=2, n_clinical_features=1,
        feature_slices=((0, 1),), patch_encoder=factory,
    ).to(device).train()  # fmt: skip
    if device.type in ("cuda", "cpu"):
        method.to(memory_format=torch.channels_last)
    e2e = EndToEndConfig(optimizer="sgd", momentum=0.3)
    optimizer = torch.optim.SGD(method.parameters(), lr=1e-4, momentum=e2e.momentum)
    mb, bag = args.micro_batch, args.bag_size
    from bidistill.models.batch import Batch

    batch = Batch(
        bags=torch.randint(0, 256, (mb, bag, 3, tile, tile), dtype=torch.uint8, device=device),
        tile_valid=torch.ones(mb, bag, dtype=torch.bool, device=device),
        clinical=torch.zeros(mb, 2, device=device),
        clinical_valid=torch.ones(mb, 1, dtype=torch.bool, device=device),
        clinical_present=torch.ones(mb, dtype=torch.bool, device=device),
        labels=torch.zeros(mb, dtype=torch.long, device=device),
    )

    def step() -> None:
        with autocast(device, precision):
            output = method(batch)
            loss = method.loss(batch, output)["total"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up: allocations, cuDNN autotuning
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < args.seconds or done < 3:
        step()
        done += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    result = {"bags_per_s": done * mb / elapsed, "patches_per_s": done * mb * bag / elapsed}
    if device.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return result


def training_rate(config_path: Path, work: Path) -> tuple[float, int]:
    """Bags per second of one training epoch as `bidistill train` runs it."""
    import pandas as pd

    from bidistill.config import load_config
    from bidistill.experiment import train_methods

    train_methods(load_config(config_path), work / "run", methods=["wsi-only"])
    log = pd.read_csv(work / "run" / "wsi-only" / "train_log.csv")
    return float(log["bags"].iloc[0] / log["train_seconds"].iloc[0]), int(log["bags"].iloc[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto (cuda when there is one), cpu")
    parser.add_argument("--patients", type=int, default=16)
    parser.add_argument("--tiles", type=int, default=40, help="Tiles per patient.")
    parser.add_argument("--bag-size", type=int, default=10)
    parser.add_argument("--micro-batch", type=int, default=2, help="Bags per forward pass.")
    parser.add_argument("--workers", type=int, default=2, help="Data-loader workers.")
    parser.add_argument("--seconds", type=float, default=20, help="Time per measurement.")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    import torch

    from bidistill.config import load_config
    from bidistill.devices import resolve_device

    device = resolve_device(args.device)
    args.device = str(device)
    load = os.getloadavg()
    report = {
        "benchmark": "end_to_end",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch_threads": torch.get_num_threads(),
        "bag_size": args.bag_size,
        "micro_batch": args.micro_batch,
        "workers": args.workers,
        "machine": f"{platform.machine()}, {platform.system()}, Python {platform.python_version()}",
        "cpus": os.cpu_count(),
        "load_average_at_start": [round(x, 2) for x in load],
        "note": "shared machine: other jobs may run at the same time; every figure then suffers",
    }
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        print(f"small backbone {CPU_ENCODER} on {device}: making and tiling a cohort ...")
        path = make_cohort(
            work / "small", tile=CPU_TILE, encoder=CPU_ENCODER, input_size=CPU_INPUT, args=args
        )
        config = load_config(path)
        for workers in sorted({0, args.workers}):
            bags, tiles = loader_rate(config, workers=workers, seconds=args.seconds)
            rows.append((f"loader alone, {workers} workers ({CPU_TILE} px PNG tiles)", bags,
                         tiles, None))  # fmt: skip
        model = model_rate(
            CPU_ENCODER, tile=CPU_TILE, input_size=CPU_INPUT, device=device,
            precision=torch.float32, args=args,
        )  # fmt: skip
        rows.append((f"model alone, {CPU_ENCODER} fp32 ({CPU_INPUT} px)", model["bags_per_s"],
                     model["patches_per_s"], model.get("peak_memory_gib")))  # fmt: skip
        print("training one epoch as `bidistill train` does ...")
        bags, n = training_rate(path, work / "small")
        rows.append((f"training, {args.workers} workers ({n} bags)", bags, bags * args.bag_size,
                     None))  # fmt: skip
        if device.type == "cuda":
            print(f"{GPU_ENCODER} on {report['device']} ...")
            gpu_path = make_cohort(
                work / "vgg", tile=GPU_TILE, encoder=GPU_ENCODER, input_size=GPU_INPUT,
                args=args,
            )  # fmt: skip
            bags, tiles = loader_rate(
                load_config(gpu_path), workers=args.workers, seconds=args.seconds
            )
            rows.append((f"loader alone, {args.workers} workers ({GPU_TILE} px PNG tiles)",
                         bags, tiles, None))  # fmt: skip
            for label, precision, checkpointing in (
                ("fp32", torch.float32, False),
                ("bf16 autocast", torch.bfloat16, False),
                ("bf16 + checkpointing", torch.bfloat16, True),
            ):
                model = model_rate(
                    GPU_ENCODER, tile=GPU_TILE, input_size=GPU_INPUT, device=device,
                    precision=precision, args=args, checkpointing=checkpointing,
                )  # fmt: skip
                rows.append((f"model alone, {GPU_ENCODER} {label}", model["bags_per_s"],
                             model["patches_per_s"], model["peak_memory_gib"]))  # fmt: skip
        else:
            print("no GPU here: the VGG16-BN figures (patches/s, peak memory, fp32 vs bf16) "
                  "are printed when this script runs on one")  # fmt: skip
    report["rows"] = [
        {"what": w, "bags_per_s": round(b, 3), "patches_per_s": round(p, 2),
         "peak_memory_gib": None if m is None else round(m, 2)}
        for w, b, p, m in rows
    ]  # fmt: skip
    from bidistill._io import write_json

    write_json(args.out, report)
    print(f"\nend-to-end training throughput on {report['device']} "
          f"(bags of {args.bag_size}, {args.micro_batch} bags per forward pass)")  # fmt: skip
    print(f"  {'':58}{'bags/s':>9}{'patches/s':>11}{'peak GiB':>10}")
    for what, bags, patches, memory in rows:
        mem = "" if memory is None else f"{memory:10.2f}"
        print(f"  {what:58}{bags:9.2f}{patches:11.1f}{mem}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
