"""TPU slices by name: gcloud accelerator types (`v5p-8`, `v5litepod-16`, `v6e-8`, `v4-32`) or raw
topologies (`v5e:2x2`, `v5p:2x2x1`) → chips, chip grid, hosts and HBM, and the abstract devices of
`jax.experimental.topologies` that a step can be compiled for on a CPU host (mapo_jax/aot.py).

gcloud counts TensorCores in v4/v5p names (2 per chip: `v5p-8` is 4 chips) and chips in v5e/v6e names
(https://cloud.google.com/tpu/docs/v5p, /v5e, /v6e, /v4). v4 and v5p hosts hold 4 chips (a 2x2x1 block);
v5e/v6e slices of up to 8 chips are one host, larger ones are hosts of 4 chips (2x2) as gcloud's
multi-host v5litepod/v6e slices are.
"""
from __future__ import annotations

import dataclasses
import math
import re

GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class Generation:
  name: str  # libtpu's name in topology strings ("v5e:2x2")
  aliases: tuple[str, ...]  # gcloud accelerator-type prefixes and other spellings
  hbm_gib: int  # HBM per chip
  cores_per_chip: int  # TensorCores a gcloud name counts per chip (1: the name counts chips)
  dims: int  # 2: a 2D torus of chips (v5e, v6e), 3: 3D (v4, v5p)
  max_host_chips: int  # the largest slice that is a single host
  chip_config: str = "default"  # libtpu chip config: v4 runs its two cores as one device ("megacore")
  bf16_tflops: float = 0.0  # peak dense bf16 TFLOP/s per chip (Google Cloud's TPU pages): the MFU denominator

  def grid(self, chips: int) -> tuple[int, ...]:
    """The standard chip grid of a slice of `chips`: dimensions doubled in turn from 1x1 / 2x2x1."""
    if chips < 1 or chips & (chips - 1):
      raise ValueError(f"{self.name}: {chips} chips is not a power of two")
    if self.dims == 2:  # 1x1, 1x2, 2x2, 2x4, 4x4, 4x8, 8x8, 8x16, 16x16
      shape, order = [1, 1], [1, 0]
    else:  # 2x2x1 (the smallest slice), 2x2x2, 2x2x4, 2x4x4, 4x4x4, 4x4x8, 4x8x8, 8x8x8, ...
      if chips < 4:
        raise ValueError(f"{self.name}: slices start at 4 chips (2x2x1), not {chips}")
      shape, order = [2, 2, 1], [2, 1, 0]
      if chips > 4:
        shape[2] = 2
    step = 0
    while math.prod(shape) < chips:
      shape[order[step % len(order)]] *= 2
      step += 1
    return tuple(shape)

GENERATIONS = (
    Generation("v4", ("v4",), hbm_gib=32, cores_per_chip=2, dims=3, max_host_chips=4, chip_config="megacore",
               bf16_tflops=275),
    Generation("v5e", ("v5litepod", "v5e", "v5lite"), hbm_gib=16, cores_per_chip=1, dims=2, max_host_chips=8,
               bf16_tflops=197),
    Generation("v5p", ("v5p",), hbm_gib=95, cores_per_chip=2, dims=3, max_host_chips=4, bf16_tflops=459),
    Generation("v6e", ("v6e",), hbm_gib=32, cores_per_chip=1, dims=2, max_host_chips=8, bf16_tflops=918),
)


@dataclasses.dataclass(frozen=True)
class Slice:
  name: str  # as given
  generation: Generation
  grid: tuple[int, ...]  # chips per axis, e.g. (2, 2) or (2, 2, 1)

  @property
  def chips(self) -> int:
    return math.prod(self.grid)

  @property
  def topology(self) -> str:
    """libtpu's topology name, e.g. "v5p:2x2x1"."""
    return f"{self.generation.name}:{'x'.join(map(str, self.grid))}"

  @property
  def host_bounds(self) -> tuple[int, int, int]:
    """Chips per host along each axis (libtpu's chips_per_host_bounds)."""
    grid3 = tuple(self.grid) + (1,) * (3 - len(self.grid))
    if self.chips <= self.generation.max_host_chips:
      return grid3
    return (2, 2, 1)

  @property
  def hosts(self) -> int:
    return self.chips // math.prod(self.host_bounds)

  @property
  def hbm_bytes(self) -> int:
    return self.generation.hbm_gib * GIB

  def devices(self):
    """Abstract devices of this slice (one per chip), for a Mesh to compile against. Needs libtpu; no TPU."""
    from jax.experimental import topologies
    desc = topologies.get_topology_desc(platform="tpu", topology_name=self.topology,
                                        chip_config_name=self.generation.chip_config,
                                        chips_per_host_bounds=self.host_bounds, num_slices=1)
    return desc.devices


def _generation(prefix: str, name: str) -> Generation:
  for gen in GENERATIONS:
    if prefix.lower() in gen.aliases:
      return gen
  known = ", ".join(f"{g.name} ({'/'.join(g.aliases)})" for g in GENERATIONS)
  raise ValueError(f"unknown TPU slice {name!r}: generation {prefix!r} is not one of {known}; "
                   "write e.g. v5p-8, v5litepod-16, v6e-8, v4-32 or v5e:2x2, v5p:2x2x1")


def parse(name: str) -> Slice:
  """`v5p-8` / `v5litepod-16` / `v5e-16` / `v6e-8` / `v4-32` (gcloud) or `v5e:2x4` / `v5p:2x2x4` (raw)."""
  if m := re.fullmatch(r"([a-z0-9]+):(\d+(?:x\d+){1,2})", name.strip().lower()):
    gen = _generation(m[1], name)
    grid = tuple(int(d) for d in m[2].split("x"))
    if len(grid) == 3 and gen.dims == 2 and grid[2] == 1:
      grid = grid[:2]
    if len(grid) != gen.dims or min(grid) < 1:
      raise ValueError(f"TPU slice {name!r}: {gen.name} topologies have {gen.dims} dimensions")
    return Slice(name, gen, grid)
  if m := re.fullmatch(r"([a-z0-9]+)-(\d+)", name.strip().lower()):
    gen = _generation(m[1], name)
    count = int(m[2])
    if count % gen.cores_per_chip:
      raise ValueError(f"TPU slice {name!r}: {gen.name} names count TensorCores, {gen.cores_per_chip} per chip")
    return Slice(name, gen, gen.grid(count // gen.cores_per_chip))
  raise ValueError(f"TPU slice {name!r}: expected GENERATION-N (v5p-8, v5litepod-16, v6e-8, v4-32) or "
                   f"GENERATION:AxB[xC] (v5e:2x2, v5p:2x2x1)")
