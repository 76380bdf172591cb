"""Bad input through the real CLI: every malformed input fails early (before training) with a message that
names the problem and the fix, exits non-zero and leaves nothing in the registry; inputs that are warnings by
design (a 1 MB text, rows duplicated across splits) pass validation, print the warning and store it (manifest.json, tokenized.json).

Each case runs `python -m tasks.cli ...` as a subprocess (HF_HUB_OFFLINE=1, a temporary PREFECT_HOME). The
flow-starting cases talk to one Prefect server started for this module (PREFECT_API_URL), so a case costs
~4 s instead of the ~12 s of an ephemeral server; the cases run 4 at a time in a module fixture and each
parametrized test asserts on its own case's outcome. docs/bad_inputs.md is generated from the same cases:

    .venv/bin/python tests/test_bad_inputs.py docs/bad_inputs.md
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import REPO, toy_rows, write_csv  # noqa: E402

pytestmark = pytest.mark.flow

CASE_TIMEOUT_S = 60  # a bad input must fail early; a case still running after this did not
PREFECT_LOG_LINE = re.compile(r"^\d\d:\d\d:\d\d\.\d+ \| ")


# ---- building the inputs -----------------------------------------------------------------------------


def _csv_text(rows: list[dict], columns=("text", "label"), sep=",") -> str:
    return "\n".join([sep.join(columns)] + [sep.join(str(r[c]) for c in columns) for r in rows]) + "\n"


def _rows(n: int = 60, seed: int = 0) -> list[dict]:
    return toy_rows(n, seed=seed)


@dataclass
class Ctx:
    """What a case builder gets: its own folder, the tiny model, and the standard argument list."""

    dir: Path
    model: Path

    @property
    def ws(self) -> Path:
        return self.dir / "ws"

    def run(
        self,
        source: Path | str | None = None,
        *sets: str,
        config: Path | None = None,
        model: Path | str | None = None,
        extra: tuple[str, ...] = (),
    ) -> list[str]:
        """`run CONFIG --set ...` for a tiny, otherwise valid run."""
        cfg = config or (REPO / "configs" / "demo.yaml")
        base = [
            f"workspace={self.ws}",
            f"model.name_or_path={model or self.model}",
            "training.epochs=1",
            "training.effective_batch_size=8",
            "data.max_length=32",
            "registry.name=bad",
        ]
        if source is not None:
            base.append(f"data.source={source}")
        args = ["run", str(cfg)]
        for s in base + list(sets):
            args += ["--set", s]
        return args + list(extra)

    def prepare(self, source: Path | str, *sets: str) -> list[str]:
        args = ["data", "prepare", str(REPO / "configs" / "demo.yaml")]
        for s in [f"workspace={self.ws}", f"data.source={source}", "data.max_length=32", *sets]:
            args += ["--set", s]
        return args

    def good_csv(self, name: str = "train.csv", n: int = 60) -> Path:
        return write_csv(self.dir / name, _rows(n))

    def write(self, name: str, content: str | bytes) -> Path:
        p = self.dir / name
        p.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
        return p


@dataclass
class Case:
    id: str
    what: str  # the input, in words (the docs table's first column)
    build: Callable[[Ctx], list[str] | tuple[list[str], dict]]  # CLI args (+ extra environment)
    needles: tuple[str, ...]  # what the user-visible message must contain (problem and fix), case-insensitive
    code: int = 2
    warning: str | None = None  # a warning by design: exit 0 and this text in the stored warnings
    stage: str = ""  # where it is caught, for the table
    xfail: str | None = None


def _rows_with(change: Callable[[list[dict]], None], n: int = 60) -> list[dict]:
    rows = _rows(n)
    change(rows)
    return rows


def _unseen_in_train(c: Ctx):
    train = write_csv(c.dir / "train.csv", toy_rows(60, classes=("pos", "neg")))
    test = write_csv(c.dir / "test.csv", toy_rows(12, classes=("pos", "neu"), seed=1))
    return c.run(None, config=c.write("split.yaml", f"data:\n  source:\n    train: {train}\n    test: {test}\n"))


def _jsonl_with(c: Ctx, name: str, replace: dict[int, str]) -> Path:
    lines = [json.dumps(r) for r in _rows()]
    for i, line in replace.items():
        lines[i] = line
    return c.write(name, "\n".join(lines) + "\n")


def _dup_across_splits(c: Ctx):
    rows = _rows(90)
    train, test = write_csv(c.dir / "train.csv", rows), write_csv(c.dir / "test.csv", rows[:15])
    return c.prepare(f"{{train: {train}, test: {test}}}")


def _no_weights(c: Ctx):
    folder = c.dir / "model-no-weights"
    folder.mkdir()
    for f in c.model.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy2(f, folder / f.name)
    (folder / "pytorch_model.bin").write_bytes(b"pickled weights would be here")
    return c.run(c.good_csv(), model=folder)


def _remote_code(c: Ctx):
    folder = c.dir / "model-remote-code"
    shutil.copytree(c.model, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(
        model_type="tiny-custom-encoder",
        architectures=["TinyCustomModel"],
        auto_map={
            "AutoConfig": "configuration_tiny.TinyCustomConfig",
            "AutoModelForSequenceClassification": "modeling_tiny.TinyCustomForSequenceClassification",
        },
    )
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    for module in ("configuration_tiny.py", "modeling_tiny.py"):
        (folder / module).write_text("raise SystemExit('remote code ran')\n")
    return c.run(c.good_csv(), model=folder)


def _workspace_is_file(c: Ctx):
    args = c.run(c.good_csv())
    args[args.index(f"workspace={c.ws}")] = f"workspace={c.write('not-a-folder', 'x')}"
    return args


def _set(*sets: str) -> Callable[[Ctx], list[str]]:
    return lambda c: c.run(c.good_csv(), *sets)


def _config(body: str) -> Callable[[Ctx], list[str]]:
    return lambda c: c.run(c.good_csv(), config=c.write("config.yaml", body))


def _huge(rows: list[dict]) -> None:
    rows[0]["text"] = ("good " * 210_000)[:1_000_000]  # one ~1 MB text


def _mixed(rows: list[dict]) -> None:
    for r in rows[::4]:
        r["label"] = "1"


def _blank(rows: list[dict]) -> None:
    rows[3]["text"], rows[7]["text"] = "", "   "


DATA, CONFIG = "data", "config"
CASES = [
    Case(
        "empty-file",
        "empty CSV file (0 bytes)",
        lambda c: c.run(c.write("empty.csv", b"")),
        ("empty.csv", "the file is empty", "fix:"),
        stage=DATA,
    ),
    Case(
        "header-only",
        "CSV with a header and no rows",
        lambda c: c.run(c.write("header.csv", "text,label\n")),
        ("header.csv", "no data rows", "fix:"),
        stage=DATA,
    ),
    Case(
        "wrong-delimiter",
        "`;`-separated file named .csv",
        lambda c: c.run(c.write("semi.csv", _csv_text(_rows(), sep=";"))),
        ("no column 'text'", "delimiter", "fix:"),
        stage=DATA,
    ),
    Case(
        "not-utf8",
        "Latin-1 bytes in a CSV",
        lambda c: c.run(c.write("latin1.csv", _csv_text(_rows()).replace("great", "caf\u00e9", 3).encode("latin-1"))),
        ("latin1.csv", "not valid UTF-8", "iconv"),
        stage=DATA,
    ),
    Case(
        "missing-label-column",
        "no label column",
        lambda c: c.run(c.write("nolabel.csv", _csv_text(_rows(), columns=("text",)))),
        ("no column 'label'", "data.label_column"),
        stage=DATA,
    ),
    Case(
        "labels-all-null",
        "label column empty on every row",
        lambda c: c.run(write_csv(c.dir / "nulls.csv", [dict(r, label="") for r in _rows()])),
        ("missing label", "fix:"),
        stage=DATA,
    ),
    Case(
        "one-class",
        "every row has the same label",
        lambda c: c.run(write_csv(c.dir / "one.csv", toy_rows(60, classes=("pos",)))),
        ("single class", "at least two classes"),
        stage=DATA,
    ),
    Case(
        "class-with-one-example",
        "a class with one example",
        lambda c: c.run(write_csv(c.dir / "single.csv", _rows() + [{"text": "a lonely stone river", "label": "rare"}])),
        ("class 'rare' has 1 distinct text", "fix:"),
        stage=DATA,
    ),
    Case(
        "test-label-unseen-in-train",
        "test split has a label train never has",
        _unseen_in_train,
        ("label 'neu' occurs in test but never in train", "fix:"),
        stage=DATA,
    ),
    Case(
        "mixed-label-types",
        "labels mix numbers and names",
        lambda c: c.run(write_csv(c.dir / "mixed.csv", _rows_with(_mixed))),
        ("mixes numbers", "one kind of label"),
        stage=DATA,
    ),
    Case(
        "empty-texts",
        "empty / whitespace-only texts",
        lambda c: c.run(write_csv(c.dir / "blank.csv", _rows_with(_blank))),
        ("blank.csv rows 4, 8", "empty or missing text", "fix:"),
        stage=DATA,
    ),
    Case(
        "null-nan-texts",
        "JSONL with `null` and `NaN` texts",
        lambda c: c.run(
            _jsonl_with(c, "nulls.jsonl", {2: '{"text": null, "label": "pos"}', 5: '{"text": NaN, "label": "neg"}'})
        ),
        ("nulls.jsonl rows 3, 6", "empty or missing text"),
        stage=DATA,
    ),
    Case(
        "broken-jsonl",
        "a JSONL line cut off mid-object",
        lambda c: c.run(_jsonl_with(c, "broken.jsonl", {4: '{"text": "cut off", "label": '})),
        ("invalid JSON lines: line 5", "one JSON object per line"),
        stage=DATA,
    ),
    Case(
        "unsupported-file-type",
        "an .xlsx file",
        lambda c: c.run(c.write("data.xlsx", b"PK\x03\x04 not a workbook")),
        ("unsupported file type '.xlsx'", "fix:"),
        stage=DATA,
    ),
    Case(
        "corrupt-parquet",
        "a .parquet file that is not Parquet",
        lambda c: c.run(c.write("data.parquet", b"PAR1 this is not a parquet file")),
        ("cannot be read as Parquet", "fix:"),
        stage=DATA,
    ),
    Case(
        "missing-source",
        "data.source path does not exist",
        lambda c: c.run(c.dir / "nowhere" / "train.csv"),
        ("does not exist", "fix: check the path"),
        stage=DATA,
    ),
    Case(
        "one-megabyte-text",
        "one text of 1 MB (a warning, not an error)",
        lambda c: c.prepare(write_csv(c.dir / "huge.csv", _rows_with(_huge))),
        (),
        code=0,
        warning="tokens and are truncated",
        stage="tokenize (warning)",
    ),
    Case(
        "duplicates-across-splits",
        "rows duplicated across train and test (a warning)",
        _dup_across_splits,
        (),
        code=0,
        warning="leakage: dropped 15 train rows whose text is also in test",
        stage="data (warning)",
    ),
    Case(
        "config-unknown-keys",
        "YAML with misspelt keys",
        _config("training:\n  epoch: 3\n  learning_rte: 0.001\nmodle:\n  name_or_path: x\n"),
        ("training.epoch: unknown key", "valid keys here", "modle: unknown key"),
        stage=CONFIG,
    ),
    Case(
        "config-wrong-types",
        "YAML with wrong value types",
        _config("training:\n  seed: abc\n  learning_rate: fast\nevaluation:\n  batch_size: [64]\n"),
        ("training.seed", "training.learning_rate", "evaluation.batch_size", "3 problems"),
        stage=CONFIG,
    ),
    Case(
        "config-qlora-options-with-full",
        "qlora/lora options with method.kind full",
        _config("method:\n  kind: full\n  quant_type: nf4\n  double_quant: true\n  lora_r: 16\n"),
        ("only apply to lora/qlora/dora", "kind is 'full'", "remove them or choose an adapter method"),
        stage=CONFIG,
    ),
    Case(
        "config-regression-with-class-weights",
        "task regression with class weighting",
        _set("data.task=regression", "data.class_weighting=balanced"),
        ("data.class_weighting: must be 'none'",),
        stage=CONFIG,
    ),
    Case(
        "config-batch-not-multiple",
        "effective batch not a multiple of the micro-batch",
        _set("training.effective_batch_size=10", "training.micro_batch_size=4"),
        ("must be a multiple of",),
        stage=CONFIG,
    ),
    Case(
        "config-not-yaml",
        "a config file that is not valid YAML",
        _config("training:\n  epochs: 3\n   lr: [1, 2\n"),
        ("not valid YAML",),
        stage=CONFIG,
    ),
    Case(
        "override-without-value",
        "`--set training.epochs` (no `=`)",
        _set("training.epochs"),
        ("section.key=value",),
        stage=CONFIG,
    ),
    Case(
        "registry-name-escape",
        "`registry.name=../escape`",
        _set("registry.name=../escape"),
        ("registry.name", "should match pattern"),
        stage=CONFIG,
    ),
    Case(
        "loss-wrong-for-task",
        "`training.loss=mse` for single-label data",
        _set("training.loss=mse"),
        ("training.loss", "'mse' does not fit task single_label"),
        stage="train (before the child starts)",
    ),
    Case(
        "model-without-weights",
        "base-model folder with config + tokenizer, no safetensors",
        _no_weights,
        ("no safetensors weights", "pytorch_model.bin", "fix:"),
        stage="tokenize",
    ),
    Case(
        "model-missing",
        "model.name_or_path folder does not exist",
        lambda c: c.run(c.good_csv(), model=c.dir / "no-such-model"),
        ("does not exist", "fix: check the path"),
        stage="tokenize",
    ),
    Case(
        "hf-source-offline",
        "`hf://` source with HF_HUB_OFFLINE=1",
        lambda c: (c.run("hf://someone/no-such-dataset-xyz"), {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}),
        ("hf://someone/no-such-dataset-xyz", "could not load", "fix:"),
        stage=DATA,
    ),
    Case(
        "model-needs-remote-code",
        "config.json with auto_map, trust_remote_code false",
        _remote_code,
        ("trust_remote_code", "ships its own code", "fix:"),
        stage="tokenize",
    ),
    Case(
        "summary-json-unwritable",
        "`--summary-json /proc/forbidden/x.json`",
        lambda c: c.run(c.good_csv(), extra=("--summary-json", "/proc/forbidden/x.json")),
        ("/proc/forbidden/x.json", "fix:"),
        stage="before the run",
    ),
    Case(
        "workspace-is-a-file",
        "workspace points at an existing file",
        _workspace_is_file,
        ("not-a-folder", "workspace", "fix:"),
        stage=CONFIG,
    ),
]


# ---- running them --------------------------------------------------------------------------------------


@dataclass
class Outcome:
    case: Case
    args: list[str]
    code: int | None  # None: still running after CASE_TIMEOUT_S (killed)
    stdout: str
    stderr: str
    seconds: float
    workspace: Path

    def message(self) -> str:
        """What the user reads: the CLI's own `error:` message (Prefect's log lines left out)."""
        lines = [ln for ln in self.stderr.splitlines() if not PREFECT_LOG_LINE.match(ln)]
        starts = [i for i, ln in enumerate(lines) if ln.startswith("error:")]
        if starts:
            return "\n".join(lines[starts[-1] :]).strip()
        return "\n".join(ln for ln in lines if ln.strip()).strip()

    def first_lines(self) -> str:
        """The message's first line (+ its first problem line where the first only counts problems; + the last
        line where the run failed inside a stage); without an `error:` message, the last line printed."""
        lines = [ln.strip() for ln in self.message().splitlines() if ln.strip()]
        if not lines or not lines[0].startswith("error:"):
            return lines[-1] if lines else ""
        if lines[0].startswith("error: the run failed:") and len(lines) > 1:
            return f"{lines[0]} ... {lines[-1]}"
        if lines[0].endswith(":") and len(lines) > 1:
            return f"{lines[0]} {lines[1]}"
        return lines[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrefectServer:
    """One local Prefect server shared by the module's CLI runs (cheaper than an ephemeral one per run)."""

    def __init__(self, home: Path):
        self.home, self.port = home, _free_port()
        self.api = f"http://127.0.0.1:{self.port}/api"
        self.proc: subprocess.Popen | None = None

    def env(self) -> dict[str, str]:
        env = dict(
            os.environ,
            PREFECT_HOME=str(self.home),
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            PREFECT_UI_API_URL=self.api,
            HF_HUB_OFFLINE="1",
            HF_DATASETS_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
            PREFECT_LOGGING_LEVEL="INFO",
        )
        env.pop("PREFECT_API_URL", None)
        return env

    def start(self, timeout: float = 120) -> PrefectServer:
        import urllib.request

        self.home.mkdir(parents=True, exist_ok=True)
        log = open(self.home / "server.log", "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(self.port)],
            env=self.env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.home,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                with urllib.request.urlopen(self.api + "/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"the Prefect server did not start:\n{(self.home / 'server.log').read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def run_case(case: Case, root: Path, model: Path, server: PrefectServer) -> Outcome:
    ctx = Ctx(root / case.id, model)
    ctx.dir.mkdir(parents=True, exist_ok=True)
    built = case.build(ctx)
    args, extra_env = built if isinstance(built, tuple) else (built, {})
    env = dict(server.env(), PREFECT_API_URL=server.api, **extra_env)
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tasks.cli", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=CASE_TIMEOUT_S)
        code = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        code = None
    return Outcome(case, args, code, out, err, time.monotonic() - t0, ctx.ws)


def run_all(cases: list[Case], root: Path, model: Path, server: PrefectServer, workers: int = 4) -> dict[str, Outcome]:
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {c.id: pool.submit(run_case, c, root, model, server) for c in cases}
        return {k: f.result() for k, f in futures.items()}


def registry_versions(ws: Path) -> list[Path]:
    reg = ws / "registry"
    return sorted(p for p in reg.glob("*/versions/*")) if reg.exists() else []


# ---- the tests -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory, tiny_bert) -> dict[str, Outcome]:
    root = tmp_path_factory.mktemp("bad-inputs")
    server = PrefectServer(root / "prefect-home").start()
    try:
        yield run_all(CASES, root, tiny_bert, server)
    finally:
        server.stop()


def test_there_are_at_least_twenty_error_cases():
    errors = [c for c in CASES if c.warning is None]
    assert len(errors) >= 20 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(c, id=c.id, marks=[pytest.mark.xfail(strict=True, reason=c.xfail)] if c.xfail else [])
        for c in CASES
    ],
)
def test_bad_input_fails_early_with_a_clear_message(case: Case, outcomes):
    o = outcomes[case.id]
    assert o.code is not None, f"still running after {CASE_TIMEOUT_S} s: the input was not rejected early"
    versions = registry_versions(o.workspace)
    assert versions == [], f"something was registered: {versions}"
    assert not list(o.workspace.glob("registry/*/aliases.json")), "a production alias was written"
    assert not (o.workspace / "runs").exists() or not list((o.workspace / "runs").glob("*/model")), "training ran"
    if case.warning is not None:
        assert o.code == 0, o.stderr[-3000:]
        assert len(list(o.workspace.glob("datasets/*/manifest.json"))) == 1
        warnings = stored_warnings(o.workspace)
        assert any(case.warning in w for w in warnings), warnings
        assert case.warning in o.stdout + o.stderr  # and the command says so
        return
    assert o.code == case.code, f"exit code {o.code}, expected {case.code}\n{o.stderr[-3000:]}"
    msg = o.message()
    assert msg.startswith("error:"), o.stderr[-3000:]
    for needle in case.needles:
        assert needle.lower() in msg.lower(), f"{needle!r} not in the message:\n{msg}"
    assert "Traceback" not in msg


def stored_warnings(workspace: Path) -> list[str]:
    """The warnings the data stage wrote to its manifest and the tokenize stage to tokenized.json
    (truncation is counted in real tokens there)."""
    found = [w for m in workspace.glob("datasets/*/manifest.json") for w in json.loads(m.read_text())["warnings"]]
    for tokens in workspace.glob("tokenized/*/tokenized.json"):
        found += json.loads(tokens.read_text()).get("warnings", [])
    return found


def test_user_errors_in_run_print_no_traceback(outcomes):
    flow_cases = [
        o
        for o in outcomes.values()
        if o.case.stage == DATA and o.case.warning is None and not o.case.xfail and o.args[0] == "run" and o.code == 2
    ]
    assert flow_cases
    with_tb = [o.case.id for o in flow_cases if "Traceback (most recent call last)" in o.stderr]
    assert with_tb == [], f"tracebacks on stderr for user errors: {with_tb}"


# ---- the docs table --------------------------------------------------------------------------------------


def markdown_table(results: dict[str, Outcome]) -> str:
    def cell(s: str) -> str:
        return s.replace("|", "\\|").replace("\n", " ")

    lines = [
        "# Bad input: what the user sees",
        "",
        "Every row is a real run of `python -m tasks.cli ...` (HF_HUB_OFFLINE=1, a temporary PREFECT_HOME), generated by",
        "`.venv/bin/python tests/test_bad_inputs.py docs/bad_inputs.md`; `tests/test_bad_inputs.py` asserts the same",
        'cases. Temporary paths are shortened to `<case id>/<file>`. "What the user sees" is the first line of the CLI\'s own `error:` message',
        "(with its first problem line when the first line only counts problems, and its last line when the run failed inside a",
        "stage). Nothing is registered in any case.",
        "",
        "| input | caught at | what the user sees | exit code |",
        "|---|---|---|---|",
    ]
    for case in CASES:
        o, prefix = results[case.id], ""
        if case.warning is not None:
            warnings = [w for w in stored_warnings(o.workspace) if case.warning in w]
            prefix, seen = (
                "`finetune data prepare` exits 0 and prints the warning: ",
                warnings[0] if warnings else "(none)",
            )
        elif o.code is None:
            seen = f"(nothing: still running after {CASE_TIMEOUT_S} s)"
        else:
            seen = o.first_lines()
        seen = re.sub(r"/(?:[^/\s'\"]+/)*bad-inputs[^/\s]*/", "", seen)
        seen = seen.replace(str(REPO) + "/", "")
        note = f" **known gap**: {case.xfail}" if case.xfail else ""
        if registry_versions(o.workspace):
            note += f" (registered version {', '.join(p.name for p in registry_versions(o.workspace))})"
        code = "killed (timeout)" if o.code is None else str(o.code)
        lines.append(
            f"| {cell(case.what)} | {cell(case.stage)} | {prefix}`` {cell(seen)[:400]} ``{cell(note)} | {code} |"
        )
    lines += [
        "",
        "`finetune run` prints only this message for errors caught inside the flow (no Prefect task-failure log and no",
        "traceback; `--verbose` shows the libraries' own logs): tests/test_bad_inputs.py::test_user_errors_in_run_print_no_traceback.",
        "",
    ]
    return "\n".join(lines)


def _main() -> None:
    import tempfile

    import conftest
    import torch
    from transformers import BertConfig, BertModel

    root = Path(tempfile.mkdtemp(prefix="bad-inputs"))
    model = root / "tiny-bert"
    model.mkdir()
    tok = conftest._bert_tokenizer(model)
    torch.manual_seed(0)
    BertModel(
        BertConfig(
            vocab_size=len(tok),
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=128,
            pad_token_id=tok.pad_token_id,
        )
    ).save_pretrained(model)
    server = PrefectServer(root / "prefect-home").start()
    try:
        results = run_all(CASES, root, model, server)
    finally:
        server.stop()
    Path(sys.argv[1]).write_text(markdown_table(results), encoding="utf-8")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    _main()
