"""A fused classifier's held-out evaluation: predictions over a split, then
accuracy, macro-F1, per-class precision/recall/F1, the confusion matrix and
ROC-AUC for binary and multi-label tasks (computed with scikit-learn), as
tables, flat metrics and W&B plots."""

from __future__ import annotations

from collections import Counter

import numpy as np
import torch

from data_pipeline.labels import LabelSpec


@torch.no_grad()
def predict_split(model, loader, *, device: torch.device, dtype: torch.dtype) -> dict:
    """Probabilities and labels over a loader's samples (padding rows dropped):
    {"probs": N×C, "labels": N (or N×C multi-hot), "valid": N (has one of the
    task's modalities), "keys": [N], "skipped": Counter}."""
    from train.batch import eval_mode, to_device

    probs, labels, valid, keys, names = [], [], [], [], {}
    with eval_mode(model) as module:
        for batch in loader:
            real = torch.tensor([k != "" for k in batch["__key__"]])
            if "label_multi" not in batch:
                for label, name in zip(batch["label"].tolist(), batch["class_name"]):
                    if label >= 0 and name:
                        names.setdefault(label, name)
            target = batch["label_multi"] if "label_multi" in batch else batch["label"]
            out = module.predict(to_device(batch, device=device, dtype=dtype))
            probs.append(out["probs"].float().cpu()[real])
            valid.append(out["valid"].cpu()[real])
            labels.append(target[real])
            keys += [k for k in batch["__key__"] if k]
    return {
        "probs": torch.cat(probs),
        "labels": torch.cat(labels),
        "valid": torch.cat(valid),
        "keys": keys,
        "skipped": Counter(loader.skipped),
        "names": names,
    }


def classification_metrics(split: dict, spec: LabelSpec, *, threshold: float = 0.5) -> dict:
    """Scikit-learn's metrics over the samples that have a task modality."""
    from sklearn.metrics import (
        accuracy_score,
        confusion_matrix,
        f1_score,
        precision_recall_fscore_support,
        roc_auc_score,
    )

    keep = split["valid"].numpy().astype(bool)
    probs, y = split["probs"].numpy()[keep], split["labels"].numpy()[keep]
    n, classes = int(keep.sum()), list(range(spec.num_classes))
    seen = split.get("names", {})  # the names the samples' .json give, where task.classes does not
    names = [spec.classes[c] if spec.classes else seen.get(c, str(c)) for c in classes]
    out: dict = {
        "n": n,
        "classes": spec.num_classes,
        "names": names,
        "no_modality": int((~keep).sum()),
        "skipped": dict(split["skipped"]),
    }
    if n == 0:
        raise ValueError(
            "no held-out sample has a label and one of task.modalities: nothing to evaluate "
            f"(skipped: {dict(split['skipped'])})"
        )
    if spec.multi_label:
        y = y.astype(int)
        pred = (probs > threshold).astype(int)
        out["accuracy"] = float(accuracy_score(y, pred))  # exact match of the label set
        out["macro_f1"] = float(f1_score(y, pred, average="macro", zero_division=0))
        both = [c for c in classes if 0 < y[:, c].sum() < n]
        if both:
            out["roc_auc"] = float(roc_auc_score(y[:, both], probs[:, both], average="macro"))
        p, r, f, support = precision_recall_fscore_support(y, pred, average=None, labels=classes, zero_division=0)
        out["majority"] = float(accuracy_score(y, np.tile((y.mean(0) > 0.5).astype(int), (n, 1))))
    else:
        pred = probs.argmax(axis=1)
        out["accuracy"] = float(accuracy_score(y, pred))
        out["macro_f1"] = float(f1_score(y, pred, average="macro", zero_division=0))
        if spec.num_classes == 2 and len(set(y.tolist())) == 2:
            out["roc_auc"] = float(roc_auc_score(y, probs[:, 1]))
        p, r, f, support = precision_recall_fscore_support(y, pred, average=None, labels=classes, zero_division=0)
        out["confusion"] = confusion_matrix(y, pred, labels=classes).tolist()
        out["y_true"], out["y_pred"] = y.tolist(), pred.tolist()  # for W&B's confusion-matrix plot
        out["majority"] = float(np.bincount(y, minlength=spec.num_classes).max() / n)
    out["per_class"] = [
        {
            "class": names[c],
            "support": int(support[c]),
            "precision": float(p[c]),
            "recall": float(r[c]),
            "f1": float(f[c]),
        }
        for c in classes
    ]
    return out


def flat_metrics(results: dict, prefix: str) -> dict[str, float]:
    out = {f"{prefix}/{k}": results[k] for k in ("accuracy", "macro_f1", "roc_auc", "majority") if k in results}
    out.update({f"{prefix}/f1/{row['class']}": row["f1"] for row in results["per_class"]})
    return out


def classify_table(results: dict, *, max_rows: int = 20) -> str:
    """The console summary: overall metrics, then per class (the worst F1 first when there are many)."""
    auc = f"  ROC-AUC {results['roc_auc']:.3f}" if "roc_auc" in results else ""
    lines = [
        f"n {results['n']}  classes {results['classes']}  accuracy {results['accuracy']:.3f}  "
        f"macro-F1 {results['macro_f1']:.3f}{auc}  (majority class {results['majority']:.3f})"
    ]
    # Samples outside n: an accuracy over fewer samples than the shards hold must say so.
    skipped, no_modality = results.get("skipped") or {}, results.get("no_modality", 0)
    parts = []
    if skipped:
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(skipped.items()))
        parts.append(f"{sum(skipped.values())} skipped ({reasons})")
    if no_modality:
        parts.append(f"{no_modality} without any of task.modalities")
    if parts:
        lines.append("not counted in n: " + "; ".join(parts))
    rows = results["per_class"]
    if len(rows) > max_rows:
        rows = sorted(rows, key=lambda r: r["f1"])[:max_rows]
        lines.append(f"the {max_rows} classes with the lowest F1 (all {results['classes']} in metrics.jsonl and W&B):")
    width = max(12, *(len(r["class"]) for r in rows))
    lines.append(f"{'class':<{width}} {'support':>7} {'precision':>9} {'recall':>7} {'f1':>7}")
    for r in rows:
        lines.append(
            f"{r['class']:<{width}} {r['support']:>7} {r['precision']:>9.3f} {r['recall']:>7.3f} {r['f1']:>7.3f}"
        )
    return "\n".join(lines)


def log_to_wandb(tracker, results: dict, *, step: int) -> None:
    """The confusion matrix as a W&B plot and the per-class metrics as a table (rank 0, W&B on)."""
    if tracker.run is None:
        return
    import wandb

    table = wandb.Table(
        columns=["class", "support", "precision", "recall", "f1"],
        data=[[r["class"], r["support"], r["precision"], r["recall"], r["f1"]] for r in results["per_class"]],
    )
    logged = {"eval/per_class": table}
    if "y_true" in results:
        logged["eval/confusion_matrix"] = wandb.plot.confusion_matrix(
            y_true=results["y_true"],
            preds=results["y_pred"],
            class_names=results["names"],
            title=f"held-out confusion matrix, step {step}",
        )
    tracker.log_media(logged, step=step)


def final_summary(results: dict) -> dict:
    keep = ("n", "classes", "accuracy", "macro_f1", "roc_auc", "majority", "no_modality")
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in results.items() if k in keep}
