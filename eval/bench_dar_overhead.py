"""Training-step overhead of DAR routing against plain residual connections, measured side by side.

For each model size, one backbone (random weights, non-zero adaLN so every sublayer does real work) is run with
each router in turn: residual, DAR static_t c4, dynamic c4 and dense (S = 1) static_t, each DAR variant with the
lean autograd function (in each of its layouts: ``stacked``, ``per_source``) and with the reference path. Per variant: the median time of a full forward + backward
(loss = mean(out^2)), and a memory measure:

- CUDA: peak allocated bytes during the step above the bytes allocated before it (activations + temporaries;
  parameters and their already-allocated gradients excluded).
- CPU:  bytes of the tensors autograd saves for backward (``saved_tensors_hooks``), deduplicated by storage and
  excluding parameter storages: the step's activation peak, reached at the end of the forward pass.

Variants are interleaved (one step of each, in rotating order, per timed round) so that drift of the machine
(clocks, other jobs on shared cores) hits every variant alike.

Paths per DAR variant: ``lean/<layout>`` (the lean autograd function), ``reference`` and, on CUDA with Triton,
``triton`` (the fused kernel, ``routing.kernel=triton``). With ``--compile MODE`` every row, the residual
baseline included, also runs under ``torch.compile(model, mode=MODE)`` (path ``...+compile``; its ratio is against
the compiled residual model, as ``run.compile`` trains), and two more measures run in the same process:

- the DAR aggregation alone (the final aggregator of a static_t / dynamic c4 model of each size: its N sources,
  forward + backward), eager lean path against compiled (and the Triton kernel on CUDA);
- the main job's wall time per iteration (``dmd-dar distill``'s recipe, configs/distill_embedded.yaml, timed
  over whole TTUR cycles after warm-up cycles), eager against ``run.compile=MODE``.

    python eval/bench_dar_overhead.py --device cpu                       # both sizes, both lean layouts
    python eval/bench_dar_overhead.py --device cpu --sizes embedded --layouts per_source
    python eval/bench_dar_overhead.py --device cpu --compile default --layouts per_source --json compile.json
    python eval/bench_dar_overhead.py --device cuda --dtype bf16 --batch 32 --json bench.json   # + triton column

On CPU the process keeps freed memory, as CPU training runs do (``dmd_dar/utils/cpu_memory.py``);
``--cpu-memory release`` measures under glibc's default policy instead.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dmd_dar.cli import find_command, resolve  # noqa: E402
from dmd_dar.distill import trainer  # noqa: E402
from dmd_dar.models import PRESETS, ModelConfig, build_model  # noqa: E402
from dmd_dar.routing import RoutingConfig, aggregate_lean, build_router, source_indices  # noqa: E402
from dmd_dar.routing.config import LEAN_LAYOUTS  # noqa: E402
from dmd_dar.routing.kernel import aggregate_fused, kernel_unavailable_reason  # noqa: E402
from dmd_dar.training.compile import COMPILE_MODES  # noqa: E402
from dmd_dar.utils.cpu_memory import retain_freed_memory  # noqa: E402

SIZES = {
    # SiT-XL/2 width and depth on 256^2 images through the SD-VAE: 32x32x4 latents, patch 2 -> 256 tokens.
    "xl": dict(image_size=32, in_channels=4, patch_size=2, hidden_size=1152, depth=28, num_heads=16,
               num_classes=1000),
    # The embedded teacher's architecture (d 128, depth 6, 4 heads, patch 4, 8 classes, attention bias, conv MLP).
    "embedded": dict(PRESETS["embedded"]),
    "tiny": dict(PRESETS["tiny"]),  # for smoke-running this script, not a figure
}
# (name, routing or None for residual); each DAR variant runs lean and reference.
VARIANTS = [
    ("static_t c4", dict(kind="dar", query="static_t", chunk_size=4)),
    ("dynamic c4", dict(kind="dar", query="dynamic", chunk_size=4)),
    ("dense static_t", dict(kind="dar", query="static_t", chunk_size=1)),
]
TIME_TARGETS = {"static_t c4": 1.10, "dynamic c4": 1.25}
# With run.compile (DAR and residual both compiled), per (size, variant): the CPU targets.
COMPILED_TIME_TARGETS = {("xl", "static_t c4"): 1.05, ("embedded", "static_t c4"): 1.10, ("xl", "dynamic c4"): 1.15}
MEMORY_TARGET = 1.30
# Defaults per (device, size): batch, timed iterations, warm-up iterations, run the reference path.
DEFAULTS = {
    # ~20 s per XL step on 2 cores; the memory forward already warmed up. The reference path at XL needs
    # ~3 x sum_l |S_l| x B x T x D saved floats (dense: ~6 GB at batch 1) and minutes per step: off by default.
    ("cpu", "xl"): (1, 2, 0, False),
    ("cpu", "embedded"): (16, 10, 2, True),
    ("cuda", "xl"): (8, 20, 3, True),
    ("cuda", "embedded"): (128, 30, 3, True),
    ("cpu", "tiny"): (2, 2, 1, True),
    ("cuda", "tiny"): (2, 2, 1, True),
}


@dataclass
class Variant:
    label: str  # e.g. "static_t c4"
    path: str  # "lean/<layout>", "reference" or "-" (residual)
    router: torch.nn.Module
    times: list[float]
    memory: int = 0
    saved: int = 0
    failed: str = ""  # e.g. "OOM": the variant is reported but not timed
    compiled: bool = False  # run under torch.compile (its memory is not measured: no saved-tensor hooks there)


class SavedBytes:
    """Sum of bytes autograd saves for backward, each storage counted once, parameters excluded."""

    def __init__(self, exclude: set[int]) -> None:
        self.exclude, self.seen, self.total = exclude, set(), 0

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr and ptr not in self.exclude and ptr not in self.seen:
            self.seen.add(ptr)
            self.total += storage.nbytes()
        return t

    @staticmethod
    def unpack(t: torch.Tensor) -> torch.Tensor:
        return t


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step(model, x, t, y, autocast, fn=None) -> None:
    """One forward + backward of ``model`` (through ``fn``, its compiled twin, when given)."""
    model.zero_grad(set_to_none=False)
    with autocast():
        out = (model if fn is None else fn)(x, t, y)
    out.float().pow(2).mean().backward()


def _use(model, variant: Variant) -> None:
    # The backbone is shared; only the router differs between variants (the model reads self.router).
    model.router = variant.router


def bench_size(size: str, args, device: torch.device) -> list[dict]:
    d_batch, d_iters, d_warm, d_ref = DEFAULTS[(device.type, size)]
    reference = d_ref if args.reference is None else args.reference
    batch = args.batch or d_batch
    iters = args.iters or d_iters
    warmup = d_warm if args.warmup is None else args.warmup
    cfg = ModelConfig(**SIZES[size], class_dropout_prob=0.0)
    torch.manual_seed(0)
    model = build_model(cfg).to(device)
    with torch.no_grad():  # non-zero adaLN and head, so gates and outputs are not identically zero
        for module in [b.adaLN_modulation[-1] for b in model.blocks] + [model.final_layer.adaLN_modulation[-1],
                                                                          model.final_layer.linear]:
            module.weight.normal_(0.0, 0.02)
    model.train()
    n, dim = cfg.num_sublayers, cfg.hidden_size
    variants = [Variant("residual", "-", model.router, [])]
    paths = [f"lean/{layout}" for layout in args.layouts] + (["reference"] if reference else [])
    if args.kernel:
        paths.append("triton")
    for label, kw in VARIANTS:
        for path in paths:
            lean = path.startswith("lean/")
            routing = RoutingConfig(**kw, lean=lean or path == "triton",
                                    lean_layout=path.split("/")[1] if lean else "auto",
                                    kernel="triton" if path == "triton" else "torch")
            router = build_router(routing, n, dim).to(device)
            with torch.no_grad():  # non-trivial routing weights
                for p in router.parameters():
                    p.add_(0.02 * torch.randn_like(p))
            variants.append(Variant(label, path, router, []))
    compiled_fn = None
    if args.compile != "false":
        # One compiled model; swapping the router re-specialises it (one cache entry per variant).
        compiled_fn = torch.compile(model, mode=args.compile)
        variants += [Variant(v.label, "compile" if v.path == "-" else f"{v.path}+compile", v.router, [], compiled=True)
                     for v in list(variants)
                     # the reference path exists to check the others, not to be fast; compile (minutes per variant
                     # at XL on CPU) what has a target
                     if v.path != "reference" and (v.label == "residual" or v.label in TIME_TARGETS)]
    x = torch.randn(batch, cfg.in_channels, cfg.image_size, cfg.image_size, device=device)
    t = torch.rand(batch, device=device)
    y = torch.randint(0, cfg.num_classes, (batch,), device=device)
    bf16 = args.dtype == "bf16"

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    # Memory, untimed. Saved activations: one forward under the hooks (the graph is dropped unused).
    for v in variants:
        if v.compiled:
            continue
        _use(model, v)
        try:
            counter = SavedBytes({p.untyped_storage().data_ptr() for p in model.parameters()})
            with torch.autograd.graph.saved_tensors_hooks(counter.pack, counter.unpack), autocast():
                out = model(x, t, y)
            del out
            v.saved = counter.total
            if device.type == "cuda":
                _step(model, x, t, y, autocast)  # allocate gradients (excluded from the measure)
                _sync(device)
                base = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
                _step(model, x, t, y, autocast)
                _sync(device)
                v.memory = torch.cuda.max_memory_allocated(device) - base
            else:
                v.memory = v.saved
        except torch.OutOfMemoryError:
            v.failed = "OOM"
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if variants[0].failed:
        raise SystemExit(f"{size}: the residual baseline ran out of memory at batch {batch}; lower --batch")
    variants = [v for v in variants if not v.failed] + [v for v in variants if v.failed]
    timed = [v for v in variants if not v.failed]

    def fn_of(v: Variant):
        return compiled_fn if v.compiled else None

    for v in timed:
        _use(model, v)
        for _ in range(max(warmup, 2) if v.compiled else warmup):  # compiled: the first steps compile
            _step(model, x, t, y, autocast, fn_of(v))
    _sync(device)
    for i in range(iters):
        k = i % len(timed)
        for v in timed[k:] + timed[:k]:  # rotate the order each round
            _use(model, v)
            _sync(device)
            start = time.perf_counter()
            _step(model, x, t, y, autocast, fn_of(v))
            _sync(device)
            v.times.append(time.perf_counter() - start)
    _use(model, variants[0])

    base_time = statistics.median(variants[0].times)
    compiled_base = next((v for v in variants if v.compiled and v.label == "residual"), None)
    base_mem = variants[0].memory
    rows = []
    for v in variants:
        if v.failed:
            rows.append(dict(size=size, variant=v.label, path=v.path, batch=batch, tokens=cfg.num_tokens,
                             iters=0, failed=v.failed, time_ms=float("nan"), time_ratio=float("nan"),
                             memory_mb=float("nan"), memory_ratio=float("nan"), saved_mb=v.saved / 2**20))
            continue
        med = statistics.median(v.times)
        base = statistics.median(compiled_base.times) if v.compiled else base_time
        memory = float("nan") if v.compiled else v.memory / 2**20
        row = dict(size=size, variant=v.label, path=v.path, batch=batch, tokens=cfg.num_tokens, iters=iters,
                   time_ms=1e3 * med, time_ratio=med / base, memory_mb=memory,
                   memory_ratio=v.memory / base_mem if base_mem and not v.compiled else float("nan"),
                   saved_mb=float("nan") if v.compiled else v.saved / 2**20,
                   router_params=sum(p.numel() for p in v.router.parameters()))
        if v.compiled:
            target = COMPILED_TIME_TARGETS.get((size, v.label))
            row["time_target"] = target
            row["time_pass"] = None if target is None else row["time_ratio"] <= target
        elif v.path.startswith("lean/") or v.path == "triton":
            target = TIME_TARGETS.get(v.label)
            row["time_target"] = target
            row["time_pass"] = None if target is None else row["time_ratio"] <= target
            row["memory_target"] = MEMORY_TARGET
            row["memory_pass"] = row["memory_ratio"] <= MEMORY_TARGET
        rows.append(row)
    return rows


def _fmt_pass(flag) -> str:
    return "-" if flag is None else ("PASS" if flag else "FAIL")


def print_table(rows: list[dict], device: str, dtype: str) -> None:
    mem_name = "peak MB" if device == "cuda" else "saved MB"
    print(f"\nDAR overhead, forward+backward, device={device} dtype={dtype} "
          f"(memory = {'CUDA peak above start' if device == 'cuda' else 'autograd-saved activations'}; "
          f"+compile rows: ratio against the compiled residual model)")
    head = (f"{'size':9} {'variant':15} {'path':24} {'batch':>5} {'ms':>9} {'time x':>7} {mem_name:>9} "
            f"{'mem x':>6} {'target':>14} {'time':>5} {'mem':>5}")
    print(head)
    print("-" * len(head))
    for r in rows:
        if r.get("failed"):
            print(f"{r['size']:9} {r['variant']:15} {r['path']:24} {r['batch']:>5} {r['failed']:>9}")
            continue
        tt, mt = r.get("time_target"), r.get("memory_target")
        target = (f"t<={tt:.2f} " if tt else "") + (f"m<={mt:.1f}" if mt else "")
        time_flag = _fmt_pass(r.get("time_pass")) if "time_pass" in r else ""
        mem_flag = _fmt_pass(r.get("memory_pass")) if "memory_pass" in r else ""
        print(f"{r['size']:9} {r['variant']:15} {r['path']:24} {r['batch']:>5} {r['time_ms']:9.1f} "
              f"{r['time_ratio']:7.3f} {r['memory_mb']:9.1f} {r['memory_ratio']:6.3f} {target:>14} "
              f"{time_flag:>5} {mem_flag:>5}")


# -- the DAR aggregation alone -------------------------------------------------------------------------------------
def bench_aggregation(size: str, args, device: torch.device) -> list[dict]:
    """Forward + backward of one aggregator (the final one of a c4 model of this size: the most sources), eager
    lean path vs compiled (and the fused kernel on CUDA), for a static_t query [B, 1, D] and a dynamic one
    [B, T, D]. Interleaved rounds, medians."""
    cfg = ModelConfig(**SIZES[size])
    d_batch = DEFAULTS[(device.type, size)][0]
    batch, tokens, dim = args.batch or d_batch, cfg.num_tokens, cfg.hidden_size
    n = len(source_indices(cfg.num_sublayers + 1, cfg.num_sublayers, 4))
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    gen = torch.Generator().manual_seed(0)
    sources = [torch.randn(batch, tokens, dim, generator=gen).to(device, dtype).requires_grad_() for _ in range(n)]
    gain = (1 + 0.1 * torch.randn(dim, generator=gen)).to(device).requires_grad_()
    weight = torch.randn(batch, tokens, dim, generator=gen).to(device, dtype)
    eager = functools.partial(aggregate_lean, layout=None)
    impls = {"lean eager": eager}
    if args.compile != "false":
        impls["lean compiled"] = torch.compile(eager, mode=args.compile)
    if args.kernel:
        impls["triton"] = aggregate_fused
    rows = []
    for query_kind, q_tokens in (("static_t", 1), ("dynamic", tokens)):
        query = (0.1 * torch.randn(batch, q_tokens, dim, generator=gen)).to(device).requires_grad_()
        times: dict[str, list[float]] = {k: [] for k in impls}

        def run(fn, query=query):
            h, _ = fn(sources, query, gain, 1e-6, False)
            torch.autograd.grad((h * weight).sum(), [query, gain, *sources])

        for fn in impls.values():
            for _ in range(max(args.warmup or 0, 2)):
                run(fn)
        names = list(impls)
        for i in range(max(args.iters or 0, 10)):
            k = i % len(names)
            for name in names[k:] + names[:k]:
                _sync(device)
                start = time.perf_counter()
                run(impls[name])
                _sync(device)
                times[name].append(time.perf_counter() - start)
        base = statistics.median(times["lean eager"])
        for name, ts in times.items():
            med = statistics.median(ts)
            rows.append(dict(size=size, query=query_kind, impl=name, sources=n, batch=batch, tokens=tokens, dim=dim,
                             time_ms=1e3 * med, vs_eager=med / base))
    return rows


def print_aggregation(rows: list[dict]) -> None:
    print("\nDAR aggregation alone (final aggregator of a c4 model: N sources), forward + backward")
    head = f"{'size':9} {'query':9} {'impl':14} {'N':>3} {'B x T x D':>16} {'ms':>9} {'x eager':>8}"
    print(head)
    print("-" * len(head))
    for r in rows:
        shape = f"{r['batch']}x{r['tokens']}x{r['dim']}"
        print(f"{r['size']:9} {r['query']:9} {r['impl']:14} {r['sources']:>3} {shape:>16} {r['time_ms']:9.2f} "
              f"{r['vs_eager']:8.3f}")


# -- the main job's iteration time ---------------------------------------------------------------------------------
class CycleClock:
    """Stands in for the trainer's ``tqdm``: yields its steps and times whole TTUR cycles (a generator update and
    ``ttur - 1`` critic-only iterations), the first ``warmup`` cycles untimed (they compile)."""

    def __init__(self, ttur: int, warmup: int) -> None:
        self.ttur, self.warmup, self.cycles, self.steps = ttur, warmup, [], range(0)

    def __call__(self, iterable, **_kwargs):
        self.steps = iterable
        return self

    def set_postfix(self, *_args, **_kwargs) -> None:
        pass

    def __iter__(self):
        start = None
        for step in self.steps:
            if step % self.ttur == 0:
                if start is not None and step // self.ttur > self.warmup:
                    self.cycles.append(time.perf_counter() - start)
                start = time.perf_counter()
            yield step
        if start is not None and len(self.steps) // self.ttur > self.warmup:
            self.cycles.append(time.perf_counter() - start)


def bench_main_job(args, device: torch.device) -> list[dict]:
    """``dmd-dar distill``'s recipe (configs/distill_embedded.yaml), eager and with run.compile, in one process:
    seconds per iteration (TTUR cycle / ttur), medians over the timed cycles. Periodic grids, checkpoints and
    logging are off; the 128 regression pairs are computed once and shared by both runs."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_main_job_") as tmp:
        modes = ["false"] + ([args.compile] if args.compile != "false" else [])
        for mode in modes:
            probe = resolve(find_command("distill"), [], [])
            ttur = probe.method.ttur
            steps = (args.main_job_warmup + args.main_job_cycles) * ttur
            overrides = [f"run.out_dir={tmp}/{mode}", f"run.steps={steps}", f"method.regression_cache={tmp}",
                         "run.sample_every=0", "run.ckpt_every=0", "debug_grid_every=0", "run.log_with=none",
                         "run.progress=false", "run.resume=false", f"run.compile={mode}",
                         f"run.cpu={'true' if device.type == 'cpu' else 'false'}", *args.main_job_overrides]
            cfg = resolve(find_command("distill"), [], overrides)
            clock = CycleClock(ttur, args.main_job_warmup)
            original, trainer.tqdm = trainer.tqdm, clock
            started = time.perf_counter()
            try:
                with contextlib.redirect_stdout(io.StringIO()):
                    trainer.run(cfg)
            finally:
                trainer.tqdm = original
            per_iter = statistics.median(clock.cycles) / ttur
            rows.append(dict(compile=mode, iteration_s=per_iter, cycles=len(clock.cycles), ttur=ttur,
                             run_s=time.perf_counter() - started,
                             main_job_estimate_s=per_iter * resolve(find_command("distill"), [], []).run.steps))
    base = rows[0]["iteration_s"]
    for r in rows:
        r["vs_eager"] = r["iteration_s"] / base
    return rows


