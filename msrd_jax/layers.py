"""The layers every network of the project is built from, with PyTorch's semantics.

`conv` and `batch_norm` make the bias-free, explicitly padded convolution and the
BatchNorm (PyTorch's eps, momentum, two-pass variance and unbiased running variance) that
torchvision's ResNet and RD4AD's modules use. `Layers` holds what is the same for every
such layer of one network (compute dtype, the device axis of synchronized BatchNorm), so
that modules take one field instead of repeating three, and receive `train` in `__call__`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from msrd_jax.errors import UserError

BN_EPS = 1e-5
# PyTorch's BatchNorm momentum 0.1 weighs the new batch; Flax's weighs the old average.
BN_MOMENTUM = 0.9

# torchvision's init for convolutions: kaiming_normal_(mode='fan_out', nonlinearity='relu').
conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')

# PyTorch's default init of a conv weight, kaiming_uniform_(a=sqrt(5)):
# uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)), i.e. variance 1 / (3 fan_in).
torch_default_init = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')
# For ConvTranspose2d PyTorch takes fan_in from its weight (in, out, kh, kw) as
# weight.size(1) * kh * kw = out * kh * kw, which is the fan_out of the (kh, kw, in, out)
# kernel that Flax sees.
torch_default_transposed_init = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_out', 'uniform')


def torch_default_bias_init(fan_in: int):
  """PyTorch's default bias init of a conv with `fan_in` = in_channels * kh * kw:
  uniform(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def _conv(x: jax.Array, kernel: jax.Array, stride: int, padding: int) -> jax.Array:
  return lax.conv_general_dilated(
    x,
    kernel,
    (stride, stride),
    ((padding, padding), (padding, padding)),
    dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
  )


def conv2d(
  x: jax.Array,
  kernel: jax.Array,
  stride: int,
  padding: int,
  kernel_grad_by: str | None = None,
  patches: bool | None = None,
) -> jax.Array:
  """2-D convolution, NHWC x HWIO -> NHWC, symmetric zero padding.

  Same values and gradients as differentiating lax.conv_general_dilated, to float32
  rounding, computed the way XLA:CPU does fastest:
  - a 1x1 convolution without padding is a matrix product, (B * H * W, C) x (C, O), of
    the input's every `stride`-th row and column. XLA:CPU's convolution of a 1x1 kernel
    is 1.4-5.5x slower forward than that product at the decoder's and teacher's shapes
    (`python scripts/bench_convs.py`; README, Speed);
  - a convolution with few output positions per image (`use_patches`) on XLA:CPU is one
    matrix product over the input's k * k shifted copies (`_conv2d_patches`), forward
    and backward;
  - otherwise XLA's convolution, its kernel gradient computed as `kernel_grad_by` says:
    'xla' (XLA's own) or 'taps' (one matrix product per kernel tap, see `_conv2d_taps`);
    None chooses with `kernel_grad_method`.
  `patches` True or False forces or forbids the patches product; None chooses.
  """
  if kernel_grad_by not in ('xla', 'taps', None):
    raise ValueError(f"kernel_grad_by must be 'xla', 'taps' or None, got {kernel_grad_by!r}")
  if kernel.shape[:2] == (1, 1) and padding == 0:
    xs = x[:, ::stride, ::stride, :] if stride > 1 else x
    b, h, w, c = xs.shape
    y = lax.dot_general(xs.reshape(b * h * w, c), kernel.reshape(c, -1), (((1,), (0,)), ((), ())))
    return y.reshape(b, h, w, kernel.shape[-1])
  if patches is None:
    patches = use_patches(
      _output_side(x.shape[1], kernel.shape[0], stride, padding),
      _output_side(x.shape[2], kernel.shape[1], stride, padding),
    )
  if patches:
    return _conv2d_patches(x, kernel, stride, padding)
  if (kernel_grad_by or kernel_grad_method(stride)) == 'xla':
    return _conv(x, kernel, stride, padding)
  return _conv2d_taps(x, kernel, stride, padding)


# A convolution whose output has at most this many positions per image is one matrix
# product over shifted copies of its input on XLA:CPU (`use_patches`).
PATCHES_MAX_POSITIONS = 64
# Environment variable that forces `use_patches`: 'on' for every k x k convolution
# (k > 1), 'off' for none.
PATCHES_ENV = 'MSRD_JAX_PATCHES'


def _output_side(n: int, k: int, stride: int, padding: int) -> int:
  return (n + 2 * padding - k) // stride + 1


def use_patches(out_h: int, out_w: int) -> bool:
  """Whether `conv2d` computes a k x k convolution with out_h x out_w outputs per image
  as one matrix product over the k * k shifted copies of its input (`_conv2d_patches`).

  On XLA:CPU, for outputs of at most PATCHES_MAX_POSITIONS (8 x 8) positions per image.
  XLA:CPU's convolution is slow there, most where the kernel is large: the OCE's 3x3
  convolutions of 1024 channels at 8 x 8 (wide_resnet50_2 at 256 px) take 20 ms forward
  at batch 1 against 4.3 ms for the product, and 119 ms forward and backward at batch 8
  against 58 ms. On a grid of 3x3 kernels of 256 to 2048 channels at 4 x 4 and 8 x 8
  outputs, stride 1 and 2, batch 8, the product is 1.05-3.7x as fast forward and
  backward, and 0.6-4.5x forward (slower on the kernels of 256 input channels and of
  2048 at 8 x 8). At 16 x 16 it is slower forward for 6 of the 8 kernels, and at the
  decoder's 64 x 64 it takes 5x as long (jax 0.10.2 on an AVX-512 CPU, `python
  scripts/bench_convs.py --batch 1`, `--batch 8`, `--shapes sweep`; README, Speed).
  Other backends keep their own convolution. `$MSRD_JAX_PATCHES` set to 'on' or 'off'
  decides for every convolution, to compare the two on another machine.
  """
  forced = _forced_by_environment(PATCHES_ENV, ('on', 'off'))
  if forced:
    return forced == 'on'
  return jax.default_backend() == 'cpu' and out_h * out_w <= PATCHES_MAX_POSITIONS


def _forced_by_environment(name: str, choices: tuple[str, ...]) -> str | None:
  """The value of environment variable `name`, one of `choices`, or None if unset."""
  value = os.environ.get(name)
  if value and value not in choices:
    raise UserError(f'${name} must be ' + ' or '.join(map(repr, choices)) + f', got {value!r}')
  return value or None


def _conv2d_patches(x: jax.Array, kernel: jax.Array, stride: int, padding: int) -> jax.Array:
  """The convolution as (B * Ho * Wo, k * k * C) x (k * k * C, O): the padded input's
  k * k strided slices, one per kernel tap, side by side along the channels, in the
  kernel's (row, column, channel) order. Differentiated by JAX: the kernel gradient is
  the transposed product, the input gradient one product and k * k padded additions."""
  kh, kw, c, o = kernel.shape
  b = x.shape[0]
  ho = _output_side(x.shape[1], kh, stride, padding)
  wo = _output_side(x.shape[2], kw, stride, padding)
  taps = _tap_inputs(x, kh, kw, ho, wo, stride, padding)
  cols = jnp.concatenate(taps, axis=-1).reshape(b * ho * wo, kh * kw * c)
  y = lax.dot_general(cols, kernel.reshape(kh * kw * c, o), (((1,), (0,)), ((), ())))
  return y.reshape(b, ho, wo, o)


@functools.cache
def _host_has_avx512() -> bool:
  """Whether this host's CPU has AVX-512 (numpy's own CPU feature detection)."""
  try:
    from numpy._core._multiarray_umath import __cpu_features__
  except ImportError:  # another numpy layout: assume not
    return False
  return bool(__cpu_features__.get('AVX512F'))


@functools.cache
def _host_cpu_vendor() -> str:
  """The CPU's vendor string ('AuthenticAMD', 'GenuineIntel', ...) from /proc/cpuinfo;
  '' where there is none (not Linux, or not x86)."""
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('vendor_id'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return ''


# Environment variable that forces the kernel-gradient method of `conv2d`.
KERNEL_GRAD_ENV = 'MSRD_JAX_KERNEL_GRAD'


def kernel_grad_method(stride: int) -> str:
  """How `conv2d` computes the kernel gradient of a k x k convolution (k > 1).

  'taps' (one matrix product per kernel tap) on every backend, except XLA's own ('xla')
  for stride 1 on an AMD CPU with AVX-512. Measured with jax 0.10.2 on XLA:CPU (README,
  Speed; `python scripts/bench_conv_grad.py`) on three CPUs: on an AMD Zen 3 (AVX2)
  XLA's kernel gradient was 1.9-7x slower than the taps at the student's shapes; on an
  AMD EPYC with AVX-512 it was faster at stride 1 (the wide_resnet50_2 training step
  took about 7 % less time with it for MSRD, 2 % for plain RD4AD) and slower at stride
  2; on an Intel Xeon with AVX-512 (Ice Lake) it was 1.5-2.3x slower at the decoder's
  3x3 stride-1 shapes and the plain-RD4AD step 1.25x slower with it. What sets the AMD
  AVX-512 part apart was not established, so the rule names only what was measured;
  `$MSRD_JAX_KERNEL_GRAD` set to 'xla' or 'taps' chooses for every convolution, to
  compare the two on another machine.
  """
  forced = _forced_by_environment(KERNEL_GRAD_ENV, ('xla', 'taps'))
  if forced:
    return forced
  if (
    stride == 1
    and jax.default_backend() == 'cpu'
    and _host_has_avx512()
    and _host_cpu_vendor() == 'AuthenticAMD'
  ):
    return 'xla'
  return 'taps'


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv2d_taps(x: jax.Array, kernel: jax.Array, stride: int, padding: int) -> jax.Array:
  """XLA's convolution, with the kernel gradient as one matrix product per kernel tap,
  (N, C)^T (N, O) over the N = B * H_out * W_out output positions. On a Zen 3 CPU
  (AVX2), XLA:CPU lowered the kernel gradient of a convolution to a generic, slow loop
  (2-7x slower than these products at the decoder's shapes); on accelerators both are
  matrix products.
  """
  return _conv(x, kernel, stride, padding)


def _conv2d_fwd(x, kernel, stride, padding):
  return _conv(x, kernel, stride, padding), (x, kernel)


def _conv2d_bwd(stride, padding, residuals, g):
  x, kernel = residuals
  _, input_vjp = jax.vjp(lambda x: _conv(x, kernel, stride, padding), x)
  (dx,) = input_vjp(g)
  return dx, kernel_grad(x, g, kernel.shape[0], stride, padding).astype(kernel.dtype)


_conv2d_taps.defvjp(_conv2d_fwd, _conv2d_bwd)


def kernel_grad(x: jax.Array, g: jax.Array, size: int, stride: int, padding: int) -> jax.Array:
  """d(sum(g * conv2d(x, k))) / dk: (size, size, C, O) for x (B, H, W, C), g (B, Ho, Wo, O).

  Tap (i, j) of the kernel sees the padded input at rows i, i + s, ..., i + (Ho - 1) s
  and the matching columns; its gradient is that strided slice times g, summed over
  every output position.
  """
  c = x.shape[-1]
  _, ho, wo, o = g.shape
  g2 = g.reshape(-1, o)
  # Accumulate in float32 at least (bfloat16 compute), in float64 when asked for.
  acc = jnp.promote_types(jnp.result_type(x, g), jnp.float32)
  taps = [
    lax.dot_general(xs.reshape(-1, c), g2, (((0,), (0,)), ((), ())), preferred_element_type=acc)
    for xs in _tap_inputs(x, size, size, ho, wo, stride, padding)
  ]
  return jnp.stack(taps).reshape(size, size, c, o)


def _tap_inputs(
  x: jax.Array, kh: int, kw: int, ho: int, wo: int, stride: int, padding: int
) -> list[jax.Array]:
  """What each kernel tap (i, j) of a kh x kw convolution sees, in row-major tap order:
  the zero-padded input at rows i, i + s, ..., i + (ho - 1) s and the matching columns,
  (B, ho, wo, C) each."""
  b, _, _, c = x.shape
  xp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  return [
    lax.slice(
      xp,
      (0, i, j, 0),
      (b, i + (ho - 1) * stride + 1, j + (wo - 1) * stride + 1, c),
      (1, stride, stride, 1),
    )
    for i in range(kh)
    for j in range(kw)
  ]


class Conv(nn.Module):
  """A square, bias-free convolution with PyTorch's symmetric padding kernel_size // 2.

  Parameter 'kernel' (k, k, C_in, features), as flax.linen.Conv names and initializes it.
  Flax's 'SAME' pads asymmetrically for stride 2, which shifts every feature map by a
  pixel against torchvision's; explicit padding reproduces PyTorch exactly.
  """

  features: int
  kernel_size: int
  stride: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k = self.kernel_size
    kernel = self.param('kernel', conv_init, (k, k, x.shape[-1], self.features), jnp.float32)
    return conv2d(x.astype(self.dtype), kernel.astype(self.dtype), self.stride, k // 2)


def conv(
  features: int, kernel: int, stride: int = 1, name: str | None = None, dtype: Any = jnp.float32
) -> Conv:
  """The bias-free convolution of torchvision's ResNet and RD4AD's modules."""
  return Conv(features, kernel, stride, dtype, name=name)


class BatchNorm(nn.Module):
  """BatchNorm over every axis but the last, with PyTorch's training-mode semantics.

  Parameters 'scale' and 'bias', running statistics 'mean' and 'var' in 'batch_stats',
  as flax.linen.BatchNorm names them, so checkpoints and ported weights are the same.
  Two things differ from Flax's layer, both as torch.nn.BatchNorm2d does:
  - the batch variance is computed in two passes, E[(x - E[x])^2]; Flax's default
    E[x^2] - E[x]^2 loses most digits on post-ReLU features;
  - the running variance averages the *unbiased* batch variance, n / (n - 1) times the
    biased one that normalizes the batch (n values per channel, over every device of
    `axis_name`). Flax averages the biased one.
  Statistics are reduced in float32 at least, whatever the compute dtype.
  """

  use_running_average: bool
  momentum: float = BN_MOMENTUM
  epsilon: float = BN_EPS
  dtype: Any = jnp.float32
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    features = x.shape[-1]
    ra_mean = self.variable('batch_stats', 'mean', jnp.zeros, (features,), jnp.float32)
    ra_var = self.variable('batch_stats', 'var', jnp.ones, (features,), jnp.float32)
    scale = self.param('scale', nn.initializers.ones, (features,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (features,), jnp.float32)
    if self.use_running_average:
      mean, var = ra_mean.value, ra_var.value
    else:
      xs = x.astype(jnp.promote_types(x.dtype, jnp.float32))
      axes = tuple(range(x.ndim - 1))
      # As Flax does, no device axis exists at init, and the running averages stay.
      axis_name = None if self.is_initializing() else self.axis_name
      mean = jnp.mean(xs, axes)
      if axis_name is not None:
        mean = lax.pmean(mean, axis_name)
      var = jnp.mean(jnp.square(xs - mean), axes)
      n = math.prod(x.shape[:-1])
      if axis_name is not None:
        var = lax.pmean(var, axis_name)
        n = n * lax.axis_size(axis_name)
      if not self.is_initializing():
        ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
        unbiased = var * (n / jnp.maximum(n - 1, 1))
        ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * unbiased
    y = (x - mean) * (lax.rsqrt(var + self.epsilon) * scale) + bias
    return y.astype(self.dtype)


def batch_norm(
  train: bool, name: str | None = None, dtype: Any = jnp.float32, axis_name: str | None = None
) -> BatchNorm:
  """BatchNorm with PyTorch's eps, momentum and variance; batch statistics only when
  training."""
  return BatchNorm(not train, dtype=dtype, axis_name=axis_name, name=name)


@dataclasses.dataclass(frozen=True)
class Layers:
  """How the convolutions and BatchNorms of one network are built.

  dtype: the compute dtype (parameters stay float32).
  bn_axis_name: the mapped device axis over which training-mode BatchNorm averages its
    statistics (pmap's axis name), or None on one device.
  init: [model.init] how the layers that RD4AD and coordinate attention leave at
    PyTorch's default are initialized: 'kaiming' (transposed convs like every other
    conv, Flax's default on coordinate attention) or 'pytorch' (PyTorch's default).
    The convs built by `conv` are kaiming normal either way, as torchvision's and
    RD4AD's init loops make them.
  """

  dtype: Any = jnp.float32
  bn_axis_name: str | None = None
  init: str = 'kaiming'

  def __post_init__(self):
    if self.init not in ('kaiming', 'pytorch'):
      raise ValueError(f"Layers.init must be 'kaiming' or 'pytorch', got {self.init!r}")

  @property
  def transposed_init(self):
    """Kernel init of a (kh, kw, in, out) transposed conv (RD4AD's ConvTranspose2d)."""
    return conv_init if self.init == 'kaiming' else torch_default_transposed_init

  def plain_conv1x1(
    self, features: int, in_features: int, use_bias: bool = True, name: str | None = None
  ) -> nn.Conv:
    """A 1x1 conv of a module that keeps PyTorch's nn.Conv2d defaults (coordinate
    attention): with init 'pytorch' weights and bias are uniform(+-1/sqrt(in_features));
    with 'kaiming', Flax's default (lecun normal, zero bias)."""
    kwargs = {}
    if self.init == 'pytorch':
      kwargs = {
        'kernel_init': torch_default_init,
        'bias_init': torch_default_bias_init(in_features),
      }
    return nn.Conv(features, (1, 1), use_bias=use_bias, dtype=self.dtype, name=name, **kwargs)

  def conv(self, features: int, kernel: int, stride: int = 1, name: str | None = None) -> nn.Conv:
    return conv(features, kernel, stride, name, self.dtype)

  def norm(self, train: bool, name: str | None = None) -> BatchNorm:
    return batch_norm(train, name, self.dtype, self.bn_axis_name)
