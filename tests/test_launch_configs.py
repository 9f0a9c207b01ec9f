"""The shipped accelerate configs (recipes/launch/): valid YAML, the launch command on top, every knob commented,
and the fields that select each engine. DeepSpeed is not installed here, so no run is tested."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from test_recipes import uncommented_knobs

LAUNCH = Path(__file__).resolve().parents[1] / "recipes" / "launch"
EXPECTED = {
    "ddp.yaml": ("MULTI_GPU", None),
    "fsdp_qlora.yaml": ("FSDP", ("fsdp_config", "fsdp_use_orig_params", True)),
    "deepspeed_zero2.yaml": ("DEEPSPEED", ("deepspeed_config", "zero_stage", 2)),
    "deepspeed_zero3.yaml": ("DEEPSPEED", ("deepspeed_config", "zero_stage", 3)),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_launch_config(name):
    text = (LAUNCH / name).read_text(encoding="utf-8")
    assert text.startswith(f"# accelerate launch --config_file recipes/launch/{name} -m medtune.cli train recipes/")
    config = yaml.safe_load(text)
    kind, nested = EXPECTED[name]
    assert config["distributed_type"] == kind and config["num_processes"] >= 2 and config["use_cpu"] is False
    assert config["mixed_precision"] == "no", "medtune autocasts itself"
    assert "gradient_accumulation_steps" not in str(config), "accumulation comes from train.grad_accum"
    if nested:
        section, key, value = nested
        assert config[section][key] == value
    sections = tuple(k for k, v in config.items() if isinstance(v, dict))
    assert not uncommented_knobs("top:\n" + "\n".join("  " + line for line in text.splitlines()), ("top",)), \
        "every top-level knob carries a comment"
    assert not uncommented_knobs(text, sections), "every nested knob carries a comment"
    recipe = text.splitlines()[0].split(" train ")[1].split()[0]
    assert (LAUNCH.parents[1] / recipe).is_file(), recipe
