"""Every `next:` line a command prints runs as printed, in both training modes.

Each test starts from commands a user types, then follows the chain: the command's last line
`next: ...` is split as a shell would split it and run from the same folder, and so on until the
chain ends in `next: open FILE` (the file must exist). Cohorts are tiny and training short; what
is tested is that each printed command works, not what it computes.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from bidistill.cli import app
from bidistill.synthetic.patches import make_patch_cohort

pytestmark = pytest.mark.slow

# A template, not a command: `bidistill encoders` cannot know the user's config.
PLACEHOLDERS = {"CONFIG"}


def invoke(command: str) -> str:
    """Run one `bidistill ...` line as printed; return its `next:` command ('' for none)."""
    words = shlex.split(command)
    assert words[0] == "bidistill", command
    result = CliRunner().invoke(app, words[1:])
    assert result.exit_code == 0, f"{command}\n{result.output}"
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("next: "), f"{command} ends without a next line:\n{result.output}"
    return last.removeprefix("next: ")


def follow(command: str, *, limit: int = 8) -> list[str]:
    """Run ``command`` and every `next:` line after it; return the lines run."""
    ran = []
    while len(ran) < limit:
        ran.append(command)
        command = invoke(command)
        words = shlex.split(command)
        if words[0] == "open":
            assert len(words) == 2 and Path(words[1]).exists(), command
            return ran
        if PLACEHOLDERS & set(words):
            help_ = CliRunner().invoke(app, [*words[1:2], "--help"])
            assert help_.exit_code == 0, command
            return ran
    raise AssertionError(f"no `next: open` after {limit} commands: {ran}")


def shorten_training(config: Path, epochs: int = 2) -> None:
    """Fewer epochs and methods, so that the chain runs in seconds (the printed commands do not
    depend on them)."""
    raw = yaml.safe_load(config.read_text(encoding="utf-8"))
    raw["methods"] = ["bd", "wsi-only"]
    raw.setdefault("training", {}).update({"epochs": epochs, "lr_warmup_epochs": 0})
    raw.setdefault("evaluation", {}).update({"mask_seeds": 2, "bootstrap": 20})
    config.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")


def shrink_cohort(folder: Path, per_group: int) -> None:
    """Keep ``per_group`` patients of each split and class, and only their feature files: `heatmap`
    draws every slide, and the printed commands do not depend on how many there are."""
    table = pd.read_csv(folder / "cohort.csv", dtype=str, keep_default_na=False)
    groups = table.drop_duplicates("patient_id").groupby(["split", "nodal_status"])
    kept = table[table["patient_id"].isin(groups.head(per_group)["patient_id"])]
    kept.to_csv(folder / "cohort.csv", index=False)
    for h5 in (folder / "features").glob("*.h5"):
        if h5.stem not in set(kept["slide_id"]):
            h5.unlink()


def test_every_next_line_runs_in_feature_mode(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert (
        invoke("bidistill init --synthetic -o first/exp.yaml") == "bidistill config first/exp.yaml"
    )
    shorten_training(Path("first/exp.yaml"))
    shrink_cohort(Path("first"), per_group=4)
    chain = follow("bidistill config first/exp.yaml")
    assert [shlex.split(c)[1] for c in chain] == ["config", "run", "predict", "heatmap"]
    run_dir = shlex.split(chain[1])[-1]
    assert follow(f"bidistill evaluate {run_dir}")
    assert follow(f"bidistill train first/exp.yaml --method wsi-only --out {run_dir}-b")[1:] == [
        f"bidistill evaluate {run_dir}-b"
    ]
    assert follow(f"bidistill compare {run_dir} {run_dir}-b --method wsi-only --out cmp")
    assert follow("bidistill encoders")
    chain = follow("bidistill synth features --out synth --patients 24 --dim 8")
    assert [shlex.split(c)[1] for c in chain][:2] == ["synth", "run"]


@pytest.fixture(scope="module")
def end_to_end_chain(tmp_path_factory):
    """An end-to-end cohort of 12 patch-folder slides, from `tile` through the `next:` lines up
    to the `predict` line that `run` prints; returns the folder and that line."""
    folder = tmp_path_factory.mktemp("e2e")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        config = make_patch_cohort(Path("cohort"), patients=12, seed=1)
        shorten_training(config)
        # `config` sends the user to `run` (which tiles what is not tiled); `tile` too.
        assert shlex.split(invoke(f"bidistill config {config}"))[1] == "run"
        ran, command = [], f"bidistill tile {config}"
        while shlex.split(command)[1] != "predict":
            ran.append(command)
            command = invoke(command)
    assert [shlex.split(c)[1] for c in ran] == ["tile", "run"]
    return folder, command


def test_an_end_to_end_run_prints_a_predict_line_that_runs(end_to_end_chain, monkeypatch):
    folder, predict = end_to_end_chain
    monkeypatch.chdir(folder)
    words = shlex.split(predict)
    assert "--slides" in words and "--features" not in words  # the model reads the tiles
    assert shlex.split(invoke(predict))[1] == "heatmap"


def test_every_next_line_runs_in_end_to_end_mode(end_to_end_chain, monkeypatch):
    folder, predict = end_to_end_chain
    monkeypatch.chdir(folder)
    assert [shlex.split(c)[1] for c in follow(predict)] == ["predict", "heatmap"]
