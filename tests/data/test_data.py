import json
import time

import pytest
from pydantic import ValidationError

from llmcycle.data.records import (DataConfig, Example, corpus_texts, fingerprint, load_records, load_splits,
                           to_examples)
from llmcycle.core.errors import UserError


def write_jsonl(path, records, blank_after=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, r in enumerate(records):
        lines.append(json.dumps(r))
        if blank_after is not None and i == blank_after:
            lines.append("")
    path.write_text("\n".join(lines) + "\n")
    return path


def recs(n, **extra):
    return [{"input": f"in {i}", "target": f"out {i}", **extra} for i in range(n)]


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    # load_dataset writes Arrow caches; keep them inside the test's folder.
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


# --- formats -----------------------------------------------------------------------------------------

def test_jsonl_where_skips_blank_lines(tmp_path):
    write_jsonl(tmp_path / "data/train.jsonl", recs(3), blank_after=0)
    pairs = load_records("data/train.jsonl", tmp_path)
    assert [w for w, _ in pairs] == ["data/train.jsonl:1", "data/train.jsonl:3", "data/train.jsonl:4"]
    assert pairs[1][1] == {"input": "in 1", "target": "out 1"}


def test_jsonl_malformed_line(tmp_path):
    p = tmp_path / "train.jsonl"
    p.write_text('{"input": "a"}\n{"input": "b",\n')
    with pytest.raises(UserError, match=r"^train.jsonl:2: malformed JSON record: "):
        load_records("train.jsonl", tmp_path)


def test_jsonl_line_not_object(tmp_path):
    (tmp_path / "t.jsonl").write_text('{"input": "a"}\n\n[1, 2]\n')
    with pytest.raises(UserError, match=r"t.jsonl:3: record is a JSON list, not an object"):
        load_records("t.jsonl", tmp_path)


def test_json_array_file(tmp_path):
    (tmp_path / "t.json").write_text(json.dumps(recs(2), indent=2))
    pairs = load_records("t.json", tmp_path)
    assert [w for w, _ in pairs] == ["t.json#row 1", "t.json#row 2"]


def test_csv_multiline_field_and_line_numbers(tmp_path):
    (tmp_path / "t.csv").write_text('input,target\n"first\nspans two lines",a\n\nsecond,"b, with comma"\n')
    pairs = load_records("t.csv", tmp_path)
    assert pairs == [("t.csv:2", {"input": "first\nspans two lines", "target": "a"}),
                     ("t.csv:5", {"input": "second", "target": "b, with comma"})]


def test_csv_wrong_column_count(tmp_path):
    (tmp_path / "t.csv").write_text('input,target\n"x\ny",a\nb,c,d\n')
    with pytest.raises(UserError, match=r"^t.csv:4: malformed CSV row: 3 columns, the header has 2"):
        load_records("t.csv", tmp_path)


def test_csv_unterminated_quote(tmp_path):
    (tmp_path / "t.csv").write_text('input,target\na,"never closed\n')
    with pytest.raises(UserError, match=r"^t.csv:\d+: malformed CSV"):
        load_records("t.csv", tmp_path)


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"input": ["a", "b"], "target": ["x", "y"], "n": [1, 2]}), tmp_path / "t.parquet")
    pairs = load_records("t.parquet", tmp_path)
    assert pairs[1] == ("t.parquet#row 2", {"input": "b", "target": "y", "n": 2})


def test_save_to_disk_dataset_and_dict(tmp_path):
    import datasets

    datasets.Dataset.from_list(recs(3)).save_to_disk(str(tmp_path / "ds"))
    assert [w for w, _ in load_records("ds", tmp_path)] == ["ds#row 1", "ds#row 2", "ds#row 3"]

    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(recs(3)),
                               "validation": datasets.Dataset.from_list(recs(2))})
    dd.save_to_disk(str(tmp_path / "dd"))
    pairs = load_records("dd:validation", tmp_path)
    assert len(pairs) == 2 and pairs[0][0] == "dd:validation#row 1"
    with pytest.raises(UserError, match=r"dd: the saved dataset has splits train, validation; pick one"):
        load_records("dd", tmp_path)
    with pytest.raises(UserError, match=r"no split 'valid'.*did you mean 'validation'"):
        load_records("dd:valid", tmp_path)


