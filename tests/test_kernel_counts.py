"""What the Triton launches promise, counted on CPU (tests/kernel_counting.py) and planned (kernels/launch_plan.py).

- plan == launch: for small shapes of every op, the interpreter's record of each launch (kernel, grid, elements
  loaded per tensor) equals kernels/launch_plan.plan, so the plan can be trusted at sizes the interpreter cannot run;
  plan_before equals counts measured on main at dd3ed58 (frozen below).
- the promises of issue 13, on the plan at real sizes and counted at small ones: the decode launch that streams W
  has >= 2 programs per H100 SM and reads x and W in one pass; the prefill shrink has >= 132 programs; per-row
  batches read W as often as one adapter does; backward partial buffers do not grow with M.
- split reductions: results do not depend on the order programs run in, and the counters are left at zero.
- the epilogue after each K loop (tail round trips, PDL consumers) is described whatever the PDL switch.
The times of these plans are fused_lora/perf's (tests/test_perf_model.py), not this file's.
- sandboxed offsets: partial offsets past 2^31 elements are computed in 64 bits.
"""

import pytest
import torch

pytest.importorskip("triton")

from fused_lora.kernels import config, dense, rows  # noqa: E402
from fused_lora.kernels import launch_plan as lp  # noqa: E402
from tests.kernel_counting import count_launches, loaded_from, program_order  # noqa: E402

H100_TWO_PER_SM = 2 * 132
DTYPES = {"float32": torch.float32, "float16": torch.float16}

# per kernel: argument name -> the plan's tensor name (fused_gemm's operands depend on the direction)
ARG_NAMES = {
    "decode_kernel": {"x_ptr": "x", "w_ptr": "w", "a_ptr": "a", "b_ptr": "b", "t_ptr": "t"},
    "shrink_kernel": {"x_ptr": "x", "a_ptr": "a"},
    "ds_kernel": {"dy_ptr": "dy", "b_ptr": "b"},
    "db_kernel": {"dy_ptr": "dy", "t_ptr": "t"},
    "da_kernel": {"x_ptr": "x", "ds_ptr": "ds"},
}
GEMM_NAMES = {
    False: {"a_ptr": "x", "b_ptr": "w", "lt_ptr": "t", "lr_ptr": "b"},
    True: {"a_ptr": "dy", "b_ptr": "w", "lt_ptr": "ds", "lr_ptr": "a"},
}


@pytest.fixture
def cpu_only(device):
    if device.type != "cpu":
        pytest.skip("counting runs the Triton interpreter (CPU tensors)")


def _run(op: str, s: lp.Shape, path=None):
    """Run `op` at shape s on the interpreter; (launches, weight)."""
    gen = torch.Generator().manual_seed(s.M * 7 + s.N * 3 + s.K)
    dt = DTYPES[s.dtype]
    M, N, K, R = s.M, s.N, s.K, s.R

    def rnd(*shape):
        return torch.randn(*shape, generator=gen)

    x, w = rnd(M, K).to(dt), (rnd(N, K) / K**0.5).to(dt)
    a, b = (rnd(R, K) / K**0.5).to(dt), rnd(N, R).to(dt)
    bias = rnd(N).to(dt) if s.bias else None
    scale, seed = torch.rand(R, generator=gen) + 0.5, torch.tensor([11], dtype=torch.int64)
    ids = torch.tensor([s.adapter_of(m) for m in range(M)], dtype=torch.int64)
    dy = rnd(M, N).to(dt)
    with count_launches() as launches:
        if op == "forward":
            dense.lora_fwd(x, w, bias, a, b, scale, s.rank_ptr, s.dropout_p, seed, path=path)
        elif op == "backward":
            dense.lora_bwd(dy, x, w, a, b, scale, rnd(M, R), s.rank_ptr, s.dropout_p, seed, True)
        elif op == "rows_forward":
            rows.lora_rows_fwd(x, w, bias, a, b, scale, s.rank_ptr, ids, s.dropout_p, seed)
        else:
            t = rnd(M, rows.rank_max(s.rank_ptr))
            rows.lora_rows_bwd(dy, x, w, a, b, scale, t, s.rank_ptr, ids, s.dropout_p, seed, True)
    return launches, w