def print_main_job(rows: list[dict]) -> None:
    print("\nThe main job (dmd-dar distill, configs/distill_embedded.yaml), wall time per iteration")
    head = f"{'run.compile':14} {'s / iteration':>14} {'x eager':>8} {'cycles':>7} {'whole job (est.)':>17} {'run s':>7}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['compile']:14} {r['iteration_s']:14.3f} {r['vs_eager']:8.3f} {r['cycles']:>7} "
              f"{r['main_job_estimate_s'] / 60:14.1f} min {r['run_s']:7.0f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--sizes", default="xl,embedded", help="comma-separated: " + ",".join(SIZES))
    parser.add_argument("--iters", type=int, default=None, help="timed iterations per variant (default per size)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up iterations per variant")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default per size and device)")
    parser.add_argument("--reference", action=argparse.BooleanOptionalAction, default=None,
                        help="also run the reference (non-lean) aggregation (default: on, except XL on CPU)")
    parser.add_argument("--layouts", default=None,
                        help="comma-separated lean layouts to run: stacked, per_source (default: both on CPU, "
                             "stacked on CUDA)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--cpu-memory", choices=["retain", "release"], default="retain",
                        help="CPU: keep freed memory in the process as training runs do (retain), or glibc's "
                             "default of handing it back to the OS (release)")
    parser.add_argument("--compile", choices=COMPILE_MODES, default="false",
                        help="also run every row under torch.compile in this mode, and measure the aggregation alone "
                             "and the main job's iteration time, eager vs compiled")
    parser.add_argument("--kernel", action=argparse.BooleanOptionalAction, default=None,
                        help="add the fused Triton kernel (routing.kernel=triton) as a path (default: on CUDA when "
                             "Triton imports)")
    parser.add_argument("--aggregation", action=argparse.BooleanOptionalAction, default=None,
                        help="measure the aggregation alone (default: with --compile or --kernel)")
    parser.add_argument("--main-job-cycles", type=int, default=None,
                        help="timed TTUR cycles of the main job (default: 10 with --compile, else 0: not run)")
    parser.add_argument("--main-job-warmup", type=int, default=2, help="untimed (compiling) TTUR cycles first")
    parser.add_argument("--main-job-overrides", nargs="*", default=[],
                        help="key=value overrides on top of the main job (to smoke-run this script on a tiny "
                             "teacher; the figures are the main job's without any)")
    parser.add_argument("--json", default=None, help="write the rows and the environment to this file")
    args = parser.parse_args(argv)
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    unknown = [s for s in sizes if s not in SIZES]
    if unknown:
        parser.error(f"unknown size(s) {unknown}; choose from {list(SIZES)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available")
    if args.batch is not None and args.batch < 1:
        parser.error("--batch must be >= 1")
    default_layouts = "stacked,per_source" if args.device == "cpu" else "stacked"
    args.layouts = [s.strip() for s in (args.layouts or default_layouts).split(",") if s.strip()]
    bad = [s for s in args.layouts if s not in LEAN_LAYOUTS[1:]]
    if bad or not args.layouts:
        parser.error(f"unknown layout(s) {bad}; choose from {list(LEAN_LAYOUTS[1:])}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.kernel is None:
        args.kernel = kernel_unavailable_reason(device) is None and device.type == "cuda"
    elif args.kernel and kernel_unavailable_reason(device) is not None:
        parser.error(f"--kernel: {kernel_unavailable_reason(device)}")
    if args.aggregation is None:
        args.aggregation = args.compile != "false" or args.kernel
    if args.main_job_cycles is None:
        args.main_job_cycles = 10 if args.compile != "false" else 0
    # One compiled model serves every router (each swap re-specialises it): room for all of them.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    retained = device.type == "cpu" and args.cpu_memory == "retain" and retain_freed_memory()
    if device.type == "cpu":
        print(f"CPU memory policy: {'retain freed memory' if retained else 'glibc default (release)'}")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    rows, aggregation, main_job = [], [], []
    load_before = [round(x, 2) for x in os.getloadavg()]
    for size in sizes:
        start = time.perf_counter()
        rows += bench_size(size, args, device)
        if args.aggregation:
            aggregation += bench_aggregation(size, args, device)
        print(f"[{size}: {time.perf_counter() - start:.0f} s]", flush=True)
    if args.main_job_cycles > 0:
        start = time.perf_counter()
        main_job = bench_main_job(args, device)
        print(f"[main job: {time.perf_counter() - start:.0f} s]", flush=True)
    print_table(rows, args.device, args.dtype)
    if aggregation:
        print_aggregation(aggregation)
    if main_job:
        print_main_job(main_job)
    load_after = [round(x, 2) for x in os.getloadavg()]
    print(f"\nload average {load_before} -> {load_after}, torch threads {torch.get_num_threads()}, "
          f"cpus {os.cpu_count()}")
    if args.json:
        env = dict(torch=torch.__version__, python=platform.python_version(), device=args.device, dtype=args.dtype,
                   threads=torch.get_num_threads(), cpu_memory_retained=retained, compile=args.compile,
                   load_before=load_before, load_after=load_after,
                   gpu=torch.cuda.get_device_name() if device.type == "cuda" else platform.processor())
        Path(args.json).write_text(json.dumps(dict(env=env, rows=rows, aggregation=aggregation, main_job=main_job),
                                              indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
