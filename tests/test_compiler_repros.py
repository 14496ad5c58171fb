"""Convolutions whose patterns abort XLA's CPU compiler unless jaxconv works around them: an input
axis shorter than the kernel, a short unstrided axis beside a strided one, the weight tangent of
a short dilated axis. Each program runs in a subprocess against PyTorch in float64."""

import subprocess
import sys


def _runs_cleanly(script: str) -> None:
    """Run ``script`` in a fresh interpreter: a compiler abort fails the test, not the session."""
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]


CRASH_REPRO = """
import jax, jax.numpy as jnp, numpy as np, torch, jaxconv
jax.config.update("jax_enable_x64", True)
rng = np.random.default_rng(0)
y, w = rng.standard_normal((5, 2, 1)), rng.standard_normal((2, 3, 2, 1))
f = lambda y, w: jaxconv.conv_transpose(y, w, stride=2, padding=1)
out = jax.jit(f)(jnp.asarray(y), jnp.asarray(w))
gy, gw = jax.jit(jax.grad(lambda y, w: (f(y, w) ** 2).sum(), argnums=(0, 1)))(y, w)
ty = torch.tensor(y.transpose(2, 0, 1)[None], requires_grad=True)
tw = torch.tensor(w.transpose(3, 2, 0, 1), requires_grad=True)
tout = torch.nn.functional.conv_transpose2d(ty, tw, stride=2, padding=1)
(tout ** 2).sum().backward()
np.testing.assert_allclose(np.asarray(out).transpose(2, 0, 1), tout[0].detach().numpy(), rtol=1e-10)
np.testing.assert_allclose(np.asarray(gy), ty.grad[0].numpy().transpose(1, 2, 0), rtol=1e-10)
np.testing.assert_allclose(np.asarray(gw), tw.grad.numpy().transpose(2, 3, 1, 0), rtol=1e-10)
# The gradient of a strided conv whose output is shorter than the kernel is the same XLA pattern.
x = rng.standard_normal((1, 8, 3, 2))
g = lambda x, w: jaxconv.conv(x, w, stride=2, padding=1)
gx, gw = jax.jit(jax.grad(lambda x, w: (g(x, w) ** 2).sum(), argnums=(0, 1)))(x, w)
tx = torch.tensor(np.ascontiguousarray(x.transpose(0, 3, 1, 2)), requires_grad=True)
tw = torch.tensor(np.ascontiguousarray(w.transpose(3, 2, 0, 1)), requires_grad=True)
(torch.nn.functional.conv2d(tx, tw, stride=2, padding=1) ** 2).sum().backward()
np.testing.assert_allclose(np.asarray(gx), tx.grad.numpy().transpose(0, 2, 3, 1), rtol=1e-10)
np.testing.assert_allclose(np.asarray(gw), tw.grad.numpy().transpose(2, 3, 1, 0), rtol=1e-10)
"""


def test_short_axes_do_not_crash_the_compiler():
    """An input axis shorter than the kernel aborts XLA's CPU compiler unless padded; run in a
    subprocess so that a crash fails this test instead of killing the test session."""
    _runs_cleanly(CRASH_REPRO)


