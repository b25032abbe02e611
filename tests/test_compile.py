"""--compile: each DiT block compiled without a graph break, with the LoRA, checkpointing, offload, swap and fp8.

The CPU tests use dynamo's eager backend (graph capture without code generation, so a graph break shows as it
would with inductor) and, for one test, aot_eager (which also traces the backward through AOT autograd, as
inductor does). ``fullgraph=True`` makes any graph break inside a block an error.
"""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file
from torch._dynamo.utils import counters
from train_helpers import tiny_train_argv

from anima_train_network import AnimaNetworkTrainer
from library.models.dit import Anima, AnimaConfig, blocks_share_compiled_graphs, graphs_needed_per_function
from library.models.fp8 import quantize_linear_weights
from library.training.args import parse_args
from networks.lora_anima import create_network

BACKEND = "eager"


def tiny_dit(num_blocks: int = 4) -> Anima:
    torch.manual_seed(0)
    config = AnimaConfig(model_channels=32, num_blocks=num_blocks, num_heads=2, crossattn_emb_channels=16,
                         adaln_lora_dim=8, adapter_source_dim=12, adapter_model_dim=16, adapter_num_layers=1,
                         adapter_num_heads=2, adapter_vocab_size=64)
    return Anima(config).requires_grad_(False)


def with_lora(model: Anima, **network_args):
    torch.manual_seed(3)
    network = create_network(1.0, 4, 1.0, None, None, model, **network_args)
    network.apply_to(None, model)
    for lora in network.unet_loras:
        torch.nn.init.normal_(lora.lora_up.weight, std=0.2)
    return network


def step(model: Anima, network, dtype: torch.dtype = torch.float32):
    torch.manual_seed(1)
    x, t, context = torch.randn(2, 16, 1, 8, 8), torch.rand(2), torch.randn(2, 6, 16)
    network.zero_grad(set_to_none=True)
    pred = model(x.to(dtype), t, context.to(dtype))
    pred.float().square().mean().backward()
    return pred.float().detach(), [p.grad.float().clone() for p in network.parameters()]


def assert_same_step(actual, expected, tol: float) -> None:
    torch.testing.assert_close(actual[0], expected[0], rtol=tol, atol=tol)
    for a, b in zip(actual[1], expected[1]):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * max(b.abs().max().item(), 1e-3))


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def compiled_pair(setup=lambda model: None, dtype=torch.float32, backend=BACKEND, **network_args):
    """(eager model, network), (compiled model, network): same weights, same LoRA, ``setup`` applied to both."""
    pairs = []
    for _ in range(2):
        model = tiny_dit().to(dtype)
        network = with_lora(model, **network_args)
        setup(model)
        pairs.append((model, network))
    pairs[1][0].compile_blocks(backend=backend, fullgraph=True)
    return pairs


@pytest.mark.parametrize("mode, backend", [pytest.param("plain", "aot_eager", marks=pytest.mark.slow),
                                           ("checkpointing", BACKEND), ("cpu_offload", BACKEND)])
def test_compiled_blocks_have_no_graph_break_and_match_eager_with_lora(mode, backend):
    def setup(model):
        if mode != "plain":
            model.enable_gradient_checkpointing(cpu_offload=mode == "cpu_offload",
                                                unsloth_offload=mode == "unsloth_offload")
            model.train()

    (eager, eager_net), (compiled, compiled_net) = compiled_pair(setup, backend=backend)
    expected = step(eager, eager_net)
    for _ in range(2):  # the second step reuses the compiled graphs
        assert_same_step(step(compiled, compiled_net), expected, tol=1e-5)
    assert not counters["graph_break"]  # fullgraph=True would also have raised
    # One graph per distinct guard set (the first block's input needs no grad), not one per block, where PyTorch
    # lets the blocks share graphs (2.11 and newer; before, each block has its own: grad and no-grad with offload).
    assert counters["stats"]["unique_graphs"] <= (4 if blocks_share_compiled_graphs() else 2 * len(compiled.blocks))


def test_compiled_blocks_with_block_swap_match_eager_and_do_not_recompile_per_step():
    def setup(model):
        model.enable_block_swap(2, torch.device("cpu"))
        model.move_to_device_except_swap_blocks(torch.device("cpu"))
        model.prepare_block_swap_before_forward()

    (eager, eager_net), (compiled, compiled_net) = compiled_pair(setup)
    expected = step(eager, eager_net)
    assert_same_step(step(compiled, compiled_net), expected, tol=1e-5)
    graphs = counters["stats"]["unique_graphs"]
    for _ in range(2):  # swapped blocks point at other slots every step: still no new graph
        assert_same_step(step(compiled, compiled_net), expected, tol=1e-5)
    assert counters["stats"]["unique_graphs"] == graphs
    assert not counters["graph_break"]


