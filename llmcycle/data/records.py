"""Loading task data: local JSONL/CSV/Parquet files, `save_to_disk` folders and `hf:` datasets.

Every record keeps a `where` ("data/train.jsonl:17", "data/train.parquet#row 3") so that any later
complaint about it (a missing field, a bad value, a failing evaluation) can point the user at the record.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import Field

from llmcycle.core.configbase import Section
from llmcycle.core.errors import UserError, suggest

SUPPORTED_FORMATS = ".jsonl, .json, .csv, .parquet, a datasets save_to_disk folder (folder or folder:SPLIT), hf:NAME[:CONFIG][:SPLIT]"
_HASH_LIMIT = 256 * 1024 * 1024  # bigger files are identified by size + mtime: hashing them costs too much


class DataConfig(Section):
    train: str | None = Field(None, description="Training data: a file relative to the project directory "
                              "(.jsonl, .json, .csv, .parquet), a save_to_disk folder (folder or folder:SPLIT), "
                              "or hf:NAME[:CONFIG][:SPLIT] for a Hugging Face dataset.")
    eval: str | None = Field(None, description="Evaluation data, same forms as train. When unset, a seeded "
                             "share of train is held out (eval_fraction / eval_size).")
    format: Literal["fields", "messages"] = Field(
        "fields", description="fields: each record maps input/target fields; messages: each record holds "
        "a conversation, a list of {role, content} turns (OpenAI style; system, user, assistant) whose last "
        "assistant turn is the target, the user turn before it the input (the template is applied to it) "
        "and earlier turns the history.")
    messages: str = Field("messages", description="Field holding the conversation (data.format: messages).")
    input: str = Field("input", description="Field of each record holding the model input.")
    target: str | list[str] | None = Field("target", description="Field holding the expected output; a list "
                                           "of fields, or a field whose value is a list of strings, gives "
                                           "several references. null for data without targets.")
    eval_fraction: float = Field(0.1, gt=0, lt=1, description="Share of train held out for evaluation when "
                                 "data.eval is not set.")
    eval_size: int | None = Field(None, ge=1, description="Number of train records held out for evaluation "
                                  "when data.eval is not set; overrides eval_fraction.")
    seed: int = Field(42, description="Seed of the train/eval split, so that the split is the same every run.")


@dataclass
class Example:
    input: str
    targets: list[str]
    fields: dict = field(repr=False)
    where: str = ""
    history: list[dict] = field(default_factory=list)  # earlier turns of a conversation, before `input`
    system: str | None = None  # a conversation's own system prompt


@dataclass
class Splits:
    train: list[Example]
    eval: list[Example]


def _key(key: str | None) -> str:
    return f" (key {key})" if key else ""


def _hub_offline() -> bool:
    import datasets.config

    return bool(datasets.config.HF_HUB_OFFLINE) or os.environ.get("HF_DATASETS_OFFLINE", "").upper() in (
        "1", "ON", "YES", "TRUE") or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def _locate(source: str, base_dir: Path, key: str | None) -> tuple[Path, str | None]:
    """The local path of `source` and the split named by a `folder:SPLIT` suffix (None without one)."""
    path = Path(source).expanduser()
    if not path.is_absolute():
        path = Path(base_dir) / path
    if path.exists():
        return path, None
    head, sep, split = source.rpartition(":")
    if sep and head and split and "/" not in split:
        folder = Path(head).expanduser()
        folder = folder if folder.is_absolute() else Path(base_dir) / folder
        if folder.is_dir():
            return folder, split
    hint = "" if Path(source).is_absolute() else f"; relative paths are resolved against the project directory {base_dir}"
    raise UserError(f"data file not found: {source}{_key(key)}{hint}")


# JSONL and CSV are parsed here rather than with datasets' loaders: theirs report a malformed record
# without its line number, and every record needs a `where` pointing at its line for later errors too.
def _read_jsonl(path: Path, source: str) -> list[tuple[str, dict]]:
    out = []
    with open(path, encoding="utf-8-sig") as f:
        try:
            text = f.read()
        except UnicodeDecodeError as e:
            raise UserError(f"{source}: not UTF-8 text ({e})") from None
    if path.suffix == ".json" and text.lstrip().startswith("["):
        # A .json file holding one array of objects rather than one object per line.
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{source}:{e.lineno}: malformed JSON: {e.msg}") from None
        for i, item in enumerate(items, 1):
            if not isinstance(item, dict):
                raise UserError(f"{source}#row {i}: record is a {type(item).__name__}, not an object")
            out.append((f"{source}#row {i}", item))
        return out
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{source}:{lineno}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: malformed JSON record: {e}") from None
        if not isinstance(rec, dict):
            raise UserError(f"{where}: record is a JSON {type(rec).__name__}, not an object "
                            "(expected one {...} object per line)")
        out.append((where, rec))
    return out


def _read_csv(path: Path, source: str) -> list[tuple[str, dict]]:
    out = []
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, strict=True)
        header = None
        end = 0  # physical line the previous row ended on; a row starts on the line after it
        try:
            for row in reader:
                start, end = end + 1, reader.line_num
                if not row:  # blank line
                    continue
                if header is None:
                    header = [h.strip() for h in row]
                    continue
                if len(row) != len(header):
                    raise UserError(f"{source}:{start}: malformed CSV row: {len(row)} columns, the header "
                                    f"has {len(header)} ({', '.join(header)})")
                out.append((f"{source}:{start}", dict(zip(header, row))))
        except csv.Error as e:
            raise UserError(f"{source}:{reader.line_num}: malformed CSV: {e}") from None
        except UnicodeDecodeError as e:
            raise UserError(f"{source}: not UTF-8 text ({e})") from None
    return out


def _rows(records: list[dict], source: str) -> list[tuple[str, dict]]:
    """(where, record) pairs of rows without line numbers, numbered from 1."""
    return [(f"{source}#row {i}", rec) for i, rec in enumerate(records, 1)]


def _read_parquet(path: Path, source: str) -> list[tuple[str, dict]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for a corrupt or foreign file
        raise UserError(f"{source}: not a readable Parquet file ({e})") from None
    return _rows(table.to_pylist(), source)


def _read_saved(path: Path, split: str | None, source: str, key: str | None) -> list[tuple[str, dict]]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # FileNotFoundError for a folder that is not a saved dataset, and others
        raise UserError(f"{source}: folder is not a dataset saved with save_to_disk{_key(key)} ({e}); "
                        f"supported formats: {SUPPORTED_FORMATS}") from None
    if isinstance(ds, datasets.DatasetDict):
        names = list(ds)
        if split is None:
            if len(names) != 1:
                raise UserError(f"{source}: the saved dataset has splits {', '.join(names)}; pick one with "
                                f"{source}:SPLIT{_key(key)}")
            split = names[0]
        if split not in ds:
            raise UserError(f"{source}: no split '{split}' in the saved dataset (splits: {', '.join(names)})"
                            f"{suggest(split, names)}{_key(key)}")
        ds = ds[split]
    elif split is not None:
        raise UserError(f"{source}: the saved dataset has no splits, drop ':{split}'{_key(key)}")
    return _rows(ds.to_list(), source)


def _read_hf(source: str, base_dir: Path, key: str | None) -> list[tuple[str, dict]]:
    import datasets

    parts = source[3:].split(":")
    if len(parts) > 3 or not parts[0]:
        raise UserError(f"{source}: expected hf:NAME[:CONFIG][:SPLIT]{_key(key)}")
    name, config, split = (parts + [None, None])[:3]
    local = Path(name).expanduser()
    local = local if local.is_absolute() else Path(base_dir) / local
    if local.exists():  # a local folder of data files that datasets reads with its packaged loaders
        name = str(local)
    try:
        ds = datasets.load_dataset(name, config or None, split=split or "train")
    except Exception as e:  # datasets raises many types (FileNotFoundError, ConnectionError, ValueError, ...)
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        offline = ("offline mode is on (HF_DATASETS_OFFLINE/HF_HUB_OFFLINE), so only cached copies can be used"
                   if _hub_offline() else "offline mode is off")
        home = os.environ.get("HF_HOME", "~/.cache/huggingface")
        raise UserError(f"{source}: the dataset could not be loaded{_key(key)}: {detail}; {offline}. Fix: use a "
                        f"local file (.jsonl, .csv, .parquet), or a cached copy by pointing HF_HOME (now {home}) "
                        f"at a cache that holds it") from None
    return _rows(ds.to_list(), source)


def load_records(source: str, base_dir: Path, key: str | None = None) -> list[tuple[str, dict]]:
    """(where, record) pairs of a data source; `key` names the config key in error messages."""
    if source.startswith("hf:"):
        pairs = _read_hf(source, base_dir, key)
    else:
        path, split = _locate(source, base_dir, key)
        suffix = path.suffix.lower()
        if path.is_dir():
            pairs = _read_saved(path, split, source, key)
        elif suffix in (".jsonl", ".json"):
            pairs = _read_jsonl(path, source)
        elif suffix == ".csv":
            pairs = _read_csv(path, source)
        elif suffix == ".parquet":
            pairs = _read_parquet(path, source)
        else:
            raise UserError(f"{source}: unsupported data format '{suffix or path.name}'{_key(key)}; "
                            f"supported: {SUPPORTED_FORMATS}")
    if not pairs:
        raise UserError(f"{source}: no records{_key(key)}")
    return pairs


def _text(value) -> str:
    return value if isinstance(value, str) else str(value)


def _refs(value) -> list[str]:
    """The non-empty references in a target value (a string, or a list of them)."""
    values = value if isinstance(value, (list, tuple)) else [value]
    return [_text(v) for v in values if v is not None and _text(v).strip()]


ROLES = ("system", "user", "assistant")


def _turns(rec: dict, cfg: DataConfig, where: str) -> list[dict]:
    """A record's conversation, checked: a list of {role, content} with known roles and text content."""
    turns = rec.get(cfg.messages)
    if not isinstance(turns, list) or not turns:
        found = ", ".join(map(str, rec)) or "none"
        raise UserError(f"{where}: data.format is messages but field '{cfg.messages}' is not a non-empty list "
                        f"of turns (fields found: {found}); set data.messages to the field holding them")
    for i, t in enumerate(turns):
        if not isinstance(t, dict) or t.get("role") not in ROLES or not isinstance(t.get("content"), str):
            raise UserError(f"{where}: turn {i} of '{cfg.messages}' must be {{\"role\": system|user|assistant, "
                            f"\"content\": text}}, got {str(t)[:80]}")
    return [{"role": t["role"], "content": t["content"]} for t in turns]


