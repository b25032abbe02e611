"""Block swap: same outputs and LoRA gradients as a fully resident DiT, weights only where the schedule says."""

from __future__ import annotations

import pytest
import torch

from library.errors import AnimaError
from library.models.dit import Anima, AnimaConfig
from networks.lora_anima import create_network

NUM_BLOCKS = 6
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def tiny_config(**overrides) -> AnimaConfig:
    sizes = dict(
        model_channels=32, num_blocks=NUM_BLOCKS, num_heads=2, crossattn_emb_channels=16, adaln_lora_dim=8,
        adapter_source_dim=12, adapter_model_dim=16, adapter_num_layers=1, adapter_num_heads=2,
    )
    sizes.update(overrides)
    return AnimaConfig(**sizes)


def model_with_lora(config: AnimaConfig | None = None, device="cpu"):
    torch.manual_seed(0)
    model = Anima(config or tiny_config())
    model.requires_grad_(False)
    network = create_network(1.0, 4, 1.0, None, [], model)
    network.apply_to([], model, False, True)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for lora in network.unet_loras:
            lora.lora_up.weight.copy_(torch.randn(lora.lora_up.weight.shape, generator=gen) * 0.1)
    network.to(device)
    model.train()
    return model, network


def make_inputs(seed: int, device="cpu", channels: int = 16):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 16, 1, 4, 6, generator=gen)
    sigmas = torch.rand(2, generator=gen)
    context = torch.randn(2, 5, channels, generator=gen)
    return x.to(device), sigmas.to(device), context.to(device)


def train_step(model, network, seed: int, device="cpu"):
    network.zero_grad(set_to_none=True)
    x, sigmas, context = make_inputs(seed, device, model.config.crossattn_emb_channels)
    out = model(x, sigmas, context)
    out.square().mean().backward()
    return out.detach(), torch.cat([p.grad.flatten() for p in network.parameters()])


def enable_swap(model, n: int, device="cpu"):
    model.enable_block_swap(n, torch.device(device))
    model.move_to_device_except_swap_blocks(torch.device(device))
    model.prepare_block_swap_before_forward()
    return model.block_swapper


def slot_pointers(swapper) -> set[int]:
    return {t.data_ptr() for slot in swapper._slots for t in slot}


def watch_residency(model, swapper, log: list):
    """Record, at every block's forward and backward, whether its weights sit in the device slots."""
    pool = slot_pointers(swapper)

    def check(index, phase):
        on_device = all(p.data_ptr() in pool for p in model.blocks[index].parameters())
        log.append((phase, index, on_device and swapper.is_resident(index)))

    for index, block in enumerate(model.blocks):
        block.register_forward_pre_hook(lambda module, args, i=index: check(i, "forward"))
        block.register_full_backward_pre_hook(lambda module, grad, i=index: check(i, "backward"))


# The residency probe's backward pre-hook on block 0 fires on outputs only (its input needs no grad): expected.
@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
@pytest.mark.parametrize("blocks_to_swap", [1, 2, 3, 4])
def test_block_swap_training_steps_match_resident_model(blocks_to_swap):
    model, network = model_with_lora()
    expected = [train_step(model, network, seed) for seed in (0, 1)]

    swapper = enable_swap(model, blocks_to_swap)
    log = []
    watch_residency(model, swapper, log)
    for seed, (out_ref, grads_ref) in zip((0, 1), expected):
        out, grads = train_step(model, network, seed)
        torch.testing.assert_close(out, out_ref, rtol=0, atol=0)
        torch.testing.assert_close(grads, grads_ref, rtol=0, atol=0)
        # Forward + backward ends in the starting layout, so the next step needs no extra copies.
        assert swapper.resident_blocks() == list(range(NUM_BLOCKS - blocks_to_swap))
    assert [phase for phase, _, _ in log].count("backward") == 2 * NUM_BLOCKS
    assert all(ok for _, _, ok in log), [entry for entry in log if not entry[2]]
    # Constant footprint: N - n slots, never more.
    assert len(swapper._slots) == NUM_BLOCKS - blocks_to_swap
    block_bytes = sum(p.numel() * p.element_size() for p in model.blocks[0].parameters())
    assert swapper.resident_weight_bytes() == (NUM_BLOCKS - blocks_to_swap) * block_bytes


def test_block_swap_with_gradient_checkpointing_matches_resident_model():
    model, network = model_with_lora()
    model.enable_gradient_checkpointing()
    expected = train_step(model, network, 0)
    enable_swap(model, 3)
    actual = train_step(model, network, 0)
    torch.testing.assert_close(actual[0], expected[0], rtol=0, atol=0)
    torch.testing.assert_close(actual[1], expected[1], rtol=0, atol=0)


