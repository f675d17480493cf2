"""K models of one family fused into one: each layer holds the K members' weights side by side, so one
kernel trains them all (HFTA, Wang et al. MLSys 2021).

Every parameter and buffer of a fused layer has the members on its first dimension, shape (K, ...): a
convolution of K members is one grouped convolution (groups=K) over their channels placed side by side,
a BatchNorm of K members is one BatchNorm over K x C channels (BatchNorm is per channel, so the members
stay independent), a Linear is one batched matrix product. Activations travel as (B, K, F) between linear
layers and as (B, K*C, H, W), member-major channels, between convolutions; images are (B, K, 28, 28).

`fuse` builds the fused model from K ordinary ones (gan_tune.training.models) and `member_state` gives one
member's weights back as the ordinary model's state_dict. Members may differ in their first layer's input
size (latent_dim): each weight is zero-padded to the largest, and a member's noise is zero-padded alike, so
the extra inputs are zero, their weights get no gradient and the member is exactly the smaller model.
"""

from __future__ import annotations

from typing import Callable, ClassVar

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.utils import parametrize

from gan_tune.training.models import Logit

SPECTRAL_EPS = 1e-12  # torch.nn.utils.parametrizations.spectral_norm's default
ORIGINAL = "parametrizations.weight.original"  # an ordinary spectral-norm layer's state_dict names
U, V = "parametrizations.weight.0._u", "parametrizations.weight.0._v"


class Fused(nn.Module):
    """A fused layer: `names` maps each ordinary state_dict name to this layer's parameter or buffer."""

    names: ClassVar[dict[str, str]] = {}

    def __init__(self, state: dict[str, Tensor], params: tuple[str, ...]):
        super().__init__()
        self.members = next(iter(state.values())).shape[0]
        for ordinary, tensor in state.items():
            name = self.names[ordinary]
            if ordinary in params:
                setattr(self, name, nn.Parameter(tensor))
            else:
                self.register_buffer(name, tensor)

    def fused_state(self) -> dict[str, Tensor]:
        return {ordinary: getattr(self, name) for ordinary, name in self.names.items() if hasattr(self, name)}


class SpectralWeight(Fused):
    """The weight of a Conv2d or Linear, divided by its spectral norm when the ordinary layer had spectral_norm
    (torch's parametrization: one power iteration per training forward, u then v, in place, without grad)."""

    names: ClassVar[dict[str, str]] = {"weight": "weight", "bias": "bias", ORIGINAL: "weight", U: "u", V: "v"}

    def __init__(self, state: dict[str, Tensor]):
        super().__init__(state, params=("weight", "bias", ORIGINAL))
        self.spectral = U in state
        if "bias" not in state:
            self.bias = None

    def normalised_weight(self) -> Tensor:
        if not self.spectral:
            return self.weight
        matrix = self.weight.flatten(2)  # (K, out, in * kh * kw): dim 0 of each member's weight
        if self.training:
            with torch.no_grad():
                self.u.copy_(F.normalize(torch.bmm(matrix, self.v.unsqueeze(2)).squeeze(2), dim=1, eps=SPECTRAL_EPS))
                self.v.copy_(F.normalize(torch.bmm(matrix.transpose(1, 2), self.u.unsqueeze(2)).squeeze(2), dim=1,
                                         eps=SPECTRAL_EPS))
        # clones: a later forward updates u and v in place, and this forward's graph must keep its own
        u, v = self.u.clone(), self.v.clone()
        sigma = (u * torch.bmm(matrix, v.unsqueeze(2)).squeeze(2)).sum(1)  # (K,)
        return self.weight / sigma.view(-1, *[1] * (self.weight.dim() - 1))


class FusedLinear(SpectralWeight):
    def forward(self, x: Tensor) -> Tensor:  # (B, K, in) -> (B, K, out)
        y = torch.einsum("bki,koi->bko", x, self.normalised_weight())
        return y if self.bias is None else y + self.bias


class FusedConv2d(SpectralWeight):
    memory_format = torch.contiguous_format  # fuse() sets channels_last on a CPU, as make_gan does

    def __init__(self, state: dict[str, Tensor], layer: nn.Conv2d):
        super().__init__(state)
        self.stride, self.padding, self.dilation = layer.stride, layer.padding, layer.dilation

    def forward(self, x: Tensor) -> Tensor:  # (B, K*in, H, W) -> (B, K*out, H', W')
        bias = None if self.bias is None else self.bias.flatten()
        weight = self.normalised_weight().flatten(0, 1).contiguous(memory_format=self.memory_format)
        return F.conv2d(x.contiguous(memory_format=self.memory_format), weight, bias, self.stride, self.padding,
                        self.dilation, groups=self.members)


class FusedConvTranspose2d(Fused):
    names: ClassVar[dict[str, str]] = {"weight": "weight", "bias": "bias"}
    memory_format = torch.contiguous_format

    def __init__(self, state: dict[str, Tensor], layer: nn.ConvTranspose2d):
        super().__init__(state, params=("weight", "bias"))
        if "bias" not in state:
            self.bias = None
        self.stride, self.padding, self.output_padding = layer.stride, layer.padding, layer.output_padding
        self.dilation = layer.dilation

    def forward(self, x: Tensor) -> Tensor:  # weight (K, in, out, kh, kw): groups split its first dimension
        bias = None if self.bias is None else self.bias.flatten()
        weight = self.weight.flatten(0, 1).contiguous(memory_format=self.memory_format)
        return F.conv_transpose2d(x.contiguous(memory_format=self.memory_format), weight, bias, self.stride,
                                  self.padding, self.output_padding, self.members, self.dilation)


