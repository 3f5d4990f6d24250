"""MoE dispatch without row scatters: the helpers of permute.py against
plain jnp indexing, and the three dispatches against plain scatter / one-hot
versions, forward and gradients, in float32 at odd shapes (tolerance
rtol = atol = 1e-5 forward, 1e-4 / 1e-5 gradients); their programs hold no
one-hot slot map and no scatter of rows but expert choice's two sums."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkit.layers.moe import dispatch, routers
from jaxkit.layers.moe.experts import ExpertWeights, LocalExperts
from jaxkit.layers.moe.permute import (add_rows, bincount, combine_rows, gather_rows, sort_ids,
                                       take_rows)
from pallas_kernels import compat

FWD = dict(rtol=1e-5, atol=1e-5)
GRAD = dict(rtol=1e-4, atol=1e-5)


def _close(a, b, tol):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), **tol), a, b)


# ------------------------------------------------------------ helpers

def test_sort_ids_and_bincount():
    ids = jax.random.randint(jax.random.key(0), (37,), 0, 6)  # 5 is padding for 5 experts
    s = sort_ids(ids)
    np.testing.assert_array_equal(s.order, np.argsort(np.asarray(ids), kind="stable"))
    np.testing.assert_array_equal(s.ids, np.sort(np.asarray(ids)))
    np.testing.assert_array_equal(s.inverse[s.order], np.arange(37))
    np.testing.assert_array_equal(bincount(ids, 5), np.bincount(np.asarray(ids), minlength=6)[:5])
    np.testing.assert_array_equal(bincount(ids.reshape(37, 1), 7),
                                  np.bincount(np.asarray(ids), minlength=7))


def _plain_take(x, index):
    """x[index] with zero rows for out-of-range indices, differentiated by JAX."""
    valid = (index < x.shape[0])[:, None]
    return jnp.where(valid, x[jnp.minimum(index, x.shape[0] - 1)], 0.0)


def _row_maps(key, n, m, r):
    """index [m] into n rows, some empty (= n), and its inverse [n, r] (empty = m)."""
    index = jax.random.randint(key, (m,), 0, n + 2)
    index = jnp.where(index >= n, n, index)
    inverse = np.full((n, r), m, np.int32)
    fill = np.zeros(n, np.int32)
    for place, row in enumerate(np.asarray(index)):
        if row < n and fill[row] < r:
            inverse[row, fill[row]] = place
            fill[row] += 1
    keep = np.array([row < n and place in inverse[row] for place, row in enumerate(np.asarray(index))])
    return jnp.where(keep, index, n), jnp.asarray(inverse)


def test_take_rows_equals_plain_gather_forward_and_grad():
    x = jax.random.normal(jax.random.key(1), (11, 7))
    index, inverse = _row_maps(jax.random.key(2), 11, 19, 3)
    g = jax.random.normal(jax.random.key(3), (19, 7))
    f = lambda x: jnp.sum(take_rows(x, index, inverse) * g)
    ref = lambda x: jnp.sum(_plain_take(x, index) * g)
    _close(take_rows(x, index, inverse), _plain_take(x, index), FWD)
    _close(jax.grad(f)(x), jax.grad(ref)(x), GRAD)
    dx = jax.grad(lambda x: jnp.sum(take_rows(x, index, inverse).astype(jnp.float32)))(
        x.astype(jnp.bfloat16))
    assert dx.dtype == jnp.bfloat16


def test_gather_rows_and_add_rows_equal_plain_forward_and_grad():
    """Rows repeated 0..5 times: the gradient sums the copies in float32."""
    x = jax.random.normal(jax.random.key(4), (9, 5))
    index = jax.random.randint(jax.random.key(5), (4, 6), 0, 9)
    g = jax.random.normal(jax.random.key(6), (4, 6, 5))
    _close(gather_rows(x, index), jnp.take(x, index, axis=0), FWD)
    grad = lambda take: jax.grad(lambda x: jnp.sum(take(x, index) * g))(x)
    _close(grad(gather_rows), grad(lambda x, i: jnp.take(x, i, axis=0)), GRAD)
    _close(add_rows(g, index, 9), jnp.zeros((9, 5)).at[index].add(g), FWD)
    r = jax.random.normal(jax.random.key(7), (9, 5))
    grad = lambda add: jax.grad(lambda g: jnp.sum(add(g) * r))(g)
    _close(grad(lambda g: add_rows(g, index, 9)), grad(lambda g: jnp.zeros((9, 5)).at[index].add(g)),
           GRAD)
    # 300 bf16 copies of 1.0078125 (bf16 1.01) sum to 302.34 in float32, rounded once
    # to bf16 302; a bf16 scatter-add stalls where 1 falls below half a bf16 step
    ones = jnp.ones((1, 3), jnp.bfloat16)
    dx = jax.grad(lambda x: jnp.sum(gather_rows(x, jnp.zeros((300,), jnp.int32)) * 1.01))(ones)
    assert dx.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(dx, np.float32), 302.0)


def _plain_combine(y, slot, weight):
    return jnp.einsum("tkd,tk->td", _plain_take(y, slot.reshape(-1)).reshape(*slot.shape, -1),
                      weight)


@pytest.mark.parametrize("T,k,M", [(9, 3, 31), (13, 2, 26)])
def test_combine_rows_equals_plain_forward_and_grads(T, k, M):
    key = jax.random.split(jax.random.key(T), 4)
    # every row holds at most one assignment; some assignments are dropped
    rows = jax.random.permutation(key[0], M)[:T * k].reshape(T, k)
    slot = jnp.where(jax.random.uniform(key[1], (T, k)) < 0.8, rows, M)
    source = jnp.full((M,), T * k, jnp.int32).at[slot.reshape(-1)].set(
        jnp.arange(T * k, dtype=jnp.int32), mode="drop")
    y = jax.random.normal(key[2], (M, 5))
    weight = jax.random.uniform(key[3], (T, k))
    g = jax.random.normal(jax.random.key(0), (T, 5))
    f = lambda y, w: jnp.sum(combine_rows(y, slot, w, source) * g)
    ref = lambda y, w: jnp.sum(_plain_combine(y, slot, w) * g)
    _close(combine_rows(y, slot, weight, source), _plain_combine(y, slot, weight), FWD)
    _close(jax.grad(f, argnums=(0, 1))(y, weight), jax.grad(ref, argnums=(0, 1))(y, weight), GRAD)


# ------------------------------------------------------------ dispatch vs plain versions

def plain_dropless(x, route, experts):
    T, k = route.expert.shape
    flat = route.expert.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    y_sorted = experts.grouped(x[order // k], flat[order])
    y = jnp.zeros_like(y_sorted).at[order].set(y_sorted).reshape(T, k, -1)
    return jnp.einsum("tkd,tk->td", y, route.weight)


def _plain_buffered(x, dispatch_map, combine_map, experts):
    x_e = jnp.einsum("tec,td->ecd", dispatch_map.astype(x.dtype), x)
    return jnp.einsum("tec,ecd->td", combine_map, experts.buffered(x_e))


def plain_capacity(x, route, num_experts, slots, experts):
    T, k = route.expert.shape
    onehot = jax.nn.one_hot(route.expert, num_experts, dtype=jnp.int32)
    by_priority = onehot.transpose(1, 0, 2).reshape(k * T, num_experts)
    position = (jnp.cumsum(by_priority, axis=0) - 1).reshape(k, T, num_experts).transpose(1, 0, 2)
    position = jnp.sum(position * onehot, axis=-1)
    slot = jax.nn.one_hot(position, slots, dtype=jnp.float32)
    onehot = onehot.astype(jnp.float32)
    dispatch_map = jnp.einsum("tke,tkc->tec", onehot, slot)
    combine_map = jnp.einsum("tke,tkc,tk->tec", onehot, slot, route.weight)
    return _plain_buffered(x, dispatch_map, combine_map, experts), jnp.sum(position < slots)


def plain_chosen_by_experts(x, route, experts):
    T = x.shape[0]
    dispatch_map = jax.nn.one_hot(route.token, T, dtype=jnp.float32).transpose(2, 0, 1)
    combine_map = dispatch_map * route.weight[None]
    unchosen = jnp.sum(jnp.sum(dispatch_map, axis=(1, 2)) == 0)
    return _plain_buffered(x, dispatch_map, combine_map, experts), unchosen


def _weights(seed, E, D, H=5):
    k = jax.random.split(jax.random.key(seed), 3)
    return ExpertWeights(jax.random.normal(k[0], (E, D, H)), jax.random.normal(k[1], (E, D, H)),
                         0.3 * jax.random.normal(k[2], (E, H, D)))


def _token_choice(logits, k):
    return routers.topk_softmax(logits, k, renormalize=True)


CASES = {  # name: (new, plain, router, k, capacity factor)
    "dropless": (dispatch.dropless, plain_dropless, _token_choice, 2, None),
    "dropless-k3": (dispatch.dropless, plain_dropless, _token_choice, 3, None),
    "capacity": (dispatch.capacity, plain_capacity, _token_choice, 2, 0.6),  # drops
    "capacity-roomy": (dispatch.capacity, plain_capacity, _token_choice, 3, 2.0),
    "expert_choice": (dispatch.chosen_by_experts, plain_chosen_by_experts,  # T // 4 tokens each
                      routers.expert_choice, None, None),
}


def _case(name, T=13, D=6, E=5, experts=None):
    """(new, plain, run, loss, args): run(fn, x, logits, w) -> (y, count);
    experts(w) builds the experts (default: LocalExperts on the reference gmm)."""
    new, plain, route_fn, k, factor = CASES[name]
    experts = experts or (lambda w: LocalExperts(w, "xla"))
    keys = jax.random.split(jax.random.key(len(name)), 3)
    x = jax.random.normal(keys[0], (T, D))
    logits = 2.0 * jax.random.normal(keys[1], (T, E))
    w = _weights(7, E, D)
    g = jax.random.normal(keys[2], (T, D))
    if factor is not None:
        slots = routers.expert_capacity(T, E, k, factor)
        run = lambda fn, x, logits, w: fn(x, route_fn(logits, k), E, slots, experts(w))
    elif name == "expert_choice":
        run = lambda fn, x, logits, w: fn(x, route_fn(logits, T // 4), experts(w))
    else:
        run = lambda fn, x, logits, w: (fn(x, route_fn(logits, k), experts(w)), 0)
    loss = lambda fn: lambda x, logits, w: jnp.sum(run(fn, x, logits, w)[0] * g)
    return new, plain, run, loss, (x, logits, w)


@pytest.mark.parametrize("name", CASES)
def test_dispatch_equals_plain_forward_and_grads(name):
    new, plain, run, loss, args = _case(name)
    (y, n), (y_ref, n_ref) = (jax.jit(lambda *a, fn=fn: run(fn, *a))(*args) for fn in (new, plain))
    _close(y, y_ref, FWD)
    assert int(n) == int(n_ref)
    grads = [jax.jit(jax.grad(loss(fn), argnums=(0, 1, 2)))(*args) for fn in (new, plain)]
    _close(grads[0], grads[1], GRAD)
    assert np.abs(np.asarray(grads[0][1])).sum() > 0  # the router is trained through the weights


def _primitives(fn, *args):
    """(primitive name, output avals) of every equation, nested jaxprs included."""
    out = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            out.append((eqn.primitive.name, [v.aval for v in eqn.outvars]))
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)
    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return out


class _ScaledRows:
    """Stand-in experts that only scale rows, so that a program holds nothing
    but the dispatch itself."""
    grouped = staticmethod(lambda rows, sorted_expert: 2.0 * rows)
    buffered = staticmethod(lambda x_e: 2.0 * x_e)


@pytest.mark.parametrize("name", CASES)
def test_dispatch_program_has_no_row_scatter_or_one_hot_map(name):
    """Rows are [*, D]; a one-hot slot map has about T * T * k elements.
    Expert choice sums a token's copies by scatter-add (a token has 0..E)."""
    T, D = 64, 7
    new, plain, _, loss, args = _case(name, T=T, D=D, experts=lambda w: _ScaledRows)
    row_scatter = lambda eqns: [p for p, avals in eqns if p.startswith("scatter")
                                and any(a.ndim and a.shape[-1] == D for a in avals)]
    one_hot_map = lambda eqns: [p for p, avals in eqns if any(a.size >= T * T for a in avals)]
    old = _primitives(jax.grad(loss(plain), argnums=(0, 1)), *args)
    assert row_scatter(old) or one_hot_map(old)  # the check sees what the plain versions do
    eqns = _primitives(jax.grad(loss(new), argnums=(0, 1)), *args)
    assert not one_hot_map(eqns)
    scatters = row_scatter(eqns)
    assert scatters == (["scatter-add", "scatter-add"] if name == "expert_choice" else [])


