"""`facemae submit STAGE [options] [stage arguments]`: a stage on Slurm (or locally) through submitit.

The same stages as `slurm/*.sh` (pretrain, train, reconstruct, ...), from Python instead of sbatch:

    facemae submit pretrain --config configs/mae/vit_b8_casia.yaml --nodes 4 --gpus-per-node 8 \\
        --time 2880 --partition gpu data.train=shards/casia/train
    facemae submit pretrain --config configs/mae/tiny_cpu.yaml --cluster local --tasks-per-node 2 \\
        data.train=shards/train
    facemae submit reconstruct shards/unseen shards/released --model runs/mae-1234 --gpus-per-node 8

Every task of the job runs :class:`StageJob`: it exports the torch.distributed variables (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT) from submitit's JobEnvironment and calls the stage's library main,
returning its result. The job is checkpointable: submitit's preemption/timeout signal (USR2) makes every
rank write a checkpoint (the trainers stop on USR1/TERM with exit status 75), then rank 0 requeues the job
with the same arguments, which resumes from the run directory (`run.out_dir`, by default
`runs/<stage>-<job id>`: the job id survives a requeue).
"""

from __future__ import annotations

import argparse
import importlib
import io
import os
import re
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, redirect_stderr
from pathlib import Path
from typing import Any

from facemae_dist.errors import FacemaeError

# facemae_dist.engine.loop.EXIT_PREEMPTED, not imported: that module imports torch
EXIT_PREEMPTED = 75
OUT_KEY = "run.out_dir"


def stage_module(stage: str) -> Any:
    """The module of a stage: the one `facemae` runs it from, else `facemae_dist.<stage>`."""
    from facemae_dist.cli import STAGES

    if stage == "submit" or not re.fullmatch(r"[a-z_]+", stage):
        raise FacemaeError(
            f"cannot submit {stage!r}: name a stage such as pretrain, train, reconstruct"
        )
    name = STAGES[stage][0] if stage in STAGES else f"facemae_dist.{stage}"
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name and name.startswith(exc.name):
            known = ", ".join(s for s in STAGES if s != "submit")
            raise FacemaeError(
                f"unknown stage {stage!r} (no module {name}); known: {known}"
            ) from exc
        raise
    if not callable(getattr(module, "main", None)):
        raise FacemaeError(f"{name} has no main(argv): it cannot be submitted")
    return module


def stage_main(stage: str) -> Callable[[list[str]], Any]:
    """The library `main(argv)` of a stage."""
    return stage_module(stage).main


def master_port(job_id: str, restart: int = 0) -> int:
    """A port per job and attempt, the same formula as slurm/common.sh (see dist.job_port)."""
    from facemae_dist.dist import job_port  # imports torch: only where a job starts

    return job_port(job_id, restart)


