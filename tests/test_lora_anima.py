"""The Anima LoRA network: golden parity, layer selection, network_args, param groups, dropouts, I/O."""

from __future__ import annotations

import math
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn
from transformers import Qwen3Config, Qwen3Model

from bench.bench_host_syncs import HostSyncCounter
from library.errors import AnimaError
from library.models.dit import Anima, AnimaConfig
from library.models.dit_loading import load_anima_model
from networks.lora_anima import (
    VALID_NETWORK_ARGS,
    LoRAModule,
    create_network,
    create_network_from_weights,
)
from networks.lora_format import lora_name_for

DEFAULT_DIT_MODULES = [
    f"blocks.{i}.{name}"
    for i in range(2)
    for name in (
        *(
            f"{attn}.{proj}"
            for attn in ("self_attn", "cross_attn")
            for proj in ("q_proj", "k_proj", "v_proj", "output_proj")
        ),
        "mlp.layer1",
        "mlp.layer2",
    )
]
ADAPTER_MODULES = [
    f"llm_adapter.blocks.{j}.{name}"
    for j in range(2)
    for name in (
        *(
            f"{attn}.{proj}"
            for attn in ("self_attn", "cross_attn")
            for proj in ("q_proj", "k_proj", "v_proj", "o_proj")
        ),
        "mlp.0",
        "mlp.2",
    )
]


def tiny_dit() -> Anima:
    torch.manual_seed(0)
    config = AnimaConfig(
        model_channels=32,
        num_blocks=2,
        num_heads=2,
        crossattn_emb_channels=16,
        adaln_lora_dim=8,
        adapter_source_dim=12,
        adapter_model_dim=16,
        adapter_num_layers=2,
        adapter_num_heads=2,
        adapter_vocab_size=64,
    )
    return Anima(config).requires_grad_(False)


def tiny_qwen3() -> Qwen3Model:
    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
    )
    return Qwen3Model(config).requires_grad_(False)