def test_bf16_dropless_close_to_float32():
    """Experts return the compute dtype; the combine still accumulates in
    float32: bf16 results stay within bf16 rounding of the float32 ones."""
    new, _, run, loss, (x, logits, w) = _case("dropless", T=29, D=16)
    bf = lambda t: jax.tree.map(lambda a: a.astype(jnp.bfloat16), t)
    y32 = run(new, x, logits, w)[0]
    y16 = jax.jit(lambda *a: run(new, *a)[0])(bf(x), logits, bf(w))
    assert y16.dtype == jnp.float32
    np.testing.assert_allclose(y16, y32, rtol=3e-2, atol=3e-2 * float(jnp.abs(y32).max()))
    gx = jax.grad(loss(new))(bf(x), logits, bf(w))
    assert gx.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(gx, np.float32), jax.grad(loss(new))(x, logits, w),
                               rtol=5e-2, atol=5e-2 * float(jnp.abs(gx.astype(jnp.float32)).max()))


# ------------------------------------------------------------ two consumers

def test_gmm_consumers_reach_every_grouped_matmul(monkeypatch):
    """model.moe.gmm_consumers and gmm_pingpong go to the gate|up and down
    grouped matmuls (the kernels themselves are tested in pallas_kernels);
    the config refuses them where no Mosaic GPU grouped matmul runs."""
    from jaxkit.config import load_config
    from jaxkit.layers.moe import experts as experts_module

    seen, original = [], experts_module.gmm

    def recording_gmm(*args, consumers=1, pingpong=False, **kwargs):  # 'xla' takes neither
        seen.append((consumers, pingpong))
        return original(*args, **kwargs)
    monkeypatch.setattr(experts_module, "gmm", recording_gmm)
    E, D, H = 3, 8, 5
    keys = jax.random.split(jax.random.key(0), 4)
    w = ExpertWeights(*(jax.random.normal(k, s) for k, s in zip(keys, [(E, D, H), (E, D, H),
                                                                         (E, H, D)])))
    rows = jax.random.normal(keys[3], (10, D))
    ids = jnp.array([0, 0, 1, 1, 1, 2, 2, 2, 2, 3])
    LocalExperts(w, "xla", consumers=2).grouped(rows, ids)
    LocalExperts(w, "xla", consumers=2, pingpong=True).grouped(rows, ids)
    assert seen == [(2, False)] * 2 + [(2, True)] * 2
    with pytest.raises(ValueError, match="gmm_pingpong .* needs gmm_consumers: 2, got 1"):
        load_config(None, ["model.moe.num_experts=4", "model.moe.gmm_pingpong=true"])
    with pytest.raises(ValueError, match="gmm_consumers=2 splits the Mosaic GPU grouped matmuls"):
        load_config(None, ["model.moe.num_experts=4", "model.moe.gmm_consumers=2",
                           "model.moe.gmm_implementation=ragged_dot"])
    with pytest.raises(ValueError, match="needs dispatch 'dropless'"):
        load_config(None, ["model.moe.num_experts=4", "model.moe.gmm_consumers=2",
                           "model.moe.dispatch=capacity"])


