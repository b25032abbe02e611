"""Optimizer factory, `--optimizer_args` parsing, the Adafactor fused backward pass and the LR-scheduler factory."""

from __future__ import annotations

import argparse
import logging
import math
import sys
import types

import pytest
import torch

from library.errors import AnimaError
from library.training.optimizers import (
    Adafactor,
    create_optimizer,
    install_fused_backward_pass,
    is_schedule_free,
    optimizer_type_names,
    parse_literal_kwargs,
)
from library.training.schedulers import (
    LR_SCHEDULERS,
    ScheduleFreeScheduler,
    create_lr_scheduler,
    parse_int_or_float,
    resolve_lr_scheduler_name,
    steps_from_int_or_float,
)

# ---------------------------------------------------------------- tiny regression problem


def _tiny_problem(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    x = torch.randn(64, 8, generator=gen)
    y = torch.randn(64, 4, generator=gen)
    return model, x, y


def _train(model, optimizer, x, y, steps: int = 30) -> tuple[float, float]:
    def loss_fn():
        return torch.nn.functional.mse_loss(model(x), y)

    first = loss_fn().item()
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        loss_fn().backward()
        optimizer.step()
    return first, loss_fn().item()


def _bitsandbytes_or_skip():
    """Skip when this bitsandbytes build cannot run an 8-bit step here (e.g. a CUDA-only build on a CPU box)."""
    try:
        import bitsandbytes

        probe = torch.nn.Parameter(torch.zeros(4096))
        probe.grad = torch.ones(4096)
        bitsandbytes.optim.AdamW8bit([probe], lr=1e-3).step()
    except Exception as e:  # a broken native build raises more than ImportError
        pytest.skip(f"bitsandbytes cannot run an 8-bit optimizer step on this machine: {e}")


@pytest.mark.parametrize(
    ("optimizer_type", "lr", "args", "expected_name"),
    [
        ("", 1e-2, [], "torch.optim.adamw.AdamW"),
        ("adamw", 1e-2, ["betas=(0.9,0.99)", "weight_decay=0.01"], "torch.optim.adamw.AdamW"),
        ("SGDNesterov", 1e-2, [], "torch.optim.sgd.SGD"),
        ("Lion", 1e-3, ["weight_decay=0.1"], "library.training.optimizers.Lion"),
        ("AdaFactor", 1e-2, ["relative_step=False", "scale_parameter=False"], "library.training.optimizers.Adafactor"),
        ("Adafactor", 0.0, [], "library.training.optimizers.Adafactor"),
        ("RMSprop", 1e-2, [], "torch.optim.rmsprop.RMSprop"),
        ("rmsprop", 1e-2, ["alpha=0.9"], "torch.optim.rmsprop.RMSprop"),
        ("torch.optim.Adam", 1e-2, [], "torch.optim.adam.Adam"),
    ],
)
def test_optimizer_builds_and_reduces_loss(optimizer_type, lr, args, expected_name):
    model, x, y = _tiny_problem()
    name, _, optimizer = create_optimizer(optimizer_type, model.parameters(), lr, args)
    assert name == expected_name
    first, last = _train(model, optimizer, x, y)
    assert last < 0.9 * first, (first, last)


@pytest.mark.parametrize(
    ("optimizer_type", "expected_name"),
    [
        ("AdamW8bit", "bitsandbytes.optim.adamw.AdamW8bit"),
        ("Lion8bit", "bitsandbytes.optim.lion.Lion8bit"),
        ("SGDNesterov8bit", "bitsandbytes.optim.sgd.SGD8bit"),
        ("PagedAdamW8bit", "bitsandbytes.optim.adamw.PagedAdamW8bit"),
        ("bitsandbytes.optim.PagedAdamW8bit", "bitsandbytes.optim.adamw.PagedAdamW8bit"),
    ],
)
def test_bitsandbytes_optimizers_build_and_reduce_loss(optimizer_type, expected_name):
    _bitsandbytes_or_skip()
    model, x, y = _tiny_problem()
    # one layer above bitsandbytes' 4096-element threshold so the 8-bit state path really runs
    big = torch.nn.Linear(8, 4096, bias=False)
    model.insert(0, big)
    model[1] = torch.nn.Linear(4096, 16)
    lr = 1e-4 if "lion" in optimizer_type.lower() else 1e-3
    name, _, optimizer = create_optimizer(optimizer_type, model.parameters(), lr)
    first, last = _train(model, optimizer, x, y, steps=20)
    assert name == expected_name
    assert last < first, (first, last)


def test_sgd_nesterov_gets_momentum_default_and_records_only_the_momentum():
    model, _, _ = _tiny_problem()
    name, args, optimizer = create_optimizer("sgdnesterov", model.parameters(), 0.1)
    assert optimizer.defaults["momentum"] == 0.9 and optimizer.defaults["nesterov"] is True
    # The ss_optimizer text shows the filled-in momentum; Nesterov is what the name says (sd-scripts' text).
    assert args == "momentum=0.9"
    _, args, optimizer = create_optimizer("SGDNesterov", model.parameters(), 0.1, ["momentum=0.5"])
    assert optimizer.defaults["momentum"] == 0.5 and optimizer.defaults["nesterov"] is True and args == "momentum=0.5"


@pytest.mark.parametrize("value", ["False", "True"])
def test_sgd_nesterov_refuses_a_nesterov_option(value):
    model, _, _ = _tiny_problem()
    with pytest.raises(AnimaError, match="--optimizer_args nesterov: --optimizer_type SGDNesterov always uses "
                                         "nesterov=True"):
        create_optimizer("SGDNesterov", model.parameters(), 0.1, [f"nesterov={value}"])


def test_param_group_lrs_are_kept():
    model, _, _ = _tiny_problem()
    groups = [{"params": list(model[0].parameters()), "lr": 1e-3}, {"params": list(model[2].parameters())}]
    _, _, optimizer = create_optimizer("AdamW", groups, 5e-4)
    assert [g["lr"] for g in optimizer.param_groups] == [1e-3, 5e-4]


def test_lion_update_is_signed_momentum_with_decoupled_weight_decay():
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
    _, _, optimizer = create_optimizer("Lion", [p], 0.1, ["betas=(0.9,0.99)", "weight_decay=0.5"])
    p.grad = torch.tensor([0.3, -0.1, 0.0])
    optimizer.step()
    # m = 0: update = sign(0.1·g); p ← p·(1 − 0.1·0.5) − 0.1·sign(g)
    expected = torch.tensor([1.0, -2.0, 0.5]) * 0.95 - 0.1 * torch.tensor([1.0, -1.0, 0.0])
    torch.testing.assert_close(p.detach(), expected)
    torch.testing.assert_close(optimizer.state[p]["exp_avg"], 0.01 * torch.tensor([0.3, -0.1, 0.0]))


def test_lion_decoupled_weight_decay_divides_the_decay_by_the_initial_lr():
    # lion-pytorch's option (sd-scripts passes --optimizer_args to that class): wd / lr0, with lr0 the --learning_rate,
    # so a group at twice the LR decays twice as fast, and halving the LR by a schedule halves the decay.
    p, q = torch.nn.Parameter(torch.tensor([1.0, -2.0])), torch.nn.Parameter(torch.tensor([4.0]))
    _, args, optimizer = create_optimizer("Lion", [{"params": [p]}, {"params": [q], "lr": 0.2}], 0.1,
                                          ["decoupled_weight_decay=True", "weight_decay=0.5"])
    assert args == "decoupled_weight_decay=True,weight_decay=0.5"
    p.grad, q.grad = torch.tensor([0.3, -0.1]), torch.tensor([-1.0])
    optimizer.step()
    # p ← p·(1 − lr·wd/lr0) − lr·sign(g): lr0 = 0.1, wd/lr0 = 5
    torch.testing.assert_close(p.detach(), torch.tensor([1.0, -2.0]) * (1 - 0.1 * 5) - 0.1 * torch.tensor([1.0, -1.0]))
    torch.testing.assert_close(q.detach(), torch.tensor([4.0]) * (1 - 0.2 * 5) + 0.2)


def test_adafactor_relative_step_drops_lrs_and_switches_scheduler():
    model, _, _ = _tiny_problem()
    groups = [{"params": list(model.parameters()), "lr": 1e-3}]
    name, args, optimizer = create_optimizer("Adafactor", groups, 1e-3)
    assert args == "relative_step=True"
    assert optimizer.param_groups[0]["lr"] is None
    scheduler_name = resolve_lr_scheduler_name("cosine", optimizer, 1e-3)
    assert scheduler_name == "adafactor:0.001"
    scheduler = create_lr_scheduler(scheduler_name, optimizer, 100)
    assert type(scheduler).__name__ == "AdafactorSchedule"
    assert scheduler.get_last_lr() == [1e-3]  # reported before the first step
    _train(model, optimizer, *_tiny_problem()[1:], steps=1)
    first = next(model.parameters())
    rms = first.detach().norm() / first.numel() ** 0.5
    # After a step: the step size of the group's first parameter, relative step 1e-2 times max(1e-3, RMS(p)).
    torch.testing.assert_close(scheduler.get_last_lr()[0], max(rms, torch.tensor(1e-3)) * 1e-2)

    _, _, fixed = create_optimizer("Adafactor", model.parameters(), 1e-3, ["relative_step=False"])
    assert resolve_lr_scheduler_name("cosine", fixed, 1e-3) == "cosine"
    with pytest.raises(AnimaError, match="relative_step"):
        create_lr_scheduler("adafactor", fixed, 100)


def test_adafactor_warmup_init_forces_relative_step():
    model, _, _ = _tiny_problem()
    _, args, optimizer = create_optimizer(
        "Adafactor", model.parameters(), 0.0, ["relative_step=False", "warmup_init=True"]
    )
    assert optimizer.defaults["relative_step"] is True and "relative_step=True" in args


def test_missing_optional_package_gives_pip_command(monkeypatch):
    model, _, _ = _tiny_problem()
    for module, optimizer_type in (
        ("prodigyopt", "Prodigy"),
        ("dadaptation", "DAdaptAdam"),
        ("schedulefree", "AdamWScheduleFree"),
    ):
        monkeypatch.setitem(sys.modules, module, None)  # makes the import fail even if installed
        with pytest.raises(AnimaError, match=f"pip install {module}"):
            create_optimizer(optimizer_type, model.parameters(), 1.0)


def test_packaged_optimizer_gets_kwargs_and_warns_on_small_lr(monkeypatch, caplog):
    received = {}

    class Prodigy(torch.optim.SGD):
        def __init__(self, params, lr=1.0, **kwargs):
            received.update(kwargs)
            super().__init__(params, lr=lr)

    fake = types.ModuleType("prodigyopt")
    fake.Prodigy = Prodigy
    monkeypatch.setitem(sys.modules, "prodigyopt", fake)
    model, _, _ = _tiny_problem()
    name, args, _ = create_optimizer("prodigy", model.parameters(), 1e-4, ["decouple=True", "d_coef=2"])
    assert received == {"decouple": True, "d_coef": 2}
    assert name == f"{Prodigy.__module__}.Prodigy" and args == "decouple=True,d_coef=2"
    assert "learning rate around 1.0" in caplog.text


def test_schedule_free_optimizer_gets_a_no_op_scheduler():
    class SGDScheduleFree(torch.optim.SGD):
        pass

    model, _, _ = _tiny_problem()
    optimizer = SGDScheduleFree(model.parameters(), lr=0.25)
    assert is_schedule_free(optimizer)
    scheduler = create_lr_scheduler("cosine", optimizer, 100, 10)
    assert isinstance(scheduler, ScheduleFreeScheduler)
    scheduler.step()
    assert scheduler.get_last_lr() == [0.25]


def test_schedule_free_optimizer_warns_that_the_scheduler_flags_go_unused(caplog):
    class AdamWScheduleFree(torch.optim.AdamW):
        pass

    model, _, _ = _tiny_problem()
    optimizer = AdamWScheduleFree(model.parameters(), lr=0.25)
    with caplog.at_level(logging.WARNING):
        create_lr_scheduler("constant", optimizer, 100, 0)
    assert not caplog.records
    with caplog.at_level(logging.WARNING):
        create_lr_scheduler("cosine", optimizer, 100, 0.1, scheduler_args=["num_cycles=2"])
    assert [r.getMessage() for r in caplog.records] == [
        "--lr_scheduler, --lr_warmup_steps, --lr_scheduler_args: not used with the schedule-free optimizer "
        "AdamWScheduleFree, which keeps its own schedule (its warmup: --optimizer_args warmup_steps=N)"]


def test_unknown_optimizer_lists_valid_names():
    model, _, _ = _tiny_problem()
    with pytest.raises(AnimaError, match="AdamW8bit") as info:
        create_optimizer("AdamW9bit", model.parameters(), 1e-3)
    assert "--optimizer_type" in str(info.value) and "Prodigy" in str(info.value)
    assert "Adafactor" in optimizer_type_names()


@pytest.mark.parametrize(
    "optimizer_type",
    ["os.system", "no_such_module_xyz.Opt", "torch.optim.NoSuchOpt", "torch.optim.Adam;import os", "torch..Adam"],
)
def test_bad_dotted_optimizer_paths_are_rejected(optimizer_type):
    model, _, _ = _tiny_problem()
    with pytest.raises(AnimaError, match="--optimizer_type"):
        create_optimizer(optimizer_type, model.parameters(), 1e-3)


def test_unknown_optimizer_arg_names_the_flag():
    model, _, _ = _tiny_problem()
    with pytest.raises(AnimaError, match="--optimizer_args.*no_such_key"):
        create_optimizer("AdamW", model.parameters(), 1e-3, ["no_such_key=1"])


def test_legacy_optimizer_flags_are_exclusive():
    model, _, _ = _tiny_problem()
    name, _, _ = create_optimizer("", model.parameters(), 1e-4, use_lion_optimizer=True)
    assert name.endswith(".Lion")
    with pytest.raises(AnimaError, match="exclusive"):
        create_optimizer("AdamW", model.parameters(), 1e-4, use_8bit_adam=True)
    with pytest.raises(AnimaError, match="exclusive"):
        create_optimizer("", model.parameters(), 1e-4, use_8bit_adam=True, use_lion_optimizer=True)


def test_no_trainable_parameters_is_a_clear_error():
    with pytest.raises(AnimaError, match="no trainable parameters"):
        create_optimizer("AdamW", [], 1e-3)


# ---------------------------------------------------------------- key=value parsing


def test_literal_kwargs_parse_python_literals():
    parsed = parse_literal_kwargs(
        [
            "betas=(0.9,0.99)",
            "weight_decay=0.01",
            "decouple=True",
            "eps=None",
            'mode="min"',
            "milestones=[1, 2]",
            " d = 2 ",
        ],
        "--optimizer_args",
    )
    assert parsed == {
        "betas": (0.9, 0.99),
        "weight_decay": 0.01,
        "decouple": True,
        "eps": None,
        "mode": "min",
        "milestones": [1, 2],
        "d": 2,
    }
    assert parse_literal_kwargs(["betas=0.9,0.99"], "--optimizer_args") == {"betas": (0.9, 0.99)}
    assert parse_literal_kwargs(["step_rules='1:10,0.1'"], "x") == {"step_rules": "1:10,0.1"}
    assert parse_literal_kwargs(None, "x") == {}


@pytest.mark.parametrize(
    "item",
    [
        "x=__import__('pathlib').Path(r'{marker}').touch()",
        "x=open(r'{marker}', 'w')",
        "x=exec(\"open(r'{marker}', 'w')\")",
        "x=(lambda: open(r'{marker}', 'w'))()",
        "x=[c for c in ().__class__.__base__.__subclasses__()]",
        "x=torch.optim",
        "x=min",
    ],
)
def test_malicious_values_are_rejected_and_never_run(item, tmp_path):
    marker = tmp_path / "evaluated"
    with pytest.raises(AnimaError, match="not a Python literal"):
        parse_literal_kwargs([item.format(marker=marker)], "--optimizer_args")
    assert not marker.exists()


@pytest.mark.parametrize("item", ["weight_decay", "=0.1", "a.b=1", "bad key=1", "__import__('os')=1"])
def test_malformed_items_name_the_flag(item):
    with pytest.raises(AnimaError, match="--lr_scheduler_args"):
        parse_literal_kwargs([item], "--lr_scheduler_args")


def test_huge_nested_values_are_rejected_without_crashing():
    with pytest.raises(AnimaError, match="longer than"):
        parse_literal_kwargs(["x=" + "(" * 5000 + ")" * 5000], "--optimizer_args")
    with pytest.raises(AnimaError, match="not a Python literal"):
        parse_literal_kwargs(["x=" + "[" * 400 + "]" * 400], "--optimizer_args")


def test_unquoted_words_are_rejected_with_a_quoting_hint():
    with pytest.raises(AnimaError, match='mode="text"'):
        parse_literal_kwargs(["mode=min"], "--lr_scheduler_args")


# ---------------------------------------------------------------- Adafactor


@pytest.mark.parametrize("options", [
    {"lr": None},  # relative step, scale_parameter (the defaults)
    {"lr": None, "warmup_init": True},
    {"lr": None, "beta1": 0.9, "weight_decay": 0.1},
    {"lr": 3e-2, "relative_step": False},
    {"lr": 3e-2, "relative_step": False, "scale_parameter": False, "beta1": 0.8},
    {"lr": 1e-2, "relative_step": False, "scale_parameter": False, "clip_threshold": 0.5, "decay_rate": -0.5},
])
def test_adafactor_matches_the_transformers_update_over_several_steps(options):
    import transformers.optimization

    ours_model, x, y = _tiny_problem(seed=5)
    ref_model, _, _ = _tiny_problem(seed=5)
    ours = Adafactor(ours_model.parameters(), **options)
    reference = transformers.optimization.Adafactor(ref_model.parameters(), **options)
    for _ in range(6):
        for model, optimizer in ((ours_model, ours), (ref_model, reference)):
            optimizer.zero_grad(set_to_none=True)
            torch.nn.functional.mse_loss(model(x), y).backward()
            optimizer.step()
    for mine, theirs in zip(ours_model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-7)
    for mine, theirs in zip(ours.state.values(), reference.state.values()):
        assert mine.keys() == theirs.keys() and mine["step"] == theirs["step"] == 6
        torch.testing.assert_close(mine["RMS"], theirs["RMS"])


def test_adafactor_updates_bf16_parameters_in_float32_like_transformers():
    import transformers.optimization

    weights = torch.randn(8, 6, generator=torch.Generator().manual_seed(2)).bfloat16()
    grads = [torch.randn(8, 6, generator=torch.Generator().manual_seed(s)).bfloat16() for s in range(3)]
    params = [torch.nn.Parameter(weights.clone()) for _ in range(2)]
    optimizers = [Adafactor([params[0]], beta1=0.9), transformers.optimization.Adafactor([params[1]], beta1=0.9)]
    for grad in grads:
        for p, optimizer in zip(params, optimizers):
            p.grad = grad.clone()
            optimizer.step()
    assert params[0].dtype == torch.bfloat16
    torch.testing.assert_close(params[0], params[1], rtol=1e-2, atol=1e-3)


def test_adafactor_step_reads_nothing_back_from_the_device():
    from bench.bench_host_syncs import HostSyncCounter

    model, x, y = _tiny_problem(seed=1)
    optimizer = Adafactor(model.parameters(), beta1=0.9, weight_decay=0.01)  # relative step, scale_parameter
    for step in range(3):
        torch.nn.functional.mse_loss(model(x), y).backward()
        with HostSyncCounter() as counter:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        assert counter.total == 0, (step, counter.sites)


def test_adafactor_rejects_contradicting_options_like_transformers():
    model, _, _ = _tiny_problem()
    with pytest.raises(ValueError, match="relative_step"):
        Adafactor(model.parameters(), lr=1e-3)
    with pytest.raises(ValueError, match="warmup_init"):
        Adafactor(model.parameters(), lr=1e-3, relative_step=False, warmup_init=True)


# ---------------------------------------------------------------- fused backward pass


def _adafactor_pair(args: list[str]):
    model_a, x, y = _tiny_problem(seed=4)
    model_b, _, _ = _tiny_problem(seed=4)
    _, _, opt_a = create_optimizer("Adafactor", model_a.parameters(), 1e-2, args)
    _, _, opt_b = create_optimizer("Adafactor", model_b.parameters(), 1e-2, args)
    return model_a, opt_a, model_b, opt_b, x, y


@pytest.mark.parametrize(
    "args", [["relative_step=False", "scale_parameter=False"], [], ["relative_step=False", "beta1=0.9"]]
)
def test_fused_backward_pass_equals_a_normal_adafactor_step(args):
    model_a, opt_a, model_b, opt_b, x, y = _adafactor_pair(args)
    install_fused_backward_pass(opt_b)
    for _ in range(3):
        opt_a.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(model_a(x), y).backward()
        opt_a.step()
        torch.nn.functional.mse_loss(model_b(x), y).backward()
        assert all(p.grad is None for p in model_b.parameters())  # stepped and freed inside backward
        opt_b.step()  # a no-op now: every grad is None
    for pa, pb in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)
    assert not torch.equal(next(model_a.parameters()), _tiny_problem(seed=4)[0][0].weight)