def test_folder_that_is_not_a_dataset(tmp_path):
    (tmp_path / "plain").mkdir()
    with pytest.raises(UserError, match=r"plain: folder is not a dataset saved with save_to_disk"):
        load_records("plain", tmp_path, key="data.train")


def test_hf_local_folder(tmp_path):
    write_jsonl(tmp_path / "hfdata/train.jsonl", recs(4))
    pairs = load_records("hf:hfdata", tmp_path)
    assert len(pairs) == 4 and pairs[0] == ("hf:hfdata#row 1", {"input": "in 0", "target": "out 0"})


def test_hf_offline_missing_dataset_is_fast_and_clear(tmp_path, monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    start = time.monotonic()
    with pytest.raises(UserError) as e:
        load_records("hf:llmcycle-test/no-such-dataset", tmp_path, key="data.train")
    assert time.monotonic() - start < 10
    msg = str(e.value)
    assert msg.startswith("hf:llmcycle-test/no-such-dataset: the dataset could not be loaded (key data.train)")
    assert "offline mode is on" in msg and "local file" in msg and "HF_HOME" in msg


def test_hf_bad_syntax(tmp_path):
    with pytest.raises(UserError, match=r"expected hf:NAME\[:CONFIG\]\[:SPLIT\]"):
        load_records("hf:a:b:c:d", tmp_path)


def test_missing_unsupported_empty(tmp_path):
    with pytest.raises(UserError, match=r"^data file not found: data/nope.jsonl \(key data.train\)"):
        load_records("data/nope.jsonl", tmp_path, key="data.train")
    (tmp_path / "t.txt").write_text("hello\n")
    with pytest.raises(UserError, match=r"t.txt: unsupported data format '.txt'.*supported: .jsonl"):
        load_records("t.txt", tmp_path)
    (tmp_path / "e.jsonl").write_text("\n\n")
    with pytest.raises(UserError, match=r"^e.jsonl: no records \(key data.eval\)$"):
        load_records("e.jsonl", tmp_path, key="data.eval")


# --- field mapping -----------------------------------------------------------------------------------

def test_to_examples_mapping_and_str_conversion(tmp_path):
    pairs = [("f:1", {"q": 12, "a": 3.5, "other": "x"})]
    (ex,) = to_examples(pairs, DataConfig(input="q", target="a"), "f", require_target=True)
    assert ex == Example(input="12", targets=["3.5"], fields={"q": 12, "a": 3.5, "other": "x"}, where="f:1")


def test_list_targets_both_styles():
    cfg = DataConfig(target="refs")
    (ex,) = to_examples([("f:1", {"input": "i", "refs": ["a", "", "b"]})], cfg, "f", True)
    assert ex.targets == ["a", "b"]
    cfg = DataConfig(target=["r1", "r2", "r3"])
    (ex,) = to_examples([("f:1", {"input": "i", "r1": "a", "r2": "", "r3": "c"})], cfg, "f", True)
    assert ex.targets == ["a", "c"]
    with pytest.raises(UserError, match=r"f:2: target fields r1, r2, r3 missing \(1 of 2 records"):
        to_examples([("f:1", {"input": "i", "r1": "a"}), ("f:2", {"input": "i", "r2": ""})], cfg, "f", True)


def test_missing_input_field():
    with pytest.raises(UserError, match=r"^f:1: input field 'input' missing \(fields found: inptu, target\)"
                                        r" \(did you mean 'inptu'\?\)"):
        to_examples([("f:1", {"inptu": "x", "target": "y"})], DataConfig(), "f", True)


def test_missing_target_counts_records():
    pairs = [(f"data/train.jsonl:{i + 1}", {"a": "x", "b": "y"} if i in (4, 6, 9) else
              {"a": "x", "b": "y", "summary": "s"}) for i in range(100)]
    cfg = DataConfig(input="a", target="summary")
    with pytest.raises(UserError) as e:
        to_examples(pairs, cfg, "data/train.jsonl", require_target=True)
    assert str(e.value).startswith("data/train.jsonl:5: target field 'summary' missing (3 of 100 records "
                                   "lack it; fields found: a, b)")
    exs = to_examples(pairs, cfg, "data/train.jsonl", require_target=False)
    assert exs[4].targets == [] and exs[0].targets == ["s"]


def test_no_target_configured():
    (ex,) = to_examples([("f:1", {"input": "i"})], DataConfig(target=None), "f", require_target=False)
    assert ex.targets == []
    with pytest.raises(UserError, match="data.target is not set"):
        to_examples([("f:1", {"input": "i"})], DataConfig(target=None), "f", require_target=True)


# --- splits ------------------------------------------------------------------------------------------

def test_seeded_split_is_deterministic_and_ordered(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", recs(50))
    cfg = DataConfig(train="train.jsonl", eval_fraction=0.2, seed=7)
    a, b = load_splits(cfg, tmp_path), load_splits(cfg, tmp_path)
    assert len(a.eval) == 10 and len(a.train) == 40
    assert [e.where for e in a.eval] == [e.where for e in b.eval]
    lines = [int(e.where.rsplit(":", 1)[1]) for e in a.eval]
    assert lines == sorted(lines)
    assert {e.where for e in a.train} | {e.where for e in a.eval} == {f"train.jsonl:{i}" for i in range(1, 51)}
    c = load_splits(DataConfig(train="train.jsonl", eval_fraction=0.2, seed=8), tmp_path)
    assert [e.where for e in c.eval] != [e.where for e in a.eval]
    d = load_splits(DataConfig(train="train.jsonl", eval_size=3, eval_fraction=0.5), tmp_path)
    assert (len(d.train), len(d.eval)) == (47, 3)


def test_split_at_least_one_and_too_small(tmp_path):
    write_jsonl(tmp_path / "three.jsonl", recs(3))
    s = load_splits(DataConfig(train="three.jsonl", eval_fraction=0.01), tmp_path)
    assert (len(s.train), len(s.eval)) == (2, 1)
    write_jsonl(tmp_path / "one.jsonl", recs(1))
    with pytest.raises(UserError, match=r"one.jsonl: 1 record\(s\) cannot be split"):
        load_splits(DataConfig(train="one.jsonl"), tmp_path)


def test_explicit_eval_only_eval_and_none(tmp_path):
    write_jsonl(tmp_path / "tr.jsonl", recs(5))
    write_jsonl(tmp_path / "ev.jsonl", recs(2))
    s = load_splits(DataConfig(train="tr.jsonl", eval="ev.jsonl"), tmp_path)
    assert (len(s.train), len(s.eval)) == (5, 2)
    s = load_splits(DataConfig(eval="ev.jsonl"), tmp_path)
    assert (len(s.train), len(s.eval)) == (0, 2)
    with pytest.raises(UserError, match=r"^no data: set data.train \(and optionally data.eval\) in llmcycle.yaml"):
        load_splits(DataConfig(), tmp_path)
    with pytest.raises(UserError, match=r"data file not found: nope.jsonl \(key data.eval\)"):
        load_splits(DataConfig(train="tr.jsonl", eval="nope.jsonl"), tmp_path)


def test_config_validation():
    for bad in ({"eval_fraction": 0}, {"eval_fraction": 1}, {"eval_size": 0}, {"trian": "x"}):
        with pytest.raises(ValidationError):
            DataConfig(**bad)
    assert all(f.description for f in DataConfig.model_fields.values())


def test_corpus_texts():
    exs = [Example("a", ["b", "c"], {}, "w"), Example("d", [], {}, "w")]
    assert corpus_texts(exs) == ["a", "b", "c", "d"]


def test_fingerprint(tmp_path):
    p = write_jsonl(tmp_path / "t.jsonl", recs(2))
    f1 = fingerprint("t.jsonl", tmp_path)
    assert fingerprint(str(p), tmp_path) == f1
    write_jsonl(p, recs(3))
    assert fingerprint("t.jsonl", tmp_path) != f1
    write_jsonl(tmp_path / "dir/a.jsonl", recs(2))
    g1 = fingerprint("dir", tmp_path)
    write_jsonl(tmp_path / "dir/b.jsonl", recs(2))
    assert fingerprint("dir", tmp_path) != g1
    assert fingerprint("hf:squad", tmp_path) == "hf:squad"
    with pytest.raises(UserError, match="data file not found"):
        fingerprint("missing.jsonl", tmp_path)