@pytest.mark.parametrize("name", ["dropless-k3", "capacity"])
def test_pallas_row_gathers_equal_xla_forward_and_grads(name):
    """permute='pallas' (the row-gather kernel, interpreted on CPU) gives the
    dispatch of permute='xla', forward and gradients."""
    new, _, run, loss, args = _case(name, D=16)
    fns = [lambda *a, fn=new, p=p: fn(*a, p) for p in ("xla", "pallas")]
    (y, n), (y_ref, n_ref) = (jax.jit(lambda *a, f=f: run(f, *a))(*args) for f in fns[::-1])
    _close(y, y_ref, FWD)
    assert int(n) == int(n_ref)
    grads = [jax.jit(jax.grad(loss(f), argnums=(0, 1, 2)))(*args) for f in fns[::-1]]
    _close(grads[0], grads[1], GRAD)


@pytest.mark.skipif(compat.is_hopper(), reason="a Hopper GPU runs the two-consumer kernels")
def test_two_consumers_off_hopper_is_a_one_line_error_before_anything_is_made(tmp_path):
    """configs/moe_1b.yaml (gmm_consumers 2) on a machine without a Hopper GPU:
    one line naming the key and the fix, and no run directory."""
    from jaxkit.run.cli import main
    with pytest.raises(SystemExit, match=r"config error: model.moe.gmm_consumers=2 runs the "
                                         r"Mosaic GPU grouped matmuls, which need a Hopper GPU; "
                                         r".*set model.moe.gmm_consumers=1"):
        main(["train", "configs/moe_1b.yaml", "--run-dir", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()