def test_fused_backward_pass_clips_each_parameter_on_its_own():
    max_norm = 0.05
    model_a, opt_a, model_b, opt_b, x, y = _adafactor_pair(["relative_step=False", "scale_parameter=False"])
    handle = install_fused_backward_pass(opt_b, max_grad_norm=max_norm)
    torch.nn.functional.mse_loss(model_a(x), y).backward()
    for p in model_a.parameters():
        torch.nn.utils.clip_grad_norm_([p], max_norm)
    opt_a.step()
    torch.nn.functional.mse_loss(model_b(x), y).backward()
    for pa, pb in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)
    handle.remove()
    torch.nn.functional.mse_loss(model_b(x), y).backward()
    assert all(p.grad is not None for p in model_b.parameters())  # hooks gone


def test_fused_backward_pass_rejects_other_optimizers_and_accumulation():
    model, _, _ = _tiny_problem()
    _, _, adamw = create_optimizer("AdamW", model.parameters(), 1e-3)
    with pytest.raises(AnimaError, match="only with --optimizer_type Adafactor"):
        install_fused_backward_pass(adamw)
    _, _, adafactor = create_optimizer("Adafactor", model.parameters(), 1e-3, ["relative_step=False"])
    with pytest.raises(AnimaError, match="--gradient_accumulation_steps"):
        install_fused_backward_pass(adafactor, gradient_accumulation_steps=2)
    with pytest.raises(AnimaError, match="single process"):
        install_fused_backward_pass(adafactor, num_processes=2)


