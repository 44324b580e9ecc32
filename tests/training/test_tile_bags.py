"""The pixel bag source: which tiles go into which bag (from the seed alone), reading them from
real patch folders, augmentation, collation, and the end-to-end config checks."""

import pickle

import numpy as np
import pytest
import torch

from bidistill.config import AugmentConfig, load_config, parse_config
from bidistill.errors import ConfigError, SlideError
from bidistill.slides.reader import open_slide
from bidistill.slides.stage import tile_from_config
from bidistill.synthetic.patches import make_patch_cohort
from bidistill.training.tile_bags import (
    BagSpec,
    TileBags,
    augment_tile,
    check_bag_settings,
    collate_tile_bags,
    prediction_bags,
    tile_index_from_config,
    training_bags,
)

N_TILES = [7, 0, 12, 3]
IDS = ["a", "b", "c", "d"]


def epoch_bags(epoch: int, seed: int = 0, limit=None, ids=IDS, n_tiles=N_TILES):
    return training_bags(
        n_tiles, ids, seed=seed, epoch=epoch, bag_size=4, limit=limit, augment=True
    )


def test_an_epoch_uses_every_tile_of_every_patient_once():
    bags = epoch_bags(0)
    for item, n in enumerate(N_TILES):
        tiles = [t for b in bags if b.item == item for t in b.tiles]
        assert sorted(tiles) == list(range(n))
        assert all(len(b.tiles) <= 4 for b in bags if b.item == item)
    assert sum(1 for b in bags if b.item == 1) == 1  # no tiles: one empty bag


def test_bags_depend_on_the_seed_and_epoch_only():
    assert epoch_bags(3) == epoch_bags(3)
    assert epoch_bags(3) != epoch_bags(4)
    assert epoch_bags(3) != epoch_bags(3, seed=1)
    # A patient's bags do not depend on the other patients of the split.
    alone = epoch_bags(3, ids=["c"], n_tiles=[12])
    with_others = [b for b in epoch_bags(3) if b.item == 2]
    assert sorted(b.tiles for b in alone) == sorted(b.tiles for b in with_others)


def test_bags_per_patient_caps_training_and_prediction():
    bags = epoch_bags(0, limit=1)
    assert [sum(b.item == i for b in bags) for i in range(4)] == [1, 1, 1, 1]
    fixed = prediction_bags(12, "c", seed=0, bag_size=4, limit=None)
    assert sorted(t for b in fixed for t in b) == list(range(12))
    assert prediction_bags(12, "c", seed=0, bag_size=4, limit=2) == fixed[:2]
    assert prediction_bags(12, "c", seed=0, bag_size=4, limit=None) == fixed
    assert prediction_bags(12, "x", seed=0, bag_size=4, limit=None) != fixed


def test_augmentation_is_drawn_from_the_bag_seed():
    tile = np.random.default_rng(0).integers(0, 256, (9, 9, 3), dtype=np.uint8)
    cfg = AugmentConfig(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.05)
    a = augment_tile(tile, np.random.default_rng(5), cfg)
    assert a.dtype == torch.uint8 and a.shape == (3, 9, 9)
    assert torch.equal(a, augment_tile(tile, np.random.default_rng(5), cfg))
    geometric = AugmentConfig()
    outputs = {
        augment_tile(tile, np.random.default_rng(s), geometric).numpy().tobytes() for s in range(12)
    }
    assert len(outputs) > 2  # flips and rotations differ
    for s in range(4):  # ... and move pixels without changing them
        moved = augment_tile(tile, np.random.default_rng(s), geometric)
        assert sorted(moved.flatten().tolist()) == sorted(tile.flatten().tolist())


@pytest.fixture(scope="module")
def tiled(tmp_path_factory):
    config_path = make_patch_cohort(tmp_path_factory.mktemp("patches"), patients=12, tile=16)
    config = load_config(config_path)
    tile_from_config(config, progress=False)
    return config


def test_bags_read_the_tiles_of_the_patients_slides(tiled):
    index = tile_index_from_config(tiled, [["P002"], ["P001", "P003"]])
    n = [len(s.coords) for s in index.slides]
    assert index.n_tiles(1) == n[1] + n[2] and index.lengths(1) == n[1:]
    dataset = TileBags(
        index,
        np.zeros((2, 3)),
        np.ones((2, 2), bool),
        np.ones(2, bool),
        np.array([0, 1]),
        augment=None,
        cache_dir=None,
    )
    last = n[1] + 1  # the second tile of the patient's second slide
    item = dataset[BagSpec(1, (0, last))]
    with open_slide(tiled.slides.dir / "P003") as slide:
        expected = slide.read_tile(1, 0, 16, 16)
    assert item["pixels"].shape == (2, 3, 16, 16)
    assert torch.equal(item["pixels"][1], torch.from_numpy(np.array(expected)).permute(2, 0, 1))
    assert dataset._open  # slides stay open in this process ...
    assert not pickle.loads(pickle.dumps(dataset))._open  # ... and never travel to workers
    batch = collate_tile_bags([item, dataset[BagSpec(0, (3,))]])
    assert batch.bags.shape == (2, 2, 3, 16, 16) and batch.bags.dtype == torch.uint8
    assert batch.tile_valid.tolist() == [[True, True], [True, False]]
    dataset.close()


def test_untiled_slides_say_to_tile_first(tiled, tmp_path):
    config = tiled.model_copy(deep=True)
    config.tiling.coords_dir = tmp_path
    with pytest.raises(SlideError, match="run `bidistill tile CONFIG` first"):
        tile_index_from_config(config, [["P001"]])


def test_end_to_end_needs_slides_and_whole_forward_passes(tiled):
    raw = tiled.model_dump(mode="json")
    raw.pop("slides")
    with pytest.raises(ConfigError, match="end-to-end trains on the slides' tiles"):
        parse_config(raw)
    with pytest.raises(ConfigError, match=r"batch_size \(6 bags per step\) must be a multiple"):
        check_bag_settings(6, 4)


def test_torchrun_runs_end_to_end_training_only(tiled, tmp_path, monkeypatch):
    from bidistill.experiment import run_experiment, train_methods

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "localhost")
    features_mode = tiled.model_copy(deep=True)
    features_mode.training.mode = "features"
    with pytest.raises(ConfigError, match="feature-mode training runs in one process"):
        train_methods(features_mode, tmp_path / "a")
    config_path = tiled.cohort.table.parent / "config.yaml"
    with pytest.raises(ConfigError, match="under torchrun, train with `bidistill train"):
        run_experiment(config_path, tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
