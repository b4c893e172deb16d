"""`effarch plan`: compile a config's training and decode steps for a TPU slice that is not there (docs/planning.md).

With the `libtpu` wheel, `jax.experimental.topologies.get_topology_desc` describes a named slice (e.g. v5p:4x4x4)
and XLA's TPU compiler compiles for its devices from a CPU host. `plan` builds the model and the optimizer state
abstractly (`nnx.eval_shape`, `jax.eval_shape(tx.init)`: nothing is allocated), lays the config's mesh and sharding
rules over the slice's devices with the project's own `Trainer(cfg, devices)`, and compiles exactly the jitted step
that `effarch train` runs (`Trainer._train_step_checked`) plus one decode step of the model. The compiled program's
memory analysis gives the bytes per device; its cost analysis the FLOPs and the compiler's roofline step time.
Every number is the compiler's estimate for a program that was compiled, never run.

A compiler abort (libtpu's `Check failed`, SIGABRT) kills the process that compiles, so the CLI runs `plan` in a
child process (`run_in_subprocess`: `python -m effarch.train.plan --child`) and turns a signal into one line. Other
callers (tests, benchmarks) should do the same: one subprocess per config.
"""

import contextlib
import dataclasses
import importlib.util
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import warnings

GiB = 2**30
INSTALL = "pip install 'effarch[tpu]'"


@dataclasses.dataclass(frozen=True)
class Chip:
    peak_bf16_flops: float  # per chip, dense bf16 matmuls
    hbm_bytes: int  # per chip
    hbm_bytes_per_s: float  # per chip
    chip_config_name: str  # get_topology_desc's: "megacore" makes one device of a chip's two TensorCores
    dims: int  # the topology name's dimensions (2-D torus for v5e / v6e, 3-D for v4 / v5p)


# Per-chip peak bf16 FLOP/s, HBM capacity and bandwidth from the Cloud TPU documentation's system-architecture
# pages ("TPU v4", "TPU v5e", "TPU v5p", "TPU v6e": "Peak compute per chip (bf16)", "HBM capacity per chip", "HBM
# bandwidth per chip"; the v5p page's 459 TFLOPs, 95 GiB and 2765 GBps checked 2026-12, the others as published).
# One device per chip: v4 and v5p as megacore (both TensorCores one device), v5e and v6e have one TensorCore.
CHIPS: dict[str, Chip] = {
    "v4": Chip(275e12, 32 * GiB, 1200e9, "megacore", 3),
    "v5e": Chip(197e12, 16 * GiB, 819e9, "default", 2),
    "v5p": Chip(459e12, 95 * GiB, 2765e9, "megacore", 3),
    "v6e": Chip(918e12, 32 * GiB, 1640e9, "default", 2),
}
TOPOLOGY_FORMS = "v4:AxBxC, v5p:AxBxC, v5e:AxB or v6e:AxB (chips per dimension, e.g. v5p:4x4x4, v5e:2x2, v6e:16x16)"
EXIT_FITS, EXIT_DOES_NOT_FIT, EXIT_BAD_INPUT, EXIT_NO_COMPILE = 0, 1, 2, 3


class PlanError(ValueError):
    """Bad input to the plan (topology, mesh, batch, a missing libtpu): one line, exit 2."""


class CompileFailed(RuntimeError):
    """The TPU compiler failed (raised or aborted) on a step: one line, exit 3."""


class HbmOom(RuntimeError):
    """The TPU compiler refused a program whose temporaries exceed the chip's HBM (CompileTimeHbmOom): the plan
    reports it as does-not-fit, with the sizes from the compiler's message."""

    def __init__(self, message: str, temporaries: int, available: int):
        super().__init__(message)
        self.temporaries, self.available = temporaries, available


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str  # as given, e.g. "v5p:4x4x4"
    generation: str  # a CHIPS key
    shape: tuple[int, ...]  # chips per dimension
    num_slices: int

    @property
    def chip(self) -> Chip:
        return CHIPS[self.generation]

    @property
    def chips_per_slice(self) -> int:
        return math.prod(self.shape)

    @property
    def devices(self) -> int:
        return self.chips_per_slice * self.num_slices

    @property
    def chips_per_host_bounds(self) -> tuple[int, int, int]:
        """Chips per host: 2x2x1 (4-chip hosts) in general; a v5e / v6e slice of at most 8 chips is one host
        (v5litepod-8 and v6e-8 are single 8-chip machines)."""
        shape3 = (*self.shape, 1) if len(self.shape) == 2 else self.shape
        if self.chip.dims == 2 and self.chips_per_slice <= 8:
            return shape3
        return tuple(min(d, b) for d, b in zip(shape3, (2, 2, 1), strict=True))

    @property
    def processes(self) -> int:
        """One process per host, as `jax.distributed` runs on a slice."""
        return self.devices // math.prod(self.chips_per_host_bounds)