def dist_variables(env: Any) -> dict[str, str]:
    """torchrun-style variables for this task from a submitit JobEnvironment."""
    nodes = max(1, env.num_nodes)
    addr = env.hostnames[0] if nodes > 1 else "127.0.0.1"
    restart = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    return {
        "RANK": str(env.global_rank),
        "WORLD_SIZE": str(env.num_tasks),
        "LOCAL_RANK": str(env.local_rank),
        "LOCAL_WORLD_SIZE": str(max(1, env.num_tasks // nodes)),
        "MASTER_ADDR": addr,
        "MASTER_PORT": str(master_port(str(env.job_id), restart)),
    }


@contextmanager
def exported(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the duration (restored after: the debug cluster runs in-process)."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


@contextmanager
def command_line(argv: list[str]) -> Iterator[None]:
    """Show the stage the command line of a direct run (`facemae STAGE ...`), not submitit's
    `python -m submitit.core._submit FOLDER`: what a stage records as its command comes from here."""
    saved = sys.argv
    sys.argv = argv
    try:
        yield
    finally:
        sys.argv = saved


def bridge_preemption_signal() -> Callable | None:
    """Route submitit's preemption/timeout signal (USR2) to the trainer's stop flag (USR1).

    Returns submitit's own handler (None where it installed none: the debug cluster). While the trainer
    runs, the signal makes it checkpoint and exit 75; before that, submitit requeues at once.
    """
    sig = getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"))
    submitit_handler = signal.getsignal(sig)
    if not callable(submitit_handler):
        return None

    def handler(signum: int, frame: Any) -> None:
        trainer = signal.getsignal(signal.SIGUSR1)
        if callable(trainer):
            trainer(signal.SIGUSR1, frame)
        else:
            submitit_handler(signum, frame)

    signal.signal(sig, handler)
    return lambda: submitit_handler(sig, None)


class StageJob:
    """What every task of a submitted job runs; checkpointable (submitit requeues it with the same args)."""

    def __init__(
        self, stage: str, argv: Sequence[str], runs_root: str | Path = "runs", run_dir: bool = True
    ) -> None:
        self.stage, self.argv, self.run_dir = stage, list(argv), run_dir
        self.runs_root = str(Path(runs_root).resolve())

    def arguments(self, job_id: str) -> list[str]:
        """The stage's argv; a trainer's gets a run directory named after the job unless one is given."""
        if not self.run_dir or any(a.startswith(OUT_KEY + "=") for a in self.argv):
            return list(self.argv)
        return [*self.argv, f"{OUT_KEY}={self.runs_root}/{self.stage}-{job_id}"]

    def __call__(self) -> Any:
        import submitit

        env = submitit.JobEnvironment()
        main = stage_main(self.stage)
        requeue = bridge_preemption_signal()
        values = dist_variables(env)
        if "SLURM_CPUS_PER_TASK" in os.environ and "OMP_NUM_THREADS" not in os.environ:
            values["OMP_NUM_THREADS"] = os.environ["SLURM_CPUS_PER_TASK"]
        argv = self.arguments(str(env.job_id))
        with exported(values), command_line(["facemae", self.stage, *argv]):
            try:
                return main(argv)
            except SystemExit as exc:
                if exc.code != EXIT_PREEMPTED or requeue is None:
                    raise
                requeue()  # rank 0: dumps checkpoint() and requeues the job, then exits
                raise

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """submitit calls this on preemption/timeout: resubmit the same stage and arguments."""
        import submitit

        return submitit.helpers.DelayedSubmission(
            StageJob(self.stage, self.argv, self.runs_root, self.run_dir), *args, **kwargs
        )


def tasks_per_node(args: argparse.Namespace) -> int:
    return args.tasks_per_node or max(1, args.gpus_per_node)


def make_executor(args: argparse.Namespace, folder: str) -> Any:
    """A submitit AutoExecutor sized from the command line (no GPU flag unless GPUs are asked for)."""
    import submitit

    cluster = None if args.cluster == "auto" else args.cluster
    if cluster == "slurm" and shutil.which("srun") is None:  # submitit's own check: a traceback
        raise FacemaeError(
            "--cluster slurm: srun not found on PATH: load Slurm's client tools here, "
            "or use --cluster local"
        )
    executor = submitit.AutoExecutor(folder=folder, cluster=cluster)
    params: dict[str, Any] = {
        "name": f"facemae-{args.stage}",
        "nodes": args.nodes,
        "tasks_per_node": tasks_per_node(args),
        "cpus_per_task": args.cpus_per_task,
        "timeout_min": args.time,
        "slurm_signal_delay_s": args.signal_delay,
        "slurm_srun_args": ["--kill-on-bad-exit=1"],  # a crashed rank ends the job, never a hang
    }
    if args.gpus_per_node:
        params["gpus_per_node"] = args.gpus_per_node
    if args.mem_gb:
        params["mem_gb"] = args.mem_gb
    if args.partition:
        params["slurm_partition"] = args.partition
    if args.account:
        params["slurm_account"] = args.account
    executor.update_parameters(**params)
    return executor


def log_folder(args: argparse.Namespace, run_dir: str | None = None) -> str:
    """submitit's folder: <run dir>/submitit, where the run dir may still hold submitit's %j
    (`run_dir`: the run's name where the cluster cannot name folders after the job)."""
    if args.log_dir:
        return args.log_dir
    given = [a.split("=", 1)[1] for a in args.stage_args if a.startswith(OUT_KEY + "=")]
    run_dir = given[-1] if given else run_dir or f"{args.runs}/{args.stage}-%j"
    return str(Path(run_dir) / "submitit")


def stamped_run_dir(runs: str, stage: str) -> str:
    """`<runs>/<stage>-<submission time>`, made unique: submitit's local runner cannot fill %j
    (the job id is the pid of a process that needs its folder first)."""
    base = f"{runs}/{stage}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir, n = base, 1
    while Path(run_dir).exists():
        n += 1
        run_dir = f"{base}-{n}"
    return run_dir


def detected_cluster(cluster: str) -> str:
    """`auto` resolved the way submitit's AutoExecutor does (slurm where srun exists, else local):
    folders depend on it."""
    if cluster != "auto":
        return cluster
    import submitit

    return submitit.AutoExecutor.which()


def submission_error(exc: BaseException, stderr: str) -> FacemaeError | None:
    """The one-line error for a submission that failed in sbatch (None: not sbatch's doing)."""
    from submitit.core.utils import FailedJobError

    if isinstance(exc, FileNotFoundError) and exc.filename == "sbatch":
        return FacemaeError(
            "sbatch not found on PATH: load Slurm's client tools here, or use --cluster local"
        )
    if isinstance(exc, FailedJobError):
        lines = [ln.strip() for ln in (stderr or str(exc)).splitlines() if ln.strip()]
        last = lines[-1] if lines else "no message"
        return FacemaeError(
            f"sbatch failed ({last}): check that Slurm works here (sinfo), or use --cluster local"
        )
    return None


def first_missing(path: Path) -> Path | None:
    """The outermost folder of `path` that does not exist yet (None: it exists)."""
    missing = None
    for folder in [path, *path.parents]:
        if folder.exists():
            break
        missing = folder
    return missing


def tidy_submission(root: Path, before: set[str], created: Path | None, failed: bool) -> None:
    """Remove what submitit left in the job-independent folder `root` (the runs root when the folder
    holds %j): its `<uuid>.pkl` and `.submission_file_<uuid>.sh` after a failed sbatch, and the
    symlink to the batch script it keeps after a good one (Slurm holds its own copy)."""
    if not root.is_dir():
        return
    for entry in root.iterdir():
        if entry.name in before:
            continue
        stray = entry.name.startswith(".submission_file_") and entry.suffix == ".sh"
        if (stray and (failed or entry.is_symlink())) or (failed and entry.suffix == ".pkl"):
            entry.unlink()
    if failed and created is not None:  # folders this submission made, if now empty
        for folder in [root, *root.parents]:
            if any(folder.iterdir()):
                break
            folder.rmdir()
            if folder == created:
                break


def config_of(stage_args: Sequence[str]) -> str | None:
    """The stage's --config value, if it takes one (trainers do)."""
    for i, arg in enumerate(stage_args):
        if arg == "--config" and i + 1 < len(stage_args):
            return stage_args[i + 1]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
    return None


def wants_help(stage_args: Sequence[str]) -> bool:
    """`facemae submit STAGE ... --help`: the stage's help, printed here (never a job)."""
    return any(a in ("-h", "--help") for a in stage_args)


def preflight(args: argparse.Namespace) -> None:
    """Check the stage's arguments here, before the job waits in the queue: the stage module's
    `preflight(argv, world_size)` (trainers: config file, keys, overrides and validate();
    reconstruct: options, paths, manifest, model folder), else its argument parser. No process
    group starts."""
    module = stage_module(args.stage)  # unknown stage: fail here, not in the job
    config = config_of(args.stage_args)
    if config is not None and not Path(config).is_file():
        raise FacemaeError(f"config {config} not found: pass an existing YAML (see configs/)")
    world_size = args.nodes * tasks_per_node(args)
    check = getattr(module, "preflight", None)
    if callable(check):
        check(list(args.stage_args), world_size)
    elif callable(getattr(module, "parser", None)):
        module.parser().parse_args(list(args.stage_args))


def submit(args: argparse.Namespace) -> Any:
    """Submit `args.stage` with `args.stage_args` after :func:`preflight`; returns the submitit Job."""
    config = config_of(args.stage_args)
    given = any(a.startswith(OUT_KEY + "=") for a in args.stage_args)
    stamped = None
    if detected_cluster(args.cluster) in ("local", "debug") and not given:
        # submitit names Slurm folders after the job (%j), but its local runner cannot: name the
        # run (a trainer's run dir, else just the folder of submitit's files) after the time
        stamped = stamped_run_dir(args.runs, args.stage)
        if config is not None:
            args.stage_args = [*args.stage_args, f"{OUT_KEY}={stamped}"]
    preflight(args)
    folder = log_folder(args, stamped)
    executor = make_executor(args, folder)
    job = StageJob(args.stage, args.stage_args, args.runs, run_dir=config is not None)
    # submitit writes its pickle and batch script to the first folder without %j (the runs root)
    # and moves them into the job's folder once sbatch answered: a failed sbatch leaves them there
    from submitit.core.utils import JobPaths

    root = JobPaths.get_first_id_independent_folder(folder)
    before = {e.name for e in root.iterdir()} if root.is_dir() else set()
    created = first_missing(root)
    stderr = io.StringIO()  # submitit prints sbatch's stderr: keep it for the one-line error
    try:
        with redirect_stderr(stderr):
            submitted = executor.submit(job)
    except Exception as exc:
        tidy_submission(root, before, created, failed=True)
        error = submission_error(exc, stderr.getvalue())
        if error is None:
            sys.stderr.write(stderr.getvalue())
            raise
        raise error from exc
    sys.stderr.write(stderr.getvalue())
    tidy_submission(root, before, created, failed=False)
    return submitted


# submit's own options; every other argument goes to the stage (and all of them after `--`)
OPTIONS: dict[str, dict[str, Any]] = {
    "--cluster": {
        "default": "auto",
        "choices": ["auto", "slurm", "local", "debug"],
        "help": "where to run; auto: Slurm where srun exists, else local (default: %(default)s)",
    },
    "--nodes": {"type": int, "default": 1, "help": "nodes of the job (default: %(default)s)"},
    "--tasks-per-node": {"type": int, "default": 0, "help": "default: GPUs per node, or 1"},
    "--gpus-per-node": {"type": int, "default": 0, "help": "default 0: no GPU request"},
    "--cpus-per-task": {
        "type": int,
        "default": 8,
        "help": "CPU cores per task (rank), for data loading (default: %(default)s)",
    },
    "--mem-gb": {"type": float, "default": 0, "help": "memory per node (default: the cluster's)"},
    "--time": {"type": int, "default": 24 * 60, "metavar": "MIN", "help": "time limit, minutes"},
    "--partition": {"default": None, "help": "Slurm partition (default: the cluster's)"},
    "--account": {"default": None, "help": "Slurm account to charge (default: the user's)"},
    "--signal-delay": {
        "type": int,
        "default": 300,
        "metavar": "S",
        "help": "signal the job S seconds before its time limit, so it checkpoints (default: %(default)s)",
    },
    "--runs": {"default": "runs", "help": "root of the default run directories"},
    "--log-dir": {"default": None, "help": "submitit folder (default: <run dir>/submitit)"},
    "--wait": {"action": "store_true", "help": "wait for the job and summarize its result"},
    "--check": {
        "action": "store_true",
        "help": "only check the stage's arguments for this job size, submit nothing",
    },
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="facemae submit",
        usage="facemae submit STAGE [submit options] [stage arguments ...]",
        description="Submit a stage to Slurm (or run it locally) through submitit; requeues on "
        "preemption. Arguments other than the options below go to the stage (all after `--`).",
        epilog="\n\n".join(__doc__.split("\n\n")[1:3]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for name, kwargs in OPTIONS.items():
        p.add_argument(name, **kwargs)
    return p


def split_argv(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(submit's own options, the stage name and its arguments), order kept within each."""
    ours: list[str] = []
    stage: list[str] = []
    tokens = iter(argv)
    for tok in tokens:
        name = tok.split("=", 1)[0]
        if tok == "--":
            stage.extend(tokens)
        elif name in OPTIONS or (name in ("-h", "--help") and not stage):
            ours.append(tok)
            if "=" not in tok and name in OPTIONS and "action" not in OPTIONS[name]:
                ours.append(next(tokens, ""))
        else:
            stage.append(tok)
    return ours, stage


def parse(argv: Sequence[str]) -> argparse.Namespace:
    p = parser()
    ours, stage = split_argv(argv)
    args = p.parse_args(ours)
    if not stage:
        p.error("name the stage to submit, e.g. `facemae submit pretrain --config CONFIG ...`")
    args.stage, args.stage_args = stage[0], stage[1:]
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse(sys.argv[1:] if argv is None else argv)
    if wants_help(args.stage_args):
        print(
            f"facemae submit {args.stage}: the stage's options follow; submit's own: "
            "`facemae submit --help`\n",
            flush=True,
        )
        stage_main(args.stage)(["--help"])  # argparse prints the help and exits 0
        return {}
    if args.check:  # what slurm/*.sh run before their own sbatch
        preflight(args)
        size = f"{args.nodes} node(s) x {tasks_per_node(args)} task(s)"
        print(f"facemae submit: {args.stage} arguments check out for {size}", flush=True)
        return {}
    job = submit(args)
    print(f"submitted {args.stage} as job {job.job_id}; logs in {job.paths.folder}", flush=True)
    out: dict[str, Any] = {"job_id": job.job_id}
    if args.wait or args.cluster in ("local", "debug"):
        out["result"] = job.results()[0]  # rank 0's
        print(f"job {job.job_id} finished: {summary(out['result'])}", flush=True)
        where = [w for w in (output_of(args), result_file(job)) if w]
        if where:
            print(f"full result: {', '.join(where)}", flush=True)
    return out


def summary(result: Any, width: int = 60) -> str:
    """One line for a stage's result: short values as they are, containers by their size (a
    release manifest's label_map and shards grow with the data set)."""
    if not isinstance(result, dict):
        return short(result, 2 * width)
    parts = []
    for key, value in result.items():
        if isinstance(value, dict | list | tuple | set):
            parts.append(f"{key}=<{len(value)} items>")
        else:
            parts.append(f"{key}={short(value, width)}")
    return ", ".join(parts)


def short(value: Any, width: int) -> str:
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def output_of(args: argparse.Namespace) -> str | None:
    """What the stage writes its full result to, where it says so on its command line
    (reconstruct: OUTPUT with manifest.json; audit: --out)."""
    module = stage_module(args.stage)
    if not callable(getattr(module, "parser", None)):
        return None
    try:
        ns, _ = module.parser().parse_known_args(list(args.stage_args))
    except SystemExit:
        return None
    if getattr(ns, "output", None):
        return str(Path(ns.output) / "manifest.json")
    return getattr(ns, "out", None) or None


def result_file(job: Any) -> str | None:
    """submitit's pickle of rank 0's result (none on the debug cluster, which runs in-process)."""
    paths = getattr(job, "paths", None)
    path = getattr(paths, "result_pickle", None)
    return str(path) if path is not None and Path(path).is_file() else None


if __name__ == "__main__":
    from facemae_dist.cli import run_entry

    run_entry("submit", main, hard_exit=False)