# ---------------------------------------------------------------- LR schedulers

T, W = 100, 10


def _lrs(name: str, steps=(0, 5, 10, 30, 55, 80, 99), **kwargs) -> dict[int, float]:
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1.0)
    scheduler = create_lr_scheduler(name, optimizer, T, **kwargs)
    out = {}
    for step in range(max(steps) + 1):
        if step in steps:
            out[step] = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
    return out


def _check(got: dict[int, float], formula) -> None:
    for step, lr in got.items():
        assert lr == pytest.approx(formula(step), abs=1e-9), (step, lr, formula(step))


def _after_warmup(step: int) -> float:
    return (step - W) / (T - W)


def test_constant_scheduler_is_flat_and_rejects_warmup():
    _check(_lrs("constant"), lambda s: 1.0)
    with pytest.raises(AnimaError, match="--lr_warmup_steps must be 0"):
        _lrs("constant", num_warmup_steps=5)


def test_constant_with_warmup_scheduler():
    _check(_lrs("constant_with_warmup", num_warmup_steps=W), lambda s: min(1.0, s / W))


def test_linear_scheduler():
    _check(_lrs("linear", num_warmup_steps=W), lambda s: s / W if s < W else 1 - _after_warmup(s))


def test_cosine_scheduler():
    _check(
        _lrs("cosine", num_warmup_steps=W),
        lambda s: s / W if s < W else 0.5 * (1 + math.cos(math.pi * _after_warmup(s))),
    )


