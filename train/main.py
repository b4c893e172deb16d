"""Command line: `effarch train CONFIG... [key=value ...]`, `effarch generate RUN_DIR [options]`,
`effarch convert RUN_DIR OUT_DIR --to NAME [option=value ...]`, and `effarch import-hf PATH RUN_DIR` /
`effarch export-hf RUN_DIR PATH` (Hugging Face Llama checkpoints, train/hf.py), and the evaluation suite
(train/evals/): `effarch eval RUN_DIR TASK [options]`, `effarch sweep SWEEP.yaml`, `effarch report DIR`, and
`effarch plan CONFIG... --topology NAME` (compile the training step for a TPU slice from this host, train/plan.py),
and `effarch moa-search RUN_DIR --density D --out plan.json` (MoA's per-head span plan, train/moa_search.py), and
`effarch heads RUN_DIR` (each attention head's retrieval score and the masking test, train/heads.py).

Bad input (an unknown config key, a wrong type, an out-of-range value, a missing file or checkpoint, a path that
cannot be read or written) exits with status 2 and one line naming what was wrong, without a traceback; Ctrl-C
before training has installed its own handler (which checkpoints, then stops) exits 2 with one line, like any
other command that did not do what was asked.

On a CPU-only host the command first tunes glibc's malloc to keep freed memory in the process (train/host_malloc.py;
EFFARCH_HOST_MALLOC=0 turns that off).
"""

import argparse
import contextlib
import json
import logging
import math
import os
import sys

USAGE = """usage:
  effarch train CONFIG.yaml [MORE.yaml ...] [key=value ...]
      e.g. effarch train configs/mqar/attention.yaml model.d_model=128
  effarch generate RUN_DIR [--prompt "1 2 3" | --text "abc"] [--max-new-tokens N] [--temperature T] [--seed S]
                   [--kv-policy NAME [OPT=VALUE ...]]
      # --kv-policy: decode reading each attention layer's KV cache through a policy (window, quest, retrieval,
      # tokenselect, tidal, recycled, longheads, act, razor, duo; options e.g. budget=N; razor heads=HEADS.json
      # from effarch heads)
      e.g. effarch generate runs/passkey --prompt "1 2 3" --kv-policy quest budget=256
  effarch convert RUN_DIR OUT_DIR --to {moh,diffqkv,sparse_attention,attention,merged,duo_hard} [option=value ...]
      # merged: a LoRA run's adapters folded; attention: sparse_attention back to dense; duo_hard: DuoAttention
      # gates set to 1 (full heads: full=P or threshold=T, as --kv-policy duo) or 0 (streaming heads)
      e.g. effarch convert runs/base runs/base_moh --to moh; then fine-tune it with
           effarch train CONFIG.yaml train.init_from=runs/base_moh
  effarch moa-search RUN_DIR --density D --out plan.json [--calibration-batches N] [--lengths N ...] [--block B]
      # MoA: profile a trained attention run, pick alpha + beta*N spans per layer and KV head under a density budget
      e.g. effarch moa-search runs/base --density 0.25 --out plan.json; then
           effarch convert runs/base runs/base_moa --to sparse_attention pattern=moa plan=plan.json
  effarch act-search RUN_DIR --out act.json [--calibration-batches N] [--beta B] [--tau T] [--min-gain NATS]
      # ACT: the heads whose attention calibration lowers the loss on the run's own data; then
      # effarch eval RUN_DIR perplexity --kv-policy act calibration=act.json
  effarch import-hf HF_CHECKPOINT_DIR RUN_DIR     # a local Llama checkpoint -> an effarch run dir at step 0
  effarch export-hf RUN_DIR HF_CHECKPOINT_DIR [--dtype float32|bfloat16] [--max-shard-mb N]
  effarch eval RUN_DIR {perplexity,mqar,passkey,niah} [options]     # results in RUN_DIR/eval/; --help per task
      e.g. effarch eval runs/mqar_based mqar --segments 256x16 1024x256
      passkey, niah, perplexity take --kv-policy NAME [OPT=VALUE ...] (result: <task>.kv-<name>-<options>.json)
  effarch heads RUN_DIR [--task passkey|niah] [--lengths N ...] [--trials N] [--mask-top P] [--out DIR]
      # each attention head's retrieval score (Retrieval Head paper) as a table, JSON and heatmap (RUN_DIR/heads/);
      # --mask-top P: accuracy with the top P% heads masked vs as many random heads; razor's heads=JSON reads it
  effarch sweep SWEEP.yaml [--jobs N] [--sweep-dir DIR] [--only NAME ...] [--dry-run | --collect]
      # train a grid in parallel, evaluate each run, pick the best; skips finished runs, resumes interrupted ones
  effarch report DIR                                 # markdown table of the eval results under a run or sweep dir
  effarch plan CONFIG.yaml [MORE.yaml ...] [key=value ...] --topology NAME [--num-slices N] [--json]
      # compile the training step for a TPU slice from this host: memory per chip, fits or not, estimated step
      # time; exit 0 fits, 1 does not fit, 2 bad input, 3 the step did not compile
      e.g. effarch plan configs/lm/quickstart.yaml mesh.fsdp=-1 --topology v5p:4x4x4"""


