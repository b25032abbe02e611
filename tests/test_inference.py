"""anima_minimal_inference.py: renders PNGs with LoRAs on the tiny models (CPU), refuses LoRAs that do not fit."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import anima_minimal_inference
from library.models.dit import Anima
from library.models.dit_loading import load_anima_model
from library.models.qwen3 import load_qwen3_text_encoder
from library.models.tiny import tiny_dit_config
from networks.lora_anima import create_network
from networks.lora_format import save_lora_file

SIZE = ["--image_size", "64", "64", "--infer_steps", "2", "--flow_shift", "3.0", "--device", "cpu"]


def write_lora(dit, path: Path, seed: int, text_encoder=None, **network_args: str) -> Path:
    network = create_network(1.0, 4, 4.0, None, text_encoder, dit, **network_args)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lora in network.all_loras:
            lora.lora_up.weight.copy_(torch.randn(lora.lora_up.weight.shape, generator=generator) * 0.3)
    network.save_weights(str(path))
    network.remove_hooks()
    return path


@pytest.fixture(scope="module")
def setup_and_loras(tiny_setup, tmp_path_factory):
    folder = tmp_path_factory.mktemp("inference_loras")
    dit = load_anima_model(tiny_setup.dit).requires_grad_(False)
    qwen3 = load_qwen3_text_encoder(tiny_setup.qwen3_dir, dtype=torch.float32)
    first = write_lora(dit, folder / "first.safetensors", seed=1)
    # The second also adapts the LLM adapter and Qwen3, so both merge paths are exercised.
    second = write_lora(dit, folder / "second.safetensors", seed=2, text_encoder=qwen3, train_llm_adapter="true")
    assert any(k.startswith("lora_te_") for k in load_file(str(second)))
    return tiny_setup, first, second


def model_flags(setup, dit: Path | None = None) -> list[str]:
    return ["--dit", str(dit or setup.dit), "--vae", str(setup.vae), "--text_encoder", str(setup.qwen3_dir),
            "--t5_tokenizer_path", str(setup.t5_tokenizer_dir)]


def pngs(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.png"))


def pixels(path: Path) -> torch.Tensor:
    return torch.from_numpy(np.asarray(Image.open(path).convert("RGB"), dtype=np.float32))


def test_renders_a_png_with_two_loras_and_records_the_prompt(setup_and_loras, tmp_path):
    setup, first, second = setup_and_loras
    plain, with_loras = tmp_path / "plain", tmp_path / "loras"
    common = [*model_flags(setup), "--prompt", "a red circle", "--negative_prompt", "blurry", "--seed", "7", *SIZE,
              "--guidance_scale", "4.5"]
    assert anima_minimal_inference.main([*common, "--save_path", str(plain)]) == 0
    assert anima_minimal_inference.main([*common, "--save_path", str(with_loras), "--lora_weight", str(first),
                                         str(second), "--lora_multiplier", "1.0", "0.8", "--text_encoder_cpu"]) == 0
    [base_png], [lora_png] = pngs(plain), pngs(with_loras)
    image = Image.open(lora_png)
    assert image.size == (64, 64) and lora_png.name.endswith("_7.png")
    assert image.info["prompt"] == "a red circle" and image.info["negative_prompt"] == "blurry"
    assert image.info["seeds"] == "7" and image.info["infer_steps"] == "2" and image.info["guidance_scale"] == "4.5"
    assert (pixels(base_png) - pixels(lora_png)).abs().max() > 0  # the LoRAs change the picture


def test_a_loras_qwen3_part_changes_the_image_with_a_folder_text_encoder(setup_and_loras, tmp_path):
    """sd-scripts merges `lora_te_*` only into a single-file Qwen3; here a Hugging Face folder gets it too."""
    setup, _, second = setup_and_loras
    assert Path(setup.qwen3_dir).is_dir()
    text_only = tmp_path / "text_only.safetensors"
    save_file({k: v for k, v in load_file(str(second)).items() if k.startswith("lora_te_")}, str(text_only))
    common = [*model_flags(setup), "--prompt", "a red circle", "--seed", "3", *SIZE]
    assert anima_minimal_inference.main([*common, "--save_path", str(tmp_path / "plain")]) == 0
    assert anima_minimal_inference.main([*common, "--save_path", str(tmp_path / "te"), "--lora_weight",
                                         str(text_only)]) == 0
    [plain_png], [te_png] = pngs(tmp_path / "plain"), pngs(tmp_path / "te")
    assert (pixels(plain_png) - pixels(te_png)).abs().max() > 0


def test_refuses_a_lora_with_a_renamed_key_naming_it(setup_and_loras, tmp_path, capsys):
    setup, first, _ = setup_and_loras
    renamed = {k.replace("blocks_1_mlp_layer2", "blocks_1_mlp_layer9"): v for k, v in load_file(str(first)).items()}
    bad = tmp_path / "renamed.safetensors"
    save_lora_file(bad, renamed)
    out = tmp_path / "out"
    code = anima_minimal_inference.main([*model_flags(setup), "--prompt", "x", *SIZE, "--save_path", str(out),
                                         "--lora_weight", str(bad)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert err.startswith(f"error: --lora_weight {bad}") and "lora_unet_blocks_1_mlp_layer9" in err
    assert not out.exists()  # refused before anything was loaded or written


def test_include_and_exclude_patterns_select_lora_modules(setup_and_loras, tmp_path):
    setup, first, _ = setup_and_loras
    common = [*model_flags(setup), "--prompt", "a cat", "--seed", "3", *SIZE, "--lora_weight", str(first)]
    folders = {}
    for name, extra in {"none": ["--exclude_patterns", ".*"], "excluded": ["--exclude_patterns", "mlp"],
                        "included": ["--include_patterns", "attn"], "all": []}.items():
        folders[name] = tmp_path / name
        argv = [*common, *extra, "--save_path", str(folders[name])]
        if name == "none":
            assert anima_minimal_inference.main(argv) == 2  # nothing left to apply
            continue
        assert anima_minimal_inference.main(argv) == 0
    [excluded], [included], [full] = (pngs(folders[n]) for n in ("excluded", "included", "all"))
    torch.testing.assert_close(pixels(excluded), pixels(included), atol=1, rtol=0)  # attn = all but mlp
    assert (pixels(excluded) - pixels(full)).abs().max() > 0


def test_from_file_renders_each_line_with_the_command_line_as_defaults(setup_and_loras, tmp_path):
    setup, first, _ = setup_and_loras
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# comment\na blue square --d 5 --w 96\na green triangle --d 6 --g 1.0 --s 3\n")
    out = tmp_path / "batch"
    assert anima_minimal_inference.main([*model_flags(setup), "--from_file", str(prompts), *SIZE,
                                         "--save_path", str(out), "--lora_weight", str(first)]) == 0
    images = {Image.open(p).info["prompt"]: Image.open(p) for p in pngs(out)}
    assert images["a blue square"].size == (96, 64) and images["a blue square"].info["seeds"] == "5"
    assert images["a green triangle"].info["guidance_scale"] == "1.0"  # --g is the CFG scale, as upstream
    assert images["a green triangle"].info["infer_steps"] == "3"


def test_interactive_renders_each_console_line_as_the_same_image_as_a_prompt_run(setup_and_loras, tmp_path,
                                                                                 monkeypatch, capsys):
    setup, first, second = setup_and_loras
    common = [*model_flags(setup), *SIZE, "--lora_weight", str(first), str(second), "--guidance_scale", "4.5"]
    lines = "a red circle --d 7 --n blurry\n\n# a comment\na cat --zz 1\na blue square --d 5 --w 96 --s 3\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(lines))  # piped lines, as from a console
    assert anima_minimal_inference.main([*common, "--interactive", "--save_path", str(tmp_path / "live"),
                                         "--output_type", "latent_images"]) == 0
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "prompt 4" in errors[0] and "--zz" in errors[0]  # the bad line only, run goes on
    images = {Image.open(p).info["prompt"]: p for p in pngs(tmp_path / "live")}
    assert sorted(images) == ["a blue square", "a red circle"]
    assert len(list((tmp_path / "live").glob("*_latent.safetensors"))) == 2
    square = Image.open(images["a blue square"])
    assert square.size == (96, 64) and square.info["infer_steps"] == "3" and square.info["seeds"] == "5"
    # The same prompt given with --prompt renders the same picture.
    assert anima_minimal_inference.main([*common, "--prompt", "a red circle", "--negative_prompt", "blurry",
                                         "--seed", "7", "--save_path", str(tmp_path / "once")]) == 0
    [once] = pngs(tmp_path / "once")
    assert Image.open(images["a red circle"]).info["negative_prompt"] == "blurry"
    torch.testing.assert_close(pixels(images["a red circle"]), pixels(once), atol=1, rtol=0)


def test_interactive_ctrl_c_stops_one_image_and_reads_the_next_line(setup_and_loras, tmp_path, monkeypatch, capsys):
    setup, _, _ = setup_and_loras
    real_sample, calls = anima_minimal_inference.sample_latents, []

    def interrupted_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return real_sample(*args, **kwargs)

    monkeypatch.setattr(anima_minimal_inference, "sample_latents", interrupted_once)
    monkeypatch.setattr("sys.stdin", io.StringIO("first --d 1\nsecond --d 2\n"))
    out = tmp_path / "live"
    assert anima_minimal_inference.main([*model_flags(setup), *SIZE, "--interactive", "--save_path", str(out)]) == 0
    assert "interrupted" in capsys.readouterr().err
    assert [Image.open(p).info["prompt"] for p in pngs(out)] == ["second"]


def nan_for_prompts_containing(word: str, real_sample):
    def sample(dit, prompt, *args, **kwargs):
        latents = real_sample(dit, prompt, *args, **kwargs)
        return latents * float("nan") if word in prompt.prompt else latents
    return sample


def test_nan_latents_end_with_one_error_and_write_nothing(setup_and_loras, tmp_path, monkeypatch, capsys):
    setup, first, _ = setup_and_loras
    monkeypatch.setattr(anima_minimal_inference, "sample_latents",
                        nan_for_prompts_containing("cat", anima_minimal_inference.sample_latents))
    out = tmp_path / "out"
    assert anima_minimal_inference.main([*model_flags(setup), "--prompt", "a cat", *SIZE, "--save_path", str(out),
                                         "--lora_weight", str(first), "--output_type", "latent_images"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("error: prompt 0 ('a cat'): the DiT produced NaN/inf values in ")
    assert "--lora_weight" in err
    assert not out.exists() or not any(out.iterdir())


def test_interactive_nan_prompt_is_one_error_line_and_the_next_line_renders(setup_and_loras, tmp_path, monkeypatch,
                                                                           capsys):
    setup, _, _ = setup_and_loras
    monkeypatch.setattr(anima_minimal_inference, "sample_latents",
                        nan_for_prompts_containing("cat", anima_minimal_inference.sample_latents))
    monkeypatch.setattr("sys.stdin", io.StringIO("a cat --d 1\na dog --d 2\n"))
    out = tmp_path / "live"
    assert anima_minimal_inference.main([*model_flags(setup), *SIZE, "--interactive", "--save_path", str(out)]) == 0
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "NaN/inf" in errors[0]
    assert [Image.open(p).info["prompt"] for p in pngs(out)] == ["a dog"]


def test_latent_output_decodes_later_to_the_same_image(setup_and_loras, tmp_path):
    setup, _, _ = setup_and_loras
    out = tmp_path / "both"
    assert anima_minimal_inference.main([*model_flags(setup), "--prompt", "a cat", "--seed", "11", *SIZE,
                                         "--output_type", "latent_images", "--save_path", str(out)]) == 0
    [latent_file] = sorted(out.glob("*_latent.safetensors"))
    with safe_open(str(latent_file), "pt") as f:
        assert f.metadata()["seeds"] == "11" and f.get_tensor("latent").shape == (1, 16, 1, 8, 8)
    decoded = tmp_path / "decoded"
    assert anima_minimal_inference.main(["--vae", str(setup.vae), "--latent_path", str(latent_file),
                                         "--save_path", str(decoded), "--device", "cpu", "--no_metadata",
                                         "--vae_chunk_size", "4", "--vae_disable_cache"]) == 0
    [original], [again] = pngs(out), pngs(decoded)
    assert "prompt" not in Image.open(again).info  # --no_metadata
    torch.testing.assert_close(pixels(again), pixels(original), atol=2, rtol=0)  # chunked decode


def randomized_network(network, seed: int):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in network.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return network


def test_lokr_and_loha_files_render_natively_and_lycoris_files_with_the_lycoris_flag(tiny_setup, tmp_path):
    from networks import loha, lokr

    dit = load_anima_model(tiny_setup.dit).requires_grad_(False)
    qwen3 = load_qwen3_text_encoder(tiny_setup.qwen3_dir, dtype=torch.float32)
    native = {}
    for name, module in (("lokr", lokr), ("loha", loha)):
        network = randomized_network(module.create_network(1.0, 4, 2.0, None, [qwen3], dit), seed=5)
        native[name] = tmp_path / f"{name}.safetensors"
        network.save_weights(str(native[name]))
        network.remove_hooks()
    common = [*model_flags(tiny_setup), "--prompt", "a cat", "--seed", "2", *SIZE]
    assert anima_minimal_inference.main([*common, "--save_path", str(tmp_path / "plain")]) == 0
    assert anima_minimal_inference.main([*common, "--save_path", str(tmp_path / "native"), "--lora_weight",
                                         str(native["lokr"]), str(native["loha"])]) == 0
    [plain], [with_native] = pngs(tmp_path / "plain"), pngs(tmp_path / "native")
    assert (pixels(with_native) - pixels(plain)).abs().max() > 0

    lycoris = pytest.importorskip("networks.lycoris_kohya", exc_type=Exception)
    network = lycoris.create_network(1.0, 4, 2.0, None, [qwen3], dit, algo="lokr", factor="4")
    network.apply_to([qwen3], dit)
    randomized_network(network, seed=6)
    network.remove_hooks()
    lyco_file = tmp_path / "lycoris_lokr.safetensors"
    network.save_weights(str(lyco_file))
    for folder, extra in (("lyco", ["--lycoris"]), ("lyco_native", [])):  # LyCORIS' LoKr reads natively too
        assert anima_minimal_inference.main([*common, "--save_path", str(tmp_path / folder), "--lora_weight",
                                             str(lyco_file), *extra]) == 0
    [through_lycoris], [through_native] = pngs(tmp_path / "lyco"), pngs(tmp_path / "lyco_native")
    assert (pixels(through_lycoris) - pixels(plain)).abs().max() > 0
    torch.testing.assert_close(pixels(through_native), pixels(through_lycoris), atol=2, rtol=0)


def test_fp8_storage_renders_close_to_the_full_precision_image(setup_and_loras, tmp_path):
    setup, first, _ = setup_and_loras
    common = [*model_flags(setup), "--prompt", "a cat", "--seed", "4", *SIZE, "--lora_weight", str(first)]
    images = {}
    for name, extra in (("plain", []), ("fp8", ["--fp8"]), ("fp8_scaled", ["--fp8_scaled"])):
        assert anima_minimal_inference.main([*common, *extra, "--save_path", str(tmp_path / name)]) == 0
        [images[name]] = pngs(tmp_path / name)
    for name in ("fp8", "fp8_scaled"):
        difference = (pixels(images[name]) - pixels(images["plain"])).abs()
        assert 0 < difference.mean() < 3  # float8 weights change the picture a little, not wholesale

    args = anima_minimal_inference.build_parser().parse_args([*common, "--fp8_scaled", "--save_path", "x"])
    anima_minimal_inference.check_args(args)
    loras = anima_minimal_inference.read_loras(args)
    dit = anima_minimal_inference.load_dit(args, loras, torch.device("cpu"))
    stored = {name for name, p in dit.named_parameters() if p.dtype == torch.float8_e4m3fn}
    assert stored and all(".self_attn." in n or ".cross_attn." in n or ".mlp." in n for n in stored)
    assert all(n.startswith("blocks.") for n in stored)


def test_block_swap_renders_the_same_image_as_the_resident_dit(tiny_setup, tmp_path):
    config = tiny_dit_config()
    config.num_blocks = 4  # the released layout with enough blocks to swap two of them
    with torch.device("meta"):
        shapes = Anima(config).state_dict()
    generator = torch.Generator().manual_seed(0)
    state = {f"net.{k}": torch.randn(v.shape, generator=generator) * 0.05 for k, v in shapes.items()}
    dit = tmp_path / "dit4.safetensors"
    save_file(state, str(dit), metadata={"format": "pt"})
    common = [*model_flags(tiny_setup, dit), "--prompt", "a cat", "--seed", "1", *SIZE]
    assert anima_minimal_inference.main([*common, "--save_path", str(tmp_path / "resident")]) == 0
    assert anima_minimal_inference.main([*common, "--save_path", str(tmp_path / "swap"), "--blocks_to_swap", "2"]) == 0
    [resident], [swapped] = pngs(tmp_path / "resident"), pngs(tmp_path / "swap")
    torch.testing.assert_close(pixels(swapped), pixels(resident), atol=1, rtol=0)


@pytest.mark.parametrize(("extra", "message"), [
    (["--lora_multiplier", "1", "2"], "--lora_multiplier has 2 values"),
    (["--prompt", "x", "--from_file", "p.txt"], "exclude each other"),
    (["--blocks_to_swap", "1"], "at most 0 can be swapped"),
    (["--attn_mode", "flash"], "flash"),
    (["--fp8", "--fp8_scaled"], "--fp8 and --fp8_scaled"),
    (["--interactive"], "--interactive reads the prompts from the console; leave out --prompt"),
])
def test_bad_command_lines_end_with_one_error_line(setup_and_loras, tmp_path, capsys, extra, message):
    setup, first, _ = setup_and_loras
    (tmp_path / "p.txt").write_text("a cat\n")
    argv = [*model_flags(setup), *SIZE, "--save_path", str(tmp_path / "o"), "--lora_weight", str(first)]
    if "--prompt" not in extra:
        argv += ["--prompt", "x"]
    extra = [str(tmp_path / "p.txt") if e == "p.txt" else e for e in extra]
    assert anima_minimal_inference.main([*argv, *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


def test_help_lists_the_upstream_flags():
    options = {o for action in anima_minimal_inference.build_parser()._actions for o in action.option_strings}
    upstream = {"--dit", "--vae", "--text_encoder", "--lora_weight", "--lora_multiplier", "--lycoris",
                "--include_patterns", "--exclude_patterns", "--prompt", "--negative_prompt", "--image_size",
                "--infer_steps", "--guidance_scale", "--flow_shift", "--seed", "--save_path", "--output_type",
                "--from_file", "--fp8", "--fp8_scaled", "--attn_mode", "--vae_chunk_size", "--vae_disable_cache",
                "--text_encoder_cpu", "--device", "--latent_path", "--no_metadata", "--interactive"}
    assert upstream <= options
    assert {"--t5_tokenizer_path", "--qwen3_tokenizer_path", "--blocks_to_swap"} <= options


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_bf16_render_on_cuda_is_close_to_the_float32_cpu_render(setup_and_loras, tmp_path):
    setup, first, second = setup_and_loras
    common = [*model_flags(setup), "--prompt", "a red circle", "--seed", "7", "--image_size", "64", "64",
              "--infer_steps", "2", "--lora_weight", str(first), str(second)]
    assert anima_minimal_inference.main([*common, "--device", "cpu", "--save_path", str(tmp_path / "cpu")]) == 0
    assert anima_minimal_inference.main([*common, "--device", "cuda", "--save_path", str(tmp_path / "cuda")]) == 0
    [cpu], [cuda] = pngs(tmp_path / "cpu"), pngs(tmp_path / "cuda")
    assert (pixels(cuda) - pixels(cpu)).abs().mean() < 8  # bf16 weights and activations vs float32
