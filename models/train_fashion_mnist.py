"""Trains and exports the bundled Fashion-MNIST models (dev-only; needs torch).

Usage (from the repo root, a few minutes each on 2 CPU cores)::

    apt-get install -y dataset-fashion-mnist
    python -m models.train_fashion_mnist                      # models/fashion_mnist_cnn.{onnx,json}
    python -m models.train_fashion_mnist --arch resnet --epochs 6   # models/fashion_mnist_resnet.{onnx,json}

``--arch cnn`` (the default model): small, but with the couplings a structured pruner must respect:
BatchNorm after every conv, a residual Add (two convs whose channels are tied to the block input) and
a Concat of two branches feeding a conv::

    stem  Conv(1->32) BN Relu MaxPool(2)                          [N, 32, 14, 14]
    block Conv(32->32) BN Relu Conv(32->32) BN  + skip  Relu     [N, 32, 14, 14]
    down  Conv(32->64, stride 2) BN Relu                          [N, 64, 7, 7]
    mix   Concat(Conv3x3(64->64) BN Relu, Conv1x1(64->32) BN Relu) [N, 96, 7, 7]
    top   Conv(96->128) BN Relu GlobalAveragePool Linear(128->10)

``--arch resnet``: a small ResNet with real residual streams (each stage's stream has several writers,
the stage's convs and its shortcut, and several readers), for unconstrained pruning (issue 6)::

    stem  Conv(1->32) BN Relu MaxPool(2)                                         [N, 32, 14, 14]
    stage1  2 x BasicBlock(32): Conv3x3 BN Relu Conv3x3 BN  + identity  Relu     [N, 32, 14, 14]
    stage2  BasicBlock(32->64, stride 2, shortcut Conv1x1 BN) + BasicBlock(64)   [N, 64, 7, 7]
    stage3  BasicBlock(64->128, stride 2, shortcut Conv1x1 BN) + BasicBlock(128) [N, 128, 4, 4]
    top   GlobalAveragePool Linear(128->10)

Export uses the legacy TorchScript exporter with constant folding off, so BatchNormalization nodes
stay in the graph, opset 17, a dynamic batch axis, input ``image`` and output ``logits``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from models.fashion_mnist import DEBIAN_PACKAGE, load_fashion_mnist

HERE = Path(__file__).resolve().parent
DEFAULT_ONNX = HERE / "fashion_mnist_cnn.onnx"
RESNET_ONNX = HERE / "fashion_mnist_resnet.onnx"


def _cbr(cin: int, cout: int, k: int = 3, stride: int = 1, act: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout)]
    if act:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class FashionCNN(nn.Module):
    """~190k-parameter CNN with a residual block and a two-branch Concat."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(_cbr(1, 32), nn.MaxPool2d(2))
        self.block_a = _cbr(32, 32)
        self.block_b = _cbr(32, 32, act=False)
        self.down = _cbr(32, 64, stride=2)
        self.branch3 = _cbr(64, 64, k=3)
        self.branch1 = _cbr(64, 32, k=1)
        self.top = _cbr(96, 128)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(128, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(self.block_b(self.block_a(x)) + x)
        x = self.down(x)
        x = torch.cat([self.branch3(x), self.branch1(x)], dim=1)
        x = self.pool(self.top(x))
        return self.fc(torch.flatten(x, 1))


class BasicBlock(nn.Module):
    """Conv3x3 BN Relu Conv3x3 BN, plus the identity (or a Conv1x1 BN shortcut when the shape changes), Relu."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv_a = _cbr(cin, cout, stride=stride)
        self.conv_b = _cbr(cout, cout, act=False)
        self.shortcut = _cbr(cin, cout, k=1, stride=stride, act=False) if stride != 1 or cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = x if self.shortcut is None else self.shortcut(x)
        return torch.relu(self.conv_b(self.conv_a(x)) + skip)


class FashionResNet(nn.Module):
    """~0.7M-parameter ResNet (93.5% top-1 after 6 epochs, ~5 min on 2 idle cores): 3 stages x 2 basic blocks (32/64/128 channels), identity and 1x1 shortcuts."""

    def __init__(self, classes: int = 10, widths: tuple[int, ...] = (32, 64, 128), blocks: int = 2) -> None:
        super().__init__()
        self.stem = nn.Sequential(_cbr(1, widths[0]), nn.MaxPool2d(2))
        layers: list[nn.Module] = []
        cin = widths[0]
        for i, w in enumerate(widths):
            for b in range(blocks):
                layers.append(BasicBlock(cin, w, stride=2 if i and not b else 1))
                cin = w
        self.stages = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.stages(self.stem(x)))
        return self.fc(torch.flatten(x, 1))


ARCHS = {"cnn": (FashionCNN, DEFAULT_ONNX), "resnet": (FashionResNet, RESNET_ONNX)}


def evaluate(model: nn.Module, images: np.ndarray, labels: np.ndarray, batch: int = 1000) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(images), batch):
            logits = model(torch.from_numpy(images[i : i + batch]))
            correct += int((logits.argmax(1).numpy() == labels[i : i + batch]).sum())
    return correct / len(images)


def train(epochs: int, seed: int, batch: int, lr: float, threads: int, arch: str = "cnn") -> tuple[nn.Module, float]:
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    x_train, y_train = load_fashion_mnist("train")
    x_test, y_test = load_fashion_mnist("test")
    xt, yt = torch.from_numpy(x_train), torch.from_numpy(y_train)
    model = ARCHS[arch][0]()
    steps = epochs * ((len(xt) + batch - 1) // batch)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.25)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        model.train()
        start, total = time.perf_counter(), 0.0
        order = torch.randperm(len(xt), generator=gen)
        for i in range(0, len(xt), batch):
            idx = order[i : i + batch]
            xb, yb = xt[idx], yt[idx]
            flip = torch.rand(len(xb), generator=gen) < 0.5  # horizontal flip augmentation
            xb = torch.where(flip[:, None, None, None], xb.flip(3), xb)
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(xb), yb)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(xb)
        acc = evaluate(model, x_test, y_test)
        print(
            f"epoch {epoch + 1}/{epochs}: loss {total / len(xt):.4f} test top-1 {acc:.4f} "
            f"({time.perf_counter() - start:.0f}s)",
            flush=True,
        )
    return model, evaluate(model, x_test, y_test)


def export(model: nn.Module, path: Path) -> None:
    model.eval()
    torch.onnx.export(
        model,
        (torch.zeros(1, 1, 28, 28),),
        str(path),
        dynamo=False,
        do_constant_folding=False,
        opset_version=17,
        input_names=["image"],
        output_names=["logits"],
        dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--arch", choices=sorted(ARCHS), default="cnn")
    parser.add_argument("--out", type=Path, default=None, help="default: models/fashion_mnist_{arch}.onnx")
    args = parser.parse_args(argv)
    args.out = args.out or ARCHS[args.arch][1]

    model, top1 = train(args.epochs, args.seed, args.batch, args.lr, args.threads, args.arch)
    export(model, args.out)
    params = sum(p.numel() for p in model.parameters())
    meta = {
        "test_top1": round(top1, 4),
        "params": params,
        "input": "image",
        "output": "logits",
        "input_shape": ["batch", 1, 28, 28],
        "dataset": DEBIAN_PACKAGE,
        "arch": args.arch,
        "epochs": args.epochs,
        "seed": args.seed,
        "torch": torch.__version__,
    }
    args.out.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
    size = args.out.stat().st_size
    print(f"test top-1 {top1:.4f}, {params} params, wrote {args.out} ({size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
