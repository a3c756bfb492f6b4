"""`facemae demo`: the main job on the embedded synthetic faces, through the same launchers a
cluster user runs (the `facemae` command line for single-process stages, torchrun with 2 local gloo
processes for the distributed ones). No network, no GPU. The demo is small configs, not a second
implementation.

1. synthesize faces; shard into seen / unseen / evaluation identities (disjoint)
2. train two recognizers on seen identities: the IRM teacher, and an independent privacy auditor
   (other seed and embedding size: FaceMAE-IRM optimises its pictures against the teacher, so the
   teacher alone would be a biased judge of leakage; its leakage is reported beside the auditor's)
3. pretrain FaceMAE on seen identities with IRM, and MSE-only (the ablation)
4. release the unseen identities: original, masked, blur, noise, FaceMAE-MSE, FaceMAE-IRM
5. train one recognizer per released set (same recipe)
6. verify each on pairs of the evaluation identities; audit each released set's leakage
7. report: table, report.json, report.md, a face grid and a privacy–utility plot
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from facemae_dist.config import read_json, write_text_atomic
from facemae_dist.errors import FacemaeError
from facemae_dist.progress import console

BASELINES = ("masked", "blur", "noise")
METHODS = ("original", *BASELINES, "facemae_mse", "facemae_irm")


@dataclass(frozen=True)
class DemoSize:
    pool: str  # IDSxPER of seen + unseen identities
    holdout: int  # identities moved to `unseen` (released)
    evaluation: str  # IDSxPER of evaluation identities (another seed: other people)
    pairs: int
    teacher_steps: int
    pretrain_steps: int
    recog_steps: int
    recog_batch: int = 64
    mae_batch: int = 32


QUICK = DemoSize("50x8", 24, "24x8", 400, teacher_steps=30, pretrain_steps=20, recog_steps=20)
FULL = DemoSize(
    "300x16", 150, "100x10", 2000, teacher_steps=300, pretrain_steps=600, recog_steps=250
)
MASK_RATIO = 0.75  # of the demo's releases (`facemae sweep` tries others)


def free_port() -> int:
    """A TCP port nobody listens on now (the OS picks it; torchrun binds it right after)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Demo:
    """One demo run folder; every stage is a separate process started like a user would."""

    def __init__(
        self, out: Path, size: DemoSize, mask_ratio: float = MASK_RATIO, seed: int = 0
    ) -> None:
        self.out, self.size, self.mask_ratio, self.seed = out, size, mask_ratio, seed
        self.log = out / "demo.log"

    # ------------------------------------------------------------ process helpers

    def run(self, *cmd: str) -> None:
        env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}
        env.setdefault("OMP_NUM_THREADS", "1")
        with open(self.log, "a") as f:
            f.write(f"\n$ {' '.join(cmd)}\n")
            f.flush()
            done = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
        if done.returncode != 0:
            raise FacemaeError(
                f"stage failed (exit {done.returncode}): {' '.join(cmd[:8])} ...; see {self.log}"
            )

    def facemae(self, *args: str) -> None:
        """A single-process stage: the `facemae` command line itself, run in this process (the same
        parsing and code path as a user's shell, without paying a Python + torch start per call)."""
        from facemae_dist.cli import main

        with open(self.log, "a") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
            print(f"\n$ facemae {' '.join(args)}", flush=True)
            code = main(list(args))
        if code != 0:
            raise FacemaeError(
                f"stage failed (exit {code}): facemae {' '.join(args[:6])} ...; see {self.log}"
            )

    def torchrun(self, module: str, *args: str) -> None:
        self.run(
            _bin("torchrun"),
            "--nproc_per_node",
            "2",
            "--master_port",
            str(free_port()),  # a port free now: concurrent demos or tests cannot collide
            "-m",
            module,
            *args,
        )

    # ------------------------------------------------------------ stages

    def data(self) -> None:
        s, out = self.size, self.out
        common = [
            "--format",
            "synthetic",
            "--samples-per-shard",
            "64",
            "--workers",
            "2",
            "--no-progress",
            "--shuffle",  # batches must mix identities (IRM relates a batch's faces to each other)
            "--seed",
            str(self.seed),
            "--resume",  # a demo run again after a kill keeps the verified shards
        ]
        self.facemae(
            "shard",
            f"{s.pool}:{self.seed}",
            str(out / "shards"),
            "--holdout-identities",
            str(s.holdout),
            *common,
        )
        evaluation = f"{s.evaluation}:{1000 + self.seed}"  # other people than the pool's
        self.facemae("shard", evaluation, str(out / "shards_eval"), *common)
        pairs = ["--pairs", str(s.pairs), "--seed", str(self.seed)]
        self.facemae("make-pairs", str(out / "shards_eval/train"), str(self.pairs), *pairs)

    @property
    def pairs(self) -> Path:
        return self.out / "eval_pairs.bin"

    def recognizer(
        self, train_split: Path, run_dir: Path, steps: int, seed: int = 0, *extra: str
    ) -> None:
        """A tiny recognizer; ``seed`` is added to the demo's seed, ``extra`` are more overrides."""
        self.torchrun(
            "facemae_dist.train", "--config", str(_configs() / "recog/tiny_cpu.yaml"),
            f"data.train={train_split}", f"run.out_dir={run_dir}", f"run.max_steps={steps}",
            f"data.global_batch={self.size.recog_batch}", f"eval.pairs=[{self.pairs}]",
            f"run.ckpt_every={max(10, steps // 2)}", "export_onnx=false", f"run.seed={self.seed + seed}",
            *extra,
        )  # fmt: skip

    def auditor(self) -> None:
        """The leakage auditor: seen identities like the teacher, but its own seed and width."""
        steps, width = self.size.teacher_steps, "backbone.embedding_size=256"
        self.recognizer(self.out / "shards/train", self.out / "auditor", steps, 7, width)

    def pretrain(self, run_dir: Path, irm: bool) -> None:
        # IRM at the toolkit's default weight 1.0. In an earlier version of this demo, weights 0.1 /
        # 0.3 / 1.0 gave verification 0.715 / 0.711 / 0.705 and auditor leakage top-1 0.103 / 0.063 /
        # 0.046 (MSE-only: 0.677 / 0.215), with stronger teacher-specific patterns as it grows (README).
        # The teacher's architecture (tiny, 128-d) is read from the model.json beside it.
        teacher = ["irm.weight=1.0", f"irm.teacher={self.out / 'teacher/backbone.safetensors'}"]
        self.torchrun(
            "facemae_dist.pretrain", "--config", str(_configs() / "mae/tiny_cpu.yaml"),
            f"data.train={self.out / 'shards/train'}", f"run.out_dir={run_dir}",
            f"run.max_steps={self.size.pretrain_steps}", f"data.global_batch={self.size.mae_batch}",
            f"model.mask_ratio={self.mask_ratio}",
            "model.norm_pix_loss=false",  # plain-pixel targets: a briefly trained MAE paints smooth faces
            "optim.base_lr=1.0e-2", "optim.warmup_steps=20",  # a short run needs a larger lr than MAE's 1.5e-4
            # clipped, unlike MAE's recipe: at this lr IRM's gradients need it (unclipped, FaceMAE-IRM
            # verified 0.6865 instead of 0.7265 at leakage 0.064 instead of 0.051; MSE-only unchanged)
            "optim.grad_clip=1.0",
            f"run.ckpt_every={max(10, self.size.pretrain_steps // 2)}", f"run.seed={self.seed}",
            *(teacher if irm else ["irm.weight=0"]),
        )  # fmt: skip

    def release(self, method: str, tag: str) -> Path:
        out = self.out / f"released_{tag}" / method
        args = [
            "reconstruct",
            str(self.out / "shards/unseen"),
            str(out),
            "--mask-ratio",
            str(self.mask_ratio),
        ]
        if method.startswith("facemae"):
            args += [
                "--method",
                "facemae",
                "--model",
                str(self.out / method.replace("facemae_", "mae_")),
            ]
        else:
            args += ["--method", method]
        self.facemae(*args, "--seed", str(self.seed), "--no-progress")
        return out

    def audit(self, released: Path, model: Path, judge: str = "auditor") -> dict:
        report = released.parent / f"audit_{released.name}_{judge}.json"
        gallery = [str(self.out / "shards/unseen"), str(self.out / "shards_eval/train")]
        self.facemae("audit", str(released), *gallery, "--model", str(model), "--out", str(report))
        return json.loads(report.read_text())

    def evaluate_method(self, method: str, tag: str) -> dict:
        released = self.release(method, tag)
        run_dir = self.out / f"recog_{tag}" / method
        self.recognizer(released, run_dir, self.size.recog_steps)
        verification = json.loads((run_dir / "result.json").read_text())["verification"]
        pair_name = next(k for k in verification if k != "step")
        leak = self.audit(released, self.out / "auditor/backbone.safetensors")
        by_teacher = self.audit(released, self.out / "teacher/backbone.safetensors", "teacher")
        return {
            "method": method,
            **verification[pair_name],
            **{f"leak_{k}": v for k, v in leak.items()},
            "teacher_leak_top1": by_teacher["top1"],
        }


