"""`facemae`: one command line over the toolkit's stages. Each subcommand is a thin layer over a
library function; errors a user can fix print one clear line and exit with status 2."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from facemae_dist.errors import FacemaeError

EPILOG = """examples:
  facemae synth 200x20 faces/ --seed 0            # 200 synthetic identities × 20 images
  facemae shard faces/ shards/ --holdout-identities 50 --workers 2
  facemae demo --out runs/demo                     # the main job on the embedded synthetic faces
run `facemae <command> --help` for the options of each command."""


def _formatter(prog: str) -> argparse.HelpFormatter:
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=36)


def _add(sub, name: str, help_: str, example: str, fn: Callable) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        name,
        help=help_,
        description=help_,
        epilog=f"example:\n  {example}",
        formatter_class=_formatter,
    )
    parser.set_defaults(func=fn)
    return parser


def add_shard_arguments(p: argparse.ArgumentParser) -> None:
    from facemae_dist.data.images import FITS

    p.add_argument(
        "source",
        help="image folder, file list, RecordIO (.rec or folder), or IDSxPER[:SEED] for synthetic",
    )
    p.add_argument(
        "out_dir", help="output folder: OUT_DIR/<split>/<name>-NNNNNN.tar + manifest.json"
    )
    p.add_argument(
        "--format",
        default="auto",
        choices=["auto", "folder", "list", "recordio", "synthetic"],
        help="kind of SOURCE (default: %(default)s, guessed from the path)",
    )
    p.add_argument(
        "--samples-per-shard",
        type=int,
        default=1000,
        metavar="N",
        help="images per shard at most (default: %(default)s)",
    )
    p.add_argument(
        "--max-shard-bytes",
        type=int,
        default=None,
        metavar="B",
        help="byte budget per shard (default: none, only --samples-per-shard)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="W",
        help="writer processes (default: %(default)s)",
    )
    p.add_argument(
        "--shuffle",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="mix the faces of all identities across shards, as training batches need (IRM relates "
        "the faces of a batch); --no-shuffle keeps the source's order, e.g. to read a slow source "
        "front to back (default: shuffled)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed for --shuffle and the hold-out choice (default: %(default)s)",
    )
    hold = p.add_mutually_exclusive_group()
    hold.add_argument(
        "--holdout-identities",
        type=int,
        default=0,
        metavar="K",
        help="move K whole identities to the 'unseen' split",
    )
    hold.add_argument(
        "--holdout-fraction",
        type=float,
        default=0.0,
        metavar="F",
        help="move a fraction F of identities to 'unseen'",
    )
    p.add_argument(
        "--strict", action="store_true", help="stop at the first bad input instead of skipping it"
    )
    p.add_argument(
        "--resume", action="store_true", help="keep verified shards of a killed run, redo the rest"
    )
    p.add_argument(
        "--image-size",
        type=int,
        default=112,
        metavar="S",
        help="faces are stored S x S pixels; others are resized (default: %(default)s)",
    )
    p.add_argument(
        "--fit",
        choices=FITS,
        default="pad",
        help="how a non-square face becomes square: pad with black to a centred square (a "
        "112x96 crop lands on the 112x112 ArcFace alignment), crop its centred square, or "
        "squash it (default: %(default)s)",
    )
    p.add_argument("--name", default="faces", help="shard file prefix (default: %(default)s)")
    p.add_argument(
        "--full-decode", action="store_true", help="decode every image to validate it (slower)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar (e.g. in logs)")


def cmd_shard(args: argparse.Namespace) -> int:
    from facemae_dist.data.shards import ShardOptions, shard_dataset
    from facemae_dist.data.sources import open_source

    source = open_source(args.source, args.format)
    opts = ShardOptions(
        samples_per_shard=args.samples_per_shard,
        max_shard_bytes=args.max_shard_bytes,
        workers=args.workers,
        shuffle=args.shuffle,
        seed=args.seed,
        holdout_identities=args.holdout_identities,
        holdout_fraction=args.holdout_fraction,
        strict=args.strict,
        resume=args.resume,
        image_size=args.image_size,
        fit=args.fit,
        name=args.name,
        full_decode=args.full_decode,
        progress=not args.no_progress,
    )
    for split, m in shard_dataset(source, args.out_dir, opts).items():
        fitted = f", {m['non_square']:,} non-square ({args.fit})" if m["non_square"] else ""
        shards = f"{len(m['shards'])} shard{'s' if len(m['shards']) != 1 else ''}"
        bad = len(m["rejected"])
        rejected = f"{bad} rejected (listed in its manifest.json)" if bad else "0 rejected"
        print(
            f"{split}: {m['num_samples']:,} images, {m['num_classes']:,} identities, "
            f"{shards}, {rejected}{fitted} → {args.out_dir}/{split}"
        )
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    import dataclasses

    from facemae_dist.data.synthetic import SyntheticSource, write_folder

    cfg = SyntheticSource.from_spec(args.size).cfg  # same spec checks (and errors) as `shard`
    if args.seed is not None:
        if ":" in args.size and args.seed != cfg.seed:
            raise FacemaeError(
                f"{args.size!r} sets seed {cfg.seed} but --seed is {args.seed}; give the seed once"
            )
        cfg = dataclasses.replace(cfg, seed=args.seed)
    count = write_folder(cfg, args.out_dir)
    print(f"wrote {count:,} faces of {cfg.num_identities:,} identities to {args.out_dir}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from facemae_dist.demo import run_demo

    run_demo(args.out, quick=args.quick, seed=args.seed)
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from facemae_dist.demo import run_sweep

    run_sweep(args.out, args.mask_ratios)
    return 0


def cmd_curves(args: argparse.Namespace) -> int:
    from facemae_dist.report import training_curves

    out = args.out or str(
        Path(args.runs[0]) / "curves.png" if len(args.runs) == 1 else "curves.png"
    )
    print(training_curves(args.runs, out, args.title))
    return 0


def cmd_preview(args: argparse.Namespace) -> int:
    from facemae_dist.report import identity_grid

    path, s = identity_grid(args.split, args.out, args.rows, args.per_row)
    fitted = f", {s['non_square']:,} non-square fitted" if s["non_square"] else ""
    print(
        f"{s['split']}: {s['faces']:,} faces, {s['identities']:,} identities, {s['shards']} "
        f"shards, {s['rejected']} rejected{fitted}; one identity per row → {path}"
    )
    return 0


def cmd_make_pairs(args: argparse.Namespace) -> int:
    from facemae_dist.eval.verification import make_pairs

    s = make_pairs(args.shards, args.out, args.pairs, args.seed)
    notes = [f"{s['folds']} folds"]
    if s["skipped_images"]:
        notes.append(f"{s['skipped_images']:,} undecodable images left out")
    if s["repeated_pairs"]:
        notes.append(f"{s['repeated_pairs']:,} repeated pairs")
    print(
        f"{args.shards}: {s['num_pairs']:,} pairs ({s['num_same']:,} same identity, "
        f"{s['num_different']:,} different) of {s['num_images']:,} faces, "
        f"{s['num_identities']:,} identities, {', '.join(notes)} → {args.out}"
    )
    return 0


def _output_file(path: str) -> None:
    """Check that a result file can be written at ``path`` (its folder is made)."""
    if Path(path).is_dir():
        raise FacemaeError(f"--out {path} is a folder: give a file name, e.g. {path}/results.json")
    Path(path).parent.mkdir(parents=True, exist_ok=True)


def cmd_eval(args: argparse.Namespace) -> int:
    from rich.table import Table

    from facemae_dist.data.sources import load_pair_set
    from facemae_dist.engine.recognize import load_recognizer
    from facemae_dist.eval.verification import resolve_device, verify_pair_set
    from facemae_dist.progress import console

    if args.out:  # before the work: a bad --out must not cost a whole evaluation
        _output_file(args.out)
    device = resolve_device(args.device)
    model = load_recognizer(args.model).to(device)
    table = Table(title=f"verification: {args.model}")
    for col in ("pair set", "pairs", "accuracy", "± std", "TAR@FAR=1e-3", "threshold"):
        table.add_column(col, justify="left" if col == "pair set" else "right")
    results = {}
    for path in args.pairs:
        r = verify_pair_set(model, load_pair_set(path), args.batch_size)
        results[Path(path).stem] = {"acc": r.accuracy, "std": r.std, "tar@far": r.tar_at_far}
        row = (f"{r.accuracy:.4f}", f"{r.std:.4f}", f"{r.tar_at_far:.4f}", f"{r.threshold:.2f}")
        table.add_row(Path(path).stem, str(r.num_pairs), *row)
    console.print(table)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
        print(f"results → {args.out}")
    return 0


# Training stages own their argument parsers (they are also `python -m facemae_dist.<stage>` and
# torchrun/accelerate/srun entry points); `facemae <stage> ...` hands them the rest of the line.
STAGES = {
    "pretrain": ("facemae_dist.engine.pretrain", "pretrain FaceMAE (MAE + IRM), DeepSpeed ZeRO"),
    "train": ("facemae_dist.engine.recognize", "train a recognizer (backbone + partial-FC head)"),
    "reconstruct": (
        "facemae_dist.engine.reconstruct",
        "release unseen faces: FaceMAE or a baseline",
    ),
    "audit": (
        "facemae_dist.eval.privacy",
        "privacy leakage: retrieve released faces against the originals",
    ),
    "submit": ("facemae_dist.submit", "submit a stage to Slurm (or locally) through submitit"),
}


def _guarded(name: str, fn: Callable[[], object]) -> int:
    try:
        fn()
    except FacemaeError as exc:
        print(f"facemae {name}: error: {_original_message(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.filename is None:  # not about a path: keep the traceback for the report
            raise
        where = f"{exc.filename} -> {exc.filename2}" if exc.filename2 else exc.filename
        print(
            f"facemae {name}: error: {where}: {exc.strerror or exc}: check that path (a file "
            "where a folder is expected, permissions, free space)",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        print(f"facemae {name}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a peer lost outside the fit loop (export, final eval, barriers)
        rank = _rank_that_lost_a_peer(exc)
        if rank is None:
            raise
        from facemae_dist import dist

        print(f"facemae {name}: error: {dist.lost_peer_message(exc, rank)}", file=sys.stderr)
        return 1
    finally:
        _close_process_group()
    return 0


def _rank_that_lost_a_peer(exc: BaseException) -> int | None:
    """This process's rank when ``exc`` is a collective's error about another rank in a
    multi-process run; else None."""
    if "torch.distributed" not in sys.modules:
        return None
    import torch.distributed as torch_dist

    from facemae_dist import dist

    if not (torch_dist.is_initialized() and torch_dist.get_world_size() > 1):
        return None
    return torch_dist.get_rank() if dist.lost_peer(exc) else None


def _original_message(exc: FacemaeError) -> str:
    """The error's own line: a DataLoader worker's error comes back wrapped as "Caught X in
    DataLoader worker process N. Original Traceback ...", with the original line last."""
    text = str(exc)
    if text.startswith("Caught ") and "Original Traceback" in text:
        return text.rstrip().splitlines()[-1].split(": ", 1)[-1]
    return text


