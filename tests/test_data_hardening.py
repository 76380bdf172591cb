"""The data stage against the outside review's findings [2-2]: label normalisation, structured texts, split folders,
odd files and headers, token-counted truncation, one-round validation, named leakage and verified reuse."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pytest
from conftest import toy_rows, write_csv

from tasks.config_loading import load_config
from tasks.data.prepare import prepare_dataset
from tasks.data.sources import DataError, load_split
from tasks.workspace import WorkspaceError


def _cfg(workspace, source, *sets):
    cfg = load_config(None, [f"workspace={workspace}", *sets])
    cfg.data.source = source if isinstance(source, dict) else str(source)
    return cfg


def _manifest(result) -> dict:
    return json.loads((Path(result.path) / "manifest.json").read_text())


def _error(workspace, source, *sets) -> str:
    with pytest.raises(DataError) as info:
        prepare_dataset(_cfg(workspace, source, *sets))
    datasets = workspace / "datasets"
    assert not datasets.exists() or not any(datasets.iterdir()), "bad data wrote something"
    return str(info.value)


def _split_sources(tmp_path, train_rows, test_rows, validation_rows=None) -> dict[str, str]:
    src = {
        "train": str(write_csv(tmp_path / "train.csv", train_rows)),
        "test": str(write_csv(tmp_path / "test.csv", test_rows)),
    }
    if validation_rows is not None:
        src["validation"] = str(write_csv(tmp_path / "validation.csv", validation_rows))
    return src


# ---- 9: labels -----------------------------------------------------------------------------------------------------


def test_numeric_labels_equal_as_numbers_are_one_class(workspace, tmp_path):
    rows = [{"text": f"text number {i}", "label": ["0", "1", "0.0", "1.0"][i % 4]} for i in range(40)]
    r = prepare_dataset(_cfg(workspace, write_csv(tmp_path / "d.csv", rows)))
    m = _manifest(r)
    assert m["task"] == "single_label" and m["labels"] == ["0", "1"]
    assert {k: sum(s["label_counts"][k] for s in m["splits"].values()) for k in m["labels"]} == {"0": 20, "1": 20}


def test_labels_differing_in_case_or_whitespace_are_warned(workspace, tmp_path):
    rows = toy_rows(60, classes=("pos", "neg"))
    for r in rows[:8]:
        r["label"] = {"pos": "Pos", "neg": " neg"}[r["label"]]
    r = prepare_dataset(_cfg(workspace, write_csv(tmp_path / "d.csv", rows)))
    m = _manifest(r)
    assert m["labels"] == ["Pos", "neg", "pos"]  # case differs: kept apart, but said
    case = [w for w in m["warnings"] if "differ only in case" in w]
    assert case and "'Pos'" in case[0] and "'pos'" in case[0] and "d.csv" in case[0], m["warnings"]
    space = [w for w in m["warnings"] if "surrounding whitespace" in w]
    assert space and "' neg'" in space[0] and "'neg'" in space[0], m["warnings"]
    report = (Path(r.path) / "report.md").read_text()
    assert "differ only in case" in report and "surrounding whitespace" in report


# ---- 10: structured text -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [{"a": "b"}, ["x", "y"]])
def test_structured_values_in_a_parquet_text_column_are_an_error(workspace, tmp_path, value):
    rows = toy_rows(30)
    frame = pd.DataFrame({"text": [value] * 30, "label": [r["label"] for r in rows]})
    frame.to_parquet(tmp_path / "d.parquet")
    msg = _error(workspace, tmp_path / "d.parquet")
    assert "d.parquet rows 1, 2, 3" in msg and "column 'text'" in msg and "not text" in msg and "fix:" in msg


# ---- 11: split folders ---------------------------------------------------------------------------------------------


def test_unknown_file_next_to_split_files_is_an_error(workspace, tmp_path):
    folder = tmp_path / "data"
    write_csv(folder / "train.csv", toy_rows(60))
    write_csv(folder / "test.csv", toy_rows(15, seed=2))
    write_csv(folder / "notes.csv", toy_rows(15, seed=3))
    msg = _error(workspace, folder)
    assert "notes.csv" in msg and "train/training" in msg and "validation/valid/val/dev" in msg
    assert "test/testing" in msg and "fix:" in msg


def test_two_files_for_one_split_are_an_error(workspace, tmp_path):
    folder = tmp_path / "data"
    write_csv(folder / "train.csv", toy_rows(60))
    write_csv(folder / "training.csv", toy_rows(30, seed=4))
    write_csv(folder / "test.csv", toy_rows(15, seed=2))
    msg = _error(workspace, folder)
    assert "train.csv" in msg and "training.csv" in msg and "both" in msg


def test_folder_without_split_names_stays_a_pool(workspace, tmp_path):
    folder = tmp_path / "data"
    write_csv(folder / "part1.csv", toy_rows(45))
    write_csv(folder / "part2.csv", toy_rows(45, seed=7))
    m = _manifest(prepare_dataset(_cfg(workspace, folder)))
    assert sum(s["rows"] for s in m["splits"].values()) == 90
    assert any("validation, test carved out of the data" in n for n in m["notes"])


# ---- 12: headers, NUL bytes, FIFOs and devices, truncation in tokens -----------------------------------------------


def test_duplicated_header_column_is_an_error(workspace, tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("text,label,label\n" + "".join(f"{r['text']},{r['label']},x\n" for r in toy_rows(30)))
    msg = _error(workspace, path)
    assert "d.csv" in msg and "column 'label'" in msg and "twice" in msg and "fix:" in msg


def test_nul_bytes_in_texts_are_an_error(workspace, tmp_path):
    rows = toy_rows(30)
    rows[3]["text"] = "hel\x00lo"
    msg = _error(workspace, write_csv(tmp_path / "d.csv", rows))
    assert "d.csv row 4, column 'text'" in msg and "NUL" in msg and "fix:" in msg


def _fifo(tmp_path) -> Path:
    path = tmp_path / "pipe.csv"
    os.mkfifo(path)
    return path


@pytest.mark.parametrize("make", [lambda tmp: Path("/dev/null"), lambda tmp: Path("/dev/zero"), _fifo])
def test_fifo_or_device_source_is_refused_without_opening_it(workspace, tmp_path, make):
    path = make(tmp_path)
    if not path.exists():
        pytest.skip(f"{path} is absent here")
    for source in (path, {"train": str(path)}):
        msg = _error(workspace, source)
        assert str(path) in msg and "not a regular file" in msg and "fix:" in msg
        assert len(msg.splitlines()) == 2  # the header line and one problem


def test_fifo_inside_a_source_folder_is_refused(workspace, tmp_path):
    folder = tmp_path / "data"
    write_csv(folder / "train.csv", toy_rows(60))
    os.mkfifo(folder / "test.csv")
    msg = _error(workspace, folder)
    assert "test.csv" in msg and "not a regular file" in msg


def test_truncation_is_counted_in_tokens_and_written_to_tokenized_json(workspace, tmp_path, tiny_bert):
    from tasks.data.tokenize import tokenize_dataset

    rows = toy_rows(60)
    long = ",".join(str(i % 10) for i in range(50_000))  # 100,000 characters, no space: one "word"
    rows += [{"text": long + f"!{i}", "label": "pos"} for i in range(6)]
    cfg = _cfg(workspace, write_csv(tmp_path / "d.csv", rows), "data.max_length=32")
    r = prepare_dataset(cfg)
    assert not any("token" in w for w in _manifest(r)["warnings"])  # no word-based estimate in the manifest
    t = tokenize_dataset(r.path, str(tiny_bert), cfg)
    info = json.loads((Path(t.path) / "tokenized.json").read_text())
    long_rows = {
        s: int(load_split(r.path, s)["text"].str.len().gt(1000).sum()) for s in ("train", "validation", "test")
    }
    assert sum(long_rows.values()) == 6
    warned = " ".join(info["warnings"])
    for split, n in long_rows.items():
        if n:
            assert f"{split}: {n} of " in warned, info["warnings"]
    assert "data.max_length" in warned and "32" in warned
    assert t.warnings == info["warnings"]


# ---- 14: one round -------------------------------------------------------------------------------------------------


def test_every_problem_is_reported_in_one_round(workspace, tmp_path):
    train_rows = toy_rows(30, classes=("pos", "neg"))
    train_rows[0]["text"] = ""
    train_rows[1]["label"] = ""
    test_rows = toy_rows(6, classes=("pos", "neg", "neu"), seed=1)
    msg = _error(workspace, _split_sources(tmp_path, train_rows, test_rows))
    assert "3 problems" in msg, msg
    assert "train.csv row 1, column 'text': empty or missing text" in msg
    assert "train.csv row 2, column 'label': missing label" in msg
    assert "label 'neu' occurs in test but never in train" in msg


def test_a_missing_column_in_one_file_and_a_problem_in_another_are_reported_together(workspace, tmp_path):
    train_rows = toy_rows(30)
    train_rows[4]["text"] = ""
    test_rows = [{"sentence": r["text"], "label": r["label"]} for r in toy_rows(9, seed=1)]
    msg = _error(workspace, _split_sources(tmp_path, train_rows, test_rows))
    assert "test.csv: no column 'text'" in msg and "train.csv row 5, column 'text': empty or missing text" in msg


def test_unreadable_file_and_problem_in_another_file_together(workspace, tmp_path):
    train_rows = toy_rows(30)
    train_rows[4]["label"] = ""
    src = _split_sources(tmp_path, train_rows, toy_rows(9, seed=1))
    Path(src["test"]).write_bytes("text,label\ncaf\xe9,pos\n".encode("latin-1"))
    msg = _error(workspace, src)
    assert "test.csv: not valid UTF-8" in msg and "train.csv row 5, column 'label': missing label" in msg


def test_too_small_class_is_reported_with_other_problems(workspace, tmp_path):
    rows = toy_rows(30) + [{"text": "a rare one", "label": "rare"}, {"text": "another rare one", "label": "rare"}]
    rows[0]["text"] = ""
    msg = _error(workspace, write_csv(tmp_path / "d.csv", rows))
    assert "row 1, column 'text': empty or missing text" in msg and "class 'rare' has 2 distinct texts" in msg


# ---- 15: leakage named, and data.on_leakage ------------------------------------------------------------------------


def _leaky(tmp_path, n_leaks=2):
    train_rows = toy_rows(60)
    test_rows = toy_rows(15, seed=3)
    test_rows.append(dict(train_rows[0]))  # exact
    test_rows.append({"text": "  " + train_rows[1]["text"].upper().replace(" ", "   ") + " ", "label": "neg"})  # near
    test_rows += [dict(r) for r in train_rows[10 : 10 + n_leaks - 2]]
    return _split_sources(tmp_path, train_rows, test_rows), train_rows, test_rows


def test_leaked_rows_are_dropped_from_train_by_default_and_named(workspace, tmp_path):
    src, train_rows, test_rows = _leaky(tmp_path)
    r = prepare_dataset(_cfg(workspace, src))
    m = _manifest(r)
    assert m["splits"]["test"]["rows"] == len(test_rows)
    assert m["splits"]["train"]["rows"] + m["splits"]["validation"]["rows"] == len(train_rows) - 2
    kept = set().union(*(set(load_split(r.path, s)["text"]) for s in ("train", "validation")))
    assert train_rows[0]["text"] not in kept and train_rows[1]["text"] not in kept
    assert m["leakage"]["policy"] == "drop" and m["leakage"]["dropped_train_rows"] == 2
    assert m["leakage"]["pairs"]["train/test"] == 2
    warning = next(w for w in m["warnings"] if w.startswith("leakage"))
    assert "train.csv row 1" in warning and "train.csv row 2" in warning and "test.csv row 16" in warning
    assert train_rows[0]["text"][:20] in warning and "dropped" in warning
    report = (Path(r.path) / "report.md").read_text()
    assert "dropped 2 train row" in report


def test_leakage_warn_keeps_the_rows_and_lists_them(workspace, tmp_path):
    src, train_rows, _ = _leaky(tmp_path, n_leaks=14)
    m = _manifest(prepare_dataset(_cfg(workspace, src, "data.on_leakage=warn")))
    assert m["splits"]["train"]["rows"] + m["splits"]["validation"]["rows"] == len(train_rows)
    warning = next(w for w in m["warnings"] if w.startswith("leakage"))
    assert "14 train row" in warning and "+4 more" in warning and m["leakage"]["dropped_train_rows"] == 0


def test_leakage_error_lists_the_rows(workspace, tmp_path):
    src, train_rows, _ = _leaky(tmp_path)
    msg = _error(workspace, src, "data.on_leakage=error")
    assert "train.csv row 1" in msg and "test.csv row 16" in msg and "data.on_leakage" in msg and "fix:" in msg


def test_leakage_between_validation_and_test_is_warned(workspace, tmp_path):
    test_rows = toy_rows(15, seed=3)
    val_rows = toy_rows(15, seed=5) + [dict(test_rows[2])]
    src = _split_sources(tmp_path, toy_rows(60), test_rows, val_rows)
    m = _manifest(prepare_dataset(_cfg(workspace, src)))
    warning = next(w for w in m["warnings"] if "validation" in w and "test" in w and w.startswith("leakage"))
    assert "validation.csv row 16" in warning and "test.csv row 3" in warning
    assert m["splits"]["validation"]["rows"] == 16 and m["splits"]["test"]["rows"] == 15


# ---- 8: reusing a prepared folder ----------------------------------------------------------------------------------


def _prepared(workspace, tmp_path):
    cfg = _cfg(workspace, write_csv(tmp_path / "d.csv", toy_rows(60)))
    return cfg, prepare_dataset(cfg)


def test_truncated_manifest_is_an_error_naming_the_file(workspace, tmp_path):
    cfg, r = _prepared(workspace, tmp_path)
    manifest = Path(r.path) / "manifest.json"
    manifest.write_text(manifest.read_text()[:40])
    with pytest.raises(WorkspaceError) as info:
        prepare_dataset(cfg)
    assert str(manifest) in str(info.value) and "fix:" in str(info.value)


def test_manifest_edited_to_another_task_is_not_reused(workspace, tmp_path):
    cfg, r = _prepared(workspace, tmp_path)
    manifest = Path(r.path) / "manifest.json"
    m = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**m, "task": "regression"}))
    with pytest.raises(WorkspaceError) as info:
        prepare_dataset(cfg)
    assert str(manifest) in str(info.value) and "fix:" in str(info.value)


def test_manifest_of_another_fingerprint_is_not_reused(workspace, tmp_path):
    cfg, r = _prepared(workspace, tmp_path)
    manifest = Path(r.path) / "manifest.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "fingerprint": "0" * 20}))
    with pytest.raises(WorkspaceError) as info:
        prepare_dataset(cfg)
    assert "fingerprint" in str(info.value) and str(manifest) in str(info.value)


def test_intact_prepared_folder_is_reused(workspace, tmp_path):
    cfg, r = _prepared(workspace, tmp_path)
    again = prepare_dataset(cfg)
    assert again.reused and again.fingerprint == r.fingerprint and again.labels == r.labels


def test_prepared_folder_without_its_manifest_is_an_error(workspace, tmp_path):
    cfg, r = _prepared(workspace, tmp_path)
    (Path(r.path) / "manifest.json").unlink()
    with pytest.raises(WorkspaceError) as info:
        prepare_dataset(cfg)
    assert "manifest.json does not exist" in str(info.value) and f"delete {r.path}" in str(info.value)