class _OrbaxTracebacks(logging.Filter):
    """Drops the log records that Orbax's code emits (through absl): every failure they describe reaches effarch as
    an exception, which is reported as one line (a full disk printed five tracebacks before). absl names its own
    module as the record's origin, so the caller is found on the stack."""

    def filter(self, record: logging.LogRecord) -> bool:
        frame = sys._getframe(1)
        while frame is not None:
            if f"{os.sep}orbax{os.sep}" in frame.f_code.co_filename:
                return False
            frame = frame.f_back
        return True


def _quiet_closed_loops(hook):
    def quiet(unraisable):
        if isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed":
            return
        hook(unraisable)

    return quiet


@contextlib.contextmanager
def console_logging():
    """The library's INFO lines (logger "effarch": resume notices, changed settings, where `resume=never` moved the
    old run, the `train.init_from` report) on stderr as `effarch: ...` lines.

    absl, imported by Orbax, puts its handler on the root logger at import, which makes `logging.basicConfig` a
    no-op and leaves the root at WARNING, so the "effarch" logger gets a handler of its own and does not propagate
    (absl's handler would print each line a second time). Restored on exit, so an in-process caller (the tests)
    keeps its logging as it was.
    """
    logger, absl = logging.getLogger("effarch"), logging.getLogger("absl")
    saved = logger.level, logger.propagate, absl.level
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("effarch: %(message)s"))
    orbax_filter = _OrbaxTracebacks()
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    absl.setLevel(logging.WARNING)
    absl.addFilter(orbax_filter)
    # Orbax's asyncio loops: after a failed save (a full disk) their leftover futures and callbacks print
    # "Future exception was never retrieved" and "Event loop is closed" tracebacks; the save's own error is reported.
    asyncio_logger = logging.getLogger("asyncio")
    saved_asyncio, saved_hook = asyncio_logger.level, sys.unraisablehook
    asyncio_logger.setLevel(logging.CRITICAL)
    sys.unraisablehook = _quiet_closed_loops(saved_hook)
    try:
        yield
    finally:
        asyncio_logger.setLevel(saved_asyncio)
        sys.unraisablehook = saved_hook
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
        absl.setLevel(saved[2])
        absl.removeFilter(orbax_filter)


def _fail(msg: str, code: int = 2):
    print(f"effarch: error: {msg}", file=sys.stderr)
    sys.exit(code)


