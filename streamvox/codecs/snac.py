"""SNAC 24 kHz decoder, used window by window, with per-row seeded noise.

Codes of one frame, canonical order: (l0, l1[0], l1[1], l2[0], l2[1], l2[2], l2[3]); level 1 runs at 2x and
level 2 at 4x the frame rate. SNAC's decoder adds noise from the global RNG; here row b of a batch draws its
noise from its own generator seeded with seeds[b], so a row's PCM never depends on its batch neighbours and
matches `torch.manual_seed(seed); SNAC.decode(codes)` of the reference package.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from snac import SNAC
from snac.layers import NoiseBlock
from torch import nn

from streamvox.config import RANDOM_INIT_KEY, random_init_seed
from streamvox.layers.hashing import fold32, hashed_normal

SNAC_FRAME_CODES = 7  # codes in one frame: level0 x1, level1 x2, level2 x4
SUPPORTED_VQ_STRIDES = [4, 2, 1]
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "pytorch_model.bin"


def split_levels(windows: torch.Tensor) -> list[torch.Tensor]:
    """[N, W, 7] -> [l0 [N, W], l1 [N, 2W], l2 [N, 4W]] in SNAC time order (frame f owns 2f.., 4f..)."""
    num_windows, num_frames, _ = windows.shape
    return [
        windows[..., 0].contiguous(),
        windows[..., 1:3].reshape(num_windows, 2 * num_frames),
        windows[..., 3:7].reshape(num_windows, 4 * num_frames),
    ]


class SeededNoise(nn.Module):
    """Drop-in for snac's NoiseBlock: row b's noise comes from generators[b], shape (1, 1, T) per row; or, with
    `keys` set (CUDA), from a hash of (keys[b], the block's index, t) for the whole batch in a few kernels."""

    def __init__(self, block: NoiseBlock, index: int) -> None:
        super().__init__()
        self.linear = block.linear  # same child name, so state-dict keys are unchanged
        self.index = index
        self.generators: list[torch.Generator] = []  # set by SnacCodec for the duration of one decode
        self.keys: torch.Tensor | None = None  # [B] int64, or set by SnacCodec instead of generators

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, C, T]
        if self.keys is not None:
            return x + hashed_normal(self.keys, self.index, x.shape[-1]).to(x.dtype)[:, None] * self.linear(x)
        if len(self.generators) != x.shape[0]:
            raise RuntimeError("SeededNoise needs one generator per row: decode via SnacCodec.decode_windows")
        shape = (1, 1, x.shape[-1])
        noise = torch.cat(
            [torch.randn(shape, generator=g, device=x.device, dtype=x.dtype) for g in self.generators]
        )  # [B, 1, T]
        return x + noise * self.linear(x)


def seed_noise(model: SNAC) -> list[SeededNoise]:
    """Transform a built SNAC in place: every NoiseBlock becomes a SeededNoise (module order kept)."""
    blocks = []
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if isinstance(child, NoiseBlock):
                seeded = SeededNoise(child, len(blocks))
                setattr(parent, name, seeded)
                blocks.append(seeded)
    return blocks


