"""USP (Fang & Zhao 2024): Ulysses x ring sequence parallelism on a 2-D device mesh.

The W = U x R ranks form a mesh with a "ulysses" dimension of size U (put it on the
fast links, e.g. the GPUs of one node) and a "ring" dimension of size R (across nodes).
The sequence is laid out over the ring dimension with a ring layout (zigzag by
default), and each ring shard is cut into U equal contiguous parts over the Ulysses
dimension (:func:`shard_sequence` with the mesh as its group does exactly this).

Per call: inside each Ulysses group an all-to-all turns (B, H, N/W, D) into
(B, H/U, N/R, D) - the whole ring shard for H/U heads - then ring attention runs over
the ring dimension (each ring group holds the same H/U heads), and one all-to-all
brings the output back. Per rank: 4 all-to-alls of its shard inside the Ulysses group
(volume independent of U) plus R - 1 ring transfers of its K/V ring shard for H/U heads.
"""

from __future__ import annotations

import torch

from .._reference import expand_kv_heads
from ..checks import (
    check_flag,
    check_head_vector,
    check_scale,
    check_softcap,
)
from ._comm import Field, agree_2d, input_fields
from .layout import check_layout, check_mesh_length, check_shards, mesh_groups
from .ring import ring_attention
from .ulysses import _heads_to_seq, _seq_to_heads


def usp_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mesh, *, causal: bool = False,
                  scale: float | None = None, softcap: float | None = None,
                  sink_logits: torch.Tensor | None = None, layout: str = "zigzag", return_lse: bool = False):
    """Exact softmax attention over a sequence sharded on a 2-D (Ulysses x ring) mesh.

    Args:
        q: (B, Hq, N/W, D), k: (B, Hkv, N/W, D), v: (B, Hkv, N/W, Dv): this rank's
            shards, W = U x R, as ``shard_sequence(x, layout=layout, group=mesh)`` gives
            them; the same shapes and dtype on every rank. Hq must be divisible by U;
            Hkv divides Hq (GQA: K/V are expanded to Hq heads first when U does not
            divide Hkv).
        mesh: a 2-D ``torch.distributed.device_mesh.DeviceMesh`` with dimensions named
            "ulysses" (size U) and "ring" (size R), in either order, e.g.
            ``init_device_mesh("cuda", (R, U), mesh_dim_names=("ring", "ulysses"))``.
        causal: causal mask over the global positions.
        scale: score scale, default 1/sqrt(D). softcap: s <- softcap * tanh(s / softcap).
        sink_logits: (Hq,) per-head logit added to every row's softmax denominator with
            no value (gpt-oss); differentiable.
        layout: the ring layout, "zigzag" (default), "striped" or "contiguous".
        return_lse: also return the LSE (B, Hq, N/W), float32.

    Returns:
        out (B, Hq, N/W, Dv) in q's dtype, this rank's shard (same layout), or
        (out, lse). Differentiable in q, k, v and sink_logits.

    Raises:
        TypeError/ValueError naming ``mesh`` for a mesh that is not 2-D with the two named
        dimensions; ValueError/TypeError on every rank of the mesh, before any transfer,
        when a rank's input is invalid (Hq not divisible by U, a length the layout cannot
        split over the mesh, an unknown layout...; the message names the argument) or when
        the ranks' shapes, dtypes or options differ.

    Examples::

        >>> mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("ulysses", "ring"))
        >>> q, k, v = (shard_sequence(t, layout="zigzag", group=mesh) for t in (q_all, k_all, v_all))
        >>> out = usp_attention(q, k, v, mesh, causal=True)               # (B, Hq, N/4, Dv)
        >>> whole = unshard_sequence(out, layout="zigzag", group=mesh)   # (B, Hq, N, Dv)
    """
    m = mesh_groups(mesh)       # the same mesh on every rank: the same error everywhere, no transfer
    U, R = m.ulysses_size, m.ring_size

    def check():                # this rank's arguments; agree_2d() makes every rank raise if one fails
        shapes = check_shards("usp_attention", q, k, v)
        options = (check_flag("causal", causal), check_scale(scale, shapes.head_dim), check_softcap(softcap))
        check_flag("return_lse", return_lse)
        check_layout(layout)
        if shapes.heads_q % U != 0:
            raise ValueError(f"usp_attention needs the number of query heads of q ({shapes.heads_q}) to be divisible "
                             f"by the size of the mesh's 'ulysses' dimension ({U})")
        check_mesh_length(shapes.seqlen_q * U * R, layout, m, name="the sequence length N")
        if sink_logits is not None:
            check_head_vector("sink_logits", sink_logits, shapes.heads_q, q)
        sizes = (shapes.batch, shapes.heads_q, shapes.heads_kv, shapes.seqlen_q, shapes.head_dim, shapes.head_dim_v)
        fields = input_fields("the shapes of q, k and v (B, Hq, Hkv, N/W, D, Dv)", sizes, "q, k and v", q)
        fields += [Field("layout", layout), *map(Field, ("causal", "scale", "softcap"), options),
                   Field("sink_logits", sink_logits), Field("return_lse", return_lse)]
        return options, fields

    is_causal, sm_scale, cap = agree_2d("usp_attention", check, (m.ulysses_group, U, "ulysses"),
                                           (m.ring_group, R, "ring"))
    heads = q.shape[1] // U
    if U > 1:
        if k.shape[1] % U != 0:
            k, v = expand_kv_heads(k, q.shape[1]), expand_kv_heads(v, q.shape[1])
        q, k, v = (_seq_to_heads(t, m.ulysses_group, U) for t in (q, k, v))   # (B, Hq/U, N/R, D)
    if sink_logits is not None:     # the heads this rank runs (the same slice in its ring group)
        sink_logits = sink_logits[m.ulysses_rank * heads:(m.ulysses_rank + 1) * heads]
    out, lse = ring_attention(q, k, v, group=m.ring_group, layout=layout, causal=is_causal, scale=sm_scale,
                              softcap=cap, sink_logits=sink_logits, return_lse=True)
    if U > 1:
        out = _heads_to_seq(out, m.ulysses_group, U)
        if return_lse:
            lse = _heads_to_seq(lse.unsqueeze(-1), m.ulysses_group, U).squeeze(-1)
    return (out, lse) if return_lse else out
