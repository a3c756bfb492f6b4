"""`facemae demo`: the main job on the embedded synthetic faces, through the same launchers a
cluster user runs (the `facemae` CLI, torchrun with 2 local gloo processes). No network, no GPU.

Stages so far: synthesize + shard (seen / unseen / evaluation identities, disjoint) → read the
shards back → pretrain FaceMAE (2 processes, DeepSpeed ZeRO-2) → reconstruction grid.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from facemae_dist.errors import FacemaeError
from facemae_dist.progress import console


@dataclass(frozen=True)
class DemoSize:
    seen: str  # IDSxPER for the seen+unseen pool
    holdout: int  # identities moved to `unseen`
    evaluation: str  # IDSxPER of evaluation identities (another seed: other people)
    pretrain_steps: int
    global_batch: int


QUICK = DemoSize(seen="60x10", holdout=12, evaluation="20x10", pretrain_steps=30, global_batch=32)
FULL = DemoSize(seen="300x20", holdout=60, evaluation="100x20", pretrain_steps=400, global_batch=64)


def _run(cmd: list[str], log: Path) -> None:
    """Run one stage as its own process (as a user would), tee-ing output to the run log."""
    env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}
    env.setdefault("OMP_NUM_THREADS", "1")
    with open(log, "a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        done = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise FacemaeError(
            f"stage failed: {' '.join(cmd[:6])} ... (exit {done.returncode}); see {log}"
        )


def _bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def stage_shards(out: Path, size: DemoSize, log: Path) -> None:
    shard = [
        _bin("facemae"),
        "shard",
        "--format",
        "synthetic",
        "--samples-per-shard",
        "100",
        "--no-progress",
    ]
    _run(
        [
            *shard,
            f"{size.seen}:0",
            str(out / "shards"),
            "--holdout-identities",
            str(size.holdout),
            "--workers",
            "2",
        ],
        log,
    )
    _run([*shard, f"{size.evaluation}:1000", str(out / "shards_eval"), "--workers", "2"], log)


def stage_readback(out: Path) -> dict:
    from facemae_dist.data.stream import FaceStream, make_loader

    summary = {}
    for split, path in (
        ("seen", out / "shards/train"),
        ("unseen", out / "shards/unseen"),
        ("eval", out / "shards_eval/train"),
    ):
        stream = FaceStream(path, 64, repeat=False)
        images = sum(len(b["key"]) for b in make_loader(stream))
        summary[split] = {
            "images": images,
            "identities": stream.manifest["num_classes"],
            "shards": len(stream.urls),
        }
    return summary


def stage_pretrain(out: Path, size: DemoSize, log: Path) -> Path:
    run_dir = out / "mae_mse"
    cmd = [
        _bin("torchrun"), "--nproc_per_node", "2", "--master_port", str(29400 + os.getpid() % 500),
        "-m", "facemae_dist.pretrain", "--config", str(_configs() / "mae/tiny_cpu.yaml"),
        f"data.train={out / 'shards/train'}", f"run.out_dir={run_dir}",
        f"run.max_steps={size.pretrain_steps}", f"data.global_batch={size.global_batch}",
        f"run.ckpt_every={max(10, size.pretrain_steps // 4)}", "irm.weight=0",
    ]  # fmt: skip
    _run(cmd, log)
    return run_dir


def _configs() -> Path:
    return Path(__file__).resolve().parents[1] / "configs"


def run_demo(out_dir: str, quick: bool = False) -> dict:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "demo.log"
    size = QUICK if quick else FULL
    timings, start = {}, time.perf_counter()
    steps = [
        ("synthesize + shard", lambda: stage_shards(out, size, log)),
        ("read shards back", lambda: stage_readback(out)),
        ("pretrain FaceMAE (2 processes, ZeRO-2)", lambda: stage_pretrain(out, size, log)),
    ]
    results = {}
    for name, fn in steps:
        t0 = time.perf_counter()
        console.print(f"[bold]▶ {name}[/bold]")
        results[name] = fn()
        timings[name] = round(time.perf_counter() - t0, 1)
        console.print(f"  done in {timings[name]} s")
    report = {
        "splits": results["read shards back"],
        "pretrain": _pretrain_summary(results["pretrain FaceMAE (2 processes, ZeRO-2)"]),
        "timings_s": timings,
        "total_s": round(time.perf_counter() - start, 1),
    }
    (out / "report.json").write_text(json.dumps(report, indent=1))
    _print_report(report, out)
    return report


def _pretrain_summary(run_dir: Path) -> dict:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    images = sorted((run_dir / "images").glob("*.png"))
    return {
        "steps": records[-1]["step"],
        "first_loss": records[0]["loss"],
        "last_loss": records[-1]["loss"],
        "grid": str(images[-1]) if images else None,
    }


def _print_report(report: dict, out: Path) -> None:
    from rich.table import Table

    table = Table(title="facemae demo")
    table.add_column("split")
    table.add_column("images", justify="right")
    table.add_column("identities", justify="right")
    table.add_column("shards", justify="right")
    for split, s in report["splits"].items():
        table.add_row(split, str(s["images"]), str(s["identities"]), str(s["shards"]))
    console.print(table)
    p = report["pretrain"]
    console.print(
        f"FaceMAE pretraining: {p['steps']} steps, loss {p['first_loss']:.3f} → {p['last_loss']:.3f}; "
        f"grid {p['grid']}"
    )
    console.print(f"report: {out / 'report.json'}  (total {report['total_s']} s)")
