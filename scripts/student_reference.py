"""PyTorch reference outputs for the student's parity checks.

Needs torch (a scratch environment; torch is not a project dependency), and for the
plain-RD student check also torchvision and anomalib 2.7.0 (installed without its
dependencies: only two of its files are loaded, by path):

  pip install torch==2.14.1 torchvision==0.29.1 numpy
  pip install --no-deps anomalib==2.7.0
  python scripts/student_reference.py     # writes tests/fixtures/student_parity.npz

Without anomalib the plain-RD student falls back to this script's own transcription of
RD4AD, and the fixture records which reference it used.

Every module here is written from the published designs, not from msrd_jax: RD4AD's
de-ResNet decoder and BN_layer (Deng & Li, CVPR 2022), Hou et al.'s CoordAtt, MemAE's
memory read (Gong et al., ICCV 2019, with design.md section 3's cosine addressing) and
design.md section 2's MSFF. The weights and inputs come from
tests/student_fixture_recipe.py. The fixture stores, per check, the manifest of the
reference's state_dict and what the reference computes in float64 from those float32
values (rounded to float32): the forward in eval mode (running statistics), the forward in
train mode (batch statistics) with the running statistics it leaves, and the gradients of
one backward pass of RD4AD's loss (plus the memory's entropy term where there is one) with
respect to the inputs and to the parameters listed in the recipe. Arrays are stored NHWC;
parameter gradients in torch's layout.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, 'tests'))

import student_fixture_recipe as recipe  # noqa: E402

FIXTURE = os.path.join(ROOT, 'tests', 'fixtures', 'student_parity.npz')


# ---------------------------------------------------------------------------------------
# Building blocks (torchvision's ResNet conventions).


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
  return nn.Conv2d(cin, cout, 3, stride, padding=1, bias=False)


def conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
  return nn.Conv2d(cin, cout, 1, stride, bias=False)


def up2x2(cin: int, cout: int) -> nn.ConvTranspose2d:
  """RD4AD's upsampling: a 2x2 transposed conv with stride 2."""
  return nn.ConvTranspose2d(cin, cout, 2, stride=2, bias=False)