def train_cli(argv: list[str]) -> None:
    from effarch.train.config import ConfigError, load_config

    # key=value is an override, unless a file of that name exists (a config named a=b.yaml).
    overrides = [a for a in argv if "=" in a and not os.path.isfile(a)]
    files = [a for a in argv if a not in overrides]
    if not files:
        _fail("train needs at least one CONFIG.yaml\n" + USAGE)
    try:
        cfg = load_config(files, overrides)
    except ConfigError as e:
        _fail(str(e))

    import jax

    from effarch.train.train import SaveFailed, TrainingDiverged, maybe_initialize_distributed, train_and_evaluate

    maybe_initialize_distributed()
    print(f"effarch: {jax.device_count()} device(s) ({jax.default_backend()}), run dir {cfg.train.run_dir}",
          file=sys.stderr)
    try:
        result = train_and_evaluate(cfg)
    except (ConfigError, SaveFailed) as e:  # a save that failed (disk full...) names the last good checkpoint
        _fail(str(e))
    except TrainingDiverged as e:  # the run stopped; its last good checkpoint is named
        _fail(str(e), code=3)
    tm, em = result.train_metrics, result.eval_metrics
    parts = [f"step {result.step}/{cfg.train.steps}"]
    if tm:
        parts.append(f"train loss {tm['loss']:.4f}")
    if em:
        parts.append(f"test accuracy {em['eval/accuracy']:.4f}")
    parts += [f"{k.split('/')[1]} bits/byte {v:.3f}" for k, v in em.items() if k.endswith("/bits_per_byte")]
    parts += [f"stopped by {result.stopped_by}", f"wall {result.wall_time_s:.1f}s", f"run dir {result.run_dir}"]
    print("effarch: done: " + ", ".join(parts))
    if cfg.data.task == "text" and cfg.train.sample_tokens and jax.process_index() == 0:
        from effarch.train.generate import sample_text

        prompt, continuation = sample_text(result.run_dir, max_new_tokens=cfg.train.sample_tokens)
        print(f"effarch: sample (temperature 0.7): {prompt!r} -> {continuation!r}")


