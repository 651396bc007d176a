"""Tests of launch/machine.py: the arithmetic a benchmark counts."""

from comln_tf import backbones
from launch import machine


def test_backbone_flops_of_conv4_match_the_closed_form():
  # Four 3x3 convolutions of 64 filters, 'same' padding, each block pooled
  # 2x2: maps 28, 14, 7 and 3 wide, 1 then 64 input channels.
  expected = sum(
    2 * width * width * 9 * channels_in * 64
    for width, channels_in in ((28, 1), (14, 64), (7, 64), (3, 64))
  )
  backbone = backbones.get_backbone("conv4")
  assert machine.backbone_flops(backbone, [28, 28, 1]) == expected


def test_backbone_flops_count_the_stride_2_convolutions_maml_uses():
  # MAML's Conv-4: stride-2 convolutions, 'same' padding: 14, 7, 4, 2 wide.
  expected = sum(
    2 * width * width * 9 * channels_in * 64
    for width, channels_in in ((14, 1), (7, 64), (4, 64), (2, 64))
  )
  backbone = backbones.get_backbone(
    "conv4", downsample="stride", global_pool=True
  )
  assert machine.backbone_flops(backbone, [28, 28, 1]) == expected
