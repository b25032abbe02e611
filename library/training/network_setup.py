"""Building the trained network and its optimizer from the flags: `--base_weights` merged into the frozen models,
the LoRA (or LoKr/LoHa/LyCORIS) module created from `--network_module` / `--network_args` (or from
`--network_weights` with `--dim_from_weights`) and attached, `--network_weights` loaded, then the parameter groups
(per component learning rate, LoRA+) and the optimizer.

Both also run in the input check on weightless (meta-device) copies of the models, so that a bad network option,
file or optimizer fails in seconds rather than after caching."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

import torch

from library.errors import AnimaError
from library.training.reporting import logger
from networks import import_network_module
from networks.lora_format import load_lora_file


def split_network_args(items: list[str] | None) -> dict[str, str]:
    """`key=value` items of --network_args as strings (split at the first '='); the network module parses
    and checks the values (`networks.network_base.parse_network_args`)."""
    parsed: dict[str, str] = {}
    for item in items or []:
        if "=" not in item:
            raise AnimaError(f"--network_args {item!r}: expected key=value")
        key, value = item.split("=", 1)
        parsed[key.strip()] = value.strip()
    return parsed


def trains_text_encoder(args: argparse.Namespace) -> bool:
    """Whether the flags ask for LoRA training of the text encoder (it needs live text encoding)."""
    return not args.network_train_unet_only and not args.cache_text_encoder_outputs


def merge_base_weights(args: argparse.Namespace, network_module: Any, dit: torch.nn.Module,
                       text_encoders: list[torch.nn.Module], *, merge: bool, dtype: torch.dtype | None,
                       device: torch.device | None) -> None:
    """`--base_weights` (with `--base_weights_multiplier`): each file is read and matched against the models;
    with `merge` its weights are added into them (after that they are ordinary frozen weights)."""
    multipliers = args.base_weights_multiplier or []
    for i, path in enumerate(args.base_weights or []):
        multiplier = multipliers[i] if i < len(multipliers) else 1.0
        base_sd, _ = load_lora_file(path, flag="--base_weights")  # read here so that its errors name the flag
        merged, _ = network_module.create_network_from_weights(multiplier, path, None, text_encoders, dit,
                                                              weights_sd=base_sd, for_inference=True)
        if merge:
            logger.info("merging base weights %s (multiplier %s)", path, multiplier)
            merged.merge_to(text_encoders, dit, weights_sd=None, dtype=dtype, device=device)


def network_from_args(args: argparse.Namespace, dit: torch.nn.Module, text_encoders: list[torch.nn.Module], *,
                  merge: bool, dtype: torch.dtype | None = None,
                  device: torch.device | None = None) -> tuple[Any, dict[str, str]]:
    """The attached network (with --network_weights loaded) and the parsed --network_args. With `merge=False`
    (the input check on weightless models) --base_weights are only checked, and loading logs nothing."""
    network_module = import_network_module(args.network_module)
    merge_base_weights(args, network_module, dit, text_encoders, merge=merge, dtype=dtype, device=device)
    network_args = split_network_args(args.network_args)
    # network_args dropout=p (LyCORIS' key, which sd-scripts also fills from --network_dropout) wins.
    network_args.setdefault("dropout", args.network_dropout)
    if args.dim_from_weights:
        if not args.network_weights:
            raise AnimaError("--dim_from_weights needs --network_weights")
        # The file sets the modules, ranks and alphas; the other network_args (dropouts, LoRA+, reg_lrs) still
        # apply (sd-scripts' Anima LoRA drops them all without a word here).
        network, _ = network_module.create_network_from_weights(1.0, args.network_weights, None, text_encoders, dit,
                                                                **network_args)
    else:
        network = network_module.create_network(
            1.0, args.network_dim, args.network_alpha, None, text_encoders, dit,
            neuron_dropout=network_args["dropout"], **{k: v for k, v in network_args.items() if k != "dropout"})
    if network is None:
        raise AnimaError("the network module returned no network; check --network_args")
    network.check_save_format(args.lora_format)
    train_te = trains_text_encoder(args) and bool(text_encoders)
    network.apply_to(text_encoders, dit, train_te, not args.network_train_text_encoder_only)
    if args.network_weights and not args.dim_from_weights:
        info = network.load_weights(args.network_weights)
        if merge:
            logger.info("loaded network weights from %s: %s", args.network_weights, info)
    return network, network_args


@dataclass
class OptimizerSetup:
    optimizer: torch.optim.Optimizer
    trainable_params: list[torch.nn.Parameter]
    group_descriptions: list[str]  # one per parameter group: the `lr/<description>` log names
    text: str  # ss_optimizer: "module.Class(key=value,...)", or "module.Class" without --optimizer_args


def optimizer_from_args(args: argparse.Namespace, network: Any, component_lr_names: tuple[str, ...]) -> OptimizerSetup:
    """Parameter groups (per component `--<name>_lr` / LoRA+) and the optimizer; the parameters of lr-0 groups
    are frozen. Also runs on a meta-device network."""
    from library.training.optimizers import create_optimizer

    component_lrs = {name: getattr(args, f"{name}_lr") for name in component_lr_names}
    groups, descriptions = network.prepare_optimizer_params(
        args.text_encoder_lr, args.unet_lr, args.learning_rate, component_lrs)
    trained = {id(p) for g in groups for p in g["params"]}
    for p in network.parameters():
        p.requires_grad_(id(p) in trained)  # lr 0 groups were dropped: their parameters stay frozen
    if not trained:
        raise AnimaError("no LoRA parameter is trained: every learning rate is 0 or no module matched")
    name, args_text, optimizer = create_optimizer(
        args.optimizer_type, groups, args.learning_rate, args.optimizer_args,
        use_8bit_adam=args.use_8bit_adam, use_lion_optimizer=args.use_lion_optimizer)
    return OptimizerSetup(optimizer=optimizer, trainable_params=[p for p in network.parameters() if p.requires_grad],
                          group_descriptions=descriptions, text=name + (f"({args_text})" if args_text else ""))
