"""Pictures and tables for people: image grids, report tables, privacy–utility plots."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in the model's [-1, 1] space → (B, H, W, 3) uint8."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round()
    return x.to(torch.uint8).permute(0, 2, 3, 1).numpy()


def save_grid(rows: Sequence[torch.Tensor], path: str | Path, labels: Sequence[str] = ()) -> Path:
    """One row per tensor (same batch size), one column per face, a label left of each row."""
    arrays = [to_uint8(r) for r in rows]
    n, h, w = arrays[0].shape[:3]
    label_w, pad = (110 if labels else 0), 2
    canvas = Image.new("RGB", (label_w + n * (w + pad), len(arrays) * (h + pad)), "white")
    draw = ImageDraw.Draw(canvas)
    for r, array in enumerate(arrays):
        y = r * (h + pad)
        if r < len(labels):
            draw.text((4, y + h // 2 - 6), labels[r], fill="black")
        for c in range(n):
            canvas.paste(Image.fromarray(array[c]), (label_w + c * (w + pad), y))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


# ---------------------------------------------------------------- demo report

# The names of the leakage audit's rates (its JSON keys: facemae_dist.eval.privacy) in every table
# a person reads, the demo's report and `facemae audit`'s, so their numbers can be compared.
LEAKAGE_FORMAT = "{:.3f}"
_LEAKAGE_NAMES = {
    "source_top1": "own image ranked first",
    "chance_top1": "leakage top-1 by chance",
}


def leakage_name(key: str) -> str:
    """The printed name of an audit rate: ``top{k}`` → "leakage top-k", ``source_top1`` → "own
    image ranked first", ``chance_top1`` → "leakage top-1 by chance"."""
    if key.startswith("top") and key[3:].isdigit():
        return f"leakage top-{key[3:]}"
    return _LEAKAGE_NAMES[key]


_COLUMNS = [
    ("method", "method", "{}"),
    ("acc", "verification acc", "{:.4f}"),
    ("std", "± std", "{:.4f}"),
    ("error_reduction_vs_best_baseline", "error reduction vs best baseline", "{:+.1%}"),
    ("leak_top1", leakage_name("top1"), LEAKAGE_FORMAT),
    ("leak_top5", leakage_name("top5"), LEAKAGE_FORMAT),
    ("leak_source_top1", leakage_name("source_top1"), LEAKAGE_FORMAT),
    ("teacher_leak_top1", "top-1 by the IRM teacher", LEAKAGE_FORMAT),
]


def _cells(row: dict) -> list[str]:
    return [fmt.format(row[key]) if row.get(key) is not None else "—" for key, _, fmt in _COLUMNS]


def demo_table_markdown(rows: list[dict]) -> str:
    head = "| " + " | ".join(title for _, title, _ in _COLUMNS) + " |"
    rule = "|" + "---|" * len(_COLUMNS)
    return "\n".join([head, rule, *("| " + " | ".join(_cells(r)) + " |" for r in rows)])


def print_demo_table(rows: list[dict], title: str) -> None:
    from rich.table import Table

    from facemae_dist.progress import console

    table = Table(title=title)
    for _, header, _ in _COLUMNS:
        if header == "method":
            table.add_column(header, no_wrap=True, min_width=12)
        else:
            table.add_column(header, justify="right")
    for row in rows:
        table.add_row(*_cells(row))
    console.print(table)


def released_faces_grid(
    out: Path, tag: str, methods: Sequence[str], path: Path, n: int = 8
) -> Path | None:
    """The same unseen faces as each released set shows them (matched by their source key)."""
    from facemae_dist.data.shards import load_manifest
    from facemae_dist.data.stream import decode_face, normalize, read_shard
    from facemae_dist.eval.privacy import ReleaseNames

    faces: dict[str, dict[str, torch.Tensor]] = {}
    for method in methods:
        split = out / f"released_{tag}" / method
        manifest, names = load_manifest(split), ReleaseNames(str(split))
        for sample in read_shard(manifest["urls"][0]):
            meta = json.loads(sample["json"])
            if meta.get("copy", 0) == 0:
                source = names.source(sample["__key__"], meta)
                faces.setdefault(method, {})[source] = normalize(decode_face(sample))
    keys = sorted(set.intersection(*(set(f) for f in faces.values())))[:n]
    if not keys:
        return None
    rows = [torch.stack([faces[m][k] for k in keys]) for m in methods]
    return save_grid(rows, path, list(methods))


def measured(
    points: dict[str, list[tuple[float | None, float, str]]],
) -> dict[str, list[tuple[float, float, str]]]:
    """The points that have a leakage value (x), per curve; curves left empty are dropped.

    A released set that was not audited has no x: drawing it at 0 would read as perfectly private.
    """
    kept = {name: [p for p in pts if p[0] is not None] for name, pts in points.items()}
    return {name: pts for name, pts in kept.items() if pts}