def _close_process_group() -> None:
    """Destroy a process group the stage started, while the interpreter is still whole (left to
    exit-time destructors, gloo's threads can abort a finished run; module entry points also skip
    those destructors, see :func:`run_entry`)."""
    if "torch.distributed" in sys.modules:
        from facemae_dist import dist

        dist.shutdown()


def run_entry(name: str, fn: Callable[[], object], hard_exit: bool = True) -> None:
    """Module entry points (`python -m facemae_dist.<stage>`, what torchrun, accelerate and srun
    start): same error handling as the CLI. A stage that returned (or exited with a code, e.g. 75
    after a stop signal) leaves through os._exit once its output is flushed: C++ exit-time
    destructors of DeepSpeed/gloo state still alive after the process group is destroyed aborted
    about one finished 2-process run in six ("terminate called without an active exception", exit
    -6), failing a job that had written everything. Every file the stages write is closed by then."""
    if not hard_exit:  # e.g. submit: submitit may clean up its local jobs at exit
        sys.exit(_guarded(name, fn))
    try:
        code = _guarded(name, fn)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if not isinstance(exc.code, int | None):
            print(exc.code, file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="facemae",
        description="facemae-dist: distributed FaceMAE training for privacy-preserving face recognition.",
        epilog=EPILOG,
        formatter_class=_formatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_) in STAGES.items():
        sub.add_parser(name, help=f"{help_} (see `facemae {name} --help`)", add_help=False)
    _add_data_commands(sub)
    _add_study_commands(sub)
    return parser