GROUP_WINDOW_REPRO = """
import jax, jax.numpy as jnp, numpy as np, torch, jaxconv
jax.config.update("jax_enable_x64", True)
rng = np.random.default_rng(0)
x, w = rng.standard_normal((2, 6, 4, 2)), rng.standard_normal((3, 2, 2, 1))
g = lambda x, w: jaxconv.conv(x, w, stride=(1, 2), padding=(0, 1), dilation=(2, 1))
gx, gw = jax.jit(jax.grad(lambda x, w: (g(x, w) ** 2).sum(), argnums=(0, 1)))(x, w)
hx = jax.jit(jax.hessian(lambda x: (g(x, w) ** 2).sum()))(x)
tx = torch.tensor(np.ascontiguousarray(x.transpose(0, 3, 1, 2)), requires_grad=True)
tw = torch.tensor(np.ascontiguousarray(w.transpose(3, 2, 0, 1)), requires_grad=True)
t = torch.nn.functional.conv2d(tx, tw, stride=(1, 2), padding=(0, 1), dilation=(2, 1))
(t ** 2).sum().backward()
np.testing.assert_allclose(np.asarray(gx), tx.grad.numpy().transpose(0, 2, 3, 1), rtol=1e-10)
np.testing.assert_allclose(np.asarray(gw), tw.grad.numpy().transpose(2, 3, 1, 0), rtol=1e-10)
assert np.isfinite(np.asarray(hx)).all()
# conv_transpose with the same pattern: kernel 2, stride 2, padding 1 on axis 1.
y = rng.standard_normal((2, 2, 5, 1))
f = lambda y, w: jaxconv.conv_transpose(y, w, stride=(1, 2), padding=(0, 1), dilation=(2, 1))
gy, gw = jax.jit(jax.grad(lambda y, w: (f(y, w) ** 2).sum(), argnums=(0, 1)))(y, w)
ty = torch.tensor(np.ascontiguousarray(y.transpose(0, 3, 1, 2)), requires_grad=True)
tw = torch.tensor(np.ascontiguousarray(w.transpose(3, 2, 0, 1)), requires_grad=True)
t = torch.nn.functional.conv_transpose2d(ty, tw, stride=(1, 2), padding=(0, 1), dilation=(2, 1))
(t ** 2).sum().backward()
np.testing.assert_allclose(np.asarray(gy), ty.grad.numpy().transpose(0, 2, 3, 1), rtol=1e-10)
np.testing.assert_allclose(np.asarray(gw), tw.grad.numpy().transpose(2, 3, 1, 0), rtol=1e-10)
"""


def test_short_unstrided_axis_beside_a_strided_one_does_not_crash_the_compiler():
    _runs_cleanly(GROUP_WINDOW_REPRO)


WEIGHT_TANGENT_REPRO = """
import jax, jax.numpy as jnp, numpy as np, torch, jaxconv
jax.config.update("jax_enable_x64", True)
rng = np.random.default_rng(0)
cases = [  # (y channels_last, w (*k, out, in)) and keywords: an axis with stride 1, dilation 2
    ((2, 5, 1), (4, 3, 1, 1), dict(padding=(1, 0), dilation=(2, 1))),  # and 2 outputs
    ((2, 5, 1), (3, 2, 2, 1), dict(stride=(1, 2), padding=(1, 2), output_padding=(0, 1),
                                   dilation=(2, 3))),
]
for y_shape, w_shape, kw in cases:
    y, w, tw = (rng.standard_normal(s) for s in (y_shape, w_shape, w_shape))
    f = lambda w: jaxconv.conv_transpose(jnp.asarray(y), w, **kw)
    _, tangent = jax.jvp(f, (jnp.asarray(w),), (jnp.asarray(tw),))
    hvp = jax.grad(lambda w: (jax.grad(lambda w: (f(w) ** 2).sum())(w) ** 2).sum())(w)
    ty = torch.tensor(y.transpose(2, 0, 1)[None])
    tws = [torch.tensor(np.ascontiguousarray(a.transpose(3, 2, 0, 1)), requires_grad=True)
           for a in (w, tw)]
    tf = lambda w: torch.nn.functional.conv_transpose2d(ty, w, **kw)
    _, t_tangent = torch.autograd.functional.jvp(tf, tws[0], tws[1])
    g = torch.autograd.grad((tf(tws[0]) ** 2).sum(), tws[0], create_graph=True)[0]
    (t_hvp,) = torch.autograd.grad((g ** 2).sum(), tws[0])
    np.testing.assert_allclose(np.asarray(tangent), t_tangent[0].numpy().transpose(1, 2, 0),
                               rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(np.asarray(hvp), t_hvp.numpy().transpose(2, 3, 1, 0), rtol=1e-10)
"""


def test_weight_tangent_of_a_short_dilated_axis_does_not_crash_the_compiler():
    """conv_transpose's forward-mode weight derivative, and its gradient of a gradient, on an
    axis with stride 1, dilation 2 and 2 convolution outputs, against PyTorch."""
    _runs_cleanly(WEIGHT_TANGENT_REPRO)
