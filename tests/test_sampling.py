"""Sample-prompt parsing, the Euler flow sampler and sample-image writing."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from library.errors import AnimaError
from library.training.sampling import (
    CachedPromptEncodings,
    SamplePrompt,
    encode_prompt_contexts,
    euler_flow_sample,
    generate_sample_images,
    load_sample_prompts,
    prompt_texts,
    sample_image_filename,
)

# ---------------------------------------------------------------------------------------------------------------
# Prompt files


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_txt_line_with_every_option_is_parsed_rounded_and_clamped(tmp_path):
    path = _write(tmp_path, "p.txt", "a cat --n lowres, bad --w 1000 --h 777 --d 42 --s 2000 --l 4.5 --fs 2.5\n")
    [p] = load_sample_prompts(path)
    assert p == SamplePrompt(index=0, prompt="a cat", negative_prompt="lowres, bad", width=992, height=768,
                             seed=42, sample_steps=1000, scale=4.5, flow_shift=2.5)


def test_txt_defaults_comments_blank_lines_and_case_insensitive_options(tmp_path):
    path = _write(tmp_path, "p.txt", "# a comment\n\nfirst prompt\n  second --W 256 --H 100 --S 0\n")
    first, second = load_sample_prompts(path)
    assert first == SamplePrompt(index=0, prompt="first prompt")
    assert (first.width, first.height, first.sample_steps, first.scale, first.flow_shift, first.seed) == (
        512, 512, 30, 7.5, 3.0, None)
    assert first.negative_prompt == ""
    assert (second.index, second.prompt, second.width, second.height, second.sample_steps) == (1, "second", 256, 96, 1)


def test_side_below_minimum_becomes_64(tmp_path):
    [p] = load_sample_prompts(_write(tmp_path, "p.txt", "x --w 20 --h 70\n"))
    assert (p.width, p.height) == (64, 64)


def test_ignored_options_of_other_models_are_accepted(tmp_path):
    [p] = load_sample_prompts(_write(tmp_path, "p.txt", "x --g 3.5 --ss euler --ctr 0.5 --rcfg 1 --cn img.png\n"))
    assert p.prompt == "x" and p.scale == 7.5


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("a cat --w wide", "width must be an integer"),
        ("a cat --l high", "scale must be a number"),
        ("a cat --fs nan", "flow_shift must be a finite number"),
        ("a cat --fs 0", "flow_shift must be > 0"),
        ("a cat --zz 3", "unknown sample option '--zz 3'"),
        ("a cat --d", "option --d needs a value"),
        (" --w 512", "prompt text is missing"),
    ],
)
def test_bad_txt_line_names_file_and_line(tmp_path, line, message):
    path = _write(tmp_path, "p.txt", f"# header\n{line}\n")
    with pytest.raises(AnimaError, match=re.escape(message)) as err:
        load_sample_prompts(path)
    assert f"{path}:2" in str(err.value)


def test_toml_subsets_merge_over_shared_keys(tmp_path):
    path = _write(tmp_path, "p.toml", """
[prompt]
width = 256
height = 320
sample_steps = 12
negative_prompt = "blurry"

[[prompt.subset]]
prompt = "a dog"
seed = 7

