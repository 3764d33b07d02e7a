"""A re-parameterizable block of a user's own, registered in mmseg's model
registry: a 3x3 conv with BN plus a biased 1x1 conv, which its own
``switch_to_deploy`` fuses into one conv named ``fused`` (not RepVGG's
``branch_reparam``)."""
from mmseg.registry import MODELS
from torch import nn
from torch.nn import functional as F

from mmrepvgg.models.fusion import add_centered, fuse_conv_bn


@MODELS.register_module()
class UserRepBlock(nn.Module):
    """Takes the arguments the RepVGG backbone gives its blocks; norm and
    activation settings are its own."""

    def __init__(self,
                 in_channels,
                 out_channels,
                 stride=1,
                 dilation=1,
                 groups=1,
                 deploy=False,
                 **backbone_settings):
        super().__init__()
        self.shape = (in_channels, out_channels, stride, dilation, groups)
        self.deploy = deploy
        if deploy:
            self.fused = self._conv(3, bias=True)
        else:
            self.conv3 = self._conv(3, bias=False)
            self.norm = nn.BatchNorm2d(out_channels)
            self.conv1 = self._conv(1, bias=True)

    def _conv(self, kernel_size, bias):
        in_channels, out_channels, stride, dilation, groups = self.shape
        dilation = dilation if kernel_size == 3 else 1
        return nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride,
            padding=dilation * (kernel_size // 2),
            dilation=dilation,
            groups=groups,
            bias=bias)

    def forward(self, x):
        if self.deploy:
            return F.relu(self.fused(x))
        return F.relu(self.norm(self.conv3(x)) + self.conv1(x))

    def switch_to_deploy(self):
        if self.deploy:
            return self
        kernel, bias = fuse_conv_bn(self.conv3.weight, self.norm)
        add_centered(kernel, self.conv1.weight.double())
        bias += self.conv1.bias.double()
        self.fused = self._conv(3, bias=True)
        self.fused.weight.data.copy_(kernel)
        self.fused.bias.data.copy_(bias)
        del self.conv3, self.norm, self.conv1
        self.deploy = True
        return self
