"""Chest-radiograph phantoms: the ground-truth world of the bundled default.

Each synthetic patient is one seed. The seed fixes the anatomy (body outline, lungs and diaphragm domes, heart,
mediastinum, spine, ribs, clavicles, lung markings), the findings (nodule, pleural effusion, cardiomegaly, with
side, zone and grade), the view (PA or AP) and the wording of the report. Geometry is drawn in image-relative
units, so a patient looks the same at 64 and at 512 px; only the fine quantum noise depends on the size.
Rendering is vectorised over patients with numpy.

Two sites. The *public* cohort (what the shipped base model was pretrained on) is rendered exactly as it always was.
The *private* site has its own acquisition protocol and content, none of which the public cohort ever shows: every
film is a portable AP supine study, fogged by scatter (lower contrast, lifted blacks) and noisier; the X-ray field is
collimated (bright unexposed borders of the patient's own widths); a lead laterality marker sits in the upper right
corner; and some patients carry support devices (pacemaker with its lead, endotracheal tube, central line,
nasogastric tube) that the report names. All of it is drawn from the patient's own seed, on a random stream of its
own, so a private patient's anatomy is the one its seed gives at either site.

Orientation follows radiographic convention: the patient faces the viewer, so the patient's right lung is on the
image's left and the heart bulges to the image's right.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .report_text import Finding, write_report

RIBS_PER_SIDE = 10
TEXTURE_GRIDS = ((8, 0.09), (16, 0.045))  # (coefficients per side, Gaussian radius) of the lung markings
EDGE = 0.012  # softness of organ outlines, image-relative: anatomy, not pixels, sets it
SIDES = ("right", "left")  # index 0 is drawn on the image's left
ZONES = ("upper", "middle", "lower")
NODULE_RADIUS = {"small": (0.018, 0.028), "large": (0.035, 0.05)}
EFFUSION_HEIGHT = {"small": 0.05, "moderate": 0.11, "large": 0.2}
HEART_GROWTH = {"mild": 1.2, "moderate": 1.35, "severe": 1.5}
SITES = ("public", "private")
PUBLIC_NOISE = 0.006  # quantum noise of the public films (standard deviation, image units)
# Share of the private site's patients with each device (an intensive-care-like case mix).
DEVICE_RATES = {"pacemaker": 0.15, "endotracheal_tube": 0.3, "central_line": 0.35, "nasogastric_tube": 0.25}
PIXELS_PER_CHUNK = 2 ** 21  # bounds the memory of one vectorised batch (about 8 MB per float32 array)


@dataclass(frozen=True)
class Patient:
    seed: int
    view: str  # "PA" or "AP"
    findings: tuple[Finding, ...]
    report: str
    anatomy: dict  # name -> float or small array, image-relative units
    site: str = "public"
    devices: tuple[str, ...] = ()  # private site only, in DEVICE_RATES order


def patient_seeds(seed: int, count: int) -> list[int]:
    """The seeds of the patients of a cohort: patient i's seed depends on (seed, i) only, so a larger cohort
    with the same seed starts with the same patients."""
    return [int(np.random.SeedSequence([seed, i]).generate_state(1, np.uint64)[0]) for i in range(count)]


def describe_patient(patient_seed: int, site: str = "public") -> Patient:
    """Everything about a patient that does not depend on the image size."""
    if site not in SITES:
        raise ValueError(f"site must be one of {SITES}, got {site!r}")
    rng = np.random.default_rng(patient_seed)
    u = rng.uniform
    view = "AP" if rng.random() < 0.3 else "PA"
    if site == "private":
        view = "AP"  # every film of the private site is a portable one
    findings = _draw_findings(rng)
    kinds = {f.kind: f for f in findings}
    a: dict = {
        "rotation": u(-0.05, 0.05), "shift_x": u(-0.03, 0.03), "shift_y": u(-0.025, 0.025),
        "zoom": u(0.93, 1.05) * (1.04 if view == "AP" else 1.0), "gamma": u(0.8, 1.25),
        "background": u(0.02, 0.08), "tissue": u(0.42, 0.55), "body_w": u(0.40, 0.48), "neck_w": u(0.08, 0.11),
        "lung_offset": u(0.17, 0.21, 2), "lung_rx": u(0.12, 0.16, 2), "lung_top": u(0.10, 0.17, 2),
        "lung_dark": u(0.22, 0.32), "dome_h": u(0.04, 0.08, 2), "marking": u(0.18, 0.3),
        "heart_x": u(0.03, 0.07), "heart_y": u(0.60, 0.66), "heart_rx": u(0.11, 0.14), "heart_ry": u(0.10, 0.13),
        "mediastinum_w": u(0.06, 0.09), "spine_w": u(0.03, 0.04), "vertebra": u(0.055, 0.07),
        "vertebra_phase": u(0, 1), "rib_first": u(0.0, 0.03, 2), "rib_step": u(0.055, 0.07, 2),
        "rib_jitter": u(-0.008, 0.008, (2, RIBS_PER_SIDE)), "rib_curve": u(1.0, 1.8, 2),
        "rib_thick": u(0.010, 0.016, 2), "rib_amp": u(0.05, 0.09),
        "clavicle": np.stack([u(0.03, 0.06, 2), u(0.16, 0.22, 2), u(0.30, 0.38, 2), u(0.08, 0.14, 2)], 1),
        "clavicle_thick": u(0.012, 0.018), "clavicle_amp": u(0.08, 0.14),
        "textures": [rng.standard_normal((n, n)) for n, _ in TEXTURE_GRIDS],
    }
    bottom = u(0.72, 0.82)
    # The liver lifts the right dome above the left one.
    a["lung_bottom"] = np.array([bottom - u(0.01, 0.05), bottom])
    if view == "AP":
        a["clavicle"][:, 1] -= 0.03
        a["clavicle"][:, 3] -= 0.03
        a["heart_rx"] *= 1.08
    if "cardiomegaly" in kinds:
        a["heart_rx"] *= HEART_GROWTH[kinds["cardiomegaly"].grade]
        a["heart_ry"] *= 1.1
    a.update(_nodule_geometry(rng, kinds.get("nodule"), a))
    a.update(_effusion_geometry(rng, kinds.get("effusion")))
    devices: tuple[str, ...] = ()
    if site == "private":
        # Its own stream ([seed, 2]; the fake identity uses [seed, 1], the pixel noise [seed, size >= 16]).
        devices = _draw_private_site(np.random.default_rng([patient_seed, 2]), a)
    report = write_report(view, findings, rng, site, devices)
    return Patient(patient_seed, view, findings, report, a, site, devices)


def render_phantom(patient_seed: int, size: int = 64, site: str = "public") -> tuple[np.ndarray, str]:
    """One patient's radiograph (float32 size x size, [0, 1], bright = dense) and report, in memory."""
    images, reports = render_phantoms([patient_seed], size, site)
    return images[0], reports[0]


