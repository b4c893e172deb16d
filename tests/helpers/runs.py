"""Tiny trained runs for the tests that need a run directory (search, convert, evaluate)."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def tiny_mqar_attention_run(run: Path, steps: int) -> Path:
    """Trains configs/mqar/zoology_attention.yaml under the tiny overlay (2 attention heads) for `steps` steps into
    `run`, synchronously checkpointed; returns `run`."""
    from effarch.train.config import load_config
    from effarch.train.train import train_and_evaluate

    train_and_evaluate(load_config([ROOT / "configs" / "mqar" / "zoology_attention.yaml",
                                    ROOT / "configs" / "overlays" / "tiny.yaml"],
                                   [f"train.run_dir={run}", "train.async_checkpoint=false",
                                    "model.attention.n_heads=2", f"train.steps={steps}"]))
    return run
