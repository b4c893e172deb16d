"""Decode-time KV policies: which entries of its KV cache an attention layer's decode step reads (base.py has the
contract). `make_policy("quest", ["budget=64"])` builds one from command-line options; `DecoderLM.set_kv_policy`
gives it to every attention layer of a model.

| name | selection | unit | lists |
|---|---|---|---|
| window | sinks + most recent tokens (StreamingLLM) | token | one for all heads |
| quest | top pages by the per-page key bound, plus the current page (Quest) | page of 16 | per query head |
| retrieval | top-k keys (exact or IVF lists) + sinks + recent window (RetrievalAttention) | token | per KV head |
| tokenselect | top tokens by the soft vote of all heads + sinks + recent (TokenSelect) | token | one for all heads |
| tidal | selection layers' top-k tokens, read by the following layers (TidalDecode) | token | per query head |
| recycled | full step every `stride` steps, then its top tokens + new ones (Recycled Attention) | token | per KV head |
| longheads | first, previous, current and top chunks by chunk key, re-positioned (LongHeads) | chunk | per query head |
| act | full cache; hidden sinks' attention scaled by beta on calibrated heads (ACT) | token | per query head |
| razor | retrieval heads: all; others: sinks + recent + a compensation token (RazorAttention) | token | per KV head |
| duo | trained gates: top `full` KV heads read all, the others sinks + recent (DuoAttention) | token | per KV head |
| (landmark) | not a policy: the landmark mixer's top-k block memory (arches/landmark_memory.py) | block | per head |

`probe.py` (ProbePolicy, not in the registry) is the diagnostic of `effarch heads`: full-cache decode that reports each
head's most-attended position and can mask chosen heads.
"""

import dataclasses
import typing

from effarch.layers.kv_policies.act import ACTPolicy
from effarch.layers.kv_policies.base import KVPolicy, PolicyError, Selection
from effarch.layers.kv_policies.base import options as policy_options
from effarch.layers.kv_policies.duo import DuoPolicy
from effarch.layers.kv_policies.longheads import LongHeadsPolicy
from effarch.layers.kv_policies.probe import ProbePolicy
from effarch.layers.kv_policies.quest import QuestPolicy
from effarch.layers.kv_policies.razor import RazorPolicy
from effarch.layers.kv_policies.recycled import RecycledPolicy
from effarch.layers.kv_policies.retrieval import RetrievalPolicy
from effarch.layers.kv_policies.tidal import TidalPolicy
from effarch.layers.kv_policies.tokenselect import TokenSelectPolicy
from effarch.layers.kv_policies.window import WindowPolicy

POLICIES: dict[str, type[KVPolicy]] = {
    p.NAME: p for p in (WindowPolicy, QuestPolicy, RetrievalPolicy, TokenSelectPolicy, TidalPolicy, RecycledPolicy,
                        LongHeadsPolicy, ACTPolicy, RazorPolicy, DuoPolicy)}


def _parse(policy: str, field: dataclasses.Field, text: str):
    kind = typing.get_type_hints(POLICIES[policy])[field.name]
    if kind is int:
        try:
            return int(text)
        except ValueError:
            raise PolicyError(f"kv policy {policy}: {field.name} must be an integer, got {text!r}") from None
    if kind is float:
        try:
            return float(text)
        except ValueError:
            raise PolicyError(f"kv policy {policy}: {field.name} must be a number, got {text!r}") from None
    return None if text.lower() == "none" else text


def make_policy(name: str, options=()) -> KVPolicy:
    """The policy `name` with `options` ("key=value" strings); PolicyError names an unknown policy or a bad option."""
    if name not in POLICIES:
        raise PolicyError(f"unknown kv policy {name!r}; policies: {', '.join(POLICIES)}")
    fields = {f.name: f for f in policy_options(POLICIES[name])}
    kwargs = {}
    for opt in options:
        key, sep, value = opt.partition("=")
        if not sep or key not in fields:
            raise PolicyError(f"kv policy {name}: expected option=value with option in {', '.join(fields)}, got "
                              f"{opt!r}")
        kwargs[key] = _parse(name, fields[key], value)
    return POLICIES[name](**kwargs)


__all__ = ["ACTPolicy", "POLICIES", "DuoPolicy", "KVPolicy", "LongHeadsPolicy", "PolicyError", "ProbePolicy",
           "QuestPolicy", "RazorPolicy", "RecycledPolicy", "RetrievalPolicy", "Selection", "TidalPolicy",
           "TokenSelectPolicy", "WindowPolicy", "make_policy"]
