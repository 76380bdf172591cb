"""Export stage: merge a trained adapter into its base (verified, tasks/release/merge.py), write a self-contained
HF folder (+ the adapter alone, a model card, lineage, optional ONNX) at `<workspace>/exports/<key>/`.

Nothing is written unless every check passes (the folder is built in a temporary sibling and renamed). The key
hashes the run's key and plan, a stamp of its model/ folder (sizes and modification times: no weight file is read
to compute it), the evaluation's metrics.json and the export settings.
"""

from __future__ import annotations

import gc
import shutil
import time
from pathlib import Path

from tasks.config import RunConfig
from tasks.data.sources import load_split
from tasks.evaluation.evaluate import base_model_facts, portable_path
from tasks.files import atomic_dir, sha256_json, write_json
from tasks.model.methods import get_method
from tasks.plan import RunPlan
from tasks.records import ExportResult
from tasks.release.keys import EXPORT_VERSION, export_key
from tasks.release.merge import ExportError, MergeError, check_finite, merge_adapter, merge_shardwise, tolerance_for
from tasks.release.probes import Probe, classification_probe, probe_for
from tasks.release.provenance import code_version, package_versions
from tasks.workspace import Workspace, WorkspaceError

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")

__all__ = ["ExportError", "ExportResult", "MergeError", "export_key", "export_run", "heldout_fingerprint"]


def heldout_fingerprint(prepared_dir: str | Path) -> str:
    """Hash of the test split's rows (id, texts, label): two models are comparable only on equal values."""
    df = load_split(prepared_dir, "test")
    cols = [c for c in ("id", "text", "text_pair", "label") if c in df.columns]
    rows = [[str(v.tolist() if hasattr(v, "tolist") else v) for v in r] for r in df[cols].itertuples(index=False)]
    return sha256_json({"columns": cols, "rows": rows})[:20]


def verification_texts(plan: RunPlan, cfg: RunConfig) -> tuple[list[str], list[str] | None]:
    """The test texts the merge and ONNX checks of a classifier run on: all, or a seeded sample."""
    probe = classification_probe(plan, cfg)
    return probe.texts, probe.pairs


def _model_and_logits(run: Path, plan: RunPlan, probe: Probe, cfg: RunConfig, tmp: Path):
    """(model, tokenizer, verification figures, its logits, saved already?): merged and verified, or the full
    fine-tune. The shard-wise merge writes the weights into `tmp` itself and verifies them as read back."""
    from tasks.model.loading import load_exported_model, model_dir_of

    model_dir = model_dir_of(run)
    if get_method(plan.method).adapter:
        shard = merge_shardwise(run, probe, cfg, tmp)  # a string: why it cannot; then merge in memory
        model, tok, figures, logits = merge_adapter(run, probe, cfg) if isinstance(shard, str) else shard
        if isinstance(shard, str):
            figures["shard_merge_skipped"] = shard
        (tmp / "adapter").mkdir()
        for f in ADAPTER_FILES:
            shutil.copy2(model_dir / f, tmp / "adapter" / f)
        return model, tok, figures, logits, not isinstance(shard, str)
    for f in model_dir.glob("*.safetensors"):
        check_finite(f)
    model, tok = load_exported_model(model_dir, plan.trust_remote_code)
    logits = probe.logits(model, tok)
    figures = {
        "method": plan.method,
        "merged": False,
        "reason": "full fine-tuning: no adapter to merge",
        "tolerance": tolerance_for(cfg, logits, plan.task == "sft"),
        "dtype": cfg.export.dtype,
        "rows": probe.rows,
        "passed": True,
    }
    return model, tok, figures, logits, False


def _save_and_check(model, tok, plan: RunPlan, tmp: Path, probe: Probe, logits, figures: dict, cfg: RunConfig):
    """Save the model with its labels, reload it from disk and check it reproduces the in-memory logits."""
    from tasks.model.loading import load_exported_model

    if plan.task != "sft":
        if len(plan.labels) == model.config.num_labels:
            model.config.id2label = dict(enumerate(plan.labels))
            model.config.label2id = {lab: i for i, lab in enumerate(plan.labels)}
        model.config.problem_type = plan.problem_type
    import torch

    tol = figures["tolerance"]
    model.to("cpu").to(getattr(torch, cfg.export.dtype)).save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    reloaded, rtok = load_exported_model(tmp, plan.trust_remote_code)
    reloaded.float()  # checked in float32, as the merge was (tasks/release/merge.py REL_TOLERANCE)
    again = probe.logits(reloaded, rtok)
    figures["saved_vs_in_memory"] = probe.compare(logits, again, tol)
    if figures["saved_vs_in_memory"]["max_abs_logit_diff"] > tol:
        raise MergeError(f"the saved export does not reproduce the in-memory model: {figures['saved_vs_in_memory']}")
    return reloaded, rtok


def _portable_plan(plan: RunPlan, ws: Workspace) -> dict:
    """The plan as the lineage records it: no memory estimate, no path of this machine."""
    out = {k: v for k, v in plan.to_json().items() if k != "memory_estimate"}
    for k in ("prepared_path", "tokenized_path", "tokenizer_path", "start_adapter"):
        if out.get(k):
            out[k] = portable_path(ws, out[k])
    out["base_model"] = out["base_model_name"] = base_model_facts(plan)["name"]
    return out


