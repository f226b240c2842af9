"""Reading every dataset format, example shapes, and format conversion."""

from __future__ import annotations

import json

import pytest
from kubetune_trainer import data
from kubetune_trainer.errors import InputNotFound, InvalidConfig, InvalidDataset
from kubetune_trainer.records import Record, resolve_shape
from kubetune_trainer.sources import (
    read_custom_records,
    read_file_records,
    read_huggingface_records,
)

from kubetune.api.finetuningjob import CustomLoader, DatasetFormat, FieldMapping, HuggingFaceDataset

ROWS = [
    {"prompt": "Say hi", "completion": "hi, there"},
    {"prompt": 'Quote "this"', "completion": "ok\nmultiline"},
    {"prompt": "Ünïcode ✓", "completion": "done"},
]


def test_jsonl_rows_and_bad_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n" + json.dumps(ROWS[1]) + "\n{broken\n")
    with pytest.raises(InvalidDataset, match=r"d.jsonl line 4: not valid JSON"):
        read_file_records(path, DatasetFormat.JSONL)
    path.write_text(json.dumps(ROWS[0]) + "\n[1, 2]\n")
    with pytest.raises(InvalidDataset, match=r"line 2: each line must be a JSON object, got list"):
        read_file_records(path, DatasetFormat.JSONL)


def test_csv_rows_and_ragged_row(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('prompt,completion\n"a, b",c\nx,y,z\n')
    with pytest.raises(InvalidDataset, match=r"d\.csv line 3: more values than the header"):
        read_file_records(path, DatasetFormat.CSV)
    path.write_text('prompt,completion\n"a, b",c\n')
    assert [r.fields for r in read_file_records(path, DatasetFormat.CSV)] == [
        {"prompt": "a, b", "completion": "c"}
    ]


def test_text_lines_and_blocks(tmp_path):
    path = tmp_path / "d.txt"
    path.write_text("first line\nsecond line\n")
    assert [r.fields["text"] for r in read_file_records(path, DatasetFormat.TEXT)] == [
        "first line",
        "second line",
    ]
    path.write_text("para one\nstill one\n\n\npara two\n")
    blocks = read_file_records(path, DatasetFormat.TEXT)
    assert [r.fields["text"] for r in blocks] == ["para one\nstill one", "para two"]
    assert blocks[1].source == "d.txt line 5"
    lines = read_file_records(path, DatasetFormat.TEXT, text_mode="line")
    assert len(lines) == 3


def test_parquet_and_folder(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "parts"
    folder.mkdir()
    pq.write_table(pa.Table.from_pylist(ROWS[:2]), folder / "a.parquet")
    pq.write_table(pa.Table.from_pylist(ROWS[2:]), folder / "b.parquet")
    records = read_file_records(folder, DatasetFormat.PARQUET)
    assert [r.fields for r in records] == ROWS
    assert [r.row for r in records] == [1, 2, 3]


def test_missing_file_is_input_not_found(tmp_path):
    with pytest.raises(InputNotFound, match="does not exist"):
        read_file_records(tmp_path / "nope.jsonl", DatasetFormat.JSONL)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputNotFound, match="has no CSV files"):
        read_file_records(tmp_path / "empty", DatasetFormat.CSV)


def test_huggingface_saved_to_disk(tmp_path):
    import datasets

    dataset = datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(ROWS), "test": datasets.Dataset.from_list(ROWS[:1])}
    )
    dataset.save_to_disk(tmp_path / "hf")
    source = HuggingFaceDataset(name="org/data", split="test")
    records = read_huggingface_records(source, local_path=str(tmp_path / "hf"))
    assert [r.fields for r in records] == ROWS[:1]
    with pytest.raises(InputNotFound, match="no split 'validation'"):
        read_huggingface_records(
            HuggingFaceDataset(name="org/data", split="validation"),
            local_path=str(tmp_path / "hf"),
        )


def test_huggingface_local_files(tmp_path):
    folder = tmp_path / "files"
    folder.mkdir()
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    records = read_huggingface_records(
        HuggingFaceDataset(name=str(folder), split="train"), cache_dir=str(tmp_path / "cache")
    )
    assert [r.fields for r in records] == ROWS


def test_custom_loader_by_module_function():
    custom = CustomLoader(
        loader="tests.unit.trainer.custom_loader:load_rows", args={"count": 2, "prefix": ["a"]}
    )
    records = read_custom_records(custom, local_path="/data")
    assert [r.fields["text"] for r in records] == ["a 0 from /data", "a 1 from /data"]


