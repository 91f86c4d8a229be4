"""Whether an instance may show identifying text in its pixels, which de-identification of
the header cannot remove (PS3.15 E.3.1, Clean Pixel Data, is not implemented): such an
instance goes to quarantine for a person to review, unless the policy waives it."""

from __future__ import annotations

from pydicom.dataset import Dataset

from medimg_ingest.deid.policy import Policy

#: Modalities whose images commonly carry burned-in text when Burned In Annotation (0028,0301)
#: is absent: ultrasound (the scanner's screen, with name and date, is the image), screen and
#: document captures (OT, SC, DOC), and camera and video sources whose overlays are recorded
#: into the frames (XC external camera, ES endoscopy, GM general microscopy, OP ophthalmic
#: photography, IVUS and IVOCT intravascular imaging).
MODALITIES_THAT_BURN_IN = frozenset(
    {"US", "IVUS", "IVOCT", "OT", "SC", "DOC", "XC", "ES", "GM", "OP"}
)

#: SOP classes that are captures of screens or documents whatever their Modality says
#: (a dose report screen saved as a CT-modality Secondary Capture is the classic leak).
SOP_CLASSES_THAT_BURN_IN = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture Image Storage
        "1.2.840.10008.5.1.4.1.1.7.1",  # Multi-frame Single Bit Secondary Capture
        "1.2.840.10008.5.1.4.1.1.7.2",  # Multi-frame Grayscale Byte Secondary Capture
        "1.2.840.10008.5.1.4.1.1.7.3",  # Multi-frame Grayscale Word Secondary Capture
        "1.2.840.10008.5.1.4.1.1.7.4",  # Multi-frame True Color Secondary Capture
        "1.2.840.10008.5.1.4.1.1.6",  # Ultrasound Image Storage (Retired)
        "1.2.840.10008.5.1.4.1.1.6.1",  # Ultrasound Image Storage
        "1.2.840.10008.5.1.4.1.1.6.2",  # Enhanced US Volume Storage
        "1.2.840.10008.5.1.4.1.1.3",  # Ultrasound Multi-frame Image Storage (Retired)
        "1.2.840.10008.5.1.4.1.1.3.1",  # Ultrasound Multi-frame Image Storage
        "1.2.840.10008.5.1.4.1.1.104.1",  # Encapsulated PDF Storage
        "1.2.840.10008.5.1.4.1.1.104.2",  # Encapsulated CDA Storage
    }
)


def needs_quarantine(dataset: Dataset, policy: Policy) -> bool:
    """True when the instance must be held back: Burned In Annotation is YES, or it is absent
    (or empty) on a modality or SOP class that usually burns text in. An explicit NO is
    trusted."""
    if policy.allow_burned_in:
        return False
    burned_in = str(dataset.get("BurnedInAnnotation", "") or "").strip().upper()
    if burned_in:
        return burned_in != "NO"
    modality = str(dataset.get("Modality", "") or "").strip().upper()
    sop_class = str(dataset.get("SOPClassUID", "") or "").strip()
    return modality in MODALITIES_THAT_BURN_IN or sop_class in SOP_CLASSES_THAT_BURN_IN
