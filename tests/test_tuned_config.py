"""kernels/tuned.py: the per-GPU tuned-config store the launchers read (written by the GPU check's tune step)."""

import builtins
import json
import os

import pytest
import torch

from fused_lora.kernels import tuned

GPU = "NVIDIA H100 80GB HBM3"
DEFAULT = {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8}


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A tuned directory of our own, the GPU name forced (these machines have no GPU), caches cleared around."""
    monkeypatch.setenv("FUSED_LORA_TUNED_DIR", str(tmp_path))
    monkeypatch.setenv("FUSED_LORA_TUNED_GPU", GPU)
    monkeypatch.delenv("FUSED_LORA_TUNED", raising=False)
    tuned.clear_cache()
    yield tmp_path
    tuned.clear_cache()


def _entry(config, **extra):
    return dict({"config": config, "default": DEFAULT, "median_us": 1.0}, **extra)


def test_slug_names_the_file():
    assert tuned.gpu_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert tuned.gpu_slug("  NVIDIA A100-SXM4-40GB ") == "nvidia-a100-sxm4-40gb"
    with pytest.raises(ValueError, match="no letters"):
        tuned.gpu_slug("--")


def test_no_file_gives_a_copy_of_the_default(store):
    got = tuned.tuned_config("fused_gemm", "y:bf16:M>256", DEFAULT)
    assert got == DEFAULT and got is not DEFAULT


def test_round_trip_overrides_only_the_default_keys(store):
    path = tuned.write_tuned(
        GPU,
        {"fused_gemm": {"y:bf16:M>256": _entry({"BLOCK_M": 256, "num_warps": 4, "BLOCK_Q": 7})}},
        out_dir=str(store),
        base_dir=str(store),
    )
    assert os.path.basename(path) == "nvidia-h100-80gb-hbm3.json"
    got = tuned.tuned_config("fused_gemm", "y:bf16:M>256", DEFAULT)
    # BLOCK_M and num_warps tuned; BLOCK_N keeps its static value; BLOCK_Q, unknown to the kernel, is dropped
    assert got == {"BLOCK_M": 256, "BLOCK_N": 128, "num_warps": 4}
    assert tuned.tuned_config("fused_gemm", "y:bf16:M<=256", DEFAULT) == DEFAULT
    assert tuned.tuned_config("small_m", "y:bf16:M>256", DEFAULT) == DEFAULT


def test_switched_off_and_cpu_devices_use_the_static_table(store, monkeypatch):
    tuned.write_tuned(GPU, {"k": {"c": _entry({"BLOCK_M": 64})}}, out_dir=str(store), base_dir=str(store))
    assert tuned.tuned_config("k", "c", DEFAULT)["BLOCK_M"] == 64
    monkeypatch.setenv("FUSED_LORA_TUNED", "0")
    tuned.clear_cache()
    assert tuned.tuned_config("k", "c", DEFAULT) == DEFAULT
    monkeypatch.delenv("FUSED_LORA_TUNED")
    monkeypatch.delenv("FUSED_LORA_TUNED_GPU")
    tuned.clear_cache()
    # no forced name: a CPU tensor's launch (the interpreter) never reads a GPU's file
    assert tuned.tuned_config("k", "c", DEFAULT, device=torch.device("cpu")) == DEFAULT


def test_file_is_read_once_not_per_call(store, monkeypatch):
    tuned.write_tuned(GPU, {"k": {"c": _entry({"BLOCK_M": 32})}}, out_dir=str(store), base_dir=str(store))
    assert tuned.tuned_config("k", "c", DEFAULT)["BLOCK_M"] == 32
    real_open = builtins.open

    def no_io(*args, **kwargs):
        raise AssertionError(f"file I/O in a launch: open{args}")

    monkeypatch.setattr(builtins, "open", no_io)
    for _ in range(3):
        assert tuned.tuned_config("k", "c", DEFAULT)["BLOCK_M"] == 32
        assert tuned.tuned_config("k", "other", DEFAULT) == DEFAULT
    monkeypatch.setattr(builtins, "open", real_open)


def test_writer_keeps_the_base_file_entries_and_leaves_no_temporary(store, tmp_path):
    base, out = tmp_path / "base", tmp_path / "out"
    tuned.write_tuned(
        GPU,
        {"a": {"c1": _entry({"BLOCK_M": 16})}, "b": {"c": _entry({"BLOCK_M": 32})}},
        out_dir=str(base),
        base_dir=str(tmp_path / "none"),
        meta={"triton": "3.6.0"},
    )
    path = tuned.write_tuned(
        GPU,
        {"a": {"c2": _entry({"BLOCK_M": 64})}, "b": {"c": _entry({"BLOCK_M": 128})}},
        out_dir=str(out),
        base_dir=str(base),
        meta={"torch": "2.11"},
    )
    data = json.loads(open(path).read())
    assert data["schema"] == tuned.SCHEMA and data["gpu"] == GPU
    configs = {k: {c: e["config"]["BLOCK_M"] for c, e in v.items()} for k, v in data["kernels"].items()}
    assert configs == {"a": {"c1": 16, "c2": 64}, "b": {"c": 128}}
    assert data["meta"]["triton"] == "3.6.0" and data["meta"]["torch"] == "2.11" and "written" in data["meta"]
    assert sorted(os.listdir(out)) == ["nvidia-h100-80gb-hbm3.json"]


def test_writer_refuses_an_entry_without_a_plain_config(store):
    with pytest.raises(ValueError, match="needs a 'config' dict"):
        tuned.write_tuned(GPU, {"k": {"c": {"config": {"BLOCK_M": 1.5}}}}, out_dir=str(store), base_dir=str(store))
    with pytest.raises(ValueError, match="needs a 'config' dict"):
        tuned.write_tuned(GPU, {"k": {"c": {"median_us": 3.0}}}, out_dir=str(store), base_dir=str(store))
    assert not os.listdir(store)


@pytest.mark.parametrize("content", ['{"schema": 99, "kernels": {}}', "not json", '["a list"]'])
def test_a_damaged_file_warns_and_falls_back(store, content):
    (store / "nvidia-h100-80gb-hbm3.json").write_text(content)
    with pytest.warns(RuntimeWarning, match="ignoring tuned configs"):
        assert tuned.tuned_config("k", "c", DEFAULT) == DEFAULT


def test_a_bad_entry_is_ignored_with_a_warning_and_the_rest_kept(store):
    (store / "nvidia-h100-80gb-hbm3.json").write_text(
        json.dumps(
            {
                "schema": tuned.SCHEMA,
                "gpu": GPU,
                "kernels": {"k": {"bad": {"config": {"BLOCK_M": [1, 2]}}, "good": {"config": {"BLOCK_M": 8}}}},
            }
        )
    )
    with pytest.warns(RuntimeWarning, match="ignoring tuned config k/bad"):
        assert tuned.tuned_config("k", "bad", DEFAULT) == DEFAULT
    assert tuned.tuned_config("k", "good", DEFAULT)["BLOCK_M"] == 8


def test_decode_tune_cases_tune_the_shape_class_their_launch_reads(monkeypatch):
    """The GPU check's decode cases (K = N = 4096) must write the class the decode launcher looks up at that shape:
    at M <= 16 that is the 32-column-tile class (the tile width depends on N), not the 64-column one."""
    from fused_lora.gpu_check import tune_spaces
    from fused_lora.kernels import config, decode

    cases, problems = tune_spaces.interim_cases()
    assert problems == []
    decode_cases = [case for case, _ in cases if case.kernel == "decode"]
    assert len(decode_cases) == 2
    looked_up = []
    monkeypatch.setattr(
        config, "tuned_config", lambda kernel, cls, default, device=None: looked_up.append(cls) or default
    )
    for M in (16, 64):
        # what the launcher asks at M tokens, N = 4096, rank 16, no dropout (kernels/decode.py's launcher arguments)
        decode.decode_config(M, 2, decode.rank_mode(False, 16, 1), False, torch.device("cpu"), 4096)
    assert looked_up[0].endswith(":BN=32")
    assert sorted(case.shape_class for case in decode_cases) == sorted(looked_up)