@pytest.mark.parametrize(
    ("reference", "error", "message"),
    [
        ("/tmp/evil.py", InvalidConfig, "paths to code are not allowed"),
        ("../x:load", InvalidConfig, "paths to code are not allowed"),
        ("os.system; rm", InvalidConfig, "must be an entry point name"),
        ("no_such_module_xyz:load", InputNotFound, "is not installed"),
        ("tests.unit.trainer.custom_loader:missing", InputNotFound, "has no function"),
        ("no-such-entry-point", InvalidConfig, "must be an entry point"),
        ("no_such_entry_point", InputNotFound, "no entry point of that name"),
    ],
)
def test_custom_loader_refusals(reference, error, message):
    # CustomLoader's own pattern refuses these at the API; the trainer checks again.
    custom = CustomLoader.model_construct(loader=reference, args={})
    with pytest.raises(error, match=message):
        read_custom_records(custom)


def test_custom_loader_must_return_mappings():
    custom = CustomLoader(loader="tests.unit.trainer.custom_loader:not_mappings")
    with pytest.raises(InvalidDataset, match=r"row 1: .* returned a str"):
        read_custom_records(custom)


@pytest.mark.parametrize(
    ("columns", "fields", "kind"),
    [
        (["text", "id"], None, "text"),
        (["question", "answer"], None, "prompt_completion"),
        (["messages"], None, "messages"),
        (["body"], None, "text"),
        (["a", "b"], FieldMapping(prompt="a", completion="b"), "prompt_completion"),
    ],
)
def test_shape_detection(columns, fields, kind):
    assert resolve_shape(fields, columns).kind == kind


def test_shape_ambiguous_columns_ask_for_fields():
    with pytest.raises(InvalidDataset, match=r"set dataset\.fields"):
        resolve_shape(None, ["a", "b"])


def _read(path, fmt):
    return [r.fields for r in read_file_records(path, fmt)]


def test_convert_round_trips_jsonl_csv(tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ROWS))
    data.convert(source, "JSONL", tmp_path / "mid.csv", "CSV")
    data.convert(tmp_path / "mid.csv", "CSV", tmp_path / "out.jsonl", "JSONL")
    assert _read(tmp_path / "out.jsonl", DatasetFormat.JSONL) == ROWS


def test_convert_round_trips_text_in_both_modes(tmp_path):
    for mode, texts in [
        ("line", ["one example", "another one"]),
        ("block", ["para one\nline two", "para two"]),
    ]:
        source = tmp_path / f"{mode}.txt"
        source.write_text(("\n\n" if mode == "block" else "\n").join(texts) + "\n")
        data.convert(source, "TEXT", tmp_path / f"{mode}.jsonl", "JSONL", text_mode=mode)
        assert _read(tmp_path / f"{mode}.jsonl", DatasetFormat.JSONL) == [
            {"text": t} for t in texts
        ]
        data.convert(tmp_path / f"{mode}.jsonl", "JSONL", tmp_path / f"{mode}2.txt", "TEXT")
        assert (tmp_path / f"{mode}2.txt").read_text() == source.read_text()


def test_convert_applies_steps_and_reports_them(tmp_path):
    source = tmp_path / "in.jsonl"
    rows = [{"text": "Hello  World"}, {"text": "hi"}, {"text": "HELLO world"}]
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    results = data.convert(
        source,
        DatasetFormat.JSONL,
        tmp_path / "out.txt",
        DatasetFormat.TEXT,
        steps=[
            {"type": "filter", "condition": "length > 3"},
            {"type": "transform", "operation": "normalize_whitespace"},
            {"type": "transform", "operation": "lowercase"},
            {"type": "transform", "operation": "deduplicate"},
        ],
    )
    assert (tmp_path / "out.txt").read_text() == "hello world\n"
    assert [(r.kept, r.dropped, r.added) for r in results] == [
        (2, 1, 0),
        (2, 0, 0),
        (2, 0, 0),
        (1, 1, 0),
    ]


def test_text_output_refuses_prompt_completion(tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps(ROWS[0]) + "\n")
    with pytest.raises(InvalidDataset, match="TEXT holds plain text only"):
        data.convert(source, "JSONL", tmp_path / "o.txt", "TEXT")
    with pytest.raises(InvalidConfig, match="cannot be converted"):
        data.convert(source, "JSONL", tmp_path / "o.parquet", "PARQUET")


def test_split_is_seeded_and_disjoint():
    records = [Record(i, {"text": str(i)}) for i in range(1, 21)]
    train, evaluation = data.split_records(records, 0.2, seed=3)
    again = data.split_records(records, 0.2, seed=3)
    assert (train, evaluation) == again
    assert len(evaluation) == 4 and len(train) == 16
    assert {r.row for r in train}.isdisjoint({r.row for r in evaluation})
    assert data.split_records(records, 0.0, seed=3) == (records, [])