class FusedBatchNorm(Fused):
    names: ClassVar[dict[str, str]] = {
        name: name for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")}

    def __init__(self, state: dict[str, Tensor], layer: nn.modules.batchnorm._BatchNorm):
        super().__init__(state, params=("weight", "bias"))
        self.eps, self.momentum = layer.eps, layer.momentum

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        if x.dim() == 3:  # (B, K, F): BatchNorm1d's channels are each member's features
            x = x.reshape(shape[0], -1)
        if self.training:
            self.num_batches_tracked.add_(1)
        # views of the (K, C) buffers: batch_norm updates the running statistics in place
        y = F.batch_norm(x, self.running_mean.view(-1), self.running_var.view(-1), self.weight.view(-1),
                         self.bias.view(-1), self.training, self.momentum, self.eps)
        return y.reshape(shape)


class FusedFlatten(nn.Module):
    """nn.Flatten of each member: (B, K*C, H, W) or (B, K, H, W) -> (B, K, C*H*W)."""

    def __init__(self, members: int):
        super().__init__()
        self.members = members

    def forward(self, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], self.members, -1)


class FusedUnflatten(nn.Module):
    """nn.Unflatten(1, (C, ...)) of each member: (B, K, F) -> (B, K*C, ...) with member-major channels."""

    def __init__(self, members: int, shape: tuple[int, ...]):
        super().__init__()
        self.members, self.shape = members, shape

    def forward(self, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], self.members * self.shape[0], *self.shape[1:])


class FusedLogit(FusedFlatten):
    def forward(self, x: Tensor) -> Tensor:  # (B, K, 1[, 1, 1]) -> (B, K)
        return x.reshape(x.shape[0], self.members)


SHARED = (nn.LeakyReLU, nn.ReLU, nn.Tanh, nn.Upsample, nn.Identity)  # per element or per channel: members apart


def padded_stack(tensors: list[Tensor]) -> Tensor:
    """The members' tensors stacked on a new first dimension, each zero-padded to the largest shape."""
    shape = [max(sizes) for sizes in zip(*(t.shape for t in tensors))]
    out = tensors[0].new_zeros((len(tensors), *shape))
    for k, t in enumerate(tensors):
        out[k][tuple(slice(0, n) for n in t.shape)] = t.detach()
    return out


def layer_kind(layer: nn.Module) -> type:
    """The layer's class; for a parametrized layer (spectral norm) the class its generated subclass extends."""
    return type(layer).__bases__[0] if parametrize.is_parametrized(layer) else type(layer)


def fuse_layer(layers: list[nn.Module]) -> nn.Module:
    """One fused layer from the K members' layers at the same place in their nn.Sequential."""
    first, k = layers[0], len(layers)
    kind = layer_kind(first)
    if any(layer_kind(layer) is not kind for layer in layers):
        raise ValueError(f"members differ in layer type: {sorted({layer_kind(layer).__name__ for layer in layers})}")
    if isinstance(first, SHARED):
        return first
    state = {name: padded_stack([layer.state_dict()[name] for layer in layers]) for name in first.state_dict()}
    builders: dict[type, Callable[[], nn.Module]] = {
        nn.Linear: lambda: FusedLinear(state),
        nn.Conv2d: lambda: FusedConv2d(state, first),
        nn.ConvTranspose2d: lambda: FusedConvTranspose2d(state, first),
        nn.BatchNorm1d: lambda: FusedBatchNorm(state, first),
        nn.BatchNorm2d: lambda: FusedBatchNorm(state, first),
        nn.Flatten: lambda: FusedFlatten(k),
        nn.Unflatten: lambda: FusedUnflatten(k, tuple(max(s) for s in zip(*(layer.unflattened_size
                                                                                for layer in layers)))),
        Logit: lambda: FusedLogit(k),
    }
    if kind not in builders:
        raise ValueError(f"no fused form of {kind.__name__}")
    return builders[kind]()


def fuse(models: list[nn.Module]) -> nn.Sequential:
    """K ordinary nn.Sequential models of one family (and one width) as one fused model."""
    if len({len(m) for m in models}) != 1:
        raise ValueError("members differ in depth: they are not one model family and width")
    fused = nn.Sequential(*(fuse_layer(list(layers)) for layers in zip(*models)))
    device = next(models[0].parameters()).device
    if device.type == "cpu":  # oneDNN's NHWC grouped convolutions: measured faster on the 2-core dev CPU
        for layer in fused:
            if isinstance(layer, (FusedConv2d, FusedConvTranspose2d)):
                layer.memory_format = torch.channels_last
    return fused.to(device).train(models[0].training)


def member_state(fused: nn.Sequential, k: int, like: nn.Module) -> dict[str, Tensor]:
    """Member k's weights and buffers as the state_dict of `like`, an ordinary model of its config (each
    tensor cut back from the padded size to the member's own)."""
    ordinary = like.state_dict()
    state = {}
    for index, layer in enumerate(fused):
        if not isinstance(layer, Fused):
            continue
        for name, tensor in layer.fused_state().items():
            key = f"{index}.{name}"
            if key in ordinary:
                state[key] = tensor[k][tuple(slice(0, n) for n in ordinary[key].shape)].detach().clone()
    return state
