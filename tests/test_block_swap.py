"""Block swap: same outputs and LoRA gradients as a fully resident DiT, weights only where the schedule says."""

from __future__ import annotations

import pytest
import torch
from fake_cuda_streams import StreamChecker

from library.errors import AnimaError
from library.models import block_swap
from library.models.dit import Anima, AnimaConfig
from library.models.precision import residual_stream_dtype
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


@pytest.mark.parametrize("blocks_to_swap", [1, 2, 3, 4])
def test_forward_only_swap_copies_only_the_swapped_blocks_and_matches_the_resident_model(blocks_to_swap):
    model, network = model_with_lora()
    model.eval()
    inputs = [make_inputs(seed) for seed in (3, 4, 5)]
    with torch.no_grad():
        expected = [model(*batch) for batch in inputs]
    swapper = enable_swap(model, blocks_to_swap)
    model.switch_block_swap_for_inference()
    block_bytes = sum(p.numel() * p.element_size() for p in model.blocks[0].parameters())
    # The first forward after prepare copies the n swapped blocks; later ones also refill the two streaming
    # slots (n + 2; with n = 1 block N - 2 keeps its slot: 2). Before: all N blocks in every forward.
    in_a_row = blocks_to_swap + 2 if blocks_to_swap > 1 else 2
    for index, (batch, reference) in enumerate(zip(inputs, expected)):
        copied_before, bytes_before = swapper.blocks_copied, swapper.bytes_copied
        with torch.no_grad():
            torch.testing.assert_close(model(*batch), reference, rtol=0, atol=0)
        copied = swapper.blocks_copied - copied_before
        assert copied == (blocks_to_swap if index == 0 else in_a_row)
        assert swapper.bytes_copied - bytes_before == copied * block_bytes
        assert len(swapper._slots) == NUM_BLOCKS - blocks_to_swap
    model.switch_block_swap_for_training()
    assert swapper.resident_blocks() == list(range(NUM_BLOCKS - blocks_to_swap))


def test_training_after_forward_only_swaps_keeps_identical_lora_gradients():
    model, network = model_with_lora()
    x, sigmas, context = make_inputs(3)
    expected_step = train_step(model, network, 0)
    enable_swap(model, 2)
    for _ in range(3):  # validation-style forwards leave the streaming layout ...
        with torch.no_grad():
            model(x, sigmas, context)
        out, grads = train_step(model, network, 0)  # ... which the training forward restores
        torch.testing.assert_close(out, expected_step[0], rtol=0, atol=0)
        torch.testing.assert_close(grads, expected_step[1], rtol=0, atol=0)


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
    assert swapper.resident_blocks() == [4, 5]  # the last two streamed blocks hold the streaming slots
    model(x, sigmas, context)  # forward with grad but no backward leaves another layout ...
    assert swapper.resident_blocks() != [0, 1]
    actual_step = train_step(model, network, 0)  # ... which the next forward repairs
    torch.testing.assert_close(actual_step[1], expected_step[1], rtol=0, atol=0)

    model.switch_block_swap_for_inference()
    model.eval()
    for _ in range(2):
        torch.testing.assert_close(model(x, sigmas, context).detach(), expected, rtol=0, atol=0)
        assert swapper.resident_blocks() == [4, 5]
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


# ---- the CUDA stream order, on fake streams --------------------------------------------------------------------


def swapper_on_fake_streams(model, blocks_to_swap: int, monkeypatch):
    """Block swap on the CPU taking its CUDA code path: side-stream copies, events and waits, on the fake streams
    of tests/fake_cuda_streams.py, which flag every access that a real GPU would let race."""
    swapper = enable_swap(model, blocks_to_swap)
    permanent = [t for tensors in (*swapper._slots, *swapper._host) for t in tensors]
    checker = StreamChecker(permanent).install(monkeypatch)
    swapper._is_cuda = True
    swapper._side_stream = torch.cuda.Stream(swapper.device)
    return swapper, checker


def swap_session(model, network, checkpointing: bool):
    """Training steps, a validation forward, sampling forwards and training again: what a run does."""
    if checkpointing:
        model.enable_gradient_checkpointing()
    results = [train_step(model, network, seed) for seed in (0, 1)]
    x, sigmas, context = make_inputs(3)
    with torch.no_grad():  # validation: forward-only schedule in training mode
        results.append((model(x, sigmas, context), None))
    model.switch_block_swap_for_inference()
    model.eval()
    with torch.no_grad():
        results += [(model(x, sigmas, context), None) for _ in range(2)]  # the second refills behind the compute
    model.switch_block_swap_for_training()
    model.train()
    results.append(train_step(model, network, 0))
    return results


