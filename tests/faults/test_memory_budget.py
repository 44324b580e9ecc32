"""`--memory-budget` holds for a huge narrow bag: the process grows by about the budget, not by
the bag's number of chunks (per-chunk tensors kept alive used to fragment the heap: 1M tiles x
8-d took 256 MiB above a warmed-up process at a 64 MiB budget, 2M tiles about 1 GiB)."""

from __future__ import annotations

import json
import subprocess
import sys

import h5py
import numpy as np

BUDGET_MIB = 64
# What the budget leaves out: the model's own temporaries and the allocator's slack.
MARGIN_MIB = 16

# Runs in a fresh process, so that its peak resident memory (VmHWM) is this prediction's own.
_CHILD = """
import json, sys
import h5py, torch
from bidistill.models.streaming import ArrayBag, predict_bag
from bidistill.training.data import FileBag
from bidistill.models import create_method
from bidistill.models.batch import Batch

def peak():
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024

path, budget = sys.argv[1], int(sys.argv[2]) * 2**20
torch.manual_seed(0)
method = create_method(
    "bd", in_dim=8, clinical_dim=3, n_clinical_features=1, feature_slices=[(0, 2)]
).eval()
clinical, valid = method.blank_clinical, torch.zeros(1, dtype=torch.bool)
with h5py.File(path) as h5:  # warm up HDF5, torch's kernels and the model on 100 tiles
    predict_bag(method, ArrayBag(h5["features"][:100]), clinical, valid, False)
before = peak()
chunked = predict_bag(method, FileBag([path]), clinical, valid, False, memory_budget=budget)
after = peak()
with h5py.File(path) as h5, torch.no_grad():  # the reference: one pass over the whole bag
    bag = torch.from_numpy(h5["features"][()])[None]
    batch = Batch(
        bags=bag,
        tile_valid=torch.ones(bag.shape[:2], dtype=torch.bool),
        clinical=clinical[None],
        clinical_valid=valid[None],
        clinical_present=torch.tensor([False]),
    )
    whole = float(method(batch).probabilities[0])
print(json.dumps({"above": after - before, "chunked": chunked.probability, "whole": whole,
                  "rows": chunked.chunk_rows}))
"""


def test_a_million_tile_bag_is_predicted_within_the_memory_budget(tmp_path):
    path = tmp_path / "big.h5"
    with h5py.File(path, "w") as h5:  # 1M tiles x 8-d float32: 32 MB
        rng = np.random.default_rng(0)
        h5.create_dataset("features", data=rng.normal(size=(1_000_000, 8)).astype(np.float32))
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, str(path), str(BUDGET_MIB)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["rows"] < 1_000_000 / 50  # the bag really went through in many chunks
    above_mib = result["above"] / 2**20
    assert above_mib <= BUDGET_MIB + MARGIN_MIB, f"{above_mib:.0f} MiB above the warmed process"
    assert abs(result["chunked"] - result["whole"]) < 1e-5