def parse_topology(name: str, num_slices: int = 1) -> Topology:
    m = re.fullmatch(r"(v\w+):(\d+(?:x\d+)*)", name.strip())
    if not m or m.group(1) not in CHIPS:
        raise PlanError(f"--topology {name!r}: unknown topology; known forms: {TOPOLOGY_FORMS}")
    gen, shape = m.group(1), tuple(int(d) for d in m.group(2).split("x"))
    if len(shape) != CHIPS[gen].dims or min(shape) < 1:
        raise PlanError(f"--topology {name!r}: a {gen} topology has {CHIPS[gen].dims} dimensions of at least 1 chip; "
                        f"known forms: {TOPOLOGY_FORMS}")
    if num_slices < 1:
        raise PlanError(f"--num-slices must be >= 1, got {num_slices}")
    return Topology(name.strip(), gen, shape, num_slices)


def require_libtpu() -> None:
    if importlib.util.find_spec("libtpu") is None:
        raise PlanError(f"libtpu is not installed (it compiles for TPU on this host): {INSTALL}")


@contextlib.contextmanager
def _libtpu_init_logs_dropped():
    """libtpu's C++ start-up writes to the process's stderr (fd 2) on a host without a TPU (no TPU_ACCELERATOR_TYPE,
    no worker hostnames): harmless for compiling, and noise before the plan's own lines, so it goes to a dropped
    temporary file. Python's errors are raised, not printed, and are unaffected."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def topology_devices(topo: Topology) -> list:
    """The slice's devices (abstract: nothing is there), or PlanError with libtpu's own reason."""
    require_libtpu()
    # libtpu takes /tmp/libtpu_lockfile for a process that drives the host's chips; this one only compiles, and must
    # not fail because a training run on this TPU host (or another compile) holds the lock.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    try:
        with _libtpu_init_logs_dropped():
            desc = topologies.get_topology_desc(platform="tpu", topology_name=topo.name,
                                                chip_config_name=topo.chip.chip_config_name,
                                                chips_per_host_bounds=topo.chips_per_host_bounds,
                                                num_slices=topo.num_slices)
    except Exception as e:  # libtpu's INVALID_ARGUMENT (e.g. a shape its hosts do not divide) as one line
        raise PlanError(f"--topology {topo.name}: {_first_line(e)}") from None
    return list(desc.devices)


# --- the report ------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class StepReport:
    """One compiled step, per device (the SPMD program each chip runs)."""

    arguments: int
    outputs: int
    aliased: int  # outputs written into donated arguments (counted once)
    temporaries: int
    generated_code: int
    flops: float | None  # per device; None where the cost analysis has none
    bytes_accessed: float | None  # per device, HBM traffic as the cost analysis counts it
    optimal_seconds: float | None  # the compiler's roofline estimate; None where it is unknown (negative)
    largest: list[tuple[int, str]]  # (bytes, description) of the largest arrays the compiled program holds
    # Set when the compiler refused the program for HBM (CompileTimeHbmOom): its message. Then `temporaries` is the
    # compiler's stated need, `arguments` is computed from the shardings, and nothing else is known.
    compiler_oom: str | None = None
    kernels: int = 0  # Pallas (Mosaic) kernel calls in the compiled program

    @property
    def total(self) -> int:
        return self.arguments + self.outputs - self.aliased + self.temporaries + self.generated_code


@dataclasses.dataclass
class PlanReport:
    topology: str
    num_slices: int
    devices: int
    processes: int
    device_kind: str
    mesh: dict[str, int]
    mixers: list[str]
    params: int
    param_bytes: int  # per device: the float32 parameters' shards
    optimizer_bytes: int  # per device: the optimizer state's shards
    batch_size: int
    seq_len: int
    hbm_bytes: int
    peak_bf16_flops: float
    train: StepReport
    decode: StepReport | None  # None: not compiled (plan(..., decode=False))
    decode_batch: int
    largest_leaves: list[tuple[int, str]]  # (bytes per device, path) of the largest parameter / optimizer leaves
    advice: list[str]

    @property
    def fits(self) -> bool:
        return self.train.compiler_oom is None and self.train.total <= self.hbm_bytes

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    @property
    def flops_per_step(self) -> float | None:
        return None if self.train.flops is None else self.train.flops * self.devices

    @property
    def roofline_step_s(self) -> float | None:
        """max(FLOPs / peak, bytes accessed / HBM bandwidth) per device from the compiler's counts: a lower bound
        that needs no cost model (collectives and loop trip counts are not in it)."""
        t, chip = self.train, CHIPS[self.topology.split(":")[0]]
        if t.flops is None or t.bytes_accessed is None:
            return None
        return max(t.flops / chip.peak_bf16_flops, t.bytes_accessed / chip.hbm_bytes_per_s)

    @property
    def tokens_per_s_per_chip(self) -> float | None:
        s = self.train.optimal_seconds
        return None if not s else self.tokens_per_step / s / self.devices

    @property
    def mfu(self) -> float | None:
        """Compiler FLOPs / (estimated step time x peak bf16 FLOP/s): an estimate (counts rematerialised work)."""
        s, f = self.train.optimal_seconds, self.train.flops
        return None if not s or f is None else f / s / self.peak_bf16_flops

    def to_json(self) -> dict:
        t = self.train
        return {
            "topology": self.topology, "num_slices": self.num_slices, "devices": self.devices,
            "processes": self.processes, "device_kind": self.device_kind, "mesh": self.mesh, "mixers": self.mixers,
            "params": self.params, "batch_size": self.batch_size, "seq_len": self.seq_len,
            "per_device_bytes": {"arguments": t.arguments, "outputs": t.outputs, "aliased": t.aliased,
                                 "temporaries": t.temporaries, "generated_code": t.generated_code,
                                 "total": t.total, "parameters": self.param_bytes,
                                 "optimizer_state": self.optimizer_bytes},
            "hbm_bytes": self.hbm_bytes, "fits": self.fits,
            "flops_per_step": self.flops_per_step, "estimated_step_s": t.optimal_seconds,
            "estimated_tokens_per_s_per_chip": self.tokens_per_s_per_chip, "estimated_mfu": self.mfu,
            "roofline_step_s": self.roofline_step_s, "bytes_accessed_per_device": t.bytes_accessed,
            "model_flops_per_step": 6 * self.params * self.tokens_per_step,
            "peak_bf16_flops_per_chip": self.peak_bf16_flops,
            "largest_buffers": [{"bytes": b, "what": w} for b, w in t.largest],
            "compiler_oom": t.compiler_oom, "pallas_kernels": t.kernels,
            "largest_leaves": [{"bytes": b, "path": p} for b, p in self.largest_leaves],
            "advice": self.advice,
            "decode": None if self.decode is None else {
                "batch": self.decode_batch, "cache_len": self.seq_len, "per_device_bytes": self.decode.total,
                "fits": self.decode.compiler_oom is None and self.decode.total <= self.hbm_bytes,
                "estimated_step_s": self.decode.optimal_seconds},
        }


# --- compiling ------------------------------------------------------------------------------------------------
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f32": 4,
                "s64": 8, "u64": 8, "f64": 8, "f8e4m3fn": 1, "f8e5m2": 1, "s4": 1, "u4": 1}
_INSTR_RE = re.compile(r"^\s*(?:ROOT )?%?([\w.-]+) = (\w+)\[([\d,]*)\][^ ]* (\w[\w-]*)\(")
_OPNAME_RE = re.compile(r'op_name="([^"]*)"')


def largest_arrays(hlo_text: str, n: int = 5) -> list[tuple[int, str]]:
    """The `n` largest arrays that the compiled (per-device) program materialises, from its HLO text: the results
    of instructions outside fusion bodies (a fusion's inner values live in registers / VMEM), parameters excluded
    (they are the arguments). Not a liveness analysis: they need not all be live at once."""
    found: dict[str, int] = {}
    in_fusion = False
    for line in hlo_text.splitlines():
        if line and not line[0].isspace() and line.rstrip().endswith("{"):
            in_fusion = "fused" in line.split("(")[0] or "fusion" in line.split("(")[0].split(" ")[0]
            continue
        m = _INSTR_RE.match(line)
        if in_fusion or not m or m.group(4) in ("parameter", "get-tuple-element", "bitcast", "tuple", "constant"):
            continue
        dtype, dims = m.group(2), m.group(3)
        size = _DTYPE_BYTES.get(dtype, 4) * math.prod(int(d) for d in dims.split(",") if d)
        op = _OPNAME_RE.search(line)
        what = f"{dtype}[{dims}] {op.group(1) if op else m.group(4)}"
        found[what] = max(found.get(what, 0), size)
    return sorted(((b, w) for w, b in found.items()), reverse=True)[:n]


def _step_report(compiled) -> StepReport:
    ma = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = (cost[0] if cost else {}) if isinstance(cost, (list, tuple)) else (cost or {})
    flops = cost.get("flops", -1)
    seconds = cost.get("optimal_seconds")
    try:
        text = compiled.as_text()
        largest, kernels = largest_arrays(text), text.count('custom_call_target="tpu_custom_call"')
    except Exception:  # the HLO text is a convenience; the memory analysis is the measure
        largest, kernels = [], 0
    return StepReport(
        arguments=int(ma.argument_size_in_bytes), outputs=int(ma.output_size_in_bytes),
        aliased=int(ma.alias_size_in_bytes), temporaries=int(ma.temp_size_in_bytes),
        generated_code=int(ma.generated_code_size_in_bytes),
        flops=float(flops) if flops is not None and flops >= 0 else None,
        bytes_accessed=float(cost["bytes accessed"]) if cost.get("bytes accessed", -1) >= 0 else None,
        optimal_seconds=float(seconds) if seconds is not None and seconds > 0 else None, largest=largest,
        kernels=kernels)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


def plan_window(cfg) -> int:
    """Tokens per training sequence: data.seq_len, or an MQAR mixture's longest training segment."""
    if cfg.data.task != "mqar":
        return cfg.data.seq_len
    from effarch.train.data import mqar_segments

    return max(s[0] for s in mqar_segments(cfg.data)[0])


def check_plan_input(cfg, topo: Topology, devices: list) -> None:
    """Every check that needs no compiler: the model builds (abstractly, for the slice's `devices`, so that kernel
    choice follows their platform), the mesh divides the slice's devices, and the batch divides over the batch axes
    and the slice's processes. PlanError naming the keys."""
    from effarch.train.checks import check_model, check_runtime
    from effarch.train.config import ConfigError

    try:
        check_model(cfg, devices)
    except ConfigError as e:
        raise PlanError(str(e)) from None
    except NotImplementedError as e:  # an implementation that cannot run on the slice's platform
        raise PlanError(f"model: {_first_line(e).removeprefix('NotImplementedError: ')}") from None
    try:
        check_runtime(cfg, range(topo.devices), processes=topo.processes)
    except ConfigError as e:
        raise PlanError(f"{e} (on {topo.name}: {topo.devices} devices, {topo.processes} processes)") from None


def plan(cfg, topology: str | Topology, num_slices: int = 1, *, decode: bool = True,
         stage=lambda name: None) -> PlanReport:
    """Compiles `cfg`'s training step and one decode step for `topology` and reports memory, FLOPs and time.

    In-process: a compiler abort kills the caller, so run it in a subprocess per config (`run_in_subprocess`).
    JAX_PLATFORMS=cpu must be set before jax is imported (a TPU host's chips are not needed, nor opened).
    `decode=False` skips the decode step. `stage(name)` is called before each compile ("train", "decode").
    Raises PlanError (bad input) or CompileFailed (the compiler raised).
    """
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from effarch.layers.trained_state import SAVED
    from effarch.train import param_tree
    from effarch.train.health import init_health
    from effarch.train.lora import build_model
    from effarch.train.train import Trainer

    topo = parse_topology(topology, num_slices) if isinstance(topology, str) else topology
    devices = topology_devices(topo)
    check_plan_input(cfg, topo, devices)
    processes = len({d.process_index for d in devices})
    if len(devices) != topo.devices or processes != topo.processes:
        raise PlanError(f"--topology {topo.name}: libtpu describes {len(devices)} devices on {processes} hosts, "
                        f"expected {topo.devices} on {topo.processes}")
    mixers = list(dict.fromkeys(cfg.model.mixers))
    trainer = Trainer(cfg, devices)
    abstract = nnx.eval_shape(lambda: build_model(cfg, nnx.Rngs(0)))  # the trainer's model, adapters included
    _, abstract_params, abstract_rest = nnx.split(abstract, SAVED, ...)  # as the Trainer splits it
    # The non-parameter state (e.g. MoH's AuxLoss scalars) is closed over by the step, as after init_state; it is
    # tiny, so concrete zeros stand in for it.
    trainer.rest = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), abstract_rest)

    def spec(tree, shardings):
        return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), tree, shardings)

    params = spec(abstract_params, trainer.param_sharding)
    opt_state = spec(jax.eval_shape(trainer.tx.init, abstract_params), trainer.opt_sharding)
    health = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=trainer.replicated),
                          jax.eval_shape(lambda: init_health(0)))
    seq_len = plan_window(cfg)
    batch = jax.ShapeDtypeStruct((cfg.train.batch_size, seq_len), jnp.int32, sharding=trainer.batch_sharding)

    def shard_bytes(v) -> int:  # of one array on one device
        return math.prod(v.sharding.shard_shape(v.shape)) * v.dtype.itemsize

    param_leaves = {path: shard_bytes(v) for path, v in param_tree.flatten(params).items()}
    opt_leaves = {path: shard_bytes(v) for path, v in param_tree.flatten(opt_state).items()}

    stage("train")
    train_args = (params, opt_state, health, batch, batch)
    try:
        train = _compile(trainer.mesh, trainer._train_step_checked, train_args,
                         f"training step of {', '.join(mixers)}")
    except HbmOom as e:
        train = _oom_report(e, sum(map(shard_bytes, jax.tree.leaves(train_args))))

    # One decode step (train/generate.py's loop body) with the training shardings of the parameters: one sequence
    # per data-parallel group, a cache as long as a training window.
    batch_axes = trainer.batch_sharding.spec[0]
    decode_batch = math.prod(trainer.mesh.shape[a] for a in ((batch_axes,) if isinstance(batch_axes, str) else
                                                               (batch_axes or ())))
    graphdef = trainer.graphdef

    def decode_step(params, state, token):
        return nnx.merge(graphdef, params, trainer.rest).decode_step(state, token)

    abstract_state = jax.eval_shape(lambda p: nnx.merge(graphdef, p, trainer.rest).init_state(decode_batch, seq_len),
                                    abstract_params)
    rows = NamedSharding(trainer.mesh, P(batch_axes))

    def state_spec(s):
        sharded = s.ndim and s.shape[0] == decode_batch and decode_batch > 1
        return jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=rows if sharded else trainer.replicated)

    state = jax.tree.map(state_spec, abstract_state)
    token = jax.ShapeDtypeStruct((decode_batch,), jnp.int32, sharding=rows if decode_batch > 1 else trainer.replicated)
    decoded = None
    if decode:
        stage("decode")
        try:
            decoded = _compile(trainer.mesh, jax.jit(decode_step), (params, state, token),
                               f"decode step of {', '.join(mixers)}")
        except HbmOom as e:
            decoded = _oom_report(e, sum(map(shard_bytes, jax.tree.leaves((params, state, token)))))

    leaves = [(b, f"parameter {p}") for p, b in param_leaves.items()] + [
        (b, f"optimizer state {p}") for p, b in opt_leaves.items()]
    report = PlanReport(
        topology=topo.name, num_slices=topo.num_slices, devices=len(devices), processes=processes,
        device_kind=devices[0].device_kind, mesh=dict(trainer.mesh.shape), mixers=mixers,
        params=sum(math.prod(v.shape) for v in param_tree.flatten(params).values()),
        param_bytes=sum(param_leaves.values()), optimizer_bytes=sum(opt_leaves.values()),
        batch_size=cfg.train.batch_size, seq_len=seq_len, hbm_bytes=topo.chip.hbm_bytes,
        peak_bf16_flops=topo.chip.peak_bf16_flops, train=train, decode=decoded, decode_batch=decode_batch,
        largest_leaves=sorted(leaves, reverse=True)[:5], advice=[])
    report.advice = advice(cfg, report)
    return report