def randomize_up(network, seed: int = 1, std: float = 0.1) -> None:
    """Give every lora_up a non-zero value so the LoRA changes outputs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lora in network.all_loras:
            lora.lora_up.weight.copy_(torch.randn(lora.lora_up.weight.shape, generator=gen) * std)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


# ------------------------------------------------------------------------------------------------------------
# Parity with the reference implementation
# ------------------------------------------------------------------------------------------------------------


def test_golden_lora_reproduces_reference_prediction_loss_and_every_gradient(golden_dir):
    model = load_anima_model(str(golden_dir / "dit_tiny.safetensors")).requires_grad_(False)
    golden = load_file(str(golden_dir / "dit_tiny_golden.safetensors"))
    network, _ = create_network_from_weights(1.0, str(golden_dir / "lora_tiny.safetensors"), None, None, model)
    network.apply_to(None, model, apply_text_encoder=False, apply_unet=True)
    assert len(network.unet_loras) == 20

    context = model.encode_text(
        golden["in.qwen3_embeds"], golden["in.qwen3_attn_mask"], golden["in.t5_input_ids"], golden["in.t5_attn_mask"]
    )
    pred = model(golden["in.noisy_latents"], golden["in.timesteps"], context, padding_mask=golden["in.padding_mask"])
    pred = pred.squeeze(2)
    loss = torch.nn.functional.mse_loss(pred, golden["in.noise"] - golden["in.x0"])
    loss.backward()

    assert rel_err(pred, golden["lora.model_pred"]) < 1e-4
    assert rel_err(loss.reshape(1), golden["lora.loss"]) < 1e-4
    grad_keys = [k for k in golden if k.startswith("lora.grad.")]
    assert len(grad_keys) == 40
    params = {
        f"{lora.lora_name}.{part}.weight": getattr(lora, part).weight
        for lora in network.unet_loras
        for part in ("lora_down", "lora_up")
    }
    for key in grad_keys:
        name = key[len("lora.grad.") :]
        assert rel_err(params[name].grad, golden[key]) < 1e-4, name
    # The LoRA made a real difference, so the comparison above is meaningful.
    assert rel_err(golden["out.model_pred"], golden["lora.model_pred"]) > 1e-2


# ------------------------------------------------------------------------------------------------------------
# Selection
# ------------------------------------------------------------------------------------------------------------


def original_names(loras) -> list[str]:
    return [lora.original_name for lora in loras]


def test_default_selection_is_attention_and_mlp_of_dit_blocks():
    network = create_network(1.0, 4, 1.0, None, None, tiny_dit())
    assert sorted(original_names(network.unet_loras)) == sorted(DEFAULT_DIT_MODULES)
    assert network.text_encoder_loras == []
    lora = network.unet_loras[0]
    assert lora.lora_name == lora_name_for("lora_unet", lora.original_name)


def test_train_llm_adapter_adds_adapter_blocks_but_never_out_proj():
    network = create_network(1.0, 4, 1.0, None, None, tiny_dit(), train_llm_adapter="True")
    assert sorted(original_names(network.unet_loras)) == sorted(DEFAULT_DIT_MODULES + ADAPTER_MODULES)


def test_include_patterns_override_default_exclusion_and_exclude_patterns_remove():
    include = create_network(1.0, 4, 1.0, None, None, tiny_dit(), include_patterns='[".*adaln_modulation.*"]')
    names = set(original_names(include.unet_loras))
    assert "blocks.0.adaln_modulation_self_attn.1" in names
    assert "final_layer.adaln_modulation.2" in names
    assert "t_embedder.1.linear_1" not in names
    assert len(names) == 20 + 2 * 6 + 2

    exclude = create_network(1.0, 4, 1.0, None, None, tiny_dit(), exclude_patterns="[r'.*mlp.*', '.*cross_attn.*']")
    assert sorted(original_names(exclude.unet_loras)) == sorted(n for n in DEFAULT_DIT_MODULES if "self_attn" in n)

    both = create_network(
        1.0,
        4,
        1.0,
        None,
        None,
        tiny_dit(),
        exclude_patterns="'.*_attn.*'",
        include_patterns='["blocks.1.self_attn.q_proj"]',
    )
    assert sorted(original_names(both.unet_loras)) == sorted(
        [n for n in DEFAULT_DIT_MODULES if "mlp" in n] + ["blocks.1.self_attn.q_proj"]
    )


def test_modules_and_their_initial_weights_follow_sd_scripts_module_order():
    """DiT modules come as sd-scripts walks the model (embedders, LLM adapter, blocks, final layer), and each
    module's init draws from the default generator in turn (down's and up's Linear init, then down's
    kaiming-uniform a=√5), so a seed gives sd-scripts' initial LoRA."""
    dit = tiny_dit()
    torch.manual_seed(5)
    network = create_network(1.0, 4, 1.0, None, None, dit, train_llm_adapter="true",
                             include_patterns="['x_embedder.*', 't_embedder.*', 'final_layer.linear']")
    names = original_names(network.unet_loras)
    kinds = [n.split(".")[0] for n in names]
    assert kinds == sorted(kinds, key=["x_embedder", "t_embedder", "llm_adapter", "blocks", "final_layer"].index)
    assert names[kinds.index("blocks"):kinds.index("final_layer")] == DEFAULT_DIT_MODULES
    torch.manual_seed(5)
    for lora in network.unet_loras:
        nn.Linear(lora.in_features, lora.rank, bias=False)
        nn.Linear(lora.rank, lora.out_features, bias=False)
        expected = torch.empty(lora.rank, lora.in_features)
        nn.init.kaiming_uniform_(expected, a=math.sqrt(5))
        assert torch.equal(lora.lora_down.weight, expected), lora.original_name
        assert not lora.lora_up.weight.any()


def test_text_encoder_attention_and_mlp_layers_get_lora_te_prefix():
    network = create_network(1.0, 4, 1.0, None, [tiny_qwen3()], tiny_dit())
    names = original_names(network.text_encoder_loras)
    assert len(names) == 2 * 7
    assert "layers.1.mlp.down_proj" in names and "layers.0.self_attn.o_proj" in names
    assert {lora.lora_name for lora in network.text_encoder_loras} >= {"lora_te_layers_0_self_attn_q_proj"}


def test_reg_dims_set_rank_per_regex_first_match_wins_and_rank_zero_skips():
    network = create_network(
        1.0,
        4,
        2.0,
        None,
        None,
        tiny_dit(),
        network_reg_dims=".*cross_attn.k_proj=8, .*cross_attn.*=6, .*mlp.layer2=0",
    )
    ranks = {lora.original_name: lora.rank for lora in network.unet_loras}
    assert ranks["blocks.0.cross_attn.k_proj"] == 8
    assert ranks["blocks.0.cross_attn.q_proj"] == 6
    assert ranks["blocks.0.self_attn.q_proj"] == 4
    assert "blocks.0.mlp.layer2" not in ranks
    assert all(float(lora.alpha) == 2.0 for lora in network.unet_loras)


