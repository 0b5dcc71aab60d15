"""Adapter parameter names (module paths as PEFT saw them) -> base checkpoint tensor names.

PEFT keys carry the module path of the model the adapter was trained on; the checkpoint may have been saved
from a differently wrapped model (LlamaModel vs LlamaForCausalLM: "layers.0..." vs "model.layers.0...").
One rule must map every name: the identity, adding a prefix, or stripping one. The identity wins when it
works; otherwise exactly one rule may work, else we refuse and name the competing matches.
"""

from __future__ import annotations

from typing import Callable, Iterable

from fused_lora.merge_cli.errors import MergeError


def _candidates(first: str, base: set[str]) -> list[tuple[str, Callable[[str], str]]]:
    rules: list[tuple[str, Callable[[str], str]]] = []
    dotted = "." + first
    for name in base:
        if name.endswith(dotted):
            prefix = name[: -len(first)]
            rules.append((f"add prefix {prefix!r}", lambda n, p=prefix: p + n))
    parts = first.split(".")
    for i in range(1, len(parts)):
        prefix = ".".join(parts[:i]) + "."
        if first[len(prefix) :] in base:
            rules.append((f"strip prefix {prefix!r}", lambda n, p=prefix: n[len(p) :] if n.startswith(p) else "\0" + n))
    return rules


def resolve_names(needed: Iterable[tuple[str, str, str]], base: set[str]) -> dict[str, str]:
    """needed: (param name in adapter terms, adapter file, adapter key) -> {param name: base tensor name}."""
    needed = list(needed)
    if not needed:
        return {}
    names = [n for n, _f, _k in needed]
    if all(n in base for n in names):
        return {n: n for n in names}
    rules = _candidates(names[0], base) if names[0] not in base else []
    complete = [(label, rule) for label, rule in rules if all(rule(n) in base for n in names)]
    if len(complete) == 1:
        rule = complete[0][1]
        return {n: rule(n) for n in names}
    if len(complete) > 1:
        name, file, key = needed[0]
        options = ", ".join(repr(rule(name)) for _l, rule in complete)
        raise MergeError(file, key, f"ambiguous target: {name!r} could be any of {options} in the base checkpoint")
    # report the first name that the most successful rule (or the identity) leaves unmatched
    best = max([("identity", lambda n: n)] + rules, key=lambda lr: sum(lr[1](n) in base for n in names))
    for name, file, key in needed:
        if best[1](name) not in base:
            how = "" if best[0] == "identity" else f" (tried as {best[1](name)!r}, {best[0]})"
            raise MergeError(file, key, f"matches no base tensor: {name!r} is not in the checkpoint{how}")
    raise AssertionError("unreachable")
