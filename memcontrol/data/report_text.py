"""Short radiology reports for the phantoms, in the words the tiny tokenizer knows (one token per word).

The findings decide the content; the phrasing is drawn from the patient's own random stream, as different
radiologists word the same finding differently, so that most reports differ between patients. Reports of the
private site name its own protocol (every film portable, AP, supine) and the support devices in the image, lines and
tubes first as radiologists list them; the wording keeps to words the frozen text encoder already has.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

VIEWS = {
    "PA": ("pa chest radiograph.", "frontal pa view of the chest.", "pa erect chest radiograph.",
           "chest x ray, pa view."),
    "AP": ("ap portable chest radiograph.", "portable ap view of the chest.", "ap supine chest radiograph.",
           "chest x ray, ap view."),
}
PRIVATE_VIEWS = ("portable ap supine chest radiograph.", "ap portable supine chest radiograph.",
                 "portable supine ap view of the chest.", "supine portable chest x ray, ap view.")
DEVICES = {  # device -> its sentences, each naming where the device lies
    "pacemaker": ("cardiac device with line to the heart.", "left chest cardiac device with line to the heart."),
    "endotracheal_tube": ("tube in the upper mediastinum.", "midline tube in the upper chest."),
    "central_line": ("right line to the mediastinum.", "right upper chest line to the mediastinum."),
    "nasogastric_tube": ("tube to the left hemidiaphragm.", "midline tube to the left hemidiaphragm."),
}
NO_DEVICE = ("no device.", "no line and no tube.")
NODULE = ("{grade} nodule in the {side} {zone} zone.", "there is a {grade} nodule in the {side} {zone} zone.",
          "{side} {zone} zone nodule, {grade}.", "{grade} {side} {zone} zone nodule is seen.")
EFFUSION = ("{grade} {side} pleural effusion.", "{side} pleural effusion, {grade}.",
            "{grade} {side} pleural effusion with costophrenic angle blunting.",
            "blunting of the {side} costophrenic angle with {grade} pleural effusion.")
CARDIOMEGALY = ("{grade} cardiomegaly.", "heart size enlarged, {grade}.", "enlarged cardiac silhouette, {grade}.",
                "cardiac silhouette {grade} enlarged.")
NEGATIVES = {
    "nodule": ("no nodule.", "no opacity.", "lungs clear."),
    "effusion": ("no pleural effusion.", "costophrenic angles clear.", "no effusion."),
    "cardiomegaly": ("heart size normal.", "normal cardiac silhouette.", "cardiac silhouette normal."),
    "other": ("no pneumothorax.", "no consolidation.", "mediastinum normal.", "no rib fracture."),
}
NORMAL_IMPRESSIONS = ("impression: no acute cardiopulmonary process.", "impression: normal chest radiograph.",
                      "impression: unremarkable study.")


@dataclass(frozen=True)
class Finding:
    kind: str  # "nodule", "effusion" or "cardiomegaly"
    side: str | None = None  # the patient's "left" or "right" (on the image, the patient's right is on the left)
    zone: str | None = None  # "upper", "middle" or "lower" (nodules)
    grade: str | None = None  # nodule "small"/"large"; effusion "small"/"moderate"/"large"; heart "mild"/...

    def label(self) -> str:
        """Compact form for the manifest's findings column, e.g. 'nodule:right:upper:small'."""
        return ":".join(p for p in (self.kind, self.side, self.zone, self.grade) if p)


def write_report(view: str, findings: list[Finding], rng: np.random.Generator, site: str = "public",
                 devices: tuple[str, ...] = ()) -> str:
    if site == "public":
        sentences = [_pick(rng, VIEWS[view])]
    else:
        sentences = [_pick(rng, PRIVATE_VIEWS)]
        sentences += [_pick(rng, DEVICES[d]) for d in devices] or [_pick(rng, NO_DEVICE)]
    templates = {"nodule": NODULE, "effusion": EFFUSION, "cardiomegaly": CARDIOMEGALY}
    for finding in findings:
        sentences.append(_pick(rng, templates[finding.kind]).format(
            side=finding.side, zone=finding.zone, grade=finding.grade))
    present = {f.kind for f in findings}
    absent = [kind for kind in ("nodule", "effusion", "cardiomegaly") if kind not in present]
    # Radiologists mention some, not all, of the pertinent negatives.
    for kind in absent:
        if rng.random() < 0.6:
            sentences.append(_pick(rng, NEGATIVES[kind]))
    if rng.random() < 0.5:
        sentences.append(_pick(rng, NEGATIVES["other"]))
    if not findings:
        sentences.append(_pick(rng, NORMAL_IMPRESSIONS))
    return " ".join(sentences)


def _pick(rng: np.random.Generator, options) -> str:
    return options[int(rng.integers(len(options)))]
