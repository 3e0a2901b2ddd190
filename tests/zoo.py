"""The architectures Lightning users train, at tiny sizes, with random weights (nothing downloaded).

Each :class:`ZooCase` builds a model (float64 unless stated), inputs and labels, and names the
embedding whose output is the perturbed input for token models. torchvision models use their
own builders with small configurations; Hugging Face and timm models are built from tiny configs
when those packages are installed (test extra).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

CLASSES = 5


@dataclass(frozen=True)
class ZooCase:
    """A model, its inputs and labels.

    Attributes:
        name: test id.
        build: the model for a number of classes.
        inputs: a batch of the given size (tensor or dict).
        input_module: for token inputs, the embedding whose output is perturbed.
        requires: a package the case needs (skipped without it).
        windows: map window sizes to check against the reference.
        dtype: the model's dtype.
    """

    name: str
    build: Callable[[int], nn.Module]
    inputs: Callable[[int], Tensor | dict[str, Tensor]]
    input_module: str | None = None
    requires: str | None = None
    windows: tuple[int, ...] = (1, 3)
    dtype: torch.dtype = torch.float64
    kwargs: dict[str, object] = field(default_factory=dict)


def _gen(seed: int = 11) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def images(channels: int, size: int) -> Callable[[int], Tensor]:
    return lambda batch: torch.randn(batch, channels, size, size, generator=_gen())


def tokens(vocab: int, length: int, padded: bool = False) -> Callable[[int], dict[str, Tensor]]:
    """``{"input_ids", "attention_mask"}`` as a tokenizer returns them; the second sample padded."""

    def make(batch: int) -> dict[str, Tensor]:
        ids = torch.randint(1, vocab, (batch, length), generator=_gen())
        mask = torch.ones(batch, length, dtype=torch.long)
        if padded and batch > 1:
            mask[1, length // 2 :] = 0
            ids[1, length // 2 :] = 0
        return {"input_ids": ids, "attention_mask": mask}

    return make


def ids(vocab: int, length: int) -> Callable[[int], Tensor]:
    """A plain ``(B, T)`` tensor of token ids."""
    return lambda batch: tokens(vocab, length)(batch)["input_ids"]


# -- hand-written models that stand for common patterns -----------------------------------------


class TextTransformer(nn.Module):
    """``nn.TransformerEncoder`` classifier over token ids with a padding mask (dict batches)."""

    def __init__(self, classes: int = CLASSES, vocab: int = 20, dim: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim, padding_idx=0)
        self.position = nn.Parameter(0.1 * torch.randn(16, dim, generator=_gen(3)))
        layer = nn.TransformerEncoderLayer(dim, 2, 16, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(dim, classes)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        h = self.embed(input_ids) + self.position[: input_ids.shape[1]]
        h = self.encoder(h, src_key_padding_mask=attention_mask == 0)
        keep = attention_mask.unsqueeze(-1).to(h.dtype)
        return self.head((h * keep).sum(1) / keep.sum(1))


class Recurrent(nn.Module):
    """Embedding → a two-layer LSTM, GRU or RNN → Linear on the last step.

    ``options`` go to the recurrent layer (``bidirectional``, ``proj_size``, ``batch_first``...).
    """

    def __init__(
        self,
        kind: type[nn.RNNBase],
        classes: int = CLASSES,
        vocab: int = 20,
        dim: int = 6,
        **options: object,
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        options = {"batch_first": True, **options}
        self.batch_first = bool(options["batch_first"])
        self.rnn = kind(dim, dim, num_layers=2, **options)  # type: ignore[arg-type]
        out = (options.get("proj_size") or dim) * (2 if options.get("bidirectional") else 1)
        self.head = nn.Linear(int(out), classes)  # type: ignore[call-overload]

    def forward(self, input_ids: Tensor) -> Tensor:
        embedded = self.embed(input_ids)
        out, _ = self.rnn(embedded if self.batch_first else embedded.transpose(0, 1))
        return self.head(out[:, -1] if self.batch_first else out[-1])


class Packed(nn.Module):
    """An LSTM over a packed batch of sequences of different lengths (and an explicit state)."""

    def __init__(self, classes: int = CLASSES, vocab: int = 20, dim: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim, padding_idx=0)
        self.rnn = nn.LSTM(dim, dim, batch_first=True)
        self.head = nn.Linear(dim, classes)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        lengths = attention_mask.sum(1).cpu()
        packed = nn.utils.rnn.pack_padded_sequence(
            self.embed(input_ids), lengths, batch_first=True, enforce_sorted=False
        )
        _, (h, _) = self.rnn(packed)
        return self.head(h[-1])


class TiedEmbedding(nn.Module):
    """Token classifier whose output layer reuses the embedding matrix (classes = vocabulary).

    ``functional=True`` ties by calling ``F.linear`` on the embedding's weight (GPT-style code);
    otherwise the head module owns the same parameter.
    """

    def __init__(self, functional: bool, classes: int = CLASSES, dim: int = 3) -> None:
        super().__init__()
        vocab = classes
        self.embed = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)
        self.functional = functional
        self.head = nn.Linear(dim, vocab, bias=True)
        if not functional:
            self.head.weight = self.embed.weight

    def forward(self, input_ids: Tensor) -> Tensor:
        h = torch.tanh(self.mix(self.embed(input_ids))).mean(1)
        if self.functional:
            return F.linear(h, self.embed.weight, self.head.bias)
        return self.head(h)


class Twice(nn.Module):
    """One Linear applied twice (shared weights), and a Conv applied to two inputs."""

    def __init__(self, classes: int = CLASSES) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.shared = nn.Linear(3, 3)
        self.head = nn.Linear(3, classes)

    def forward(self, x: Tensor) -> Tensor:
        a = self.conv(x).mean((2, 3))
        b = self.conv(x.flip(-1)).amax((2, 3))
        h = torch.tanh(self.shared(torch.tanh(self.shared(a + b))))
        return self.head(h)


class InPlaceInput(nn.Module):
    """A forward that modifies its input in place."""

    def __init__(self, classes: int = CLASSES) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)
        self.head = nn.Linear(3, classes)

    def forward(self, x: Tensor) -> Tensor:
        x.mul_(2.0).add_(0.5)
        return self.head(torch.tanh(self.conv(x)).mean((2, 3)))


class ChannelsLastNorm(nn.LayerNorm):
    """ConvNeXt's pattern: a LayerNorm subclass that normalises channels of (B, C, H, W)."""

    def forward(self, x: Tensor) -> Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