[[prompt.subset]]
prompt = "a fox"
width = 128
scale = 1.0
flow_shift = 1
""")
    a, b = load_sample_prompts(path)
    assert a == SamplePrompt(index=0, prompt="a dog", negative_prompt="blurry", width=256, height=320, seed=7,
                             sample_steps=12)
    assert b == SamplePrompt(index=1, prompt="a fox", negative_prompt="blurry", width=128, height=320,
                             sample_steps=12, scale=1.0, flow_shift=1.0)


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("a cat   --n  low res  --w 768", {"prompt": "a cat", "negative_prompt": "low res", "width": 768}),
        ("a cat --w\t768 --h   832", {"width": 768, "height": 832}),
        ("a cat --l 1e1", {"scale": 10.0}),
        ("a cat --l -2", {"scale": -2.0}),
        ("n foo --w 768", {"prompt": "n foo", "negative_prompt": "", "width": 768}),
        ("s 7 stairs", {"prompt": "s 7 stairs", "sample_steps": 30}),
    ],
)
def test_txt_options_are_read_whole_after_any_spaces_and_never_from_the_prompt_text(tmp_path, line, expected):
    [p] = load_sample_prompts(_write(tmp_path, "p.txt", f"  # an indented comment\n{line}\n"))
    assert {key: getattr(p, key) for key in expected} == expected


def test_toml_subset_value_wins_over_the_shared_one_and_json_steps_are_clamped(tmp_path):
    [p] = load_sample_prompts(_write(tmp_path, "p.toml", '[prompt]\nwidth = 768\n[[prompt.subset]]\nprompt = "a"\n'
                                                          "width = 512\n"))
    assert p.width == 512
    low, high = load_sample_prompts(_write(tmp_path, "p.json", json.dumps(
        [{"prompt": "a", "sample_steps": 0}, {"prompt": "b", "sample_steps": 2000}])))
    assert (low.sample_steps, high.sample_steps) == (1, 1000)


def test_toml_unknown_key_and_missing_subset_are_errors(tmp_path):
    bad_key = _write(tmp_path, "a.toml", '[prompt]\n[[prompt.subset]]\nprompt = "x"\nwidht = 5\n')
    with pytest.raises(AnimaError, match=r"a\.toml: prompt\.subset\[0\].*unknown sample prompt key.*widht"):
        load_sample_prompts(bad_key)
    no_subset = _write(tmp_path, "b.toml", '[prompt]\nwidth = 64\n')
    with pytest.raises(AnimaError, match=r"b\.toml.*no \[\[prompt\.subset\]\]"):
        load_sample_prompts(no_subset)


def test_json_dicts_and_strings(tmp_path):
    items = [
        {"prompt": "red square", "negative_prompt": "noise", "width": 128, "height": 64, "seed": 3,
         "sample_steps": 5, "scale": 2.0, "flow_shift": "2.0"},
        "blue circle --d 9 --s 4",
    ]
    a, b = load_sample_prompts(_write(tmp_path, "p.json", json.dumps(items)))
    assert a == SamplePrompt(index=0, prompt="red square", negative_prompt="noise", width=128, height=64, seed=3,
                             sample_steps=5, scale=2.0, flow_shift=2.0)
    assert b == SamplePrompt(index=1, prompt="blue circle", seed=9, sample_steps=4)


def test_json_bad_value_names_the_item(tmp_path):
    path = _write(tmp_path, "p.json", json.dumps([{"prompt": "ok"}, {"prompt": "x", "seed": True}]))
    with pytest.raises(AnimaError, match=r"p\.json: item 1: seed must be an integer"):
        load_sample_prompts(path)


def test_missing_file_wrong_suffix_and_empty_file_are_errors(tmp_path):
    with pytest.raises(AnimaError, match="--sample_prompts: file not found"):
        load_sample_prompts(tmp_path / "nope.txt")
    with pytest.raises(AnimaError, match=r"must end in \.txt, \.toml or \.json"):
        load_sample_prompts(_write(tmp_path, "p.yaml", "x"))
    with pytest.raises(AnimaError, match="contains no prompts"):
        load_sample_prompts(_write(tmp_path, "e.txt", "# only a comment\n"))


def test_prompt_texts_lists_each_distinct_text_once():
    prompts = [SamplePrompt(0, "a", "n"), SamplePrompt(1, "b", ""), SamplePrompt(2, "a", "")]
    assert prompt_texts(prompts) == ["a", "n", "b", ""]


def test_sample_image_filename_for_step_and_epoch():
    assert sample_image_filename("lora", 120, None, 3, 42, "20260101120000") == "lora_000120_03_20260101120000_42.png"
    assert sample_image_filename(None, 5, 0, 0, None, "20260101120000") == "e000000_00_20260101120000.png"


# ---------------------------------------------------------------------------------------------------------------
# Euler loop


class _LinearVelocity(torch.nn.Module):
    """v = a * x + b * t + mean(context): cheap, non-trivial, and depends on every input."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(0.3))
        self.b = torch.nn.Parameter(torch.tensor(-0.7))
        self.calls: list[tuple[float, float]] = []

    def forward(self, x, t, context, padding_mask=None):
        assert padding_mask is not None and padding_mask.shape == (x.shape[0], 1, x.shape[3], x.shape[4])
        assert not padding_mask.any()
        self.calls.append((float(t[0]), float(context.mean())))
        return self.a * x + self.b * t.view(-1, 1, 1, 1, 1) + context.mean(dim=(1, 2)).view(-1, 1, 1, 1, 1)