def render_phantoms(seeds, size: int = 64, site: str = "public") -> tuple[np.ndarray, list[str]]:
    """Many patients at once: float32 N x size x size in [0, 1] and their reports."""
    patients = [describe_patient(int(s), site) for s in seeds]
    return render_patients(patients, size), [p.report for p in patients]


def render_patients(patients: list[Patient], size: int) -> np.ndarray:
    out = np.empty((len(patients), size, size), dtype=np.float32)
    chunk = max(1, PIXELS_PER_CHUNK // (size * size))
    for start in range(0, len(patients), chunk):
        out[start:start + chunk] = _render_batch(patients[start:start + chunk], size)
    return out


def _draw_findings(rng: np.random.Generator) -> tuple[Finding, ...]:
    findings = []
    if rng.random() < 0.3:
        findings.append(Finding("nodule", SIDES[rng.integers(2)], ZONES[rng.integers(3)],
                                ("small", "large")[rng.integers(2)]))
    if rng.random() < 0.25:
        findings.append(Finding("effusion", SIDES[rng.integers(2)], None,
                                ("small", "moderate", "large")[rng.integers(3)]))
    if rng.random() < 0.2:
        findings.append(Finding("cardiomegaly", None, None, ("mild", "moderate", "severe")[rng.integers(3)]))
    return tuple(findings)


def _draw_private_site(rng: np.random.Generator, a: dict) -> tuple[str, ...]:
    """The private site's protocol and devices, added to the anatomy dict `a`; returns the devices drawn."""
    u = rng.uniform
    a["scatter"] = u(0.16, 0.26)  # fog: what would be black starts here
    a["contrast"] = u(0.55, 0.7)  # what is left of the public films' range
    a["noise"] = u(0.015, 0.025)
    a["collimation"] = u(0.05, 0.12, 4)  # unexposed border widths: image left, right, top, bottom
    # The marker's corner (x, y of the "L"), just inside the field's upper-right corner.
    a["marker"] = np.array([1 - a["collimation"][1] - u(0.1, 0.14), a["collimation"][2] + u(0.01, 0.03)])
    devices = tuple(name for name, rate in DEVICE_RATES.items() if rng.random() < rate)
    heart = (0.5 + a["heart_x"], a["heart_y"])
    # Each device as a polyline in patient coordinates (it moves with the patient), [x, y] per point.
    a["pacemaker"] = np.array([u(0.66, 0.72), u(0.17, 0.22)])  # the generator, on the patient's left
    a["pacemaker_lead"] = _curve(a["pacemaker"], (0.52, u(0.3, 0.36)), (heart[0], heart[1] + u(0.0, 0.04)))
    a["endotracheal_tube"] = _curve((0.5, -0.05), (0.5 + u(-0.01, 0.01), 0.1), (0.5 + u(-0.015, 0.015),
                                                                                u(0.24, 0.3)))
    a["central_line"] = _curve((u(0.22, 0.27), u(0.14, 0.18)), (0.4, u(0.2, 0.24)), (0.47, u(0.32, 0.38)))
    a["nasogastric_tube"] = _curve((0.5, -0.05), (0.49 + u(-0.01, 0.01), 0.6), (u(0.6, 0.66), u(0.84, 0.9)))
    return devices


def _curve(a, b, c, points: int = 12) -> np.ndarray:
    """A quadratic Bezier curve from a to c pulled towards b, as `points` points (x, y)."""
    t = np.linspace(0.0, 1.0, points)[:, None]
    a, b, c = (np.asarray(v, dtype=np.float64) for v in (a, b, c))
    return (1 - t) ** 2 * a + 2 * (1 - t) * t * b + t ** 2 * c


def _nodule_geometry(rng, nodule: Finding | None, a: dict) -> dict:
    if nodule is None:
        return {"nodule": np.array([0.5, 0.5, 0.02, 0.0])}
    side = SIDES.index(nodule.side)
    center_x = 0.5 + (2 * side - 1) * a["lung_offset"][side]
    x = center_x + rng.uniform(-0.4, 0.4) * a["lung_rx"][side]
    top, bottom = a["lung_top"][side], a["lung_bottom"][side] - a["dome_h"][side]
    y = top + (ZONES.index(nodule.zone) + rng.uniform(0.3, 0.7)) * (bottom - top) / 3
    return {"nodule": np.array([x, y, rng.uniform(*NODULE_RADIUS[nodule.grade]), rng.uniform(0.2, 0.3)])}


def _effusion_geometry(rng, effusion: Finding | None) -> dict:
    if effusion is None:
        return {"effusion": np.array([0.0, 0.0, 0.0, 0.0])}
    height = EFFUSION_HEIGHT[effusion.grade] * rng.uniform(0.85, 1.15)
    # [side index, fluid height above the costophrenic angle, meniscus rise, present]
    return {"effusion": np.array([SIDES.index(effusion.side), height, rng.uniform(0.3, 0.8), 1.0])}


def _stack(patients: list[Patient], name: str) -> np.ndarray:
    values = np.stack([np.asarray(p.anatomy[name], dtype=np.float32) for p in patients])
    return values.reshape(values.shape + (1, 1))  # broadcast over the image's rows and columns


def _sigmoid(z):
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def _ellipse(x, y, cx, cy, rx, ry):
    """Soft inside-mask of an ellipse: ~1 inside, ~0 outside, EDGE-wide transition."""
    q = np.sqrt(((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2)
    return _sigmoid((1.0 - q) * np.minimum(rx, ry) / EDGE)


def _render_batch(patients: list[Patient], size: int) -> np.ndarray:
    def p(name):
        return _stack(patients, name)

    grid = (np.arange(size, dtype=np.float32) + 0.5) / size
    gx, gy = grid[None, None, :] - 0.5, grid[None, :, None] - 0.5
    cos, sin, zoom = np.cos(p("rotation")), np.sin(p("rotation")), p("zoom")
    x = 0.5 + (cos * gx - sin * gy) / zoom - p("shift_x")
    y = 0.5 + (sin * gx + cos * gy) / zoom - p("shift_y")
    lateral = np.abs(x - 0.5)
    on_left = x < 0.5  # the patient's right side

    body = np.maximum(
        _sigmoid((1.0 - (((x - 0.5) / p("body_w")) ** 4 + ((y - 0.62) / 0.62) ** 4) ** 0.25) * p("body_w") / EDGE),
        _sigmoid((p("neck_w") - lateral) / EDGE) * _sigmoid((0.12 - y) / EDGE))
    image = p("background") + (p("tissue") - p("background")) * body

    offsets, radii, tops, bottoms, domes = (p(n) for n in ("lung_offset", "lung_rx", "lung_top", "lung_bottom",
                                                           "dome_h"))
    lungs = []
    for side in (0, 1):
        cx = 0.5 + (2 * side - 1) * offsets[:, side]
        top, bottom, rx = tops[:, side], bottoms[:, side], radii[:, side]
        ry = (bottom - top) / 2 + 0.04
        dome = bottom - domes[:, side] * np.clip(1.0 - ((x - cx) / (1.1 * rx)) ** 2, 0.0, 1.0)
        lungs.append(_ellipse(x, y, cx, top + ry, rx, ry) * _sigmoid((dome - y) / EDGE))
    lung = np.maximum(lungs[0], lungs[1])

    heart = _ellipse(x, y, 0.5 + p("heart_x"), p("heart_y"), p("heart_rx"), p("heart_ry"))
    mediastinum = _sigmoid((p("mediastinum_w") - lateral) / EDGE) * _sigmoid((p("heart_y") - y) / EDGE)
    effusion = _effusion_mask(p("effusion"), x, y, lateral, on_left, bottoms)
    field = lung * (1.0 - heart) * (1.0 - mediastinum) * (1.0 - effusion)
    image = image - p("lung_dark") * field * (1.0 - p("marking") * _markings(patients, size))
    image = image + 0.05 * heart + 0.03 * effusion * lung

    vertebrae = 0.6 + 0.4 * np.cos(2 * np.pi * (y / p("vertebra") + p("vertebra_phase")))
    image = image + 0.08 * _sigmoid((p("spine_w") - lateral) / EDGE) * vertebrae * body
    image = image + p("rib_amp") * _ribs(p, y, lateral, on_left, tops, bottoms, radii, offsets) * body
    image = image + p("clavicle_amp") * _clavicles(p("clavicle"), p("clavicle_thick"), x, y)
    nodule = p("nodule")
    image = image + nodule[:, 3] * np.exp(-((x - nodule[:, 0]) ** 2 + (y - nodule[:, 1]) ** 2)
                                          / (2 * nodule[:, 2] ** 2))

    image = np.clip(image, 0.0, 1.0) ** p("gamma")
    noise = np.stack([np.random.default_rng([pt.seed, size]).standard_normal((size, size), dtype=np.float32)
                      for pt in patients])
    sigma = np.full((len(patients), 1, 1), PUBLIC_NOISE, dtype=np.float32)
    for i, patient in enumerate(patients):
        if patient.site == "private":
            image[i] = _private_film(image[i], patient.anatomy, patient.devices, x[i], y[i], grid)
            sigma[i] = patient.anatomy["noise"]
    return np.clip(image + sigma * noise, 0.0, 1.0).astype(np.float32)


def _private_film(image, a: dict, devices, x, y, grid) -> np.ndarray:
    """The private site's film of one patient's (noise-free) public rendering."""
    for device in devices:
        if device == "pacemaker":
            cx, cy = a["pacemaker"]
            box = _sigmoid((0.035 - np.abs(x - cx)) / (EDGE / 2)) * _sigmoid((0.022 - np.abs(y - cy)) / (EDGE / 2))
            image = image + 0.7 * box + 0.4 * _polyline(a["pacemaker_lead"], x, y, 0.006)
        else:  # tubes and lines: a radiopaque strip of their own width
            width = 0.006 if device == "central_line" else 0.01
            image = image + 0.3 * _polyline(a[device], x, y, width)
    image = a["scatter"] + a["contrast"] * np.clip(image, 0.0, 1.0)
    # The collimator blocks the beam: outside the field the film stays bright, whatever the patient's position.
    left, right, top, bottom = a["collimation"]
    gx, gy = grid[None, :], grid[:, None]
    field = (_sigmoid((gx - left) / 0.004) * _sigmoid((1 - right - gx) / 0.004)
             * _sigmoid((gy - top) / 0.004) * _sigmoid((1 - bottom - gy) / 0.004))
    image = field * image + (1.0 - field) * 0.9
    mx, my = a["marker"]
    # An "L" in lead: a vertical bar and a foot, as bright as metal.
    letter = np.maximum(((np.abs(gx - mx) < 0.012) & (np.abs(gy - my - 0.03) < 0.04)),
                        ((np.abs(gx - mx - 0.025) < 0.035) & (np.abs(gy - my - 0.06) < 0.012)))
    return np.where(letter, 1.0, image).astype(np.float32)


def _polyline(points: np.ndarray, x, y, width: float) -> np.ndarray:
    """Soft strip of the given half-width along a polyline, ~1 on it and ~0 away from it."""
    distance = np.full(np.broadcast_shapes(x.shape, y.shape), np.inf, dtype=np.float32)
    for (ax, ay), (bx, by) in zip(points[:-1], points[1:]):
        dx, dy = bx - ax, by - ay
        t = np.clip(((x - ax) * dx + (y - ay) * dy) / (dx * dx + dy * dy), 0.0, 1.0)
        distance = np.minimum(distance, np.sqrt((x - ax - t * dx) ** 2 + (y - ay - t * dy) ** 2))
    return _sigmoid((width - distance) / (EDGE / 3))


def _effusion_mask(effusion, x, y, lateral, on_left, bottoms):
    side, height, rise, present = (effusion[:, i] for i in range(4))
    bottom = np.where(side == 0, bottoms[:, 0], bottoms[:, 1])
    # The meniscus: fluid climbs higher along the lateral chest wall than at the middle.
    level = bottom - height * (1.0 + rise * np.clip((lateral - 0.05) / 0.35, 0.0, 1.0))
    on_side = np.where(side == 0, on_left, ~on_left)
    return present * on_side * _sigmoid((y - level) / EDGE)


def _ribs(p, y, lateral, on_left, tops, bottoms, radii, offsets):
    first, step, jitter = p("rib_first"), p("rib_step"), p("rib_jitter")
    curve, thick = p("rib_curve"), p("rib_thick")
    pick = lambda values: np.where(on_left, values[:, 0], values[:, 1])  # noqa: E731 (per-side parameter)
    reach = pick(offsets) + pick(radii) + 0.04
    extent = _sigmoid((lateral - 0.03) / EDGE) * _sigmoid((reach - lateral) / EDGE)
    extent = extent * _sigmoid((pick(bottoms) + 0.03 - y) / (2 * EDGE))  # fading out over the abdomen
    # Posterior ribs leave the spine, rise a little, then sweep down along the chest wall.
    bend = pick(curve) * ((lateral - 0.1) ** 2 - 0.01)
    ribs = np.zeros(np.broadcast_shapes(y.shape, lateral.shape), dtype=np.float32)
    for k in range(RIBS_PER_SIDE):
        start = pick(tops) + pick(first) + k * pick(step) + pick(jitter[:, :, k])
        ribs += np.exp(-(((y - start - bend) / pick(thick)) ** 2))
    return ribs * extent


def _clavicles(ends, thick, x, y):
    out = 0.0
    for side in (0, 1):
        sign = 2 * side - 1
        ax, ay = 0.5 + sign * ends[:, side, 0], ends[:, side, 1]
        bx, by = 0.5 + sign * ends[:, side, 2], ends[:, side, 3]
        dx, dy = bx - ax, by - ay
        t = np.clip(((x - ax) * dx + (y - ay) * dy) / (dx * dx + dy * dy), 0.0, 1.0)
        out = out + np.exp(-(((x - ax - t * dx) ** 2 + (y - ay - t * dy) ** 2) / thick ** 2))
    return out


def _markings(patients: list[Patient], size: int) -> np.ndarray:
    """Each patient's own lung markings: smooth noise from Gaussian bumps on coarse grids, unit variance."""
    grid = (np.arange(size, dtype=np.float32) + 0.5) / size
    total = 0.0
    for level, (count, radius) in enumerate(TEXTURE_GRIDS):
        centers = (np.arange(count, dtype=np.float32) + 0.5) / count
        basis = np.exp(-(((grid[:, None] - centers[None, :]) / radius) ** 2))  # size x count
        coeffs = np.stack([pt.anatomy["textures"][level] for pt in patients]).astype(np.float32)
        field = basis @ coeffs @ basis.T
        spread = np.sqrt((basis ** 2).sum(1))
        total = total + field / (spread[:, None] * spread[None, :]) / np.sqrt(len(TEXTURE_GRIDS))
    return total
