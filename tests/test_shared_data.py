"""Integration checks on the real public data in ../shared/data (skipped with a reason when absent)."""
from pathlib import Path

import pytest

from llmcycle.data.records import DataConfig, load_records, load_splits

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
pytestmark = pytest.mark.data


def need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} is absent (the shared data folder is not next to this checkout)")
    return path


def test_dialogsum_loads_with_seeded_split():
    train = need(SHARED / "dialogsum" / "dialogsum.train.jsonl")
    dev = need(SHARED / "dialogsum" / "dialogsum.dev.jsonl")
    cfg = DataConfig(train=str(train), eval=str(dev), input="dialogue", target="summary")
    splits = load_splits(cfg, Path("."))
    assert (len(splits.train), len(splits.eval)) == (12460, 500)
    assert splits.eval[0].where.endswith("dialogsum.dev.jsonl:1") and splits.eval[0].targets
    only_dev = load_splits(DataConfig(train=str(dev), input="dialogue", target="summary", eval_size=50, seed=3),
                           Path("."))
    assert (len(only_dev.train), len(only_dev.eval)) == (450, 50)


def test_toxicity_csv_with_multiline_tweets():
    path = need(SHARED / "toxicity" / "labeled_data.csv")
    records = load_records(str(path), Path("."))
    assert len(records) == 24783  # 26,954 physical lines: some tweets span several
    assert {"tweet", "class"} <= set(records[0][1])
