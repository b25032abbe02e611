"""--fp8_base: float8 block projections with per-channel scales, the keep-list, LoRA gradients, swap, training."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import tiny_train_argv

from anima_train_network import AnimaNetworkTrainer
from library.models.dit import Anima, AnimaConfig
from library.models.dit_loading import load_anima_model
from library.models.fp8 import FP8_DTYPE, Fp8Linear, dequantize_weight, quantize_linear_weights, quantize_weight
from library.training.args import parse_args
from networks.lora_anima import create_network

COMMON = ("--network_args", "train_llm_adapter=false")


def tiny_dit(num_blocks: int = 4) -> Anima:
    torch.manual_seed(0)
    config = AnimaConfig(model_channels=32, num_blocks=num_blocks, num_heads=2, crossattn_emb_channels=16,
                         adaln_lora_dim=8, adapter_source_dim=12, adapter_model_dim=16, adapter_num_layers=1,
                         adapter_num_heads=2, adapter_vocab_size=64)
    return Anima(config).requires_grad_(False)


def with_lora(model: Anima):
    torch.manual_seed(3)  # the same LoRA weights for every model
    network = create_network(1.0, 4, 1.0, None, None, model)
    network.apply_to(None, model)
    for lora in network.unet_loras:
        torch.nn.init.normal_(lora.lora_up.weight, std=0.2)
    return network


def lora_step(model: Anima, network, dtype: torch.dtype) -> tuple[torch.Tensor, list[torch.Tensor]]:
    torch.manual_seed(1)
    x, t, context = torch.randn(2, 16, 1, 8, 8), torch.rand(2), torch.randn(2, 6, 16)
    network.zero_grad(set_to_none=True)
    pred = model(x.to(dtype), t, context.to(dtype))
    pred.float().square().mean().backward()
    return pred.float(), [p.grad.float().clone() for p in network.parameters()]


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def test_quantized_weight_round_trips_within_float8_precision_per_output_channel():
    torch.manual_seed(0)
    weight = torch.randn(16, 64) * torch.logspace(-3, 1, 16)[:, None]  # rows four decades apart
    quantized, scale = quantize_weight(weight)
    assert quantized.dtype == FP8_DTYPE and scale.shape == (16, 1) and scale.dtype == torch.float32
    restored = dequantize_weight(quantized, scale, torch.float32)
    row_error = ((restored - weight).abs().amax(dim=1) / weight.abs().amax(dim=1))
    assert row_error.max() <= 2**-4  # 3 mantissa bits: half an ulp is 1/16 of the row's largest value
    assert quantized.float().abs().amax(dim=1).eq(448).all()  # each row uses the full float8 range


def test_keep_list_stores_only_block_projections_in_float8():
    model = tiny_dit()
    names = quantize_linear_weights(model)
    assert len(names) == 4 * 10
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        in_fp8 = name in names
        assert (module.weight.dtype == FP8_DTYPE) == in_fp8, name
        assert isinstance(module, Fp8Linear) == in_fp8, name
        if in_fp8:
            assert ".self_attn." in name or ".cross_attn." in name or ".mlp." in name
            assert not module.weight.requires_grad and not module.weight_scale.requires_grad
    for name, param in model.named_parameters():
        if param.dtype == FP8_DTYPE:
            assert name.rsplit(".", 1)[0] in names
        if param.ndim == 1 or "adaln_modulation" in name or name.startswith(("x_embedder", "t_embedder",
                                                                             "final_layer", "llm_adapter")):
            assert param.dtype == torch.float32, name


def test_fp8_lora_gradients_are_close_to_bf16_and_hooks_stay_attached():
    bf16_model = tiny_dit().to(torch.bfloat16)
    fp8_model = copy.deepcopy(bf16_model)
    bf16_net, fp8_net = with_lora(bf16_model), with_lora(fp8_model)
    quantize_linear_weights(fp8_model)  # after the LoRA is attached, as in the trainer
    pred_bf16, grads_bf16 = lora_step(bf16_model, bf16_net, torch.bfloat16)
    pred_fp8, grads_fp8 = lora_step(fp8_model, fp8_net, torch.bfloat16)
    assert pred_fp8.dtype == torch.float32 and torch.isfinite(pred_fp8).all()
    assert relative_error(pred_fp8, pred_bf16) < 0.2  # random tiny weights, 4 blocks of float8 rounding
    cosines = [torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) for a, b in
               zip(grads_fp8, grads_bf16) if b.abs().max() > 0]
    assert len(cosines) == len(grads_bf16) and min(cosines) > 0.97, min(cosines)
    fp8_net.remove_hooks()  # the LoRA was really inside the fp8 layers' outputs
    with torch.no_grad():
        torch.manual_seed(1)
        x, t, context = torch.randn(2, 16, 1, 8, 8), torch.rand(2), torch.randn(2, 6, 16)
        plain = fp8_model(x.to(torch.bfloat16), t, context.to(torch.bfloat16)).float()
    assert relative_error(plain, pred_fp8) > 1e-2


def test_fp8_weights_give_a_prediction_close_to_bf16_on_the_golden_dit(golden_dir):
    golden = load_file(str(golden_dir / "dit_tiny_golden.safetensors"))
    bf16_model = load_anima_model(str(golden_dir / "dit_tiny.safetensors"), dtype=torch.bfloat16).requires_grad_(False)
    fp8_model = copy.deepcopy(bf16_model)
    quantize_linear_weights(fp8_model)

    def predict(model):
        with torch.no_grad():
            context = model.encode_text(golden["in.qwen3_embeds"], golden["in.qwen3_attn_mask"],
                                        golden["in.t5_input_ids"], golden["in.t5_attn_mask"])
            return model(golden["in.noisy_latents"], golden["in.timesteps"], context,
                         padding_mask=golden["in.padding_mask"]).float()

    # Measured 0.040 (bench/bench_fp8_error.py); bf16 itself is 0.010 off float32.
    assert relative_error(predict(fp8_model), predict(bf16_model)) < 0.06


def test_block_swap_streams_the_float8_weights_and_scales_and_gives_the_resident_result():
    resident = tiny_dit().to(torch.bfloat16)
    swapped = copy.deepcopy(resident)
    nets = [with_lora(resident), with_lora(swapped)]
    for model in (resident, swapped):
        quantize_linear_weights(model)
    swapped.enable_block_swap(2, torch.device("cpu"))
    swapped.move_to_device_except_swap_blocks(torch.device("cpu"))
    swapped.prepare_block_swap_before_forward()
    swapper = swapped.block_swapper
    streamed = {p.dtype for params in swapper._host for p in params}
    assert FP8_DTYPE in streamed and torch.float32 in streamed  # weights and their scales move together
    fp8_bytes = swapper.resident_weight_bytes()
    bf16_bytes = sum(p.numel() * 2 for block in tiny_dit(2).blocks for p in block.parameters())
    assert fp8_bytes < 0.75 * bf16_bytes  # tiny blocks: norms and modulation weigh more than at full width
    for _ in range(2):  # the second step starts from the layout the first one left
        expected = lora_step(resident, nets[0], torch.bfloat16)
        actual = lora_step(swapped, nets[1], torch.bfloat16)
        torch.testing.assert_close(actual[0], expected[0], rtol=0, atol=0)
        for a, b in zip(actual[1], expected[1]):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_fp8_base_training_runs_on_the_tiny_models_and_stays_close_to_bf16(tiny_setup, tmp_path,
                                                                           fresh_accelerate_state):
    def train(out, *extra):
        argv = tiny_train_argv(tiny_setup, out, "--max_train_steps", "2", "--mixed_precision", "bf16", *COMMON,
                               *extra, learning_rate="5e-3")
        args, _ = parse_args(argv)
        trainer = AnimaNetworkTrainer()
        trainer.train(args)
        return trainer, load_file(str(out / "tiny.safetensors"))

    fp8_trainer, fp8 = train(tmp_path / "fp8", "--fp8_base")
    _, bf16 = train(tmp_path / "bf16")
    layer = fp8_trainer.dit.blocks[0].self_attn.q_proj
    assert isinstance(layer, Fp8Linear) and layer.weight.dtype == FP8_DTYPE
    assert fp8_trainer.dit.final_layer.linear.weight.dtype == torch.bfloat16
    assert fp8.keys() == bf16.keys()
    ups = [k for k in fp8 if k.endswith("lora_up.weight")]

    def cosine(keys):
        return torch.nn.functional.cosine_similarity(torch.cat([fp8[k].float().flatten() for k in keys]),
                                                     torch.cat([bf16[k].float().flatten() for k in keys]), dim=0)

    # The LoRA trained (up starts at 0) and in the same direction as in bf16: over the whole LoRA, and per module
    # with some slack (after 2 Adam steps a small module's agreement varies with the seed's draws: 0.80-0.97).
    assert cosine(ups) > 0.9
    for key in ups:
        assert fp8[key].abs().max() > 0 and cosine([key]) > 0.75, key


def test_fp8_layers_compute_in_the_autocast_dtype_for_the_lora_and_their_scales_move_with_the_model():
    """As in a CUDA bf16 run (CPU autocast stands in): float32 activations reach a float8 layer, which computes in
    bf16, so the LoRA hook gets bf16 and the LoRA's float32 weights get float32 gradients; .to(device) moves the
    scales with the weights and keeps both dtypes."""
    model = tiny_dit()  # float32 weights and activations: the layer must still hand bf16 to the LoRA
    network = with_lora(model)
    quantize_linear_weights(model)
    layer = model.blocks[0].self_attn.q_proj
    seen = []
    layer.register_forward_hook(lambda module, args, out: seen.append((args[0].dtype, out.dtype)), prepend=True)
    torch.manual_seed(1)
    x, t, context = torch.randn(2, 16, 1, 8, 8), torch.rand(2), torch.randn(2, 6, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pred = model(x, t, context)
    pred.float().square().mean().backward()
    assert seen and all(out == torch.bfloat16 for _, out in seen), seen  # what the LoRA hook adds to
    grads = [p.grad for p in network.parameters()]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    assert (layer.weight.dtype, layer.weight_scale.dtype) == (FP8_DTYPE, torch.float32)
    model.to("meta")  # any device move: the scales are parameters of the layer, so they travel too
    assert (layer.weight.device.type, layer.weight_scale.device.type) == ("meta", "meta")
    assert (layer.weight.dtype, layer.weight_scale.dtype) == (FP8_DTYPE, torch.float32)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_fp8_training_step_matches_bf16_on_cuda():
    device = torch.device("cuda")
    bf16_model = tiny_dit().to(device, torch.bfloat16)
    fp8_model = copy.deepcopy(bf16_model)
    bf16_net, fp8_net = with_lora(bf16_model).to(device), with_lora(fp8_model).to(device)
    quantize_linear_weights(fp8_model)

    def step(model, network):
        torch.manual_seed(1)
        x, t, context = (torch.randn(2, 16, 1, 8, 8, device=device), torch.rand(2, device=device),
                         torch.randn(2, 6, 16, device=device))
        with torch.autocast("cuda", dtype=torch.bfloat16):
            pred = model(x, t, context)
        pred.float().square().mean().backward()
        return pred.float(), [p.grad.float() for p in network.parameters()]

    pred_bf16, grads_bf16 = step(bf16_model, bf16_net)
    pred_fp8, grads_fp8 = step(fp8_model, fp8_net)
    assert relative_error(pred_fp8, pred_bf16) < 0.1
    for a, b in zip(grads_fp8, grads_bf16):
        if b.abs().max() > 0:
            assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.97
