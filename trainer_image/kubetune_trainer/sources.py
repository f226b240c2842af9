"""Reading rows from each dataset format: JSONL, CSV, TEXT, PARQUET, HUGGINGFACE, CUSTOM."""

from __future__ import annotations

import csv
import importlib
import json
import re
from collections.abc import Iterable, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

from kubetune.api.finetuningjob import CustomLoader, DatasetFormat, HuggingFaceDataset
from kubetune_trainer.errors import InputNotFound, InvalidConfig, InvalidDataset
from kubetune_trainer.records import Record

TextMode = Literal["auto", "line", "block"]
EXTENSIONS = {
    DatasetFormat.JSONL: (".jsonl", ".json", ".ndjson"),
    DatasetFormat.CSV: (".csv",),
    DatasetFormat.TEXT: (".txt", ".text", ".md"),
    DatasetFormat.PARQUET: (".parquet",),
}
LOADER_ENTRY_POINT_GROUP = "kubetune.dataset_loaders"
_LOADER_REFERENCE = re.compile(
    r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*(:[A-Za-z_][A-Za-z0-9_]*)?$"
)
TEXT_COLUMN = "text"


def read_file_records(
    path: str | Path, fmt: DatasetFormat, *, text_mode: TextMode = "auto"
) -> list[Record]:
    """Every row of a file, or of every file of that format in a folder (sorted by name)."""
    path = Path(path)
    if not path.exists():
        raise InputNotFound(f"dataset {path} does not exist")
    if path.is_dir():
        files = sorted(
            p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in EXTENSIONS[fmt]
        )
        if not files:
            raise InputNotFound(
                f"dataset folder {path} has no {fmt.value} files ({', '.join(EXTENSIONS[fmt])})"
            )
    else:
        files = [path]
    records: list[Record] = []
    for file in files:
        label = file.name if len(files) == 1 else str(file.relative_to(path))
        for record in _READERS[fmt](file, label, text_mode):
            record.row = len(records) + 1
            records.append(record)
    return records


def _read_jsonl(file: Path, label: str, _mode: TextMode) -> Iterable[Record]:
    with _open_text(file) as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{label} line {line_number}"
            try:
                value = json.loads(line)
            except json.JSONDecodeError as err:
                raise InvalidDataset(
                    f"{where}: not valid JSON ({err.msg} at column {err.colno})"
                ) from err
            if not isinstance(value, dict):
                raise InvalidDataset(
                    f"{where}: each line must be a JSON object, got {type(value).__name__}"
                )
            yield Record(0, value, source=where)


def _read_csv(file: Path, label: str, _mode: TextMode) -> Iterable[Record]:
    with _open_text(file, newline="") as handle:
        reader = csv.DictReader(handle)
        if not reader.fieldnames:
            return
        header = list(reader.fieldnames)
        if len(set(header)) != len(header) or any(not name for name in header):
            raise InvalidDataset(f"{label} line 1: the CSV header has empty or repeated columns")
        try:
            for row in reader:
                where = f"{label} line {reader.line_num}"
                if None in row:
                    raise InvalidDataset(f"{where}: more values than the header has columns")
                missing = [name for name, value in row.items() if value is None]
                if missing:
                    raise InvalidDataset(f"{where}: missing values for columns {missing}")
                yield Record(0, dict(row), source=where)
        except csv.Error as err:
            raise InvalidDataset(f"{label} line {reader.line_num}: unreadable CSV ({err})") from err


def _read_text(file: Path, label: str, mode: TextMode) -> Iterable[Record]:
    with _open_text(file) as handle:
        lines = handle.read().splitlines()
    if mode == "auto":
        mode = "block" if _has_blank_line_between_text(lines) else "line"
    if mode == "line":
        for line_number, line in enumerate(lines, start=1):
            if line.strip():
                yield Record(0, {TEXT_COLUMN: line}, source=f"{label} line {line_number}")
        return
    block: list[str] = []
    start = 0
    for line_number, line in enumerate([*lines, ""], start=1):
        if line.strip():
            if not block:
                start = line_number
            block.append(line)
        elif block:
            yield Record(0, {TEXT_COLUMN: "\n".join(block)}, source=f"{label} line {start}")
            block = []


def _has_blank_line_between_text(lines: list[str]) -> bool:
    stripped = [bool(line.strip()) for line in lines]
    if True not in stripped:
        return False
    first = stripped.index(True)
    last = len(stripped) - 1 - stripped[::-1].index(True)
    return not all(stripped[first : last + 1])