@pytest.mark.parametrize("blocks_to_swap, checkpointing", [(1, False), (3, False), (4, True)])
def test_block_swap_stream_order_has_no_race_and_matches_the_resident_model(blocks_to_swap, checkpointing,
                                                                             monkeypatch):
    model, network = model_with_lora()
    expected = swap_session(model, network, checkpointing)
    model.disable_gradient_checkpointing()
    swapper, checker = swapper_on_fake_streams(model, blocks_to_swap, monkeypatch)
    with checker:
        actual = swap_session(model, network, checkpointing)
    assert checker.races == []
    assert checker.unrecorded_side_reads() == []
    assert checker.side_ops > 0 and ("wait_event", "compute", "side") in checker.log  # copies ran on the side
    for (out, grads), (out_ref, grads_ref) in zip(actual, expected):
        torch.testing.assert_close(out, out_ref)
        if grads_ref is not None:
            torch.testing.assert_close(grads, grads_ref)
    assert swapper.resident_blocks() == list(range(NUM_BLOCKS - blocks_to_swap))


def test_the_stream_checker_flags_a_block_run_before_its_copy_is_waited_for(monkeypatch):
    model, network = model_with_lora()
    swapper, checker = swapper_on_fake_streams(model, 2, monkeypatch)
    monkeypatch.setattr(block_swap.BlockSwapper, "_wait_for", lambda self, index: self._ready.pop(index, None))
    with checker:
        train_step(model, network, 0)
    assert any(race.startswith("read after write") for race in checker.races), checker.races


def test_the_stream_checker_flags_a_copy_into_a_slot_still_read_by_the_compute_stream(monkeypatch):
    model, network = model_with_lora()
    swapper, checker = swapper_on_fake_streams(model, 2, monkeypatch)
    swapper._side_stream.wait_stream = lambda other: None  # the copy would not wait for the outgoing block
    with checker:
        train_step(model, network, 0)
    assert any(race.startswith("write after read") for race in checker.races), checker.races


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
    for seed in (3, 4, 5):  # forwards in a row: the streaming slots are refilled behind the compute
        x, sigmas, context = make_inputs(seed, "cuda")
        with torch.no_grad():
            torch.testing.assert_close(model(x, sigmas, context), reference_model(x, sigmas, context))
    model.switch_block_swap_for_training()
    out, grads = train_step(model, network, 0, "cuda")
    torch.testing.assert_close(grads, expected[0][1], rtol=1e-5, atol=1e-6)


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


# ---- planning --blocks_to_swap auto ---------------------------------------------------------------------------


def planner_memory(**overrides) -> block_swap.TrainingMemory:
    gib = 2**30
    sizes = dict(num_blocks=28, block_weights=gib // 8, other_weights=2 * gib, block_activations=gib // 4,
                 block_input=gib // 64, other_activations=gib // 16)
    sizes.update(overrides)
    return block_swap.TrainingMemory(**sizes)


def test_auto_plan_picks_the_smallest_swap_count_that_fits():
    memory = planner_memory()
    for mode in block_swap.CHECKPOINTING_MODES:
        assert block_swap.plan_blocks_to_swap(memory, 10**15, mode).blocks_to_swap == 0
        for n in (1, 8, 26):
            budget = memory.peak_bytes(n, mode)
            plan = block_swap.plan_blocks_to_swap(memory, budget, mode)
            assert (plan.blocks_to_swap, plan.fits, plan.peak_bytes) == (n, True, budget)
            assert block_swap.plan_blocks_to_swap(memory, budget - 1, mode).blocks_to_swap == n + 1 or n == 26
        too_small = block_swap.plan_blocks_to_swap(memory, memory.peak_bytes(26, mode) - 1, mode)
        assert (too_small.blocks_to_swap, too_small.fits) == (26, False)
        assert "does NOT fit" in too_small.describe()


def test_auto_plan_weighs_each_swapped_block_and_the_checkpointing_mode():
    memory = planner_memory()
    # Each swapped block frees exactly one block's weights.
    assert memory.peak_bytes(3, "ckpt") - memory.peak_bytes(4, "ckpt") == memory.block_weights
    # Saved activations: none (all blocks) > ckpt (block inputs) > offloaded (inputs in CPU memory).
    peaks = [memory.peak_bytes(0, mode) for mode in ("none", "ckpt", "cpu_offload")]
    assert peaks == sorted(peaks, reverse=True) and len(set(peaks)) == 3
    assert memory.peak_bytes(0, "cpu_offload") == memory.peak_bytes(0, "unsloth")
    # The largest swap count follows the one rule (N - 2), also for a short DiT.
    assert block_swap.plan_blocks_to_swap(planner_memory(num_blocks=2), 0, "ckpt").blocks_to_swap == 0
    with pytest.raises(ValueError, match="checkpointing"):
        memory.peak_bytes(0, "bogus")


def test_fp8_counts_one_byte_per_quantized_linear_weight():
    config = tiny_config(model_channels=64, num_heads=4)
    block = Anima(config).blocks[0].to(torch.bfloat16)
    bf16 = block_swap.block_weight_bytes(block)
    assert bf16 == sum(p.numel() * 2 for p in block.parameters())
    fp8 = block_swap.block_weight_bytes(block, fp8=True)
    linear = [(n, p) for n, p in block.named_parameters() if p.ndim == 2 and "adaln_modulation" not in n]
    assert bf16 - fp8 == sum(p.numel() - 4 * p.shape[0] for _, p in linear)
    assert 0.5 * bf16 < fp8 < 0.75 * bf16  # modulation, norms and scales stay wide


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16-autocast"])
def test_activation_estimate_covers_what_a_lora_block_saves_for_backward(dtype):
    """The planner's formula against the bytes a LoRA-wrapped block's forward really saves (saved-tensor hooks);
    fp16 runs under autocast with the block's input in the float32 residual stream, as in the DiT."""
    config = AnimaConfig(model_channels=512, num_heads=8, num_blocks=2, crossattn_emb_channels=256,
                         adapter_source_dim=64, adapter_model_dim=256, adapter_num_layers=1, adapter_num_heads=4)
    torch.manual_seed(0)
    model = Anima(config).to(dtype)
    model.requires_grad_(False)
    network = create_network(1.0, 16, 16.0, None, [], model)
    network.apply_to([], model, False, True)
    network.to(dtype)
    block = model.blocks[0]
    tokens, context_tokens = 192, 64
    x = torch.randn(1, tokens, 512, dtype=residual_stream_dtype(dtype), requires_grad=True)
    emb, adaln = torch.randn(1, 1, 512, dtype=dtype), torch.randn(1, 1, 1536, dtype=dtype)
    context = torch.randn(1, context_tokens, 256, dtype=dtype)
    cos, sin = torch.randn(tokens, 64), torch.randn(tokens, 64)
    kept = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *network.parameters(), x, emb, adaln,
                                                       context, cos, sin)}
    saved: dict[int, int] = {}

    def pack(tensor):
        saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    autocast = torch.autocast("cpu", dtype=dtype, enabled=dtype == torch.float16)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), autocast:
        block(x, emb, context, cos, sin, adaln)
    measured = sum(nbytes for ptr, nbytes in saved.items() if ptr not in kept)
    estimate = block_swap.block_activation_bytes(batch_size=1, tokens=tokens, context_tokens=context_tokens,
                                                 model_channels=512, mlp_channels=config.mlp_channels,
                                                 residual_element_size=x.element_size())
    assert measured <= estimate <= 1.35 * measured, (measured, estimate)