def _compile(mesh, jitted, args, what: str) -> StepReport:
    import jax

    try:
        with jax.set_mesh(mesh):
            compiled = jitted.lower(*args).compile()
    except Exception as e:  # a lowering or compile error (e.g. a Pallas kernel outside shard_map): one line
        m = _OOM_RE.search(str(e))
        if m:
            raise HbmOom(_first_line(e), _gib(m.group(1)), _gib(m.group(2))) from None
        raise CompileFailed(f"the {what} did not compile: {_first_line(e)}") from None
    return _step_report(compiled)


# libtpu's refusal: "Ran out of memory on HBM, the total memory required for HLO temporaries (24.11G) exceeds
# available HBM (15.75G)"; the unit is binary (G: GiB) and grows with the number (4.28T for a [T, T] score matrix
# at 32k tokens), so it is part of the match.
_OOM_RE = re.compile(r"CompileTimeHbmOom.*?temporaries \(([\d.]+[KMGTP]?)\) exceeds available HBM \(([\d.]+[KMGTP]?)\)")
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": GiB, "T": 2**40, "P": 2**50}


def _gib(text: str) -> int:
    """libtpu's size "24.11G" (or "4.28T", "512M") in bytes."""
    unit = text[-1] if text[-1] in _UNITS else ""
    return int(float(text.removesuffix(unit) if unit else text) * _UNITS[unit])


