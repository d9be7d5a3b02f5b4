"""Synthetic, reproducible sample data: an abdominal CT phantom with organ labels and a dermoscopy-like photo.

Both are generated from a seed in well under a second; the tests, the demo and `training/` use them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from skimage import draw

from napari_daeformer.io.record import is_rgb

CT_CLASSES = ("background", "liver", "spleen", "left kidney", "right kidney", "aorta")
CHEST_CLASSES = ("background", "right lung", "left lung", "heart", "aorta", "trachea", "spinal cord", "nodule")
SKIN_CLASSES = ("background", "lesion")

# Mean HU of each tissue (portal-venous phase).
_HU = {"air": -1000.0, "fat": -100.0, "muscle": 45.0, "bone": 700.0,
       "liver": 60.0, "spleen": 110.0, "kidney": 170.0, "aorta": 230.0}


@dataclass(frozen=True)
class Sample:
    """A synthetic image with its ground truth.

    Args:
        image: CT (Z, Y, X) int16 HU, or photo (Y, X, 3) uint8.
        labels: ground truth of the spatial shape, uint8.
        spacing: mm per array axis.
        class_names: name per label value.
    """

    image: np.ndarray
    labels: np.ndarray
    spacing: tuple[float, ...]
    class_names: tuple[str, ...]


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """Zero-mean, unit-std noise with correlation length about `sigma` voxels."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma)
    return field / (field.std() + 1e-6)


