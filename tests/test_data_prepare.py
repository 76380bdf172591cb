"""Data preparation: stratified leak-free splits, class weights, content addressing, warnings, tokenization."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import REPO, shared_data, toy_rows, write_csv

from tasks.config_loading import load_config
from tasks.data.prepare import prepare_dataset
from tasks.data.sources import load_split


def _cfg(workspace, source, *sets):
    cfg = load_config(None, [f"workspace={workspace}", *sets])
    cfg.data.source = source if isinstance(source, dict) else str(source)
    return cfg


def _manifest(result):
    return json.loads((Path(result.path) / "manifest.json").read_text())


def test_cli_prepares_sms_spam_stratified_with_balanced_weights_and_reuses(tmp_path):
    src = shared_data("sms_spam", "train.csv")
    ws = tmp_path / "ws"
    cmd = [
        str(REPO / ".venv" / "bin" / "finetune"),
        "data",
        "prepare",
        "configs/demo.yaml",
        "--set",
        f"data.source={src}",
        "--set",
        f"workspace={ws}",
    ]
    if not Path(cmd[0]).exists():
        cmd[:1] = [sys.executable, "-m", "tasks.cli"]
    first = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    (folder,) = (ws / "datasets").iterdir()
    m = json.loads((folder / "manifest.json").read_text())
    mtime = (folder / "manifest.json").stat().st_mtime_ns

    source = pd.read_csv(src)
    src_share = (source["label"] == "spam").mean()
    for split, info in m["splits"].items():
        share = info["label_counts"]["spam"] / info["rows"]
        assert abs(share - src_share) < 0.01, (split, share, src_share)
    assert sum(i["rows"] for i in m["splits"].values()) == len(source)
    counts = m["splits"]["train"]["label_counts"]
    n = m["splits"]["train"]["rows"]
    for label, c in counts.items():
        assert m["class_weights"][label] == pytest.approx(n / (2 * c), rel=1e-12)
    assert m["sources"] == {str(src): m["sources"][str(src)]} and len(m["sources"][str(src)]) == 64
    assert m["fingerprint"] == folder.name and m["task"] == "single_label" and m["labels"] == ["ham", "spam"]

    second = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0 and "reused" in second.stdout
    assert m["fingerprint"] in second.stdout
    assert (folder / "manifest.json").stat().st_mtime_ns == mtime  # no work the second time
    assert len(list((ws / "datasets").iterdir())) == 1


def test_one_changed_byte_gives_a_new_fingerprint(workspace, tmp_path):
    path = write_csv(tmp_path / "d.csv", toy_rows(60))
    a = prepare_dataset(_cfg(workspace, path))
    data = path.read_bytes()
    path.write_bytes(data.replace(b"great", b"Great", 1))
    b = prepare_dataset(_cfg(workspace, path))
    c = prepare_dataset(_cfg(workspace, path, "data.split.seed=7"))
    assert len({a.fingerprint, b.fingerprint, c.fingerprint}) == 3
    # the same bytes under another name are the same dataset: content, not path
    copy = tmp_path / "elsewhere.csv"
    copy.write_bytes(path.read_bytes())
    assert prepare_dataset(_cfg(workspace, copy)).fingerprint == b.fingerprint


def test_splits_are_seeded_and_keep_duplicates_in_one_split(workspace, tmp_path):
    rows = toy_rows(90)
    rows += [dict(r) for r in rows[:20]] * 2  # 40 exact duplicates
    path = write_csv(tmp_path / "d.csv", rows)
    r = prepare_dataset(_cfg(workspace, path))
    texts = {s: set(load_split(r.path, s)["text"]) for s in ("train", "validation", "test")}
    assert not (texts["train"] & texts["test"]) and not (texts["train"] & texts["validation"])
    assert not (texts["validation"] & texts["test"])
    m = _manifest(r)
    assert any("40 exact duplicate" in w for w in m["warnings"])
    again = prepare_dataset(_cfg(tmp_path / "ws2", path))
    for s in ("train", "validation", "test"):
        assert load_split(again.path, s)["id"].tolist() == load_split(r.path, s)["id"].tolist()


def test_provided_splits_are_kept_and_leaked_train_rows_are_dropped(workspace, tmp_path):
    train_rows = toy_rows(60)
    test_rows = toy_rows(15, seed=3) + [train_rows[0]]
    train = write_csv(tmp_path / "train.csv", train_rows)
    test = write_csv(tmp_path / "test.csv", test_rows)
    r = prepare_dataset(_cfg(workspace, {"train": str(train), "test": str(test)}))
    m = _manifest(r)
    assert m["splits"]["test"]["rows"] == len(test_rows)
    assert (
        m["splits"]["train"]["rows"] + m["splits"]["validation"]["rows"] == len(train_rows) - 1
    )  # data.on_leakage=drop
    assert any(w.startswith("leakage: dropped 1 train row whose text is also in test") for w in m["warnings"])
    assert any("validation carved out of train" in n for n in m["notes"])


def test_folder_source_with_split_files_and_parquet(workspace, tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    pd.DataFrame(toy_rows(60)).to_parquet(folder / "train.parquet")
    write_csv(folder / "dev.csv", toy_rows(12, seed=5))
    r = prepare_dataset(_cfg(workspace, folder))
    m = _manifest(r)
    assert m["splits"]["validation"]["rows"] == 12
    assert set(m["sources"]) == {str(folder / "train.parquet"), str(folder / "dev.csv")}


def test_saved_datasets_folder_source(workspace, tmp_path):
    import datasets

    dd = datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(toy_rows(60)), "test": datasets.Dataset.from_list(toy_rows(12, seed=9))}
    )
    dd.save_to_disk(str(tmp_path / "saved"))
    m = _manifest(prepare_dataset(_cfg(workspace, tmp_path / "saved")))
    assert m["splits"]["test"]["rows"] == 12 and m["labels"] == ["neg", "neu", "pos"]


def test_imbalance_warning_and_no_word_count_truncation_estimate(workspace, tmp_path):
    rows = [{"text": f"common message number {i}", "label": "common"} for i in range(400)]
    rows += [{"text": f"rare message {i}", "label": "rare"} for i in range(3)]
    rows += [{"text": " ".join(["word"] * 300) + f" {i}", "label": "common"} for i in range(10)]
    m = _manifest(prepare_dataset(_cfg(workspace, write_csv(tmp_path / "d.csv", rows))))
    assert any(w.startswith("extreme imbalance") and "'rare'" in w for w in m["warnings"])
    assert not any("tokens" in w for w in m["warnings"])  # truncation is counted in tokens, in tokenized.json


def test_effective_number_and_no_weights(workspace, tmp_path):
    rows = toy_rows(60) + [{"text": f"extra pos {i}", "label": "pos"} for i in range(60)]
    path = write_csv(tmp_path / "d.csv", rows)
    beta = 0.99
    m = _manifest(
        prepare_dataset(
            _cfg(workspace, path, "data.class_weighting=effective_number", f"data.effective_number_beta={beta}")
        )
    )
    counts = m["splits"]["train"]["label_counts"]
    raw = {k: (1 - beta) / (1 - beta**c) for k, c in counts.items()}
    scale = len(raw) / sum(raw.values())
    for k in raw:
        assert m["class_weights"][k] == pytest.approx(raw[k] * scale)
    assert m["class_weights"]["pos"] < m["class_weights"]["neg"]
    none = _manifest(prepare_dataset(_cfg(workspace, path, "data.class_weighting=none")))
    assert set(none["class_weights"].values()) == {1.0}


def test_multilabel_goemotions(workspace):
    src = {
        "train": str(shared_data("goemotions", "train.jsonl")),
        "test": str(shared_data("goemotions", "validation.jsonl")),
    }
    r = prepare_dataset(_cfg(workspace, src, "data.label_column=labels"))
    m = _manifest(r)
    assert m["task"] == "multi_label" and len(m["labels"]) == 28
    train = load_split(r.path, "train")
    y = np.stack(train["label"].to_numpy())
    assert y.shape[1] == 28 and set(np.unique(y)) <= {0.0, 1.0}
    for i, name in enumerate(m["labels"]):
        pos = y[:, i].sum()
        assert m["splits"]["train"]["label_counts"][name] == pos
        assert m["class_weights"][name] == pytest.approx((len(y) - pos) / pos)
    # label-combination stratification keeps the neutral share close between train and validation
    val = np.stack(load_split(r.path, "validation")["label"].to_numpy())
    k = m["labels"].index("neutral")
    assert abs(y[:, k].mean() - val[:, k].mean()) < 0.03


def test_multilabel_with_delimiter(workspace, tmp_path):
    rows = [{"text": f"t {i}", "label": ["a", "b", "a,b", "c"][i % 4]} for i in range(80)]
    r = prepare_dataset(_cfg(workspace, write_csv(tmp_path / "d.csv", rows), "data.label_delimiter=,"))
    m = _manifest(r)
    assert m["task"] == "multi_label" and m["labels"] == ["a", "b", "c"]
    total = {k: sum(s["label_counts"][k] for s in m["splits"].values()) for k in m["labels"]}
    assert total == {"a": 40, "b": 40, "c": 20}


def test_regression_is_detected_and_binned(workspace, tmp_path):
    rng = np.random.default_rng(0)
    rows = [{"text": f"review {i}", "label": f"{v:.3f}"} for i, v in enumerate(rng.normal(3, 1, 200))]
    r = prepare_dataset(_cfg(workspace, write_csv(tmp_path / "d.csv", rows), "data.class_weighting=none"))
    m = _manifest(r)
    assert m["task"] == "regression" and m["labels"] == [] and m["class_weights"] == {}
    means = [m["target_stats"][s]["mean"] for s in ("train", "validation", "test")]
    assert max(means) - min(means) < 0.4  # binned stratification keeps the target distribution
    assert load_split(r.path, "train")["label"].dtype == np.float32


def test_max_rows_subsamples_the_train_pool(workspace, tmp_path):
    r = prepare_dataset(_cfg(workspace, write_csv(tmp_path / "d.csv", toy_rows(300)), "data.max_rows=90"))
    assert sum(r.rows.values()) == 90


def test_failed_run_leaves_no_temporary_folders(workspace, tmp_path, monkeypatch):
    import tasks.data.prepare as data

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(data, "data_report", boom)
    with pytest.raises(OSError):
        prepare_dataset(_cfg(workspace, write_csv(tmp_path / "d.csv", toy_rows(60))))
    assert list((workspace / "datasets").iterdir()) == []


def test_tokenization_is_keyed_and_reused(workspace, tmp_path, tiny_bert):
    from tasks.data.tokenize import tokenize_dataset

    rows = toy_rows(60) + [{"text": " ".join(["great"] * 100), "label": "pos"}]
    cfg = _cfg(workspace, write_csv(tmp_path / "d.csv", rows), "data.max_length=32")
    r = prepare_dataset(cfg)
    t1 = tokenize_dataset(r.path, str(tiny_bert), cfg)
    t2 = tokenize_dataset(r.path, str(tiny_bert), cfg)
    assert t2.reused and t2.path == t1.path
    import datasets

    ds = datasets.load_from_disk(str(Path(t1.path) / "train"))
    assert max(ds["length"]) <= 32 and {"input_ids", "attention_mask", "labels", "length", "id"} <= set(ds.column_names)
    assert sum(t1.truncated_share.values()) > 0
    cfg64 = _cfg(workspace, cfg.data.source, "data.max_length=64")
    r64 = prepare_dataset(cfg64)  # max_length is a data setting: new dataset fingerprint as well
    assert tokenize_dataset(r64.path, str(tiny_bert), cfg64).key != t1.key


def test_demo_data_is_valid_and_imbalanced(workspace):
    cfg = load_config(REPO / "configs" / "demo.yaml", [f"workspace={workspace}"])
    cfg.data.source = str(REPO / cfg.data.source)
    m = _manifest(prepare_dataset(cfg))
    counts = {k: sum(s["label_counts"][k] for s in m["splits"].values()) for k in m["labels"]}
    assert sum(counts.values()) >= 400 and len(counts) >= 4
    assert max(counts.values()) >= 3 * min(counts.values())


def test_every_split_is_stratified(workspace, tmp_path):
    """Validation and test both keep the class proportions (a 50/50/50 pool gives 5/5/5 per split)."""
    r = prepare_dataset(_cfg(workspace, write_csv(tmp_path / "d.csv", toy_rows(150))))
    m = _manifest(r)
    for split in ("validation", "test"):
        assert sorted(m["splits"][split]["label_counts"].values()) == [5, 5, 5], (split, m["splits"][split])
