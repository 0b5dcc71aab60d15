"""`python -m fused_lora bench --ops host`: the host-time table runs, its columns compute the same thing, and the
report's --ops hook reaches it (timings themselves are benchmarks, never asserted)."""

from __future__ import annotations

import pytest
import torch

from fused_lora.bench import host, report


def test_every_call_builds_and_its_lora_columns_agree():
    for call in host.CALLS:
        fns = host.build(call)
        assert set(fns) == set(host.IMPLS)
        host.check_outputs_agree(fns, call)  # raises when a column computes something else
        for fn in fns.values():
            fn()


def test_check_outputs_agree_catches_a_wrong_column():
    fns = host.build("eval 1 adapter")
    fns["functional"] = lambda: torch.zeros(host.TOKENS, host.N)
    with pytest.raises(AssertionError, match="functional differs from PEFT"):
        host.check_outputs_agree(fns, "eval 1 adapter")


def test_ops_host_prints_the_table(capsys):
    threads = torch.get_num_threads()
    try:
        assert (
            report.main(
                [
                    "--ops",
                    "host",
                    "--rounds",
                    "1",
                    "--min-sample-seconds",
                    "0.0005",
                    "--calls",
                    "eval 1 adapter,train fwd+bwd",
                ]
            )
            == 0
        )
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "host time per call" in out and "eval 1 adapter" in out and "train fwd+bwd" in out
    assert "fused/PEFT" in out and "eval 2 active" not in out


def test_unknown_call_is_refused():
    with pytest.raises(SystemExit):
        host.main(["--calls", "eval 3 adapters"])
