"""The benchmark cases: one :class:`Case` per (op, configuration, shape, mode, dtype).

Shapes are channels_last, ``(N, *spatial, C)``, the layout every JAX peer runs in; the PyTorch
peers get the same data in NCHW and in channels_last memory format. The full list follows the
speed issue (max 3x3 s2 p1 on the ResNet stem shapes, 2x2 max and avg, 3x3 s1 avg with and without
padding in the count, Lp with p=2 and p=8, global average, adaptive, fractional, unpooling, 1-D and
3-D pooling, convolution); ``quick`` keeps one or two configurations per op on smaller shapes.
"""

import dataclasses

MODES = ("fwd", "fwdbwd")
DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmark case.

    Attributes:
        op: the jaxconv function name (``"max_pool"``, ``"conv"``, ...).
        label: a short human description of the configuration, e.g. ``"max 3x3 s2 p1"``.
        shape: channels_last input shape ``(N, *spatial, C)``.
        mode: ``"fwd"`` (forward only) or ``"fwdbwd"`` (forward and the vjp of a fixed cotangent).
        dtype: ``"float32"`` or ``"bfloat16"``.
        window: per-axis window (kernel) size.
        stride: per-axis stride.
        padding: symmetric padding on every spatial axis.
        p: the Lp pooling exponent.
        count_include_pad: the average pooling divisor rule.
        output_size: adaptive pooling output size.
        ratio: fractional pooling output ratio.
        features: convolution output channels.
        groups: convolution feature groups.
        output_padding: transposed convolution output padding.
    """

    op: str
    label: str
    shape: tuple[int, ...]
    mode: str = "fwd"
    dtype: str = "float32"
    window: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    padding: int = 0
    p: float = 2.0
    count_include_pad: bool = True
    output_size: tuple[int, ...] = ()
    ratio: float = 0.5
    features: int = 0
    groups: int = 1
    output_padding: int = 0

    @property
    def n(self) -> int:
        """Number of spatial dimensions."""
        return len(self.shape) - 2

    @property
    def name(self) -> str:
        """A unique, filterable name: label, mode, dtype and shape."""
        dims = "x".join(str(d) for d in self.shape)
        return f"{self.label} {self.mode} {self.dtype} {dims}"


def _grid(base: Case, modes=MODES, dtypes=DTYPES) -> list[Case]:
    """``base`` in every mode and dtype."""
    return [dataclasses.replace(base, mode=m, dtype=d) for m in modes for d in dtypes]


def _pool(op, label, shape, k, s, pad=0, **kw) -> Case:
    n = len(shape) - 2
    return Case(op, label, tuple(shape), window=(k,) * n, stride=(s,) * n, padding=pad, **kw)


def _adaptive(op, short, size_in, size_out, nc) -> Case:
    n, c = nc
    label = f"{short} {size_in}->{size_out}"
    return Case(op, label, (n, size_in, size_in, c), output_size=(size_out, size_out))


def _conv(label, shape, k, features, groups=1, stride=1, pad=0, op="conv", out_pad=0) -> Case:
    return Case(
        op,
        label,
        tuple(shape),
        window=(k, k),
        stride=(stride, stride),
        padding=pad,
        features=features,
        groups=groups,
        output_padding=out_pad,
    )


def _full_bases() -> list[Case]:
    """Every configuration of the full suite (mode and dtype not yet set)."""
    big, stem, small = (32, 56, 56, 64), (32, 112, 112, 64), (8, 56, 56, 64)
    return [
        _pool("max_pool", "max 3x3 s2 p1", stem, 3, 2, 1),
        _pool("max_pool", "max 3x3 s2 p1", big, 3, 2, 1),
        _pool("max_pool", "max 3x3 s2 p1", small, 3, 2, 1),
        _pool("max_pool", "max 2x2 s2", big, 2, 2),
        _pool("avg_pool", "avg 2x2 s2", big, 2, 2),
        _pool("avg_pool", "avg 3x3 s1 p1 cip", big, 3, 1, 1, count_include_pad=True),
        _pool("avg_pool", "avg 3x3 s1 p1 nocip", big, 3, 1, 1, count_include_pad=False),
        _pool("lp_pool", "lp p=2 3x3 s2", big, 3, 2, p=2.0),
        _pool("lp_pool", "lp p=8 3x3 s2", big, 3, 2, p=8.0),
        _pool("avg_pool", "global avg 7x7", (32, 7, 7, 2048), 7, 7),
        _adaptive("adaptive_avg_pool", "adaptive avg", 224, 7, (32, 64)),
        _adaptive("adaptive_avg_pool", "adaptive avg", 50, 7, (32, 64)),
        _adaptive("adaptive_avg_pool", "adaptive avg", 7, 1, (32, 64)),
        _adaptive("adaptive_max_pool", "adaptive max", 224, 7, (32, 64)),
        _adaptive("adaptive_max_pool", "adaptive max", 50, 7, (32, 64)),
        _adaptive("adaptive_max_pool", "adaptive max", 7, 1, (32, 64)),
        _pool("fractional_max_pool", "fractional max 2x2 r0.5", big, 2, 2),
        _pool("fractional_max_pool", "fractional max 2x2 r0.7", big, 2, 2, ratio=0.7),
        _pool("max_unpool", "max_unpool 2x2 s2", (32, 28, 28, 64), 2, 2),
        _pool("max_pool", "max1d k3 s2", (64, 4096, 256), 3, 2),
        _pool("avg_pool", "avg1d k3 s2", (64, 4096, 256), 3, 2),
        _pool("max_pool", "max3d k2 s2", (4, 16, 56, 56, 32), 2, 2),
        _pool("avg_pool", "avg3d k2 s2", (4, 16, 56, 56, 32), 2, 2),
        _conv("conv 3x3 s1 p1", small, 3, 64, pad=1),
        _conv("conv 1x1", small, 1, 256),
        _conv("conv depthwise 3x3 p1", small, 3, 64, groups=64, pad=1),
        _conv("conv grouped 3x3 g8 p1", small, 3, 64, groups=8, pad=1),
        _conv("conv_transpose 3x3 s2", (8, 28, 28, 64), 3, 64, 1, 2, 1, "conv_transpose", 1),
    ]


def _quick_bases() -> list[Case]:
    """One or two small configurations per op, for a run of about a minute."""
    img, img3 = (8, 28, 28, 32), (2, 8, 28, 28, 16)
    return [
        _pool("max_pool", "max 3x3 s2 p1", img, 3, 2, 1),
        _pool("max_pool", "max 2x2 s2", img, 2, 2),
        _pool("avg_pool", "avg 3x3 s1 p1 nocip", img, 3, 1, 1, count_include_pad=False),
        _pool("lp_pool", "lp p=2 3x3 s2", img, 3, 2, p=2.0),
        _adaptive("adaptive_avg_pool", "adaptive avg", 50, 7, (8, 32)),
        _adaptive("adaptive_max_pool", "adaptive max", 50, 7, (8, 32)),
        _pool("fractional_max_pool", "fractional max 2x2 r0.5", img, 2, 2),
        _pool("max_unpool", "max_unpool 2x2 s2", (8, 14, 14, 32), 2, 2),
        _pool("max_pool", "max1d k3 s2", (16, 1024, 64), 3, 2),
        _pool("max_pool", "max3d k2 s2", img3, 2, 2),
        _conv("conv 3x3 s1 p1", img, 3, 32, pad=1),
    ]


def all_cases(quick: bool = False) -> list[Case]:
    """The suite: the full list, or the quick one (float32, plus bfloat16 for max pooling)."""
    if not quick:
        return [c for base in _full_bases() for c in _grid(base)]
    cases = [c for base in _quick_bases() for c in _grid(base, dtypes=("float32",))]
    cases += _grid(_quick_bases()[0], dtypes=("bfloat16",))
    return cases


def select(cases: list[Case], filters: list[str] | None) -> list[Case]:
    """Cases whose name contains any of ``filters`` (case-insensitive); all when none given."""
    if not filters:
        return list(cases)
    wanted = [f.lower() for f in filters]
    return [c for c in cases if any(f in c.name.lower() for f in wanted)]
