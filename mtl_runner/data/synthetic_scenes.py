"""``dataset=synthetic_scenes``: the built-in, generated scene-understanding dataset.

Each image shows one to four shapes (circle, square, triangle, ring) at random depths in
front of a textured background plane that recedes towards the top of the image. Three
tasks of different kinds and loss scales, which is what makes multi-task learning hard:

- ``seg``: per-pixel shape class (5 classes incl. background); cross-entropy, mIoU and
  pixel accuracy.
- ``depth``: per-pixel depth in metres (background 4-20 m, shapes 2-12 m); squared error,
  so its loss is one to two orders of magnitude above the segmentation loss.
- ``count``: number of shapes (1-4) as a 4-way image-level classification.

Depth is inferable from appearance: shapes shrink with distance (perspective) and colours
fade towards a fog colour with depth, as in real scenes. Everything is generated with
vectorised tensor operations from one seed (deterministic per device), so 10k images take
seconds, and it can be generated directly on the training device.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mtl_runner.data.base import TaskSet, TensorSplit
from mtl_runner.tasks import Task

SHAPES = ("background", "circle", "square", "triangle", "ring")
MAX_OBJECTS = 4
BG_NEAR, BG_FAR = 4.0, 20.0
OBJ_NEAR, OBJ_FAR = 2.0, 12.0
FOG_DISTANCE = 14.0
CHUNK = 512


def synthetic_scenes(
    image_size: int = 64,
    num_train: int = 2000,
    num_val: int = 400,
    num_test: int = 400,
    seed: int = 0,
    device: str = "cpu",
) -> TaskSet:
    """Generate the three splits. Each split has its own seed stream, so changing
    ``num_train`` does not change the validation or test images."""
    if image_size < 16 or image_size % 4:
        raise ValueError(f"dataset.image_size must be a multiple of 4 and >= 16, got {image_size}")
    for key, value in (("num_train", num_train), ("num_val", num_val), ("num_test", num_test)):
        if value < 1:
            raise ValueError(f"dataset.{key} must be >= 1, got {value}")
    gen_device = torch.device(device)
    splits = [
        _generate(n, image_size, seed * 3 + offset, gen_device)
        for offset, n in enumerate((num_train, num_val, num_test))
    ]
    tasks = (
        Task("seg", "segmentation", len(SHAPES), class_names=SHAPES),
        Task("depth", "depth", 1, loss_name="mse"),
        Task("count", "classification", MAX_OBJECTS, class_names=tuple(str(i + 1) for i in range(MAX_OBJECTS))),
    )
    return TaskSet("synthetic_scenes", tasks, *splits, input_shape=(3, image_size, image_size))


def _generate(n: int, size: int, seed: int, device: torch.device) -> TensorSplit:
    gen = torch.Generator(device=device).manual_seed(seed)
    parts = [_generate_chunk(min(CHUNK, n - s), size, gen, device) for s in range(0, n, CHUNK)]
    images, seg, depth, count = (torch.cat(p) for p in zip(*parts))
    return TensorSplit(images, {"seg": seg, "depth": depth, "count": count})


def _rand(gen: torch.Generator, device: torch.device, *shape: int) -> Tensor:
    return torch.rand(shape, generator=gen, device=device)


def _generate_chunk(n: int, size: int, gen: torch.Generator, device: torch.device) -> tuple[Tensor, ...]:
    coords = (torch.arange(size, device=device, dtype=torch.float32) + 0.5) / size
    ys, xs = coords.view(1, size, 1), coords.view(1, 1, size)

    # Background plane: far at the top, near at the bottom; a textured, fogged surface.
    bg_depth = (BG_FAR - (BG_FAR - BG_NEAR) * ys).expand(n, size, size)
    freq = 4 + 12 * _rand(gen, device, n, 2, 1, 1)
    angle = math.pi * _rand(gen, device, n, 2, 1, 1)
    phase = 2 * math.pi * _rand(gen, device, n, 2, 1, 1)
    waves = torch.sin(2 * math.pi * freq * (xs.unsqueeze(1) * torch.cos(angle) + ys.unsqueeze(1) * torch.sin(angle)) + phase)
    texture = 0.5 + 0.25 * waves.mean(1)  # (n, H, W)
    bg_color = 0.2 + 0.6 * _rand(gen, device, n, 3, 1, 1)
    image = bg_color * texture.unsqueeze(1) * (0.8 + 0.4 * _rand(gen, device, n, 3, size, size))
    depth = bg_depth.clone()
    seg = torch.zeros(n, size, size, dtype=torch.long, device=device)

    # One object per image quadrant keeps every object visible, so the count is defined.
    count = torch.randint(1, MAX_OBJECTS + 1, (n,), generator=gen, device=device)
    cell_rank = _rand(gen, device, n, MAX_OBJECTS).argsort(1).argsort(1)
    active = cell_rank < count.unsqueeze(1)
    obj_class = torch.randint(1, len(SHAPES), (n, MAX_OBJECTS), generator=gen, device=device)
    obj_depth = OBJ_NEAR + (OBJ_FAR - OBJ_NEAR) * _rand(gen, device, n, MAX_OBJECTS)
    radius = (0.22 * 3.0 / obj_depth.sqrt()).clamp(0.07, 0.23)
    cell_x = (torch.arange(MAX_OBJECTS, device=device) % 2).float() * 0.5 + 0.25
    cell_y = (torch.arange(MAX_OBJECTS, device=device) // 2).float() * 0.5 + 0.25
    jitter = (0.25 - radius).clamp_min(0.0)
    cx = cell_x + jitter * (2 * _rand(gen, device, n, MAX_OBJECTS) - 1)
    cy = cell_y + jitter * (2 * _rand(gen, device, n, MAX_OBJECTS) - 1)
    rotation = 2 * math.pi * _rand(gen, device, n, MAX_OBJECTS)
    color = _rand(gen, device, n, MAX_OBJECTS, 3)
    fog = torch.exp(-obj_depth / FOG_DISTANCE).unsqueeze(-1)
    color = color * fog + 0.6 * (1 - fog)

    # Paint far to near so that nearer shapes occlude farther ones.
    order = torch.where(active, obj_depth, torch.full_like(obj_depth, -1.0)).argsort(1, descending=True)
    for slot in range(MAX_OBJECTS):
        k = order[:, slot : slot + 1]
        pick = lambda t: t.gather(1, k).view(n, 1, 1)  # noqa: E731
        mask = _shape_mask(pick(obj_class), xs - pick(cx), ys - pick(cy), pick(radius), pick(rotation))
        mask &= pick(active.long()).bool()
        seg = torch.where(mask, pick(obj_class), seg)
        depth = torch.where(mask, pick(obj_depth), depth)
        obj_color = color.gather(1, k.unsqueeze(-1).expand(n, 1, 3)).view(n, 3, 1, 1)
        shading = 0.85 + 0.15 * texture.unsqueeze(1)
        image = torch.where(mask.unsqueeze(1), obj_color * shading, image)

    # Scene-wide fog on the background keeps depth readable from colour everywhere.
    bg_fog = torch.exp(-bg_depth / FOG_DISTANCE).unsqueeze(1)
    image = torch.where((seg == 0).unsqueeze(1), image * bg_fog + 0.6 * (1 - bg_fog), image)
    image = (image - 0.45) / 0.25
    return image.float().contiguous(), seg, depth.unsqueeze(1).float(), count - 1


def _shape_mask(cls: Tensor, dx: Tensor, dy: Tensor, r: Tensor, rot: Tensor) -> Tensor:
    """Boolean (n, H, W) mask of each image's shape, chosen per image by ``cls``."""
    u = dx * torch.cos(rot) + dy * torch.sin(rot)
    v = -dx * torch.sin(rot) + dy * torch.cos(rot)
    dist2 = dx * dx + dy * dy
    circle = dist2 <= r * r
    square = torch.maximum(u.abs(), v.abs()) <= 0.8 * r
    triangle = torch.ones_like(circle)
    for i in range(3):
        a = 2 * math.pi * i / 3
        triangle &= u * math.cos(a) + v * math.sin(a) <= 0.5 * r
    ring = circle & (dist2 >= (0.55 * r) ** 2)
    return torch.where(cls == 1, circle, torch.where(cls == 2, square, torch.where(cls == 3, triangle, ring)))