S = lp.Shape
PLAN_CASES = [
    ("forward", S(5, 131, 300, [5, 9], "float16", [0.0, 0.2], bias=True), "small_m"),  # decode, shrink in pass
    ("forward", S(9, 70, 200, [40], "float32", 0.1), "small_m"),  # decode after a shrink
    ("forward", S(70, 33, 40, [1, 7, 3], "float32", [0.0, 0.3, 0.5], bias=True), None),  # shrink + fused GEMM
    ("backward", S(70, 131, 96, [1, 7, 3], "float16", [0.0, 0.3, 0.5]), None),
    ("rows_forward", S(16, 64, 128, [4] * 6, "float16", 0.0, row_ids=[m % 7 - 1 for m in range(16)], bias=True), None),
    (
        "rows_forward",
        S(100, 40, 48, [16, 5, 1], "float32", [0.0, 0.2, 0.1], row_ids=[m % 4 - 1 for m in range(100)]),
        None,
    ),
    ("rows_backward", S(70, 40, 130, [17, 2], "float16", [0.2, 0.0], row_ids=[m % 3 - 1 for m in range(70)]), None),
]


@pytest.mark.parametrize(
    "op,shape,path",
    PLAN_CASES,
    ids=[f"{c[0]}-M{c[1].M}N{c[1].N}K{c[1].K}-r{'_'.join(map(str, c[1].ranks))}" for c in PLAN_CASES],
)
def test_plan_is_what_the_launchers_launch(cpu_only, op, shape, path):
    launches, _ = _run(op, shape, path)
    planned = lp.plan(op, shape, path=path)
    assert [lc.kernel for lc in launches] == [p.kernel for p in planned]
    backward = op.endswith("backward")
    for got, want in zip(launches, planned):
        assert got.grid == want.grid, got.kernel
        names = GEMM_NAMES[backward] if got.kernel == "fused_gemm_kernel" else ARG_NAMES[got.kernel]
        for arg, tensor in names.items():
            assert got.loaded.get(arg, 0) == want.loads.get(tensor, 0), (got.kernel, tensor)
        if got.kernel == "decode_kernel":  # y's and t's partials (one buffer when t has none)
            partials = got.loaded.get("part_y_ptr", 0) + got.loaded.get("part_t_ptr", 0)
            assert partials == want.loads.get("part", 0) == want.writes.get("part", 0)
        assert "?" not in got.loaded, f"{got.kernel} loaded memory outside its arguments"


# Counted with tests/kernel_counting.py on main at dd3ed58 (the code before issue 13; its kernels are gone):
# (op, M, N, K, ranks, dropout, row ids) -> [(kernel, grid)], W elements loaded, x elements loaded.
BEFORE_COUNTED = [
    (("forward", 5, 131, 300, [5, 9], [0.0, 0.2], None), [("small_m_kernel", (3, 1, 1))], 57600, 43200),
    (("forward", 40, 70, 200, [16], [0.0], None), [("small_m_kernel", (2, 1, 1))], 25600, 51200),
    (
        ("forward", 200, 96, 80, [16], [0.0], None),
        [("shrink_kernel", (4, 1, 1)), ("fused_gemm_kernel", (4, 1, 1))],
        40960,
        36480,
    ),
    (
        ("backward", 200, 80, 96, [16], [0.0], None),
        [
            ("ds_db_kernel", (4, 1, 1)),
            ("sum_partials_kernel", (2, 1, 1)),
            ("da_partial_kernel", (2, 1, 4)),
            ("sum_partials_kernel", (2, 1, 1)),
            ("fused_gemm_kernel", (4, 1, 1)),
        ],
        40960,
        19200,
    ),
    (
        ("rows_forward", 16, 64, 64, [16] * 16, [0.0] * 16, list(range(16))),
        [("_group_rows_kernel", (1, 1, 1)), ("_rows_shrink_kernel", (18, 1, 1)), ("_rows_gemm_kernel", (18, 1, 1))],
        65536,
        2048,
    ),
    (
        ("rows_forward", 16, 64, 64, [16] * 16, [0.0] * 16, [0] * 16),
        [("_group_rows_kernel", (1, 1, 1)), ("_rows_shrink_kernel", (18, 1, 1)), ("_rows_gemm_kernel", (18, 1, 1))],
        4096,
        2048,
    ),
]


@pytest.mark.parametrize("case,launches,w_loads,x_loads", BEFORE_COUNTED)
def test_plan_before_is_what_main_at_dd3ed58_launched(case, launches, w_loads, x_loads):
    op, M, N, K, ranks, dropout, ids = case
    planned = lp.plan_before(op, S(M, N, K, ranks, "float16", dropout, row_ids=ids))
    assert [(p.kernel, p.grid) for p in planned] == launches
    assert sum(p.loads.get("w", 0) for p in planned) == w_loads
    assert sum(p.loads.get("x", 0) for p in planned) == x_loads