def generate_cli(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="effarch generate")
    p.add_argument("run_dir")
    p.add_argument("--prompt", help="space-separated token ids, e.g. '12 7 4013'")
    p.add_argument("--text", help="a UTF-8 string, fed as byte tokens (for byte-level models)")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kv-policy", nargs="+", metavar="NAME [OPT=VALUE]", default=None,
                   help="decode through a KV policy (window, quest, retrieval, tokenselect, tidal, recycled, "
                        "longheads, act, razor, duo) with option=value settings, e.g. --kv-policy quest budget=256 "
                        "(layers/kv_policies/)")
    args = p.parse_args(argv)
    policy = None
    if args.kv_policy:
        from effarch.layers.kv_policies import PolicyError, make_policy

        try:
            policy = make_policy(args.kv_policy[0], args.kv_policy[1:])
        except PolicyError as e:
            _fail(f"--kv-policy: {e}")
    if (args.prompt is None) == (args.text is None):
        _fail("generate needs exactly one of --prompt (token ids) or --text (bytes)")
    if args.max_new_tokens < 1:
        _fail(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        _fail(f"--temperature must be a finite number >= 0 (0 = greedy), got {args.temperature}")

    import numpy as np
    from flax import nnx

    from effarch.arches.lm import DecoderLM
    from effarch.train.config import ConfigError
    from effarch.train.data.tokenizers import text_tokenizer
    from effarch.train.generate import check_reach, generate, load_run, load_run_config

    # Every check on the config alone, before the checkpoint is restored.
    try:
        run_cfg = load_run_config(args.run_dir)
    except ConfigError as e:
        _fail(str(e))
    if args.text is not None and run_cfg.data.task not in ("text", "bytes"):
        from pathlib import Path

        info = Path(args.run_dir) / "run_info.json"
        imported = info.is_file() and "imported_from" in info.read_text()
        what = ("was imported from Hugging Face without a tokenizer.json (its tokens are ids of a tokenizer effarch "
                "was not given)" if imported
                else f"was trained on data.task {run_cfg.data.task}, whose tokens are not text")
        _fail(f"--text needs a model trained on text (data.task text or bytes); {args.run_dir} {what}: give token "
              "ids with --prompt")
    # A text-task model reads and writes its tokenizer's ids; the bytes task's are the bytes themselves.
    try:
        tokenizer = text_tokenizer(run_cfg.data.text) if run_cfg.data.task == "text" else None
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e))
    if args.text is not None and tokenizer is not None:
        ids = [int(t) for t in tokenizer.encode(args.text.encode("utf-8"))]
        if run_cfg.data.text.bos:  # every training window started with it (train/data/packing.py)
            from effarch.train.data.text_stream import bos_id

            ids = [bos_id(run_cfg.data.text, tokenizer), *ids]
    elif args.text is not None:
        ids = list(args.text.encode("utf-8"))
    else:
        try:
            ids = [int(t) for t in args.prompt.split()]
        except ValueError:
            _fail(f"--prompt must be space-separated integers, got {args.prompt!r}")
    vocab = run_cfg.model.vocab_size
    if not ids or min(ids) < 0 or max(ids) >= vocab:
        _fail(f"prompt token ids must be in [0, {vocab}), got {ids}")
    try:
        check_reach(nnx.eval_shape(lambda: DecoderLM(run_cfg.model, rngs=nnx.Rngs(0))), 1, len(ids),
                    args.max_new_tokens)
    except ValueError as e:
        _fail(f"--max-new-tokens: {e}")
    if policy is not None:
        try:  # on the abstract model first: a mixer that takes no policy fails before the checkpoint is read
            nnx.eval_shape(lambda: DecoderLM(run_cfg.model, rngs=nnx.Rngs(0))).set_kv_policy(policy)
        except ValueError as e:
            _fail(f"--kv-policy: {e}")
    try:
        _, model = load_run(args.run_dir)
    except ConfigError as e:
        _fail(str(e))
    if policy is not None:
        model.set_kv_policy(policy)
    out = generate(model, np.array([ids]), args.max_new_tokens, temperature=args.temperature, seed=args.seed)[0]
    if args.text is not None and tokenizer is not None:
        print(tokenizer.decode(out))
    elif args.text is not None:
        print(bytes(int(t) % 256 for t in out).decode("utf-8", errors="replace"))
    else:
        print(" ".join(str(int(t)) for t in out))


def convert_cli(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="effarch convert")
    p.add_argument("run_dir")
    p.add_argument("out_dir")
    p.add_argument("--to", required=True)
    p.add_argument("options", nargs="*", help="option=value arguments of the conversion function")
    args = p.parse_intermixed_args(argv)  # options may follow --to

    from effarch.train.config import ConfigError
    from effarch.train.convert import convert_run

    try:
        out = convert_run(args.run_dir, args.out_dir, args.to, args.options)
    except ConfigError as e:
        _fail(str(e))
    print(f"effarch: converted {args.run_dir} to {args.to}: {out}")


def moa_search_cli(argv: list[str]) -> None:
    from effarch.train.config import ConfigError
    from effarch.train.moa_search import main as moa_search

    try:
        result = moa_search(argv)
    except ConfigError as e:
        _fail(str(e))
    plan = result.plan
    densities = ", ".join(f"{d:.3f} at N={n}" for n, d in plan["plan_density"].items())
    rules = {(a, b) for layer in plan["layers"] if layer for a, b in zip(layer["alpha"], layer["beta"], strict=True)}
    print(f"effarch: moa plan for {plan['source_run']} (checkpoint step {plan['checkpoint_step']}): density "
          f"{densities} (budget {plan['density']}), {len(rules)} distinct rule(s) (alpha, beta): "
          f"{sorted(rules)}: {result.plan_path}")