def _bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def _configs() -> Path:
    return Path(__file__).resolve().parents[1] / "configs"


def _timed(name: str, fn: Callable, timings: dict):
    t0 = time.perf_counter()
    console.print(f"[bold]▶ {name}[/bold]")
    result = fn()
    timings[name] = round(time.perf_counter() - t0, 1)
    console.print(f"  done in {timings[name]} s")
    return result


class StageJournal:
    """RUN/stages.json: the demo's finished stages and their results, so `facemae demo` run again
    on the same folder (after a kill, or to redo the report) skips them. An unfinished stage runs
    again and continues from its own leftovers: shards resume, trainers resume from checkpoints,
    reconstruction resumes from its plan."""

    def __init__(self, out: Path, settings: dict) -> None:
        self.path = out / "stages.json"
        if self.path.is_file():
            state = read_json(
                self.path, "demo journal", f"remove {self.path} to run every stage again"
            )
            if state.get("settings") != settings:
                raise FacemaeError(other_settings_message(out, state.get("settings")))
            self.done: dict[str, dict] = state["done"]
        elif out.is_dir() and any(out.iterdir()):
            raise FacemaeError(
                f"{out} is not empty and holds no demo of this version (no stages.json): "
                "choose another --out or remove it"
            )
        else:
            self.done = {}
        self.settings = settings
        out.mkdir(parents=True, exist_ok=True)
        self._write()

    def run(self, name: str, fn: Callable, timings: dict):
        if name in self.done:
            console.print(f"[bold]▶ {name}[/bold] finished in an earlier run: skipped")
            timings[name] = self.done[name]["seconds"]
            return self.done[name]["result"]
        result = _timed(name, fn, timings)
        self.done[name] = {"seconds": timings[name], "result": result}
        self._write()
        return result

    def _write(self) -> None:
        write_text_atomic(
            self.path, json.dumps({"settings": self.settings, "done": self.done}, indent=1)
        )


