"""Memory of several adapters on one base vs each version loaded alone (the bundled MiniLM, CPU).

N LoRA adapters (r=8 on query/value, head trained as in the pipeline: classifier + pooler saved) are made with
random non-zero weights. Each mode runs in a fresh child process and reports the bytes of the loaded tensors and
the process RSS (resident set added by loading and one forward pass per version; and its peak):

- shared:   the base loaded once, each adapter attached with peft `load_adapter` (what `finetune predict --model a
            --model b ...` does);
- separate: N models, each the base with its adapter merged (what N exports loaded alone hold).

The logits of every adapter through `set_adapter` are checked against its merged model (max |diff| printed).

    .venv/bin/python benchmarks/multi_adapter.py --adapters 4
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TEXTS = ["a fine film with a great cast", "dull, slow and far too long", "the river runs past the old mill"]


def rss_mb() -> float:
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize() / 2**20


def base_model():
    from transformers import AutoModelForSequenceClassification

    from tasks.model.bundled import minilm_dir

    return AutoModelForSequenceClassification.from_pretrained(minilm_dir(), num_labels=3)


def make_adapters(folder: Path, n: int) -> list[Path]:
    import torch
    from peft import LoraConfig, get_peft_model

    out = []
    for i in range(n):
        torch.manual_seed(100 + i)
        cfg = LoraConfig(
            task_type="SEQ_CLS",
            r=8,
            lora_alpha=16,
            target_modules=["query", "value"],
            modules_to_save=["classifier", "pooler"],
            init_lora_weights=False,
        )
        model = get_peft_model(base_model(), cfg)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "modules_to_save" in name:
                    p.add_(torch.randn_like(p) * 0.05)
        model.save_pretrained(folder / f"a{i}")
        out.append(folder / f"a{i}")
    return out


def logits(model, tok):
    import torch

    with torch.inference_mode():
        return model(**tok(TEXTS, padding=True, return_tensors="pt")).logits


def child(mode: str, adapters: list[Path]) -> dict:
    from peft import PeftModel
    from transformers import AutoTokenizer

    from tasks.model.bundled import minilm_dir
    from tasks.model.loading import tensor_bytes

    tok = AutoTokenizer.from_pretrained(minilm_dir())
    before = rss_mb()
    if mode == "shared":
        model = PeftModel.from_pretrained(base_model(), str(adapters[0]), adapter_name="v0")
        for i, a in enumerate(adapters[1:], start=1):
            model.load_adapter(str(a), adapter_name=f"v{i}")
        model.eval()
        held, outs = tensor_bytes(model), []
        for i in range(len(adapters)):
            model.set_adapter(f"v{i}")
            outs.append(logits(model, tok).tolist())
    else:
        models = [PeftModel.from_pretrained(base_model(), str(a)).merge_and_unload().eval() for a in adapters]
        held = sum(tensor_bytes(m) for m in models)
        outs = [logits(m, tok).tolist() for m in models]
    after = rss_mb()  # after every weight has been read by a forward pass (weights load memory-mapped)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"mode": mode, "tensor_mb": held / 2**20, "rss_added_mb": after - before, "peak_rss_mb": peak, "out": outs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapters", type=int, default=4)
    ap.add_argument("--child", choices=["shared", "separate"])
    ap.add_argument("--folder")
    args = ap.parse_args()
    if args.child:
        adapters = sorted(Path(args.folder).glob("a*"))
        print(json.dumps(child(args.child, adapters)))
        return
    import numpy as np

    with tempfile.TemporaryDirectory() as tmp:
        make_adapters(Path(tmp), args.adapters)
        rows = {}
        for mode in ("shared", "separate"):
            cmd = [sys.executable, __file__, "--child", mode, "--folder", tmp]
            res = subprocess.run(cmd, check=True, capture_output=True, text=True)
            rows[mode] = json.loads(res.stdout.strip().splitlines()[-1])
    diff = float(np.abs(np.array(rows["shared"]["out"]) - np.array(rows["separate"]["out"])).max())
    print(f"MiniLM-L6 base, {args.adapters} LoRA adapters (r=8, query/value, classifier + pooler saved), CPU")
    print(f"{'mode':<10} {'tensors MB':>11} {'RSS added MB':>13} {'peak RSS MB':>12}")
    for r in rows.values():
        print(f"{r['mode']:<10} {r['tensor_mb']:>11.1f} {r['rss_added_mb']:>13.1f} {r['peak_rss_mb']:>12.1f}")
    saved = rows["separate"]["tensor_mb"] - rows["shared"]["tensor_mb"]
    print(
        f"saved: {saved:.1f} MB of tensors, {rows['separate']['rss_added_mb'] - rows['shared']['rss_added_mb']:.1f} MB RSS"
    )
    print(f"max |logit diff| shared (set_adapter) vs merged alone: {diff:.2e}")


if __name__ == "__main__":
    main()