def _lineage(
    cfg: RunConfig,
    ws: Workspace,
    plan: RunPlan,
    run: Path,
    evald: Path,
    key: str,
    figures: dict,
    onnx: dict | None,
    timings: dict,
) -> dict:
    summary = Workspace.read_summary(run)
    metrics = Workspace.read_evaluation(evald)
    return {
        "export_key": key,
        "export_version": EXPORT_VERSION,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "name": cfg.registry.name,
        "method": plan.method,
        "adapter": get_method(plan.method).adapter,
        "task": plan.task,
        "problem_type": plan.problem_type,
        "labels": list(plan.labels),
        "run": {"path": portable_path(ws, run), "key": run.name},
        "evaluation": {"path": portable_path(ws, evald), "key": evald.name},
        "base_model": base_model_facts(plan),  # a Hub id, or a folder's name + fingerprint: never a local path
        "base_model_name": base_model_facts(plan)["name"],
        "base_model_fingerprint": plan.base_model_fingerprint,
        "dataset_fingerprint": plan.dataset_fingerprint,
        "test_set_fingerprint": heldout_fingerprint(plan.prepared_path),
        "prepared": portable_path(ws, plan.prepared_path),
        "tokenized": portable_path(ws, plan.tokenized_path),
        "config_hash": sha256_json(plan.identity())[:16],
        "data": {
            k: (cfg.data.model_dump(mode="json")).get(k)
            for k in (
                "text_column",
                "text_pair_column",
                "label_column",
                "label_delimiter",
                "prompt_column",
                "response_column",
                "messages_column",
            )
        },
        "max_length": plan.max_length,
        "trust_remote_code": plan.trust_remote_code,
        "quantization": plan.quantization,
        "head": plan.head,
        "primary_metric": metrics.primary_metric,
        "primary_value": metrics.primary_value,
        "code_version": code_version(),
        "packages": package_versions(),
        "training": {
            **{
                k: summary.raw.get(k)
                for k in (
                    "best_epoch",
                    "best_metric_name",
                    "best_metric",
                    "epochs_run",
                    "global_step",
                    "seconds",
                    "learning_rate",
                    "effective_batch_size",
                )
            },
            "plan": _portable_plan(plan, ws),
        },
        "timings": timings,
        "merge_verification": figures,
        "onnx": onnx,
    }


def export_run(cfg: RunConfig, run_dir: str | Path, eval_dir: str | Path) -> ExportResult:
    """Merge (verified) and export a trained run; reuse `<workspace>/exports/<key>/` when it exists."""
    from tasks.release.model_card import render_model_card
    from tasks.release.onnx import export_onnx

    t0 = time.perf_counter()
    ws, run, evald = Workspace.at(cfg.workspace), Path(run_dir), Path(eval_dir)
    try:
        plan = RunPlan.read(run)
        metrics = Workspace.read_evaluation(evald)
    except WorkspaceError as exc:
        raise ExportError(str(exc)) from None
    key = export_key(cfg, run, evald)
    final = ws.export(key)
    if (final / "lineage.json").is_file():
        lin = Workspace.read_export(final)
        return ExportResult(
            str(final),
            lin.merge_verification,
            bool(lin.onnx),
            key,
            lin.method,
            True,
            round(time.perf_counter() - t0, 3),
            lin.onnx,
        )
    probe = probe_for(plan, cfg)
    timings: dict[str, float] = {}
    with atomic_dir(final) as tmp:
        t = time.perf_counter()
        model, tok, figures, logits, saved = _model_and_logits(run, plan, probe, cfg, tmp)
        timings["merge_and_verify_s"] = round(time.perf_counter() - t, 3)
        t = time.perf_counter()
        if saved:  # verified as read back from tmp: the saved model is the checked one
            reloaded, rtok = model, tok
            figures["saved_vs_in_memory"] = figures["merged_vs_adapter"]
        else:
            reloaded, rtok = _save_and_check(model, tok, plan, tmp, probe, logits, figures, cfg)
        timings["reload_check_s"] = round(time.perf_counter() - t, 3)
        onnx = None
        if cfg.export.onnx and plan.task != "sft":
            onnx = export_onnx(
                reloaded,
                rtok,
                tmp / "onnx",
                probe.texts,
                probe.pairs,
                plan.max_length,
                max(cfg.export.merge_tolerance, 1e-4),
                logits,
            )
            timings["onnx_s"] = onnx["seconds"]
        del model, reloaded
        gc.collect()
        timings["total_s"] = round(time.perf_counter() - t0, 3)
        lineage = _lineage(cfg, ws, plan, run, evald, key, figures, onnx, timings)
        write_json(tmp / "lineage.json", lineage)
        (tmp / "README.md").write_text(
            render_model_card(lineage, metrics.raw, plan, _read_optional(run / "lr_search.json")), encoding="utf-8"
        )
    return ExportResult(
        str(final), figures, onnx is not None, key, plan.method, False, round(time.perf_counter() - t0, 3), onnx
    )


def _read_optional(path: Path) -> dict | None:
    from tasks.workspace import read_facts

    return read_facts(path, "learning-rate search record") if path.is_file() else None
