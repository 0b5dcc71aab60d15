"""Counting what Triton kernels do, on CPU: every launch's grid and the elements each kernel loads per tensor.

Under the Triton interpreter (TRITON_INTERPRET=1, CPU tensors) kernel pointers are the tensors' real addresses.
`count_launches()` patches the interpreter while it is active:
  - the grid executor records each launch: kernel name, grid, and the address range of every tensor argument;
  - the builder's masked load attributes every masked-in element to the argument whose storage holds its address.

    with count_launches() as launches:
        lora_fwd(...)
    launches[0].kernel, launches[0].grid, launches[0].programs
    launches[0].loaded["w_ptr"]      elements loaded from W, repeats included (what crosses L2 -> SM)
    launches[0].distinct["w_ptr"]    distinct elements of W loaded (what a perfect cache would fetch from HBM)
    loaded_from(launches, weight)    the same, summed over launches, for one tensor whatever its argument name

Arguments that share storage (a placeholder passed twice) are attributed to the first one in signature order.
Loads that hit no tensor argument are counted under "?" (a bug in a kernel's addressing, or memory the kernel
was not given). Atomic read-modify-writes are not loads and are not counted. The interpreter runs programs one
after another, so counts are exact and deterministic.

`count_launches(guard=True)` also sandboxes memory: a load or store whose address lies outside every tensor
argument is not performed (a load reads 0) and its byte address is kept in launch.stray ("load"/"store",
address), so offset arithmetic can be checked with arguments that point far past small buffers.

`program_order(order)` runs each launch's programs in another order ("reverse", or an int seed for a random
permutation): every program still runs once, so a kernel whose result depends on which program runs last (an
arrival-order reduction) shows it.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch


@dataclass
class Launch:
    kernel: str
    grid: tuple
    ranges: list = field(default_factory=list)  # (name, start byte, end byte, element size)
    loaded: dict = field(default_factory=dict)  # argument name -> elements loaded (repeats included)
    distinct: dict = field(default_factory=dict)  # argument name -> distinct elements loaded
    stray: list = field(default_factory=list)  # guard mode: (kind, byte address) of skipped accesses
    _addresses: dict = field(default_factory=dict, repr=False)

    @property
    def programs(self) -> int:
        return int(np.prod(self.grid))

    def storage_of(self, name: str) -> int:
        for arg, start, _, _ in self.ranges:
            if arg == name:
                return start
        raise KeyError(name)


def _tensor_ranges(fn, args, kwargs) -> list:
    params = inspect.signature(fn).parameters
    # launch options (num_warps, num_stages, ...) are not kernel arguments
    bound = inspect.signature(fn).bind_partial(*args, **{k: v for k, v in kwargs.items() if k in params})
    ranges, seen = [], set()
    for name, value in bound.arguments.items():
        if not isinstance(value, torch.Tensor):
            continue
        storage = value.untyped_storage()
        start = storage.data_ptr()
        if start in seen:
            continue
        seen.add(start)
        ranges.append((name, start, start + storage.nbytes(), value.element_size()))
    return ranges


_current: list = []
_STRAY_KEPT = 4096  # guard mode keeps at most this many stray addresses per launch


def _in_ranges(launch: Launch, addresses: np.ndarray) -> np.ndarray:
    inside = np.zeros(addresses.shape, dtype=bool)
    for _, start, end, _ in launch.ranges:
        inside |= (addresses >= start) & (addresses < end)
    return inside


def _attribute(ptrs: np.ndarray, mask: np.ndarray) -> None:
    if not _current:
        return
    launch = _current[-1]
    addresses = np.asarray(ptrs, dtype=np.uint64)[np.asarray(mask, dtype=bool)].ravel()
    if addresses.size == 0:
        return
    claimed = np.zeros(addresses.shape, dtype=bool)
    for name, start, end, _size in launch.ranges:
        inside = (addresses >= start) & (addresses < end)
        n = int(inside.sum())
        if n:
            claimed |= inside
            launch.loaded[name] = launch.loaded.get(name, 0) + n
            launch._addresses.setdefault(name, []).append(np.unique(addresses[inside]))
    stray = int((~claimed).sum())
    if stray:
        launch.loaded["?"] = launch.loaded.get("?", 0) + stray


def _sandbox(kind: str, ptrs, mask, guard: bool):
    """The mask with out-of-range lanes switched off (guard mode), recording their addresses."""
    if not guard or not _current:
        return mask
    launch = _current[-1]
    addresses = np.asarray(ptrs.data, dtype=np.uint64)
    on = np.asarray(mask.data, dtype=bool)
    outside = on & ~_in_ranges(launch, addresses)
    if not outside.any():
        return mask
    room = _STRAY_KEPT - len(launch.stray)
    launch.stray.extend((kind, int(a)) for a in addresses[outside].ravel()[: max(0, room)])
    from triton.runtime.interpreter import TensorHandle

    return TensorHandle(on & ~outside, mask.dtype)


@contextlib.contextmanager
def count_launches(guard: bool = False) -> Iterator[list]:
    """Record every interpreted launch made inside the block (see the module docstring)."""
    from triton.runtime import interpreter

    launches: list = []
    executor_call = interpreter.GridExecutor.__call__
    masked_load = interpreter.InterpreterBuilder.create_masked_load
    masked_store = interpreter.InterpreterBuilder.create_masked_store

    def call(self, *args, **kwargs):
        grid = self.grid
        if callable(grid):
            params = inspect.signature(self.fn).parameters
            grid = grid(inspect.getcallargs(self.fn, *args, **{k: v for k, v in kwargs.items() if k in params}))
        grid = tuple(int(g) for g in grid) + (1,) * (3 - len(grid))
        launch = Launch(kernel=self.fn.__name__, grid=grid, ranges=_tensor_ranges(self.fn, args, kwargs))
        launches.append(launch)
        _current.append(launch)
        try:
            return executor_call(self, *args, **kwargs)
        finally:
            _current.pop()
            for name, chunks in launch._addresses.items():
                launch.distinct[name] = int(np.unique(np.concatenate(chunks)).size)
            launch._addresses.clear()

    def load(self, ptrs, mask, other, cache_policy, is_volatile):
        mask = _sandbox("load", ptrs, mask, guard)
        _attribute(ptrs.data, mask.data)
        return masked_load(self, ptrs, mask, other, cache_policy, is_volatile)

    def store(self, ptrs, value, mask, cache_policy):
        return masked_store(self, ptrs, value, _sandbox("store", ptrs, mask, guard), cache_policy)

    interpreter.GridExecutor.__call__ = call
    interpreter.InterpreterBuilder.create_masked_load = load
    interpreter.InterpreterBuilder.create_masked_store = store
    try:
        yield launches
    finally:
        interpreter.GridExecutor.__call__ = executor_call
        interpreter.InterpreterBuilder.create_masked_load = masked_load
        interpreter.InterpreterBuilder.create_masked_store = masked_store


@contextlib.contextmanager
def program_order(order) -> Iterator[None]:
    """Run every launch's programs in `order`: "reverse", or an int seed for a random permutation.

    The interpreter walks the grid in order and announces each program with set_grid_idx; this maps the k-th
    announced index to the k-th index of the permuted list, a bijection of the grid, so each program still runs
    exactly once."""
    from triton.runtime import interpreter

    set_dim = interpreter.InterpreterBuilder.set_grid_dim
    set_idx = interpreter.InterpreterBuilder.set_grid_idx

    def grid_dim(self, nx, ny, nz):
        set_dim(self, nx, ny, nz)
        every = [(x, y, z) for x in range(nx) for y in range(ny) for z in range(nz)]
        permuted = (
            every[::-1]
            if order == "reverse"
            else [every[i] for i in np.random.default_rng(int(order)).permutation(len(every))]
        )
        self._program_map = dict(zip(every, permuted))

    def grid_idx(self, x, y, z):
        set_idx(self, *self._program_map[(x, y, z)])

    interpreter.InterpreterBuilder.set_grid_dim = grid_dim
    interpreter.InterpreterBuilder.set_grid_idx = grid_idx
    try:
        yield
    finally:
        interpreter.InterpreterBuilder.set_grid_dim = set_dim
        interpreter.InterpreterBuilder.set_grid_idx = set_idx


def loaded_from(launches: list, tensor: torch.Tensor, distinct: bool = False) -> int:
    """Elements loaded from `tensor`'s storage over all launches (distinct per launch when asked)."""
    start = tensor.untyped_storage().data_ptr()
    total = 0
    for launch in launches:
        for name, begin, _, _ in launch.ranges:
            if begin == start:
                total += (launch.distinct if distinct else launch.loaded).get(name, 0)
    return total
