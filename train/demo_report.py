"""`python -m train.demo_report RUN_DIR [--labels-per-class N]`: the end of `make demo`.

Reads the three runs `make demo` made under RUN_DIR (pretrain/, then the
classifier fine-tuned from the pretrained export, finetune_pretrained/, and
the same from scratch, finetune_scratch/), prints what pretraining was worth,
the one command that serves the fine-tuned classifier (python -m serve, with
a page to try it at http://127.0.0.1:8000/) and, as its last line, the
pretraining run's JSON with "finetune" added:

    {"finetune": {"labels_per_class": N, "pretrained": {"accuracy", "macro_f1"},
                  "scratch": {"accuracy", "macro_f1"}, "chance": 1/C}, ...}
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def read_results(run: Path) -> dict:
    path = run / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: did the run in {run} finish?")
    return json.loads(path.read_text())


def report(run_dir: Path, labels_per_class: int) -> tuple[str, dict]:
    pretrain = read_results(run_dir / "pretrain")
    tuned = {name: read_results(run_dir / f"finetune_{name}")["heldout"] for name in ("pretrained", "scratch")}
    classes = tuned["pretrained"]["classes"]
    finetune = {"labels_per_class": labels_per_class, "chance": round(1.0 / classes, 5)}
    finetune.update({name: {"accuracy": r["accuracy"], "macro_f1": r["macro_f1"]} for name, r in tuned.items()})
    lines = [
        f"fine-tuned on {labels_per_class} labelled samples per class ({classes} classes, image + audio), "
        f"held-out n={tuned['pretrained']['n']}:",
        f"{'start':<12} {'accuracy':>9} {'macro-F1':>9}",
    ]
    for name, r in tuned.items():
        lines.append(f"{name:<12} {r['accuracy']:>9.3f} {r['macro_f1']:>9.3f}")
    lines.append(f"{'chance':<12} {1.0 / classes:>9.3f}")
    gain = tuned["pretrained"]["accuracy"] - tuned["scratch"]["accuracy"]
    lines.append(f"pretraining is worth {gain:+.3f} accuracy here")
    export = run_dir / "finetune_pretrained" / "export" / "model.safetensors"
    lines += [
        "serve the fine-tuned classifier, then open http://127.0.0.1:8000/ to try it:",
        f"  python -m serve export={export} port=8000",
    ]
    return "\n".join(lines), {**pretrain, "finetune": finetune}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m train.demo_report", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run_dir", help="the directory holding pretrain/, finetune_pretrained/, finetune_scratch/")
    parser.add_argument("--labels-per-class", type=int, default=10)
    args = parser.parse_args(argv)
    try:
        table, combined = report(Path(args.run_dir), args.labels_per_class)
    except (FileNotFoundError, KeyError, json.JSONDecodeError) as e:
        print(f"train.demo_report: error: {e}", file=sys.stderr)
        return 2
    print(table)
    print(json.dumps(combined, sort_keys=True), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