def test_alpha_zero_means_alpha_equals_rank_and_none_is_the_default_one():
    network = create_network(1.0, 8, 0, None, None, tiny_dit())
    assert all(float(lora.alpha) == 8.0 and lora.scale == 1.0 for lora in network.unet_loras)
    network = create_network(1.0, 8, None, None, None, tiny_dit())  # sd-scripts' create_network default
    assert all(float(lora.alpha) == 1.0 and lora.scale == 1 / 8 for lora in network.unet_loras)
    network = create_network(1.0, None, None, None, None, tiny_dit())
    assert all(lora.rank == 4 and float(lora.alpha) == 1.0 for lora in network.unet_loras)


def test_verbose_prints_a_table_of_modules_and_ranks(capsys):
    create_network(1.0, 4, 1.0, None, None, tiny_dit(), verbose="true", network_reg_dims=".*mlp.*=2")
    out = capsys.readouterr().out
    assert "blocks.1.mlp.layer2" in out and "excluded" in out
    line = next(line for line in out.splitlines() if line.startswith("blocks.1.mlp.layer2 "))
    assert line.split()[1] == "2"


# ------------------------------------------------------------------------------------------------------------
# --network_args validation
# ------------------------------------------------------------------------------------------------------------


def test_unknown_network_arg_is_one_error_listing_the_valid_keys():
    with pytest.raises(AnimaError) as info:
        create_network(1.0, 4, 1.0, None, None, tiny_dit(), rank_dropuot="0.1")
    message = str(info.value)
    assert "rank_dropuot" in message and "\n" not in message
    for key in VALID_NETWORK_ARGS:
        assert key in message


def test_malicious_literal_is_rejected_without_being_run(monkeypatch):
    called = []
    monkeypatch.setattr(os, "system", lambda *a: called.append(a))
    payload = "__import__('os').system('echo pwned')"
    with pytest.raises(AnimaError, match="exclude_patterns"):
        create_network(1.0, 4, 1.0, None, None, tiny_dit(), exclude_patterns=payload)
    with pytest.raises(AnimaError, match="include_patterns"):
        create_network(1.0, 4, 1.0, None, None, tiny_dit(), include_patterns=f"[{payload}]")
    assert called == []


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("rank_dropout", "1.5"),
        ("module_dropout", "abc"),
        ("train_llm_adapter", "yes"),
        ("network_reg_dims", ".*mlp.*"),
        ("network_reg_dims", ".*mlp.*=four"),
        ("network_reg_lrs", ".*mlp.*=-1"),
        ("exclude_patterns", "['(unclosed']"),
        ("loraplus_lr_ratio", "0"),
    ],
)
def test_malformed_network_arg_values_name_the_key(key, value):
    with pytest.raises(AnimaError, match=key):
        create_network(1.0, 4, 1.0, None, None, tiny_dit(), **{key: value})


def test_excluding_everything_is_an_error():
    with pytest.raises(AnimaError, match="no layer"):
        create_network(1.0, 4, 1.0, None, None, tiny_dit(), exclude_patterns='[".*"]')


# ------------------------------------------------------------------------------------------------------------
# LoRA math
# ------------------------------------------------------------------------------------------------------------


def test_lora_module_init_and_forward_formula():
    torch.manual_seed(0)
    lora = LoRAModule("lora_unet_x", "x", 10, 6, rank=4, alpha=2.0, multiplier=0.7)
    assert lora.lora_down.weight.abs().max() <= 1 / math.sqrt(10)  # kaiming-uniform a=sqrt(5) bound
    assert torch.count_nonzero(lora.lora_up.weight) == 0
    torch.nn.init.normal_(lora.lora_up.weight)
    x = torch.randn(3, 5, 10)
    expected = x @ lora.lora_down.weight.T @ lora.lora_up.weight.T * 0.7 * (2.0 / 4)
    torch.testing.assert_close(lora.delta(x), expected)


def test_hooked_forward_adds_scaled_update_and_multiplier_scales_it():
    model = tiny_dit()
    network = create_network(1.0, 4, 2.0, None, None, model)
    network.apply_to(None, model)
    randomize_up(network)
    layer = model.blocks[0].mlp.layer1
    lora = network.get_submodule("lora_unet_blocks_0_mlp_layer1")
    x = torch.randn(2, 7, layer.in_features)
    plain = torch.nn.functional.linear(x, layer.weight)
    update = x @ lora.lora_down.weight.T @ lora.lora_up.weight.T * 0.5
    torch.testing.assert_close(layer(x), plain + update)
    network.set_multiplier(0.25)
    torch.testing.assert_close(layer(x), plain + 0.25 * update)
    network.set_multiplier(0.0)
    torch.testing.assert_close(layer(x), plain)
    network.remove_hooks()
    network.set_multiplier(1.0)
    torch.testing.assert_close(layer(x), plain)


