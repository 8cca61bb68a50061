#!/usr/bin/env python3
"""Plot a flashipa-train log: training loss and validation loss per noise band against the step.

    .venv/bin/python scripts/plot_training.py OUT_DIR/training.csv [--out training.png] [--smooth 50] [--logy]

Left panel: the training loss of every step (faint) and its moving average. Right panel: the EMA model's
validation loss overall and per sigma band, with the zero predictor's loss (~1 per coordinate) dashed.
"""

import argparse
import csv
import math
import os
import sys

BANDS = [("val_sigma_lt_0.05", "sigma < 0.05 nm"), ("val_sigma_0.05_0.2", "0.05-0.2 nm"),
         ("val_sigma_0.2_0.5", "0.2-0.5 nm"), ("val_sigma_ge_0.5", "sigma >= 0.5 nm")]


def read_log(path):
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = {"step", "train_loss", "val_loss", "val_baseline"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{path}: not a flashipa-train log (missing columns: {', '.join(sorted(missing))})")
        rows = list(reader)

    def column(name):
        out = []
        for row in rows:
            text = (row.get(name) or "").strip()
            if text:
                out.append((int(row["step"]), float(text)))
        return out

    return {name: column(name) for name in ["train_loss", "val_loss", "val_baseline"] + [b for b, _ in BANDS]}


def moving_average(values, window):
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("csv", help="training.csv written by flashipa-train")
    parser.add_argument("--out", default=None, help="PNG to write (default: training.png next to the CSV)")
    parser.add_argument("--smooth", type=int, default=50, help="moving-average window for the training loss (steps)")
    parser.add_argument("--logy", action="store_true", help="logarithmic loss axis")
    parser.add_argument("--title", default=None)
    args = parser.parse_args()

    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot_training.py needs matplotlib (pip install matplotlib; it is pinned in scripts/requirements.txt)",
              file=sys.stderr)
        return 1

    try:
        log = read_log(args.csv)
    except (OSError, ValueError) as e:
        print(f"plot_training.py: {e}", file=sys.stderr)
        return 1
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.csv)), "training.png")

    fig, (ax_train, ax_val) = plt.subplots(1, 2, figsize=(13, 4.8), sharey=True)
    train = log["train_loss"]
    if train:
        steps = [s for s, _ in train]
        values = [v for _, v in train]
        ax_train.plot(steps, values, color="tab:blue", alpha=0.2, linewidth=0.6, label="per step")
        window = max(1, min(args.smooth, len(values)))
        ax_train.plot(steps, moving_average(values, window), color="tab:blue", linewidth=1.6,
                      label=f"moving average ({window} steps)")
    baseline = log["val_baseline"]
    zero = baseline[-1][1] if baseline else 1.0
    for ax in (ax_train, ax_val):
        ax.axhline(zero, color="gray", linestyle="--", linewidth=1, label=f"zero predictor ({zero:.3f})")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if args.logy:
            ax.set_yscale("log")
    ax_train.set_ylabel("loss per coordinate, (sigma grad E - eps)^2")
    ax_train.set_title("training")

    colours = ["tab:purple", "tab:green", "tab:orange", "tab:red"]
    for (name, label), colour in zip(BANDS, colours):
        points = [(s, v) for s, v in log[name] if math.isfinite(v)]
        if points:
            ax_val.plot([s for s, _ in points], [v for _, v in points], marker="o", markersize=3, color=colour, label=label)
    if log["val_loss"]:
        ax_val.plot([s for s, _ in log["val_loss"]], [v for _, v in log["val_loss"]], color="black", linewidth=2,
                    marker="o", markersize=3, label="all")
    else:
        ax_val.text(0.5, 0.5, "no validation rows", transform=ax_val.transAxes, ha="center")
    ax_val.set_title("validation (EMA weights)")
    ax_train.legend(fontsize=8)
    ax_val.legend(fontsize=8)
    if args.title:
        fig.suptitle(args.title)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