class CoordAtt(nn.Module):
  """Coordinate attention as in Hou et al.'s reference code (coordatt.py).

  conv1 keeps its bias as in that code. In train mode the BatchNorm right after it
  subtracts the batch mean, which contains the bias, so the output does not depend on
  it; in eval mode it subtracts the running mean instead, so a conv1 with bias b and
  running mean m computes exactly what a bias-free conv1 with running mean m - b does.
  That is how the test maps it onto our bias-free conv1 (and the running-mean update
  keeps the relation: 0.9 (m - b) + 0.1 mu = (0.9 m + 0.1 (mu + b)) - b).
  """

  def __init__(self, channels: int, reduction: int = 32):
    super().__init__()
    mip = max(8, channels // reduction)
    self.conv1 = nn.Conv2d(channels, mip, 1)
    self.bn1 = nn.BatchNorm2d(mip)
    self.conv_h = nn.Conv2d(mip, channels, 1)
    self.conv_w = nn.Conv2d(mip, channels, 1)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    _, _, h, w = x.shape
    x_h = F.adaptive_avg_pool2d(x, (h, 1))  # pooled over W: (N, C, H, 1)
    x_w = F.adaptive_avg_pool2d(x, (1, w)).permute(0, 1, 3, 2)  # over H: (N, C, W, 1)
    y = self.bn1(self.conv1(torch.cat([x_h, x_w], dim=2)))
    y = y * F.relu6(y + 3) / 6  # h-swish
    y_h, y_w = torch.split(y, [h, w], dim=2)
    a_h = torch.sigmoid(self.conv_h(y_h))
    a_w = torch.sigmoid(self.conv_w(y_w.permute(0, 1, 3, 2)))
    return x * a_w * a_h


class BasicBlock(nn.Module):
  expansion = 1

  def __init__(self, inplanes, planes, stride=1, downsample=None, width_per_group=64):
    super().__init__()
    self.conv1 = conv3x3(inplanes, planes, stride)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = conv3x3(planes, planes)
    self.bn2 = nn.BatchNorm2d(planes)
    self.downsample = downsample

  def forward(self, x):
    out = F.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    identity = x if self.downsample is None else self.downsample(x)
    return F.relu(out + identity)


class Bottleneck(nn.Module):
  """torchvision's v1.5 Bottleneck: the stride on the 3x3 conv."""

  expansion = 4

  def __init__(self, inplanes, planes, stride=1, downsample=None, width_per_group=64):
    super().__init__()
    width = planes * width_per_group // 64
    self.conv1 = conv1x1(inplanes, width)
    self.bn1 = nn.BatchNorm2d(width)
    self.conv2 = conv3x3(width, width, stride)
    self.bn2 = nn.BatchNorm2d(width)
    self.conv3 = conv1x1(width, planes * 4)
    self.bn3 = nn.BatchNorm2d(planes * 4)
    self.downsample = downsample

  def forward(self, x):
    out = F.relu(self.bn1(self.conv1(x)))
    out = F.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    identity = x if self.downsample is None else self.downsample(x)
    return F.relu(out + identity)


def resnet_stage(block, inplanes, planes, blocks, stride, width_per_group=64):
  """One ResNet stage; the first block gets the 1x1 conv + BN shortcut."""
  downsample = None
  if stride != 1 or inplanes != planes * block.expansion:
    downsample = nn.Sequential(
      conv1x1(inplanes, planes * block.expansion, stride), nn.BatchNorm2d(planes * block.expansion)
    )
  layers = [block(inplanes, planes, stride, downsample, width_per_group)]
  layers += [
    block(planes * block.expansion, planes, width_per_group=width_per_group)
    for _ in range(1, blocks)
  ]
  return nn.Sequential(*layers)


# ---------------------------------------------------------------------------------------
# RD4AD's de-ResNet decoder (de_resnet.py), with optional coordinate attention on the
# residual branch just before the addition (design.md section 4, place 'decoder').


class DeBasicBlock(nn.Module):
  expansion = 1

  def __init__(self, inplanes, planes, upsample=None, width_per_group=64, attention=False):
    super().__init__()
    # The first block of a stage doubles the resolution with a 2x2/2 transposed conv.
    self.conv1 = up2x2(inplanes, planes) if upsample is not None else conv3x3(inplanes, planes)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = conv3x3(planes, planes)
    self.bn2 = nn.BatchNorm2d(planes)
    self.attention = CoordAtt(planes) if attention else None
    self.upsample = upsample

  def forward(self, x):
    out = F.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    if self.attention is not None:
      out = self.attention(out)
    identity = x if self.upsample is None else self.upsample(x)
    return F.relu(out + identity)


class DeBottleneck(nn.Module):
  expansion = 4

  def __init__(self, inplanes, planes, upsample=None, width_per_group=64, attention=False):
    super().__init__()
    width = planes * width_per_group // 64
    self.conv1 = conv1x1(inplanes, width)
    self.bn1 = nn.BatchNorm2d(width)
    self.conv2 = up2x2(width, width) if upsample is not None else conv3x3(width, width)
    self.bn2 = nn.BatchNorm2d(width)
    self.conv3 = conv1x1(width, planes * 4)
    self.bn3 = nn.BatchNorm2d(planes * 4)
    self.attention = CoordAtt(planes * 4) if attention else None
    self.upsample = upsample

  def forward(self, x):
    out = F.relu(self.bn1(self.conv1(x)))
    out = F.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    if self.attention is not None:
      out = self.attention(out)
    identity = x if self.upsample is None else self.upsample(x)
    return F.relu(out + identity)


def de_stage(block, inplanes, planes, blocks, width_per_group=64, attention=False):
  """A decoder stage: the first block upsamples, its shortcut a 2x2/2 deconv + BN."""
  upsample = nn.Sequential(
    up2x2(inplanes, planes * block.expansion), nn.BatchNorm2d(planes * block.expansion)
  )
  kw = dict(width_per_group=width_per_group, attention=attention)
  layers = [block(inplanes, planes, upsample, **kw)]
  layers += [block(planes * block.expansion, planes, **kw) for _ in range(1, blocks)]
  return nn.Sequential(*layers)


class DeResNet(nn.Module):
  """de_resnet: layer1 (-> level 3) has layers[0] blocks, layer2 layers[1], layer3 layers[2].

  Returns [d1, d2, d3] (level 1 first), as RD4AD's decoder does.
  """

  def __init__(self, block, layers, width_per_group=64, attention=False, stages=3):
    super().__init__()
    inplanes = 512 * block.expansion
    for k, planes in enumerate((256, 128, 64)[:stages]):
      stage = de_stage(block, inplanes, planes, layers[k], width_per_group, attention)
      self.add_module(f'layer{k + 1}', stage)
      inplanes = planes * block.expansion
    self.stages = stages

  def forward(self, z):
    outs = []
    for k in range(self.stages):
      z = getattr(self, f'layer{k + 1}')(z)
      outs.append(z)
    return outs[::-1]


# ---------------------------------------------------------------------------------------
# RD4AD's BN_layer: the MFF alignment + concatenation, then the OCE stage.


class Align(nn.Module):
  """RD4AD's alignment: e1 through two 3x3/2 conv-BN-ReLU, e2 through one; concat."""

  def __init__(self, channels):
    super().__init__()
    c1, c2, c3 = channels
    self.conv1 = conv3x3(c1, c2, 2)
    self.bn1 = nn.BatchNorm2d(c2)
    self.conv2 = conv3x3(c2, c3, 2)
    self.bn2 = nn.BatchNorm2d(c3)
    self.conv3 = conv3x3(c2, c3, 2)
    self.bn3 = nn.BatchNorm2d(c3)

  def forward(self, feats):
    l1 = F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(feats[0]))))))
    l2 = F.relu(self.bn3(self.conv3(feats[1])))
    return torch.cat([l1, l2, feats[2]], dim=1)


