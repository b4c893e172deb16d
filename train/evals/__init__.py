"""Evaluations of a trained run: `effarch eval RUN_DIR TASK [options]`.

Tasks (one module each): `perplexity` (held-out loss, perplexity, bits per token / byte), `mqar` (accuracy per test
segment, Zoology's protocol), `passkey` and `niah` (exact match by context length and depth, with a heatmap PNG).
Results go to RUN_DIR/eval/<task>.json (+ <task>.png; with `--kv-policy NAME [OPT=VALUE ...]` on passkey, niah and
perplexity, to <task>.kv-<name>-<options>.json: the labelled tokens decoded through a KV policy,
layers/kv_policies/); `effarch report DIR` tabulates them and `effarch sweep` (train/evals/sweep.py and its parts
sweep_*.py) runs them after training every config of a grid.
"""

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from effarch.train.evals import mqar, niah, passkey, perplexity
from effarch.train.evals.common import (
    KV_READS,
    EvalError,
    Timer,
    eval_dir,
    kv_policy_of,
    model_info,
    result_name,
    write_result,
)
from effarch.train.evals.plots import PlotsUnavailable

TASKS = {m.NAME: m for m in (perplexity, mqar, passkey, niah)}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line through EvalError (exit status 2 in the CLI), not argparse's exit
        raise EvalError(f"{self.prog}: {message}")


def parser(task: str) -> argparse.ArgumentParser:
    if task not in TASKS:
        raise EvalError(f"unknown eval task {task!r}; tasks: {', '.join(TASKS)}")
    p = _Parser(prog=f"effarch eval RUN_DIR {task}")
    TASKS[task].add_arguments(p)
    return p


def parse_options(task: str, argv: Sequence[str]) -> argparse.Namespace:
    """The task's options from command-line arguments; EvalError names a bad one."""
    return parser(task).parse_args(list(argv))


def options_to_argv(options: dict) -> list[str]:
    """{"lengths": [256, 512], "no_full": true} -> ["--lengths", "256", "512", "--no-full"] (sweep files)."""
    argv = []
    for key, value in options.items():
        flag = "--" + str(key).replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value is False or value is None:
            continue
        elif isinstance(value, (list, tuple)):
            argv += [flag, *("x".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v) for v in value)]
        else:
            argv += [flag, str(value)]
    return argv


TOKEN_TASKS = ("mqar", "passkey", "niah")  # synthetic tasks with their own token ids (train/data/<task>.py)


def check_task(trained: str, task: str, run_dir: Path) -> str | None:
    """A warning when `task` is not what the run was trained on but still measures something (a token-level task
    on a model trained on another: transfer, e.g. passkey retrieval of an MQAR model); EvalError when the result
    would mean nothing (a token-level task on a model whose tokens are bytes or tokenizer pieces). Perplexity is on
    the run's own held-out data, so it always fits."""
    if task not in TOKEN_TASKS or task == trained:
        return None
    if trained not in TOKEN_TASKS:
        raise EvalError(f"task {task}: {str(run_dir)!r} was trained on data.task {trained}, whose tokens are text; "
                        f"{task} is a task of its own token ids and would score a meaningless 0. Evaluate a run "
                        f"trained with data.task {task}, or this one with perplexity")
    return (f"{str(run_dir)!r} was trained on data.task {trained}, not {task}: this measures transfer to a task "
            "the model never saw")


def _stderr(line: str) -> None:
    print(line, file=sys.stderr)


def run_eval(run_dir: str | Path, task: str, argv: Sequence[str] = (), *,
             log: Callable[[str], None] | None = _stderr) -> dict:
    """Evaluates the newest readable checkpoint of `run_dir` on `task` and writes RUN_DIR/eval/<task>.json (and
    .png); `checkpoint_step` is the step of the checkpoint evaluated.

    Raises EvalError / ConfigError (one line naming the problem) for an unknown task, a bad option, a missing run
    directory or checkpoint, or a task that does not fit the model.
    """
    from effarch.train.generate import load_run_config, restore_run

    module = TASKS.get(task)
    args = parse_options(task, argv)
    policy = kv_policy_of(args)
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise EvalError(f"run dir {str(run_dir)!r} does not exist")
    warning = check_task(load_run_config(run_dir).data.task, task, run_dir)
    if warning and log is not None:
        log(f"effarch: warning: {warning}")
    cfg, model, step = restore_run(run_dir)  # the step restored: an unreadable newest checkpoint is skipped
    if policy is not None:
        try:
            policy_layers = model.set_kv_policy(policy)
        except ValueError as e:
            raise EvalError(f"--kv-policy: {e}") from None
    name = result_name(task, policy, getattr(args, "kv_prefill", None))
    KV_READS.reset()
    with Timer() as t:
        out = module.run(cfg, model, args, log=log)
    result = {"task": task, "run_dir": str(run_dir), "checkpoint_step": step,
              "model": model_info(cfg.model), "trained_task": cfg.data.task, **out, "wall_s": t.seconds, "png": None}
    if policy is not None:
        per_step = KV_READS.per_step()
        # Bytes of KV cache per token of the policy layers (K and V of every KV head, the cache dtype).
        per_token = sum(int(model.blocks[i].mixer.state_size(1)) for i in policy_layers)
        held = model.kv_policy or policy  # as the model resolved it (duo: its sizes and the heads its gates chose)
        result["kv_policy"] = {
            "name": policy.NAME, "describe": held.describe(), "budget": held.budget,
            # what was prefilled densely: "context" (before the question), "prompt" (up to the answer), or None
            # (a task without a question: up to the first labelled token)
            "prefill": getattr(args, "kv_prefill", None),
            "layers": policy_layers,  # the layers that read through it (hybrids, dense_layers: not all)
            # measured: KV tokens a query head attended to per decode step and policy layer (recycled's and
            # tidal's full steps / layers included)
            "tokens_read_per_step": per_step,
            # those tokens' K and V bytes over the policy layers, per decoded token (per-query-head lists, quest
            # and tidal, may load up to Hq / Hkv times more for a GQA group's union)
            "kv_bytes_read_per_step": None if per_step is None else per_step * per_token}
    result["file"] = f"{name}.json"
    if warning:
        result["warning"] = warning
    write_result(run_dir, name, result)  # before the optional plot, so a missing matplotlib loses no measurement
    if hasattr(module, "plot") and getattr(module, "draws", lambda r: True)(result):
        png = eval_dir(run_dir) / f"{name}.png"
        try:
            module.plot(result, str(png))
            result["png"] = png.name
        except PlotsUnavailable as e:
            result["png_skipped"] = str(e)
            if log is not None:
                log(f"effarch: {e}")
        write_result(run_dir, name, result)
    return result


def table(result: dict) -> str:
    """The task's markdown table of a result."""
    return TASKS[result["task"]].table(result)


__all__ = ["TASKS", "EvalError", "PlotsUnavailable", "options_to_argv", "parse_options", "run_eval", "table"]
