"""``recsys-agent catalog import``: embeds once, publishes, and the agent picks both up."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

import plugins.content
from agent.app import Agent
from agent.cli.catalog_import import CatalogImportError, embed_items, publish_items
from agent.cli.main import main
from agent.config import Settings
from agent.evaluation.datasets import DatasetError, read_items
from agent.pipeline.extras import ITEM_VECTORS
from agent.vectors.qdrant_store import VectorStore
from tests.builders import offline_settings


def write_items(path: Path, count: int) -> None:
    lines = [
        orjson.dumps({"id": f"m{i}", "title": f"Movie {i}", "categories": ["Drama" if i % 2 else "Comedy"]})
        for i in range(count)
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")


async def test_import_embeds_publishes_and_the_agent_embeds_nothing_again(
    settings: Settings, tmp_path: Path, embed_calls: list[int]
) -> None:
    items_file = tmp_path / "items.jsonl"
    write_items(items_file, 40)
    items = read_items(items_file)
    await embed_items(settings, items)
    await publish_items(settings, items)
    store = VectorStore(settings.qdrant_collection, 384, path=settings.data_dir / "qdrant")
    assert store.count() == 40
    store.close()

    embed_calls.clear()
    async with Agent(settings) as agent:
        await agent.pipeline.settle()
        assert agent.pipeline.catalog.active_count() == 40
        assert agent.pipeline.context.extras[ITEM_VECTORS].count == 40
    assert embed_calls == []


def test_bad_line_names_file_and_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    items_file = tmp_path / "items.jsonl"
    items_file.write_text('{"id": "a", "title": "A"}\n{"id": "b"}\n')
    with pytest.raises(DatasetError, match=r"items.jsonl:2: invalid item: missing field 'title'"):
        read_items(items_file)
    assert main(["catalog", "import", str(items_file), "--data-dir", str(tmp_path)]) == 1
    assert f"{items_file}:2: invalid item: missing field 'title'" in capsys.readouterr().err


async def test_import_stops_when_content_retrieval_reports_it_could_not_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_model(name: str, device: str) -> None:
        raise RuntimeError("no such model")

    monkeypatch.setattr(plugins.content, "shared_embedder", no_model)
    items_file = tmp_path / "items.jsonl"
    write_items(items_file, 3)
    settings = offline_settings(tmp_path)
    with pytest.raises(
        CatalogImportError, match=r"content retrieval could not start: no such model \(plugin content\)"
    ):
        await embed_items(settings, read_items(items_file))


def test_a_locked_local_store_says_what_to_do(tmp_path: Path) -> None:
    first = VectorStore("items", 4, path=tmp_path / "qdrant")
    try:
        with pytest.raises(RuntimeError, match=r"in use by another process .*--qdrant-url"):
            VectorStore("items", 4, path=tmp_path / "qdrant")
    finally:
        first.close()
