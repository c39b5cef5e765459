"""CAM++ speaker encoder (the x-vector of CosyVoice and Chatterbox's S3Gen) in plain PyTorch.

16 kHz clip -> Kaldi fbank [T, 80] (cosyvoice_frontend.kaldi_fbank, dither 0) minus its time mean -> CAM++ ->
x-vector [192]. Network (names as the publisher's `CAMPPlus`, Chatterbox's `speaker_encoder.` in s3gen.safetensors):

    head (FCM): 2-D conv front end over (frequency, time): conv3 + BN + ReLU, two residual stages that halve the
        frequency axis, conv3 stride (2, 1) + BN + ReLU -> [B, m_channels * feat_dim / 8, T]
    xvector.tdnn: conv5 stride 2 in time + BN + ReLU                                   -> [B, init_channels, T/2]
    xvector.block{1,2,3}: densely connected CAM layers (BN-ReLU-conv1, BN-ReLU, then a dilated conv3 gated by a
        sigmoid of the clip mean + 100-frame segment means), each followed by transit{1,2,3} (BN-ReLU-conv1, halves
        the channels)
    xvector.out_nonlinear (BN + ReLU), stats (mean and unbiased std over time), dense (conv1 + BN without affine)

BatchNorm layers run in eval mode on their running statistics (the checkpoint's, num_batches_tracked included).

API
    CAMPPlus(**CAMPPLUS_PARAMS)(feats [B, T, feat_dim]) -> [B, embedding_size]
    campplus.embed(pcm16 [S]) -> [embedding_size]            the fbank front end included
    CAMPPLUS_PARAMS (the published sizes), TINY_CAMPPLUS_PARAMS
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from streamvox.codecs.cosyvoice_frontend import SPEECH_SAMPLE_RATE, kaldi_fbank

CAMPPLUS_PARAMS = {"feat_dim": 80, "embedding_size": 192, "growth_rate": 32, "bn_size": 4, "init_channels": 128,
                   "m_channels": 32, "block_layers": (12, 24, 16)}
TINY_CAMPPLUS_PARAMS = {**CAMPPLUS_PARAMS, "growth_rate": 8, "bn_size": 2, "init_channels": 16}
BLOCK_DILATIONS = (1, 2, 2)
SEGMENT_FRAMES = 100  # CAM's segment pooling length


def bn_relu(channels: int) -> nn.Sequential:
    """BatchNorm1d + ReLU, named `batchnorm` / `relu` as the checkpoint's `nonlinear` modules."""
    return nn.Sequential(OrderedDict(batchnorm=nn.BatchNorm1d(channels), relu=nn.ReLU()))