def test_dit_training_memory_plans_fewer_swapped_blocks_with_fp8():
    model = Anima(tiny_config(model_channels=64, num_heads=4)).to(torch.bfloat16)
    sizes = dict(batch_size=2, tokens=256, context_tokens=64, adapter_context_tokens=32, trainable_bytes=10_000)
    bf16 = block_swap.dit_training_memory(model, fp8=False, **sizes)
    fp8 = block_swap.dit_training_memory(model, fp8=True, **sizes)
    assert bf16.block_weights == block_swap.block_weight_bytes(model.blocks[0]) > fp8.block_weights
    assert bf16.block_input == 2 * 256 * 64 * 2 and bf16.num_blocks == NUM_BLOCKS
    assert fp8.block_activations == bf16.block_activations  # fp8 stores weights, activations stay bf16
    budget = bf16.peak_bytes(3, "ckpt")  # bf16 needs 3 blocks swapped in this budget ...
    assert block_swap.plan_blocks_to_swap(bf16, budget, "ckpt").blocks_to_swap == 3
    assert block_swap.plan_blocks_to_swap(fp8, budget, "ckpt").blocks_to_swap < 3  # ... fp8 fewer


def test_dit_training_memory_counts_fp16_block_inputs_in_the_float32_residual_stream():
    model = Anima(tiny_config(model_channels=64, num_heads=4)).to(torch.float16)
    sizes = dict(batch_size=2, tokens=256, context_tokens=64, adapter_context_tokens=32, trainable_bytes=10_000,
                 fp8=False)
    fp16 = block_swap.dit_training_memory(model, compute_dtype=torch.float16, **sizes)
    bf16 = block_swap.dit_training_memory(model, compute_dtype=torch.bfloat16, **sizes)
    assert fp16.block_input == 2 * bf16.block_input == 2 * 256 * 64 * 4
    # Two saved hidden states per block are float32 as well.
    assert fp16.block_activations - bf16.block_activations == 2 * 2 * 256 * 64 * 2
    assert fp16.peak_bytes(0, "ckpt") > bf16.peak_bytes(0, "ckpt")


def test_free_memory_for_the_plan_counts_what_the_caching_allocator_holds_unused(monkeypatch):
    """The planner runs after the caches were written and the text encoder freed: memory PyTorch still reserves
    for them is free for training, but the driver counts it as used until the cache is emptied."""
    gib = 2**30
    state = {"driver_free": 10 * gib, "cached_unused": 3 * gib}

    def empty_cache():
        state["driver_free"] += state["cached_unused"]
        state["cached_unused"] = 0

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", empty_cache)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (state["driver_free"], 80 * gib))
    assert block_swap.device_free_bytes(torch.device("cuda", 0)) == 13 * gib
    assert block_swap.device_free_bytes(torch.device("cpu")) is None