def synthetic_ct(seed: int = 0, shape: tuple[int, int, int] = (48, 192, 192),
                 spacing: tuple[float, float, float] = (3.0, 0.8, 0.8)) -> Sample:
    """An abdominal CT phantom: body with fat and muscle, spine, liver, spleen, kidneys and aorta.

    Organ sizes, positions and borders vary with the seed; intensities follow typical HU with
    texture and scanner noise. Args: shape (Z, Y, X) voxels and spacing (Z, Y, X) mm.
    """
    rng = np.random.default_rng(seed)
    Z, Y, X = shape
    z, y, x = np.meshgrid(*(np.arange(n, dtype=np.float32) * s for n, s in zip(shape, spacing)), indexing="ij")
    cz, cy, cx = (n * s / 2 for n, s in zip(shape, spacing))
    wiggle = _smooth_noise(rng, (max(Z // 4, 2), max(Y // 8, 2), max(X // 8, 2)), 1.0)
    wiggle = ndimage.zoom(wiggle, [a / b for a, b in zip(shape, wiggle.shape)], order=1)[:Z, :Y, :X]

    def ellipsoid(center: tuple[float, float, float], radii: tuple[float, float, float], angle: float = 0.0,
                  roughness: float = 0.12) -> np.ndarray:
        dy, dx = y - center[1], x - center[2]
        c, s = np.cos(angle), np.sin(angle)
        u, v = c * dx + s * dy, -s * dx + c * dy
        d = ((z - center[0]) / radii[0]) ** 2 + (v / radii[1]) ** 2 + (u / radii[2]) ** 2
        return d + roughness * wiggle < 1.0

    j = lambda scale: 1.0 + scale * rng.uniform(-1, 1)  # noqa: E731  (a size jitter)
    body_ry, body_rx = 0.40 * Y * spacing[1] * j(0.05), 0.46 * X * spacing[2] * j(0.05)
    body = ((y - cy) / body_ry) ** 2 + ((x - cx) / body_rx) ** 2 < 1.0
    inner = ((y - cy) / (body_ry - 12)) ** 2 + ((x - cx) / (body_rx - 12)) ** 2 < 1.0
    hu = np.full(shape, _HU["air"], np.float32)
    hu[body] = _HU["fat"]
    hu[inner] = _HU["muscle"]
    spine = ((y - (cy + 0.6 * body_ry)) / 14) ** 2 + ((x - cx) / 16) ** 2 < 1.0
    hu[spine] = _HU["bone"]

    labels = np.zeros(shape, np.uint8)
    ext = Z * spacing[0]
    organs = [  # (label, tissue, center (z, y, x) mm, radii mm, angle)
        (1, "liver", (cz + 0.15 * ext * j(0.3), cy - 0.05 * body_ry * j(0.5), cx - 0.45 * body_rx * j(0.1)),
         (0.35 * ext * j(0.1), 0.55 * body_ry * j(0.1), 0.38 * body_rx * j(0.1)), rng.uniform(-0.4, 0.4)),
        (2, "spleen", (cz + 0.2 * ext * j(0.3), cy + 0.25 * body_ry * j(0.2), cx + 0.62 * body_rx * j(0.05)),
         (0.2 * ext * j(0.1), 0.28 * body_ry * j(0.15), 0.16 * body_rx * j(0.15)), rng.uniform(-0.8, 0.0)),
        (3, "kidney", (cz - 0.1 * ext * j(0.3), cy + 0.45 * body_ry * j(0.1), cx + 0.33 * body_rx * j(0.1)),
         (0.2 * ext * j(0.1), 0.2 * body_ry * j(0.1), 0.11 * body_rx * j(0.1)), rng.uniform(0.2, 0.7)),
        (4, "kidney", (cz - 0.15 * ext * j(0.3), cy + 0.45 * body_ry * j(0.1), cx - 0.33 * body_rx * j(0.1)),
         (0.2 * ext * j(0.1), 0.2 * body_ry * j(0.1), 0.11 * body_rx * j(0.1)), rng.uniform(-0.7, -0.2)),
    ]
    for label, tissue, center, radii, angle in organs:
        mask = ellipsoid(center, radii, angle) & inner & ~spine
        hu[mask] = _HU[tissue] + rng.uniform(-10, 10)
        labels[mask] = label
    aorta_r = 9.0 * j(0.2)
    aorta = (((y - (cy + 0.3 * body_ry)) / aorta_r) ** 2 + ((x - (cx + 6)) / aorta_r) ** 2 < 1.0) & (labels == 0)
    hu[aorta] = _HU["aorta"]
    labels[aorta] = 5
    hu += 18.0 * _smooth_noise(rng, shape, 2.0) * (labels > 0)          # organ texture
    hu += rng.normal(0.0, 12.0, shape).astype(np.float32)              # scanner noise
    return Sample(np.round(hu).astype(np.int16), labels, tuple(float(s) for s in spacing), CT_CLASSES)


def synthetic_skin(seed: int = 0, size: tuple[int, int] = (256, 256)) -> Sample:
    """A dermoscopy-like RGB photo: skin with uneven light, an irregular pigmented lesion, and hairs."""
    rng = np.random.default_rng(seed)
    H, W = size
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    skin = np.array([224, 178, 156], np.float32) * rng.uniform(0.85, 1.05, 3)
    light = 1.0 - 0.35 * (((yy - H / 2) / H) ** 2 + ((xx - W / 2) / W) ** 2) * 4   # vignetting
    img = skin[None, None, :] * light[..., None]
    img += 6.0 * _smooth_noise(rng, (H, W), 4.0)[..., None]

    # Lesion: a radius that varies with angle (a few Fourier harmonics) gives an irregular border.
    cy, cx = H / 2 + rng.uniform(-0.1, 0.1) * H, W / 2 + rng.uniform(-0.1, 0.1) * W
    r0 = min(H, W) * rng.uniform(0.18, 0.3)
    theta = np.arctan2(yy - cy, xx - cx)
    radius = np.full_like(theta, r0)
    for k in range(2, 7):
        radius += r0 * rng.uniform(0.02, 0.12) / k * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    dist = np.hypot(yy - cy, xx - cx)
    lesion = dist < radius
    depth = np.clip(1.0 - dist / radius, 0, 1)                             # darker towards the centre
    brown = np.array([120, 72, 48], np.float32) * rng.uniform(0.8, 1.1, 3)
    dark = np.array([60, 35, 30], np.float32)
    blotch = (_smooth_noise(rng, (H, W), 6.0) > 0.6)[..., None]
    colour = brown + (dark - brown) * depth[..., None] * 0.8
    colour = np.where(blotch, colour * 0.75, colour)
    img = np.where(lesion[..., None], colour * light[..., None], img)

    for _ in range(rng.integers(3, 9)):                                   # hairs: long dark curves
        y0, x0 = rng.uniform(0, H), rng.uniform(0, W)
        ang, length = rng.uniform(0, np.pi), rng.uniform(0.5, 1.2) * max(H, W)
        t = np.linspace(-0.5, 0.5, 200)
        bend = rng.uniform(-0.15, 0.15) * length
        py = y0 + t * length * np.sin(ang) + bend * (t**2 - 0.25) * np.cos(ang)
        px = x0 + t * length * np.cos(ang) - bend * (t**2 - 0.25) * np.sin(ang)
        for a, b, c, d in zip(py[:-1], px[:-1], py[1:], px[1:]):
            rr, cc, val = draw.line_aa(int(a), int(b), int(c), int(d))
            ok = (rr >= 0) & (rr < H) & (cc >= 0) & (cc < W)
            img[rr[ok], cc[ok]] = img[rr[ok], cc[ok]] * (1 - 0.8 * val[ok, None]) + 30 * 0.8 * val[ok, None]
    img += rng.normal(0, 3.0, img.shape)
    return Sample(np.clip(img, 0, 255).astype(np.uint8), lesion.astype(np.uint8), (1.0, 1.0), SKIN_CLASSES)


def synthetic_mr(seed: int = 0, shape: tuple[int, int, int] = (48, 192, 192),
                 spacing: tuple[float, float, float] = (3.0, 0.8, 0.8)) -> Sample:
    """An MR-like volume of the CT phantom's anatomy: no Hounsfield units but arbitrary scanner units (tissue
    intensities and overall gain drawn from the seed), a smooth multiplicative bias field and Rician-like noise;
    background (air) near 0. Same labels and class names as `synthetic_ct`."""
    ct = synthetic_ct(seed, shape, spacing)
    rng = np.random.default_rng(seed + 10_000)
    hu = ct.image.astype(np.float32)
    # a monotone-free tissue mapping: T1-like (fat bright, fluid-rich organs darker), not a rescaled CT
    anchors_hu = np.array([-1000.0, -100.0, 45.0, 60.0, 110.0, 170.0, 230.0, 700.0])
    anchors_mr = np.array([0.0, 1.0, 0.45, 0.62, 0.38, 0.52, 0.8, 0.2]) * rng.uniform(0.8, 1.2, 8)
    anchors_mr[0] = 0.0
    tissue = np.interp(hu, anchors_hu, anchors_mr)
    bias = np.exp(0.25 * _smooth_noise(rng, (max(shape[0] // 8, 2), 8, 8), 1.0))
    bias = ndimage.zoom(bias, [a / b for a, b in zip(shape, bias.shape)], order=1)[: shape[0], : shape[1], : shape[2]]
    gain = rng.uniform(600, 3000)
    signal = tissue * bias * gain
    noise = gain * 0.03
    image = np.hypot(signal + rng.normal(0, noise, shape), rng.normal(0, noise, shape))
    return Sample(np.round(image).astype(np.int16), ct.labels, ct.spacing, CT_CLASSES)


def synthetic_chest(seed: int = 0, shape: tuple[int, int, int] = (34, 128, 128),
                    spacing: tuple[float, float, float] = (10.0, 2.4, 2.4)) -> Sample:
    """A chest CT phantom as hard as a real one between its slices, measured by how badly fill-between-slices does.

    10 mm slices that average what lies inside them (partial volume), a field of view that cuts the body, ribs,
    and vertebrae alternating with discs. Seven structures whose shapes change through the slices as a real chest's
    do: lungs over diaphragm domes (their bases crescents around the domes), a two-lobed heart moving left and
    forward, the aorta as ascending limb, arch (one or two slices) and descending limb, the trachea splitting into
    the main bronchi (labelled trachea), the spinal cord following the spine's curve, and a nodule of 1-2 slices.
    Unlabelled look-alikes: the great vessels above the arch and the pulmonary trunk beside the ascending aorta
    (contrast-filled, as bright as the aorta), and blood in the heart's chambers.
    """
    rng = np.random.default_rng(seed)
    Z, Y, X = shape
    sub = 3                                                             # sub-slices averaged into each slice
    fine = (Z * sub, Y, X)
    z_mm = (np.arange(Z * sub, dtype=np.float32) - (sub - 1) / 2) * spacing[0] / sub
    z, y, x = np.meshgrid(z_mm, *(np.arange(n, dtype=np.float32) * s for n, s in zip(shape[1:], spacing[1:])),
                          indexing="ij")
    cy, cx = (n * s / 2 for n, s in zip(shape[1:], spacing[1:]))
    t = z / max(Z * spacing[0], 1.0)                                    # 0 (neck) .. 1 (upper abdomen)
    wiggle = _smooth_noise(rng, (max(Z // 3, 2), 8, 8), 1.0)
    wiggle = ndimage.zoom(wiggle, [a / b for a, b in zip(fine, wiggle.shape)], order=1)[:, :Y, :X]
    j = lambda scale: 1.0 + scale * rng.uniform(-1, 1)  # noqa: E731
    circle = lambda cy_, cx_, r: ((y - cy_) ** 2 + (x - cx_) ** 2) < r ** 2  # noqa: E731
    body_ry, body_rx = 0.42 * Y * spacing[1] * j(0.05), 0.64 * X * spacing[2] * j(0.05)   # wider than the view
    ell = ((y - cy) / body_ry) ** 2 + ((x - cx) / body_rx) ** 2
    hu = np.full(fine, _HU["air"], np.float32)
    hu[ell < 1.0] = _HU["fat"]
    hu[ell < 0.85] = _HU["muscle"]
    ribs = (ell > 0.62) & (ell < 0.72) & (np.sin(np.arctan2(y - cy, x - cx) * 9 + z / 18.0) > 0.55)
    hu[ribs] = _HU["bone"] + 300
    labels = np.zeros(fine, np.uint8)
    spine_y = cy + 0.55 * body_ry + 12.0 * np.sin(np.pi * t)           # thoracic kyphosis
    spine_x = cx + rng.uniform(-6, 6) * np.sin(np.pi * t * 1.5 + rng.uniform(0, np.pi))   # a slight scoliosis
    spine = ((y - spine_y) / 16) ** 2 + ((x - spine_x) / 18) ** 2 < 1.0
    vertebra = np.cos(2 * np.pi * z / 25.0 + rng.uniform(0, 2 * np.pi)) > -0.4   # bodies between discs
    hu[spine] = np.where(vertebra, _HU["bone"] + rng.uniform(0, 300), 90.0)[spine]
    cord = circle(spine_y, spine_x, 5.0)
    hu[cord] = 35.0
    labels[cord] = 6
    dome = rng.uniform(0.74, 0.80) + np.array([0.0, rng.uniform(0.02, 0.06)])   # right dome higher than left
    for label, side, top in ((1, -1, dome[0]), (2, 1, dome[1])):       # right lung on the image's left
        lcx, ly = cx + side * 0.45 * body_rx * j(0.08), cy - 0.05 * body_ry
        ry_full, rx_full = 0.55 * body_ry * j(0.08), 0.30 * body_rx * j(0.08)
        ry = ry_full * np.sqrt(np.clip(0.15 + 1.6 * t, 0, 1))                                  # narrow apex
        rx = rx_full * (1 - 0.5 * np.clip(t - 0.75, 0, 1) * 4 * (side > 0))                    # heart notch low
        lung = (((y - ly) / np.maximum(ry, 1)) ** 2 + ((x - lcx) / rx) ** 2 + 0.15 * wiggle < 1.0)
        radial = ((y - ly) / ry_full) ** 2 + ((x - lcx) / rx_full) ** 2
        lung &= (t < top + 0.14 * radial + 0.04 * (y - ly) / ry_full) & ~spine & ~ribs   # over the dome
        hu[lung] = -850.0 + 40.0 * _smooth_noise(rng, fine, 1.5)[lung]
        hu[lung & (_smooth_noise(rng, fine, 1.0) > 1.6)] = 40.0                            # vessels
        labels[lung] = label
    arch_t = rng.uniform(0.20, 0.27)
    heart_t = (arch_t + rng.uniform(0.12, 0.18), dome[1] + 0.03)
    u = np.clip((t - heart_t[0]) / (heart_t[1] - heart_t[0]), -1, 2)
    hy, hx = cy - 0.05 * body_ry - 0.10 * body_ry * u, cx + 0.06 * body_rx + 0.10 * body_rx * u   # left, forward
    r_atria = 0.19 * body_rx * j(0.1) * np.sin(np.pi * np.clip(u / 0.7, 0, 1))
    r_vent = 0.25 * body_rx * j(0.1) * np.sin(np.pi * np.clip((u - 0.2) / 0.8, 0, 1))
    ay, ax = hy + 0.5 * r_atria, hx - 0.6 * r_atria                    # atria behind, to the right
    vy, vx = hy - 0.3 * r_vent, hx + 0.4 * r_vent                      # ventricles in front, to the left
    rot_y, rot_x = 0.8 * (y - vy) + 0.6 * (x - vx), -0.6 * (y - vy) + 0.8 * (x - vx)   # the heart's oblique axis
    atria = ((y - ay) ** 2 + (x - ax) ** 2) / (r_atria ** 2 + 1e-3)
    vent = (rot_y / (0.75 * r_vent + 1e-3)) ** 2 + (rot_x / (r_vent + 1e-3)) ** 2
    heart = ((np.minimum(atria, vent) + 0.1 * wiggle) < 1.0) & (np.maximum(r_atria, r_vent) > 2)
    hu[heart] = 60.0 + rng.uniform(-10, 10)                            # myocardium
    hu[heart & (np.minimum(atria, vent) < 0.45)] = 170.0               # blood in the chambers
    labels[heart] = 3
    ay_, ax_ = cy - 0.30 * body_ry - 15 * (t - arch_t), cx - 0.05 * body_rx + 25 * (t - arch_t)   # ascending
    dy_, dx_ = spine_y - 30.0, spine_x + 22.0 - 14.0 * np.clip((t - arch_t) / 0.7, 0, 1)         # descending
    ascending = (t >= arch_t) & (t < heart_t[0] + 0.08) & circle(ay_, ax_, 14.0)
    descending = (t >= arch_t) & circle(dy_, dx_, 11.0)
    along = np.clip(((y - ay_) * (dy_ - ay_) + (x - ax_) * (dx_ - ax_)) / ((dy_ - ay_) ** 2 + (dx_ - ax_) ** 2), 0, 1)
    arch = (np.abs(t - arch_t + 0.02) < 0.02) & circle(ay_ + along * (dy_ - ay_), ax_ + along * (dx_ - ax_), 11.0)
    aorta = (ascending | descending | arch) & ~spine
    great = (t < arch_t - 0.03) & (circle(ay_ - 5, ax_ + 6, 6.0) | circle(ay_ + 4, ax_ + 22, 5.0)
                                   | circle(ay_ + 12, ax_ + 34, 5.0))    # brachiocephalic, carotid, subclavian
    trunk = (t > arch_t + 0.07) & (t < heart_t[0] + 0.05) & circle(ay_ - 4, ax_ + 30, 13.0)  # pulmonary trunk
    for vessel, value in ((great, 0), (trunk & ~aorta, 0), (aorta, 4)):
        hu[vessel] = 230.0 + rng.uniform(-20, 20) * (value == 0)
        labels[vessel] = value
    carina = rng.uniform(0.30, 0.36)
    ty, tx = cy - 0.2 * body_ry + 25 * t, cx + rng.uniform(-4, 4)
    airway = (t < carina) & circle(ty, tx, 8.0)
    for rate, length in ((-160.0, 0.07), (340.0, 0.13)):               # right bronchus steep, left one flatter
        down = t - carina
        airway |= (down >= 0) & (down < length) & circle(ty + 60 * down, tx + np.sign(rate) * 6 + rate * down, 5.5)
    airway &= ~spine
    hu[airway] = -1000.0
    labels[airway] = 5
    lung_voxels = np.argwhere(np.isin(labels, (1, 2)))
    nz, ny, nx = lung_voxels[rng.integers(len(lung_voxels))] * np.array((spacing[0] / sub, *spacing[1:]))
    nodule = ((z - z_mm[0] - nz) / 8.0) ** 2 + ((y - ny) / 6.0) ** 2 + ((x - nx) / 6.0) ** 2 < 1.0
    nodule &= np.isin(labels, (1, 2))
    hu[nodule] = 30.0
    labels[nodule] = 7
    image = hu.reshape(Z, sub, Y, X).mean(1) + rng.normal(0.0, 15.0, shape).astype(np.float32)
    return Sample(np.round(image).astype(np.int16), labels[sub // 2::sub].copy(), tuple(float(s) for s in spacing),
                  CHEST_CLASSES)


def spine_mask(sample: Sample) -> np.ndarray:
    """(Z, Y, X) bool: the abdominal phantom's spine (bright bone outside the labelled organs), a structure the
    bundled CT model calls background: the new class of the class-addition tests and benchmark."""
    return (sample.image > 400) & (sample.labels == 0)


# Scanner and camera shifts that a model trained on the samples above has not seen (fine-tuning scenarios).
SHIFTS = ("none", "offset", "contrast", "noise", "spacing", "phase", "kernel", "enlarged", "lesion", "colour cast")
# Non-contrast phase: each organ loses its own enhancement (HU change per label; fat, muscle and bone unchanged).
_UNENHANCED = {1: -10.0, 2: -65.0, 3: -140.0, 4: -140.0, 5: -190.0}


def shifted(sample: Sample, shift: str, seed: int = 0) -> Sample:
    """`sample` as another scanner or camera would give it.

    CT: "offset" +150 HU (a miscalibrated scanner), "contrast" HU scaled by 0.6 (a flatter reconstruction
    kernel and contrast phase), "noise" Gaussian noise of 100 HU (a low-dose scan), "spacing" the in-plane
    pixel size doubled (a field of view twice as wide, the body padded with air). Not affine, per tissue: "phase"
    the non-contrast phase (each organ by its own HU change, `_UNENHANCED`: the kidneys and aorta fall to muscle's
    level), "kernel" a sharp reconstruction kernel (edges overshoot by 1.5x their contrast, 40 HU of fine noise),
    "enlarged" the liver 1.3x larger in-plane about its centre (hepatomegaly, over its neighbours), "lesion" two
    hypodense lesions (10 HU, 8-14 mm) inside the liver, still labelled liver. Photo: "colour cast"
    (R, G, B) x (1.2, 1.0, 0.6), a warm light.
    """
    if shift not in SHIFTS:
        raise ValueError(f"unknown shift {shift!r}; choose one of {SHIFTS}")
    rgb = is_rgb(sample.image, sample.labels)
    if shift == "none":
        return sample
    if rgb != (shift == "colour cast"):
        raise ValueError(f"shift {shift!r} does not apply to {'a photo' if rgb else 'a CT volume'}")
    image, labels, spacing = sample.image.astype(np.float32), sample.labels, sample.spacing
    if shift == "colour cast":
        cast = np.clip(image * np.array([1.2, 1.0, 0.6], np.float32), 0, 255)
        return Sample(cast.astype(np.uint8), labels, spacing, sample.class_names)
    if shift == "offset":
        image = image + 150.0
    elif shift == "contrast":
        image = image * 0.6
    elif shift == "noise":
        image = image + np.random.default_rng(seed).normal(0.0, 100.0, image.shape).astype(np.float32)
    elif shift == "phase":
        for label, delta in _UNENHANCED.items():
            image[labels == label] += delta
    elif shift == "kernel":
        image = image + 1.5 * (image - ndimage.gaussian_filter(image, (0, 1.5, 1.5)))
        image = image + np.random.default_rng(seed).normal(0.0, 40.0, image.shape).astype(np.float32)
    elif shift == "enlarged":
        image, labels = _enlarged_liver(image, labels, 1.3)
    elif shift == "lesion":
        image, _ = _liver_lesions(image, labels, spacing, np.random.default_rng(seed))
    elif shift == "spacing":
        small = ndimage.zoom(image, (1, 0.5, 0.5), order=1)
        small_labels = ndimage.zoom(labels, (1, 0.5, 0.5), order=0)
        pad = [(0, 0)] + [((n - m) // 2, n - m - (n - m) // 2) for n, m in zip(image.shape[1:], small.shape[1:])]
        image = np.pad(small, pad, constant_values=_HU["air"])
        labels = np.pad(small_labels, pad)
        spacing = (spacing[0], spacing[1] * 2, spacing[2] * 2)
    return Sample(np.round(image).astype(np.int16), labels, spacing, sample.class_names)


def _enlarged_liver(image: np.ndarray, labels: np.ndarray, factor: float) -> tuple[np.ndarray, np.ndarray]:
    """The liver (label 1) scaled in-plane by `factor` about its centre, with its intensities, over its
    neighbours inside the body's soft tissue (never into air, fat or bone)."""
    liver = labels == 1
    if not liver.any():
        return image, labels
    centre = np.array(ndimage.center_of_mass(liver))
    matrix = np.diag([1.0, 1 / factor, 1 / factor])
    offset = centre - matrix @ centre
    grown = ndimage.affine_transform(liver.astype(np.float32), matrix, offset, order=1) > 0.5
    values = ndimage.affine_transform(image, matrix, offset, order=1)
    soft = grown & (image > -50) & (image < 400)
    out_image, out_labels = image.copy(), labels.copy()
    out_image[soft], out_labels[soft] = values[soft], 1
    return out_image, out_labels


def with_liver_lesions(sample: Sample, seed: int = 0, radius_mm: tuple[float, float] = (4.0, 7.0)
                       ) -> tuple[Sample, np.ndarray]:
    """`sample` (the abdominal phantom) with two round hypodense lesions (10 HU) inside its liver, still labelled
    liver, and their (Z, Y, X) bool mask: the "lesion" shift, and with larger radii the liver tumour that
    `benchmarks/bench_sparse.py --add-class` adds as a new class."""
    image, mask = _liver_lesions(sample.image.astype(np.float32), sample.labels, sample.spacing,
                                 np.random.default_rng(seed), radius_mm)
    return Sample(np.round(image).astype(np.int16), sample.labels, sample.spacing, sample.class_names), mask


def _liver_lesions(image: np.ndarray, labels: np.ndarray, spacing: tuple[float, ...], rng: np.random.Generator,
                   radius_mm: tuple[float, float] = (4.0, 7.0)) -> tuple[np.ndarray, np.ndarray]:
    """Two round hypodense lesions (10 HU, radius drawn from `radius_mm`) inside the liver, and their mask."""
    inside = np.argwhere(ndimage.binary_erosion(labels == 1, iterations=3))
    mask = np.zeros(labels.shape, bool)
    if not len(inside):
        return image, mask
    z, y, x = np.ogrid[tuple(slice(0, n) for n in image.shape)]
    out = image.copy()
    for centre in inside[rng.choice(len(inside), 2, replace=False)]:
        r = rng.uniform(*radius_mm)
        d = sum(((g - c) * sp / r) ** 2 for g, c, sp in zip((z, y, x), centre, spacing))
        lesion = (d < 1.0) & (labels == 1)
        out[lesion] = 10.0 + rng.normal(0.0, 12.0, int(lesion.sum()))
        mask |= lesion
    return out, mask
