"""bench/bench_sd_scripts_parity.py: what can be checked without an sd-scripts checkout."""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import toml
import torch
from safetensors import safe_open

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "bench"))

import bench_sd_scripts_parity as parity  # noqa: E402

torch.set_num_threads(1)


def test_parity_tool_does_not_import_the_project_library_at_module_level():
    # In the sd-scripts process ``library`` must resolve to sd-scripts' own package.
    code = "import sys; import bench_sd_scripts_parity; print(sorted({'library', 'networks'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT / "bench", capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"


def test_parity_tool_tiny_sizes_match_the_tiny_checkpoint(tmp_path):
    from library.models.tiny import write_tiny_anima_setup

    setup = write_tiny_anima_setup(tmp_path / "tiny", num_images=1)
    sizes = parity.tiny_sizes()
    with safe_open(setup.dit, "pt") as f:
        shape = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    dit, adapter = sizes["dit"], sizes["adapter"]
    assert shape["net.x_embedder.proj.1.weight"][0] == dit["model_channels"]
    assert shape["net.blocks.0.adaln_modulation_self_attn.1.weight"][0] == dit["adaln_lora_dim"]
    assert shape["net.blocks.0.cross_attn.k_proj.weight"][1] == dit["crossattn_emb_channels"]
    assert max(int(k.split(".")[2]) for k in shape if k.startswith("net.blocks.")) + 1 == dit["num_blocks"]
    assert shape["net.llm_adapter.blocks.0.cross_attn.k_proj.weight"][1] == adapter["source_dim"]
    assert shape["net.llm_adapter.out_proj.weight"] == (adapter["target_dim"], adapter["model_dim"])
    assert max(int(k.split(".")[3]) for k in shape if k.startswith("net.llm_adapter.blocks.")) + 1 == adapter[
        "num_layers"]
    with safe_open(setup.vae, "pt") as f:
        first_conv = [k for k in f.keys() if k.startswith("encoder.conv_in") and k.endswith("weight")][0]
        assert f.get_slice(first_conv).get_shape()[0] == sizes["vae_base_dim"]


def test_parity_tool_batch_two_dataset_holds_two_copies_of_one_image(tmp_path):
    from library.models.tiny import write_tiny_anima_setup

    write_tiny_anima_setup(tmp_path / "tiny", num_images=2)
    tomls = parity._write_datasets(tmp_path)
    for name, count in (("one", 1), ("two", 2)):
        config = toml.load(tomls[name])
        assert config["datasets"][0]["batch_size"] == count
        images = sorted(Path(config["datasets"][0]["subsets"][0]["image_dir"]).glob("*.png"))
        assert len(images) == count and len({p.read_bytes() for p in images}) == 1


def test_parity_tool_step_probe_replays_the_saved_generator_state(tmp_path):
    # The alignment the tool rests on: the loading side draws what the saving side drew at each call.
    def make_trainer():
        return types.SimpleNamespace(step=lambda self: torch.rand(3))

    saver, loader = make_trainer(), make_trainer()
    parity._wrap_step(saver, "step", tmp_path, save=True)
    parity._wrap_step(loader, "step", tmp_path, save=False)
    torch.manual_seed(1)
    saved = [saver.step(None) for _ in range(3)]
    torch.manual_seed(2)
    replayed = [loader.step(None) for _ in range(3)]
    assert all(torch.equal(a, b) for a, b in zip(saved, replayed))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step0.pt", "step1.pt", "step2.pt"]


