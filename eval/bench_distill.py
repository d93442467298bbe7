"""DMD2 distillation cost on the embedded teacher, measured side by side in one process.

(a) Iteration time. The real trainer (``dmd_dar.distill.trainer.run``, main-job defaults: one-step DAR static_t c4
    student, residual fake score, TTUR 3, batch 16; pure DMD2: no regression, no GAN) runs with its progress bar
    replaced by a timer that times whole TTUR cycles (one generator + critic iteration, ttur - 1 critic-only
    iterations) and reports cycle time / ttur. Against it: the sum of the component passes the cycle needs, each
    measured alone on networks of the same shapes:
        cycle = student fwd+bwd + teacher CFG fwd + fake fwd + ttur x fake fwd+bwd + (ttur - 1) x student no-grad fwd
    The ratio is the plumbing's overhead (optimizer steps, clipping, the NaN guard, logging); target <= 1.10.
    Between trainer cycles one round of component passes runs (rotating order), outside the timed spans, so machine
    drift hits both alike. The first ``--warmup-cycles`` are not counted; medians over the rest.
(b) Peak memory of a trainer cycle and of each component pass, in one extra untimed cycle at the end. CUDA:
    max_memory_allocated above the allocated bytes at the span's start. CPU: peak RSS (VmHWM, reset through
    /proc/self/clear_refs) above the RSS at the span's start, after malloc_trim; report only (no target).
(c) Sampling throughput (images/s) of a one-step student (a ``to_dar`` copy of the teacher: the same cost as a
    distilled one) against the 50-step teacher with CFG, both through ``dmd_dar.artifact.generate``; target >= 40x.
    After one warm-up of each, rounds alternate which goes first; the student repeats its batch
    ``--student-repeats`` times per round. Medians over rounds.

    python eval/bench_distill.py                     # CPU, one thread: ~2 minutes on a busy 2-core machine
    python eval/bench_distill.py --device cuda --batch 64 --json bench_distill.json
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dmd_dar.artifact import generate  # noqa: E402
from dmd_dar.cli import find_command, resolve  # noqa: E402
from dmd_dar.diffusion.objective import denoising_loss  # noqa: E402
from dmd_dar.distill import trainer  # noqa: E402
from dmd_dar.distill.config import DistillConfig  # noqa: E402
from dmd_dar.distill.denoiser import Denoiser  # noqa: E402
from dmd_dar.distill.task import NativeTask  # noqa: E402
from dmd_dar.utils.io import atomic_save_safetensors  # noqa: E402

TEACHER = ROOT / "dmd_dar" / "assets" / "teacher"
OVERHEAD_TARGET = 1.10
SPEEDUP_TARGET = 40.0


# -- memory ----------------------------------------------------------------------------------------------------
class PeakMemory:
    """Peak bytes of a span above its start: CUDA allocated bytes, or the process's RSS on CPU (Linux)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.start = 0
        try:
            self._libc = ctypes.CDLL("libc.so.6")
        except OSError:
            self._libc = None
        self.kind = "cuda max_memory_allocated" if self.cuda else "peak RSS (VmHWM)"

    @staticmethod
    def _status(key: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
        return 0

    def begin(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
            return
        if self._libc is not None:
            self._libc.malloc_trim(0)  # hand freed heap back, so that the start RSS is tight
        self.start = self._status("VmRSS")
        with contextlib.suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS

    def end(self) -> int:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.start
        return max(0, self._status("VmHWM") - self.start)


# -- component passes --------------------------------------------------------------------------------------------
def component_passes(cfg: DistillConfig, task: NativeTask, device: torch.device) -> dict[str, Callable[[], None]]:
    """One closure per component pass, on networks shaped like the trainer's, with the trainer's batch."""
    path, null = task.teacher.path, task.teacher.null_cond
    student = Denoiser(task.build_network(cfg.networks.student_routing, False), path, null)
    fake = Denoiser(task.build_network(cfg.networks.fake_routing, False), path, null)
    gen = torch.Generator().manual_seed(0)
    b = cfg.run.batch_size
    batch = task.draw(b, gen, device, need_real=False)
    noise, y = batch.noise, batch.cond
    t0 = torch.full((b,), task.student_times[0], device=device)
    t = torch.rand(b, generator=gen).to(device)
    x_t = torch.randn(noise.shape, generator=gen).to(device)
    eps = torch.randn(noise.shape, generator=gen).to(device)

    def student_fwd_bwd():
        student.net.zero_grad(set_to_none=True)
        student.x0(noise, t0, y).square().mean().backward()

    @torch.no_grad()
    def teacher_cfg_fwd():
        task.teacher.x0(x_t, t, y, guidance=cfg.method.guidance_scale)

    @torch.no_grad()
    def fake_fwd():
        fake.x0(x_t, t, y, guidance=cfg.method.fake_guidance_scale)

    def fake_fwd_bwd():
        fake.net.zero_grad(set_to_none=True)
        denoising_loss(lambda xx, tt: fake.pred(xx, tt, y), path, x_t, eps, t).backward()

    @torch.no_grad()
    def student_nograd_fwd():
        student.x0(noise, t0, y)

    return {"student fwd+bwd": student_fwd_bwd, "teacher CFG fwd": teacher_cfg_fwd, "fake fwd": fake_fwd,
            "fake fwd+bwd": fake_fwd_bwd, "student no-grad fwd": student_nograd_fwd}


def cycle_weights(ttur: int) -> dict[str, int]:
    """How many of each pass one TTUR cycle of the trainer runs."""
    return {"student fwd+bwd": 1, "teacher CFG fwd": 1, "fake fwd": 1, "fake fwd+bwd": ttur,
            "student no-grad fwd": ttur - 1}


class CycleTimer:
    """Stands in for the trainer's ``tqdm``: yields its steps and measures whole TTUR cycles.

    Cycles [0, warmup) are warm-up, the next ``timed`` are timed, the last one measures peak memory (untimed: the
    memory probe trims the heap, and the page faults that follow would skew a time). ``between(kind)`` runs before
    each cycle with kind "warmup" | "time" | "memory", outside the measured spans.
    """

    def __init__(self, ttur: int, warmup: int, timed: int, between: Callable[[str], None], memory: PeakMemory,
                 sync: Callable[[], None]) -> None:
        self.ttur, self.warmup, self.timed = ttur, warmup, timed
        self.between, self.memory, self.sync = between, memory, sync
        self.cycles: list[float] = []
        self.peak = 0
        self.steps: range = range(0)

    @property
    def num_steps(self) -> int:
        return (self.warmup + self.timed + 1) * self.ttur

    def __call__(self, iterable, **_kwargs):
        self.steps = iterable
        return self

    def set_postfix(self, *_args, **_kwargs) -> None:
        pass

    def _kind(self, index: int) -> str:
        return "warmup" if index < self.warmup else "time" if index < self.warmup + self.timed else "memory"

    def _close(self, started: float, index: int) -> None:
        self.sync()
        elapsed = time.perf_counter() - started
        if self._kind(index) == "time":
            self.cycles.append(elapsed)
        elif self._kind(index) == "memory":
            self.peak = self.memory.end()

    def __iter__(self):
        started, index = None, -1
        for step in self.steps:
            if step % self.ttur == 0:
                if started is not None:
                    self._close(started, index)
                index += 1
                self.between(self._kind(index))
                if self._kind(index) == "memory":
                    self.memory.begin()
                self.sync()
                started = time.perf_counter()
            yield step
        if started is not None:
            self._close(started, index)


def bench_config(args, device: torch.device, out_dir: Path) -> DistillConfig:
    """The trainer configuration measured: main-job defaults, pure DMD2, nothing periodic but logging."""
    overrides = [f"networks.teacher={args.teacher}", f"run.out_dir={out_dir}", f"run.batch_size={args.batch}",
                 f"method.ttur={args.ttur}", f"run.steps={(args.warmup_cycles + args.cycles + 1) * args.ttur}",
                 "method.regression_weight=0", "method.gan_weight=0", "run.sample_every=0", "run.ckpt_every=0",
                 "debug_grid_every=0", "run.log_with=none", "run.progress=false", "run.resume=false",
                 f"run.cpu={'true' if device.type == 'cpu' else 'false'}"]
    return resolve(find_command("distill"), [], overrides)  # on top of the main job's recipe, as dmd-dar distill


def bench_iteration(args, cfg: DistillConfig, task: NativeTask, device: torch.device) -> dict:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    memory = PeakMemory(device)
    passes = component_passes(cfg, task, device)
    names = list(passes)
    times: dict[str, list[float]] = {n: [] for n in names}
    peaks: dict[str, int] = {}

    def one_round(kind: str) -> None:
        shift = len(times[names[0]]) % len(names)
        for name in names[shift:] + names[:shift]:  # rotating order
            if kind == "memory":
                memory.begin()
                passes[name]()
                peaks[name] = memory.end()
                continue
            sync()
            start = time.perf_counter()
            passes[name]()
            sync()
            if kind == "time":
                times[name].append(time.perf_counter() - start)

    # The drift reference is a cheap stand-in (its values do not change the cost): no 64 teacher samples.
    c = task.net.cfg.in_channels
    atomic_save_safetensors({"mean": torch.zeros(c), "std": torch.ones(c)},
                            Path(cfg.run.out_dir) / "teacher_reference.safetensors")
    timer = CycleTimer(args.ttur, args.warmup_cycles, args.cycles, one_round, memory, sync)
    assert timer.num_steps == cfg.run.steps
    original = trainer.tqdm
    trainer.tqdm = timer
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            trainer.run(cfg)
    finally:
        trainer.tqdm = original
    med = {n: statistics.median(v) for n, v in times.items()}
    weights = cycle_weights(args.ttur)
    component_iter = sum(weights[n] * med[n] for n in names) / args.ttur
    trainer_iter = statistics.median(timer.cycles) / args.ttur
    peak_component = max(names, key=lambda n: peaks[n])
    return {
        "trainer_iteration_s": trainer_iter,
        "trainer_cycle_s": timer.cycles,
        "components_s": med,
        "component_weights_per_cycle": weights,
        "component_sum_iteration_s": component_iter,
        "overhead_ratio": trainer_iter / component_iter,
        "memory_kind": memory.kind,
        "trainer_cycle_peak_bytes": timer.peak,
        "component_peak_bytes": peaks,
        "largest_component": peak_component,
    }


def bench_sampling(args, cfg: DistillConfig, task: NativeTask, device: torch.device) -> dict:
    from dmd_dar.models import to_dar

    teacher, meta = task.net, task.meta  # frozen, eval, on the device
    student = to_dar(teacher, cfg.networks.student_routing).eval().requires_grad_(False)  # one-step: [t = 1]
    student_meta = task.student_meta()
    n = args.sample_batch
    labels = torch.arange(n) % max(teacher.cfg.num_classes, 1)
    seeds = list(range(n))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def run_student():
        for _ in range(args.student_repeats):
            generate(student, student_meta, labels, seeds)

    def run_teacher():
        generate(teacher, meta, labels, seeds, steps=args.teacher_steps)

    generate(student, student_meta, labels, seeds)  # warm-up
    generate(teacher, meta, labels, seeds, steps=2)
    runs = {"student": (run_student, n * args.student_repeats), "teacher": (run_teacher, n)}
    rates: dict[str, list[float]] = {"student": [], "teacher": []}
    for r in range(args.sample_rounds):
        order = ["student", "teacher"] if r % 2 == 0 else ["teacher", "student"]
        for name in order:
            fn, images = runs[name]
            sync()
            start = time.perf_counter()
            fn()
            sync()
            rates[name].append(images / (time.perf_counter() - start))
    s, t = statistics.median(rates["student"]), statistics.median(rates["teacher"])
    return {"student_images_per_s": s, "teacher_images_per_s": t, "speedup": s / t,
            "teacher_steps": args.teacher_steps, "cfg_scale": meta.diffusion.cfg_scale, "sample_batch": n,
            "rates": rates}


def _ms(s: float) -> str:
    return f"{1e3 * s:.1f} ms"


def _mb(b: int) -> str:
    return f"{b / 2**20:.1f} MB"


def print_table(res: dict) -> None:
    it, sm = res["iteration"], res["sampling"]
    rows = [("DMD2 iteration, trainer (cycle / ttur)", _ms(it["trainer_iteration_s"]), "", "")]
    for name, sec in it["components_s"].items():
        rows.append((f"  {name} (x{it['component_weights_per_cycle'][name]} per cycle)", _ms(sec), "", ""))
    rows.append(("sum of component passes / iteration", _ms(it["component_sum_iteration_s"]), "", ""))
    ratio = it["overhead_ratio"]
    rows.append(("overhead ratio", f"{ratio:.3f}", f"<= {OVERHEAD_TARGET:.2f}",
                 "PASS" if ratio <= OVERHEAD_TARGET else "FAIL"))
    rows.append((f"peak memory, trainer cycle [{it['memory_kind']}]", _mb(it["trainer_cycle_peak_bytes"]), "", ""))
    big = it["largest_component"]
    big_b = it["component_peak_bytes"][big]
    rows.append((f"peak memory, largest pass ({big})", _mb(big_b), "", ""))
    rows.append(("memory ratio trainer / largest pass", f"{it['trainer_cycle_peak_bytes'] / max(big_b, 1):.2f}",
                 "report", ""))
    rows.append(("one-step student sampling", f"{sm['student_images_per_s']:.1f} img/s", "", ""))
    rows.append((f"{sm['teacher_steps']}-step teacher, CFG {sm['cfg_scale']:g}",
                 f"{sm['teacher_images_per_s']:.2f} img/s", "", ""))
    rows.append(("sampling speed-up", f"{sm['speedup']:.1f}x", f">= {SPEEDUP_TARGET:.0f}x",
                 "PASS" if sm["speedup"] >= SPEEDUP_TARGET else "FAIL"))
    w = max(len(r[0]) for r in rows)
    print(f"{'measure':<{w}}  {'value':>14}  {'target':>9}  result")
    for name, value, target, result in rows:
        print(f"{name:<{w}}  {value:>14}  {target:>9}  {result}")
    m = res["machine"]
    print(f"device {m['device']}, torch threads {m['threads']}, load average {m['load_before']} -> "
          f"{m['load_after']}, {m['wall_s']:.0f} s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--teacher", default=str(TEACHER))
    p.add_argument("--batch", type=int, default=16, help="per-iteration batch (the main job's)")
    p.add_argument("--ttur", type=int, default=3)
    p.add_argument("--warmup-cycles", type=int, default=2)
    p.add_argument("--cycles", type=int, default=10, help="timed TTUR cycles")
    p.add_argument("--sample-batch", type=int, default=16)
    p.add_argument("--teacher-steps", type=int, default=50)
    p.add_argument("--student-repeats", type=int, default=5, help="student batches per timed round")
    p.add_argument("--sample-rounds", type=int, default=4)
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: 1 on --device cpu, where a shared machine's busy cores make "
                        "more threads spin; torch's default on cuda)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available")
    threads = args.threads or (1 if args.device == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    device = torch.device(args.device)
    wall = time.perf_counter()
    load_before = [round(x, 2) for x in os.getloadavg()]
    with tempfile.TemporaryDirectory(prefix="bench_distill_") as tmp:
        cfg = bench_config(args, device, Path(tmp))
        task = NativeTask(cfg.networks.teacher, cfg.method.student_steps, cfg.data, device)
        iteration = bench_iteration(args, cfg, task, device)
    sampling = bench_sampling(args, cfg, task, device)
    res = {"iteration": iteration, "sampling": sampling,
           "targets": {"overhead_ratio_max": OVERHEAD_TARGET, "sampling_speedup_min": SPEEDUP_TARGET},
           "pass": {"overhead": iteration["overhead_ratio"] <= OVERHEAD_TARGET,
                    "sampling": sampling["speedup"] >= SPEEDUP_TARGET},
           "machine": {"device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor()
                       or platform.machine(), "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                       "torch": torch.__version__, "load_before": load_before,
                       "load_after": [round(x, 2) for x in os.getloadavg()], "wall_s": time.perf_counter() - wall},
           "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    print_table(res)
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