def test_cosine_with_restarts_scheduler():
    _check(
        _lrs("cosine_with_restarts", num_warmup_steps=W, num_cycles=3),
        lambda s: s / W if s < W else 0.5 * (1 + math.cos(math.pi * ((3 * _after_warmup(s)) % 1))),
    )


def test_polynomial_scheduler():
    lr_end = 1e-7
    _check(
        _lrs("polynomial", num_warmup_steps=W, power=2.0),
        lambda s: s / W if s < W else (1 - lr_end) * (1 - _after_warmup(s)) ** 2 + lr_end,
    )


def test_inverse_sqrt_scheduler():
    _check(_lrs("inverse_sqrt", num_warmup_steps=W), lambda s: s / W if s < W else 1 / math.sqrt(s / W))
    _check(
        _lrs("inverse_sqrt", num_warmup_steps=W, timescale=40),
        lambda s: s / W if s < W else 1 / math.sqrt((s + 40 - W) / 40),
    )


def test_cosine_with_min_lr_scheduler_uses_half_cycles_and_floor():
    floor = 0.2
    _check(
        _lrs("cosine_with_min_lr", num_warmup_steps=W, min_lr_ratio=floor),
        lambda s: s / W if s < W else floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * _after_warmup(s))),
    )
    with pytest.raises(AnimaError, match="--lr_scheduler_min_lr_ratio"):
        _lrs("cosine_with_min_lr", num_warmup_steps=W)


