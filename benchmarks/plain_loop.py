"""The anchor of benchmarks/real_dev.py and benchmarks/real_finetune.py: a plain PyTorch loop, written here and NOT
imported from carsml.

timm model from scratch, or fine-tuned from a timm state dict (`weights`: every tensor but the classifier's);
torchvision v2 RandomResizedCrop(scale 0.5-1) + horizontal flip + ColorJitter(0.2, 0.2) decoded from the full-size JPEG
every epoch (DataLoader, one worker per core); AdamW (lr 2e-3, weight decay 0.05 on every parameter), OneCycle, label
smoothing 0.1, bf16 autocast + channels_last on CPU (fp16/bf16 autocast on CUDA), batch 64 (fine-tuning: lr 1e-3,
batch 32); the model of the last epoch is reported. Evaluation: the whole image resized to size x size.

    python benchmarks/plain_loop.py --data DIR --classes 20 --size 96 --epochs 30 [--train-files FILE]
    python benchmarks/plain_loop.py --data DIR --classes 0 --model efficientnet_lite0 --weights FILE --lr 1e-3 \
        --batch-size 32 --size 160 --epochs 10

`--train-files` (one file name per line) restricts training to those images of the train split: the same 80 % carsml
trains on after holding out its validation split.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}


def class_folders(root: Path, classes: int) -> list[Path]:
    """The first `classes` class folders of `root/train`, sorted by name (as carsml's class-folder reader)."""
    folders = sorted(p for p in (root / "train").iterdir() if p.is_dir() and not p.name.startswith("."))
    return folders[:classes] if classes else folders


def samples(root: Path, split: str, names: list[str], keep: set[str] | None = None) -> list[tuple[Path, int]]:
    """(path, label) of every image of `split` in the chosen classes (only the files in `keep`, when given)."""
    out = []
    for label, name in enumerate(names):
        for path in sorted((root / split / name).iterdir()):
            if path.suffix.lower() in IMAGE_SUFFIXES and (keep is None or path.name in keep):
                out.append((path, label))
    return out


class Images(Dataset):
    """Decode one JPEG per item and apply a torchvision v2 transform."""

    def __init__(self, items: list[tuple[Path, int]], transform: v2.Transform) -> None:
        self.items, self.transform = items, transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.items[i]
        with Image.open(path) as img:
            return self.transform(img.convert("RGB")), label


def transforms(size: int) -> tuple[v2.Transform, v2.Transform]:
    """(train, eval) transforms; ImageNet statistics."""
    norm = [v2.ToDtype(torch.float32, scale=True), v2.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])]
    train = v2.Compose([v2.PILToTensor(), v2.RandomResizedCrop(size, scale=(0.5, 1.0), antialias=True),
                        v2.RandomHorizontalFlip(), v2.ColorJitter(0.2, 0.2), *norm])
    evaluate = v2.Compose([v2.PILToTensor(), v2.Resize((size, size), antialias=True), *norm])
    return train, evaluate


def run(data: Path, classes: int, size: int, epochs: int, model_name: str = "resnet18", batch_size: int = 64,
        lr: float = 2e-3, train_files: set[str] | None = None, seed: int = 0,
        weights: Path | None = None) -> dict[str, float]:
    """Train and test once; returns test accuracy, top-5, wall seconds and training images/s."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    names = [p.name for p in class_folders(data, classes)]
    train_items = samples(data, "train", names, train_files)
    test_items = samples(data, "test", names)
    train_tf, eval_tf = transforms(size)
    workers = min(4, os.cpu_count() or 1)
    train_loader = DataLoader(Images(train_items, train_tf), batch_size=batch_size, shuffle=True, drop_last=True,
                              num_workers=workers, persistent_workers=True,
                              generator=torch.Generator().manual_seed(seed))
    test_loader = DataLoader(Images(test_items, eval_tf), batch_size=128, num_workers=workers)
    model = timm.create_model(model_name, pretrained=False, num_classes=len(names))
    if weights is not None:  # a timm state dict: every tensor but the classifier's, whose class count differs
        state = torch.load(weights, map_location="cpu", weights_only=True)
        head = model.pretrained_cfg["classifier"]
        missing, unexpected = model.load_state_dict({k: v for k, v in state.items() if not k.startswith(head + ".")},
                                                    strict=False)
        assert not unexpected and all(k.startswith(head + ".") for k in missing), (missing, unexpected)
    model = model.to(device)
    model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=epochs * len(train_loader))
    amp = torch.bfloat16 if device.type == "cpu" or torch.cuda.is_bf16_supported() else torch.float16
    start, seen = time.perf_counter(), 0
    for _ in range(epochs):
        model.train()
        for x, y in train_loader:
            x = x.to(device, memory_format=torch.channels_last)
            y = y.to(device)
            with torch.autocast(device.type, dtype=amp):
                loss = F.cross_entropy(model(x), y, label_smoothing=0.1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            seen += len(y)
    train_seconds = time.perf_counter() - start
    model.eval()
    correct = top5 = total = 0
    with torch.inference_mode(), torch.autocast(device.type, dtype=amp):
        for x, y in test_loader:
            logits = model(x.to(device, memory_format=torch.channels_last)).float().cpu()
            correct += int((logits.argmax(1) == y).sum())
            top5 += int((logits.topk(min(5, logits.shape[1]), 1).indices == y[:, None]).any(1).sum())
            total += len(y)
    wall = time.perf_counter() - start
    return {"test_acc": correct / total, "test_top5": top5 / total, "wall_seconds": wall,
            "images_per_second": seen / train_seconds, "train_images": float(len(train_items)),
            "test_images": float(total), "epochs": float(epochs), "steps": float(epochs * len(train_loader)),
            "lr": lr}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="class-folder dataset root (train/ and test/)")
    parser.add_argument("--classes", type=int, default=20)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--weights", type=Path, help="timm state dict to fine-tune from (the head is replaced)")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--train-files", type=Path, help="file with the train-split file names to train on")
    args = parser.parse_args()
    keep = set(args.train_files.read_text().split()) if args.train_files else None
    print(json.dumps(run(args.data, args.classes, args.size, args.epochs, args.model, args.batch_size, args.lr,
                         train_files=keep, weights=args.weights)))


if __name__ == "__main__":
    main()