def act_search_cli(argv: list[str]) -> None:
    from effarch.train.act_search import main as act_search
    from effarch.train.config import ConfigError

    try:
        result = act_search(argv)
    except ConfigError as e:
        _fail(str(e))
    heads = ", ".join(f"{a}:{b}" for a, b in result["heads"]) or "none"
    print(f"effarch: act calibration for {result['source_run']} (checkpoint step {result['checkpoint_step']}): "
          f"heads {heads} (beta {result['beta']}, tau {result['tau']}; full-cache loss "
          f"{result['baseline']['loss']:.4f})")


def import_hf_cli(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="effarch import-hf")
    p.add_argument("path", help="Hugging Face checkpoint directory (config.json + *.safetensors)")
    p.add_argument("run_dir", help="new effarch run directory to write")
    p.add_argument("--seed", type=int, default=0, help="train.seed of the written run")
    args = p.parse_args(argv)
    from effarch.train.hf import import_hf

    try:  # HFConfigError and ConfigError are ValueErrors whose message names the field
        cfg = import_hf(args.path, args.run_dir, seed=args.seed)
    except ValueError as e:
        _fail(str(e))
    m = cfg.model
    print(f"effarch: imported {args.path} -> {args.run_dir}: {m.n_layers} layers, d_model {m.d_model}, "
          f"vocab {m.vocab_size}")


def export_hf_cli(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="effarch export-hf")
    p.add_argument("run_dir")
    p.add_argument("path", help="new Hugging Face checkpoint directory to write")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--max-shard-mb", type=float, default=None, help="split the weights into shards of this size")
    args = p.parse_args(argv)
    from effarch.train.hf import export_hf

    shard = None if args.max_shard_mb is None else int(args.max_shard_mb * 2**20)
    try:
        out = export_hf(args.run_dir, args.path, dtype=args.dtype, max_shard_bytes=shard)
    except ValueError as e:
        _fail(str(e))
    print(f"effarch: exported {args.run_dir} -> {out}")


def heads_cli(argv: list[str]) -> None:
    if not argv:
        _fail("heads needs RUN_DIR; options: effarch heads --help")
    from effarch.train.config import ConfigError
    from effarch.train.heads import run_heads, table

    try:
        result = run_heads(argv)
    except ConfigError as e:
        _fail(str(e))
    print(table(result))
    png = f" and {result['png']}" if result.get("png") else ""
    print(f"effarch: heads of {result['run_dir']} (checkpoint step {result['checkpoint_step']}, task {result['task']}) "
          f"in {result['wall_s']:.1f}s: {result['file']}{png}")


def eval_cli(argv: list[str]) -> None:
    if argv[:1] in (["-h"], ["--help"]):
        print(USAGE)
        sys.exit(0)
    if len(argv) < 2:
        _fail("eval needs RUN_DIR and a TASK (perplexity, mqar, passkey, niah); a task's options: effarch eval "
              "RUN_DIR TASK --help")
    from effarch.train.config import ConfigError
    from effarch.train.evals import run_eval, table

    run_dir, task, rest = argv[0], argv[1], argv[2:]
    try:
        result = run_eval(run_dir, task, rest)
    except ConfigError as e:
        _fail(str(e))
    print(table(result))
    saved = f"{run_dir}/eval/{result.get('file', task + '.json')}" + (f" and {result['png']}" if result.get("png")
                                                                        else "")
    print(f"effarch: {task} of {run_dir} (checkpoint step {result['checkpoint_step']}) in {result['wall_s']:.1f}s: "
          f"{saved}")


def sweep_cli(argv: list[str]) -> None:
    from effarch.train.config import ConfigError
    from effarch.train.evals import sweep

    try:
        sys.exit(sweep.main(argv))
    except ConfigError as e:
        _fail(str(e))


def report_cli(argv: list[str]) -> None:
    from effarch.train.config import ConfigError
    from effarch.train.evals import report

    if argv[:1] in (["-h"], ["--help"]):
        print(USAGE)
        sys.exit(0)
    if len(argv) != 1:
        _fail("report needs exactly one DIR (a run directory or a sweep directory)")
    try:
        print(report.report(argv[0]))
    except ConfigError as e:
        _fail(str(e))