def test_update_is_computed_in_the_input_dtype():
    model = tiny_dit().to(torch.bfloat16)
    network = create_network(1.0, 4, 1.0, None, None, model)  # LoRA weights stay float32
    network.apply_to(None, model)
    randomize_up(network)
    x = torch.randn(2, 3, 32, dtype=torch.bfloat16)
    assert model.blocks[0].self_attn.q_proj(x).dtype == torch.bfloat16


def test_rank_dropout_at_batch_2_masks_per_sample_and_rank_and_is_unbiased():
    torch.manual_seed(0)
    lora = LoRAModule("lora_unet_x", "x", 8, 6, rank=6, alpha=6.0, rank_dropout=0.5)
    with torch.no_grad():
        lora.lora_up.weight.copy_(torch.eye(6))  # output channel r = rank channel r, so zeros show the mask
    x = torch.randn(2, 1, 3, 4, 8)  # 5-D like a [B, T, H, W, D] activation
    lora.eval()
    exact = lora.delta(x)
    lora.train()
    draws = torch.stack([lora.delta(x) for _ in range(4000)])  # [N, 2, 1, 3, 4, 6]
    assert draws.shape[1:] == x.shape[:-1] + (6,)
    # The mask itself (which rank channels are zeroed) is compared, not the matmul results, which may differ
    # in the last bit from one position to the next.
    kept = draws != 0
    # Per (sample, rank): all positions of one sample share it, the two samples and the ranks differ.
    assert torch.equal(kept, kept[:, :, :, :1, :1].expand_as(kept))
    assert (kept[:, 0] != kept[:, 1]).any()
    assert (kept[..., 0] != kept[..., 1]).any()
    assert 0.45 < kept.float().mean().item() < 0.55
    mean = draws.mean(0)
    assert (mean - exact).abs().max() < 0.06 * exact.abs().max()


def test_rank_dropout_mask_is_one_uniform_draw_per_sample_and_rank_kept_above_p(monkeypatch):
    """The mask is u > p with u ~ U[0, 1) drawn as [B, r] from the default generator (sd-scripts' draw), the
    update rescaled by 1/(1 − p)."""
    lora = LoRAModule("lora_unet_x", "x", 8, 6, rank=6, alpha=3.0, rank_dropout=0.25)
    with torch.no_grad():
        lora.lora_up.weight.copy_(torch.randn(6, 6, generator=torch.Generator().manual_seed(1)))
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(2))
    lora.train()
    torch.manual_seed(3)
    got = lora.delta(x)
    torch.manual_seed(3)
    keep = (torch.rand(2, 6) > 0.25).unsqueeze(1)
    h = (x @ lora.lora_down.weight.t()) * keep
    torch.testing.assert_close(got, (h @ lora.lora_up.weight.t()) * (0.5 / 0.75))
    # A draw equal to p is dropped.
    monkeypatch.setattr(torch, "rand", lambda *size, **kwargs: torch.full(size[0] if len(size) == 1 else size, 0.25))
    assert not lora.delta(x).any()


def test_module_dropout_skips_whole_update_only_in_training():
    torch.manual_seed(0)
    lora = LoRAModule("lora_unet_x", "x", 8, 5, rank=4, alpha=4.0, module_dropout=0.5)
    torch.nn.init.normal_(lora.lora_up.weight)
    x = torch.randn(2, 8)
    lora.train()
    skipped = sum(lora.delta(x) is None for _ in range(400))
    assert 150 < skipped < 250
    lora.eval()
    assert all(lora.delta(x) is not None for _ in range(50))


def test_rank_and_module_dropout_given_as_zero_draw_like_sd_scripts_and_change_nothing():
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(2))
    plain = LoRAModule("lora_unet_x", "x", 8, 6, rank=6, alpha=3.0)
    torch.nn.init.normal_(plain.lora_up.weight)
    for options, draws in (({"rank_dropout": 0.0}, lambda: torch.rand(2, 6)),
                           ({"module_dropout": 0.0}, lambda: torch.rand(1))):
        lora = LoRAModule("lora_unet_x", "x", 8, 6, rank=6, alpha=3.0, **options)
        lora.load_state_dict(plain.state_dict())
        lora.train()
        torch.manual_seed(5)
        got = lora.delta(x)
        after = torch.rand(3)
        torch.manual_seed(5)
        draws()
        assert torch.equal(after, torch.rand(3)), options  # one draw of sd-scripts' shape was taken
        torch.testing.assert_close(got, plain.delta(x))


