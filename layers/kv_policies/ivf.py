"""The inverted-file (IVF) index over a KV cache's keys that `retrieval index=ivf` searches at decode
(layers/kv_policies/retrieval.py; RetrievalAttention, arXiv 2409.10516, §3.2, uses an attention-aware ANNS index in the
same place).

One index per batch row and KV head: C centroids [C, K] and C inverted lists of cache positions, each with `cap`
slots (−1: empty). The centroids come from Lloyd's k-means (L2, `KMEANS_ITERS` iterations started from evenly spaced
keys) over the keys of the first cache write; every key, then and later, is stored in a list. Lists have a fixed
capacity so that a search touches a bounded number of keys: a key whose nearest list is full joins the nearest list
with room (a balanced assignment; with C · cap >= the cache's length every key finds a slot, so nothing is dropped).
When several keys of one write want the same list, the ones nearest its centroid get its last slots.

A search scores the C centroids, then reads the members of the `nprobe` best lists: O(C · K + nprobe · cap · K) per
step, independent of the context when C grows with it (`retrieval`'s `list_size`) and cap stays fixed.

State: {"centroids" [B, H, C, K] f32, "lists" [B, H, C, cap] int32, "fill" [B, H, C] int32 (slots used)}; which
list holds a position is read from "lists" (no per-position array: the state stays O(C · cap)).
"""

import math

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

KMEANS_ITERS = 10  # Lloyd iterations on the first write


def capacity(max_len: int, n_lists: int, slack: float) -> int:
    """Slots per list: slack times the mean list size of a full cache (slack >= 1: every key fits)."""
    return max(1, math.ceil(slack * max_len / n_lists))


def init_index(batch: int, heads: int, head_dim: int, n_lists: int, cap: int) -> dict:
    return {"centroids": jnp.zeros((batch, heads, n_lists, head_dim), jnp.float32),
            "lists": jnp.full((batch, heads, n_lists, cap), -1, jnp.int32),
            "fill": jnp.zeros((batch, heads, n_lists), jnp.int32)}


def kmeans(x: Float[Array, "B H T K"], n: int, iters: int = KMEANS_ITERS) -> Float[Array, "B H n K"]:
    """Centroids of the points x by Lloyd's k-means (L2), started from n evenly spaced points; an empty cluster keeps
    its centroid."""
    T = x.shape[2]
    c = x[:, :, jnp.linspace(0, T - 1, n).round().astype(jnp.int32)]

    def step(c, _):
        onehot = jax.nn.one_hot(jnp.argmin(sq_dist(x, c), axis=-1), n, dtype=x.dtype)  # [B, H, T, n]
        sums = jnp.einsum("BHTC,BHTK->BHCK", onehot, x)
        counts = jnp.sum(onehot, axis=2)[..., None]
        return jnp.where(counts > 0, sums / jnp.maximum(counts, 1.0), c), None

    return jax.lax.scan(step, c, None, length=iters)[0]


def sq_dist(x: Float[Array, "B H T K"], c: Float[Array, "B H C K"]) -> Float[Array, "B H T C"]:
    """Squared L2 distance of every point to every centroid."""
    return (jnp.sum(x * x, axis=-1)[..., None] + jnp.sum(c * c, axis=-1)[:, :, None, :]
            - 2 * jnp.einsum("BHTK,BHCK->BHTC", x, c))


def place(d: Float[Array, "T C"], room: Int[Array, " C"]) -> Int[Array, " T"]:
    """Each point's list: its nearest list with room, the nearest points first where a list cannot take them all.

    Rounds: every unplaced point proposes to its r-th nearest list; a list accepts its nearest proposers up to its
    room. Ends when every point is placed (sum(room) >= T) or every list was proposed to (−1 left: no room)."""
    T, C = d.shape
    pref = jnp.argsort(d, axis=-1).astype(jnp.int32)  # lists, nearest first

    def one_round(carry):
        r, a, room = carry
        c = jnp.where(a < 0, pref[:, jnp.minimum(r, C - 1)], C)  # placed points propose to the dummy list C
        dist = jnp.take_along_axis(d, jnp.minimum(c, C - 1)[:, None], axis=1)[:, 0]
        order = jnp.lexsort((dist, c))  # grouped by list, nearest first
        counts = jnp.bincount(c, length=C + 1)
        rank = jnp.arange(T) - (jnp.cumsum(counts) - counts)[c[order]]
        ok = jnp.zeros((T,), bool).at[order].set(rank < jnp.append(room, 0)[c[order]])
        taken = jnp.bincount(jnp.where(ok, c, C), length=C + 1)[:C]
        return r + 1, jnp.where(ok, c, a), room - taken

    def unfinished(carry):
        r, a, _ = carry
        return (r < C) & jnp.any(a < 0)

    return jax.lax.while_loop(unfinished, one_round, (0, jnp.full((T,), -1, jnp.int32), room))[1]


def add_keys(index: dict, k_new: Float[Array, "B T H K"], pos) -> dict:
    """Index the T keys written at positions pos..pos+T−1; the first write (pos 0, T > 1) also fits the centroids."""
    B, T, H, _ = k_new.shape
    C, cap = index["lists"].shape[2:]
    x = jnp.swapaxes(k_new.astype(jnp.float32), 1, 2)  # [B, H, T, K]
    pos = jnp.asarray(pos, jnp.int32)
    centroids = index["centroids"]
    if T > 1:
        centroids = jax.lax.cond(pos == 0, lambda: kmeans(x, C), lambda: centroids)
    d = sq_dist(x, centroids)
    room = cap - index["fill"]
    if T == 1:  # a decode step: the nearest list with room
        a = jnp.argmin(jnp.where(room[:, :, None, :] > 0, d, jnp.inf), axis=-1).astype(jnp.int32)
    else:
        a = jax.vmap(jax.vmap(place))(d, room)
    # The slot of each new key: its list's fill + its rank among this write's keys of that list (position order).
    counts = jax.nn.one_hot(a, C, dtype=jnp.int32)  # [B, H, T, C]; a −1 (no room) counts nowhere
    rank = jnp.take_along_axis(jnp.cumsum(counts, axis=2) - counts, jnp.maximum(a, 0)[..., None], axis=-1)[..., 0]
    slot = jnp.take_along_axis(index["fill"], jnp.maximum(a, 0), axis=-1) + rank
    b_ix, h_ix = jnp.arange(B)[:, None, None], jnp.arange(H)[None, :, None]
    where_to = jnp.where(a >= 0, slot, cap)  # out of range: dropped (only when the lists are full)
    lists = index["lists"].at[b_ix, h_ix, jnp.maximum(a, 0), where_to].set(
        jnp.broadcast_to(pos + jnp.arange(T, dtype=jnp.int32), (B, H, T)), mode="drop")
    return {"centroids": centroids, "lists": lists, "fill": index["fill"] + jnp.sum(counts, axis=2)}


def probe(index: dict, scores: Float[Array, "B H C"], nprobe: int) -> Int[Array, "B H M"]:
    """The members (cache positions, −1 for empty slots) of the nprobe lists with the best centroid scores,
    M = nprobe · cap."""
    B, H, C, cap = index["lists"].shape
    _, best = jax.lax.top_k(scores, min(nprobe, C))  # [B, H, nprobe]
    return jnp.take_along_axis(index["lists"], best[..., None], axis=2).reshape(B, H, -1)
