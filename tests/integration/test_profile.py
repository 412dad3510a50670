"""``vtprune profile``: FLOPs arithmetic, measurements on the tiny model, and one-line errors."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import warnings

import pytest
import torch

import vtprune
from vtprune.profiling.cli import main as profile
from vtprune.profiling.flops import layer_flops, prefill_flops
from vtprune.profiling.measure import measure
from vtprune.testing import (
    batch_inputs,
    make_prompt,
    save_tiny_fast_vlm_hf,
    save_tiny_llava_hf,
    save_tiny_perception_lm_hf,
    tiny_llava,
)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = tiny_llava(hidden=64, layers=4, heads=4, kv_heads=2)
    inputs = batch_inputs(model, [make_prompt(model, [1, 5, 6, 7], [8, 9, 10, 11])])
    return model, inputs


def test_layer_flops_counts_projections_causal_attention_and_mlp(tiny):
    model, _ = tiny
    text = model.config.text_config
    d, m, head = text.hidden_size, text.intermediate_size, text.hidden_size // text.num_attention_heads
    q, kv, n = text.num_attention_heads * head, text.num_key_value_heads * head, 10
    by_hand = 2 * n * (d * q + 2 * d * kv + q * d) + 2 * 2 * (n * (n + 1) / 2) * q + 2 * n * 3 * d * m
    assert layer_flops(model.config, n) == by_hand
    assert prefill_flops(model.config, [8, 3], [[4, 4], [2, 1]]) == sum(
        layer_flops(model.config, n) for n in (12, 12, 5, 4)
    )
    with pytest.raises(ValueError, match="2 samples of text tokens but 1"):
        prefill_flops(model.config, [8, 3], [[4, 4]])


def _cached_bytes_per_token(model) -> int:
    """Bytes one token's keys and values take in one decoder layer's cache (fp32)."""
    text_cfg = model.config.text_config
    return 2 * text_cfg.num_key_value_heads * (text_cfg.hidden_size // text_cfg.num_attention_heads) * 4


def test_measurements_follow_the_tokens_kept(tiny):
    model, inputs = tiny
    n_visual = int((inputs["input_ids"] == model.config.image_token_id).sum())
    text = inputs["input_ids"].shape[1] - n_visual
    layers = model.config.text_config.num_hidden_layers
    unpruned = measure(model, inputs, None, new_tokens=3, repeats=1, warmup=0)
    divprune = measure(model, inputs, "divprune", 16, new_tokens=3, repeats=1, warmup=0)
    fastv = measure(model, inputs, "fastv", 16, new_tokens=3, repeats=1, warmup=0, layer=2)
    assert (unpruned.visual_tokens, unpruned.kept_tokens, unpruned.mean_layer_tokens) == (n_visual, n_visual, n_visual)
    assert (divprune.kept_tokens, divprune.mean_layer_tokens) == (16, 16)
    assert (fastv.kept_tokens, fastv.mean_layer_tokens) == (16, (2 * n_visual + 2 * 16) / 4)
    assert unpruned.prefill_gflops * 1e9 == layers * layer_flops(model.config, text + n_visual)
    assert divprune.prefill_gflops * 1e9 == layers * layer_flops(model.config, text + 16)
    # The cache: every layer holds the prompt; pruned layers hold fewer visual tokens.
    per_token = _cached_bytes_per_token(model)
    assert unpruned.kv_cache_mb * 2**20 == layers * (text + n_visual) * per_token
    assert divprune.kv_cache_mb * 2**20 == layers * (text + 16) * per_token
    assert fastv.kv_cache_mb * 2**20 == (2 * (text + n_visual) + 2 * (text + 16)) * per_token
    # After generate(): the prompt and the two generated tokens fed back, in every layer.
    assert unpruned.kv_cache_end_mb * 2**20 == layers * (text + n_visual + 2) * per_token
    assert fastv.kv_cache_end_mb * 2**20 == fastv.kv_cache_mb * 2**20 + layers * 2 * per_token
    assert (unpruned.end_layer_tokens, fastv.end_layer_tokens) == (n_visual, fastv.mean_layer_tokens)
    for m in (unpruned, divprune, fastv):
        assert m.ttft_ms > 0 and m.prefill_ms > 0 and m.decode_ms_per_token > 0
    assert vtprune.handle_of(model) is None  # measure() removes what it applied


def test_a_cache_policy_shows_in_the_cache_left_after_generation():
    """MustDrop's decode stage shrinks the layers after its first drop to the final tokens once decoding
    starts: the cache after generate() holds fewer visual entries than the prefill left (eight layers:
    on four, every layer after the first drop already holds the final tokens)."""
    torch.manual_seed(0)
    model = tiny_llava(hidden=64, layers=8, heads=4, kv_heads=2)
    inputs = batch_inputs(model, [make_prompt(model, [1, 5, 6, 7], [8, 9, 10, 11])])
    n_visual = int((inputs["input_ids"] == model.config.image_token_id).sum())
    text, layers = inputs["input_ids"].shape[1] - n_visual, model.config.text_config.num_hidden_layers
    per_token = _cached_bytes_per_token(model)
    m = measure(model, inputs, "mustdrop", 64, new_tokens=3, repeats=1, warmup=0)
    assert m.end_layer_tokens < m.mean_layer_tokens
    assert m.kv_cache_end_mb * 2**20 == (layers * (text + 2) + m.end_layer_tokens * layers) * per_token
    assert m.kv_cache_end_mb < m.kv_cache_mb + layers * 2 * per_token / 2**20


def test_profile_writes_table_csv_and_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="--plot needs matplotlib (the proxy extra)")
    out_csv, out_png = tmp_path / "p.csv", tmp_path / "p.png"
    code = profile(
        ["--model", "tiny", "--pruners", "divprune", "fastv", "--keeps", "16", "0.25", "--repeats", "1",
         "--warmup", "0", "--new-tokens", "2", "--csv", str(out_csv), "--plot", str(out_png)]
    )  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "TTFT ms" in printed and "prefill GFLOPs" in printed and "IQR ms" in printed
    threads = torch.get_num_threads()
    assert f", {threads} thread{'' if threads == 1 else 's'};" in printed  # not "1 threads"
    assert "one run per row after 0 warm-up runs" in printed
    rows = list(csv.DictReader(out_csv.open()))
    assert all(float(r["prefill_iqr_ms"]) == 0.0 for r in rows)  # one run: no spread
    assert [(r["pruner"], r["kept_tokens"]) for r in rows] == [
        ("none", "576"), ("divprune", "16"), ("divprune", "144"), ("fastv", "16"), ("fastv", "144")
    ]  # fmt: skip
    assert out_png.stat().st_size > 10_000


@pytest.mark.parametrize(
    ("save", "family"),
    [
        (save_tiny_llava_hf, "LlavaForConditionalGeneration"),
        (save_tiny_fast_vlm_hf, "FastVlmForConditionalGeneration"),
        (save_tiny_perception_lm_hf, "PerceptionLMForConditionalGeneration"),
    ],
)
def test_profile_loads_a_model_directory(tmp_path, capsys, save, family):
    model_dir = save(tmp_path / "tiny")
    args = ["--model", str(model_dir), "--pruners", "cls", "--keeps", "4", "--repeats", "1", "--new-tokens", "2"]
    with warnings.catch_warnings():  # FastViT has no CLS token: the substitute score is announced
        warnings.simplefilter("ignore")
        assert profile(args) == 0
    out = capsys.readouterr().out
    assert family in out
    row = next(line.split() for line in out.splitlines() if line.startswith("cls "))
    assert row[:4] == ["cls", "4", "4", "4.0"]  # pruner, keep, kept, per layer


@pytest.mark.slow  # a fresh Python process per case: seconds each
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--pruners", "divprnue"], "unknown pruner(s) divprnue; available: adaptive"),
        (["--keeps", "0"], "--keeps: keep must be >= 1"),
        (["--keeps", "many"], "--keeps: must be an int or a fraction in (0, 1], got 'many'"),
        (["--keeps", "1000"], "--keeps [1000]: more than the 576 visual tokens"),
        (["--model", "/no/such/model"], "--model '/no/such/model': not tiny, proxy, a Hub id or a model directory"),
        (["--model", "llava-hf/llava-1.5-7b-hf"], "--model 'llava-hf/llava-1.5-7b-hf': cannot load it"),  # offline
        (["--dtype", "float8"], "argument --dtype: invalid choice: 'float8'"),
        (["--repeats", "0"], "--repeats must be >= 1"),
        (["--csv", "out.txt"], "out.txt: must end in .csv"),
        (["--pruners", "fastv", "--keeps", "1.5"], "--keeps: keep must be in (0, 1]"),
        (["--image", __file__], "--image and --question apply to --model proxy or a model directory"),
        (["--question", "Which colour?"], "--image and --question apply to --model proxy or a model directory"),
    ],
)
def test_bad_arguments_give_one_line_and_exit_2(args, message):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # a Hub id fails offline with one line, as here without a network
    done = subprocess.run(
        [sys.executable, "-m", "vtprune", "profile", "--repeats", "1", *args], capture_output=True, text=True, env=env
    )
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines == [lines[-1]] and message in lines[-1] and "Traceback" not in done.stderr, done.stderr


@pytest.mark.slow  # a fresh Python process per case: seconds each
def test_an_image_file_pil_cannot_read_gives_one_line_and_exit_2(tmp_path):
    (tmp_path / "config.json").write_text("{}")  # the model is never loaded: the image is checked first
    args = ["profile", "--model", str(tmp_path), "--image", __file__]
    done = subprocess.run([sys.executable, "-m", "vtprune", *args], capture_output=True, text=True)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "not an image file PIL can read" in done.stderr.strip().splitlines()[-1]


def test_plot_without_matplotlib_is_one_line_before_anything_runs(tmp_path, capsys, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "matplotlib" else find_spec(name))
    assert profile(["--model", "tiny", "--plot", str(tmp_path / "p.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "vtprune profile: error: --plot needs matplotlib (in the proxy extra: pip install -e '.[proxy]')"
    assert not (tmp_path / "p.png").exists()