class ResBlock2d(nn.Module):
    """relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)); stride on the frequency axis only."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=(stride, 1), padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=(stride, 1), bias=False),
                                          nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, F, T] -> [B, planes, F / stride, T]
        h = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(h + self.shortcut(x))


class FCM(nn.Module):
    def __init__(self, m_channels: int, feat_dim: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, m_channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(m_channels)
        self.layer1 = nn.Sequential(ResBlock2d(m_channels, m_channels, 2), ResBlock2d(m_channels, m_channels, 1))
        self.layer2 = nn.Sequential(ResBlock2d(m_channels, m_channels, 2), ResBlock2d(m_channels, m_channels, 1))
        self.conv2 = nn.Conv2d(m_channels, m_channels, 3, stride=(2, 1), padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(m_channels)
        self.out_channels = m_channels * (feat_dim // 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, F, T] -> [B, m_channels * F / 8, T]
        h = F.relu(self.bn1(self.conv1(x[:, None])))
        h = self.layer2(self.layer1(h))
        h = F.relu(self.bn2(self.conv2(h)))  # [B, m, F / 8, T]
        return h.flatten(1, 2)


class TDNNLayer(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int) -> None:
        super().__init__()
        self.linear = nn.Conv1d(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2,
                                bias=False)
        self.nonlinear = bn_relu(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.nonlinear(self.linear(x))


class CAMLayer(nn.Module):
    """A dilated conv3 whose output channels are gated by sigmoid(W2 relu(W1 context)), context = the clip's mean
    plus the mean of the 100-frame segment each frame falls in."""

    def __init__(self, bn_channels: int, out_channels: int, dilation: int) -> None:
        super().__init__()
        self.linear_local = nn.Conv1d(bn_channels, out_channels, 3, padding=dilation, dilation=dilation, bias=False)
        self.linear1 = nn.Conv1d(bn_channels, bn_channels // 2, 1)
        self.linear2 = nn.Conv1d(bn_channels // 2, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, T] -> [B, out, T]
        segments = F.avg_pool1d(x, SEGMENT_FRAMES, SEGMENT_FRAMES, ceil_mode=True)  # [B, C, ceil(T / 100)]
        per_frame = segments.repeat_interleave(SEGMENT_FRAMES, dim=2)[..., :x.shape[2]]
        context = x.mean(dim=-1, keepdim=True) + per_frame
        gate = torch.sigmoid(self.linear2(F.relu(self.linear1(context))))
        return self.linear_local(x) * gate


class CAMDenseTDNNLayer(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, bn_channels: int, dilation: int) -> None:
        super().__init__()
        self.nonlinear1 = bn_relu(in_channels)
        self.linear1 = nn.Conv1d(in_channels, bn_channels, 1, bias=False)
        self.nonlinear2 = bn_relu(bn_channels)
        self.cam_layer = CAMLayer(bn_channels, out_channels, dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cam_layer(self.nonlinear2(self.linear1(self.nonlinear1(x))))


class CAMDenseTDNNBlock(nn.ModuleDict):
    """Layers `tdnnd1`, `tdnnd2`, ...: each sees every earlier output, concatenated on channels."""

    def __init__(self, num_layers: int, in_channels: int, growth: int, bn_channels: int, dilation: int) -> None:
        super().__init__({f"tdnnd{i + 1}": CAMDenseTDNNLayer(in_channels + i * growth, growth, bn_channels, dilation)
                          for i in range(num_layers)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, T] -> [B, C + n * growth, T]
        for layer in self.values():
            x = torch.cat([x, layer(x)], dim=1)
        return x


class TransitLayer(nn.Module):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.nonlinear = bn_relu(in_channels)
        self.linear = nn.Conv1d(in_channels, out_channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.nonlinear(x))


class StatsPool(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, T] -> [B, 2C]
        return torch.cat([x.mean(dim=-1), x.std(dim=-1, unbiased=True)], dim=-1)


class DenseLayer(nn.Module):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.linear = nn.Conv1d(in_channels, out_channels, 1, bias=False)
        self.nonlinear = nn.Sequential(OrderedDict(batchnorm=nn.BatchNorm1d(out_channels, affine=False)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C] -> [B, out]
        return self.nonlinear(self.linear(x[:, :, None])[:, :, 0])


class CAMPPlus(nn.Module):
    def __init__(self, feat_dim: int = 80, embedding_size: int = 192, growth_rate: int = 32, bn_size: int = 4,
                 init_channels: int = 128, m_channels: int = 32,
                 block_layers: Sequence[int] = (12, 24, 16)) -> None:
        super().__init__()
        self.feat_dim = feat_dim
        self.head = FCM(m_channels, feat_dim)
        layers: OrderedDict[str, nn.Module] = OrderedDict(
            tdnn=TDNNLayer(self.head.out_channels, init_channels, 5, stride=2))
        channels = init_channels
        for i, (num_layers, dilation) in enumerate(zip(block_layers, BLOCK_DILATIONS, strict=True)):
            layers[f"block{i + 1}"] = CAMDenseTDNNBlock(num_layers, channels, growth_rate, bn_size * growth_rate,
                                                        dilation)
            channels += num_layers * growth_rate
            layers[f"transit{i + 1}"] = TransitLayer(channels, channels // 2)
            channels //= 2
        layers["out_nonlinear"] = bn_relu(channels)
        layers["stats"] = StatsPool()
        layers["dense"] = DenseLayer(2 * channels, embedding_size)
        self.xvector = nn.Sequential(layers)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """feats [B, T, feat_dim] (mean-normalised fbank) -> x-vectors [B, embedding_size]."""
        return self.xvector(self.head(feats.transpose(1, 2)))

    @torch.inference_mode()
    def embed(self, pcm16: torch.Tensor) -> torch.Tensor:
        """[S] at 16 kHz -> [embedding_size] float32 x-vector."""
        weight = self.head.conv1.weight
        feats = kaldi_fbank(pcm16.float().cpu(), SPEECH_SAMPLE_RATE, self.feat_dim)
        feats = feats - feats.mean(dim=0, keepdim=True)  # [T, 80]
        return self(feats[None].to(weight.device, weight.dtype))[0].float()
