"""Network modules for ``--network_module``: the names the trainer accepts and how each is imported."""

from __future__ import annotations

import importlib
from types import ModuleType

from library.errors import AnimaError

LORA_MODULE = "networks.lora_anima"
LOKR_MODULE = "networks.lokr"
LOHA_MODULE = "networks.loha"
LYCORIS_MODULE = "lycoris.kohya"
# --network_module value -> the module that implements it here. LyCORIS' own `lycoris.kohya` goes through
# an adapter that fits it to this trainer's network API (and checks its network_args).
NETWORK_MODULES = {
    LORA_MODULE: LORA_MODULE,
    LOKR_MODULE: LOKR_MODULE,
    LOHA_MODULE: LOHA_MODULE,
    LYCORIS_MODULE: "networks.lycoris_kohya",
}


def check_network_module(name: str) -> None:
    if name not in NETWORK_MODULES:
        hint = f" (sd-scripts' SD LoRA; Anima's is {LORA_MODULE})" if name == "networks.lora" else ""
        raise AnimaError(f"--network_module {name}{hint}: supported modules are {', '.join(NETWORK_MODULES)}")


def import_network_module(name: str) -> ModuleType:
    """The implementation of ``--network_module name`` (AnimaError for an unknown name or a missing library)."""
    check_network_module(name)
    return importlib.import_module(NETWORK_MODULES[name])
