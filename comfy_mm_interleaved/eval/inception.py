"""The Inception-v3 of the standard FID protocol: 2048-d pool features of images (TF graph 2015-12-05 variant).

FID and KID are defined on the features of one particular network: the Inception-v3 graph TensorFlow released on
2015-12-05, as ported to PyTorch by pytorch-fid (weights file ``pt_inception-2015-12-05-6726825d.pth``, also used
by torch-fidelity). It is the torchvision Inception-v3 layout with the quirks of that graph:

* the average pools inside the A, C and first E blocks ignore the zero padding (``count_include_pad=False``);
* the last E block (``Mixed_7c``) pools its fourth branch with a 3x3 *max* pool;
* input: images in [0, 1], resized bilinearly (no antialiasing) to 299x299, then scaled to [-1, 1];
* output: the global average of the last block, 2048 values per image (the 1008-way classifier is not used).

Images reach it through :func:`load_fid_image`: RGB, the shorter side resized to ``resolution`` (bicubic, the long
side scaled and truncated to an integer), a centred ``resolution`` square cropped (offsets rounded), 8-bit values
scaled to [0, 1]: torchvision's ``Resize(resolution, BICUBIC) + CenterCrop(resolution) + ToTensor`` on PIL images.
The standard protocol uses ``resolution`` 256; the official MM-Interleaved code uses 64 (its ``fid_score.py``).

Parameter names are those of the weights file (``Conv2d_1a_3x3.conv.weight``, ``Mixed_5b.branch1x1.bn.bias``...),
so its tensors load with ``load_state_dict(strict=True)``. Weights are read from a safetensors file made once by
``convert-inception`` (:mod:`.inception_convert`); nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch import nn

from ..checkpoint import format_list

FEATURE_DIM = 2048
INPUT_SIZE = 299
STANDARD_RESOLUTION = 256  # resize + centre crop of every image before the network's own resize to 299
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_HELP = (
    f"get the standard FID Inception weights {WEIGHTS_NAME} (pytorch-fid's GitHub release 'fid_weights', "
    "https://github.com/mseitzer/pytorch-fid/releases) and convert them once with "
    f"`python -m comfy_mm_interleaved convert-inception {WEIGHTS_NAME} inception-2015-12-05.safetensors`"
)

Kernel = int | tuple[int, int]


class BasicConv2d(nn.Module):
    """Convolution without bias, batch norm (eps 1e-3, running statistics), ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Kernel, stride: int = 1, padding: Kernel = 0):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_3x3(x: torch.Tensor) -> torch.Tensor:
    """The TF graph's 3x3 average pool: the zero padding does not count in the mean."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """35x35 block: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1 (64 + 64 + 96 + pool_features channels)."""

    def __init__(self, in_channels: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, 1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        branch_pool = self.branch_pool(_avg_pool_3x3(x))
        return torch.cat([self.branch1x1(x), branch5x5, branch3x3dbl, branch_pool], dim=1)


class InceptionB(nn.Module):
    """35 -> 17 reduction: 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2 (384 + 96 + in_channels channels)."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        branch_pool = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([self.branch3x3(x), branch3x3dbl, branch_pool], dim=1)


class InceptionC(nn.Module):
    """17x17 block with factorised 7x7 convolutions of ``channels_7x7`` channels (4 x 192 output channels)."""

    def __init__(self, in_channels: int, channels_7x7: int):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, 1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch7x7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        branch7x7dbl = x
        for conv in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4):
            branch7x7dbl = conv(branch7x7dbl)
        branch7x7dbl = self.branch7x7dbl_5(branch7x7dbl)
        branch_pool = self.branch_pool(_avg_pool_3x3(x))
        return torch.cat([self.branch1x1(x), branch7x7, branch7x7dbl, branch_pool], dim=1)