def _oom_report(e: HbmOom, arguments: int) -> StepReport:
    return StepReport(arguments=arguments, outputs=0, aliased=0, temporaries=e.temporaries, generated_code=0,
                      flops=None, bytes_accessed=None, optimal_seconds=None, largest=[], compiler_oom=str(e))


def advice(cfg, r: PlanReport) -> list[str]:
    """What would shrink the training step's per-device memory, most effective first (empty when it fits)."""
    if r.fits:
        return []
    out = []
    state = r.param_bytes + r.optimizer_bytes
    fsdp_axes = [a for a in dict(cfg.sharding_rules).get("embed", ()) if r.mesh.get(a, 1) > 1]
    if not fsdp_axes and r.devices > 1:
        out.append(f"shard parameters and optimizer state over the devices: mesh.fsdp=-1 mesh.data=1 (they take "
                   f"{state / GiB:,.2f} GiB per device now, about {state / r.devices / GiB:,.2f} GiB sharded "
                   f"{r.devices} ways)")
    if state > r.hbm_bytes:
        out.append(f"parameters and optimizer state alone need {state / GiB:,.2f} GiB per device, more than the "
                   f"{r.hbm_bytes / GiB:,.0f} GiB of HBM: a larger slice (more chips) or a smaller model")
    if not cfg.model.remat:
        out.append("recompute each block in the backward pass: model.remat=true (fewer saved activations)")
    micro = cfg.train.batch_size // cfg.train.grad_accum_steps
    rows = micro // max(r.decode_batch, 1)
    if rows > 1:
        out.append(f"a smaller per-device batch: {rows} sequences per device per micro-batch now; "
                   f"train.grad_accum_steps={cfg.train.grad_accum_steps * 2} halves it at the same global batch "
                   "(temporaries scale with it)")
    if cfg.train.compute_dtype == "float32":
        out.append("train.compute_dtype=bfloat16 (activations in bf16; parameters stay float32)")
    return out