def demo_settings(quick: bool, seed: int) -> dict:
    """What RUN/stages.json records of `facemae demo [--quick] --seed SEED`; a rerun on the folder
    must record the same."""
    return {"size": asdict(QUICK if quick else FULL), "seed": seed, "mask_ratio": MASK_RATIO}


def demo_flags(settings: Any) -> str | None:
    """The `facemae demo` flags that give journal `settings` ("--quick --seed 0"), or None where no
    flags of this version do (a journal written by another version)."""
    seed = settings.get("seed") if isinstance(settings, dict) else None
    if isinstance(seed, int) and not isinstance(seed, bool):
        for quick in (True, False):
            if settings == demo_settings(quick, seed):
                return f"--quick --seed {seed}" if quick else f"--seed {seed}"
    return None


def other_settings_message(out: Path, stored: Any) -> str:
    """Why a rerun on `out` is refused, in flags a user types (not the journal's raw dict)."""
    flags = demo_flags(stored)
    if flags is None:
        return (
            f"{out} holds a demo with other settings (of another toolkit version): "
            f"choose another --out, or remove {out} to start over"
        )
    made = flags if "--quick" in flags else f"{flags} (full size, no --quick)"
    return (
        f"{out} holds a demo with other settings: it was made with {made}: run "
        f"`facemae demo {flags} --out {out}`, or choose another --out"
    )