class InceptionD(nn.Module):
    """17 -> 8 reduction: 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2 (320 + 192 + in_channels channels)."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch3x3 = self.branch3x3_2(self.branch3x3_1(x))
        branch7x7x3 = x
        for conv in (self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            branch7x7x3 = conv(branch7x7x3)
        branch_pool = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([branch3x3, branch7x7x3, branch_pool], dim=1)


class InceptionE(nn.Module):
    """8x8 block with split 1x3 / 3x1 outputs (320 + 768 + 768 + 192 = 2048 channels). ``max_pool``: the pool
    branch takes a 3x3 max pool instead of the average (the FID graph's last block)."""

    def __init__(self, in_channels: int, max_pool: bool = False):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(in_channels, 320, 1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch3x3 = self.branch3x3_1(x)
        branch3x3 = torch.cat([self.branch3x3_2a(branch3x3), self.branch3x3_2b(branch3x3)], dim=1)
        branch3x3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        branch3x3dbl = torch.cat([self.branch3x3dbl_3a(branch3x3dbl), self.branch3x3dbl_3b(branch3x3dbl)], dim=1)
        pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else _avg_pool_3x3(x)
        return torch.cat([self.branch1x1(x), branch3x3, branch3x3dbl, self.branch_pool(pooled)], dim=1)


class FIDInceptionV3(nn.Module):
    """Images [B, 3, H, W] in [0, 1] -> pool features [B, 2048] (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280)
        self.Mixed_7c = InceptionE(2048, max_pool=True)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images [B, 3, H, W] in [0, 1], got shape {tuple(images.shape)}")
        x = F.interpolate(images, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
        x = 2 * x - 1  # [B, 3, 299, 299] in [-1, 1]
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # [B, 64, 73, 73]
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # [B, 192, 35, 35]
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a):
            x = block(x)  # -> [B, 768, 17, 17]
        for block in (self.Mixed_6b, self.Mixed_6c, self.Mixed_6d, self.Mixed_6e, self.Mixed_7a):
            x = block(x)  # -> [B, 1280, 8, 8]
        x = self.Mixed_7c(self.Mixed_7b(x))  # [B, 2048, 8, 8]
        return x.mean(dim=(2, 3))  # [B, 2048]


def load_fid_inception(path: str | Path, device: torch.device | str = "cpu") -> FIDInceptionV3:
    """The FID Inception with the weights of the safetensors file ``path`` (made by ``convert-inception``), in
    float32 and eval mode on ``device``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Inception weights {path} not found; {WEIGHTS_HELP}")
    try:
        state_dict = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path} is not a readable safetensors file ({err}); {WEIGHTS_HELP}") from None
    model = FIDInceptionV3()
    check_state_dict(state_dict, model, str(path))
    model.load_state_dict(state_dict, strict=True)
    return model.to(device=device, dtype=torch.float32).eval().requires_grad_(False)


def check_state_dict(state_dict: dict[str, torch.Tensor], model: nn.Module, source: str) -> None:
    """A clear error when ``state_dict`` lacks, adds or reshapes any of ``model``'s tensors."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    extra = sorted(set(state_dict) - set(expected))
    reshaped = sorted(
        f"{k} {tuple(state_dict[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and state_dict[k].shape != v.shape
    )
    problems = [
        f"{what}: {format_list(keys)}"
        for what, keys in (("missing", missing), ("unexpected", extra), ("wrong shapes", reshaped))
        if keys
    ]
    if problems:
        raise ValueError(f"{source} is not the FID Inception-v3 ({'; '.join(problems)}); {WEIGHTS_HELP}")


# ----------------------------------------------------------------------------------------------------------------
# Images to features


def resize_center_crop(image: Image.Image, size: int) -> Image.Image:
    """Shorter side to ``size`` (bicubic), then the centred ``size`` x ``size`` square."""
    width, height = image.size
    if width <= height:
        new_size = (size, int(size * height / width))
    else:
        new_size = (int(size * width / height), size)
    image = image.resize(new_size, Image.Resampling.BICUBIC)
    left = int(round((new_size[0] - size) / 2.0))
    top = int(round((new_size[1] - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def load_fid_image(path: str | Path, resolution: int) -> torch.Tensor:
    """The image file ``path`` as the FID input [3, resolution, resolution] in [0, 1] (module docstring)."""
    try:
        with Image.open(path) as file:
            image = file.convert("RGB")
    except (OSError, UnidentifiedImageError) as err:
        raise ValueError(f"cannot read the image {path} ({err})") from None
    pixels = np.asarray(resize_center_crop(image, resolution), dtype=np.uint8)
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1).float() / 255  # [3, R, R]


class _FIDImages(torch.utils.data.Dataset):
    def __init__(self, paths: Sequence[Path], resolution: int) -> None:
        self.paths, self.resolution = list(paths), resolution

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        return load_fid_image(self.paths[index], self.resolution)


@torch.no_grad()
def inception_features(
    model: FIDInceptionV3,
    paths: Sequence[Path],
    resolution: int = STANDARD_RESOLUTION,
    batch_size: int = 50,
    workers: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """Pool features [N, 2048] (float64) of the image files ``paths``, in order. ``workers`` decode images in
    background processes. Convolutions run in full float32 (TF32 off on GPUs)."""
    if resolution < 1 or batch_size < 1 or workers < 0:
        raise ValueError(
            f"need resolution >= 1, batch_size >= 1, workers >= 0; got {resolution}, {batch_size}, {workers}"
        )
    device = next(model.parameters()).device
    loader = torch.utils.data.DataLoader(_FIDImages(paths, resolution), batch_size=batch_size, num_workers=workers)
    features = np.empty((len(paths), FEATURE_DIM), dtype=np.float64)
    done = 0
    cudnn = torch.backends.cudnn
    with cudnn.flags(
        enabled=cudnn.enabled, benchmark=cudnn.benchmark, deterministic=cudnn.deterministic, allow_tf32=False
    ):
        for batch in loader:
            features[done : done + len(batch)] = model(batch.to(device)).double().cpu().numpy()
            done += len(batch)
            if progress is not None:
                progress(done, len(paths))
    return features


def image_files(folder: str | Path, what: str) -> list[Path]:
    """The image files (``IMAGE_SUFFIXES``) directly in ``folder``, sorted by name; clear errors when there are
    none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{what} folder {folder} does not exist")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"{what} folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return files