def _add_data_commands(sub) -> None:
    p = _add(
        sub,
        "synth",
        "write identity-structured synthetic faces as an image folder",
        "facemae synth 200x20 faces/ --seed 0",
        cmd_synth,
    )
    p.add_argument("size", help="IDSxPER[:SEED]: identities × images per identity, optional seed")
    p.add_argument("out_dir", help="output folder: OUT_DIR/<identity>/<image>.jpg")
    p.add_argument("--seed", type=int, default=None, help="seed (default: the SEED in size, or 0)")
    p = _add(
        sub,
        "shard",
        "turn faces (folder, list, RecordIO, synthetic) into WebDataset shards",
        "facemae shard /data/faces_webface_112x112 shards/ --holdout-fraction 0.1 --workers 8",
        cmd_shard,
    )
    add_shard_arguments(p)


def _add_study_commands(sub) -> None:
    p = _add(
        sub,
        "demo",
        "the main job on embedded synthetic faces (no network, no GPU)",
        "facemae demo --quick --out runs/demo",
        cmd_demo,
    )
    p.add_argument(
        "--out",
        default="runs/demo",
        help="run directory; run again on it to skip the finished stages (e.g. after a kill) "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--quick", action="store_true", help="a smaller run for CI (about 1.5 minutes on 2 cores)"
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="another draw of faces, splits, masks and weights (a seed always gives the same table)",
    )
    p = _add(
        sub,
        "sweep",
        "repeat release → train → verify → audit across mask ratios (after a demo)",
        "facemae sweep --out runs/demo --mask-ratios 0.5 0.6 0.75 0.9",
        cmd_sweep,
    )
    p.add_argument(
        "--out", default="runs/demo", help="a finished demo run directory (default: %(default)s)"
    )
    p.add_argument(
        "--mask-ratios",
        type=float,
        nargs="+",
        default=[0.5, 0.6, 0.75, 0.9],
        metavar="R",
        help="FaceMAE mask ratios to sweep, one release run each (default: 0.5 0.6 0.75 0.9)",
    )
    p = _add(
        sub,
        "preview",
        "a picture of a shard split, one identity per row: check labels, alignment, orientation",
        "facemae preview shards/casia/train --out casia.png --rows 12",
        cmd_preview,
    )
    p.add_argument("split", help="split folder (manifest.json + shards), e.g. OUT_DIR/train")
    p.add_argument("--out", default="preview.png", help="picture to write (default: %(default)s)")
    p.add_argument("--rows", type=int, default=8, help="identities shown (default: %(default)s)")
    p.add_argument(
        "--per-row", type=int, default=8, help="faces per identity (default: %(default)s)"
    )
    p = _add(
        sub,
        "curves",
        "draw loss, lr and verification accuracy of one or more runs against the step (PNG)",
        "facemae curves runs/demo/mae_irm runs/demo/mae_mse --out mae.png",
        cmd_curves,
    )
    p.add_argument("runs", nargs="+", help="run folders (run.out_dir of pretrain or train)")
    p.add_argument(
        "--out", help="picture to write (default: RUN/curves.png for one run, else curves.png)"
    )
    p.add_argument("--title", default="", help="a title over the picture")
    p = _add(
        sub,
        "make-pairs",
        "build a .bin verification pair set (10 folds) from a shard split",
        "facemae make-pairs shards_eval/train eval_pairs.bin --pairs 6000 --seed 0",
        cmd_make_pairs,
    )
    p.add_argument("shards", help="split folder (manifest.json + shards)")
    p.add_argument("out", help="output .bin (lfw.bin layout)")
    p.add_argument(
        "--pairs",
        type=int,
        default=6000,
        metavar="N",
        help="number of pairs, half same, half different; a multiple of 20 (10 folds x "
        "same/different); warns when the split has too few distinct pairs (default: %(default)s)",
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the pair draw (default: %(default)s)"
    )
    p = _add(
        sub,
        "eval",
        "10-fold verification of a recognizer on .bin pair sets (LFW protocol)",
        "facemae eval --model runs/r50/backbone.safetensors --pairs lfw.bin cfp_fp.bin agedb_30.bin",
        cmd_eval,
    )
    p.add_argument(
        "--model", required=True, help="backbone.safetensors from `facemae train` (or its folder)"
    )
    p.add_argument("--pairs", nargs="+", required=True, help=".bin pair sets")
    p.add_argument(
        "--batch-size", type=int, default=64, help="images per forward pass (default: %(default)s)"
    )
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: a GPU if any)")
    p.add_argument("--out", default=None, help="write the results as JSON")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in STAGES:
        module = importlib.import_module(STAGES[argv[0]][0])
        return _guarded(argv[0], lambda: module.main(argv[1:]))
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    return _guarded(args.command, lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