# --- the child process ------------------------------------------------------------------------------------------
def child_env() -> dict[str, str]:
    """The child's environment: JAX on the CPU whatever the host has (libtpu serves only as a compiler, so on a TPU
    host the local chips are left alone, e.g. to a training run), and libtpu's lockfile not required (see
    `topology_devices`)."""
    return {**os.environ, "JAX_PLATFORMS": "cpu", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}


def run_in_subprocess(files, overrides, topology: str, num_slices: int = 1, *, decode: bool = True,
                      timeout: float | None = None) -> dict:
    """Loads the config and plans it in a child process: {"report": PlanReport.to_json()} or {"error": one line,
    "code": 2 or 3}. A child killed by a signal (a compiler abort) becomes an error naming the signal, the step,
    the mixers and libtpu's `Check failed` line where it printed one."""
    with tempfile.TemporaryDirectory(prefix="effarch_plan_") as tmp:
        request, result = os.path.join(tmp, "request.json"), os.path.join(tmp, "result.json")
        with open(request, "w") as f:
            json.dump({"files": [str(p) for p in files], "overrides": list(overrides), "topology": topology,
                       "num_slices": num_slices, "decode": decode, "result": result}, f)
        proc = subprocess.run([sys.executable, "-m", "effarch.train.plan", "--child", request], env=child_env(),
                              capture_output=True, text=True, timeout=timeout)
        if os.path.exists(result):
            with open(result) as f:
                out = json.load(f)
            if "report" in out or "code" in out:
                return out
        stages = re.findall(r"^effarch-plan-stage: (.+)$", proc.stdout, re.M)
        mixers = re.findall(r"^effarch-plan-mixers: (.+)$", proc.stdout, re.M)
        step = f"the {stages[-1]} step" if stages else "the plan"
        of = f" of {mixers[-1]}" if mixers else ""
        check = re.findall(r"Check failed: (.*)", proc.stderr)
        why = f": Check failed: {check[-1][:160]}..." if check else ""
        if proc.returncode == -signal.SIGKILL:  # not the compiler: Linux's OOM killer (or a user) sent it
            return {"code": EXIT_NO_COMPILE,
                    "error": f"the planning process was killed (SIGKILL) on {step}{of} for {topology}, most likely by "
                             f"the out-of-memory killer: compiling this step needs more host RAM than was free"}
        if proc.returncode < 0:
            name = signal.Signals(-proc.returncode).name
            return {"code": EXIT_NO_COMPILE,
                    "error": f"the TPU compiler aborted ({name}) on {step}{of} for {topology}{why}"}
        tail = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        return {"code": EXIT_NO_COMPILE, "error": f"{step}{of} failed for {topology} (exit {proc.returncode})"
                f"{why or (': ' + tail[-1][:300] if tail else '')}"}