def test_block_swap_forward_without_backward_and_inference_mode_keep_results_right():
    model, network = model_with_lora()
    x, sigmas, context = make_inputs(3)
    with torch.no_grad():
        expected = model(x, sigmas, context)
    expected_step = train_step(model, network, 0)

    swapper = enable_swap(model, 4)
    with torch.no_grad():  # a validation forward in training mode: forward-only schedule
        torch.testing.assert_close(model(x, sigmas, context), expected, rtol=0, atol=0)
    assert swapper.resident_blocks() == [0, 1]
    model(x, sigmas, context)  # forward with grad but no backward leaves another layout ...
    assert swapper.resident_blocks() != [0, 1]
    actual_step = train_step(model, network, 0)  # ... which the next forward repairs
    torch.testing.assert_close(actual_step[1], expected_step[1], rtol=0, atol=0)

    model.switch_block_swap_for_inference()
    model.eval()
    for _ in range(2):
        torch.testing.assert_close(model(x, sigmas, context).detach(), expected, rtol=0, atol=0)
        assert swapper.resident_blocks() == [0, 1]
    model.switch_block_swap_for_training()
    model.train()
    actual_step = train_step(model, network, 0)
    torch.testing.assert_close(actual_step[1], expected_step[1], rtol=0, atol=0)


@pytest.mark.parametrize("blocks_to_swap", [0, NUM_BLOCKS - 1, -1])
def test_block_swap_count_out_of_range_names_the_flag_and_the_maximum(blocks_to_swap):
    model, _ = model_with_lora()
    with pytest.raises(AnimaError, match=rf"--blocks_to_swap {blocks_to_swap}: must be between 1 and {NUM_BLOCKS - 2}"):
        model.enable_block_swap(blocks_to_swap, torch.device("cpu"))


def test_block_swap_rejects_moved_or_trainable_block_weights():
    model, network = model_with_lora()
    enable_swap(model, 2)
    model.blocks[5].to(torch.float64)  # replaces the parameter data behind the swapper's back
    with pytest.raises(AnimaError, match="move_to_device_except_swap_blocks"):
        train_step(model, network, 0)

    model, network = model_with_lora()
    enable_swap(model, 2)
    model.blocks[0].mlp.layer1.weight.requires_grad_(True)
    with pytest.raises(AnimaError, match="frozen"):
        train_step(model, network, 0)


# ---- CUDA ---------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("checkpointing", [False, True])
def test_gpu_block_swap_matches_resident_model_on_cuda(checkpointing):
    reference_model, reference_network = model_with_lora(device="cuda")
    reference_model.to("cuda")
    if checkpointing:
        reference_model.enable_gradient_checkpointing()
    expected = [train_step(reference_model, reference_network, seed, "cuda") for seed in (0, 1)]

    model, network = model_with_lora(device="cuda")  # same seed: same weights, on CPU
    if checkpointing:
        model.enable_gradient_checkpointing()
    swapper = enable_swap(model, 4, "cuda")
    for block in model.blocks[NUM_BLOCKS - 4:]:
        assert all(p.device.type == "cpu" and p.is_pinned() for p in block.parameters())
    for seed, (out_ref, grads_ref) in zip((0, 1), expected):
        out, grads = train_step(model, network, seed, "cuda")
        torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grads, grads_ref, rtol=1e-5, atol=1e-6)
        assert swapper.resident_blocks() == [0, 1]
    model.switch_block_swap_for_inference()
    x, sigmas, context = make_inputs(3, "cuda")
    with torch.no_grad():
        torch.testing.assert_close(model(x, sigmas, context), reference_model(x, sigmas, context))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("blocks_to_swap", [2, 6])
def test_gpu_block_swap_resident_weight_memory_drops_by_swapped_blocks(blocks_to_swap):
    config = tiny_config(model_channels=512, num_heads=8, num_blocks=8)
    model, network = model_with_lora(config, device="cuda")
    block_bytes = sum(p.numel() * p.element_size() for p in model.blocks[0].parameters())
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    model.to("cuda")
    full = torch.cuda.memory_allocated() - base
    model.to("cpu")
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == base

    enable_swap(model, blocks_to_swap, "cuda")
    swapped = torch.cuda.memory_allocated() - base
    saved = full - swapped
    assert abs(saved - blocks_to_swap * block_bytes) <= 512 * 32 * blocks_to_swap, (full, swapped, block_bytes)
    train_step(model, network, 0, "cuda")  # the footprint stays constant while weights stream through
    assert model.block_swapper.resident_weight_bytes() == (8 - blocks_to_swap) * block_bytes