def test_network_dropout_acts_on_rank_activations_in_training_only():
    model = tiny_dit()
    network = create_network(1.0, 4, 4.0, None, None, model, neuron_dropout=0.5)
    randomize_up(network)
    lora = network.unet_loras[0]
    assert lora.dropout == 0.5
    x = torch.randn(4, lora.lora_down.in_features)
    network.eval()
    assert torch.equal(lora.delta(x), lora.delta(x))
    network.on_epoch_start(None, model)
    assert lora.training and not torch.equal(lora.delta(x), lora.delta(x))
    with pytest.raises(AnimaError, match="network_dropout"):
        create_network(1.0, 4, 4.0, None, None, model, neuron_dropout=1.0)


# ------------------------------------------------------------------------------------------------------------
# Optimizer parameter groups
# ------------------------------------------------------------------------------------------------------------


def group_summary(groups, descriptions):
    return [(d, g["lr"], len(g["params"])) for d, g in zip(descriptions, groups)]


def test_param_groups_order_with_reg_lrs_and_loraplus():
    network = create_network(
        1.0, 4, 1.0, None, [tiny_qwen3()], tiny_dit(), network_reg_lrs=".*cross_attn.*=5e-5", loraplus_lr_ratio="4"
    )
    network.apply_to([None], None)
    groups, descriptions = network.prepare_optimizer_params([2e-5], 1e-4, 1e-3)
    assert [(d, lr) for d, lr, _ in group_summary(groups, descriptions)] == [
        ("textencoder 1", 2e-5),
        ("textencoder 1 plus", 8e-5),
        ("unet reg_lr_0", 5e-5),
        ("unet reg_lr_0 plus", 2e-4),
        ("unet", 1e-4),
        ("unet plus", 4e-4),
    ]
    cross = {lora.lora_up.weight for lora in network.unet_loras if ".cross_attn." in lora.original_name}
    assert set(groups[3]["params"]) == cross
    assert all(p.shape[1] == 4 for p in groups[5]["params"])  # up weights [out, r]
    all_params = [p for g in groups for p in g["params"]]
    assert len(all_params) == len(set(all_params)) == len(list(network.parameters()))


def test_reg_lr_groups_come_in_the_order_of_their_first_module():
    """sd-scripts orders the reg_lr groups by the first module that falls in each, not by the regex list."""
    network = create_network(1.0, 4, 1.0, None, None, tiny_dit(),
                             network_reg_lrs=".*mlp.*=1e-3,.*self_attn.*=2e-4", loraplus_unet_lr_ratio="2")
    groups, descriptions = network.prepare_optimizer_params(None, 1e-4, None)
    assert [(d, lr) for d, lr, _ in group_summary(groups, descriptions)] == [
        ("unet reg_lr_1", 2e-4),  # blocks.0.self_attn.q_proj is the first module
        ("unet reg_lr_1 plus", 4e-4),
        ("unet reg_lr_0", 1e-3),
        ("unet reg_lr_0 plus", 2e-3),
        ("unet", 1e-4),
        ("unet plus", 2e-4),
    ]


def test_specific_loraplus_ratio_wins_and_missing_lrs_fall_back_to_default():
    network = create_network(
        1.0, 4, 1.0, None, [tiny_qwen3()], tiny_dit(), loraplus_lr_ratio="4", loraplus_unet_lr_ratio="16"
    )
    groups, descriptions = network.prepare_optimizer_params(None, None, 1e-3)
    assert [(d, lr) for d, lr, _ in group_summary(groups, descriptions)] == [
        ("textencoder 1", 1e-3),
        ("textencoder 1 plus", 4e-3),
        ("unet", 1e-3),
        ("unet plus", 1.6e-2),
    ]


def test_component_lrs_first_match_wins_and_zero_lr_freezes():
    network = create_network(
        1.0, 4, 1.0, None, None, tiny_dit(), train_llm_adapter="true", include_patterns='[".*adaln_modulation.*"]'
    )
    groups, descriptions = network.prepare_optimizer_params(
        None, 1e-4, 1e-3, component_lrs={"self_attn": 0.0, "mlp": 3e-4, "llm_adapter": 2e-5, "mod": 5e-6}
    )
    summary = {d: (lr, n) for d, lr, n in group_summary(groups, descriptions)}
    assert descriptions == ["unet llm_adapter", "unet mlp", "unet mod", "unet"]
    assert summary["unet llm_adapter"] == (2e-5, 2 * 10 * 2)  # adapter self_attn goes to llm_adapter
    assert summary["unet mlp"] == (3e-4, 2 * 2 * 2)
    assert summary["unet mod"] == (5e-6, (2 * 6 + 2) * 2)
    assert summary["unet"] == (1e-4, 2 * 4 * 2)  # cross_attn falls back to unet_lr
    frozen = [
        lora
        for lora in network.unet_loras
        if lora.original_name.startswith("blocks.") and ".self_attn." in lora.original_name
    ]
    assert len(frozen) == 8
    assert all(not p.requires_grad for lora in frozen for p in lora.parameters())
    network.prepare_grad_etc(None, None)
    assert all(not p.requires_grad for lora in frozen for p in lora.parameters())
    trainable = set(network.get_trainable_params())
    assert trainable == {p for g in groups for p in g["params"]}


