"""New-data detection (tasks/watching.py) and data versions for retraining (tasks/retrain.py).

The watcher runs against real files (a temp folder, fsspec's memory:// filesystem) with a fake clock;
the emitter records what would be sent. The Prefect emission itself is covered in test_deployments.py
(a real server) and test_e2e_trigger.py.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pandas as pd
import pytest
from conftest import toy_rows, write_csv

from tasks.config_loading import validate_config
from tasks.data.sources import DataError
from tasks.data.watching import (
    WatchError,
    WatchState,
    canonical_location,
    check_location,
    default_state_path,
    hash_url,
    load_state,
    poll,
    scan,
)

STABLE = 5.0


class Recorder:
    """The emitter under test: remembers each announcement, returns a fake event id."""

    def __init__(self, fail: bool = False):
        self.sent = []
        self.fail = fail

    def __call__(self, ann):
        if self.fail:
            raise ConnectionError("server down")
        self.sent.append(ann)
        return f"event-{len(self.sent)}"


def _poll(folder, state, rec, now):
    return poll(str(folder), state, dataset="demo", stable_seconds=STABLE, emit=rec, now=now)


def _write(path: Path, data: bytes, mtime: float | None = None) -> Path:
    path.write_bytes(data)
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


def test_new_file_emits_once(tmp_path):
    drop = tmp_path / "drop"
    drop.mkdir()
    f = _write(drop / "new.csv", b"text,label\nhello,a\n", mtime=1000)
    state, rec = WatchState(), Recorder()
    first = _poll(drop, state, rec, now=0)
    assert first.waiting == [str(f)] and rec.sent == []  # seen once: not yet known to be complete
    _poll(drop, state, rec, now=STABLE - 1)
    assert rec.sent == []
    second = _poll(drop, state, rec, now=STABLE)
    assert [a.path for a in second.announced] == [str(f)]
    ann = rec.sent[0]
    assert ann.sha256 == hashlib.sha256(f.read_bytes()).hexdigest()
    assert ann.payload() == {
        "dataset": "demo",
        "path": str(f),
        "sha256": ann.sha256,
        "size": f.stat().st_size,
        "name": "new.csv",
        "location": str(drop),
    }
    for t in (STABLE * 2, STABLE * 3, STABLE * 10):
        _poll(drop, state, rec, now=t)
    assert len(rec.sent) == 1


def test_identical_resave_or_copy_emits_nothing(tmp_path):
    drop = tmp_path / "drop"
    drop.mkdir()
    data = b"text,label\nhello,a\nbye,b\n"
    _write(drop / "a.csv", data, mtime=1000)
    state, rec = WatchState(), Recorder()
    _poll(drop, state, rec, now=0)
    _poll(drop, state, rec, now=STABLE)
    assert len(rec.sent) == 1
    _write(drop / "a.csv", data, mtime=2000)  # re-saved: new time, same bytes
    _write(drop / "copy of a.csv", data, mtime=2000)  # same bytes under another name
    _poll(drop, state, rec, now=100)
    result = _poll(drop, state, rec, now=100 + STABLE)
    assert sorted(Path(u).name for u in result.duplicates) == ["a.csv", "copy of a.csv"]
    assert len(rec.sent) == 1


def test_growing_file_waits_until_stable(tmp_path):
    drop = tmp_path / "drop"
    drop.mkdir()
    f = drop / "big.csv"
    _write(f, b"text,label\n", mtime=1000)
    state, rec = WatchState(), Recorder()
    _poll(drop, state, rec, now=0)
    for i, t in enumerate((4.0, 8.0, 12.0, 16.0)):  # a slow copy: more bytes every 4 s (< the 5 s window)
        with open(f, "ab") as fh:
            fh.write(f"row {i},a\n".encode())
        os.utime(f, (1000 + t, 1000 + t))
        assert _poll(drop, state, rec, now=t).waiting == [str(f)]
        assert rec.sent == []
    assert _poll(drop, state, rec, now=16 + STABLE - 0.5).announced == []
    done = _poll(drop, state, rec, now=16 + STABLE)
    assert len(done.announced) == 1 and rec.sent[0].sha256 == hashlib.sha256(f.read_bytes()).hexdigest()
    assert rec.sent[0].size == f.stat().st_size


def test_changed_file_emits_again(tmp_path):
    drop = tmp_path / "drop"
    drop.mkdir()
    f = _write(drop / "data.csv", b"text,label\nv1,a\n", mtime=1000)
    state, rec = WatchState(), Recorder()
    _poll(drop, state, rec, now=0)
    _poll(drop, state, rec, now=STABLE)
    _write(f, b"text,label\nv1,a\nv2,b\n", mtime=2000)
    _poll(drop, state, rec, now=50)
    _poll(drop, state, rec, now=50 + STABLE)
    assert [a.sha256 for a in rec.sent] == [
        hashlib.sha256(b"text,label\nv1,a\n").hexdigest(),
        hashlib.sha256(f.read_bytes()).hexdigest(),
    ]
    _write(f, b"text,label\nv1,a\n", mtime=3000)  # back to the first content: announced before, not again
    _poll(drop, state, rec, now=100)
    assert _poll(drop, state, rec, now=100 + STABLE).duplicates == [str(f)]
    assert len(rec.sent) == 2


def test_memory_url(tmp_path):
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe("/finetune-test-drop/rows.jsonl", b'{"text": "hi", "label": "a"}\n')
    fs.pipe("/finetune-test-drop/.hidden.csv", b"x")
    fs.pipe("/finetune-test-drop/partial.csv.part", b"x")
    try:
        url = "memory://finetune-test-drop"
        state, rec = WatchState(), Recorder()
        poll(url, state, dataset="demo", stable_seconds=STABLE, emit=rec, now=0)
        poll(url, state, dataset="demo", stable_seconds=STABLE, emit=rec, now=STABLE)
        assert [a.path for a in rec.sent] == ["memory:///finetune-test-drop/rows.jsonl"]
        assert rec.sent[0].sha256 == hashlib.sha256(b'{"text": "hi", "label": "a"}\n').hexdigest()
        assert hash_url(rec.sent[0].path) == rec.sent[0].sha256
        fs.pipe("/finetune-test-drop/rows.jsonl", b'{"text": "hi", "label": "a"}\n')  # rewritten, same bytes
        poll(url, state, dataset="demo", stable_seconds=STABLE, emit=rec, now=20)
        poll(url, state, dataset="demo", stable_seconds=STABLE, emit=rec, now=20 + STABLE)
        assert len(rec.sent) == 1
    finally:
        fs.rm("/finetune-test-drop", recursive=True)


def test_ignores_temp_hidden_and_unsupported_files(tmp_path):
    drop = tmp_path / "drop"
    drop.mkdir()
    for name in (".in-progress.csv", "upload.csv.part", "x.csv.tmp", "~lock.csv", "notes.txt", "model.bin"):
        _write(drop / name, b"data", mtime=1000)
    (drop / "sub").mkdir()
    _write(drop / "sub" / "deep.csv", b"text,label\n", mtime=1000)
    assert scan(str(drop)) == []
    assert [Path(f.url).name for f in scan(str(drop), recursive=True)] == ["deep.csv"]


def test_failed_send_is_retried(tmp_path):
    drop = tmp_path / "drop"
    drop.mkdir()
    _write(drop / "a.csv", b"text,label\nx,a\n", mtime=1000)
    state = WatchState()
    _poll(drop, state, Recorder(), now=0)
    with pytest.raises(ConnectionError):
        _poll(drop, state, Recorder(fail=True), now=STABLE)
    assert state.announced == {}
    rec = Recorder()
    _poll(drop, state, rec, now=STABLE + 1)
    assert len(rec.sent) == 1


def test_check_location_settles_and_persists(tmp_path):
    drop = tmp_path / "drop"
    drop.mkdir()
    _write(drop / "a.csv", b"text,label\nx,a\n", mtime=1000)
    clock = {"t": 0.0}

    def sleep(s):
        clock["t"] += s

    state_file = default_state_path(tmp_path / "ws", str(drop))
    assert state_file.parent == (tmp_path / "ws" / "watch").resolve()
    rec = Recorder()
    once = check_location(
        str(drop), state_file, dataset="demo", stable_seconds=STABLE, emit=rec, sleep=sleep, clock=lambda: clock["t"]
    )
    assert len(once.announced) == 1 and clock["t"] == STABLE  # one window waited, then announced
    saved = load_state(state_file)
    assert (
        list(saved.announced) == [rec.sent[0].sha256] and saved.announced[rec.sent[0].sha256]["event_id"] == "event-1"
    )
    again = check_location(
        str(drop), state_file, dataset="demo", stable_seconds=STABLE, emit=rec, sleep=sleep, clock=lambda: clock["t"]
    )  # a restarted watcher remembers
    assert again.announced == [] and len(rec.sent) == 1
    # the same folder named relatively shares the state
    assert default_state_path(tmp_path / "ws", os.path.relpath(drop)) == state_file
    assert canonical_location("memory://x/y") == "memory://x/y"


def test_missing_location_and_missing_server(tmp_path, monkeypatch):
    with pytest.raises(WatchError, match="does not exist"):
        scan(str(tmp_path / "nope"))
    from typer.testing import CliRunner

    from tasks.cli.watch import _standalone

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    (tmp_path / "drop").mkdir()
    res = CliRunner().invoke(_standalone(), ["watch", str(tmp_path / "drop"), "--once"])
    assert res.exit_code == 2 and "PREFECT_API_URL is not set" in res.output


# ---- data versions (tasks/retrain.py) ---------------------------------------------------------------


def _cfg(ws: Path, source, **retrain):
    return validate_config(
        {
            "workspace": str(ws),
            "data": {"source": source, "task": "single_label"},
            "registry": {"name": "toy"},
            "retrain": retrain,
        }
    )


def _rows(n, seed, offset):
    rows = toy_rows(n, seed=seed)
    for i, r in enumerate(rows):
        r["text"] = f"{r['text']} new{offset + i}"
    return rows


def test_append_keeps_the_test_split_fixed(tmp_path, workspace):
    from tasks.data.fingerprint import dataset_fingerprint
    from tasks.data.prepare import prepare_dataset
    from tasks.data.sources import load_split
    from tasks.data.versions import apply_new_data, list_versions

    base = write_csv(tmp_path / "base.csv", toy_rows(120))
    cfg = _cfg(workspace, str(base), policy="append")
    original_test = set(load_split(prepare_dataset(cfg).path, "test")["text"])

    drop1 = write_csv(tmp_path / "drop" / "batch1.csv", _rows(30, 1, 0))
    cfg1, v2 = apply_new_data(cfg, str(drop1), hashlib.sha256(drop1.read_bytes()).hexdigest())
    versions = list_versions(cfg)
    assert [v["policy"] for v in versions] == ["base", "append"] and v2.version == 2 and v2.parent == 1
    test_file = versions[0]["fixed_test"]
    assert cfg1.data.source["test"] == test_file and set(cfg1.data.source) == {"train", "test"}
    # the frozen test split is exactly the one the data stage carved from the original data
    assert set(pd.read_csv(test_file)["text"]) == original_test
    assert v2.rows["added"] == 30 and v2.fingerprint == dataset_fingerprint(cfg1.data)
    assert versions[1]["trigger"]["sha256"] == hashlib.sha256(drop1.read_bytes()).hexdigest()

    drop2 = write_csv(tmp_path / "drop" / "batch2.csv", _rows(24, 2, 100))
    cfg2, v3 = apply_new_data(cfg, str(drop2))
    assert cfg2.data.source["test"] == test_file and v3.parent == 2
    train2 = pd.read_csv(cfg2.data.source["train"])
    assert len(train2) == 120 - len(original_test) + 30 + 24
    p1, p2 = prepare_dataset(cfg1), prepare_dataset(cfg2)
    assert p1.fingerprint != p2.fingerprint
    pd.testing.assert_frame_equal(load_split(p1.path, "test"), load_split(p2.path, "test"))  # comparable metrics
    assert not set(load_split(p2.path, "train")["text"]) & original_test


def test_append_drops_leaks_and_duplicates_and_is_idempotent(tmp_path, workspace):
    from tasks.data.versions import apply_new_data, list_versions

    base_rows = toy_rows(120)
    base = write_csv(tmp_path / "base.csv", base_rows)
    cfg = _cfg(workspace, str(base))
    drop = tmp_path / "drop.csv"
    cfg1, _ = apply_new_data(cfg, str(write_csv(drop, _rows(9, 3, 0))))
    test_rows = pd.read_csv(cfg1.data.source["test"]).to_dict("records")
    train_rows = pd.read_csv(cfg1.data.source["train"]).to_dict("records")
    new = _rows(6, 4, 50) + test_rows[:2] + train_rows[:3]  # 2 test texts (leak), 3 exact train duplicates
    write_csv(drop, new)
    sha = hashlib.sha256(drop.read_bytes()).hexdigest()
    _, v = apply_new_data(cfg, str(drop), sha)
    assert v.rows == {
        "train": len(train_rows) + 6,
        "new": 11,
        "added": 6,
        "dropped_in_test": 2,
        "dropped_duplicates": 3,
    }
    again_cfg, again = apply_new_data(cfg, str(drop), sha)  # a retried run: the same version, nothing appended
    assert again.reused and again.version == v.version and len(list_versions(cfg)) == v.version
    assert again_cfg.data.source == v.source
    # the stored copy is what the version uses: the drop folder may change afterwards
    drop.write_text("text,label\nchanged,pos\n")
    assert pd.read_csv(v.source["train"]).shape[0] == len(train_rows) + 6


def test_replace_and_errors(tmp_path, workspace):
    import fsspec

    from tasks.data.fingerprint import dataset_fingerprint
    from tasks.data.versions import apply_new_data, list_versions

    base = write_csv(tmp_path / "base.csv", toy_rows(60))
    cfg = _cfg(workspace, str(base), policy="replace", allowed_url_schemes=["memory"])  # URLs only when listed
    fs = fsspec.filesystem("memory")
    data = pd.DataFrame(toy_rows(90, seed=5)).to_csv(index=False).encode()
    fs.pipe("/finetune-test-replace/full.csv", data)
    try:
        url = "memory:///finetune-test-replace/full.csv"
        new_cfg, v = apply_new_data(cfg, url, hashlib.sha256(data).hexdigest())
        stored = Path(new_cfg.data.source)
        assert stored.read_bytes() == data and stored.is_relative_to(workspace)
        assert v.policy == "replace" and v.parent is None and v.fingerprint == dataset_fingerprint(new_cfg.data)
        assert list_versions(cfg)[0]["trigger"]["path"] == url
        with pytest.raises(DataError, match="content changed since the event"):
            apply_new_data(cfg, url, "0" * 64)
        fs.pipe("/finetune-test-replace/bad.csv", b"words,label\nhi,pos\n")
        with pytest.raises(DataError, match="no column\\(s\\) 'text' \\(expected columns: text, label"):
            apply_new_data(cfg, "memory:///finetune-test-replace/bad.csv")
        with pytest.raises(DataError, match="does not exist"):
            apply_new_data(cfg, str(tmp_path / "gone.csv"))
    finally:
        fs.rm("/finetune-test-replace", recursive=True)
    # append after a replace freezes a test split from the replaced data first
    append = cfg.model_copy(update={"retrain": cfg.retrain.model_copy(update={"policy": "append"})})
    _, v3 = apply_new_data(append, str(write_csv(tmp_path / "more.csv", _rows(12, 6, 0))))
    assert [x["policy"] for x in list_versions(cfg)] == ["replace", "base", "append"] and v3.parent == 2
