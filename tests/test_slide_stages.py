"""The per-slide stage runner: shards, skipping done work, and failures recorded once."""

from __future__ import annotations

import pytest

from bidistill.errors import ConfigError, SlideError
from bidistill.slide_stages import (
    Recorder,
    Shard,
    StageSummary,
    plan_slides,
    resolve_shard,
    run_slides,
)

IDS = [f"slide-{i:03d}" for i in range(200)]


def test_shards_partition_the_slides_by_id_alone():
    shards = [Shard(i, 3) for i in range(3)]
    owned = [{s for s in IDS if shard.owns(s)} for shard in shards]
    assert set().union(*owned) == set(IDS)
    assert sum(len(o) for o in owned) == len(IDS)  # no slide in two shards
    assert all(40 < len(o) < 90 for o in owned)  # roughly balanced
    # A slide's shard does not depend on the other slides.
    assert {s for s in IDS[:50] if shards[1].owns(s)} == owned[1] & set(IDS[:50])


def test_shard_parsing_and_torchrun(monkeypatch):
    assert Shard.parse("1/4") == Shard(1, 4) and str(Shard(1, 4)) == "1/4"
    for bad in ("4/4", "1", "a/b", "-1/2"):
        with pytest.raises(ConfigError, match="expected"):
            Shard.parse(bad)
    monkeypatch.delenv("RANK", raising=False)
    assert resolve_shard(None) == Shard()
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert resolve_shard(None) == Shard(1, 2)
    assert resolve_shard("1/2") == Shard(1, 2)
    with pytest.raises(ConfigError, match="under torchrun"):
        resolve_shard("0/4")


def _work(job: str) -> tuple[str, int | None, str | None]:
    if job.startswith("bad"):
        return job, None, f"{job}.svs: not a slide"
    return job, len(job), None


def test_plan_skips_done_and_other_shards_then_records_outcomes():
    summary = StageSummary(stage="test")
    jobs = ["a", "bb", "bad1", "ccc", "bad2"]
    todo = plan_slides(
        jobs, slide_id=str, is_done=lambda j: j == "a", shard=Shard(), summary=summary
    )
    assert todo == ["bb", "bad1", "ccc", "bad2"] and summary.skipped == ["a"]
    with pytest.raises(SlideError, match=r"bad1\.svs: not a slide; pass --skip-errors"):
        run_slides(todo, _work, recorder=Recorder(summary, skip_errors=False), progress=False)
    assert summary.done == {"bb": 2} and not summary.failed  # stopped at the first failure

    summary = StageSummary(stage="test")
    run_slides(todo, _work, recorder=Recorder(summary, skip_errors=True), progress=False)
    assert summary.done == {"bb": 2, "ccc": 3}
    assert summary.failed == {"bad1": "bad1.svs: not a slide", "bad2": "bad2.svs: not a slide"}
    merged = StageSummary.merged([summary, StageSummary("test", done={"x": 1}, skipped=["a"])])
    assert merged.done == {"bb": 2, "ccc": 3, "x": 1} and merged.skipped == ["a"]