def test_euler_two_steps_with_cfg_equals_hand_computation():
    model = _LinearVelocity()
    noise = torch.randn(1, 16, 1, 2, 3, generator=torch.Generator().manual_seed(0))
    pos, neg = torch.full((1, 4, 8), 0.5), torch.full((1, 4, 8), -0.25)
    sigmas = torch.tensor([1.0, 0.6, 0.0])
    scale = 4.0

    def v(x, t, c):
        return 0.3 * x - 0.7 * t + c

    x = noise.clone()
    for s0, s1 in ((1.0, 0.6), (0.6, 0.0)):
        v_pos, v_neg = v(x, s0, 0.5), v(x, s0, -0.25)
        x = x + (v_neg + scale * (v_pos - v_neg)) * (s1 - s0)

    with torch.no_grad():
        out = euler_flow_sample(model, noise, sigmas, pos, neg, scale)
    torch.testing.assert_close(out, x, rtol=1e-6, atol=1e-6)
    flat_calls = [value for call in model.calls for value in call]
    assert flat_calls == pytest.approx([1.0, 0.5, 1.0, -0.25, 0.6, 0.5, 0.6, -0.25])


def test_euler_without_cfg_makes_one_pass_per_step():
    model = _LinearVelocity()
    noise = torch.randn(1, 16, 1, 2, 2, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        euler_flow_sample(model, noise, torch.tensor([1.0, 0.5, 0.0]), torch.zeros(1, 2, 4),
                          torch.ones(1, 2, 4), scale=1.0)
    assert len(model.calls) == 2


def test_cfg_runs_below_one_for_inference_and_only_above_one_for_training_samples():
    class Encoder:
        def encode(self, captions):
            return {"qwen3_embeds": torch.ones(1, 2, 4), "qwen3_mask": torch.ones(1, 2), "t5_ids": torch.ones(1, 2),
                    "t5_mask": torch.ones(1, 2)}

    class Model:
        def encode_text(self, embeds, mask, ids, ids_mask):
            return embeds

    def negative(scale, **kwargs):
        prompt = SamplePrompt(0, "a", "b", width=64, height=64, seed=1, sample_steps=1, scale=scale)
        return encode_prompt_contexts(Model(), Encoder(), prompt, torch.device("cpu"), torch.float32, **kwargs)[1]

    assert negative(0.5) is None and negative(1.0) is None and negative(2.0) is not None  # sd-scripts' trainer
    assert negative(0.5, guidance_below_one=True) is not None  # sd-scripts' inference script
    assert negative(1.0, guidance_below_one=True) is None
    model = _LinearVelocity()
    with torch.no_grad():
        euler_flow_sample(model, torch.zeros(1, 16, 1, 2, 2), torch.tensor([1.0, 0.0]), torch.zeros(1, 2, 4),
                          torch.ones(1, 2, 4), scale=0.5)
    assert len(model.calls) == 2  # one step, conditional and negative pass


# ---------------------------------------------------------------------------------------------------------------
# generate_sample_images with stand-in components (fast, no checkpoints)


class _StandInDiT(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 16)
        self.dropout = torch.nn.Dropout(0.5)

    def encode_text(self, qwen3_embeds, qwen3_mask, t5_ids, t5_mask):
        return qwen3_embeds * qwen3_mask[..., None]

    def forward(self, x, t, context, padding_mask=None):
        bias = self.proj(context.mean(dim=1))  # [B, 16]
        return x * (1 - t.view(-1, 1, 1, 1, 1)) + bias.view(-1, 16, 1, 1, 1)


class _StandInVAE(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.mix = torch.nn.Conv2d(16, 3, 1)

    def decode_latents_to_pixels(self, z):
        return torch.tanh(torch.nn.functional.interpolate(self.mix(z), scale_factor=8.0))


def _fake_encodings(texts: list[str], width: int) -> CachedPromptEncodings:
    gen = torch.Generator().manual_seed(5)
    encodings = {}
    for text in texts:
        mask = torch.zeros(1, 6, dtype=torch.long)
        mask[0, : max(len(text.split()), 1) if text else 0] = 1
        encodings[text] = {
            "qwen3_embeds": torch.randn(1, 6, width, generator=gen) * mask[..., None],
            "qwen3_mask": mask,
            "t5_ids": torch.tensor([[5, 6, 1, 0, 0, 0, 0, 0]]),
            "t5_mask": torch.tensor([[1, 1, 1, 0, 0, 0, 0, 0]]),
        }
    return CachedPromptEncodings(encodings)


def test_generate_writes_named_pngs_and_restores_mode_and_rng(tmp_path):
    torch.manual_seed(0)
    model, vae = _StandInDiT(), _StandInVAE()
    model.train()
    model.dropout.eval()  # a mixed state must come back exactly as it was
    prompts = [SamplePrompt(0, "a cat", "", width=64, height=96, seed=1, sample_steps=3),
               SamplePrompt(1, "a dog", "bad", width=80, height=64, seed=None, sample_steps=2, scale=1.0)]
    encoder = _fake_encodings(prompt_texts(prompts), 8)

    rng_before = torch.random.get_rng_state()
    written = generate_sample_images(model, vae, encoder, prompts, output_dir=tmp_path, output_name="run", step=7)
    assert [prompt for _, prompt in written] == prompts
    paths = [path for path, _ in written]

    assert torch.equal(torch.random.get_rng_state(), rng_before)
    assert model.training and model.proj.training and not model.dropout.training
    assert [p.parent for p in paths] == [tmp_path / "sample"] * 2
    assert re.fullmatch(r"run_000007_00_\d{14}_1\.png", paths[0].name)
    assert re.fullmatch(r"run_000007_01_\d{14}\.png", paths[1].name)
    assert Image.open(paths[0]).size == (64, 96) and Image.open(paths[1]).size == (80, 64)
    assert Image.open(paths[0]).mode == "RGB"
    assert sorted(p.name for p in (tmp_path / "sample").iterdir()) == sorted(p.name for p in paths)  # no temp left


def test_generate_is_deterministic_for_a_seed_and_skips_unencodable_prompts(tmp_path, caplog):
    model, vae = _StandInDiT(), _StandInVAE()
    prompts = [SamplePrompt(0, "seeded", "", width=64, height=64, seed=11, sample_steps=2),
               SamplePrompt(1, "not cached", "", width=64, height=64, seed=11, sample_steps=2)]
    encoder = _fake_encodings(["seeded", ""], 8)
    first = [path for path, _ in generate_sample_images(model, vae, encoder, prompts, output_dir=tmp_path / "a",
                                                        output_name=None, step=0, epoch=0)]
    second = [path for path, _ in generate_sample_images(model, vae, encoder, prompts[:1], output_dir=tmp_path / "b",
                                                         output_name=None, step=0, epoch=0)]
    assert len(first) == 1 and "sample prompt 1 skipped" in caplog.text
    assert first[0].name.startswith("e000000_00_")
    assert np.array_equal(np.asarray(Image.open(first[0])), np.asarray(Image.open(second[0])))
    assert np.asarray(Image.open(first[0])).std() > 0


class _OverflowingVAE(_StandInVAE):
    def decode_latents_to_pixels(self, z):
        return super().decode_latents_to_pixels(z) * float("inf")


@pytest.mark.parametrize("broken", ["DiT", "VAE"])
def test_non_finite_samples_are_not_written_and_say_which_model_and_why(tmp_path, caplog, broken):
    model, vae = _StandInDiT(), (_OverflowingVAE() if broken == "VAE" else _StandInVAE())
    if broken == "DiT":
        with torch.no_grad():
            model.proj.bias.fill_(float("nan"))
    prompts = [SamplePrompt(0, "a cat", "", width=64, height=64, seed=1, sample_steps=2)]
    written = generate_sample_images(model, vae, _fake_encodings(["a cat", ""], 8), prompts, output_dir=tmp_path,
                                     output_name="run", step=3, autocast_dtype=torch.float16 if broken == "DiT" else None)
    assert written == [] and not list((tmp_path / "sample").glob("*"))
    message = f"sample prompt 0: the {broken} produced NaN/inf values in "
    assert message in caplog.text and "no image written" in caplog.text
    assert ("--mixed_precision bf16" if broken == "DiT" else "check the --vae file") in caplog.text


def test_unseeded_sample_noise_continues_the_torch_random_stream_and_a_seed_reseeds_it(tmp_path, monkeypatch):
    # The rule (sd-scripts' sampling): every prompt's noise comes from the CPU random stream as it stands when
    # sampling starts; a seeded prompt re-seeds that stream first, so an unseeded prompt after it continues the
    # seeded stream. The training's own stream is left as it was.
    from library.training import sampling

    noises = []

    def recording_sampler(model, noise, sigmas, context, negative_context=None, scale=1.0):
        noises.append(noise.clone())
        return noise

    monkeypatch.setattr(sampling, "euler_flow_sample", recording_sampler)
    model, vae = _StandInDiT(), _StandInVAE()
    prompts = [SamplePrompt(0, "first", "", width=64, height=64, seed=None, sample_steps=1),
               SamplePrompt(1, "seeded", "", width=80, height=64, seed=9, sample_steps=1),
               SamplePrompt(2, "after", "", width=64, height=96, seed=None, sample_steps=1)]
    encoder = _fake_encodings(prompt_texts(prompts), 8)

    stream = torch.Generator().manual_seed(123)  # what torch.manual_seed(123) puts into the global generator
    expected = [torch.randn(1, 16, 1, 8, 8, generator=stream)]
    stream.manual_seed(9)
    expected += [torch.randn(1, 16, 1, 8, 10, generator=stream), torch.randn(1, 16, 1, 12, 8, generator=stream)]

    for run in ("a", "b"):  # the same random state gives the same samples
        noises.clear()
        torch.manual_seed(123)
        generate_sample_images(model, vae, encoder, prompts, output_dir=tmp_path / run, output_name=None, step=1)
        assert len(noises) == 3
        for got, want in zip(noises, expected, strict=True):
            assert torch.equal(got, want)
        assert torch.equal(torch.rand(4), torch.rand(4, generator=torch.Generator().manual_seed(123)))


def test_cached_encodings_are_looked_up_by_exact_text():
    class Counting:
        def __init__(self):
            self.seen = []

        def encode(self, captions):
            self.seen += captions
            return {"qwen3_embeds": torch.full((1, 2, 3), float(len(captions[0])))}

    counting = Counting()
    cache = CachedPromptEncodings.from_encoder(counting, [SamplePrompt(0, "ab", ""), SamplePrompt(1, "ab", "xyz")])
    assert counting.seen == ["ab", "", "xyz"]
    assert cache.encode(["xyz", "ab"])["qwen3_embeds"][:, 0, 0].tolist() == [3.0, 2.0]
    with pytest.raises(KeyError):
        cache.encode(["ab "])


# ---------------------------------------------------------------------------------------------------------------
# The golden tiny DiT and VAE


@pytest.fixture(scope="module")
def golden_models(golden_dir):
    from library.models.dit_loading import load_anima_model
    from library.models.vae import load_vae

    dit = load_anima_model(str(golden_dir / "dit_tiny.safetensors"), "cpu", torch.float32)
    vae = load_vae(golden_dir / "vae_tiny.safetensors", "cpu", torch.float32)
    return dit, vae


def _golden_encodings(texts: list[str]) -> CachedPromptEncodings:
    # Stand-ins for Qwen3 outputs (width 48, as the golden adapter expects) and T5 ids; empty text = no tokens.
    gen = torch.Generator().manual_seed(3)
    encodings = {}
    for text in texts:
        n = len(text.split())
        qwen3_mask = (torch.arange(10) < n).long()[None]
        t5_mask = (torch.arange(12) < n + 1).long()[None]
        t5_ids = torch.randint(2, 32000, (1, 12), generator=gen) * t5_mask
        t5_ids[0, n] = 1
        encodings[text] = {"qwen3_embeds": torch.randn(1, 10, 48, generator=gen) * qwen3_mask[..., None],
                           "qwen3_mask": qwen3_mask, "t5_ids": t5_ids, "t5_mask": t5_mask}
    return CachedPromptEncodings(encodings)


def test_euler_loop_on_golden_dit_equals_two_hand_written_steps(golden_models):
    dit, _ = golden_models
    enc = _golden_encodings(["a red fox", ""])
    with torch.no_grad():
        pos, neg = (dit.encode_text(*(enc.encode([t])[k] for k in ("qwen3_embeds", "qwen3_mask", "t5_ids", "t5_mask")))
                    for t in ("a red fox", ""))
        noise = torch.randn(1, 16, 1, 8, 12, generator=torch.Generator().manual_seed(0))
        sigmas = torch.tensor([1.0, 0.75, 0.0])
        mask = torch.zeros(1, 1, 8, 12)
        x = noise.clone()
        for i in range(2):
            t = sigmas[i : i + 1]
            v_pos, v_neg = dit(x, t, pos, padding_mask=mask), dit(x, t, neg, padding_mask=mask)
            x = x + (v_neg + 3.0 * (v_pos - v_neg)) * (sigmas[i + 1] - sigmas[i])
        out = euler_flow_sample(dit, noise, sigmas, pos, neg, 3.0)
    assert x.abs().max() > 0.1
    torch.testing.assert_close(out, x, rtol=1e-5, atol=1e-5)


def test_golden_sampling_is_deterministic_sized_and_leaves_training_state_alone(golden_models, tmp_path):
    dit, vae = golden_models
    prompts = [SamplePrompt(0, "a red fox", "", width=96, height=64, seed=5, sample_steps=3, scale=3.0),
               SamplePrompt(1, "a blue bird", "dark", width=64, height=64, seed=6, sample_steps=2, scale=1.0)]
    enc = _golden_encodings(prompt_texts(prompts))
    dit.train()
    try:
        rng_before = torch.random.get_rng_state()
        first = generate_sample_images(dit, vae, enc, prompts, output_dir=tmp_path / "a", output_name="g", step=10)
        assert torch.equal(torch.random.get_rng_state(), rng_before)
        assert all(m.training for m in dit.modules())
        second = generate_sample_images(dit, vae, enc, prompts, output_dir=tmp_path / "b", output_name="g", step=10)
    finally:
        dit.eval()
    images = [[np.asarray(Image.open(p)) for p, _ in run] for run in (first, second)]
    assert [a.shape for a in images[0]] == [(64, 96, 3), (64, 64, 3)]
    for a, b in zip(*images):
        assert np.array_equal(a, b)
        assert a.std() > 1.0  # a real picture, not a constant
    assert not np.array_equal(images[0][0][:, :64], images[0][1])
