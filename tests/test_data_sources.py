"""Reading records from every supported source, with their file:line / index locations."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunelab.data.sources import DataStats, Location, read_source
from tunelab.errors import DataError


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_jsonl_records_keep_their_line_and_blank_lines_are_ignored(tmp_path):
    path = write(tmp_path / "d.jsonl", '{"text": "a"}\n\n{"text": "b"}\n"bare string"\n')
    records = read_source(path)
    assert [r.data for r in records] == [{"text": "a"}, {"text": "b"}, {"text": "bare string"}]
    assert [str(r.source) for r in records] == [f"{path}:1", f"{path}:3", f"{path}:4"]


def test_json_array_items_get_the_line_they_start_on(tmp_path):
    path = write(tmp_path / "d.json", '[\n  {"text": "a"},\n\n  {"text": "b",\n   "x": [1, 2]}\n]\n')
    records = read_source(path)
    assert [r.data["text"] for r in records] == ["a", "b"]
    assert [r.source.line for r in records] == [2, 4]


def test_json_object_holding_one_list(tmp_path):
    path = write(tmp_path / "d.json", '{"version": "1.0",\n "data": [\n  {"question": "q1", "answer": "a1"},\n  {"question": "q2", "answer": "a2"}\n ]\n}')
    records = read_source(path)
    assert [r.data["question"] for r in records] == ["q1", "q2"]
    assert [r.source.line for r in records] == [3, 4]


def test_json_object_that_is_itself_one_record(tmp_path):
    record = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    path = write(tmp_path / "one.json", json.dumps(record))
    assert [r.data for r in read_source(path)] == [record]


def test_json_object_record_with_a_list_field_is_one_record(tmp_path):
    record = {"question": "q", "answer": "a", "tags": ["math", "easy"]}
    path = write(tmp_path / "one.json", json.dumps(record))
    assert [r.data for r in read_source(path)] == [record]


def test_json_object_with_metadata_and_a_list_of_strings(tmp_path):
    path = write(tmp_path / "d.json", '{"name": "poems",\n "items": [\n  "roses are red",\n  "violets are blue"]}')
    records = read_source(path)
    assert [r.data for r in records] == [{"text": "roses are red"}, {"text": "violets are blue"}]
    assert [r.source.line for r in records] == [3, 4]


def test_json_object_with_several_lists_is_ambiguous(tmp_path):
    path = write(tmp_path / "d.json", '{"train": [{"text": "a"}], "test": [{"text": "b"}]}')
    with pytest.raises(DataError, match=r"d\.json: the JSON object holds several lists \('train', 'test'\)"):
        read_source(path)


def test_txt_paragraphs_and_document_modes(tmp_path):
    path = write(tmp_path / "d.txt", "first para\nline two\n\n\nsecond para\n  \nthird\n")
    paragraphs = read_source(path)
    assert [r.data["text"] for r in paragraphs] == ["first para\nline two", "second para", "third"]
    assert [r.source.line for r in paragraphs] == [1, 5, 7]
    document = read_source(path, text_split="document")
    assert [r.data["text"] for r in document] == ["first para\nline two\n\n\nsecond para\n  \nthird"]


def test_csv_rows_keep_the_line_they_start_on_even_with_multiline_cells(tmp_path):
    path = write(tmp_path / "d.csv", 'instruction,input,output\n"Say hi","","hi"\n"Two\nlines",ctx,out\nlast,,done\n')
    records = read_source(path)
    assert [r.data for r in records] == [
        {"instruction": "Say hi", "input": "", "output": "hi"},
        {"instruction": "Two\nlines", "input": "ctx", "output": "out"},
        {"instruction": "last", "input": "", "output": "done"},
    ]
    assert [r.source.line for r in records] == [2, 3, 5]


def test_parquet_rows_are_located_by_index(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist([{"question": "q0", "answer": "a0"}, {"question": "q1", "answer": "a1"}]), path)
    records = read_source(path)
    assert [r.data for r in records] == [{"question": "q0", "answer": "a0"}, {"question": "q1", "answer": "a1"}]
    assert str(records[1].source) == f"{path}: index 1"
    assert str(records[1].source.error("bad")) == f"{path}: index 1: bad"


def test_dataset_saved_to_disk_and_dataset_dict_split(tmp_path):
    import datasets

    rows = [{"text": "one"}, {"text": "two"}]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    assert [r.data for r in read_source(tmp_path / "ds")] == rows
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(rows), "test": datasets.Dataset.from_list([{"text": "held out"}])}
    ).save_to_disk(str(tmp_path / "dd"))
    test_records = read_source(tmp_path / "dd", split="test")
    assert [r.data for r in test_records] == [{"text": "held out"}]
    assert str(test_records[0].source) == f"{tmp_path / 'dd'}[test]: index 0"
    with pytest.raises(DataError, match="the saved dataset has no split 'validation'; it has: train, test"):
        read_source(tmp_path / "dd", split="validation")


def test_directory_of_files_reads_each_supported_file_once_in_name_order(tmp_path, monkeypatch):
    write(tmp_path / "b.jsonl", '{"text": "from jsonl"}\n')
    write(tmp_path / "a.txt", "from txt\n")
    write(tmp_path / "c.csv", "text\nfrom csv\n")
    write(tmp_path / "notes.md", "ignored")
    write(tmp_path / ".hidden.jsonl", '{"text": "ignored"}\n')
    reads: list[str] = []
    original = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda self: reads.append(self.name) or original(self))
    records = read_source(tmp_path)
    assert [r.data["text"] for r in records] == ["from txt", "from jsonl", "from csv"]
    assert reads == ["a.txt", "b.jsonl", "c.csv"]


def test_hub_dataset_is_loaded_with_config_and_split(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(path, name=None, split=None):
        calls.append((path, name, split))
        return datasets.Dataset.from_list([{"question": "q", "answer": "a"}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    records = read_source("openai/gsm8k", hf_config="main", split="test")
    assert calls == [("openai/gsm8k", "main", "test")]
    assert [r.data for r in records] == [{"question": "q", "answer": "a"}]
    assert str(records[0].source) == "openai/gsm8k[main/test]: index 0"


def test_hub_dataset_that_cannot_be_loaded_gives_one_clear_error(monkeypatch):
    import datasets

    def missing(path, name=None, split=None):
        raise FileNotFoundError(f"Dataset '{path}' doesn't exist on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", missing)
    with pytest.raises(DataError, match=r"cannot load the Hugging Face dataset 'someone/nothing' .*doesn't exist"):
        read_source("someone/nothing")


def test_missing_file_is_not_mistaken_for_a_hub_id(tmp_path):
    with pytest.raises(DataError, match=r"data file not found: .*missing\.jsonl"):
        read_source(tmp_path / "missing.jsonl")


def test_malformed_json_line_names_file_and_line(tmp_path):
    path = write(tmp_path / "data.jsonl", '{"text": "ok"}\n{"text": "bad",}\n')
    with pytest.raises(DataError) as info:
        read_source(path)
    assert str(info.value).startswith(f"{path}:2: invalid JSON: Expecting property name enclosed in double quotes")
    assert (info.value.path, info.value.line) == (str(path), 2)


def test_record_that_is_not_an_object(tmp_path):
    path = write(tmp_path / "data.jsonl", '{"text": "ok"}\n[1, 2]\n')
    with pytest.raises(DataError, match=r"data\.jsonl:2: expected a JSON object with the example's fields, got a list"):
        read_source(path)


def test_malformed_json_document_names_the_line(tmp_path):
    path = write(tmp_path / "data.json", '[\n {"text": "a"},\n {"text": "b"\n]\n')
    with pytest.raises(DataError, match=r"data\.json:4: invalid JSON: Expecting ',' delimiter"):
        read_source(path)


def test_csv_row_with_wrong_width(tmp_path):
    path = write(tmp_path / "data.csv", "text,label\nfine,1\ntoo,many,cells\n")
    with pytest.raises(DataError, match=r"data\.csv:3: the row has 3 fields but the header has 2 \(text, label\)"):
        read_source(path)


def test_invalid_utf8_names_the_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "\xff"}\n')
    with pytest.raises(DataError, match=r"data\.jsonl:2: the file is not valid UTF-8"):
        read_source(path)


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_file_is_an_error(tmp_path, content):
    path = write(tmp_path / "data.jsonl", content)
    with pytest.raises(DataError, match=r"data\.jsonl: no records found; the data is empty"):
        read_source(path)


def test_skip_invalid_skips_and_counts_bad_records(tmp_path):
    path = write(tmp_path / "data.jsonl", '{"text": "a"}\nnot json\n{"text": "b"}\n7\n')
    stats = DataStats()
    records = read_source(path, skip_invalid=True, stats=stats)
    assert [r.data["text"] for r in records] == ["a", "b"]
    assert (stats.read, stats.invalid_skipped) == (2, 2)
    assert stats.problems[0].startswith(f"{path}:2: invalid JSON")
    assert stats.problems[1] == f"{path}:4: expected a JSON object with the example's fields, got a number"


def test_skip_invalid_with_nothing_valid_is_still_an_error(tmp_path):
    path = write(tmp_path / "data.jsonl", "nope\nnope\n")
    with pytest.raises(DataError, match=r"no records found \(2 invalid records skipped\)"):
        read_source(path, skip_invalid=True)


def test_location_formats():
    assert str(Location("f.jsonl", line=3)) == "f.jsonl:3"
    assert str(Location("f.jsonl", line=3).error('field "output" is missing')) == 'f.jsonl:3: field "output" is missing'