def test_reg_lr_zero_freezes_matching_modules():
    network = create_network(1.0, 4, 1.0, None, None, tiny_dit(), network_reg_lrs=".*mlp.*=0")
    groups, descriptions = network.prepare_optimizer_params(None, 1e-4, None)
    assert descriptions == ["unet"]
    mlp = [lora for lora in network.unet_loras if ".mlp." in lora.original_name]
    assert all(not p.requires_grad for lora in mlp for p in lora.parameters())


# ------------------------------------------------------------------------------------------------------------
# Max-norm
# ------------------------------------------------------------------------------------------------------------


def test_max_norm_regularization_scales_only_modules_above_the_limit_and_reports_their_norms():
    network = create_network(1.0, 4, 2.0, None, None, tiny_dit())
    randomize_up(network, std=0.01)
    big = network.unet_loras[0]
    with torch.no_grad():
        big.lora_up.weight.mul_(1000)
    norms_before = [lora.delta_weight().norm().item() for lora in network.unet_loras]
    limit = 2.0
    assert norms_before[0] > limit and max(norms_before[1:]) < limit
    with HostSyncCounter() as reads:
        scaled, mean_norm, max_norm = network.apply_max_norm_regularization(limit, "cpu")
    assert reads.total == 0, reads.sites  # values stay on the device until the trainer logs them
    scaled, mean_norm, max_norm = int(scaled), float(mean_norm), float(max_norm)
    norms_after = [lora.delta_weight().norm().item() for lora in network.unet_loras]
    assert scaled == 1
    assert norms_after[0] == pytest.approx(limit, rel=1e-4)
    assert norms_after[1:] == pytest.approx(norms_before[1:], rel=1e-6)
    assert max_norm == pytest.approx(limit, rel=1e-4)
    # The logged norms are the modules' |ΔW| after scaling, small ones included as they are.
    assert min(norms_before[1:]) < limit / 2
    assert mean_norm == pytest.approx(sum(norms_after) / len(norms_after), rel=1e-4)


# ------------------------------------------------------------------------------------------------------------
# Saving and loading
# ------------------------------------------------------------------------------------------------------------


def trained_network(model, te=None, **kwargs):
    network = create_network(1.0, 4, 2.0, None, te, model, **kwargs)
    randomize_up(network)
    return network


def dit_output(model) -> torch.Tensor:
    torch.manual_seed(5)
    x = torch.randn(2, 16, 1, 4, 6)
    context = torch.randn(2, 5, 16)
    with torch.no_grad():
        return model(x, torch.tensor([0.2, 0.7]), context)


@pytest.mark.parametrize("lora_format", ["sd-scripts", "comfy"])
def test_save_load_round_trip_reproduces_the_output(tmp_path, lora_format):
    model = tiny_dit()
    network = trained_network(model, train_llm_adapter="true")
    network.apply_to(None, model)
    expected = dit_output(model)
    path = tmp_path / "lora.safetensors"
    network.save_weights(str(path), torch.float32, {"ss_network_dim": "4"}, lora_format=lora_format)
    network.remove_hooks()
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["ss_lora_format"] == lora_format and meta["ss_network_dim"] == "4" and "sshs_model_hash" in meta

    # --network_weights into a freshly built network with the same settings.
    fresh = create_network(1.0, 4, 2.0, None, None, model, train_llm_adapter="true")
    fresh.apply_to(None, model)
    assert fresh.load_weights(str(path)) == []
    torch.testing.assert_close(dit_output(model), expected)
    assert all(float(lora.alpha) == 2.0 for lora in fresh.unet_loras)  # folded alpha is undone, not replaced
    fresh.remove_hooks()

    # --dim_from_weights / inference path.
    from_file, _ = create_network_from_weights(1.0, str(path), None, None, model)
    from_file.apply_to(None, model)
    assert len(from_file.unet_loras) == 40
    torch.testing.assert_close(dit_output(model), expected)