class BNLayer(Align):
  """BN_layer without its unused conv4/bn4. Our OCE has 2 BasicBlocks for 18/34-layer
  teachers (RD4AD's code uses 3 for resnet34) and 3 Bottlenecks otherwise; the block
  count is a parameter here."""

  def __init__(self, block, blocks, channels, width_per_group=64):
    super().__init__(channels)
    self.bn_layer = resnet_stage(block, 3 * channels[2], 512, blocks, 2, width_per_group)

  def forward(self, feats):
    return self.bn_layer(super().forward(feats))


# ---------------------------------------------------------------------------------------
# MSFF (design.md section 2).


class Mapping(nn.Module):
  """T(j -> i): identity; (i - j) x [3x3/2 conv-BN-ReLU]; or 1x1 conv-BN + bilinear."""

  def __init__(self, source, target, channels):
    super().__init__()
    self.source, self.target = source, target
    if source < target:
      self.down = nn.Sequential(
        *[
          nn.Sequential(
            conv3x3(channels[k], channels[k + 1], 2), nn.BatchNorm2d(channels[k + 1]), nn.ReLU()
          )
          for k in range(source, target)
        ]
      )
    elif source > target:
      self.conv = conv1x1(channels[source], channels[target])
      self.bn = nn.BatchNorm2d(channels[target])

  def forward(self, x, size):
    if self.source == self.target:
      return x
    if self.source < self.target:
      return self.down(x)
    # Half-pixel centres, as design.md asks.
    return F.interpolate(self.bn(self.conv(x)), size=size, mode='bilinear', align_corners=False)


