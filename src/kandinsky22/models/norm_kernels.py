"""The Triton kernels of ``kandinsky22.models.norms`` and ``kandinsky22.models.residual`` (imported at first use; see
there). Under Triton's interpreter (``TRITON_INTERPRET=1`` set before Triton is first imported) they run on CPU
tensors."""

import triton
import triton.language as tl


# Triton compiles a variant per divisibility of each integer argument; only the channel count (the row stride,
# which decides vectorised loads) is worth one.
@triton.jit(do_not_specialize=["pixels", "rows", "parts"])
def stats(x_ptr, mean_ptr, m2_ptr, pixels, channels, rows, parts, BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr):
    part, cblock, n = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    cols = cblock * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < channels
    base = x_ptr + n.to(tl.int64) * pixels * channels
    start = part * rows
    end = tl.minimum(start + rows, pixels)
    mean = tl.zeros([BLOCK_C], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    count = tl.zeros([BLOCK_C], dtype=tl.float32)
    for row in range(start, end, BLOCK_HW):
        pix = row + tl.arange(0, BLOCK_HW)
        rmask = pix < end
        mask = rmask[:, None] & cmask[None, :]
        offsets = pix[:, None].to(tl.int64) * channels + cols[None, :]
        values = tl.load(base + offsets, mask=mask, other=0.0).to(tl.float32)
        tile_count = tl.sum(rmask.to(tl.float32), axis=0)
        tile_mean = tl.sum(values, axis=0) / tile_count
        dev = tl.where(mask, values - tile_mean[None, :], 0.0)
        tile_m2 = tl.sum(dev * dev, axis=0)
        total = count + tile_count
        delta = tile_mean - mean
        mean = mean + delta * (tile_count / total)
        m2 = m2 + tile_m2 + delta * delta * (count * tile_count / total)
        count = total
    out = (n * parts + part) * channels + cols
    tl.store(mean_ptr + out, mean, mask=cmask)
    tl.store(m2_ptr + out, m2, mask=cmask)


@triton.jit
def _parts(p0, n, parts, pixels, rows, channels, chans, gmask, BLOCK_P: tl.constexpr):
    """Offsets and mask of parts ``p0 … p0 + BLOCK_P``'s statistics of the group's channels ``chans``, and the
    parts' pixel counts."""
    p = p0 + tl.arange(0, BLOCK_P)
    weights = tl.minimum(tl.maximum(pixels - p * rows, 0), rows).to(tl.float32)
    offsets = (n * parts + p[:, None]) * channels + chans[None, :]
    mask = (p < parts)[:, None] & gmask[None, :]
    return offsets, mask, weights


@triton.jit
def _fold(
    weight_ptr,
    bias_ptr,
    scale_ptr,
    shift_ptr,
    n,
    scale_stride,
    shift_stride,
    chans,
    gmask,
    mean,
    rstd,
    MODULATED: tl.constexpr,
):
    """The per-channel factor and offset of ``y = x · factor + offset``: the group's statistics, the norm's weight
    and bias, and (``MODULATED``) the time modulation ``(1 + scale, shift)``, in fp32."""
    gamma = tl.load(weight_ptr + chans, mask=gmask, other=0.0).to(tl.float32)
    beta = tl.load(bias_ptr + chans, mask=gmask, other=0.0).to(tl.float32)
    factor = gamma * rstd
    offset = beta - mean * factor
    if MODULATED:
        scale = tl.load(scale_ptr + n * scale_stride + chans, mask=gmask, other=0.0).to(tl.float32)
        shift = tl.load(shift_ptr + n * shift_stride + chans, mask=gmask, other=0.0).to(tl.float32)
        factor = factor * scale
        offset = offset * scale + shift
    return factor, offset


@triton.jit(do_not_specialize=["pixels", "channels", "group_size", "rows", "parts", "scale_stride", "shift_stride"])
def finalize(
    mean_ptr,
    m2_ptr,
    weight_ptr,
    bias_ptr,
    in_bias_ptr,
    scale_ptr,
    shift_ptr,
    factor_ptr,
    offset_ptr,
    pixels,
    channels,
    group_size,
    rows,
    parts,
    scale_stride,
    shift_stride,
    inv_numel,
    eps,
    MODULATED: tl.constexpr,
    IN_BIAS: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    """The group's statistics from the parts', folded into each channel's factor and offset. ``IN_BIAS``: the norm
    is of ``x + in_bias`` (a convolution's bias, per channel, left out of its output): the bias moves each channel's
    means and not their deviations, and joins the offset, so that ``apply`` reads ``x`` as it is."""
    group, n = tl.program_id(0), tl.program_id(1)
    lane = tl.arange(0, BLOCK_G)
    gmask = lane < group_size
    chans = group * group_size + lane
    in_bias = tl.zeros([BLOCK_G], dtype=tl.float32)
    if IN_BIAS:
        in_bias = tl.load(in_bias_ptr + chans, mask=gmask, other=0.0).to(tl.float32)
    # The group's mean: each part's channel means weighted by the part's pixel count.
    acc = tl.zeros([BLOCK_P, BLOCK_G], dtype=tl.float32)
    for p0 in range(0, parts, BLOCK_P):
        offsets, mask, weights = _parts(p0, n, parts, pixels, rows, channels, chans, gmask, BLOCK_P)
        means = tl.load(mean_ptr + offsets, mask=mask, other=0.0)
        if IN_BIAS:
            means = tl.where(mask, means + in_bias[None, :], 0.0)
        acc += means * weights[:, None]
    group_mean = tl.sum(tl.sum(acc, axis=1), axis=0) * inv_numel
    # Its sum of squared deviations: each part's own plus its mean's distance to the group's (Chan et al.).
    acc = tl.zeros([BLOCK_P, BLOCK_G], dtype=tl.float32)
    for p0 in range(0, parts, BLOCK_P):
        offsets, mask, weights = _parts(p0, n, parts, pixels, rows, channels, chans, gmask, BLOCK_P)
        means = tl.load(mean_ptr + offsets, mask=mask, other=0.0)
        if IN_BIAS:
            means = means + in_bias[None, :]
        m2s = tl.load(m2_ptr + offsets, mask=mask, other=0.0)
        dev = tl.where(mask, means - group_mean, 0.0)
        acc += m2s + dev * dev * weights[:, None]
    var = tl.sum(tl.sum(acc, axis=1), axis=0) * inv_numel
    rstd = 1.0 / tl.sqrt(tl.maximum(var, 0.0) + eps)
    factor, offset = _fold(
        weight_ptr,
        bias_ptr,
        scale_ptr,
        shift_ptr,
        n,
        scale_stride,
        shift_stride,
        chans,
        gmask,
        group_mean,
        rstd,
        MODULATED,
    )
    if IN_BIAS:
        offset = offset + in_bias * factor
    tl.store(factor_ptr + n * channels + chans, factor, mask=gmask)
    tl.store(offset_ptr + n * channels + chans, offset, mask=gmask)


@triton.jit(do_not_specialize=["pixels", "width", "factor_h", "factor_w", "small_pixels", "small_w"])
def apply(
    x_ptr,
    factor_ptr,
    offset_ptr,
    spatial_scale_ptr,
    spatial_shift_ptr,
    y_ptr,
    pixels,
    channels,
    width,
    factor_h,
    factor_w,
    small_pixels,
    small_w,
    SPATIAL: tl.constexpr,
    SILU: tl.constexpr,
    BLOCK_HW: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    tile, cblock, n = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    pix = tile * BLOCK_HW + tl.arange(0, BLOCK_HW)
    cols = cblock * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < channels
    mask = (pix < pixels)[:, None] & cmask[None, :]
    offsets = n.to(tl.int64) * pixels * channels + pix[:, None].to(tl.int64) * channels + cols[None, :]
    values = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    factor = tl.load(factor_ptr + n * channels + cols, mask=cmask, other=0.0)
    offset = tl.load(offset_ptr + n * channels + cols, mask=cmask, other=0.0)
    y = values * factor[None, :] + offset[None, :]
    if SPATIAL:
        small = (pix // width // factor_h) * small_w + (pix % width) // factor_w  # the pixel it repeats
        small_offsets = n.to(tl.int64) * small_pixels * channels + small[:, None].to(tl.int64) * channels
        small_offsets += cols[None, :]
        scale = tl.load(spatial_scale_ptr + small_offsets, mask=mask, other=0.0).to(tl.float32)
        shift = tl.load(spatial_shift_ptr + small_offsets, mask=mask, other=0.0).to(tl.float32)
        y = y * scale + shift
    if SILU:
        y = y * tl.sigmoid(y)
    tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["pixels", "scale_stride", "shift_stride"])
def small(
    x_ptr,
    weight_ptr,
    bias_ptr,
    in_bias_ptr,
    scale_ptr,
    shift_ptr,
    y_ptr,
    pixels,
    channels,
    scale_stride,
    shift_stride,
    inv_numel,
    eps,
    GROUP: tl.constexpr,
    MODULATED: tl.constexpr,
    IN_BIAS: tl.constexpr,
    SILU: tl.constexpr,
    BLOCK_HW: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    """The whole norm of one (sample, group) in one program, for small feature maps: the statistics in a first pass
    over the group's pixels, the normalisation in a second (the group's few kilobytes are still in cache).

    Only (batch × groups) programs run, so each must finish in few round trips to memory: the tile is large (the
    caller sizes the warps to it), the channels per group (``GROUP``) are a compile-time constant, so that a row of
    them is loaded as vectors (16 bytes where the width allows, else 8), and offsets within a sample are 32-bit (a sample of a small group's norm holds
    at most groups × ``norms._SMALL_GROUP`` elements), which halves the registers they take. ``IN_BIAS``: the norm is
    of ``x + in_bias``, as in ``finalize``."""
    group, n = tl.program_id(0), tl.program_id(1)
    lane = tl.arange(0, BLOCK_G)
    gmask = lane < GROUP
    chans = group * GROUP + lane
    in_bias = tl.zeros([BLOCK_G], dtype=tl.float32)
    if IN_BIAS:
        in_bias = tl.load(in_bias_ptr + chans, mask=gmask, other=0.0).to(tl.float32)
    sample = n.to(tl.int64) * pixels * channels
    base = x_ptr + sample
    out = y_ptr + sample
    zero = tl.sum(tl.zeros([BLOCK_G], dtype=tl.float32), axis=0)
    mean, m2, count = zero, zero, zero
    for row in range(0, pixels, BLOCK_HW):
        pix = row + tl.arange(0, BLOCK_HW)
        mask = (pix < pixels)[:, None] & gmask[None, :]
        offsets = pix[:, None] * channels + chans[None, :]
        values = tl.load(base + offsets, mask=mask, other=0.0).to(tl.float32)
        if IN_BIAS:
            values = tl.where(mask, values + in_bias[None, :], 0.0)
        tile_count = tl.sum(tl.sum(mask.to(tl.float32), axis=1), axis=0)
        tile_mean = tl.sum(tl.sum(values, axis=1), axis=0) / tile_count
        dev = tl.where(mask, values - tile_mean, 0.0)
        tile_m2 = tl.sum(tl.sum(dev * dev, axis=1), axis=0)
        total = count + tile_count
        delta = tile_mean - mean
        mean = mean + delta * (tile_count / total)
        m2 = m2 + tile_m2 + delta * delta * (count * tile_count / total)
        count = total
    rstd = 1.0 / tl.sqrt(tl.maximum(m2 * inv_numel, 0.0) + eps)
    factor, offset = _fold(
        weight_ptr, bias_ptr, scale_ptr, shift_ptr, n, scale_stride, shift_stride, chans, gmask, mean, rstd, MODULATED
    )
    if IN_BIAS:
        offset = offset + in_bias * factor
    for row in range(0, pixels, BLOCK_HW):
        pix = row + tl.arange(0, BLOCK_HW)
        mask = (pix < pixels)[:, None] & gmask[None, :]
        offsets = pix[:, None] * channels + chans[None, :]
        values = tl.load(base + offsets, mask=mask, other=0.0).to(tl.float32)
        y = values * factor[None, :] + offset[None, :]
        if SILU:
            y = y * tl.sigmoid(y)
        tl.store(out + offsets, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["rows", "height", "width"])
def residual(
    x_ptr,
    h_ptr,
    bias_ptr,
    bias2_ptr,
    y_ptr,
    rows,
    channels,
    height,
    width,
    TWO_BIASES: tl.constexpr,
    UPSAMPLE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """``y = x + h + bias (+ bias2)`` over (rows, channels) of channels_last maps (``residual.add_residual``), summed
    in fp32 and rounded once. ``UPSAMPLE``: ``x`` holds half ``h``'s height and width, read as its nearest ×2
    upsampling (output pixel (i, j) reads ``x``'s (i // 2, j // 2))."""
    tile, cblock = tl.program_id(0), tl.program_id(1)
    r = tile * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = cblock * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < channels
    mask = (r < rows)[:, None] & cmask[None, :]
    offsets = r[:, None].to(tl.int64) * channels + cols[None, :]
    if UPSAMPLE:
        pixels = height * width
        n, pix = r // pixels, r % pixels
        source = n * (pixels // 4) + (pix // width // 2) * (width // 2) + (pix % width) // 2
        x_offsets = source[:, None].to(tl.int64) * channels + cols[None, :]
    else:
        x_offsets = offsets
    y = tl.load(x_ptr + x_offsets, mask=mask, other=0.0).to(tl.float32)
    y += tl.load(h_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    bias = tl.load(bias_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    if TWO_BIASES:
        bias += tl.load(bias2_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    y += bias[None, :]
    tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=mask)
