"""The DiT + LLM adapter reproduce the reference tensors of the tiny golden checkpoint (float32, CPU)."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from library.models.dit import Anima, AnimaConfig
from library.models.dit_loading import load_anima_model

MAX_REL_ERR = 1e-4


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    scale = expected.abs().max().item()
    rel = (actual - expected).abs().max().item() / max(scale, 1e-12)
    assert rel <= MAX_REL_ERR, f"{name}: max relative error {rel:.3e} > {MAX_REL_ERR}"
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5 * max(scale, 1.0), msg=name)


@pytest.fixture(scope="module")
def golden(golden_dir):
    return load_file(str(golden_dir / "dit_tiny_golden.safetensors"))


@pytest.fixture(scope="module")
def model(golden_dir):
    return load_anima_model(golden_dir / "dit_tiny.safetensors")


def _context(model, g, extra_t5_pad: int = 0) -> torch.Tensor:
    ids, t5_mask = g["in.t5_input_ids"], g["in.t5_attn_mask"]
    if extra_t5_pad:
        pad = torch.zeros(ids.shape[0], extra_t5_pad, dtype=ids.dtype)
        ids, t5_mask = torch.cat([ids, pad], 1), torch.cat([t5_mask, pad], 1)
    return model.encode_text(g["in.qwen3_embeds"], g["in.qwen3_attn_mask"], ids, t5_mask)


def _predict(model, g, context: torch.Tensor) -> torch.Tensor:
    return model(g["in.noisy_latents"], g["in.timesteps"], context, g["in.padding_mask"])[:, :, 0]


@pytest.fixture(scope="module")
def traced(model, golden):
    """One no-grad forward with hooks recording the intermediate tensors."""
    captured = {}
    hooks = [
        model.x_embedder.register_forward_hook(lambda m, i, o: captured.__setitem__("x_embed", o)),
        model.t_embedder.register_forward_hook(lambda m, i, o: captured.__setitem__("adaln_lora", o[1])),
        model.t_embedding_norm.register_forward_hook(lambda m, i, o: captured.__setitem__("t_emb", o)),
    ]
    for index, block in enumerate(model.blocks):
        hooks.append(block.register_forward_hook(lambda m, i, o, n=index: captured.__setitem__(f"block{n}_out", o)))
    try:
        with torch.no_grad():
            captured["crossattn_emb"] = _context(model, golden)
            captured["model_pred"] = _predict(model, golden, captured["crossattn_emb"])
    finally:
        for hook in hooks:
            hook.remove()
    return captured


def test_adapter_output_matches_reference(model, golden):
    with torch.no_grad():
        out = model.llm_adapter(
            golden["in.qwen3_embeds"],
            golden["in.t5_input_ids"],
            target_attention_mask=golden["in.t5_attn_mask"],
            source_attention_mask=golden["in.qwen3_attn_mask"],
        )
    assert_matches(out, golden["out.adapter_out"], "adapter_out")


def test_encode_text_matches_reference_and_zeroes_t5_padding(traced, golden):
    context = traced["crossattn_emb"]
    assert_matches(context, golden["out.crossattn_emb"], "crossattn_emb")
    padded = golden["in.t5_attn_mask"] == 0
    assert padded.any()
    assert (context[padded] == 0).all()


def test_rope_angle_table_matches_reference(model, golden):
    expected = golden["out.rope_emb"]  # [T*H*W, 1, 1, head_dim] for the 1x4x6 patch grid
    angles = model.rope_angles(1, 4, 6)
    assert_matches(angles, expected[:, 0, 0, :], "rope_emb")


@pytest.mark.parametrize("name", ["x_embed", "t_emb", "adaln_lora"])
def test_embeddings_match_reference(traced, golden, name):
    assert_matches(traced[name], golden[f"out.{name}"], name)


@pytest.mark.parametrize("name", ["block0_out", "block1_out"])
def test_block_outputs_match_reference(traced, golden, name):
    expected = golden[f"out.{name}"]  # [B, T', H', W', D]; blocks work on flattened tokens [B, L, D]
    assert_matches(traced[name].reshape(expected.shape), expected, name)


def test_prediction_target_and_loss_match_reference(traced, golden):
    pred = traced["model_pred"]
    assert_matches(pred, golden["out.model_pred"], "model_pred")
    target = golden["in.noise"] - golden["in.x0"]
    assert_matches(target, golden["out.target"], "target")
    loss_per_sample = (pred.float() - target.float()).pow(2).mean(dim=(1, 2, 3))
    assert_matches(loss_per_sample, golden["out.loss_per_sample"], "loss_per_sample")
    assert_matches(loss_per_sample.mean().reshape(1), golden["out.loss"], "loss")


def test_longer_t5_padding_matches_reference(model, golden):
    # Padded context rows are zeros that still join the softmax, so the pad length changes the output.
    with torch.no_grad():
        pred = _predict(model, golden, _context(model, golden, extra_t5_pad=8))
    assert_matches(pred, golden["out.model_pred_t5_padded_plus8"], "model_pred_t5_padded_plus8")
    assert (pred - golden["out.model_pred"]).abs().max() > 1e-3


def test_split_attn_gives_same_prediction(model, golden, traced):
    model.split_attn = True
    try:
        with torch.no_grad():
            pred = _predict(model, golden, traced["crossattn_emb"])
    finally:
        model.split_attn = False
    assert_matches(pred, golden["out.model_pred"], "model_pred (split_attn)")


def test_split_attn_keeps_full_context_for_small_images(model, golden, traced):
    # 24 image tokens < 40 context rows: the context must not be cut to the query length.
    context = torch.cat([traced["crossattn_emb"], torch.zeros(2, 28, traced["crossattn_emb"].shape[-1])], dim=1)
    with torch.no_grad():
        plain = _predict(model, golden, context)
        model.split_attn = True
        try:
            split = _predict(model, golden, context)
        finally:
            model.split_attn = False
    torch.testing.assert_close(split, plain, rtol=1e-5, atol=1e-6)


def test_single_sample_equals_its_row_in_the_batch(model, golden, traced):
    with torch.no_grad():
        context = model.encode_text(
            golden["in.qwen3_embeds"][1:],
            golden["in.qwen3_attn_mask"][1:],
            golden["in.t5_input_ids"][1:],
            golden["in.t5_attn_mask"][1:],
        )
        pred = model(golden["in.noisy_latents"][1:], golden["in.timesteps"][1:], context)[:, :, 0]
    torch.testing.assert_close(context, traced["crossattn_emb"][1:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pred, traced["model_pred"][1:], rtol=1e-5, atol=1e-5)


def _loss_and_grads(model, golden):
    model.zero_grad(set_to_none=True)
    context = _context(model, golden)
    pred = _predict(model, golden, context)
    loss = (pred - golden["out.target"]).pow(2).mean()
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return pred.detach(), grads


def test_gradient_checkpointing_gives_identical_outputs_and_gradients(model, golden):
    model.train()
    try:
        pred_plain, grads_plain = _loss_and_grads(model, golden)
        model.enable_gradient_checkpointing()
        assert all(block.gradient_checkpointing for block in model.blocks)
        pred_ckpt, grads_ckpt = _loss_and_grads(model, golden)
    finally:
        model.disable_gradient_checkpointing()
        model.zero_grad(set_to_none=True)
        model.eval()
    assert torch.equal(pred_plain, pred_ckpt)
    assert grads_plain.keys() == grads_ckpt.keys()
    assert any(name.startswith("blocks.0.") for name in grads_plain)
    assert any(name.startswith("llm_adapter.") for name in grads_plain)
    for name, grad in grads_plain.items():
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=1e-6, atol=1e-7, msg=name)


def test_empty_prompt_gives_finite_output_and_gradients(model, golden):
    qwen3 = torch.zeros_like(golden["in.qwen3_embeds"])
    qwen3_mask = torch.zeros_like(golden["in.qwen3_attn_mask"])
    ids = torch.zeros_like(golden["in.t5_input_ids"])
    ids[:, 0] = 1  # "</s>" only, as the T5 tokenizer encodes ""
    t5_mask = torch.zeros_like(golden["in.t5_attn_mask"])
    t5_mask[:, 0] = 1
    model.train()
    try:
        model.zero_grad(set_to_none=True)
        context = model.encode_text(qwen3, qwen3_mask, ids, t5_mask)
        pred = model(golden["in.noisy_latents"], golden["in.timesteps"], context)
        pred.square().mean().backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()
    assert torch.isfinite(context).all() and torch.isfinite(pred).all()
    assert (context[:, 1:] == 0).all()
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_rope_tables_are_not_in_the_state_dict(model):
    keys = model.state_dict().keys()
    assert not [k for k in keys if "pos_embedder" in k or "rope" in k or "inv_freq" in k]
    assert len(keys) == 89


def _relative_max_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected).abs().max() / expected.abs().max()).item()


def test_bf16_weights_give_bf16_output_close_to_float32_reference(golden_dir, golden):
    model = load_anima_model(golden_dir / "dit_tiny.safetensors", dtype=torch.bfloat16)
    with torch.no_grad():
        context = _context(model, golden)
        pred = _predict(model, golden, context)
    assert context.dtype == torch.bfloat16 and pred.dtype == torch.bfloat16
    # bf16 has ~3 significant digits; the reference implementation in bf16 is off by ~1% of max |pred|.
    assert _relative_max_error(pred, golden["out.model_pred"]) < 0.03


@pytest.mark.parametrize("autocast", [False, True], ids=["bf16-weights", "bf16-autocast"])
def test_timestep_embedding_stays_float32_up_to_the_adaln_linears_in_bf16(golden_dir, golden, autocast):
    # Upstream normalises the float32 sinusoid and runs the adaLN SiLUs in float32; only the Linears round.
    model = load_anima_model(golden_dir / "dit_tiny.safetensors", dtype=torch.bfloat16)
    seen = {}
    hooks = [
        model.t_embedding_norm.register_forward_hook(lambda m, i, o: seen.__setitem__("norm", (i[0], o))),
        model.blocks[0].adaln_modulation_self_attn[0].register_forward_hook(
            lambda m, i, o: seen.__setitem__("silu_in", i[0])
        ),
        model.final_layer.adaln_modulation[1].register_forward_hook(lambda m, i, o: seen.__setitem__("down_in", i[0])),
    ]
    context = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with torch.no_grad(), context:
        pred = _predict(model, golden, _context(model, golden))
    for hook in hooks:
        hook.remove()
    norm_in, norm_out = seen["norm"]
    assert norm_in.dtype == norm_out.dtype == seen["silu_in"].dtype == torch.float32
    assert torch.equal(seen["silu_in"], norm_out)
    assert seen["down_in"].dtype == torch.bfloat16  # cast once, after the SiLU
    assert torch.equal(seen["down_in"], F.silu(norm_out).to(torch.bfloat16))
    assert pred.dtype == torch.bfloat16 and _relative_max_error(pred, golden["out.model_pred"]) < 0.03


def test_bf16_autocast_over_float32_weights_stays_close_to_reference(model, golden):
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        pred = _predict(model, golden, _context(model, golden))
    assert torch.isfinite(pred).all()
    assert _relative_max_error(pred, golden["out.model_pred"]) < 0.03


@pytest.mark.parametrize("weights", [torch.float32, torch.float16], ids=["float32-weights", "fp16-weights"])
def test_fp16_autocast_stays_close_to_reference(golden_dir, golden, weights):
    model = load_anima_model(golden_dir / "dit_tiny.safetensors", dtype=weights)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
        pred = _predict(model, golden, _context(model, golden))
    assert pred.dtype == torch.float16 and _relative_max_error(pred, golden["out.model_pred"]) < 0.01


def _assert_fp16_autocast_keeps_a_float32_residual_stream_where_float16_overflows(device: str) -> None:
    """A DiT whose hidden states grow past float16's 65504 while every gate and sub-layer output stays inside it
    (large adaLN gates): under float16 autocast its blocks get float32 hidden states and the prediction matches
    float32, where a float16 residual stream turns to inf and then NaN."""
    torch.manual_seed(0)
    config = AnimaConfig(num_blocks=4, model_channels=64, num_heads=2, adaln_lora_dim=16, crossattn_emb_channels=32,
                         adapter_source_dim=32, adapter_model_dim=32, adapter_num_layers=1, adapter_num_heads=2)
    model = Anima(config)
    with torch.no_grad():
        for block in model.blocks:
            gates = block.adaln_modulation_mlp[2].weight[2 * config.model_channels:]  # [D, lora dim], the mlp gate
            gates.mul_(3000.0)
            block.mlp.layer2.weight.mul_(30.0)
    model.to(device)
    x, sigmas, context = torch.randn(1, 16, 1, 8, 8), torch.rand(1), torch.randn(1, 8, 32)
    x, sigmas, context = x.to(device), sigmas.to(device), context.to(device)
    block_inputs, last_hidden = [], []
    hooks = [block.register_forward_pre_hook(lambda m, args: block_inputs.append(args[0].dtype))
             for block in model.blocks]
    hooks.append(model.blocks[-1].register_forward_hook(lambda m, args, out: last_hidden.append(out.abs().max())))
    with torch.no_grad():
        expected = model(x, sigmas, context)
        with torch.autocast(device, dtype=torch.float16):
            pred = model(x, sigmas, context)
    for hook in hooks:
        hook.remove()
    assert last_hidden[0] > torch.finfo(torch.float16).max  # the float32 run's hidden states: past float16's range
    assert block_inputs[len(model.blocks):] == [torch.float32] * len(model.blocks)
    assert pred.dtype == torch.float16 and torch.isfinite(pred).all()
    assert _relative_max_error(pred, expected) < 0.01


def test_fp16_autocast_keeps_the_residual_stream_float32_where_float16_overflows():
    _assert_fp16_autocast_keeps_a_float32_residual_stream_where_float16_overflows("cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_fp16_autocast_keeps_the_residual_stream_float32_where_float16_overflows():
    _assert_fp16_autocast_keeps_a_float32_residual_stream_where_float16_overflows("cuda")


def _assert_modulation_is_upstreams_float32_value_rounded_once(device: str, batch: int) -> None:
    from library.models.dit import modulate

    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(batch, 256, 128, generator=gen) * 3).bfloat16().to(device)
    scale = (torch.randn(batch, 1, 128, generator=gen) * 0.3).bfloat16().to(device)
    shift = (torch.randn(batch, 1, 128, generator=gen) * 0.3).bfloat16().to(device)
    upstream = (F.layer_norm(x.float(), (128,), eps=1e-6) * (1 + scale) + shift).bfloat16()
    with torch.autocast(device, dtype=torch.bfloat16):
        h = modulate(x, shift, scale)
    assert h.dtype == torch.bfloat16 and h.shape == x.shape
    differing = h != upstream
    assert differing.float().mean() < 1e-3
    # Where they differ, by one bf16 step at most.
    ulp = upstream.float().abs().clamp_min(2**-126) * 2**-7
    assert ((h.float() - upstream.float()).abs() <= ulp * 1.01)[differing].all()


@pytest.mark.parametrize("batch", [1, 3])
def test_bf16_modulation_is_the_float32_one_rounded_once(batch):
    # Upstream under CUDA autocast: layer_norm in float32, h = LN(x) * (1 + scale) + shift in float32, rounded to
    # bf16 where each Linear casts it. Ours computes the affine inside the bf16 norm kernel: the same rounding but
    # for float32 ties (fused multiply-add); two roundings (norm, then affine) would differ in ~30% of the values.
    _assert_modulation_is_upstreams_float32_value_rounded_once("cpu", batch)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("batch", [1, 3])
def test_gpu_bf16_modulation_is_upstreams_cuda_autocast_value(batch):
    # The premise: CUDA autocast runs layer_norm in float32, so upstream's h is float32 until a Linear casts it.
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert F.layer_norm(torch.ones(2, 8, device="cuda", dtype=torch.bfloat16), (8,)).dtype == torch.float32
    _assert_modulation_is_upstreams_float32_value_rounded_once("cuda", batch)