class MSFF(nn.Module):
  def __init__(self, channels, attention, init_self=1.0, init_other=0.5):
    super().__init__()
    n = len(channels)
    logits = torch.full((n, n), init_other) + torch.eye(n) * (init_self - init_other)
    self.fusion_logits = nn.Parameter(logits)
    self.maps = nn.ModuleDict(
      {f'{j + 1}_to_{i + 1}': Mapping(j, i, channels) for i in range(n) for j in range(n)}
    )
    self.attention = nn.ModuleList([CoordAtt(c) for c in channels]) if attention else None
    self.align = Align(channels)

  def forward(self, feats):
    # BiFPN's fast normalized fusion.
    r = F.relu(self.fusion_logits)
    weights = r / (r.sum(dim=1, keepdim=True) + 1e-4)
    fused = []
    for i in range(len(feats)):
      size = feats[i].shape[2:]
      g = sum(
        weights[i, j] * self.maps[f'{j + 1}_to_{i + 1}'](feats[j], size) for j in range(len(feats))
      )
      g = F.relu(g)
      if self.attention is not None:
        g = self.attention[i](g)
      fused.append(g)
    return self.align(fused)


# ---------------------------------------------------------------------------------------
# MemAE's memory read with design.md section 3's cosine addressing.


class MemoryRead(nn.Module):
  def __init__(self, slots, dim, temperature, shrink, mode):
    super().__init__()
    self.memory = nn.Parameter(torch.zeros(slots, dim))
    if mode == 'residual':
      self.gate = nn.Parameter(torch.zeros(()))
    self.temperature, self.shrink, self.mode = temperature, shrink, mode

  def forward(self, z):
    """z: (B, D, h, w) -> (z', mean read entropy)."""
    b, d, h, w = z.shape
    q = z.permute(0, 2, 3, 1).reshape(-1, d)
    s = F.normalize(q, dim=1) @ F.normalize(self.memory, dim=1).t() / self.temperature
    att = F.softmax(s, dim=1)
    # MemAE's hard_shrink_relu, then the L1 renormalization.
    att = F.relu(att - self.shrink) * att / (torch.abs(att - self.shrink) + 1e-12)
    att = att / (att.sum(dim=1, keepdim=True) + 1e-12)
    zhat = (att @ self.memory).reshape(b, h, w, d).permute(0, 3, 1, 2)
    entropy = (-(att * torch.log(att + 1e-12)).sum(dim=1)).mean()
    out = zhat if self.mode == 'replace' else z + self.gate * zhat
    return out, entropy


# ---------------------------------------------------------------------------------------
# Containers of the checks. Each forward returns (outputs, entropy or None).


class Check(nn.Module):
  """One module under test, held as attribute `attr` (the prefix of its state_dict keys);
  `call(module, inputs)` returns (outputs, entropy or None)."""

  def __init__(self, attr: str, module: nn.Module, call):
    super().__init__()
    self.add_module(attr, module)
    self.attr, self.call = attr, call

  def forward(self, xs):
    return self.call(getattr(self, self.attr), xs)


def _one(m, xs):
  out = m(xs[0])
  return (out if isinstance(out, list) else [out]), None


def _many(m, xs):
  return [m(xs)], None


def _memory(m, xs):
  out, entropy = m(xs[0])
  return [out], entropy


class MSRDStudent(nn.Module):
  """design.md's student at its defaults: MSFF (with coordinate attention) -> OCE ->
  memory 'replace' -> de-ResNet with coordinate attention in every block."""

  def __init__(self):
    super().__init__()
    m = recipe.STUDENT_MEMORY
    self.fusion = MSFF(recipe.BASIC_CHANNELS, attention=True)
    self.oce = resnet_stage(BasicBlock, 3 * 256, 512, 2, 2)
    self.memory = MemoryRead(m['slots'], 512, m['temperature'], 1.0 / m['slots'], 'replace')
    self.decoder = DeResNet(DeBasicBlock, (2, 2, 2), attention=True)

  def forward(self, xs):
    z, entropy = self.memory(self.oce(self.fusion(xs)))
    return self.decoder(z), entropy


class AnomalibRD(nn.Module):
  """anomalib's ReverseDistillationModel without its encoder: OCBE + ResNetDecoder."""

  def __init__(self, bottleneck, decoder):
    super().__init__()
    self.bottleneck = bottleneck
    self.decoder = decoder

  def forward(self, xs):
    return list(self.decoder(self.bottleneck(list(xs)))), None


