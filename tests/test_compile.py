"""run.compile: DAR routers trace without graph breaks; compiled forwards equal eager; checkpoints and resume are
unaffected; a compile failure falls back to eager with one warning line.

Only ``test_inductor_forward_and_backward_equal_eager`` compiles C++ (inductor, slow on 2 cores); the trainer
tests swap in the ``aot_eager`` backend, which traces forward and backward exactly as inductor's front end does
but runs the traced graphs with eager kernels.
"""

import copy
import logging
from pathlib import Path

import pytest
import torch
from test_distill_trainer import _overrides, tiny_teacher  # noqa: F401 (tiny_teacher: fixture)
from test_teacher_training import _args as teacher_args
from test_teacher_training import _losses
from torch._dynamo.utils import counters

from dmd_dar.cli import main
from dmd_dar.config import build_config
from dmd_dar.distill.config import DistillConfig
from dmd_dar.errors import UserError
from dmd_dar.models import build_model, preset_config
from dmd_dar.routing import RoutingConfig
from dmd_dar.sampling import SampleConfig
from dmd_dar.training import compile as compiling
from dmd_dar.training.compile import compile_forward, is_compiled
from dmd_dar.training.run import RunConfig
from dmd_dar.utils.io import load_safetensors


@pytest.fixture(autouse=True)
def _fresh_compile_state():
    compiling._platform_failure.cache_clear()  # the platform probe is cached per process
    torch._dynamo.reset()
    counters.clear()
    yield
    compiling._platform_failure.cache_clear()
    torch._dynamo.reset()


class Compiled(list):
    """The functions torch.compile was given (the platform probe's included), and how often each compiled one ran."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: dict[str, int] = {}

    def forwards(self) -> list:
        return [fn for fn in self if getattr(fn, "__name__", "") == "forward"]


@pytest.fixture
def aot_eager(monkeypatch) -> Compiled:
    """torch.compile with the aot_eager backend, recording what it compiles and runs."""
    real, compiled = torch.compile, Compiled()

    def compile_aot_eager(fn, mode=None, **kwargs):
        compiled.append(fn)
        inner = real(fn, backend="aot_eager", **kwargs)
        name = getattr(fn, "__qualname__", "?")

        def run(*args, **kw):
            compiled.calls[name] = compiled.calls.get(name, 0) + 1
            return inner(*args, **kw)
        return run

    monkeypatch.setattr(torch, "compile", compile_aot_eager)
    return compiled


def _ours(caplog) -> list[str]:
    """The project's log lines (torch logs its own traces to the same capture)."""
    return [r.getMessage() for r in caplog.records if r.name == "dmd_dar"]


def _tiny(query: str = "static_t", chunk: int = 2, summary: str = "last"):
    routing = RoutingConfig(kind="dar", query=query, chunk_size=chunk, summary=summary)
    model = build_model(preset_config("tiny", routing=routing, class_dropout_prob=0.0))  # no random label drops
    with torch.no_grad():  # non-zero adaLN, head and queries: every sublayer and aggregator does real work
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _inputs():
    gen = torch.Generator().manual_seed(3)
    return (torch.randn(2, 3, 16, 16, generator=gen), torch.rand(2, generator=gen),
            torch.randint(0, 4, (2,), generator=gen))


def _forward_backward(model, inputs, call=None):
    model.zero_grad(set_to_none=True)
    out = (model if call is None else call)(*inputs)
    out.pow(2).mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("query, chunk, summary", [("static", 2, "last"), ("static_t", 1, "last"),
                                                   ("static_t", 2, "sum"), ("dynamic", 2, "last")])
def test_dar_routers_compile_without_graph_breaks(query, chunk, summary):
    model = _tiny(query, chunk, summary)
    inputs = _inputs()
    assert torch._dynamo.explain(model)(*inputs).graph_break_count == 0
    with torch.no_grad():  # the teacher's and the no-grad passes of the student and the fake score
        assert torch._dynamo.explain(model)(*inputs).graph_break_count == 0
    # fullgraph: one graph for the forward, and the lean function's backward traced into the backward graph
    eager = _forward_backward(model, inputs)
    compiled = _forward_backward(model, inputs, torch.compile(model, fullgraph=True, backend="aot_eager"))
    torch.testing.assert_close(compiled[0], eager[0])
    for name, grad in eager[1].items():
        torch.testing.assert_close(compiled[1][name], grad, msg=name)