@pytest.mark.slow
def test_compiled_fp8_blocks_under_bf16_autocast_match_eager():
    (eager, eager_net), (compiled, compiled_net) = compiled_pair(quantize_linear_weights, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = step(eager, eager_net, torch.bfloat16)
        actual = step(compiled, compiled_net, torch.bfloat16)
    assert_same_step(actual, expected, tol=2e-2)
    assert not counters["graph_break"]


def test_rank_and_network_dropout_trace_into_the_compiled_block():
    (_, _), (compiled, compiled_net) = compiled_pair(rank_dropout="0.3")
    compiled.train()
    compiled_net.train()
    for lora in compiled_net.unet_loras:
        lora.dropout = 0.2
    pred, grads = step(compiled, compiled_net)
    assert torch.isfinite(pred).all() and all(torch.isfinite(g).all() for g in grads)
    assert not counters["graph_break"]


@pytest.fixture
def dynamo_limit_restored():
    saved = torch._dynamo.config.cache_size_limit
    yield
    torch._dynamo.config.cache_size_limit = saved


def test_compile_raises_the_graph_limit_where_pytorch_compiles_each_block_on_its_own(monkeypatch,
                                                                                    dynamo_limit_restored):
    # Before 2.11 torch.compile guards on every LoRA hook's identity: a 28-block DiT needs graphs per block, and
    # at the default limit of 8 the blocks after the first few would run eager.
    assert graphs_needed_per_function(28, "2.10.0+cu128") == 112 and graphs_needed_per_function(28, "2.6.0") == 112
    assert graphs_needed_per_function(28, "2.11.0+cu130") == 8 == graphs_needed_per_function(28, "2.13.0")
    model = tiny_dit(12)
    with_lora(model)
    torch._dynamo.config.cache_size_limit = 8
    monkeypatch.setattr(torch, "__version__", "2.10.0")
    model.compile_blocks(backend=BACKEND)
    assert torch._dynamo.config.cache_size_limit == 48
    model.compile_blocks(backend=BACKEND, cache_size_limit=16)  # --compile_cache_size_limit wins
    assert torch._dynamo.config.cache_size_limit == 16
    monkeypatch.setattr(torch, "__version__", "2.13.0")
    torch._dynamo.config.cache_size_limit = 8
    model.compile_blocks(backend=BACKEND)
    assert torch._dynamo.config.cache_size_limit == 8  # enough already: left as it is


def test_every_block_stays_compiled_through_training_offload_and_eval_forwards(dynamo_limit_restored):
    # Training with CPU-offload checkpointing (a no-grad first pass and a recompute), then an eval forward as in
    # sampling: every call is served by a compiled graph on this PyTorch, none falls back to eager.
    model = tiny_dit(12)
    network = with_lora(model)
    model.enable_gradient_checkpointing(cpu_offload=True)
    model.train()
    model.compile_blocks(backend=BACKEND)
    for _ in range(2):
        step(model, network)
    model.eval()
    with torch.no_grad():
        model(torch.randn(1, 16, 1, 8, 8), torch.rand(1), torch.randn(1, 6, 16))
    assert counters["frames"]["total"] == counters["frames"]["ok"] > 0
    assert counters["stats"]["unique_graphs"] <= graphs_needed_per_function(len(model.blocks))
    assert not counters["graph_break"]


def test_compile_flag_compiles_every_block_of_a_training_run(tiny_setup, tmp_path):
    def train(out, *extra):
        argv = tiny_train_argv(tiny_setup, out, "--max_train_steps", "2", "--gradient_checkpointing",
                               "--network_args", "train_llm_adapter=false", *extra, learning_rate="5e-3")
        args, _ = parse_args(argv)
        trainer = AnimaNetworkTrainer()
        trainer.train(args)
        return trainer, load_file(str(out / "tiny.safetensors"))

    cache_size_limit = torch._dynamo.config.cache_size_limit
    try:
        compiled, compiled_weights = train(tmp_path / "c", "--torch_compile", "--dynamo_backend", "eager",
                                           "--compile_fullgraph", "--compile_dynamic", "false",
                                           "--compile_cache_size_limit", "16")
        assert torch._dynamo.config.cache_size_limit == 16
    finally:
        torch._dynamo.config.cache_size_limit = cache_size_limit
    assert all(block.compiled_body is not None for block in compiled.dit.blocks)
    _, eager_weights = train(tmp_path / "e")
    assert compiled_weights.keys() == eager_weights.keys()
    for key, value in eager_weights.items():
        torch.testing.assert_close(compiled_weights[key], value, rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_inductor_compiled_blocks_match_eager_on_cuda():
    device = torch.device("cuda")
    eager = tiny_dit().to(device, torch.bfloat16)
    compiled = copy.deepcopy(eager)
    eager_net, compiled_net = with_lora(eager).to(device), with_lora(compiled).to(device)
    compiled.compile_blocks(backend="inductor", fullgraph=True)

    def cuda_step(model, network):
        torch.manual_seed(1)
        x, t, context = (torch.randn(2, 16, 1, 8, 8, device=device), torch.rand(2, device=device),
                         torch.randn(2, 6, 16, device=device))
        network.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            pred = model(x, t, context)
        pred.float().square().mean().backward()
        return pred.float().detach(), [p.grad.float().clone() for p in network.parameters()]

    assert_same_step(cuda_step(compiled, compiled_net), cuda_step(eager, eager_net), tol=3e-2)