def _child(request_path: str) -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a compiler abort is reported in one line, without a core file
    with open(request_path) as f:
        req = json.load(f)

    def write(out):
        with open(req["result"], "w") as f:
            json.dump(out, f)

    from effarch.train.config import ConfigError, load_config

    try:
        cfg = load_config(req["files"], req["overrides"])
        print(f"effarch-plan-mixers: {', '.join(dict.fromkeys(cfg.model.mixers))}", flush=True)
        with warnings.catch_warnings(record=True) as caught:  # e.g. a dimension the mesh does not divide, replicated
            warnings.simplefilter("always")
            report = plan(cfg, req["topology"], req["num_slices"], decode=req.get("decode", True),
                          stage=lambda name: print(f"effarch-plan-stage: {name}", flush=True))
    except (ConfigError, PlanError) as e:
        write({"code": EXIT_BAD_INPUT, "error": str(e)})
        return
    except CompileFailed as e:
        write({"code": EXIT_NO_COMPILE, "error": str(e)})
        return
    notes = list(dict.fromkeys(str(w.message).splitlines()[0] for w in caught if w.category is UserWarning))
    write({"report": {**report.to_json(), "warnings": notes}})


# --- the text report ------------------------------------------------------------------------------------------
def _b(n: int | float) -> str:
    for unit, size in (("GiB", GiB), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:,.2f} {unit}"
    return f"{int(n)} B"