def test_parity_tool_refuses_a_folder_without_the_upstream_trainer(tmp_path, capsys):
    assert parity.main(["--sd_scripts", str(tmp_path), "--work", str(tmp_path / "work")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --sd_scripts") and "anima_train_network.py" in err[0]
    assert not (tmp_path / "work").exists()


def test_parity_tool_matches_sample_images_by_step_prompt_and_seed_and_counts_levels(tmp_path):
    import numpy as np
    from PIL import Image

    theirs, ours = tmp_path / "theirs", tmp_path / "ours"
    theirs.mkdir()
    ours.mkdir()
    image = np.zeros((4, 4, 3), dtype=np.uint8)
    Image.fromarray(image).save(theirs / "lora_000001_00_20261203101010_7.png")
    changed = image.copy()
    changed[0, 0, 0] = 3
    Image.fromarray(changed).save(ours / "lora_000001_00_20261203101111_7.png")  # other time stamp, same image
    Image.fromarray(image).save(ours / "lora_000002_00_20261203101111_7.png")  # only one side
    result = parity.compare_samples(theirs, ours)
    assert result == {"lora_000001_00_7": [3, 1 / 48]}


def test_parity_tool_cuda_layer_norm_patch_gives_float32_under_cpu_autocast(monkeypatch):
    import torch.nn.functional as F

    monkeypatch.setattr(F, "layer_norm", F.layer_norm)  # restored after the test
    x = torch.randn(2, 8).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert F.layer_norm(x, (8,)).dtype == torch.bfloat16  # CPU autocast's own policy
        parity._layer_norm_as_under_cuda_autocast()
        out = F.layer_norm(x, (8,))
    assert out.dtype == torch.float32
    assert torch.equal(out, F.layer_norm(x.float(), (8,)))
    assert F.layer_norm(x, (8,)).dtype == torch.bfloat16  # outside autocast: untouched


def test_parity_tool_full_size_datasets_are_256_pixel_copies_of_one_image(tmp_path):
    from PIL import Image

    images = tmp_path / "full" / "images"
    images.mkdir(parents=True)
    for i in range(2):
        Image.new("RGB", (256, 256), (i * 100, 0, 0)).save(images / f"img_{i}.png")
        (images / f"img_{i}.txt").write_text(f"caption {i}\n", encoding="utf-8")
    tomls = parity._write_datasets(tmp_path, at_full_size=True)
    for name, count in (("one", 1), ("two", 2)):
        config = toml.load(tomls[name])
        dataset = config["datasets"][0]
        assert (dataset["resolution"], dataset["batch_size"], dataset["enable_bucket"]) == (256, count, False)
        copies = sorted(Path(dataset["subsets"][0]["image_dir"]).glob("*"))
        assert [p.read_bytes() for p in copies if p.suffix == ".png"] == [(images / "img_0.png").read_bytes()] * count
        assert {p.read_text() for p in copies if p.suffix == ".txt"} == {"caption 0\n"}


def test_parity_tool_full_size_flags_parse_with_the_released_token_lengths(tmp_path):
    from library.training.args import setup_parser

    flags = parity.full_size_flags(tmp_path, tmp_path / "dataset.toml")
    args = setup_parser().parse_args([*flags, "--qwen3_tokenizer_path", "q", "--output_dir", str(tmp_path)])
    assert (args.network_dim, args.mixed_precision, args.qwen3_max_token_length) == (16, "no", 512)
    assert "--qwen3_tokenizer_path" not in flags  # not an sd-scripts flag: only this trainer's side gets it


def test_parity_tool_full_size_refuses_a_tokenizer_folder_without_qwen3(tmp_path, capsys):
    checkout = tmp_path / "sds"
    checkout.mkdir()
    (checkout / "anima_train_network.py").write_text("", encoding="utf-8")
    (tmp_path / "tok" / "t5_old").mkdir(parents=True)
    code = parity.main(["--sd_scripts", str(checkout), "--work", str(tmp_path / "work"), "--full_size",
                        "--tokenizers", str(tmp_path / "tok")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: --tokenizers") and "qwen3_06b/" in err[0]
    assert not (tmp_path / "work" / "full").exists()


def test_parity_tool_lora_differences_give_the_largest_and_the_root_sum_square(tmp_path):
    from safetensors.torch import save_file

    a = {"x.lora_down.weight": torch.zeros(2, 3), "x.alpha": torch.tensor(4.0)}
    b = {"x.lora_down.weight": torch.tensor([[0.0, 3e-3, 0.0], [0.0, 0.0, -4e-3]]), "x.alpha": torch.tensor(4.0)}
    save_file(a, str(tmp_path / "a.safetensors"))
    save_file(b, str(tmp_path / "b.safetensors"))
    largest, rss = parity.lora_differences(tmp_path / "a.safetensors", tmp_path / "b.safetensors")
    assert abs(largest - 4e-3) < 1e-9 and abs(rss - 5e-3) < 1e-9


def test_parity_tool_inference_prompt_parses_and_has_at_least_512_image_tokens(tmp_path):
    # Below 512 image tokens sd-scripts' inference script (always split_attn) cuts the cross-attention keys, so
    # the comparison would measure that instead of the two samplers.
    import anima_minimal_inference

    args = anima_minimal_inference.build_parser().parse_args(
        ["--vae", "v", "--save_path", str(tmp_path), *parity.INFERENCE_FLAGS])
    height, width = args.image_size
    assert (height // 16) * (width // 16) >= 512  # VAE stride 8, patch 2
    assert args.guidance_scale != 1 and args.negative_prompt and args.seed is not None


def test_parity_tool_random_lora_has_nonzero_up_weights_on_every_dit_module(tmp_path):
    from safetensors.torch import load_file

    from library.models.tiny import write_tiny_anima_setup

    setup = write_tiny_anima_setup(tmp_path / "tiny", num_images=1)
    parity.write_random_lora(Path(setup.dit), tmp_path / "lora.safetensors")
    state = load_file(tmp_path / "lora.safetensors")
    ups = {k: v for k, v in state.items() if k.endswith("lora_up.weight")}
    assert ups and all(k.startswith("lora_unet_") for k in state)
    assert all(v.abs().max() > 0 for v in ups.values())
    assert {k.removesuffix(".lora_up.weight") for k in ups} == {
        k.removesuffix(".lora_down.weight") for k in state if k.endswith("lora_down.weight")}