def test_warmup_stable_decay_scheduler():
    decay, floor = 30, 0.1
    stable_end = T - decay

    def formula(s):
        if s < W:
            return floor + (1 - floor) * s / W  # warmup starts from the floor
        if s < stable_end:
            return 1.0
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * (s - stable_end) / decay))

    _check(_lrs("warmup_stable_decay", num_warmup_steps=W, num_decay_steps=decay, min_lr_ratio=floor), formula)
    _check(
        _lrs("warmup_stable_decay", num_warmup_steps=W, num_decay_steps=0.3, min_lr_ratio=floor), formula
    )  # decay as ratio
    with pytest.raises(AnimaError, match="exceed the run"):
        _lrs("warmup_stable_decay", num_warmup_steps=60, num_decay_steps=50)


def test_run_length_checks_can_wait_for_the_step_count():
    # The input check with --max_train_epochs does not know the run's length yet: it builds with check_length off.
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    for name, warmup, decay, message in (("cosine", 5, 0, "longer than the whole run"),
                                         ("warmup_stable_decay", 1, 5, "exceed the run")):
        with pytest.raises(AnimaError, match=message):
            create_lr_scheduler(name, optimizer, 2, warmup, num_decay_steps=decay)
        create_lr_scheduler(name, optimizer, 2, warmup, num_decay_steps=decay, check_length=False)


