"""Provenance analysis: consumer table, views, scan slicing, tied weights, coverage.

Expected values are written out by hand from the functions below.
"""

import jax
import jax.numpy as jnp
from jax import lax
from zoo import by_name

import maas_jax


def test_views_scan_consts_and_sliced_xs():
    def f(p, x):
        w = p["w"].astype(jnp.bfloat16).T  # two views
        h = x.astype(jnp.bfloat16) @ w

        def body(c, layer_w):
            return jnp.tanh(c @ layer_w + p["b"]), None

        h, _ = lax.scan(body, h.astype(jnp.float32), p["stack"])
        return h

    params = {"w": jnp.ones((4, 3)), "b": jnp.ones(4), "stack": jnp.ones((2, 4, 4))}
    prog = maas_jax.trace(f, params, jnp.ones((5, 3)))
    table = maas_jax.consumers(prog)
    (w_use,) = table["w"]
    assert (w_use.primitive, w_use.operand, w_use.regions) == ("dot_general", 1, ())
    assert [v for v, _ in w_use.views] == ["convert_element_type", "transpose"]
    assert dict(w_use.dims) == {"batch": ((), ()), "contracting": ((1,), (0,))}
    (s_use,) = table["stack"]
    assert (s_use.primitive, s_use.operand, s_use.regions, s_use.sliced) == (
        "dot_general",
        1,
        ("scan",),
        1,
    )
    (b_use,) = table["b"]
    assert (b_use.primitive, b_use.regions, b_use.sliced) == ("add", ("scan",), 0)
    assert [v for v, _ in b_use.views] == ["broadcast_in_dim"]


def test_tied_embedding_has_a_gather_and_a_dot():
    m = by_name("tied_embeddings")
    prog = maas_jax.trace(m.fn, m.params, *m.inputs)
    uses = maas_jax.consumers(prog)["params/embed/embedding"]
    assert sorted(u.primitive for u in uses) == ["dot_general", "gather"]
    dot = next(u for u in uses if u.primitive == "dot_general")
    assert "attend" in dot.name_stack


def test_cond_branches_while_bodies_and_shard_map_are_seen():
    m = by_name("pure_control_flow")
    table = maas_jax.consumers(maas_jax.trace(m.fn, m.params, *m.inputs))
    assert {"while"} <= {r for u in table["w_loop"] for r in u.regions}
    assert {"cond"} <= {r for u in table["w2"] for r in u.regions}
    s = by_name("shard_map_8dev")
    table = maas_jax.consumers(maas_jax.trace(s.fn, s.params, *s.inputs))
    for path in ("w1", "w2"):
        assert all("shard_map" in u.regions for u in table[path])
        assert any(u.primitive == "dot_general" for u in table[path])


def test_coverage_counts_every_contraction_recursively():
    m = by_name("linen_scan_remat_transformer")
    prog = maas_jax.trace(m.fn, m.params, *m.inputs)
    cov = maas_jax.coverage(prog)
    # 6 weight matmuls per layer (inside one scan body), 2 attention matmuls, 1 head.
    assert len(cov) == 9
    assert sum(e.operands.count("activation") == 2 for e in cov) == 2
    assert all(not e.touched for e in cov)
    report = maas_jax.coverage_report(prog)
    assert report.splitlines()[-1] == (
        "9 contractions, 7 with a parameter operand, 0 touched by a pass, 0 on integers, 0 opaque"
    )
    assert all("scan > remat" in line for line in report.splitlines() if "layers/q" in line)


def test_param_report_lists_bytes_and_logical_axes():
    m = by_name("linen_scan_remat_transformer")
    text = maas_jax.param_report(maas_jax.trace(m.fn, m.params, *m.inputs))
    q_line = next(line for line in text.splitlines() if line.startswith("params/layers/q/kernel"))
    assert "3x16x16" in q_line and "3.0 KiB" in q_line and "layers,embed" in q_line


def test_primitive_counts_recurse():
    def f(p, x):
        return jax.jit(lambda y: lax.cond(y.sum() > 0, jnp.sin, jnp.cos, y @ p))(x)

    counts = maas_jax.primitive_counts(maas_jax.trace(f, jnp.ones((2, 2)), jnp.ones(2)))
    assert counts["jit"] == 1 and counts["cond"] == 1 and counts["sin"] == 1 and counts["cos"] == 1
    assert counts["dot_general"] == 1