def privacy_utility_plot(
    points: dict[str, list[tuple[float, float, str]]], path: Path, title: str
) -> Path:
    """Scatter/curves: x = leakage (top-1 retrieval, lower is more private), y = verification accuracy.

    Points whose leakage is None (not measured) are left out.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=120)
    for name, pts in measured(points).items():
        xs, ys, labels = zip(*pts, strict=True)
        ax.plot(xs, ys, "o-" if len(pts) > 1 else "o", label=name)
        for x, y, label in pts:
            if label:
                ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("privacy leakage: top-1 identity retrieval (lower is better)")
    ax.set_ylabel("verification accuracy, unseen-trained recognizer")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


# ---------------------------------------------------------------- a shard split at a glance


def identity_grid(
    split: str | Path, path: str | Path, rows: int = 8, per_row: int = 8, scan: int = 20_000
) -> tuple[Path, dict]:
    """One row per identity (its first ``per_row`` faces), for the first ``rows`` identities met
    in the split's shards: each row should show one person, upright and aligned like the others.
    Reads at most ``scan`` samples and decodes only the faces it draws. Returns the picture and
    what the manifest says about the split."""
    from facemae_dist.data.shards import load_manifest
    from facemae_dist.data.stream import decode_face, normalize, read_shard
    from facemae_dist.errors import FacemaeError

    if rows < 1 or per_row < 1:
        raise FacemaeError(f"--rows and --per-row must be ≥ 1, got {rows} and {per_row}")
    manifest = load_manifest(split)
    faces: dict[int, list[torch.Tensor]] = {}
    samples = (sample for url in manifest["urls"] for sample in read_shard(url))
    seen = drawn = 0
    for seen, sample in enumerate(samples, start=1):
        cls = int(sample.get("cls", b"-1"))
        if len(faces.get(cls, ())) < per_row and (cls in faces or len(faces) < rows):
            faces.setdefault(cls, []).append(normalize(decode_face(sample)))
            drawn += 1
        if drawn == rows * per_row or seen >= scan:
            break
    if not faces:
        raise FacemaeError(f"{split}: no faces in its shards; run `facemae shard` again")
    names = manifest.get("label_map", [])
    labels, grid = [], []
    for cls, row in faces.items():
        name = str(names[cls]) if 0 <= cls < len(names) else f"class {cls}"
        labels.append(name if len(name) <= 16 else name[:15] + "…")
        blank = torch.full_like(row[0], 1.0)  # white where an identity has fewer faces
        grid.append(torch.stack(row + [blank] * (per_row - len(row))))
    summary = {
        "split": manifest.get("split"),
        "faces": manifest["num_samples"],
        "identities": manifest["num_classes"],
        "shards": len(manifest["shards"]),
        "rejected": len(manifest.get("rejected", [])),
        "non_square": manifest.get("non_square", 0),
        "scanned": seen,
    }
    return save_grid(grid, path, labels), summary


# ---------------------------------------------------------------- training curves

_NOT_LOSSES = ("step", "samples", "img_per_s", "lr")


def _jsonl_rows(path: Path) -> list[dict]:
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:  # a line cut by a kill
                continue
            if isinstance(row, dict) and "step" in row:
                rows.append(row)
    return rows


def _run_labels(runs: Sequence[Path]) -> list[str]:
    """Folder names, or parent/name where two runs share a name."""
    names = [r.name for r in runs]
    return [f"{r.parent.name}/{r.name}" if names.count(r.name) > 1 else r.name for r in runs]


def training_curves(runs: Sequence[str | Path], path: str | Path, title: str = "") -> Path:
    """Loss and its parts (log scale), learning rate and, where a run verified, its accuracy per
    pair set, against the step: one colour per run. Reads each run's metrics.jsonl and
    verification.jsonl (written by the trainers' rank 0)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from facemae_dist.errors import FacemaeError

    runs = [Path(r) for r in runs]
    logs = []
    for run in runs:
        metrics = _jsonl_rows(run / "metrics.jsonl")
        if not metrics:
            raise FacemaeError(
                f"{run}: no metrics.jsonl rows: pass a run folder (run.out_dir) of `facemae "
                "pretrain` or `facemae train` that has logged at least one step"
            )
        logs.append((metrics, _jsonl_rows(run / "verification.jsonl")))
    verified = any(evals for _, evals in logs)
    fig, axes = plt.subplots(1, 3 if verified else 2, figsize=(13 if verified else 9, 3.8), dpi=110)
    styles = ["-", "--", ":", "-."]
    for color, label, (metrics, evals) in zip(
        plt.rcParams["axes.prop_cycle"].by_key()["color"] * 4, _run_labels(runs), logs, strict=False
    ):
        steps = [r["step"] for r in metrics]
        dot = "o" if len(steps) == 1 else None  # a single logged step draws no line
        parts = [k for k in metrics[-1] if k not in _NOT_LOSSES]
        parts.sort(key=lambda k: k != "loss")  # the total first, drawn solid
        for style, key in zip(styles * 4, parts, strict=False):
            ys = [r.get(key, float("nan")) for r in metrics]
            axes[0].plot(steps, ys, style, marker=dot, color=color, label=f"{label}: {key}")
        if any("lr" in r for r in metrics):
            lrs = [r.get("lr", float("nan")) for r in metrics]
            axes[1].plot(steps, lrs, marker=dot, color=color, label=label)
        sets = sorted({k for r in evals for k, v in r.items() if isinstance(v, dict)})
        for style, name in zip(styles * 4, sets, strict=False):
            pts = [(r["step"], r[name]["acc"]) for r in evals if name in r]
            axes[2].plot(*zip(*pts, strict=True), style, marker="o", color=color,
                         label=f"{label}: {name}")  # fmt: skip
    for ax in axes[:2]:  # losses and lrs span decades (warmup, cosine to ~0, parts of a total)
        if all(v > 0 for line in ax.get_lines() for v in line.get_ydata() if v == v):
            ax.set_yscale("log")
    titles = ["loss (solid) and its parts", "learning rate", "verification accuracy"]
    for ax, name in zip(axes, titles, strict=False):
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.get_lines():
            ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    if not path.suffix:  # matplotlib would add .png itself: return the file it writes
        path = path.with_suffix(".png")
    kinds = fig.canvas.get_supported_filetypes()
    if path.suffix[1:].lower() not in kinds:
        plt.close(fig)
        raise FacemaeError(
            f"{path}: cannot draw a {path.suffix} picture; use one of "
            f"{', '.join('.' + k for k in sorted(kinds))} (e.g. {path.with_suffix('.png')})"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def draw_run_curves(run_dir: Path) -> Path | None:
    """RUN/curves.png at the end of a run (rank 0). A picture that cannot be drawn must not fail
    a run whose weights are saved: it says why and carries on."""
    try:
        return training_curves([run_dir], run_dir / "curves.png", run_dir.name)
    except Exception as exc:  # noqa: BLE001 - the training result stands either way
        print(f"curves.png not drawn: {type(exc).__name__}: {exc}", flush=True)
        return None


def write_demo_report(report: dict, out: Path) -> None:
    rows = report["rows"]
    grid = released_faces_grid(
        out, "0.75", ["original", "masked", "facemae_mse", "facemae_irm"], out / "faces_grid.png"
    )
    points = {r["method"]: [(r.get("leak_top1"), r["acc"], "")] for r in rows}
    plot = privacy_utility_plot(
        points, out / "privacy_utility.png", f"mask ratio {report['mask_ratio']}"
    )
    maes = [out / "mae_irm", out / "mae_mse"]
    curves = None
    if all((run / "metrics.jsonl").is_file() for run in maes):
        title = "FaceMAE pretraining: IRM vs MSE only"
        curves = training_curves(maes, out / "mae_curves.png", title)
    report["pictures"] = {
        "grid": str(grid) if grid else None,
        "plot": str(plot),
        "curves": str(curves) if curves else None,
    }
    (out / "report.json").write_text(json.dumps(report, indent=1))
    md = [
        "# facemae demo report",
        f"Machine: {report['machine']}; total {report['total_s']} s; mask ratio {report['mask_ratio']}.",
        "",
        demo_table_markdown(rows),
        "",
        "![faces](faces_grid.png)",
        "![privacy-utility](privacy_utility.png)",
        *(["![pretraining curves](mae_curves.png)"] if curves else []),
    ]
    (out / "report.md").write_text("\n".join(md) + "\n")
    print_demo_table(rows, f"facemae demo ({report['total_s']} s)")
    print(f"report: {out / 'report.md'}  pictures: {grid}, {plot}")


def write_sweep_report(report: dict, out: Path) -> None:
    points = {
        method: [(r.get("leak_top1"), r["acc"], f"{r['mask_ratio']:g}") for r in rows]
        for method, rows in report["curves"].items()
    }
    for r in report.get("fixed", []):  # methods without a mask ratio, from the demo's own table
        points[f"{r['method']} (no mask)"] = [(r.get("leak_top1"), r["acc"], "")]
    plot = privacy_utility_plot(points, out / "sweep_privacy_utility.png", "mask-ratio sweep")
    (out / "sweep.json").write_text(json.dumps(report, indent=1))
    for method, rows in report["curves"].items():
        print_demo_table(
            [{**r, "method": f"{method} @ {r['mask_ratio']:g}"} for r in rows], f"sweep: {method}"
        )
    print(f"curve: {plot}")
