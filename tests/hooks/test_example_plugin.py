"""The example third-party plugin package, loaded through its entry point as pip would install it."""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

import pytest

from agent.config import load_settings
from agent.hooks.manager import get_plugin_manager
from agent.pipeline.pipeline import Pipeline
from agent.wire.contract import Event, Item
from tests.builders import REPO_ROOT

EXAMPLE = REPO_ROOT / "examples" / "recsys-staff-picks"


async def test_staff_picks_plugin_found_by_entry_point(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # what `pip install` leaves behind: the package on the path and its entry-point metadata
    dist = tmp_path / "recsys_staff_picks-0.1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: recsys-staff-picks\nVersion: 0.1.0\n")
    declared = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())["project"]["entry-points"]["recsys_agent"]
    (dist / "entry_points.txt").write_text("[recsys_agent]\n" + "".join(f"{k} = {v}\n" for k, v in declared.items()))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.syspath_prepend(str(EXAMPLE))
    settings = load_settings(
        env={},
        overrides={"data_dir": str(tmp_path / "data"), "plugins": {"staff_picks": {"reason": "editor's choice"}}},
    )
    pipeline = Pipeline(settings, get_plugin_manager(settings))
    assert pipeline.pm.has_plugin("staff_picks")
    async with pipeline.running():
        items = [Item(id=f"i{n}", title=f"Item {n}", attributes={"staff_pick": n == 7}) for n in range(20)]
        await pipeline.upsert_items(items)
        await pipeline.apply_event(Event(type="view", user_id="u", ts=1.0, id="e", item_id="i1"))
        recs = await pipeline.recommend("u", 20)
    picked = next(item for item in recs.items if item.item_id == "i7")
    assert "editor's choice" in picked.reasons
    sys.modules.pop("recsys_staff_picks", None)
