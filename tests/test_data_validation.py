"""One test per validation rule: each error names the file, the column, the rows and the fix,
every problem is reported at once, and nothing is written when the data is bad."""

from __future__ import annotations

import json
import re

import pytest
from conftest import toy_rows, write_csv

from tasks.config_loading import load_config
from tasks.data.prepare import prepare_dataset
from tasks.data.sources import DataError


def _prepare(workspace, source, *sets):
    src = source if isinstance(source, dict) else str(source)
    overrides = [f"workspace={workspace}", *sets]
    cfg = load_config(None, overrides)
    cfg.data.source = src
    return prepare_dataset(cfg)


def _error(workspace, source, *sets) -> str:
    with pytest.raises(DataError) as info:
        _prepare(workspace, source, *sets)
    assert not (workspace / "datasets").exists() or not any((workspace / "datasets").iterdir()), (
        "bad data wrote something"
    )
    return str(info.value)


def test_missing_file_names_the_path_and_the_fix(workspace, tmp_path):
    msg = _error(workspace, tmp_path / "nope.csv")
    assert "nope.csv does not exist" in msg and "fix:" in msg


def test_missing_split_file_in_a_mapping(workspace, tmp_path):
    train = write_csv(tmp_path / "train.csv", toy_rows(30))
    msg = _error(workspace, {"train": str(train), "test": str(tmp_path / "test.csv")})
    assert "data.source.test" in msg and "test.csv does not exist" in msg


def test_missing_column_lists_the_columns_and_the_setting(workspace, tmp_path):
    path = write_csv(tmp_path / "d.csv", [{"sentence": r["text"], "label": r["label"]} for r in toy_rows(30)])
    msg = _error(workspace, path)
    assert "d.csv: no column 'text'" in msg and "sentence" in msg and "data.text_column" in msg


def test_wrong_delimiter_is_recognised(workspace, tmp_path):
    path = tmp_path / "semi.csv"
    path.write_text("text;label\n" + "".join(f"{r['text']};{r['label']}\n" for r in toy_rows(30)))
    msg = _error(workspace, path)
    assert "delimiter" in msg and "semi.csv" in msg


@pytest.mark.parametrize("content, needle", [("", "is empty"), ("text,label\n", "no data rows")])
def test_empty_dataset(workspace, tmp_path, content, needle):
    path = tmp_path / "empty.csv"
    path.write_text(content)
    msg = _error(workspace, path)
    assert "empty.csv" in msg and needle in msg


def test_empty_texts_are_reported_with_their_rows(workspace, tmp_path):
    rows = toy_rows(30)
    rows[4]["text"] = ""
    rows[11]["text"] = "   "
    path = write_csv(tmp_path / "d.csv", rows)
    msg = _error(workspace, path)
    assert re.search(r"d\.csv rows 5, 12, column 'text': empty or missing text", msg), msg


def test_missing_labels_are_reported_with_their_rows(workspace, tmp_path):
    rows = toy_rows(30)
    rows[7]["label"] = ""
    msg = _error(workspace, write_csv(tmp_path / "d.csv", rows))
    assert "d.csv row 8, column 'label': missing label" in msg


def test_all_problems_are_reported_together(workspace, tmp_path):
    rows = toy_rows(30)
    rows[0]["text"] = ""
    rows[1]["label"] = ""
    msg = _error(workspace, write_csv(tmp_path / "d.csv", rows))
    assert "2 problems" in msg and "row 1, column 'text'" in msg and "row 2, column 'label'" in msg


def test_single_class(workspace, tmp_path):
    rows = [{"text": f"message {i}", "label": "ham"} for i in range(20)]
    msg = _error(workspace, write_csv(tmp_path / "d.csv", rows))
    assert "single class ('ham')" in msg and "d.csv" in msg and "at least two classes" in msg


def test_non_numeric_regression_targets(workspace, tmp_path):
    rows = [{"text": f"item {i}", "label": str(i / 10)} for i in range(30)]
    rows[3]["label"] = "high"
    msg = _error(workspace, write_csv(tmp_path / "d.csv", rows), "data.task=regression", "data.class_weighting=none")
    assert "d.csv row 4, column 'label': not a number" in msg


def test_labels_in_test_never_seen_in_train(workspace, tmp_path):
    train = write_csv(tmp_path / "train.csv", toy_rows(30, classes=("pos", "neg")))
    test_rows = toy_rows(6, classes=("pos", "neg", "neu"), seed=1)
    test = write_csv(tmp_path / "test.csv", test_rows)
    msg = _error(workspace, {"train": str(train), "test": str(test)})
    assert "test.csv rows 3, 6, column 'label': label 'neu' occurs in test but never in train" in msg


def test_class_too_small_to_stratify(workspace, tmp_path):
    rows = toy_rows(30) + [{"text": "a rare one", "label": "rare"}, {"text": "another rare one", "label": "rare"}]
    msg = _error(workspace, write_csv(tmp_path / "d.csv", rows))
    assert "d.csv rows 31, 32, column 'label': class 'rare' has 2 distinct texts" in msg
    assert "needs at least 3" in msg and "fix:" in msg


def test_mixed_label_types(workspace, tmp_path):
    path = tmp_path / "d.jsonl"
    rows = [{"text": r["text"], "label": r["label"]} for r in toy_rows(30)]
    rows[2]["label"] = 3
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    msg = _error(workspace, path)
    assert "mixes numbers (3) and names" in msg and "d.jsonl row 3" in msg


def test_non_utf8_bytes(workspace, tmp_path):
    path = tmp_path / "latin.csv"
    path.write_bytes("text,label\ncaf\xe9 ok,pos\n".encode("latin-1"))
    msg = _error(workspace, path)
    assert "latin.csv: not valid UTF-8" in msg and "re-save" in msg


def test_invalid_json_lines_name_the_line(workspace, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a", "label": "x"}\n{"text": oops}\n')
    msg = _error(workspace, path)
    assert "d.jsonl: invalid JSON lines: line 2" in msg


def test_unsupported_file_type(workspace, tmp_path):
    path = tmp_path / "d.xlsx"
    path.write_bytes(b"PK")
    assert "unsupported file type '.xlsx'" in _error(workspace, path)


def test_multilabel_value_that_is_not_a_list(workspace, tmp_path):
    path = tmp_path / "d.jsonl"
    rows = [{"text": f"t {i}", "labels": ["a", "b"][: 1 + i % 2]} for i in range(30)]
    rows[5]["labels"] = "a"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    msg = _error(workspace, path, "data.label_column=labels")
    assert "d.jsonl row 6, column 'labels': not a list of labels" in msg
