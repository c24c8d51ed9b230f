"""Data ingest (images, DICOM, manifests) and the synthetic hospital of phantom chest radiographs."""

from .dataset import ImageCaptionDataset, load_source, write_skipped
from .dicom import DicomImage, is_dicom_file, patient_identifiers, read_dicom
from .hospital import make_phantoms
from .images import read_image
from .inspection import ItemReport, inspect_paths
from .manifest import Entry, pseudonym, read_entries, run_salt
from .phantoms import describe_patient, patient_seeds, render_phantom, render_phantoms
from .transforms import to_model_tensor

__all__ = [
    "DicomImage", "Entry", "ImageCaptionDataset", "ItemReport", "describe_patient", "inspect_paths",
    "is_dicom_file", "load_source", "make_phantoms", "patient_identifiers", "patient_seeds", "pseudonym",
    "read_dicom", "read_entries", "read_image", "render_phantom", "render_phantoms", "run_salt", "to_model_tensor",
    "write_skipped",
]