def run_demo(out_dir: str, quick: bool = False, seed: int = 0) -> dict:
    """Steps 1–7 (see the module docstring); returns the report dict."""
    out = Path(out_dir)
    size = QUICK if quick else FULL
    demo, timings = Demo(out, size, seed=seed), {}
    journal = StageJournal(out, demo_settings(quick, seed))
    journal.run("1 synthesize + shard + pairs", demo.data, timings)
    journal.run(
        "2 teacher recognizer (seen ids)",
        lambda: demo.recognizer(out / "shards/train", out / "teacher", size.teacher_steps),
        timings,
    )
    journal.run("2b independent leakage auditor (seen ids)", demo.auditor, timings)
    journal.run(
        "3a pretrain FaceMAE + IRM", lambda: demo.pretrain(out / "mae_irm", irm=True), timings
    )
    journal.run(
        "3b pretrain FaceMAE, MSE only", lambda: demo.pretrain(out / "mae_mse", irm=False), timings
    )
    rows = [
        journal.run(
            f"4-6 {m}: release, train, verify, audit",
            lambda m=m: demo.evaluate_method(m, "0.75"),
            timings,
        )
        for m in METHODS
    ]
    from facemae_dist.report import write_demo_report

    report_start = time.perf_counter()
    report = {
        "size": asdict(size),
        "mask_ratio": demo.mask_ratio,
        "seed": seed,
        "rows": add_error_reduction(rows),
        "timings_s": timings,
        # stages skipped on a rerun count with their first run's time
        "total_s": round(sum(timings.values()) + time.perf_counter() - report_start, 1),
        "machine": _machine(),
    }
    write_demo_report(report, out)
    return report


def add_error_reduction(rows: list[dict]) -> list[dict]:
    """Relative verification-error reduction of each method vs the best privacy baseline."""
    best = min(1 - r["acc"] for r in rows if r["method"] in BASELINES)
    for r in rows:
        r["error_reduction_vs_best_baseline"] = (best - (1 - r["acc"])) / best if best > 0 else 0.0
    return rows


def run_sweep(out_dir: str, mask_ratios: list[float]) -> dict:
    """Steps 4–6 across mask ratios on a finished demo folder; draws the privacy–utility curve."""
    out = Path(out_dir)
    if (
        not (out / "teacher/backbone.safetensors").is_file()
        or not (out / "mae_irm/model.json").is_file()
        or not (out / "auditor/backbone.safetensors").is_file()
    ):
        raise FacemaeError(f"{out} holds no finished demo: run `facemae demo --out {out}` first")
    done = json.loads((out / "report.json").read_text())
    size = QUICK if done["size"] == asdict(QUICK) else FULL
    curves, timings = {}, {}
    for ratio in mask_ratios:
        demo = Demo(out, size, ratio, seed=done.get("seed", 0))
        for method in ("masked", "facemae_mse", "facemae_irm"):
            row = _timed(
                f"{method} @ {ratio}",
                lambda d=demo, m=method, r=ratio: d.evaluate_method(m, f"{r}"),
                timings,
            )
            curves.setdefault(method, []).append({"mask_ratio": ratio, **row})
    from facemae_dist.report import write_sweep_report

    fixed = [r for r in done["rows"] if r["method"] in ("blur", "noise")]
    report = {"curves": curves, "fixed": fixed, "timings_s": timings}
    write_sweep_report(report, out)
    return report


def _machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} cores, {cpu}"
