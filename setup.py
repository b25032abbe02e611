from setuptools import find_packages, setup

with open("requirements.txt", encoding="utf-8") as f:
    requirements = [line.strip() for line in f if line.strip() and not line.startswith("#")]

setup(
    name="anima-trainer",
    version="0.1.0",
    description="LoRA trainer for the Anima image model, compatible with sd-scripts flags, dataset TOML and LoRA files",
    python_requires=">=3.10",
    packages=find_packages(include=["library", "library.*", "networks", "networks.*"]),
    py_modules=["train_network", "anima_train_network"],
    install_requires=requirements,
    extras_require={
        # LyCORIS for --network_module lycoris.kohya (its own dependencies are ours already).
        "lycoris": ["lycoris-lora>=4.1.3"],
        # wandb for --log_with wandb (an optional tracker).
        "wandb": ["wandb>=0.17"],
        # The tests also run the optional LyCORIS and wandb (offline) paths.
        "test": ["pytest>=8", "ruff>=0.6", "lycoris-lora>=4.1.3", "wandb>=0.17"],
    },
)