def conversation_example(where: str, rec: dict, cfg: DataConfig) -> Example:
    """An example from a conversation: the last assistant turn is the target (none when the
    conversation ends with a user turn), the user turn before it the input, what precedes the history."""
    turns = _turns(rec, cfg, where)
    system = turns.pop(0)["content"] if turns[0]["role"] == "system" else None
    if any(t["role"] == "system" for t in turns):
        raise UserError(f"{where}: a system turn may only open the conversation")
    target = turns.pop()["content"] if turns and turns[-1]["role"] == "assistant" else None
    if not turns or turns[-1]["role"] != "user":
        raise UserError(f"{where}: the conversation needs a user turn before its last assistant turn")
    query = turns.pop()["content"]
    return Example(input=query, targets=[target] if target and target.strip() else [], fields=rec, where=where,
                   history=turns, system=system)


def assistant_turns(example: Example) -> list[Example]:
    """One example per assistant turn of a conversation (its earlier turns as history), the example
    itself last: how a model without a chat template learns every answer of a conversation."""
    out, turns = [], example.history
    for j, turn in enumerate(turns):
        if turn["role"] == "assistant" and j > 0 and turns[j - 1]["role"] == "user" and turn["content"].strip():
            out.append(Example(input=turns[j - 1]["content"], targets=[turn["content"]], fields=example.fields,
                               where=f"{example.where} turn {j}", history=turns[:j - 1], system=example.system))
    return out + [example]