def test_saved_keys_map_to_exactly_one_base_module(tmp_path):
    model, te = tiny_dit(), tiny_qwen3()
    for kwargs in ({}, {"train_llm_adapter": "true"}):
        network = trained_network(model, te=[te], **kwargs)
        path = tmp_path / "lora.safetensors"
        network.save_weights(str(path), None, None)
        saved = {key.split(".")[0] for key in load_file(str(path))}
        unet_names = [lora_name_for("lora_unet", n) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        te_names = [lora_name_for("lora_te", n) for n, m in te.named_modules() if isinstance(m, nn.Linear)]
        for name in saved:
            assert (unet_names + te_names).count(name) == 1, name
        assert len(saved) == len(network.all_loras)

        network.save_weights(str(path), None, None, lora_format="comfy")
        module_names = {f"diffusion_model.{n}" for n, _ in model.named_modules()}
        module_names |= {f"text_encoders.qwen3_06b.transformer.model.{n}" for n, _ in te.named_modules()}
        for key in load_file(str(path)):
            assert key.rsplit(".", 2)[0] in module_names, key


def test_save_casts_to_dtype_and_non_safetensors_uses_torch_save(tmp_path):
    network = trained_network(tiny_dit())
    network.save_weights(str(tmp_path / "a.safetensors"), torch.bfloat16, {})
    assert {t.dtype for t in load_file(str(tmp_path / "a.safetensors")).values()} == {torch.bfloat16}
    network.save_weights(str(tmp_path / "a.pt"), None, {"ignored": "x"})
    sd = torch.load(tmp_path / "a.pt", weights_only=True)
    assert set(sd) == set(network.state_dict())
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_text_encoder_side_not_applied_is_not_saved(tmp_path):
    model = tiny_dit()
    network = trained_network(model, te=[tiny_qwen3()])
    network.apply_to([None], model, apply_text_encoder=False, apply_unet=True)
    assert network.text_encoder_loras == []
    assert all(k.startswith("lora_unet_") for k in network.state_dict())


def test_weights_of_a_side_that_is_not_trained_are_skipped_with_a_warning(tmp_path, caplog):
    # Continuing a Qwen3 + DiT LoRA with the DiT only (--network_train_unet_only, cached text outputs), or the
    # reverse, loads the trained side; the other side's modules are left out (also of the saved LoRA), said once.
    model, te = tiny_dit(), tiny_qwen3()
    path = tmp_path / "both.safetensors"
    trained_network(model, te=[te]).save_weights(str(path), None, None)
    file_sd = load_file(str(path))
    for apply_te, skipped in ((False, "text encoder (Qwen3)"), (True, "DiT")):
        network = create_network(1.0, 4, 2.0, None, [te], model)
        network.apply_to([te], model, apply_text_encoder=apply_te, apply_unet=not apply_te)
        caplog.clear()
        assert network.load_weights(str(path)) == []
        assert f"{skipped} LoRA module(s) not loaded" in caplog.text
        kept = "lora_te_" if apply_te else "lora_unet_"
        sd = network.state_dict()
        assert sd and all(k.startswith(kept) and torch.equal(v, file_sd[k]) for k, v in sd.items())
    from_file, _ = create_network_from_weights(1.0, str(path), None, [te], model)
    caplog.clear()
    from_file.apply_to([te], model, apply_text_encoder=False, apply_unet=True)
    assert "text encoder (Qwen3) LoRA module(s) of the weights are dropped" in caplog.text
    assert all(k.startswith("lora_unet_") for k in from_file.state_dict())


@pytest.mark.parametrize("kwargs, apply_te, key", [
    ({"loraplus_text_encoder_lr_ratio": "4"}, False, "loraplus_text_encoder_lr_ratio"),
    ({"loraplus_unet_lr_ratio": "4"}, True, "loraplus_unet_lr_ratio"),
    ({"train_llm_adapter": "true"}, True, "train_llm_adapter"),
])
def test_network_args_of_a_side_that_is_not_trained_are_warned(caplog, kwargs, apply_te, key):
    model, te = tiny_dit(), tiny_qwen3()
    network = create_network(1.0, 4, 2.0, None, [te], model, **kwargs)
    network.apply_to([te], model, apply_text_encoder=apply_te, apply_unet=not apply_te)
    assert f"--network_args {key} has no effect" in caplog.text
    caplog.clear()
    create_network(1.0, 4, 2.0, None, [te], model, **kwargs).apply_to([te], model)
    assert "has no effect" not in caplog.text


def test_loaded_alpha_sets_the_forward_scale():
    model = tiny_dit()
    network = trained_network(model)
    sd = network.state_dict()
    sd = {k: (torch.tensor(4.0) if k.endswith(".alpha") else v) for k, v in sd.items()}
    other = create_network(1.0, 4, 2.0, None, None, model)
    other.load_lora_state_dict(sd)
    assert all(lora.scale == 1.0 for lora in other.unet_loras)
    other.load_state_dict(network.state_dict())  # plain torch loading refreshes the scale too
    assert all(lora.scale == 0.5 for lora in other.unet_loras)


def test_a_file_alpha_of_zero_means_alpha_equals_rank_as_for_a_new_network(tmp_path):
    model = tiny_dit()
    network = trained_network(model)
    sd = {k: (torch.tensor(0.0) if k.endswith(".alpha") else v) for k, v in network.state_dict().items()}
    path = tmp_path / "alpha0.pt"
    torch.save(sd, path)
    from_file, _ = create_network_from_weights(1.0, str(path), None, None, model)
    resumed = create_network(1.0, 4, 2.0, None, None, model)
    resumed.load_lora_state_dict(sd)
    for loaded in (from_file, resumed):
        assert all(float(lora.alpha) == 4.0 and lora.scale == 1.0 for lora in loaded.unet_loras)
        for lora in loaded.unet_loras:  # the update is up @ down unscaled, not zero
            up, down = sd[f"{lora.lora_name}.lora_up.weight"], sd[f"{lora.lora_name}.lora_down.weight"]
            torch.testing.assert_close(lora.delta_weight(), up @ down)


def test_load_errors_name_the_file_and_the_fix(tmp_path):
    model = tiny_dit()
    path = tmp_path / "rank8.safetensors"
    create_network(1.0, 8, 1.0, None, None, model).save_weights(str(path), None, None)
    network = create_network(1.0, 4, 1.0, None, None, model)
    with pytest.raises(AnimaError, match="rank8.safetensors.*--dim_from_weights"):
        network.load_weights(str(path))
    adapter = tmp_path / "adapter.safetensors"
    create_network(1.0, 4, 1.0, None, None, model, train_llm_adapter="true").save_weights(str(adapter), None, None)
    with pytest.raises(AnimaError, match="not part of this network"):
        network.load_weights(str(adapter))
    with pytest.raises(AnimaError, match="not found"):
        network.load_weights(str(tmp_path / "missing.safetensors"))


def test_weights_for_another_model_are_rejected(tmp_path):
    model = tiny_dit()
    sd = create_network(1.0, 4, 1.0, None, None, model).state_dict()
    sd["lora_unet_blocks_7_mlp_layer1.lora_down.weight"] = torch.zeros(4, 32)
    sd["lora_unet_blocks_7_mlp_layer1.lora_up.weight"] = torch.zeros(128, 4)
    with pytest.raises(AnimaError, match="blocks_7_mlp_layer1"):
        create_network_from_weights(1.0, None, None, None, model, weights_sd=sd)
    te_sd = create_network(1.0, 4, 1.0, None, [tiny_qwen3()], None).state_dict()
    with pytest.raises(AnimaError, match="no text encoder"):
        create_network_from_weights(1.0, None, None, None, model, weights_sd=te_sd)


def test_merge_to_bakes_the_update_into_base_weights():
    model = tiny_dit()
    network = trained_network(model)
    network.set_multiplier(0.5)
    network.apply_to(None, model)
    expected = dit_output(model)
    network.remove_hooks()
    weights = network.state_dict()
    merger, _ = create_network_from_weights(0.5, None, None, None, model, weights_sd=weights, for_inference=True)
    assert network.is_mergeable()
    merger.merge_to(None, model, weights, torch.float32, "cpu")
    torch.testing.assert_close(dit_output(model), expected, rtol=1e-5, atol=1e-5)


def test_dropouts_draw_the_same_masks_when_checkpointed_blocks_recompute():
    def lora_grads(checkpointing: bool) -> torch.Tensor:
        model = tiny_dit()
        network = create_network(1.0, 4, 1.0, None, None, model, rank_dropout="0.3", module_dropout="0.2")
        network.apply_to(None, model)
        randomize_up(network)
        if checkpointing:
            model.enable_gradient_checkpointing()
        model.train()
        network.on_epoch_start(None, model)
        torch.manual_seed(3)
        out = model(torch.randn(2, 16, 1, 4, 6), torch.tensor([0.2, 0.7]), torch.randn(2, 5, 16))
        out.square().mean().backward()
        grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in network.parameters()]
        return torch.cat([g.flatten() for g in grads])

    plain = lora_grads(False)
    assert plain.abs().max() > 0
    # Recomputation may reorder gradient sums, so compare within fp32 rounding; other masks differ by far more.
    torch.testing.assert_close(lora_grads(True), plain, rtol=1e-5, atol=1e-7)