def layernorm2d_square(classes: int = CLASSES) -> nn.Module:
    """Width equals channels, where a LayerNorm route would silently normalise the wrong axis."""
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        ChannelsLastNorm(4),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, classes),
    )


class Prototypes(nn.Module):
    """Logits from the distances to learned class prototypes (``torch.cdist``)."""

    def __init__(self, dim: int, classes: int = CLASSES) -> None:
        super().__init__()
        self.prototypes = nn.Parameter(torch.randn(classes, dim))

    def forward(self, h: Tensor) -> Tensor:
        return -torch.cdist(h.unsqueeze(1), self.prototypes.unsqueeze(0)).squeeze(1)


def prelu_prototypes(classes: int = CLASSES) -> nn.Module:
    """A PReLU and a prototype head, both on the Jacobian route, where torch's batching rules for
    their backward are wrong at some sizes (tests/test_vmap_sizes.py)."""
    return nn.Sequential(nn.Conv2d(2, 3, 2), nn.PReLU(3), nn.Flatten(), Prototypes(48, classes))


def small_cnn(classes: int = CLASSES) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, stride=2, padding=1),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(4 * 3 * 3, classes),
    )


def compiled_cnn(classes: int = CLASSES) -> nn.Module:
    return torch.compile(small_cnn(classes), backend="aot_eager")


# -- torchvision, Hugging Face and timm at tiny sizes -------------------------------------------


def resnet18(classes: int = CLASSES) -> nn.Module:
    from torchvision.models import resnet18

    return resnet18(num_classes=classes)


def mobilenet_v3(classes: int = CLASSES) -> nn.Module:
    from torchvision.models import mobilenet_v3_small

    return mobilenet_v3_small(num_classes=classes)


def efficientnet_b0(classes: int = CLASSES) -> nn.Module:
    from torchvision.models import efficientnet_b0

    return efficientnet_b0(num_classes=classes)


def convnext(classes: int = CLASSES) -> nn.Module:
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    return ConvNeXt([CNBlockConfig(8, 16, 1), CNBlockConfig(16, None, 1)], num_classes=classes)


def regnet(classes: int = CLASSES) -> nn.Module:
    from torchvision.models.regnet import BlockParams, RegNet

    params = BlockParams.from_init_params(depth=2, w_0=8, w_a=8.0, w_m=2.0, group_width=4)
    return RegNet(params, num_classes=classes, stem_width=8)


def shufflenet(classes: int = CLASSES) -> nn.Module:
    from torchvision.models import ShuffleNetV2

    return ShuffleNetV2([1, 1, 1], [8, 8, 16, 16, 32], num_classes=classes)


def densenet(classes: int = CLASSES) -> nn.Module:
    from torchvision.models import DenseNet

    return DenseNet(
        growth_rate=4, block_config=(2, 2), num_init_features=8, bn_size=2, num_classes=classes
    )


def vit(classes: int = CLASSES) -> nn.Module:
    from torchvision.models import VisionTransformer

    model = VisionTransformer(
        image_size=8,
        patch_size=4,
        num_layers=1,
        num_heads=2,
        hidden_dim=8,
        mlp_dim=16,
        num_classes=classes,
    )
    nn.init.normal_(model.heads.head.weight)  # torchvision starts it at zero: logits constant
    return model