def to_examples(pairs, cfg: DataConfig, source: str, require_target: bool) -> list[Example]:
    """Examples from (where, record) pairs, mapping cfg.input / cfg.target fields (or conversations)."""
    if cfg.format == "messages":
        examples = [conversation_example(where, rec, cfg) for where, rec in pairs]
        lacking = [e for e in examples if not e.targets]
        if require_target and lacking:
            raise UserError(f"{lacking[0].where}: the conversation does not end with an assistant turn to learn "
                            f"or score ({len(lacking)} of {len(pairs)} records); end each with the expected answer")
        return examples
    fields = [cfg.target] if isinstance(cfg.target, str) else list(cfg.target or [])
    examples, lacking = [], []
    for where, rec in pairs:
        value = rec.get(cfg.input)
        if value is None:
            found = ", ".join(map(str, rec)) or "none"
            raise UserError(f"{where}: input field '{cfg.input}' missing (fields found: {found})"
                            f"{suggest(cfg.input, rec)}; set data.input to the field holding the input")
        targets = [ref for f in fields for ref in _refs(rec.get(f))]
        if fields and not targets:
            lacking.append((where, rec))
        examples.append(Example(input=_text(value), targets=targets, fields=rec, where=where))
    if require_target and lacking:
        where, rec = lacking[0]
        name = f"target field '{fields[0]}'" if len(fields) == 1 else f"target fields {', '.join(fields)}"
        found = ", ".join(map(str, rec)) or "none"
        hint = suggest(fields[0], rec) if len(fields) == 1 else ""
        raise UserError(f"{where}: {name} missing ({len(lacking)} of {len(pairs)} records lack it; "
                        f"fields found: {found}){hint}; set data.target to the field holding the expected output")
    if require_target and not fields:
        raise UserError(f"{source}: this stage needs targets but data.target is not set")
    return examples


