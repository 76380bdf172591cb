#!/usr/bin/env python3
"""Generate the instruction-tuning demo set from the demo support messages (data/demo/train.csv).

Each row asks for three fields of one message as a JSON object, and the answer is checkable exactly:
  intent   the message's label (billing, technical_issue, shipping, account_access, refund, feedback)
  product  the first Lumora product the message names (in any case, answered with its catalogue spelling), or null
  order    the order number's six digits (written #123456, order 123456, LH-123456 or #LH123456), or null

Written by this script alone from the project's own synthetic messages (standard library; the output is
byte-identical on every run). `configs/sft-demo.yaml` trains on it.

    python data/demo/make_sft_demo.py                     # writes data/demo/sft.jsonl
    python data/demo/make_sft_demo.py --out other.jsonl
"""

import argparse
import csv
import json
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
PRODUCTS = [
    "Lumora Hub",
    "Hub Mini",
    "Glow Bulb",
    "Glow Strip",
    "Cam Mini",
    "Cam Pro",
    "Doorbell 2",
    "Smart Plug",
    "Thermo One",
    "Motion Sensor",
    "Door Sensor",
    "Breeze Monitor",
    "Smart Lock",
    "Chime Speaker",
]
INSTRUCTION = "Support message to JSON (intent, product, order):"


ORDER = re.compile(r"(?<![\d.,$€£])(\d{6})(?![\d.])")  # every demo message names at most one six-digit number


def first_product(text: str) -> str | None:
    lower = text.lower()
    found = [(lower.find(p.lower()), p) for p in PRODUCTS if p.lower() in lower]
    return min(found)[1] if found else None


def answer(text: str, label: str) -> str:
    order = ORDER.search(text)
    return json.dumps({"intent": label, "product": first_product(text), "order": order.group(1) if order else None})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", default=str(HERE / "train.csv"))
    ap.add_argument("--out", default=str(HERE / "sft.jsonl"))
    args = ap.parse_args()
    with open(args.source, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    with open(args.out, "w", encoding="utf-8", newline="\n") as f:
        for r in rows:
            prompt = f"{INSTRUCTION}\n{r['text']}"
            f.write(
                json.dumps({"prompt": prompt, "response": answer(r["text"], r["label"])}, ensure_ascii=False) + "\n"
            )
    print(f"wrote {len(rows)} rows to {args.out}")


if __name__ == "__main__":
    main()