@pytest.mark.parametrize("M", [1, 16, 64])
@pytest.mark.parametrize("N", [1024, 4096, 14336])
def test_decode_streams_w_with_two_programs_per_sm_in_one_pass(M, N):
    K = 4096
    launches = lp.plan("forward", S(M, N, K, [16]))
    assert [lc.kernel for lc in launches] == ["decode_kernel"], "the shrink rides in the W pass: one launch"
    (decode,) = launches
    assert decode.programs >= H100_TWO_PER_SM
    assert decode.loads["w"] == N * K, "every W element loaded once"
    tiles_n, bm = N // decode.config["BLOCK_N"], decode.config["BLOCK_M"]
    assert decode.loads["x"] == tiles_n * bm * K, "x loaded once per column tile"
    (before,) = lp.plan_before("forward", S(M, N, K, [16]))
    # before: one program per 64 columns, x loaded twice by each (the W loop, then the shrink loop)
    assert before.programs < H100_TWO_PER_SM and before.loads["x"] == 2 * (N // 64) * bm * K


def test_decode_counted_reads_w_once_and_x_in_one_pass(cpu_only):
    shape = S(3, 128, 512, [8], "float16")
    launches, w = _run("forward", shape, "small_m")
    assert [lc.kernel for lc in launches] == ["decode_kernel"]
    (decode,) = launches
    assert loaded_from(launches, w) == w.numel() and loaded_from(launches, w, distinct=True) == w.numel()
    bm, (planned,) = 16, lp.plan("forward", shape, path="small_m")
    tiles_n = 128 // planned.config["BLOCK_N"]
    assert decode.loaded["x_ptr"] == tiles_n * bm * 512  # per column tile, the x tile of each K step loaded once
    assert decode.grid[0] > tiles_n, "K is split: more programs than column tiles"


@pytest.mark.parametrize("M", [1, 16, 64])
@pytest.mark.parametrize("N", [1024, 4096, 14336])
def test_decode_partials_hold_the_valid_rows_only(M, N):
    """y's partial of each split is N x M fp32 cells (not the BLOCK_M-row tile: 16 x as much at M = 1), t's is
    R x M from column tile 0 alone (the other tiles fold the rank term into y's partial)."""
    (decode,) = lp.plan("forward", S(M, N, 4096, [16]))
    splits = decode.config["splits"]
    if N == 14336 and M <= 16:  # 448 tiles of 32 columns fill an H100 without splitting K: no partials
        assert splits == 1 and "part" not in decode.writes and decode.tail_latencies == 0
        return
    assert splits > 1 and decode.writes["part"] == decode.loads["part"] == splits * (N * M + 16 * M)
    assert decode.loads["b"] == decode.programs * decode.config["BLOCK_N"] * 16, "B's tile in every program"
    if M == 1:
        assert 4 * decode.writes["part"] < 0.25 * 2**20  # 1.8 MiB at N = 1024 when padded to 16 rows


def test_decode_tile_width_trades_splits_for_column_tiles():
    """At M <= 16, 32-column tiles where 64-column ones would need K split to fill an H100: fewer splits (fewer
    partials for the last program to read after the W stream), none at N = 14336; 64 at M = 64, with an in-pass
    dropout mask (it spilled at 32), and from N = 16896 on."""
    from fused_lora.kernels.decode import IN_PASS, decode_config

    splits = {}
    for N, width in ((1024, 32), (4096, 32), (14336, 32), (16896, 64)):
        assert decode_config(16, 2, IN_PASS, False, N=N)["BLOCK_N"] == width
        (decode,) = lp.plan("forward", S(16, N, 4096, [16]))
        assert decode.programs >= H100_TWO_PER_SM and decode.config["BLOCK_N"] == width
        splits[N] = decode.config["splits"]
    assert splits == {1024: 12, 4096: 3, 14336: 1, 16896: 1}  # 23, 6, 4 with 64-column tiles
    assert decode_config(64, 2, IN_PASS, False, N=1024)["BLOCK_N"] == 64
    assert decode_config(16, 2, IN_PASS, True, N=1024)["BLOCK_N"] == 64
    assert decode_config(16, 2, IN_PASS, False)["BLOCK_N"] == 64  # no N (tuning tables): the 64-column table


def test_decode_counted_partials_are_the_valid_cells(cpu_only):
    """Counted on the interpreter: the last program of each column tile reads every split's partial of its valid
    cells once, y's N x M and (column tile 0) t's R x M, and nothing of the tile padding."""
    shape = S(3, 130, 600, [5, 3], "float16", [0.0, 0.2])
    launches, _ = _run("forward", shape, "small_m")
    (decode,) = launches
    (planned,) = lp.plan("forward", shape, path="small_m")
    splits = planned.config["splits"]
    assert splits > 1 and decode.grid[0] == -(-130 // planned.config["BLOCK_N"]) * splits
    assert decode.loaded["part_y_ptr"] == decode.distinct["part_y_ptr"] == splits * 130 * 3
    assert decode.loaded["part_t_ptr"] == decode.distinct["part_t_ptr"] == splits * 8 * 3


@pytest.mark.parametrize("M", [512, 2048, 8192])
def test_prefill_shrink_fills_an_h100(M):
    launches = lp.plan("forward", S(M, 4096, 4096, [16]))
    assert [lc.kernel for lc in launches] == ["shrink_kernel", "fused_gemm_kernel"]
    assert launches[0].programs >= 132
    if M == 512:
        assert lp.plan_before("forward", S(M, 4096, 4096, [16]))[0].programs == 8


def _w_loads(op, shape):
    return sum(lc.loads.get("w", 0) for lc in lp.plan(op, shape))


@pytest.mark.parametrize("op", ["rows_forward", "rows_backward"])
def test_rows_read_w_as_often_as_one_adapter_planned(op):
    decode16 = S(16, 4096, 4096, [16] * 16, row_ids=lp.interleaved(16, 16))
    prefill4 = S(2048, 4096, 4096, [16] * 4, row_ids=lp.interleaved(2048, 4))
    for mixed in (decode16, prefill4):
        one = S(mixed.M, mixed.N, mixed.K, mixed.ranks, row_ids=lp.single(mixed.M))
        assert _w_loads(op, mixed) <= 1.5 * _w_loads(op, one)
        assert _w_loads(op, mixed) == _w_loads(op, one)
    assert sum(lc.loads.get("w", 0) for lc in lp.plan_before(op, decode16)) == 16 * 4096 * 4096


@pytest.mark.parametrize("M,n", [(16, 16), (2048, 4)])
def test_rows_read_w_as_often_as_one_adapter_counted(cpu_only, M, n):
    N = K = 64 if M > 64 else 128
    mixed_shape = S(M, N, K, [4] * n, "float16", row_ids=lp.interleaved(M, n))
    mixed, w = _run("rows_forward", mixed_shape)
    one, w1 = _run("rows_forward", S(M, N, K, [4] * n, "float16", row_ids=lp.single(M)))
    w_mixed, w_one = loaded_from(mixed, w), loaded_from(one, w1)
    assert w_mixed <= 1.5 * w_one
    assert w_mixed == w_one == _w_loads("rows_forward", mixed_shape)


def test_plan_records_each_epilogue_with_or_without_pdl():
    """The work after the K loop (what fused_lora/perf times as a tail, and after a PDL producer) is part of the
    description, the same whether PDL is on; pdl flags only the launch that overlaps its shrink."""
    decode16 = S(16, 4096, 4096, [16] * 16, row_ids=lp.interleaved(16, 16))
    for pdl in (False, True):
        shrink, decode = lp.plan("rows_forward", decode16, pdl=pdl)
        # the ticket, the partials (about 4 splits per trip), then t and B
        assert decode.config["splits"] > 1
        assert decode.tail_latencies == 1 + lp.partial_trips(decode.config["splits"]) + 1
        assert decode.tail_bytes >= 4 * decode.writes["part"] and (decode.pdl, shrink.pdl) == (pdl, False)
        shrink, gemm = lp.plan("forward", S(512, 4096, 4096, [16]), pdl=pdl)
        assert gemm.tail_latencies == 1 and (gemm.pdl, shrink.pdl) == (pdl, False)  # t and B after the K loop
    (in_pass,) = lp.plan("forward", S(16, 4096, 4096, [16]), pdl=True)
    # no producer (the shrink rides in its K loop); ticket and partials only: B and the scales came before the loop
    splits = in_pass.config["splits"]
    assert not in_pass.pdl and splits > 1 and in_pass.tail_latencies == 1 + lp.partial_trips(splits)
    # splits 0 and 1 together, then 4 at a time, then a pair and a single (the loop as ptxas compiled it)
    assert [lp.partial_trips(n) for n in (1, 2, 3, 4, 5, 6, 12, 23)] == [0, 1, 2, 2, 3, 2, 4, 7]
    (dx,) = lp.plan("backward", S(512, 4096, 4096, []), pdl=True)
    assert dx.tail_latencies == 0 and not dx.pdl  # no rank term: a plain GEMM


def _partials(launches) -> int:
    return sum(lc.writes.get("part", 0) for lc in launches)


@pytest.mark.parametrize("r", [16, 64])
def test_backward_partials_do_not_grow_with_m(r):
    small = _partials(lp.plan("backward", S(8192, 14336, 4096, [r])))
    large = _partials(lp.plan("backward", S(65536, 14336, 4096, [r])))
    assert large <= small
    # every partial buffer holds at most MAX_SPLITS partials of the launch's tiles
    for lc in lp.plan("backward", S(65536, 14336, 4096, [r])):
        assert lc.config.get("splits", 1) <= config.MAX_SPLITS
    before = _partials(lp.plan_before("backward", S(65536, 14336, 4096, [r])))
    assert before >= 65536 // 64 * 14336 * r, "before: one dB partial per 64 rows"
    assert large < before / 100


def _fwd_bwd(per_row: bool):
    gen = torch.Generator().manual_seed(5)
    M, K, N = 5, 300, 70
    x, w = torch.randn(M, K, generator=gen).half(), torch.randn(N, K, generator=gen).half()
    a, b = torch.randn(12, K, generator=gen).half(), torch.randn(N, 12, generator=gen).half()
    scale, seed, rank_ptr, ps = torch.rand(12, generator=gen), torch.tensor([5]), [0, 5, 12], [0.0, 0.3]
    dy = torch.randn(M, N, generator=gen).half()
    if per_row:
        ids = torch.tensor([1, -1, 0, 1, 1])
        y, t = rows.lora_rows_fwd(x, w, None, a, b, scale, rank_ptr, ids, ps, seed)
        return [y, t, *rows.lora_rows_bwd(dy, x, w, a, b, scale, t, rank_ptr, ids, ps, seed, True)]
    y, t = dense.lora_fwd(x, w, None, a, b, scale, rank_ptr, ps, seed, path="small_m")
    return [y, t, *dense.lora_bwd(dy, x, w, a, b, scale, t, rank_ptr, ps, seed, True)]


@pytest.mark.parametrize("per_row", [False, True], ids=["dense", "rows"])
def test_split_reductions_do_not_depend_on_program_order(cpu_only, per_row):
    with count_launches() as launches:
        base = _fwd_bwd(per_row)
    assert any(lc.kernel == "decode_kernel" and lc.grid[0] > 3 for lc in launches), "the decode launch splits K"
    assert all(torch.isfinite(v).all() for v in base)
    for order in ("reverse", 3):
        with program_order(order):
            again = _fwd_bwd(per_row)
        for name, u, v in zip(("y", "t", "dx", "dA", "dB"), base, again):
            assert torch.equal(u, v), f"{name} changed when programs ran in {order!r} order"
    assert int(config.split_counters("cpu", 1).abs().sum()) == 0, "a split reduction left a counter set"


def test_partial_offsets_past_int32_are_64_bit(cpu_only):
    """The split reduction addresses split s's partial at part + s * split_stride: with a stride of 2^30 elements
    split 2 lies 2^31 elements in, which a 32-bit product wraps to before the buffer. Sandboxed: nothing is
    written there, the address is recorded."""
    from fused_lora.kernels.lora_backward import db_kernel

    stride = 2**30
    dy = torch.randn(192, 64).half()
    t = torch.randn(192, 16)
    table = torch.zeros(1, 5, dtype=torch.int32)
    db = torch.empty(64, 16, dtype=torch.float16)
    part = torch.zeros(64 * 16)
    counters = torch.zeros(4, dtype=torch.int32)
    with count_launches(guard=True) as launches:
        db_kernel[(1, 1, 3)](
            dy,
            t,
            table,
            table,
            db,
            part,
            counters,
            192,
            64,
            16,
            0,
            3,
            stride,
            64,
            1,
            16,
            BLOCK_M=64,
            BLOCK_N=64,
            BLOCK_R=16,
            PER_ROW=False,
            PRECISION="ieee",
        )
    stray = [addr for kind, addr in launches[0].stray if kind == "store"]
    base = part.data_ptr()
    assert stray, "splits 1 and 2 store past the small buffer"
    assert min(stray) >= base, "a partial offset wrapped below the buffer (32-bit product)"
    assert max(stray) == base + 4 * (2 * stride + 64 * 16 - 1)