class OwnRD(nn.Module):
  """Fallback without anomalib: this script's BN_layer + de_resnet18, anomalib's names."""

  def __init__(self):
    super().__init__()
    self.bottleneck = BNLayer(BasicBlock, 2, recipe.BASIC_CHANNELS)
    self.decoder = DeResNet(DeBasicBlock, (2, 2, 2))

  def forward(self, xs):
    return self.decoder(self.bottleneck(xs)), None


def _load_by_path(name: str, relpath: str):
  """One anomalib file as a module, without running anomalib/__init__.py (which would
  need lightning and the rest of anomalib's dependencies)."""
  spec = importlib.util.find_spec('anomalib')
  path = os.path.join(spec.submodule_search_locations[0], relpath)
  module_spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module


def plain_rd_student() -> tuple[nn.Module, str]:
  try:
    version = importlib.metadata.version('anomalib')
    bottleneck = _load_by_path(
      'anomalib_rd_bottleneck', 'models/image/reverse_distillation/components/bottleneck.py'
    )
    decoder = _load_by_path(
      'anomalib_resnet_decoder', 'models/components/backbone/resnet_decoder.py'
    )
  except (ImportError, importlib.metadata.PackageNotFoundError) as e:
    print(f'anomalib not usable ({e}); using the own RD4AD transcription of this script')
    return OwnRD(), 'own RD4AD transcription'
  model = AnomalibRD(bottleneck.get_bottleneck_layer('resnet18'), decoder.get_decoder('resnet18'))
  return model, f'anomalib {version}'


def cross_check_transcription(anomalib_model: nn.Module) -> float:
  """This script's BN_layer + de_resnet18 against anomalib's, on the same weights:
  anchors the transcriptions that the other checks use. Returns the largest difference."""
  own = OwnRD().double().train()
  manifest = manifest_of(anomalib_model)
  state = recipe.random_state_dict(manifest, 0)
  anomalib_model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
  own.load_state_dict(
    {k: torch.from_numpy(v) for k, v in state.items() if 'bn4' not in k and 'conv4' not in k}
  )
  xs = [nchw(a.astype(np.float64)) for a in recipe.random_inputs('student_rd')]
  with torch.no_grad():
    a, _ = anomalib_model.double().train()(xs)
    b, _ = own(xs)
  return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


def build(name: str) -> tuple[nn.Module, float]:
  """The reference of a check and the entropy weight of its loss."""
  if name == 'decoder_basic':
    return Check('decoder', DeResNet(DeBasicBlock, (2, 2, 2)), _one), 0.0
  if name == 'decoder_basic_ca':
    return Check('decoder', DeResNet(DeBasicBlock, (2, 2, 2), attention=True), _one), 0.0
  if name == 'decoder_wide_stage':
    stage = DeResNet(DeBottleneck, (2, 1, 1), width_per_group=128, stages=1)
    return Check('decoder', stage, _one), 0.0
  if name == 'bn_layer_basic':
    return Check('bottleneck', BNLayer(BasicBlock, 2, recipe.BASIC_CHANNELS), _many), 0.0
  if name == 'oce_wide':
    return Check('bn_layer', resnet_stage(Bottleneck, 3 * 1024, 512, 2, 2, 128), _one), 0.0
  if name == 'coord_attention':
    return Check('attention', CoordAtt(recipe.CHECKS[name]['inputs'][0][-1]), _one), 0.0
  if name in ('memory_replace', 'memory_residual'):
    m = recipe.MEMORY
    read = MemoryRead(m['slots'], m['dim'], m['temperature'], 1.0 / m['slots'], name.split('_')[1])
    return Check('memory', read, _memory), recipe.MEMORY_ENTROPY_WEIGHT
  if name in ('msff', 'msff_ca'):
    return Check('fusion', MSFF(recipe.BASIC_CHANNELS, name == 'msff_ca'), _many), 0.0
  if name == 'student_msrd':
    return MSRDStudent(), recipe.STUDENT_ENTROPY_WEIGHT
  raise ValueError(name)


# ---------------------------------------------------------------------------------------
# Running the checks.


