"""The synthetic hospital on disk: phantom radiographs as real DICOM files, and a manifest for training.

The DICOM headers carry realistic *fake* patient names, IDs, birth dates and accession numbers, exactly so that
the identifier guard has something to catch: none of them may reach the manifest, a log or any report. The
manifest identifies patients only by a pseudonym (`subject`), unrelated to the fake PatientID.

Files vary the way hospital exports vary: MONOCHROME1 and MONOCHROME2, 8/10/12/16 bits stored, rescale slope
and intercept, with and without a VOI window (LINEAR or LINEAR_EXACT). Whatever the encoding, the reader gets
back the rendered image (up to the stored bit depth): the values are written through the inverse of the display
chain that `read_dicom` applies.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from tqdm import tqdm

from ..errors import ConfigError
from .phantoms import PIXELS_PER_CHUNK, SITES, describe_patient, patient_seeds, render_patients

SOP_CLASSES = {"CR": "1.2.840.10008.5.1.4.1.1.1", "DX": "1.2.840.10008.5.1.4.1.1.1.1"}
BIT_DEPTHS = ((8, 8), (16, 10), (16, 12), (16, 16))  # (BitsAllocated, BitsStored)
RESCALES = ((1.0, 0.0), (1.0, -1024.0), (0.5, 0.0), (2.0, 100.0))  # (slope, intercept)
VOI_FUNCTIONS = ("LINEAR", None, "LINEAR_EXACT")  # None: no window in the file
USED_RANGE = (0.04, 0.96)  # share of the stored range a windowed file uses, as detectors rarely use it all
MANIFEST_COLUMNS = ("file", "text", "subject", "view", "findings", "devices", "photometric", "bits_stored",
                    "duplicate")

FAMILY_NAMES = (
    "Abernathy", "Blackwood", "Castellano", "Delacroix", "Eriksson", "Fitzgerald", "Gallagher", "Hargreaves",
    "Ivanova", "Jablonski", "Kowalczyk", "Lindqvist", "Montgomery", "Nakamura", "Oyelaran", "Pemberton",
    "Quintero", "Rasmussen", "Sorensen", "Thornbury", "Vasquez", "Whitfield", "Yamamoto", "Zielinski",
    "Achterberg", "Bergstrom", "Chandrasekar", "Dombrowski", "Esposito", "Ferreira", "Grimaldi", "Holloway",
    "Iwasaki", "Jorgensen", "Kristiansen", "Lombardi", "Mbeki", "Novakova", "Okonkwo", "Papadopoulos",
)
GIVEN_NAMES = (
    "Adelaide", "Bartholomew", "Cornelius", "Dorothea", "Evangeline", "Florentin", "Gwendolyn", "Horatio",
    "Imogen", "Jeremias", "Kassandra", "Leopold", "Marguerite", "Nathaniel", "Octavia", "Peregrine", "Rosalind",
    "Sebastian", "Theodora", "Ulysses", "Valentina", "Wilhelmina", "Xavier", "Yolanda", "Zachariah",
)


@dataclass(frozen=True)
class Encoding:
    """How one file stores its pixels."""

    photometric: str
    bits_allocated: int
    bits_stored: int
    slope: float
    intercept: float
    voi_function: str | None
    modality: str

    @classmethod
    def for_index(cls, i: int) -> "Encoding":
        """Cycling with different periods, so that even a small cohort holds every variant."""
        allocated, stored = BIT_DEPTHS[(i // 2) % len(BIT_DEPTHS)]
        slope, intercept = RESCALES[(i // 8) % len(RESCALES)]
        return cls(("MONOCHROME2", "MONOCHROME1")[i % 2], allocated, stored, slope, intercept,
                   VOI_FUNCTIONS[i % len(VOI_FUNCTIONS)], ("CR", "DX")[(i // 3) % 2])

    def stored_range(self) -> tuple[int, int]:
        top = 2 ** self.bits_stored - 1
        if self.voi_function is None:
            return 0, top
        return round(USED_RANGE[0] * top), round(USED_RANGE[1] * top)

    def encode(self, image: np.ndarray) -> np.ndarray:
        """Stored values whose display (modality LUT, window, MONOCHROME1 inversion) is `image`."""
        shown = 1.0 - image if self.photometric == "MONOCHROME1" else image
        low, high = self.stored_range()
        stored = low + np.rint(np.clip(shown, 0.0, 1.0) * (high - low))
        return stored.astype(np.uint8 if self.bits_allocated == 8 else np.uint16)

    def window(self) -> tuple[float, float] | None:
        """Center and width that map the used stored range onto the full display range."""
        if self.voi_function is None:
            return None
        low, high = (self.slope * v + self.intercept for v in self.stored_range())
        if self.voi_function == "LINEAR_EXACT":
            return (low + high) / 2, high - low
        return (low + high) / 2 + 0.5, high - low + 1  # LINEAR: PS3.3 C.11.2.1.2.1


def make_phantoms(out_dir, patients: int, seed: int, duplicates: int = 0, size: int = 64, site: str = "public",
                  records: int = 2) -> Path:
    """Write `patients` phantom radiographs of `site` as DICOM under `out_dir/images/` and `out_dir/manifest.csv`.

    `duplicates` patients are repeated: each has `records` records in all (other files, other accession numbers,
    the same image and subject), as repeated exports and follow-up copies occur in real archives. The duplicate
    column of the manifest numbers a patient's records (0 for the first). Returns the manifest's path.
    """
    if site not in SITES:
        raise ConfigError(f"site must be one of {', '.join(SITES)}, got {site!r}")
    if duplicates and records < 2:
        raise ConfigError(f"records (per repeated patient) must be at least 2, got {records}")
    if patients < 1:
        raise ConfigError(f"patients must be at least 1, got {patients}")
    if not 0 <= duplicates <= patients:
        raise ConfigError(f"duplicates must be between 0 and the number of patients ({patients}), got {duplicates}")
    if size < 16:
        raise ConfigError(f"size must be at least 16 px, got {size}")
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    seeds = patient_seeds(seed, patients)
    repeated = set(np.random.default_rng([seed, patients, 1]).choice(patients, duplicates, replace=False).tolist())
    width = max(4, len(str(patients)))
    rows, duplicate_rows = [], []
    chunk = max(1, PIXELS_PER_CHUNK // (size * size))
    with tqdm(total=patients + duplicates * (records - 1), desc="writing phantoms", unit="file") as bar:
        for start in range(0, patients, chunk):
            batch = [describe_patient(s, site) for s in seeds[start:start + chunk]]
            for offset, (patient, image) in enumerate(zip(batch, render_patients(batch, size))):
                index = start + offset
                subject = f"sub-{index + 1:0{width}d}"
                encoding = Encoding.for_index(index)
                identity = _fake_identity(patient.seed)
                files = [(f"images/{subject}.dcm", 0)]
                if index in repeated:
                    files += [(f"images/{subject}_dup{k}.dcm", k) for k in range(1, records)]
                for name, record in files:
                    _write_dicom(out_dir / name, image, encoding, identity, patient.view, seed, subject, record)
                    row = {"file": name, "text": patient.report, "subject": subject, "view": patient.view,
                           "findings": ";".join(f.label() for f in patient.findings) or "none",
                           "devices": ";".join(patient.devices) or "none",
                           "photometric": encoding.photometric, "bits_stored": encoding.bits_stored,
                           "duplicate": record}
                    (duplicate_rows if record else rows).append(row)
                    bar.update(1)
    manifest = out_dir / "manifest.csv"
    with open(manifest, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=MANIFEST_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows + duplicate_rows)
    return manifest


def _fake_identity(patient_seed: int) -> dict:
    rng = np.random.default_rng([patient_seed, 1])
    born = np.datetime64("1935-01-01") + int(rng.integers(0, 70 * 365))
    return {
        "PatientName": f"{FAMILY_NAMES[rng.integers(len(FAMILY_NAMES))]}^{GIVEN_NAMES[rng.integers(len(GIVEN_NAMES))]}",
        "PatientID": f"MRN{rng.integers(10 ** 7, 10 ** 8)}",
        "PatientBirthDate": str(born).replace("-", ""),
        "PatientSex": ("F", "M")[rng.integers(2)],
        "ReferringPhysicianName":
            f"{FAMILY_NAMES[rng.integers(len(FAMILY_NAMES))]}^{GIVEN_NAMES[rng.integers(len(GIVEN_NAMES))]}",
        "accession": int(rng.integers(10 ** 7, 10 ** 8)),
        "StudyDate": str(np.datetime64("2019-01-01") + int(rng.integers(0, 6 * 365))).replace("-", ""),
    }


def _write_dicom(path: Path, image: np.ndarray, enc: Encoding, identity: dict, view: str, seed: int,
                 subject: str, record: int) -> None:
    def uid(kind: str) -> str:
        return generate_uid(entropy_srcs=["memcontrol-phantom", str(seed), subject, str(record), kind])

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = SOP_CLASSES[enc.modality]
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = SOP_CLASSES[enc.modality]
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid("instance")
    ds.StudyInstanceUID, ds.SeriesInstanceUID = uid("study"), uid("series")
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = enc.modality, "CHEST", view
    ds.Manufacturer, ds.InstitutionName = "memcontrol phantom", "Synthetic General Hospital"
    for name in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "ReferringPhysicianName",
                 "StudyDate"):
        setattr(ds, name, identity[name])
    # A second record of the same study is a re-export: it gets its own accession number.
    ds.AccessionNumber = f"ACC{identity['accession'] + record}"
    ds.StudyTime, ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = "093000", "1", 1, 1
    if enc.modality == "DX":
        ds.PresentationIntentType = "FOR PRESENTATION"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    size = image.shape[0]
    ds.Rows, ds.Columns = image.shape
    ds.ImagerPixelSpacing = [round(430.0 / size, 4)] * 2  # a 43 cm detector
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, enc.photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = enc.bits_allocated, enc.bits_stored, enc.bits_stored - 1
    ds.PixelRepresentation = 0
    ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = enc.slope, enc.intercept, "US"
    window = enc.window()
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
        ds.VOILUTFunction = enc.voi_function
    data = enc.encode(image).astype(f"<u{enc.bits_allocated // 8}").tobytes()
    ds.PixelData = data + b"\0" * (len(data) % 2)  # DICOM values have even length
    ds["PixelData"].VR = "OB" if enc.bits_allocated == 8 else "OW"
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