def format_report(r: dict, config_name: str) -> str:
    """The human-readable report of a `PlanReport.to_json()` dict."""
    b, hbm = r["per_device_bytes"], r["hbm_bytes"]
    mesh = " ".join(f"{k}={v}" for k, v in r["mesh"].items())
    slices = f" x {r['num_slices']} slices" if r["num_slices"] > 1 else ""
    lines = [
        f"effarch plan: {config_name} on {r['topology']}{slices}: {r['devices']} devices ({r['device_kind']}), "
        f"{r['processes']} process(es); mesh {mesh}",
        f"  model: {r['params']:,} parameters; mixers {', '.join(r['mixers'])}",
        f"  batch: {r['batch_size']} sequences x {r['seq_len']} tokens = {r['batch_size'] * r['seq_len']:,} tokens "
        "per step",
        "  training step, bytes per device (the compiler's memory analysis):",
        f"    arguments    {_b(b['arguments']):>12}  (parameters {_b(b['parameters'])}, optimizer state "
        f"{_b(b['optimizer_state'])}, batch and the rest)",
        f"    outputs      {_b(b['outputs']):>12}  ({_b(b['aliased'])} of them written into the donated arguments)",
        f"    temporaries  {_b(b['temporaries']):>12}",
        f"    total        {_b(b['total']):>12}  of {_b(hbm)} HBM ({b['total'] / hbm:.0%}; includes "
        f"{_b(b['generated_code'])} of code): {'fits' if r['fits'] else 'DOES NOT FIT'}",
    ]
    if r["flops_per_step"] is None:
        lines.append("  FLOPs per step: unknown (the compiler's cost analysis counted none)")
    else:
        lines.append(f"  FLOPs per step: {r['flops_per_step']:.3e} on all devices (the compiler's count: "
                     "rematerialised work in, a loop's body counted once; 6 x params x tokens = "
                     f"{r['model_flops_per_step']:.3e})")
    if r["estimated_step_s"] is None:
        roof = ("" if r["roofline_step_s"] is None else
                f"; the roofline of its counts, max(FLOPs / peak, bytes / HBM bandwidth), is "
                f"{r['roofline_step_s'] * 1e3:,.3f} ms")
        lines.append("  step time: unknown (the compiler's cost model has no estimate for some op of this program"
                     f"{roof})")
    else:
        mfu = ("" if r["estimated_mfu"] is None else
               f", MFU {r['estimated_mfu']:.0%} of {r['peak_bf16_flops_per_chip']:.3g} bf16 FLOP/s")
        lines.append(f"  step time: {r['estimated_step_s'] * 1e3:,.3f} ms estimated (the compiler's roofline, not a "
                     f"measurement) -> {r['estimated_tokens_per_s_per_chip']:,.0f} tokens/s per chip{mfu} (estimates)")
    d = r["decode"]
    if d is not None:
        est = "unknown" if d["estimated_step_s"] is None else f"{d['estimated_step_s'] * 1e3:,.3f} ms estimated"
        lines.append(f"  decode step ({d['batch']} sequence(s), cache {d['cache_len']}): {_b(d['per_device_bytes'])} "
                     f"per device, {'fits' if d['fits'] else 'does not fit'}; {est} per token")
    if r.get("compiler_oom"):
        lines.append(f"  the compiler refused the step for HBM ({r['compiler_oom']}): temporaries are its stated need, "
                     "arguments are computed from the shardings, the rest is unknown")
    if not r["fits"] and r["largest_buffers"]:
        lines.append("  largest arrays of the compiled step (per device; not all live at once):")
        lines += [f"    {_b(x['bytes']):>12}  {x['what']}" for x in r["largest_buffers"]]
    if not r["fits"]:
        lines.append("  largest parameter / optimizer leaves (per device):")
        lines += [f"    {_b(x['bytes']):>12}  {x['path']}" for x in r["largest_leaves"][:3]]
        lines.append("  what would help:")
        lines += [f"    - {a}" for a in r["advice"]]
    lines += [f"  warning: {w}" for w in r.get("warnings", [])]
    verdict = "fits" if r["fits"] else f"does not fit: {_b(b['total'])} per device > {_b(hbm)} HBM"
    lines.append(f"effarch plan: {verdict} (estimates: compiled for TPU, not run)")
    return "\n".join(lines)


if __name__ == "__main__" and sys.argv[1:2] == ["--child"]:
    _child(sys.argv[2])