def manifest_of(model: nn.Module) -> dict[str, tuple[str, list[int]]]:
  """{state_dict key: (kind, shape)}, the kind from the owning module's type."""
  kinds = {
    nn.Conv2d: {'weight': 'conv', 'bias': 'bias'},
    nn.ConvTranspose2d: {'weight': 'deconv'},
    nn.BatchNorm2d: {
      'weight': 'bn_weight',
      'bias': 'bn_bias',
      'running_mean': 'running_mean',
      'running_var': 'running_var',
      'num_batches_tracked': 'count',
    },
    MemoryRead: {'memory': 'memory', 'gate': 'gate'},
    MSFF: {'fusion_logits': 'fusion'},
  }
  out = {}
  for mname, module in model.named_modules():
    tensors = list(module.named_parameters(recurse=False)) + list(
      module.named_buffers(recurse=False)
    )
    for pname, t in tensors:
      key = f'{mname}.{pname}' if mname else pname
      out[key] = (kinds[type(module)][pname], list(t.shape))
  assert set(out) == set(model.state_dict()), set(model.state_dict()) ^ set(out)
  return out


def nchw(a: np.ndarray) -> torch.Tensor:
  return torch.from_numpy(a).permute(0, 3, 1, 2).contiguous()


def nhwc(t: torch.Tensor) -> np.ndarray:
  return t.detach().permute(0, 2, 3, 1).contiguous().numpy().astype(np.float32)


def rd_loss(targets: list[torch.Tensor], outputs: list[torch.Tensor]) -> torch.Tensor:
  """RD4AD's loss: 1 - cos of each image's flattened maps, mean over batch, sum over levels."""
  total = 0.0
  for t, o in zip(targets, outputs):
    cos = F.cosine_similarity(t.reshape(t.shape[0], -1), o.reshape(o.shape[0], -1), dim=1)
    total = total + torch.mean(1 - cos)
  return total


class KinkMonitor(TorchFunctionMode):
  """Records the smallest distance of any ReLU / ReLU6 (hardtanh) input to its kinks.

  A function mode sees every call, also those inside anomalib's modules and MemAE's
  shrinkage (relu(w - lambda)).
  """

  def __init__(self):
    super().__init__()
    self.margin = float('inf')

  def __torch_function__(self, func, types, args=(), kwargs=None):
    kwargs = kwargs or {}
    name = getattr(func, '__name__', '')
    if name in ('relu', 'relu_'):
      self._note(args[0], (0.0,))
    elif name in ('hardtanh', 'hardtanh_', 'relu6'):
      lo = kwargs.get('min_val', args[1] if len(args) > 1 else -1.0)
      hi = kwargs.get('max_val', args[2] if len(args) > 2 else 1.0)
      self._note(args[0], (0.0, 6.0) if name == 'relu6' else (lo, hi))
    return func(*args, **kwargs)

  def _note(self, x, kinks):
    with torch.no_grad():
      for k in kinks:
        d = (x.detach() - k).abs()
        # Exact zeros are structural (a ReLU's zeros summed with zero weights): exact in
        # every precision, and both frameworks give them a zero derivative.
        d = d[(d > 0) | (x.detach() != 0)]
        if d.numel():
          self.margin = min(self.margin, float(d.min()))


def kink_margin(model: nn.Module, inputs: list[np.ndarray]) -> float:
  model.train()
  state = {k: v.clone() for k, v in model.state_dict().items()}
  monitor = KinkMonitor()
  with torch.no_grad(), monitor:
    model([nchw(a) for a in inputs])
  model.load_state_dict(state)  # undo the running-statistics update
  return monitor.margin