def test_piecewise_constant_scheduler_follows_step_rules():
    got = _lrs("piecewise_constant", steps=(0, 9, 10, 19, 20, 99), scheduler_args=["step_rules='1:10,0.1:20,0.01'"])
    _check(got, lambda s: 1.0 if s < 10 else 0.1 if s < 20 else 0.01)
    with pytest.raises(AnimaError, match="step_rules"):
        _lrs("piecewise_constant")


def test_warmup_given_as_ratio_or_percentage_equals_step_count():
    by_steps = _lrs("cosine", num_warmup_steps=10)
    assert _lrs("cosine", num_warmup_steps=0.1) == by_steps
    assert _lrs("cosine", num_warmup_steps="10%") == by_steps
    assert _lrs("cosine", num_warmup_steps="0.1") == by_steps


def test_custom_scheduler_type_gets_only_its_args():
    _check(
        _lrs("constant", scheduler_type="StepLR", scheduler_args=["step_size=20", "gamma=0.5"]),
        lambda s: 0.5 ** (s // 20),
    )
    _check(
        _lrs("linear", scheduler_type="torch.optim.lr_scheduler.ExponentialLR", scheduler_args=["gamma=0.9"]),
        lambda s: 0.9**s,
    )
    with pytest.raises(AnimaError, match="--lr_warmup_steps must be 0"):
        _lrs("constant", scheduler_type="StepLR", scheduler_args=["step_size=20"], num_warmup_steps=5)
    with pytest.raises(AnimaError, match="--lr_scheduler_type"):
        _lrs("constant", scheduler_type="NoSuchLR")
    with pytest.raises(AnimaError, match="--lr_scheduler_args"):
        _lrs("constant", scheduler_type="StepLR", scheduler_args=["no_such=1"])


def test_unknown_scheduler_lists_valid_names():
    with pytest.raises(AnimaError, match="cosine_with_restarts"):
        _lrs("cosine_annealing")
    assert "warmup_stable_decay" in LR_SCHEDULERS


def test_parse_int_or_float_accepts_steps_ratios_and_percentages():
    assert parse_int_or_float("123") == 123 and isinstance(parse_int_or_float("123"), int)
    assert parse_int_or_float("0") == 0
    assert parse_int_or_float("0.1") == pytest.approx(0.1) and isinstance(parse_int_or_float("0.1"), float)
    assert parse_int_or_float("10%") == pytest.approx(0.1)
    for bad in ("1.5", "1.0", "-1", "abc", "150%", "x%"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_int_or_float(bad)


def test_parse_int_or_float_reports_through_argparse():
    parser = argparse.ArgumentParser(exit_on_error=False)
    parser.add_argument("--lr_warmup_steps", type=parse_int_or_float, default=0)
    assert parser.parse_args(["--lr_warmup_steps", "5%"]).lr_warmup_steps == pytest.approx(0.05)
    with pytest.raises(argparse.ArgumentError, match="lr_warmup_steps"):
        parser.parse_args(["--lr_warmup_steps", "2.5"])


def test_steps_from_int_or_float_floors_ratios_and_rejects_bad_values():
    assert steps_from_int_or_float(0.15, 95, "--lr_warmup_steps") == 14
    assert steps_from_int_or_float(7, 95, "--lr_warmup_steps") == 7
    assert steps_from_int_or_float(None, 95, "--lr_warmup_steps") == 0
    for bad in (-1, 1.5, "abc"):
        with pytest.raises(AnimaError, match="--lr_decay_steps"):
            steps_from_int_or_float(bad, 95, "--lr_decay_steps")


@pytest.mark.parametrize("flags, name, kwargs", [
    (["--lr_scheduler", "inverse_sqrt", "--lr_warmup_steps", "4", "--lr_scheduler_timescale", "40"],
     "inverse_sqrt", {"num_warmup_steps": 4, "timescale": 40}),
    (["--lr_scheduler", "cosine_with_restarts", "--lr_warmup_steps", "10%", "--lr_scheduler_num_cycles", "3"],
     "cosine_with_restarts", {"num_warmup_steps": 0.1, "num_cycles": 3}),
    (["--lr_scheduler", "polynomial", "--lr_scheduler_power", "2.5", "--lr_scheduler_args", "lr_end=1e-3"],
     "polynomial", {"power": 2.5, "scheduler_args": ["lr_end=1e-3"]}),
    (["--lr_scheduler", "warmup_stable_decay", "--lr_warmup_steps", "0.05", "--lr_decay_steps", "0.3",
      "--lr_scheduler_min_lr_ratio", "0.1", "--lr_scheduler_num_cycles", "2"],
     "warmup_stable_decay", {"num_warmup_steps": 0.05, "num_decay_steps": 0.3, "min_lr_ratio": 0.1, "num_cycles": 2}),
])
def test_scheduler_flags_reach_the_schedule(flags, name, kwargs):
    from library.training.args import parse_args
    from library.training.schedulers import lr_scheduler_from_args

    args, _ = parse_args(flags)
    got = [None, None]
    for i, build in enumerate((lambda opt: lr_scheduler_from_args(args, opt, T),
                               lambda opt: create_lr_scheduler(name, opt, T, **kwargs))):
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        scheduler, lrs = build(optimizer), []
        for _ in range(T):
            lrs.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        got[i] = lrs
    assert got[0] == got[1] and len(set(got[0])) > 2
