"""Benchmark: end-to-end feature extraction against the encoder's raw forward throughput.

Slides on disk (JPEG-tiled pyramidal TIFFs of tissue-like content, 0.5 µm/px) are tiled at
256 px (the config's default) and their features extracted with ``resnet50-trunc`` (random
weights: the compute is the pretrained model's, and nothing is downloaded) through
``bidistill.features.extract``: data-loader workers reading tiles, the resize to 224 and
normalisation, the forward pass and the .h5 writes. In the same run, with the same batch size and
device, the encoder alone is timed on random tensors already in memory. Target: end-to-end
throughput at least 0.9 of the raw forward throughput (reading must hide behind the encoder).

Both run channels-last, as extraction does; on a GPU (``--device cuda``) in bf16, where the
encoder is by default ``uni``'s architecture (ViT-L/16 at 224 px, random weights: the compute of
UNI, CONCH-sized and most foundation models), batch 256, one loader worker per core but one,
20,000 tiles. Besides tiles/s, both figures are given as slides per hour for a slide of 10,000
tiles (TRIDENT reports 290 slides an hour per GPU).

The slides of one run are copies of one made slide (hard links where possible): making them
takes a single core minutes per 10,000 tiles.

Usage:
    python benchmarks/bench_extraction.py                    # CPU, about 3 minutes on 2 cores
    python benchmarks/bench_extraction.py --device cuda      # ViT-L/16 bf16, batch 256

Writes ``benchmarks/results/extraction.json`` (or ``--out``) and prints both figures and the ratio.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "extraction.json"
TARGET_RATIO = 0.9
CPU_ENCODER = "resnet50-trunc"
GPU_ENCODER = "uni"  # ViT-L/16, 224 px
SLIDE_TILES = 10_000  # the slide that slides per hour are counted in
HERE = Path(__file__).resolve().parent


def make_slides(folder: Path, tiles: int, slides: int) -> list[Path]:
    """``slides`` copies of one JPEG-tiled pyramidal TIFF, about ``tiles`` tissue tiles in all."""
    sys.path.insert(0, str(HERE))
    from bench_tiling import make_pyramid_tiff

    # About two fifths of bench_tiling's image is tissue that tiling keeps; it is 4:3.
    side = int((tiles / slides * 2.5 * 256 * 256 * 4 / 3) ** 0.5)
    first = folder / "slide0.tif"
    make_pyramid_tiff(first, side, side * 3 // 4)
    paths = [first]
    for i in range(1, slides):
        path = folder / f"slide{i}.tif"
        try:
            os.link(first, path)
        except OSError:
            shutil.copyfile(first, path)
        paths.append(path)
    return paths


def _cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the data-loader workers)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def raw_forward_rate(
    encoder, batch_size: int, device, precision, seconds: float
) -> tuple[float, float]:
    """Tiles per second of the encoder alone, on random normalised inputs already on the device:
    by the clock and per CPU-second."""
    import torch

    from bidistill.features.extract import Extractor

    extractor = Extractor(
        encoder, batch_size=batch_size, device=device, precision=precision, cache_dir=Path(".")
    )
    size = encoder.preprocess.size
    x = torch.randn(batch_size, 3, size, size, device=device)
    if extractor.channels_last:  # the layout extraction feeds the encoder
        x = x.contiguous(memory_format=torch.channels_last)
    model = extractor.model

    def forward() -> None:
        with (
            torch.inference_mode(),
            torch.autocast(device.type, dtype=precision, enabled=precision != torch.float32),
        ):
            model(x).float().cpu()

    forward()  # warm-up (cuDNN autotuning, first allocations)
    done, start, cpu = 0, time.perf_counter(), _cpu_seconds()
    while time.perf_counter() - start < seconds or done < 3:
        forward()
        done += 1
    tiles = done * batch_size
    return tiles / (time.perf_counter() - start), tiles / (_cpu_seconds() - cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--tiles", type=int, help="Tiles to extract in all (768 on the CPU, 20,000 on a GPU)."
    )
    parser.add_argument("--slides", type=int, default=4)
    parser.add_argument("--batch-size", type=int, help="64 on the CPU, 256 on a GPU.")
    parser.add_argument(
        "--workers",
        type=int,
        help="Data-loader workers (2 on the CPU, a core each but one on a GPU).",
    )
    parser.add_argument(
        "--encoder", help=f"Registered encoder, random weights ({CPU_ENCODER} / {GPU_ENCODER})."
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    gpu = args.device.startswith("cuda")
    args.tiles = args.tiles or (20_000 if gpu else 768)
    args.batch_size = args.batch_size or (256 if gpu else 64)
    args.workers = (
        args.workers
        if args.workers is not None
        else (max(1, (os.cpu_count() or 2) - 1) if gpu else 2)
    )
    encoder_name = args.encoder or (GPU_ENCODER if gpu else CPU_ENCODER)

    import torch

    from bidistill.config import FeaturesConfig, TilingConfig
    from bidistill.features.encoders import load_encoder
    from bidistill.features.extract import (
        ExtractionJob,
        extract_features,
        resolve_device,
        resolve_precision,
    )
    from bidistill.slides import SlideJob, coords_path, tile_cohort

    load = os.getloadavg()
    device = resolve_device(args.device)
    precision = resolve_precision("auto", device)
    encoder = load_encoder(encoder_name, random_init=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        print(f"making {args.slides} slides with about {args.tiles} tiles ...", flush=True)
        paths = make_slides(work, args.tiles, args.slides)
        tiling = TilingConfig(coords_dir=work / "coords", patch_size=256, mpp=0.5, qc=False)
        jobs = [SlideJob(p.stem, p) for p in paths]
        tile_cohort(jobs, tiling, progress=False)
        extraction_jobs = [
            ExtractionJob(j.slide_id, j.path, coords_path(tiling.coords_dir, j.slide_id),
                          work / "features" / f"{j.slide_id}.h5")
            for j in jobs
        ]  # fmt: skip
        features = FeaturesConfig(
            dir=work / "features",
            encoder=encoder_name,
            random_init=True,
            batch_size=args.batch_size,
            num_workers=args.workers,
            device=args.device,
        )
        # The encoder alone is timed before and after the extraction, and the two averaged, so a
        # change in the machine's other load during the run weighs on both figures alike.
        print("timing the encoder on random tensors ...", flush=True)
        raw_before, raw_cpu_before = raw_forward_rate(
            encoder, args.batch_size, device, precision, seconds=15
        )
        print("extracting the slides ...", flush=True)
        cpu = _cpu_seconds()
        summary = extract_features(
            extraction_jobs,
            features,
            cache_dir=work / "cache",
            encoder=encoder,
            progress=False,
        )
        extract_cpu = _cpu_seconds() - cpu
        print("timing the encoder on random tensors again ...", flush=True)
        raw_after, raw_cpu_after = raw_forward_rate(
            encoder, args.batch_size, device, precision, seconds=15
        )
        tiles = sum(summary.done.values())
        end_to_end = tiles / summary.seconds
    raw = (raw_before + raw_after) / 2
    ratio = end_to_end / raw
    # Per CPU-second (reading, preprocessing and writing included): what the pipeline costs on
    # top of the encoder when the cores are shared, independent of other jobs' load.
    raw_cpu = (raw_cpu_before + raw_cpu_after) / 2
    cpu_ratio = (tiles / extract_cpu) / raw_cpu
    report = {
        "benchmark": "extraction",
        "encoder": encoder_name,
        "input_size": encoder.preprocess.size,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "precision": str(precision).removeprefix("torch."),
        "batch_size": args.batch_size,
        "workers": args.workers,
        "torch_threads": torch.get_num_threads(),
        "slides": len(summary.done),
        "tiles": tiles,
        "raw_forward_tiles_per_s": round(raw, 2),
        "raw_forward_before_after": [round(raw_before, 2), round(raw_after, 2)],
        "end_to_end_tiles_per_s": round(end_to_end, 2),
        "ratio": round(ratio, 3),
        "slide_tiles": SLIDE_TILES,
        "raw_forward_slides_per_hour": round(raw * 3600 / SLIDE_TILES, 1),
        "end_to_end_slides_per_hour": round(end_to_end * 3600 / SLIDE_TILES, 1),
        "raw_forward_tiles_per_cpu_s": round(raw_cpu, 3),
        "end_to_end_tiles_per_cpu_s": round(tiles / extract_cpu, 3),
        "cpu_ratio": round(cpu_ratio, 3),
        "target_ratio": TARGET_RATIO,
        "machine": f"{platform.machine()}, {platform.system()}, Python {platform.python_version()}",
        "cpus": os.cpu_count(),
        "load_average_at_start": [round(x, 2) for x in load],
        "note": "shared machine: other jobs may run at the same time; both figures then suffer",
    }
    from bidistill._io import write_json

    write_json(args.out, report)
    print(
        f"\n{encoder_name} on {report['device']} ({report['precision']}, batch {args.batch_size}, "
        f"{args.workers} loader workers, {tiles} tiles of {len(summary.done)} slides)\n"
        f"  raw forward on random tensors: {raw:8.1f} tiles/s (before {raw_before:.1f}, after "
        f"{raw_after:.1f})\n"
        f"  end to end (disk -> .h5):      {end_to_end:8.1f} tiles/s\n"
        f"  ratio: {ratio:.3f} ({'meets' if ratio >= TARGET_RATIO else 'MISSES'} the target "
        f">= {TARGET_RATIO})\n"
        f"  slides of {SLIDE_TILES:,} tiles per hour: {report['end_to_end_slides_per_hour']:.1f} "
        f"end to end, {report['raw_forward_slides_per_hour']:.1f} for the encoder alone\n"
        f"  per CPU-second: raw {raw_cpu:.2f}, end to end {tiles / extract_cpu:.2f} tiles "
        f"(ratio {cpu_ratio:.3f}: the share of CPU the encoder gets in the pipeline)\n"
        f"wrote {args.out}"
    )
    sys.exit(0 if ratio >= TARGET_RATIO else 1)


if __name__ == "__main__":
    main()