def run_check(name: str, model: nn.Module, entropy_weight: float) -> dict[str, np.ndarray]:
  cfg = recipe.CHECKS[name]
  manifest = manifest_of(model)
  state = recipe.random_state_dict(manifest, recipe.check_seed(name, recipe.WEIGHT_SEED))
  model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
  # The reference computes in float64, so that what is stored is the exact result of the
  # float32 weights and inputs: a BatchNorm over 4 values per channel amplifies float32
  # rounding, and PyTorch's own float32 result is then 2e-5 away from it (ours 8e-6).
  model.double()
  margins = [
    kink_margin(model, [a.astype(np.float64) for a in recipe.random_inputs(name, d)])
    for d in range(recipe.KINK_DRAWS)
  ]
  draw = int(np.argmax(margins))
  if margins[draw] < recipe.KINK_MARGIN:
    raise RuntimeError(f'{name}: no input draw keeps clear of the ReLU kinks: {margins}')
  inputs = [a.astype(np.float64) for a in recipe.random_inputs(name, draw)]
  print(f'{name}: input draw {draw}, kink margin {margins[draw]:.1e}')
  arrays = {f'{name}/manifest': np.array(json.dumps(manifest)), f'{name}/draw': np.array(draw)}

  # Eval mode first: the train-mode forward updates the running statistics.
  model.eval()
  with torch.no_grad():
    outs, entropy = model([nchw(a) for a in inputs])
  for k, o in enumerate(outs):
    arrays[f'{name}/eval/out{k}'] = nhwc(o)
  if entropy is not None:
    arrays[f'{name}/eval/entropy'] = np.float32(entropy.item())

  model.train()
  # Values per channel that each BatchNorm normalizes over (N * H * W): PyTorch folds the
  # unbiased batch variance, var * n / (n - 1), into its running average.
  counts = {}
  hooks = [
    m.register_forward_hook(
      lambda m, i, o, key=key: counts.update({key: i[0].numel() // i[0].shape[1]})
    )
    for key, m in model.named_modules()
    if isinstance(m, nn.BatchNorm2d)
  ]
  xs = [nchw(a).requires_grad_(True) for a in inputs]
  outs, entropy = model(xs)
  for h in hooks:
    h.remove()
  arrays[f'{name}/train/bn_counts'] = np.array(json.dumps(counts))
  targets = recipe.random_targets(name, [tuple(nhwc(o).shape) for o in outs])
  loss = rd_loss([nchw(t.astype(np.float64)) for t in targets], outs)
  if entropy is not None:
    loss = loss + entropy_weight * entropy
    arrays[f'{name}/train/entropy'] = np.float32(entropy.item())
  loss.backward()
  arrays[f'{name}/train/loss'] = np.float32(loss.item())
  for k, o in enumerate(outs):
    arrays[f'{name}/train/out{k}'] = nhwc(o)
  after = model.state_dict()
  for key, (kind, _) in manifest.items():
    if kind in ('running_mean', 'running_var'):
      arrays[f'{name}/train/stats/{key}'] = after[key].numpy().astype(np.float32)
  for k, x in enumerate(xs):
    arrays[f'{name}/grad/input{k}'] = nhwc(x.grad)
  params = dict(model.named_parameters())
  for key in cfg['grads']:
    g = params[key].grad.numpy().astype(np.float32)
    arrays[f'{name}/grad/{key}'] = g[: recipe.GRAD_SLICE] if g.ndim == 4 else g
  return arrays


def main() -> None:
  torch.manual_seed(0)  # nothing random is drawn by torch; set for good measure
  arrays = {'torch_version': np.array(torch.__version__)}
  for name in recipe.CHECKS:
    if name == 'student_rd':
      model, source = plain_rd_student()
      arrays['student_rd/reference'] = np.array(source)
      if isinstance(model, AnomalibRD):
        diff = cross_check_transcription(model)
        print(f'own RD4AD transcription vs {source}: largest difference {diff:.1e}')
        assert diff < 1e-12, diff
        model, _ = plain_rd_student()  # fresh, in float32 until run_check loads it
      entropy_weight = 0.0
    else:
      model, entropy_weight = build(name)
    arrays.update(run_check(name, model, entropy_weight))
    size = sum(v.nbytes for k, v in arrays.items() if k.startswith(f'{name}/'))
    print(f'{name}: {size / 1024:.0f} KiB', flush=True)
  np.savez_compressed(FIXTURE, **arrays)
  print(f'{FIXTURE}: {os.path.getsize(FIXTURE) / 2**20:.2f} MiB')


if __name__ == '__main__':
  main()