def _bucket(num_windows: int) -> int:
    """Windows a CUDA call decodes: the next power of two up to 64, then the next multiple of 64."""
    return 1 << (num_windows - 1).bit_length() if num_windows <= 64 else -(-num_windows // 64) * 64


class SnacCodec:
    """SNAC decoder used frame-window-wise, with noise that is a pure function of a per-row seed."""

    def __init__(self, model: SNAC) -> None:
        if list(model.vq_strides) != SUPPORTED_VQ_STRIDES:
            raise ValueError(
                f"SNAC vq_strides {list(model.vq_strides)} are not supported: only the 3-level layout "
                f"{SUPPORTED_VQ_STRIDES} of snac_24khz (used by Orpheus) is; use hubertsiuzdak/snac_24khz"
            )
        self.model = model.eval()
        self.noise_blocks = seed_noise(model)
        self.sample_rate = int(model.sampling_rate)
        self.samples_per_frame = int(model.hop_length) * SUPPORTED_VQ_STRIDES[0]  # 2048 for snac_24khz
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        # CUDA: noise hashed from the seed and batches padded to buckets (the CPU keeps the reference's noise)
        self.hashed_noise = self.device.type == "cuda"

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu", dtype=torch.float32) -> SnacCodec:
        """Load a directory in the layout of hubertsiuzdak/snac_24khz (config.json + pytorch_model.bin). A config
        with `streamvox_random_init` ({"seed": N}) has no weights file: they are drawn from the seed."""
        path = Path(path)
        if not (path / CONFIG_FILE).is_file():
            raise FileNotFoundError(f"SNAC codec file {path / CONFIG_FILE} is missing: a SNAC directory must contain "
                                    f"{CONFIG_FILE} (snac.SNAC kwargs) and {WEIGHTS_FILE} (its state dict), e.g. a "
                                    "download of hubertsiuzdak/snac_24khz")
        config = json.loads((path / CONFIG_FILE).read_text())
        seed = random_init_seed(config)
        config.pop(RANDOM_INIT_KEY, None)  # not a SNAC argument
        if list(config.get("vq_strides", [])) != SUPPORTED_VQ_STRIDES:
            raise ValueError(
                f"{path / CONFIG_FILE} has vq_strides {config.get('vq_strides')}: only "
                f"{SUPPORTED_VQ_STRIDES} (snac_24khz, as used by Orpheus) is supported"
            )
        if seed is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model = SNAC(**config)
            return cls(model.to(device=device, dtype=dtype))
        if not (path / WEIGHTS_FILE).is_file():
            raise FileNotFoundError(f"SNAC codec file {path / WEIGHTS_FILE} is missing (its state dict)")
        model = SNAC(**config)
        # Old weight-norm names (weight_g / weight_v) are mapped by torch's weight_norm load hook.
        state_dict = torch.load(path / WEIGHTS_FILE, map_location="cpu", weights_only=True)
        model.load_state_dict(state_dict, strict=True)
        return cls(model.to(device=device, dtype=dtype))

    def decode_windows(self, windows: torch.Tensor, seeds: list[int]) -> torch.Tensor:
        """Decode N windows of W frames in one batch: codes [N, W, 7] -> PCM [N, W * samples_per_frame].

        On the CPU each row's noise is the reference package's for its seed; on CUDA it is hashed from the seed
        (one draw for the batch instead of a generator a row), and N is padded to a bucket so that the
        convolutions meet few shapes."""
        if windows.dim() != 3 or windows.shape[-1] != SNAC_FRAME_CODES:
            raise ValueError(f"windows must be [N, W, {SNAC_FRAME_CODES}] codes, got {list(windows.shape)}")
        num_windows = windows.shape[0]
        if len(seeds) != num_windows:
            raise ValueError(f"need one seed per window: {num_windows} windows, {len(seeds)} seeds")
        is_hashed = self.hashed_noise
        if is_hashed and (pad := _bucket(num_windows) - num_windows):
            windows = torch.cat([windows, windows[:1].expand(pad, -1, -1)])
            seeds = list(seeds) + [0] * pad
        codes = split_levels(windows.to(self.device, torch.long))  # [N, W], [N, 2W], [N, 4W]
        if is_hashed:
            keys = torch.tensor([fold32(int(seed)) for seed in seeds], dtype=torch.int64).to(self.device)
        else:
            generators = [torch.Generator(device=self.device).manual_seed(int(seed)) for seed in seeds]
        for block in self.noise_blocks:
            if is_hashed:
                block.keys = keys
            else:
                block.generators = generators  # shared: each row's draws advance in module order
        try:
            with torch.inference_mode():
                z_q = self.model.quantizer.from_codes(codes)  # [N, latent_dim, 4W]
                pcm = self.model.decoder(z_q)  # [N, 1, W * samples_per_frame]
        finally:
            for block in self.noise_blocks:
                block.generators, block.keys = [], None
        return pcm[:num_windows, 0].float()

    @staticmethod
    def write_tiny(path: str | Path, seed: int = 0, decoder_dim: int = 96, codebook_size: int = 4096) -> None:
        """Write a seeded random-weight SNAC (snac_24khz family, small dims) in the layout load() reads."""
        config = {
            "sampling_rate": 24000,
            "encoder_dim": 8,
            "encoder_rates": [2, 4, 8, 8],
            "decoder_dim": decoder_dim,
            "decoder_rates": [8, 8, 4, 2],
            "attn_window_size": None,
            "codebook_size": codebook_size,
            "codebook_dim": 8,
            "vq_strides": SUPPORTED_VQ_STRIDES,
            "noise": True,
            "depthwise": True,
        }
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = SNAC(**config)
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / CONFIG_FILE).write_text(json.dumps(config, indent=2))
        torch.save(model.state_dict(), path / WEIGHTS_FILE)
