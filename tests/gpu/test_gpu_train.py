"""`medtune train` on CUDA, through the command line: fp32 on the GPU trains like fp32 on the CPU, bf16 autocast
trains (finite, falling loss; adapters move), a resumed run equals the uninterrupted one (CUDA RNG included: LoRA
dropout is on), and packed rows give the loss of padded ones with SDPA and, when installed, flash attention."""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import losses
from gpu_env import GPU, adapter, run_meta, train

from medtune.run.layout import ADAPTER_FILES, CHECKPOINTS, step_name

pytestmark = GPU

STEPS = 5


@pytest.fixture(scope="module")
def fp32_cuda(tiny_model_dir, tmp_path_factory):
    return train(tiny_model_dir, tmp_path_factory.mktemp("fp32") / "run", f"train.max_steps={STEPS}",
                 "train.precision=fp32", "lora.dropout=0")


def test_fp32_training_on_cuda_equals_cpu(tiny_model_dir, tmp_path, fp32_cuda):
    cpu = train(tiny_model_dir, tmp_path / "cpu", f"train.max_steps={STEPS}", "train.precision=fp32", "lora.dropout=0",
                "train.device=cpu")
    assert run_meta(fp32_cuda)["hardware"]["device"].startswith("cuda")
    assert run_meta(cpu)["hardware"]["device"].startswith("cpu")
    assert losses(fp32_cuda) == pytest.approx(losses(cpu), rel=1e-4)
    a, b = adapter(cpu), adapter(fp32_cuda)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-4, rtol=0, msg=lambda m, k=k: f"{k}: {m}")


def test_bf16_autocast_training_on_cuda(tiny_model_dir, tmp_path, fp32_cuda):
    run = train(tiny_model_dir, tmp_path / "bf16", f"train.max_steps={STEPS}", "train.precision=bf16",
                "lora.dropout=0.05")
    hw = run_meta(run)["hardware"]
    assert hw["device"].startswith("cuda") and hw["precision"].startswith("bf16"), hw
    got, ref = losses(run), losses(fp32_cuda)
    assert len(got) == STEPS and all(torch.isfinite(torch.tensor(got))), got
    # Step 1 runs before any update and LoRA B starts at zero (dropout changes nothing yet): only precision differs.
    assert got[0] == pytest.approx(ref[0], rel=2e-2)
    assert got[-1] < got[0], got
    weights = adapter(run)
    assert all(t.dtype == torch.float32 for t in weights.values()), "adapters are saved in fp32"
    lora_b = [t for k, t in weights.items() if "lora_B" in k]
    assert lora_b and all(t.abs().max() > 0 for t in lora_b), "LoRA B starts at zero; training must move it"


def test_resume_equals_uninterrupted_on_cuda(tiny_model_dir, tmp_path):
    """A finished run with its step-2 checkpoint only, resumed: steps 3-5 (dropout masks from the restored CUDA
    RNG) reproduce the same adapter and the same logged losses."""
    whole = train(tiny_model_dir, tmp_path / "whole", f"train.max_steps={STEPS}", "train.save_steps=2",
                  "train.precision=fp32", "lora.dropout=0.1")
    run = tmp_path / "resumed"
    shutil.copytree(whole, run)
    names = sorted(c.name for c in (run / CHECKPOINTS).iterdir())
    assert step_name(2) in names, names
    for name in names:
        if name != step_name(2):
            shutil.rmtree(run / CHECKPOINTS / name)
    (run / ADAPTER_FILES[0]).unlink()

    train(tiny_model_dir, run, f"train.max_steps={STEPS}", "train.save_steps=2", "train.precision=fp32",
          "lora.dropout=0.1", "resume=true")

    assert losses(run) == pytest.approx(losses(whole), rel=1e-5)
    a, b = adapter(whole), adapter(run)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=0, msg=lambda m, k=k: f"{k}: {m}")


@pytest.fixture(scope="module")
def padded_fp32(tiny_model_dir, tmp_path_factory) -> float:
    """The loss of one step over all 18 training rows, padded, SDPA, fp32: what every packing variant must give."""
    run = train(tiny_model_dir, tmp_path_factory.mktemp("padded") / "run", "train.max_steps=1",
                "train.batch_size=18", "train.precision=fp32", "lora.dropout=0")
    return losses(run)[0]


@pytest.mark.parametrize("attn,precision,packing,rel", [
    ("sdpa", "fp32", True, 1e-4),
    ("sdpa", "bf16", True, 2e-2),
    ("flash_attention_2", "bf16", True, 2e-2),
    ("flash_attention_2", "bf16", False, 2e-2),
])
def test_packed_rows_give_the_padded_loss_on_cuda(tiny_model_dir, tmp_path, padded_fp32, attn, precision, packing,
                                                  rel):
    """Packed rows carry no attention mask: transformers builds the block-diagonal mask from the restarting position
    ids (SDPA) or passes the sequence boundaries to the kernel (flash attention). Either way no token may see
    another example, so the loss over the same 18 examples is the padded one."""
    if attn == "flash_attention_2":
        pytest.importorskip("flash_attn", reason="flash-attn is not installed")
    run = train(tiny_model_dir, tmp_path / "run", "train.max_steps=1", "train.batch_size=18",
                f"train.precision={precision}", "lora.dropout=0", f"train.packing={str(packing).lower()}",
                f"attn_implementation={attn}")
    assert losses(run)[0] == pytest.approx(padded_fp32, rel=rel)
