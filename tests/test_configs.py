"""Every shipped config parses, names real models, and its header agrees with its values (no training).

Realistic configs (configs/{mae,recog}/*.yaml except `_*` bases and `tiny_cpu.yaml`) carry a header:

    # gpus: 8 (1 node × 8)
    # global batch: 4096 (512 per GPU)
    # lr: 2.4e-3 (base_lr 1.5e-4 × 4096 / 256)
    # epochs: 400
    # steps: ≈ 108 per epoch (...) → ≈ 43,200 in total

and these tests hold the numbers in it to the resolved config, so a comment cannot drift from the
values. The DeepSpeed fragments are merged exactly as the trainers merge them and parsed by
DeepSpeed's own config class (its ZeRO section rejects unknown keys).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from facemae_dist.config import load_config, load_yaml
from facemae_dist.engine.loop import EngineConfig, OptimConfig, deepspeed_config, scaled_lr
from facemae_dist.engine.pretrain import PretrainConfig
from facemae_dist.engine.recognize import RecogConfig

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
CLASSES = {"mae": PretrainConfig, "recog": RecogConfig}
ALL = sorted(p for folder in CLASSES for p in (CONFIGS / folder).glob("*.yaml"))
REALISTIC = [p for p in ALL if not p.name.startswith("_") and p.name != "tiny_cpu.yaml"]
FRAGMENTS = sorted((CONFIGS / "deepspeed").glob("*.json"))
# keys the toolkit derives itself (batch, optimizer, schedule, precision, stage): never in a fragment
OWNED = {
    "train_batch_size",
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "optimizer",
    "scheduler",
    "fp16",
    "bf16",
    "amp",
    "gradient_clipping",
}


def ids(paths: list[Path]) -> list[str]:
    return [f"{p.parent.name}/{p.name}" for p in paths]


def load(path: Path):
    overrides = ["eval.pairs=[]"] if path.parent.name == "recog" else []
    return load_config(CLASSES[path.parent.name], path, overrides)


def header(path: Path) -> dict[str, str]:
    """`# key: value` lines of the leading comment block."""
    out = {}
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        m = re.match(r"#\s*(gpus|global batch|lr|epochs|steps):\s*(.+)", line)
        if m:
            out[m.group(1)] = m.group(2)
    return out


def number(text: str) -> float:
    """First number in `text` ('4,096 (...)' → 4096.0, '2.4e-3 ...' → 0.0024)."""
    m = re.search(r"\d[\d,]*(?:\.\d+)?(?:e-?\d+)?", text)
    assert m, f"no number in {text!r}"
    return float(m.group(0).replace(",", ""))


def test_expected_files_exist():
    names = {f"{p.parent.name}/{p.name}" for p in ALL}
    assert {"mae/tiny_cpu.yaml", "recog/tiny_cpu.yaml"} <= names
    assert {
        "mae/vit_b8_casia.yaml",
        "mae/vit_b16_casia.yaml",
        "mae/vit_l16_webface4m.yaml",
        "mae/vit_l8_webface42m.yaml",
        "recog/r50_casia.yaml",
        "recog/r100_casia.yaml",
        "recog/r50_webface4m.yaml",
        "recog/r100_webface42m.yaml",
        "recog/released_r50.yaml",
    } <= names
    assert {p.name for p in FRAGMENTS} >= {"zero1.json", "zero2.json", "zero3.json"}


@pytest.mark.parametrize("path", ALL, ids=ids(ALL))
def test_parses_and_names_a_real_model(path):
    cfg = load(path)
    if isinstance(cfg, PretrainConfig):
        import timm

        import facemae_dist.models.mae  # noqa: F401  (registers the presets)

        assert cfg.model.name in timm.list_models("facemae*")
        assert 0 < cfg.model.mask_ratio < 1
    else:
        from facemae_dist.models.backbones import list_backbones

        assert cfg.backbone.name in list_backbones()
        # an `optim:` section starts from OptimConfig's generic defaults (AdamW, wd 0.05, cosine),
        # not from RecogConfig's: recognition configs must spell these out (or inherit them)
        optim = load_yaml(path).get("optim", {})
        assert {"optimizer", "weight_decay", "schedule"} <= set(optim), optim
    assert cfg.engine.precision in ("fp32", "bf16") and cfg.engine.zero_stage in (0, 1, 2, 3)
    if cfg.engine.deepspeed_config:
        fragment = REPO / cfg.engine.deepspeed_config
        assert fragment.is_file(), cfg.engine.deepspeed_config
        assert fragment.name == f"zero{cfg.engine.zero_stage}.json", "fragment ≠ engine.zero_stage"


@pytest.mark.parametrize("path", REALISTIC, ids=ids(REALISTIC))
def test_header_matches_the_config(path):
    cfg = load(path)
    info = header(path)
    assert set(info) == {"gpus", "global batch", "lr", "epochs", "steps"}, (
        f"{path.name}: the header must state gpus, global batch, lr, epochs and steps"
    )
    gpus = int(number(info["gpus"]))
    batch = cfg.data.global_batch
    assert gpus % 8 == 0 and batch % (gpus * cfg.engine.grad_accum) == 0
    assert number(info["global batch"]) == batch
    per_gpu = re.search(r"\((\d[\d,]*) per GPU", info["global batch"])
    assert (
        per_gpu and int(per_gpu.group(1).replace(",", "")) * gpus * cfg.engine.grad_accum == batch
    )
    lr = scaled_lr(cfg.optim, batch)
    assert number(info["lr"]) == pytest.approx(lr, rel=1e-9)
    assert number(info["epochs"]) == cfg.run.epochs and cfg.run.max_steps == 0
    steps = re.fullmatch(r"≈ ([\d,]+) per epoch .*→ ≈ ([\d,]+) in total", info["steps"])
    assert steps, info["steps"]
    per_epoch, total = (int(g.replace(",", "")) for g in steps.groups())
    assert total == pytest.approx(per_epoch * cfg.run.epochs, rel=0.002)
    assert cfg.engine.deepspeed_config, "realistic configs name a configs/deepspeed fragment"
    if isinstance(cfg, PretrainConfig):
        assert cfg.engine.precision == "bf16"
        assert cfg.irm.weight == 0 or cfg.irm.teacher, "IRM needs a teacher path"
        assert cfg.data.train and cfg.optim.warmup_epochs < cfg.run.epochs
    else:
        assert cfg.data.train and cfg.eval.pairs == []  # placeholders overridden in load()


@pytest.mark.parametrize("fragment", FRAGMENTS, ids=[p.name for p in FRAGMENTS])
def test_deepspeed_fragment_is_accepted(fragment):
    data = json.loads(fragment.read_text())
    assert not OWNED & set(data), (
        f"{fragment.name} sets keys the toolkit derives: {OWNED & set(data)}"
    )
    assert "stage" not in data.get("zero_optimization", {}), (
        "the stage comes from engine.zero_stage"
    )
    stage = int(re.fullmatch(r"zero(\d)\.json", fragment.name).group(1))
    pytest.importorskip("deepspeed")
    import deepspeed.runtime.constants
    import deepspeed.runtime.zero.config
    from deepspeed.runtime.config import DeepSpeedConfig

    # DeepSpeed ignores unknown top-level keys: a misspelt one would silently do nothing
    known = {
        v
        for module in (deepspeed.runtime.constants, deepspeed.runtime.zero.config)
        for v in vars(module).values()
        if isinstance(v, str)
    }
    assert set(data) <= known, f"unknown DeepSpeed keys: {set(data) - known}"

    for precision in ("bf16", "fp32"):
        engine = EngineConfig(
            zero_stage=stage, precision=precision, grad_accum=2, deepspeed_config=str(fragment)
        )
        merged = deepspeed_config(engine, 16, 1, OptimConfig(grad_clip=1.0))
        parsed = DeepSpeedConfig(merged)  # raises on unknown ZeRO keys or bad values
        assert parsed.zero_optimization_stage == stage
        assert parsed.bfloat16_config.enabled == (precision == "bf16")
        assert parsed.train_batch_size == 32 and parsed.gradient_clipping == 1.0
        # MAE does not clip: 0 must reach DeepSpeed, whose own default clips at 1.0
        unclipped = DeepSpeedConfig(deepspeed_config(engine, 16, 1, OptimConfig(grad_clip=0.0)))
        assert unclipped.gradient_clipping == 0.0
        assert unclipped.zero_config.compute_grad_norm == (stage != 2)
        assert parsed.zero_config.compute_grad_norm  # clipping needs the norm
        for key, value in data.get("zero_optimization", {}).items():
            field = key.removeprefix("stage3_")
            assert getattr(parsed.zero_config, field) == value, key
        for key, value in data.get("data_types", {}).items():  # also ignored when misspelt
            assert getattr(parsed, key) == value, key


MAE_REALISTIC = [p for p in REALISTIC if p.parent.name == "mae"]


@pytest.mark.parametrize("path", MAE_REALISTIC, ids=ids(MAE_REALISTIC))
def test_irm_teacher_is_a_shipped_recognizer_of_that_architecture(path):
    """irm.teacher names the export of a configs/recog run; the teacher's architecture is left to
    its model.json (or, if set, is that run's), and that run is not the one the privacy audit
    should use (a different recognizer exists)."""
    from facemae_dist.engine.pretrain import FALLBACK_TEACHER, teacher_backbone

    cfg = load(path)
    runs = {load(p).run.out_dir: load(p) for p in REALISTIC if p.parent.name == "recog"}
    teacher_run = str(Path(cfg.irm.teacher).parent)
    assert teacher_run in runs, f"{cfg.irm.teacher}: no configs/recog run writes it"
    recog = runs[teacher_run]
    assert cfg.irm.teacher_arch in (None, recog.backbone.name)
    assert cfg.irm.teacher_embedding in (None, recog.backbone.embedding_size)
    # before the teacher is trained (no model.json yet: a cost table) the fallback is this teacher
    if not (Path(teacher_run) / "model.json").is_file():
        assert teacher_backbone(cfg.irm)[:2] == FALLBACK_TEACHER
        assert (recog.backbone.name, recog.backbone.embedding_size) == FALLBACK_TEACHER
    auditors = [r for d, r in runs.items() if d != teacher_run and r.data.train == recog.data.train]
    assert auditors, "no independent recognizer on the same seen split to audit with"


@pytest.mark.parametrize(
    "path", sorted((CONFIGS / "accelerate").glob("*.yaml")), ids=lambda p: p.name
)
def test_accelerate_configs_leave_precision_to_the_run_config(path):
    """The toolkit builds its own DeepSpeed engine: accelerate's mixed_precision is ignored (the
    run's engine.precision decides), so a launcher file must not claim one."""
    import yaml

    cfg = yaml.safe_load(path.read_text())
    assert cfg.get("mixed_precision", "no") == "no", f"{path.name}: set mixed_precision: 'no'"
    assert cfg["distributed_type"] != "DEEPSPEED"  # accelerate only launches the processes