def _read_parquet(file: Path, label: str, _mode: TextMode) -> Iterable[Record]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(file)
    except Exception as err:  # pyarrow raises several unrelated types for a bad file
        raise InvalidDataset(f"{label}: unreadable Parquet file ({err})") from err
    for index, row in enumerate(table.to_pylist(), start=1):
        yield Record(0, row, source=f"{label} row {index}")


def _open_text(file: Path, newline: str | None = None):
    try:
        handle = file.open(encoding="utf-8", newline=newline)
        handle.read(1 << 16)  # fail early on undecodable bytes at the start
        handle.seek(0)
        return handle
    except UnicodeDecodeError as err:
        raise InvalidDataset(f"{file.name}: not UTF-8 text ({err.reason})") from err
    except OSError as err:
        raise InputNotFound(f"dataset file {file} cannot be opened: {err.strerror}") from err


_READERS = {
    DatasetFormat.JSONL: _read_jsonl,
    DatasetFormat.CSV: _read_csv,
    DatasetFormat.TEXT: _read_text,
    DatasetFormat.PARQUET: _read_parquet,
}


def read_huggingface_records(
    source: HuggingFaceDataset, *, local_path: str | None = None, cache_dir: str | None = None
) -> list[Record]:
    """Rows of a `datasets` dataset: a `save_to_disk` folder, local files, or the Hub."""
    import datasets

    try:
        if local_path and (Path(local_path) / "dataset_dict.json").is_file():
            loaded = datasets.load_from_disk(local_path)[source.split]
        elif local_path and (Path(local_path) / "state.json").is_file():
            loaded = datasets.load_from_disk(local_path)
        else:
            loaded = datasets.load_dataset(
                local_path or source.name,
                source.config,
                split=source.split,
                revision=source.revision,
                cache_dir=cache_dir,
            )
    except KeyError as err:
        raise InputNotFound(f"dataset {source.name!r} has no split {source.split!r}") from err
    except FileNotFoundError as err:
        raise InputNotFound(f"dataset {source.name!r} not found: {err}") from err
    except (ValueError, datasets.exceptions.DatasetNotFoundError) as err:
        raise InputNotFound(f"dataset {source.name!r} cannot be loaded: {err}") from err
    return [
        Record(index, dict(row), source=f"{source.split} row {index}")
        for index, row in enumerate(loaded, start=1)
    ]


def resolve_loader(reference: str):
    """A dataset loader function from an entry point name or `package.module:function`.

    Only code already installed in the image can be named: file paths are refused."""
    if not _LOADER_REFERENCE.match(reference or ""):
        raise InvalidConfig(
            f"dataset.custom.loader {reference!r} must be an entry point name of the "
            f"{LOADER_ENTRY_POINT_GROUP!r} group or `package.module:function`; paths to code "
            "are not allowed"
        )
    if ":" not in reference:
        matches = metadata.entry_points(group=LOADER_ENTRY_POINT_GROUP, name=reference)
        if not matches:
            raise InputNotFound(
                f"dataset.custom.loader {reference!r}: no entry point of that name in the "
                f"{LOADER_ENTRY_POINT_GROUP!r} group (install the package that provides it, "
                "or use `package.module:function`)"
            )
        return next(iter(matches)).load()
    module_name, function_name = reference.split(":", 1)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        raise InputNotFound(
            f"dataset.custom.loader {reference!r}: module {module_name!r} is not installed"
        ) from err
    loader = getattr(module, function_name, None)
    if not callable(loader):
        raise InputNotFound(
            f"dataset.custom.loader {reference!r}: {module_name} has no function {function_name!r}"
        )
    return loader


def read_custom_records(custom: CustomLoader, *, local_path: str | None = None) -> list[Record]:
    """Rows from a custom loader: it is called with `path` (if any) and the spec's args,
    and returns an iterable of mappings (a `datasets.Dataset` is one)."""
    loader = resolve_loader(custom.loader)
    kwargs: dict[str, Any] = dict(custom.args)
    if local_path:
        kwargs.setdefault("path", local_path)
    rows = loader(**kwargs)
    records = []
    for index, row in enumerate(rows, start=1):
        if not isinstance(row, Mapping):
            raise InvalidDataset(
                f"row {index}: the loader {custom.loader!r} returned a "
                f"{type(row).__name__}, expected a mapping of columns"
            )
        records.append(Record(index, dict(row)))
    return records