def swin(classes: int = CLASSES) -> nn.Module:
    from torchvision.models import SwinTransformer

    return SwinTransformer(
        patch_size=[2, 2],
        embed_dim=8,
        depths=[1, 1],
        num_heads=[1, 2],
        window_size=[2, 2],
        stochastic_depth_prob=0.0,
        num_classes=classes,
    )


def hf_bert(classes: int = CLASSES) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=20,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        max_position_embeddings=16,
        num_labels=classes,
    )
    return BertForSequenceClassification(config)


def hf_gpt2(classes: int = CLASSES) -> nn.Module:
    """GPT-2, whose attention and MLP layers are Hugging Face's ``Conv1D`` (a Linear stored
    transposed), classifying by its last token that is not padding."""
    from transformers import GPT2Config, GPT2ForSequenceClassification

    config = GPT2Config(
        vocab_size=20,
        n_positions=16,
        n_embd=8,
        n_layer=1,
        n_head=2,
        n_inner=16,
        num_labels=classes,
        pad_token_id=0,
        attn_implementation="eager",
    )
    return GPT2ForSequenceClassification(config)


def hf_vit(classes: int = CLASSES) -> nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        image_size=8,
        patch_size=4,
        num_channels=3,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        num_labels=classes,
    )
    return ViTForImageClassification(config)


def timm_vit(classes: int = CLASSES) -> nn.Module:
    import timm

    return timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=8,
        patch_size=4,
        embed_dim=8,
        depth=1,
        num_heads=2,
        num_classes=classes,
        init_values=0.5,
    )


def _pixel_values(batch: int) -> dict[str, Tensor]:
    return {"pixel_values": images(3, 8)(batch)}


ZOO = [
    ZooCase("resnet18", resnet18, images(3, 16)),
    ZooCase("mobilenet_v3", mobilenet_v3, images(3, 16)),
    ZooCase("efficientnet_b0", efficientnet_b0, images(3, 16)),
    ZooCase("convnext", convnext, images(3, 16)),
    ZooCase("regnet", regnet, images(3, 16)),
    ZooCase("shufflenet", shufflenet, images(3, 16)),
    ZooCase("densenet", densenet, images(3, 16)),
    ZooCase("vit", vit, images(3, 8)),
    ZooCase("swin", swin, images(3, 8)),
    ZooCase("text_transformer", TextTransformer, tokens(20, 6, padded=True), "embed"),
    ZooCase("lstm", lambda k: Recurrent(nn.LSTM, k), ids(20, 5), "embed"),
    ZooCase("gru", lambda k: Recurrent(nn.GRU, k), ids(20, 5), "embed"),
    ZooCase(
        "bilstm_projected",
        lambda k: Recurrent(nn.LSTM, k, bidirectional=True, proj_size=4, batch_first=False),
        ids(20, 5),
        "embed",
    ),
    ZooCase(
        "birnn_relu",
        lambda k: Recurrent(nn.RNN, k, bidirectional=True, nonlinearity="relu"),
        ids(20, 5),
        "embed",
    ),
    ZooCase(
        "hf_bert",
        hf_bert,
        tokens(20, 6, padded=True),
        "bert.embeddings.word_embeddings",
        requires="transformers",
    ),
    ZooCase(
        "hf_gpt2",
        hf_gpt2,
        tokens(20, 6, padded=True),
        "transformer.wte",
        requires="transformers",
    ),
    ZooCase("hf_vit", hf_vit, _pixel_values, requires="transformers"),
    ZooCase("timm_vit", timm_vit, images(3, 8), requires="timm"),
    ZooCase("lstm_packed", Packed, tokens(20, 6, padded=True), "embed"),
    # the vocabulary is the classes: ids below the fewest classes the zoo runs with
    ZooCase("tied_module", lambda k: TiedEmbedding(False, k), ids(3, 4), "embed"),
    ZooCase("tied_functional", lambda k: TiedEmbedding(True, k), ids(3, 4), "embed"),
    ZooCase("used_twice", Twice, images(2, 5)),
    ZooCase("in_place_input", InPlaceInput, images(2, 5)),
    ZooCase("layernorm2d", layernorm2d_square, images(2, 4)),
    ZooCase("prelu_prototypes", prelu_prototypes, images(2, 5)),
    ZooCase("compiled", compiled_cnn, images(2, 6)),
    ZooCase("bfloat16", small_cnn, images(2, 6), dtype=torch.bfloat16),
]


def build(
    case: ZooCase, batch: int = 2, seed: int = 0, classes: int = CLASSES
) -> tuple[nn.Module, object, Tensor]:
    """The case's model (training mode, as a user hands it over), its inputs and labels."""
    torch.manual_seed(seed)
    model = case.build(classes).to(case.dtype).train()
    inputs = case.inputs(batch)

    def cast(t: Tensor) -> Tensor:
        return t.to(case.dtype) if t.is_floating_point() else t

    inputs = {k: cast(v) for k, v in inputs.items()} if isinstance(inputs, dict) else cast(inputs)
    labels = torch.arange(batch) % classes
    return model, inputs, labels