def test_inductor_forward_and_backward_equal_eager():
    model = _tiny("dynamic", 2, "sum")
    reference, inputs = copy.deepcopy(model), _inputs()
    keys = list(model.state_dict())
    assert compile_forward(model, "default", "the student") is model and is_compiled(model)
    got, want = _forward_backward(model, inputs), _forward_backward(reference, inputs)
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-4)
    for name, grad in want[1].items():
        torch.testing.assert_close(got[1][name], grad, atol=1e-5, rtol=1e-4, msg=name)
    assert is_compiled(model), "the compiled forward must not have fallen back to eager"
    assert list(model.state_dict()) == keys  # no _orig_mod. prefix: checkpoints and exports are unchanged
    # student, fake score and teacher share SiT.forward's dynamo cache: more entries than dynamo's default 8
    assert torch._dynamo.config.recompile_limit >= compiling.RECOMPILE_LIMIT
    twin = copy.deepcopy(model)  # e.g. an EMA copy: runs its own weights
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(0.5)
    assert not torch.allclose(twin(*inputs), model(*inputs))


def test_compile_unavailable_is_one_warning_and_eager(monkeypatch, caplog):
    def no_compiler(*args, **kwargs):
        raise RuntimeError("Compiler: cc is not found.\nsecond line of the trace")

    monkeypatch.setattr(torch, "compile", no_compiler)
    model, inputs = _tiny(), _inputs()
    want = model(*inputs)
    with caplog.at_level(logging.WARNING, logger="dmd_dar"):
        compile_forward(model, "max-autotune", "the fake score")
    assert _ours(caplog) == [
        "warning: run.compile=max-autotune: torch.compile is unavailable here (RuntimeError: Compiler: cc is not "
        "found.); the fake score runs eager"]
    assert not is_compiled(model) and "forward" not in model.__dict__
    torch.testing.assert_close(model(*inputs), want)


def test_failure_at_the_first_compiled_call_falls_back_once(aot_eager, monkeypatch, caplog):
    """Compilation is lazy: a failure inside the first call switches that network to eager, with one warning."""
    model, inputs = _tiny(), _inputs()
    want = model(*inputs)
    real = torch.compile

    def compiled_but_broken(fn, mode=None, **kwargs):
        if fn is not type(model).forward:  # the platform probe compiles and runs fine
            return real(fn, mode=mode, **kwargs)

        def call(*args, **kw):
            raise RuntimeError("CppCompileError: C++ compile error\ncommand line ...")
        return call

    monkeypatch.setattr(torch, "compile", compiled_but_broken)
    with caplog.at_level(logging.WARNING, logger="dmd_dar"):
        compile_forward(model, "default", "the student")
        assert is_compiled(model)
        outs = [model(*inputs) for _ in range(3)]
    assert _ours(caplog) == [("warning: run.compile=default: compiling the student failed (RuntimeError: CppCompileError: "
                   "C++ compile error); running it eager")]
    assert not is_compiled(model)
    for out in outs:
        torch.testing.assert_close(out, want)


def test_a_callers_error_is_raised_as_it_is_not_taken_for_a_compile_failure(aot_eager, caplog):
    model = _tiny()
    compile_forward(model, "default", "the student")
    x, t, y = _inputs()
    with caplog.at_level(logging.WARNING, logger="dmd_dar"), pytest.raises(RuntimeError):
        model(x[:, :2], t, y)  # 2 channels where the model takes 3: eager fails the same way
    assert _ours(caplog) == [] and is_compiled(model)