def plan_cli(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="effarch plan", description="Compile CONFIG's training and decode steps for a "
                                "TPU slice (compiled on this host, not run) and report memory per chip and the "
                                "compiler's estimates. Exit 0: fits; 1: does not fit; 2: bad input; 3: a step did "
                                "not compile.")
    p.add_argument("config", nargs="*", help="CONFIG.yaml [MORE.yaml ...] [key=value ...]")
    p.add_argument("--topology", required=True, help="the slice, e.g. v5e:2x2, v5p:4x4x4, v6e:16x16")
    p.add_argument("--num-slices", type=int, default=1, help="slices of that topology (multislice)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the text report")
    args = p.parse_intermixed_args(argv)
    # The plan needs no local device: JAX on the CPU, so that a TPU host's chips are not opened (a training run may
    # hold them) and libtpu does not look for a chip on a host without one. Before jax is imported.
    os.environ["JAX_PLATFORMS"] = "cpu"
    from effarch.train.config import ConfigError, load_config
    from effarch.train.plan import (
        PlanError,
        check_plan_input,
        format_report,
        parse_topology,
        run_in_subprocess,
        topology_devices,
    )

    overrides = [a for a in args.config if "=" in a and not os.path.isfile(a)]
    files = [a for a in args.config if a not in overrides]
    if not files:
        _fail("plan needs at least one CONFIG.yaml\n" + USAGE)
    try:  # every check that needs no compiler, here; the compile runs in a child that a compiler abort may kill
        topo = parse_topology(args.topology, args.num_slices)
        check_plan_input(load_config(files, overrides), topo, topology_devices(topo))
    except (ConfigError, PlanError) as e:
        _fail(str(e))
    out = run_in_subprocess(files, overrides, args.topology, args.num_slices)
    if "error" in out:
        _fail(out["error"], code=out["code"])
    report = out["report"]
    print(json.dumps(report, indent=1) if args.json else format_report(report, " ".join(args.config)))
    sys.exit(0 if report["fits"] else 1)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        sys.exit(0 if argv else 2)
    cmd, rest = argv[0], argv[1:]
    # Before JAX starts its threads: freed host memory stays in the process (train/host_malloc.py)
    from effarch.train.host_malloc import retain_freed_memory
    retain_freed_memory()
    commands = {"train": train_cli, "generate": generate_cli, "convert": convert_cli, "import-hf": import_hf_cli,
                "export-hf": export_hf_cli, "eval": eval_cli, "sweep": sweep_cli, "report": report_cli,
                "plan": plan_cli, "moa-search": moa_search_cli, "act-search": act_search_cli, "heads": heads_cli}
    if cmd not in commands:
        _fail(f"unknown command {cmd!r}\n" + USAGE)
    try:
        with console_logging():
            commands[cmd](rest)
    except OSError as e:  # a path that cannot be read or written: the path and why, not a traceback
        _fail(os_error_message(e))
    except KeyboardInterrupt:  # Ctrl-C before training installs its own handler (which checkpoints and stops)
        _fail(f"{cmd} interrupted (Ctrl-C) before it started; nothing was written")


def os_error_message(e: OSError) -> str:
    """One line for an OSError: the path and what is wrong with it."""
    path = e.filename
    if path is None:
        return e.strerror or str(e)
    if isinstance(e, FileExistsError) and not os.path.isdir(path):
        return f"{path}: exists and is not a directory"
    if isinstance(e, NotADirectoryError):
        return f"{path}: a part of this path is a file, not a directory"
    if isinstance(e, PermissionError):
        return f"{path}: permission denied (check the permissions of it and of its directory)"
    return f"{path}: {e.strerror or e}"


if __name__ == "__main__":
    main()
