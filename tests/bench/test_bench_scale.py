"""`medtune bench scale` on tiny random-init widths: every configuration runs in its own process and reports
tokens/s and a memory split whose parts match what we can compute by hand."""

from __future__ import annotations

import json

import pytest

from medtune.bench import scale
from medtune.errors import MedtuneError

TINY = {"t1": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2)}


@pytest.fixture(scope="module")
def tiny_scale(tiny_model_dir, tmp_path_factory) -> tuple[dict, scale.ScaleConfig]:
    tmp = tmp_path_factory.mktemp("scale")
    cfg = scale.ScaleConfig(widths=("t1",), methods=("lora", "qlora"), lengths=(32, 64), steps=2, lora_r=8,
                            template_model=str(tiny_model_dir), cache_dir=str(tmp / "models"), extra_shapes=TINY,
                            timeout=300)
    result = scale.run_scale(cfg, json_path=tmp / "scale.json", plot_path=tmp / "scale.png", command="pytest")
    assert json.loads((tmp / "scale.json").read_text())["rows"] == json.loads(json.dumps(result["rows"]))
    assert (tmp / "scale.png").stat().st_size > 10_000
    return result, cfg


def test_every_configuration_reports_speed_and_memory(tiny_scale):
    result, _ = tiny_scale
    rows = result["rows"]
    assert [(r["width"], r["method"], r["length"]) for r in rows] == [
        ("t1", m, n) for m in ("lora", "qlora") for n in (32, 64)]
    for r in rows:
        assert not r.get("error"), r
        assert r["tokens_per_s"] > 0 and len(r["step_s"]) == 1
        m = r["memory_mb"]
        assert m["peak_rss"] >= m["rss_before_steps"] > m["runtime"] > 0
        assert m["activations"] > 0 and m["logits"] > 0


def test_memory_parts_match_the_model(tiny_scale, tiny_model_dir):
    result, cfg = tiny_scale
    by = {(r["width"], r["method"], r["length"]): r for r in result["rows"]}
    # LoRA state: r x (in + out) per adapted projection, 4 fp32 copies (weights, grads, two AdamW moments)
    h, kv = 64, 64 // 4 * 2
    per_layer = sum(cfg.lora_r * (h + out) for out in (h, kv, kv, h))  # q, k, v, o
    assert by["t1", "lora", 32]["lora_params"] == 2 * per_layer
    assert by["t1", "lora", 32]["memory_mb"]["lora_state"] == pytest.approx(2 * per_layer * 4 * 4 / 2**20)
    # 4-bit weights are smaller than the 16/32-bit ones; activations grow with the sequence
    assert by["t1", "qlora", 32]["memory_mb"]["weights"] < by["t1", "lora", 32]["memory_mb"]["weights"]
    assert by["t1", "lora", 64]["memory_mb"]["activations"] > 1.5 * by["t1", "lora", 32]["memory_mb"]["activations"]


def test_the_table_lists_every_row(tiny_scale):
    table = scale.format_table(tiny_scale[0])
    assert table.count("\nt1 ") == 4
    for word in ("tokens/s", "peak RSS", "weights", "activ.", "logits"):
        assert word in table


def test_scale_config_from_flags():
    assert scale.scale_config().lengths == (256, 512, 1024, 2048)
    quick = scale.scale_config(quick=True)
    assert (quick.widths, quick.lengths, quick.steps) == (("135m",), (256, 512), 2)
    assert scale.scale_config(widths="1B, 135m", methods="qlora").widths == ("1b", "135m")
    with pytest.raises(MedtuneError, match="unknown 7b"):
        scale.scale_config(widths="7b")
    with pytest.raises(MedtuneError, match="integers"):
        scale.scale_config(lengths="256,long")
    with pytest.raises(MedtuneError, match="at least 2"):
        scale.scale_config(steps=1)