def test_compile_setting_is_validated_and_off_by_default(tmp_path):
    assert RunConfig().compile == "false"
    assert build_config(DistillConfig).run.compile == "false"  # the main job's resolution does not move
    assert build_config(DistillConfig, [], ["run.compile=false"]).run.compile == "false"
    layer = tmp_path / "layer.yaml"
    layer.write_text("run:\n  compile: false\n")  # YAML's boolean false
    assert build_config(DistillConfig, [layer]).run.compile == "false"
    assert build_config(DistillConfig, [], ["run.compile=max-autotune"]).run.compile == "max-autotune"
    with pytest.raises(UserError, match=r"^run\.compile='fast' is not valid; choose one of false, default, "
                                        r"max-autotune"):
        build_config(DistillConfig, [], ["run.compile=fast"])
    with pytest.raises(UserError, match=r"^run\.compile=true names no mode; use run\.compile=default"):
        build_config(DistillConfig, [], ["run.compile=true"])
    with pytest.raises(UserError, match=r"^compile='fast' is not valid"):
        SampleConfig(compile="fast")


def _state_files(run: Path, step: int, name: str) -> dict[str, torch.Tensor]:
    return load_safetensors(run / "checkpoints" / f"step_{step:07d}" / f"{name}.safetensors")


def test_distill_with_compile_equals_eager_and_resumes(tiny_teacher, tmp_path, aot_eager, caplog):  # noqa: F811
    """Compiled student, fake score and teacher: the same training within float tolerance, checkpoints with the
    same keys, and a compiled run resumes from its checkpoint (and an eager one from a compiled run's)."""
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    assert main(["distill", *_overrides(tiny_teacher, eager, 4)]) == 0
    assert aot_eager == []  # run.compile=false compiles nothing
    assert main(["distill", *_overrides(tiny_teacher, compiled, 2, "run.compile=default")]) == 0
    assert len(aot_eager.forwards()) == 3  # student, fake score, teacher (each a SiT)
    # per iteration: student (generator phase), teacher + fake score (DM), fake score (critic) ...
    assert aot_eager.calls["SiT.forward"] >= 6
    assert _ours(caplog) == [], "no network may have fallen back to eager"
    assert dict(counters["graph_break"]) == {}, "grad and no-grad passes alike trace as one graph each"
    assert main(["distill", *_overrides(tiny_teacher, compiled, 4, "run.compile=default")]) == 0  # resumes
    for name in ("generator", "fake_score", "generator_ema"):
        want, got = _state_files(eager, 4, name), _state_files(compiled, 4, name)
        assert want.keys() == got.keys() and want
        for k in want:
            torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=1e-4, msg=f"{name}.{k}")
    want, got = (load_safetensors(run / "export" / "model.safetensors") for run in (eager, compiled))
    assert want.keys() == got.keys()
    # and back: an eager run resumes from the compiled run's checkpoint
    assert main(["distill", *_overrides(tiny_teacher, compiled, 5)]) == 0
    # the sample command compiles the exported student
    before = len(aot_eager.forwards())
    assert main(["sample", f"checkpoint={compiled / 'export'}", "num_per_class=1", "compile=default",
                 f"out_dir={tmp_path / 'samples'}"]) == 0
    assert len(aot_eager.forwards()) == before + 1
    assert len((tmp_path / "samples" / "manifest.jsonl").read_text().splitlines()) == 8
    assert _ours(caplog) == []


def test_train_teacher_with_compile_equals_eager(tmp_path, aot_eager, caplog):
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    assert main(teacher_args(eager, 2)) == 0
    assert main(teacher_args(compiled, 2, "run.compile=default")) == 0
    assert len(aot_eager.forwards()) == 1 and aot_eager.calls["SiT.forward"] == 2  # one per training step
    assert _ours(caplog) == []
    a, b = _losses(eager), _losses(compiled)
    assert a.keys() == b.keys() == {1, 2}
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-4, abs=1e-6)
    want, got = (_state_files(run, 2, "model") for run in (eager, compiled))
    assert want.keys() == got.keys() and want
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=1e-4, msg=k)
