"""FouriScale: training-free high-resolution synthesis by dilated convolutions with a low-pass filter.

Implements Huang, Fang et al., "FouriScale: A Frequency Perspective on Training-Free High-Resolution Image
Synthesis" (ECCV 2024, arXiv:2403.12963), following the authors' released configuration:

* Structural consistency (Sec. 3.2): a convolution whose kernel is dilated by ``d`` and applied to a
  ``d``-times larger feature map acts, on a nearest-neighbour (zero-order hold) upsampled input, exactly like
  the plain convolution on the small input followed by the same upsampling::

      conv_{dil=d, pad=d(k-1)/2}(up_d(x)) == up_d(conv_{pad=(k-1)/2}(x))

  for odd square kernels with stride 1 and zero padding, at every output position (see ``dilated_conv2d``).
* Scale consistency (Sec. 3.3): before the dilated convolution the input is low-passed in the Fourier domain so
  that its spectrum fits what the model saw at its training size. The mask per axis of (padded) length ``L``
  with scale ``S = max(d / stride, 1)``, half-length ``L_h = L // 2`` and ramp width ``R`` is::

      m[k] = min(max((1 - v) / R * (L_h / S + 1 - k) + 1, v), 1),   k = 0 .. L_h - 1   (distance from DC)

  (1 inside the pass band, a linear ramp of width ``R`` down to the floor ``v``), reflected about DC and taken
  as the outer product of the two axes. The "strong" mask has ``R = max(L // 8, 1)``, the "weak" mask
  ``R = floor((S - 1) L / (2S))``.
* Pad-then-crop (Sec. 3.4): the input is zero-padded right/bottom to a multiple of the layer's training size
  (keeping the training aspect ratio) before the FFT and cropped back afterwards, so the cut-off is the same for
  non-square outputs.
* FouriScale guidance (Sec. 3.5): the batch runs three branches, unconditional and conditional with the strong
  mask and a second conditional branch with the weak mask whose self-attention uses the query and key of the
  strong conditional branch (its own values); CFG combines the unconditional and the weak branch.
* Dilation schedule of the released configs: ``d_i = max((d - 1) (stop - i) / (stop - start) + 1, 1)`` from
  ``start`` to ``stop`` (progressive), the original convolutions from ``stop`` on.

Pure torch; no ComfyUI import.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# SDXL training buckets (aspect ratio → pixel height, width) used to choose the base size of a non-square
# output, as in the released SDXL configuration.
SDXL_BUCKETS: tuple[tuple[int, int], ...] = (
    (512, 2048), (512, 1984), (512, 1920), (512, 1856), (576, 1792), (576, 1728), (576, 1664), (640, 1600),
    (640, 1536), (704, 1472), (704, 1408), (704, 1344), (768, 1344), (768, 1280), (832, 1216), (832, 1152),
    (896, 1152), (896, 1088), (960, 1088), (960, 1024), (1024, 1024), (1024, 960), (1088, 960), (1088, 896),
    (1152, 896), (1152, 832), (1216, 832), (1280, 768), (1344, 768), (1408, 704), (1472, 704), (1536, 640),
    (1600, 640), (1664, 576), (1728, 576), (1792, 576), (1856, 512), (1920, 512), (1984, 512), (2048, 512),
)  # fmt: skip


def auto_dilation(height: int, width: int, base_height: float, base_width: float) -> int:
    """``d = max(ceil(H / H_base), ceil(W / W_base))`` (sizes in the same unit)."""
    return int(max(math.ceil(height / base_height), math.ceil(width / base_width)))


def sdxl_base_size(height: int, width: int) -> tuple[int, int]:
    """The SDXL bucket that pads (height, width) least to an equal integer multiple in both axes."""
    best, best_padding = (1024, 1024), math.inf
    for base_h, base_w in SDXL_BUCKETS:
        scale_h, scale_w = math.ceil(height / base_h), math.ceil(width / base_w)
        if scale_h != scale_w:
            continue
        padding = (base_h * scale_h - height) + (base_w * scale_w - width)
        if padding < best_padding:
            best, best_padding = (base_h, base_w), padding
    return best


def step_dilation(dilation: float, step: int, start_step: int, stop_step: int, progressive: bool) -> float:
    """The dilation of step ``step``: ``d`` before ``start_step``, a linear ramp to 1 at ``stop_step`` when
    progressive, and 1 (the original convolution) from ``stop_step`` on."""
    if step >= stop_step:
        return 1.0
    if progressive and step >= start_step:
        return max((dilation - 1.0) * (stop_step - step) / (stop_step - start_step) + 1.0, 1.0)
    return float(dilation)


def kernel_dilation(dilation: float) -> int:
    """The integer dilation of the kernel for a (possibly fractional) scheduled dilation."""
    return int(math.ceil(dilation))


def sdxl_weak_dilation(dilation: float) -> int:
    """SDXL variant: the weak (guidance) branch uses the smaller dilation ``ceil(max(d / 1.5, 1))``."""
    return int(math.ceil(max(dilation / 1.5, 1.0)))


def strong_ramp(length: int) -> float:
    return float(max(length // 8, 1))


def weak_ramp(length: int, scale: float) -> float:
    return float((scale - 1.0) * length // (scale * 2.0))


def mask_1d(length: int, scale: float, floor: float, ramp: float) -> torch.Tensor:
    """The per-axis low-pass mask in fftshift order (DC at index ``length // 2``)."""
    half = length // 2
    positions = torch.arange(length, dtype=torch.float64)
    # distance index from DC: k for non-negative frequencies, k for frequency -(k + 1)
    k = torch.where(positions >= half, positions - half, half - 1 - positions)
    if ramp <= 0:
        return torch.ones(length, dtype=torch.float32)
    values = (1.0 - floor) / ramp * (half / scale + 1.0 - k) + 1.0
    return values.clamp(min=floor).clamp(max=1.0).to(torch.float32)


def lowpass_mask(height: int, width: int, scale: float, floor: float, weak: bool) -> torch.Tensor:
    """The 2-D mask (outer product of the per-axis masks) for a padded map of ``height × width``."""
    if weak:
        ramp_h, ramp_w = weak_ramp(height, scale), weak_ramp(width, scale)
    else:
        ramp_h, ramp_w = strong_ramp(height), strong_ramp(width)
    return torch.outer(mask_1d(height, scale, floor, ramp_h), mask_1d(width, scale, floor, ramp_w))


def padded_size(height: int, width: int, base_height: float, base_width: float) -> tuple[int, int]:
    """Pad-then-crop target: the smallest ``(base_h · r, base_w · r)`` covering the map (same integer r)."""
    r = max(math.ceil(height / base_height), math.ceil(width / base_width))
    return max(int(base_height * r), height), max(int(base_width * r), width)


def low_pass(
    x: torch.Tensor, base_height: float, base_width: float, scale: float, floor: float, weak: bool
) -> torch.Tensor:
    """Low-pass ``x`` (B, C, H, W) in the Fourier domain with pad-then-crop; fp32 inside, dtype kept."""
    dtype = x.dtype
    height, width = x.shape[-2:]
    padded_h, padded_w = padded_size(height, width, base_height, base_width)
    y = x.to(torch.float32)
    if (padded_h, padded_w) != (height, width):
        y = F.pad(y, (0, padded_w - width, 0, padded_h - height))
    spectrum = torch.fft.fftshift(torch.fft.fft2(y), dim=(-2, -1))
    spectrum = spectrum * lowpass_mask(padded_h, padded_w, scale, floor, weak).to(y.device)
    y = torch.fft.ifft2(torch.fft.ifftshift(spectrum, dim=(-2, -1))).real
    return y[..., :height, :width].to(dtype)


def dilated_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride,
    groups: int,
    dilation: int,
) -> torch.Tensor:
    """The layer's kernel dilated by ``dilation`` with padding ``dilation · (k - 1) // 2`` per axis."""
    kh, kw = weight.shape[-2:]
    padding = (dilation * (kh - 1) // 2, dilation * (kw - 1) // 2)
    return F.conv2d(x, weight, bias, stride, padding, dilation, groups)


def nearest_upsample(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Zero-order hold: every pixel repeated ``factor × factor`` times. Specification only: the tests compare the node with it; the node does not call it."""
    return x.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)


def share_query_key(
    query_in: torch.Tensor,
    key_in: torch.Tensor,
    main_rows: int,
    weak_source: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FouriScale guidance in self-attention: rows ``main_rows:`` (the weak branch) take the query and key
    inputs of their strong conditional rows ``weak_source``; the value input stays their own.

    The projections are per token, so replacing the inputs before ``to_q``/``to_k`` replaces Q and K exactly.
    """
    query_in = query_in.clone()
    query_in[main_rows:] = query_in[weak_source]
    if key_in is not None:
        key_in = key_in.clone()
        key_in[main_rows:] = key_in[weak_source]
    return query_in, key_in


def layer_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride,
    groups: int,
    *,
    dilation: float,
    level: int,
    base_latent: tuple[float, float],
    main_rows: int,
    filtered: bool,
    mask_floor: float,
    sdxl_variant: bool,
) -> torch.Tensor:
    """One patched convolution at scheduled dilation d (paper §3): rows before ``main_rows`` are the model's
    batch (strong low-pass), the rows after it the guidance branch (weak low-pass; on SDXL convolved at
    ``sdxl_weak_dilation(d)``). The filter works at the layer's resolution ``level`` (the base size halves per
    level) with scale ``max(d / stride, 1)``; ``filtered`` off skips it (upsampler convolutions, low_pass off)."""
    kernel = kernel_dilation(dilation)
    main, weak = x[:main_rows], x[main_rows:]
    if filtered:
        scale = max(dilation / stride[0], 1.0)
        base_h = base_latent[0] / 2**level
        base_w = base_latent[1] / 2**level
        main = low_pass(main, base_h, base_w, scale, mask_floor, weak=False)
        if weak.shape[0]:
            weak = low_pass(weak, base_h, base_w, scale, mask_floor, weak=True)
    if weak.shape[0] and sdxl_variant:
        out_main = dilated_conv2d(main, weight, bias, stride, groups, kernel)
        out_weak = dilated_conv2d(weak, weight, bias, stride, groups, sdxl_weak_dilation(dilation))
        return torch.cat([out_main, out_weak])
    rows = torch.cat([main, weak]) if weak.shape[0] else main
    return dilated_conv2d(rows, weight, bias, stride, groups, kernel)