def load_splits(cfg: DataConfig, base_dir: Path, require_target: bool = True) -> Splits:
    """Train and eval examples; without data.eval a seeded share of train is held out."""
    if cfg.train is None and cfg.eval is None:
        raise UserError("no data: set data.train (and optionally data.eval) in llmcycle.yaml")

    def load(source: str, key: str) -> list[Example]:
        return to_examples(load_records(source, base_dir, key), cfg, source, require_target)

    if cfg.train is None:
        return Splits(train=[], eval=load(cfg.eval, "data.eval"))
    train = load(cfg.train, "data.train")
    if cfg.eval is not None:
        return Splits(train=train, eval=load(cfg.eval, "data.eval"))
    n = len(train)
    k = cfg.eval_size if cfg.eval_size is not None else max(1, round(cfg.eval_fraction * n))
    if k >= n:
        raise UserError(f"{cfg.train}: {n} record(s) cannot be split into train and eval (holding out {k} "
                        "leaves no training data); add records, lower data.eval_size / data.eval_fraction, "
                        "or set data.eval")
    order = list(range(n))
    random.Random(cfg.seed).shuffle(order)
    held = set(order[:k])
    # Both sides keep the file's order: easier to read in reports, and stable when the seed is.
    return Splits(train=[e for i, e in enumerate(train) if i not in held],
                  eval=[e for i, e in enumerate(train) if i in held])


def corpus_texts(examples) -> list[str]:
    """Inputs and all references of the examples: a corpus for training a tokenizer or pretraining."""
    return [t for e in examples for t in [e.input, *e.targets]]


def fingerprint(source: str, base_dir: Path) -> str:
    """Cheap identity of a data source's content, for deciding whether cached results still hold."""
    if source.startswith("hf:"):
        return source
    path, split = _locate(source, base_dir, None)
    h = hashlib.sha256()
    if path.is_dir():
        for p in sorted(path.rglob("*")):
            if p.is_file():
                st = p.stat()
                h.update(f"{p.relative_to(path).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        h.update(f"split={split}".encode())
    else:
        st = path.stat()
        if st.st_size >= _HASH_LIMIT:
            h.update(f"size={st.st_size} mtime={st.st_mtime_ns}".encode())
        else:
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()
