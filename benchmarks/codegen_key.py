"""Content keys of the codegen gate's snapshot: a key changes whenever the compiled code of a (spec, arch) could.

A key is the SHA-256 of:
  triton       Triton's own compile-cache key for exactly this compile (triton.runtime.cache.get_cache_key, what
               triton.compile looks its cache up by): the Triton build (its version and the hashes of every compiler,
               language and backend source file and of libtriton), the ptxas version and target arch, the kernel's
               JITFunction.cache_key (its source, its first line number, the cache_key of every @triton.jit function
               it calls, in any module, transitively, and the constexpr globals they read by name), the
               specialization attrs, the signature, the constexprs, every resolved option (num_warps, num_stages and
               the defaults: fp fusion, libdevice's contents, ...) and the cache-invalidating TRITON_* variables
  attributes   the values the kernel and every jit function it reaches read as module attributes
               (`blocks.LIMIT`): Triton 3.9's cache_key hashes a constexpr read by name but not one read through
               its module, although the code changes with it; parameter defaults are added for the same reason
  ptx_patterns the spec's PTX regexes (their matches are part of the recorded result)
  tool         the source of the code that turns a compile into a recorded row (codegen._tool_hash lists it) and
               the cuobjdump binary that reads the SASS
Computing every key imports the kernel modules and compiles nothing.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import inspect
import json
import os
import types

_SKIPPED_ROOTS = ("triton", "math", "copy", "builtins")  # triton's own code is covered by its compile key


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _stable_repr(value):
    """repr for plain data (the same in every process), None for what is not data (functions, classes, modules)."""
    import triton.language as tl

    if isinstance(value, tl.constexpr):
        inner = _stable_repr(value.value)
        return None if inner is None else f"constexpr({inner})"
    if value is None or isinstance(value, (bool, int, float, str, tl.dtype)):
        return repr(value)
    if isinstance(value, (tuple, list)):
        items = [_stable_repr(v) for v in value]
        return None if None in items else f"{type(value).__name__}({', '.join(items)})"
    return None


def _jit_callable_type():
    try:
        from triton.runtime.jit import JITCallable

        return JITCallable
    except ImportError:  # triton < 3.9
        from triton.runtime.jit import JITFunction

        return JITFunction


def _resolve(node, scope):
    """(dotted name, value) of a Name or a module-attribute chain (`a.b.c` with `a` a module), else None."""
    chain = []
    while isinstance(node, ast.Attribute):
        chain.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name) or node.id not in scope:
        return None
    value = scope[node.id]
    if chain and not isinstance(value, types.ModuleType):
        return None
    path = getattr(value, "__name__", node.id) if chain else node.id
    for attr in reversed(chain):
        if isinstance(value, types.ModuleType) and value.__name__.split(".")[0] in _SKIPPED_ROOTS:
            return None
        if not hasattr(value, attr):
            return None
        value, path = getattr(value, attr), f"{path}.{attr}"
    return path, value


_DEPENDENCY_DATA: dict = {}  # id(kernel) -> its dependency_data: many specs share a kernel


def dependency_data(fn) -> list:
    """[(function, name, repr)] of every plain value (constexpr, number, string, dtype) that `fn` and the jit
    functions it reaches read by name, as a module attribute, or as a parameter default. Over-inclusive on purpose
    (a local that shadows a global adds the global): a spurious entry only makes the key change more often."""
    if id(fn) in _DEPENDENCY_DATA:
        return _DEPENDENCY_DATA[id(fn)][1]
    jit_type = _jit_callable_type()
    found, seen = [], set()

    def visit(f):
        if id(f) in seen:
            return
        seen.add(id(f))
        owner = f"{getattr(f, '__module__', '?')}.{getattr(f, '__name__', '?')}"
        scope = f.get_capture_scope() if hasattr(f, "get_capture_scope") else f.__globals__
        for name, default in _defaults(getattr(f, "fn", None)):
            found.append((owner, f"default {name}", _stable_repr(default) or type(default).__name__))
        for node in ast.walk(f.parse()):
            if not isinstance(node, (ast.Name, ast.Attribute)):
                continue
            resolved = _resolve(node, scope)
            if resolved is None:
                continue
            path, value = resolved
            if isinstance(value, jit_type) and hasattr(value, "parse"):
                if value.__module__.split(".")[0] not in _SKIPPED_ROOTS:
                    visit(value)
                continue
            text = _stable_repr(value)
            if text is not None:
                found.append((owner, path, text))

    visit(fn)
    _DEPENDENCY_DATA[id(fn)] = (fn, sorted(set(found)))  # fn kept alive: its id is not reused
    return _DEPENDENCY_DATA[id(fn)][1]


def _defaults(pyfn):
    if pyfn is None:
        return []
    return [
        (name, p.default)
        for name, p in inspect.signature(pyfn).parameters.items()
        if p.default is not inspect.Parameter.empty
    ]


@functools.lru_cache(maxsize=None)
def _file_hash(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _cache_invalidating_env() -> dict:
    try:
        from triton._C.libtriton import get_cache_invalidating_env_vars

        return dict(get_cache_invalidating_env_vars())
    except ImportError:  # older triton: every TRITON_* variable that is not a path or a switch of this tool
        return {
            k: v
            for k, v in os.environ.items()
            if k.startswith("TRITON_") and k not in ("TRITON_CACHE_DIR", "TRITON_INTERPRET")
        }


@functools.lru_cache(maxsize=None)
def _backend(arch: int):
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend

    return make_backend(GPUTarget("cuda", arch, 32))


def key_parts(spec, arch: int, attrs: dict, options: dict, tool_hash: str) -> dict:
    """The hashed parts by name; 'kernel', 'toolchain' and 'config' also say, for a changed key, what changed."""
    from triton.compiler import ASTSource
    from triton.runtime.cache import get_cache_key, triton_key

    backend = _backend(arch)
    resolved = backend.parse_options(dict(options))
    env = _cache_invalidating_env()
    triton = get_cache_key(ASTSource(spec.fn, spec.signature, spec.constexprs, attrs), backend, resolved, env)
    attributes = json.dumps(dependency_data(spec.fn))
    patterns = json.dumps(sorted(spec.extra.get("ptx_patterns", {}).items()))
    return {
        "key": sha256("\n".join([triton, attributes, patterns, tool_hash])),
        "kernel": sha256(spec.fn.cache_key + attributes)[:16],
        "toolchain": sha256(f"{triton_key()}-{backend.hash()}-{sorted(env.items())}-{tool_hash}")[:16],
        "config": sha256(
            f"{sorted(spec.signature.items())}-{sorted(spec.constexprs.items(), key=str)}-{attrs}-"
            f"{resolved.hash()}-{patterns}"
        )[:16],
    }


def tool_hash(code: list, tools: list) -> str:
    """Source of the measuring code and contents of the binaries it runs."""
    texts = [inspect.getsource(obj) if callable(obj) else repr(obj) for obj in code]
    return sha256("\n".join(texts + [_file_hash(path) for path in tools]))
