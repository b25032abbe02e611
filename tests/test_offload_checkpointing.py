"""Gradient checkpointing modes of the DiT (plain, CPU offload, unsloth offload) against no checkpointing."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from library.errors import AnimaError
from library.models.dit_loading import load_anima_model
from networks.lora_anima import create_network, create_network_from_weights

MODES = {
    "plain": {},
    "cpu_offload": {"cpu_offload": True},
    "unsloth_offload": {"unsloth_offload": True},
}
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def golden(golden_dir):
    return load_file(str(golden_dir / "dit_tiny_golden.safetensors"))


def golden_model_with_lora(golden_dir, device="cpu", **network_args):
    model = load_anima_model(str(golden_dir / "dit_tiny.safetensors"), device=device)
    model.requires_grad_(False)
    network = create_network(1.0, 4, 1.0, None, [], model, **network_args)
    network.apply_to([], model, False, True)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for lora in network.unet_loras:
            lora.lora_up.weight.copy_(torch.randn(lora.lora_up.weight.shape, generator=gen) * 0.1)
    network.to(device)
    model.train()
    network.train()
    return model, network


def run_step(model, network, golden, device="cpu", checkpointing=None, autocast_dtype=None, seed=0):
    """One forward + backward; returns (output, LoRA grads, latent grad, context grad)."""
    if checkpointing is None:
        model.disable_gradient_checkpointing()
    else:
        model.enable_gradient_checkpointing(**MODES[checkpointing])
    network.zero_grad(set_to_none=True)
    x = golden["in.noisy_latents"].to(device).requires_grad_(True)
    context = golden["out.crossattn_emb"].to(device).requires_grad_(True)
    torch.manual_seed(seed)
    with torch.autocast(torch.device(device).type, dtype=autocast_dtype or torch.float32, enabled=bool(autocast_dtype)):
        out = model(x, golden["in.timesteps"].to(device), context)
    out.float().square().mean().backward()
    grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in network.parameters() if p.requires_grad]
    grads = torch.cat([g.flatten() for g in grads])
    return out.detach(), grads, x.grad, context.grad


@pytest.mark.parametrize("mode", list(MODES))
def test_checkpointing_modes_match_no_checkpointing_outputs_and_all_gradients(golden_dir, golden, mode):
    model, network = golden_model_with_lora(golden_dir)
    reference = run_step(model, network, golden)
    assert reference[1].abs().max() > 0
    for actual, expected in zip(run_step(model, network, golden, checkpointing=mode), reference):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("mode", ["cpu_offload", "unsloth_offload"])
def test_offload_checkpointing_reproduces_golden_lora_gradients(golden_dir, golden, mode):
    model = load_anima_model(str(golden_dir / "dit_tiny.safetensors"))
    model.requires_grad_(False)
    network, _ = create_network_from_weights(1.0, str(golden_dir / "lora_tiny.safetensors"), None, None, model)
    network.apply_to(None, model, apply_text_encoder=False, apply_unet=True)
    model.enable_gradient_checkpointing(**MODES[mode])
    model.train()
    pred = model(golden["in.noisy_latents"], golden["in.timesteps"], golden["out.crossattn_emb"]).squeeze(2)
    torch.nn.functional.mse_loss(pred, golden["in.noise"] - golden["in.x0"]).backward()
    torch.testing.assert_close(pred.detach(), golden["lora.model_pred"], rtol=1e-4, atol=1e-5)
    for lora in network.unet_loras:
        for part in ("lora_down", "lora_up"):
            expected = golden[f"lora.grad.{lora.lora_name}.{part}.weight"]
            actual = getattr(lora, part).weight.grad
            assert ((actual - expected).abs().max() / expected.abs().max()).item() < 1e-4, lora.lora_name


@pytest.mark.parametrize("mode", ["cpu_offload", "unsloth_offload"])
def test_offload_checkpointing_recomputes_with_the_same_lora_dropout_masks(golden_dir, golden, mode):
    model, network = golden_model_with_lora(golden_dir, rank_dropout="0.3", module_dropout="0.2", neuron_dropout=0.1)
    reference = run_step(model, network, golden, seed=5)
    actual = run_step(model, network, golden, checkpointing=mode, seed=5)
    torch.testing.assert_close(actual[1], reference[1], rtol=1e-5, atol=1e-7)
    other_seed = run_step(model, network, golden, seed=6)
    assert not torch.allclose(other_seed[1], reference[1])  # the masks matter, so matching proves they repeat


@pytest.mark.parametrize("mode", ["cpu_offload", "unsloth_offload"])
def test_offload_checkpointing_recomputes_under_the_forward_autocast(golden_dir, golden, mode):
    model, network = golden_model_with_lora(golden_dir)
    reference = run_step(model, network, golden, autocast_dtype=torch.bfloat16)
    assert reference[0].dtype == torch.bfloat16
    actual = run_step(model, network, golden, checkpointing=mode, autocast_dtype=torch.bfloat16)
    torch.testing.assert_close(actual[0], reference[0], rtol=0, atol=0)
    torch.testing.assert_close(actual[1], reference[1], rtol=1e-2, atol=1e-4)


@pytest.mark.parametrize("mode", ["cpu_offload", "unsloth_offload"])
def test_offload_checkpointing_keeps_no_hidden_states_in_the_autograd_graph(golden_dir, golden, mode):
    model, _ = golden_model_with_lora(golden_dir)
    model.enable_gradient_checkpointing(**MODES[mode])
    d = model.config.model_channels
    x = model.x_embedder(torch.zeros(2, 17, 1, 4, 6)).flatten(1, 3)  # [B, L, D]
    emb, adaln = torch.zeros(2, 1, d), torch.zeros(2, 1, 3 * d)
    rope = model._rope_cos_sin(1, 2, 3, torch.device("cpu"))
    saved_shapes = []

    def pack(tensor):
        saved_shapes.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        for block in model.blocks:
            x = block(x, emb, golden["out.crossattn_emb"], *rope, adaln)
    # Only the shared block arguments are kept by reference: emb, context, RoPE tables, adaLN-LoRA.
    assert sorted(set(saved_shapes)) == sorted({(2, 1, d), (2, 12, 64), tuple(rope[0].shape), (2, 1, 3 * d)})
    assert x.requires_grad  # the LoRA inside the blocks still gets its backward


def test_checkpointing_is_inactive_in_eval_mode_and_without_grad(golden_dir, golden):
    model, network = golden_model_with_lora(golden_dir)
    model.enable_gradient_checkpointing(unsloth_offload=True)
    args = (golden["in.noisy_latents"], golden["in.timesteps"], golden["out.crossattn_emb"])
    with torch.no_grad():
        trained = model(*args)
    model.eval()
    out = model(*args)
    assert out.grad_fn is not None and "Offloaded" not in type(out.grad_fn).__name__
    torch.testing.assert_close(out.detach(), trained)


def test_exclusive_memory_options_raise_one_clear_error(golden_dir):
    model = load_anima_model(str(golden_dir / "dit_tiny.safetensors"))
    with pytest.raises(AnimaError, match="--unsloth_offload_checkpointing and --cpu_offload_checkpointing"):
        model.enable_gradient_checkpointing(cpu_offload=True, unsloth_offload=True)
    model.enable_gradient_checkpointing(cpu_offload=True)
    model.blocks.append(type(model.blocks[0])(model.config))  # 3 blocks so that swapping 1 is valid
    with pytest.raises(AnimaError, match="--blocks_to_swap cannot be combined"):
        model.enable_block_swap(1, torch.device("cpu"))
    model.disable_gradient_checkpointing()
    model.requires_grad_(False)
    model.enable_block_swap(1, torch.device("cpu"))
    with pytest.raises(AnimaError, match="--blocks_to_swap cannot be combined with --unsloth_offload_checkpointing"):
        model.enable_gradient_checkpointing(unsloth_offload=True)
    model.enable_gradient_checkpointing()  # plain checkpointing works with block swap


# ---- the CUDA stream order, on fake streams --------------------------------------------------------------------


def tiny_model_with_lora():
    from test_block_swap import model_with_lora, tiny_config

    return model_with_lora(tiny_config(num_blocks=4))


def tiny_step(model, network, seed: int):
    gen = torch.Generator().manual_seed(seed)
    x, sigmas, context = torch.randn(2, 16, 1, 4, 6, generator=gen), torch.rand(2, generator=gen), torch.randn(
        2, 5, 16, generator=gen)
    network.zero_grad(set_to_none=True)
    out = model(x, sigmas, context)
    out.square().mean().backward()
    return out.detach(), torch.cat([p.grad.flatten() for p in network.parameters()])


def offload_on_fake_streams(model, mode: str, monkeypatch):
    """The CUDA code path of the offload checkpointing on the CPU: pinned buffers, side-stream copies, events and
    record_stream on the fake streams of tests/fake_cuda_streams.py, which flag what would race on a GPU."""
    from fake_cuda_streams import StreamChecker

    from library.models import offload_checkpointing

    checker = StreamChecker().install(monkeypatch)
    monkeypatch.setattr(offload_checkpointing, "_uses_streams", lambda device: True)
    monkeypatch.setattr(offload_checkpointing, "_pinned_empty", lambda like: torch.empty(like.shape, dtype=like.dtype))
    monkeypatch.setattr(offload_checkpointing, "_side_streams", {})
    model.enable_gradient_checkpointing(**MODES[mode])
    return checker


@pytest.mark.parametrize("mode", ["cpu_offload", "unsloth_offload"])
def test_offload_stream_order_has_no_race_and_matches_no_checkpointing(mode, monkeypatch):
    model, network = tiny_model_with_lora()
    expected = [tiny_step(model, network, seed) for seed in (0, 1)]
    checker = offload_on_fake_streams(model, mode, monkeypatch)
    with checker:
        actual = [tiny_step(model, network, seed) for seed in (0, 1)]
    assert checker.races == []
    assert checker.unrecorded_side_reads() == []
    # unsloth: every block input leaves on the side stream; cpu_offload: blocking copies on the compute stream.
    assert (checker.side_ops > 0) == (mode == "unsloth_offload")
    for (out, grads), (out_ref, grads_ref) in zip(actual, expected):
        torch.testing.assert_close(out, out_ref)
        torch.testing.assert_close(grads, grads_ref)


@pytest.mark.parametrize("fault", ["backward does not wait", "copy does not wait", "no record_stream"])
def test_the_stream_checker_flags_a_broken_offload_order(fault, monkeypatch):
    from fake_cuda_streams import FakeStream

    model, network = tiny_model_with_lora()
    checker = offload_on_fake_streams(model, "unsloth_offload", monkeypatch)
    if fault == "backward does not wait":
        checker.compute.wait_event = lambda event: None  # the input would be copied back before it reached the host
    elif fault == "copy does not wait":
        monkeypatch.setattr(FakeStream, "wait_stream", lambda self, other: None)  # read before the block input is made
    else:
        monkeypatch.setattr(torch.Tensor, "record_stream", lambda tensor, stream: None)
    with checker:
        tiny_step(model, network, 0)
    if fault == "no record_stream":
        assert checker.unrecorded_side_reads()
    else:
        assert any(race.startswith("read after write") for race in checker.races), checker.races


# ---- CUDA ---------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("mode", list(MODES))
def test_gpu_offload_checkpointing_matches_no_checkpointing_on_cuda(golden_dir, golden, mode):
    model, network = golden_model_with_lora(golden_dir, device="cuda")
    reference = run_step(model, network, golden, device="cuda")
    for actual, expected in zip(run_step(model, network, golden, device="cuda", checkpointing=mode), reference):
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-6)
    # bf16 autocast as in training
    reference = run_step(model, network, golden, device="cuda", autocast_dtype=torch.bfloat16)
    actual = run_step(model, network, golden, device="cuda", checkpointing=mode, autocast_dtype=torch.bfloat16)
    # The offloaded forward runs without grad: SDPA and cuBLAS may pick other kernels than with grad, so the
    # prediction is compared within bf16 rounding, not bit for bit.
    torch.testing.assert_close(actual[0], reference[0], rtol=1e-2, atol=1e-3)
    torch.testing.assert_close(actual[1], reference[1], rtol=2e-2, atol=1e-4)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("mode", ["cpu_offload", "unsloth_offload"])
def test_gpu_offload_checkpointing_frees_block_inputs_on_cuda(mode):
    from library.models.dit import Anima, AnimaConfig

    torch.manual_seed(0)
    config = AnimaConfig(model_channels=256, num_heads=4, num_blocks=6, adapter_num_layers=1)
    model = Anima(config).to("cuda").requires_grad_(False).train()
    network = create_network(1.0, 4, 1.0, None, [], model)
    network.apply_to([], model, False, True)
    network.to("cuda")
    x = torch.randn(1, 16, 1, 128, 128, device="cuda")  # L = 4096 tokens
    sigmas = torch.rand(1, device="cuda")
    context = torch.randn(1, 64, config.crossattn_emb_channels, device="cuda")
    hidden_bytes = 4096 * config.model_channels * 4

    def held_after_forward(**modes):
        model.enable_gradient_checkpointing(**modes)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        out = model(x, sigmas, context)
        torch.cuda.synchronize()
        torch.empty(1, device="cuda")  # lets the allocator retire blocks whose side-stream reads have finished
        held = torch.cuda.memory_allocated() - before
        out.square().mean().backward()
        return held

    plain = held_after_forward()
    offloaded = held_after_forward(**MODES[mode])
    assert plain - offloaded >= (config.num_blocks - 1) * hidden_bytes * 0.9, (plain, offloaded)
