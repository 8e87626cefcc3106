"""Standard names, colours and terminology codes (SNOMED CT, as in Slicer's terminology lists)."""

from typing import Optional

ANATOMICAL_STRUCTURE = ["SCT", "123037004", "Anatomical Structure"]
# Slicer's "Segmentation category and type - 3D Slicer General Anatomy list" files lesions as a
# Mass under "Morphologically Altered Structure"
ALTERED_STRUCTURE = ["SCT", "49755003", "Morphologically Altered Structure"]

STRUCTURES = {
    "liver": {"color": [0.866667, 0.509804, 0.396078], "code": ["SCT", "10200004", "Liver"]},
    "right kidney": {
        "color": [0.72549, 0.4, 0.32549],
        "code": ["SCT", "64033007", "Kidney"],
        "modifier": ["SCT", "24028007", "Right"],
    },
    "left kidney": {
        "color": [0.72549, 0.4, 0.32549],
        "code": ["SCT", "64033007", "Kidney"],
        "modifier": ["SCT", "7771000", "Left"],
    },
    "spleen": {"color": [0.615686, 0.423529, 0.635294], "code": ["SCT", "78961009", "Spleen"]},
    "lesion": {"color": [0.564706, 0.933333, 0.564706], "code": ["SCT", "4147007", "Mass"],
               "category": ALTERED_STRUCTURE},
}


def class_entry(label: int, name: str, postprocessing: Optional[dict] = None) -> dict:
    """A model card class entry for a known structure name."""
    info = STRUCTURES[name]
    term = {"category": info.get("category", ANATOMICAL_STRUCTURE), "type": info["code"]}
    if "modifier" in info:
        term["typeModifier"] = info["modifier"]
    return {
        "label": int(label),
        "name": name,
        "color": list(info["color"]),
        "terminology": term,
        "postprocessing": postprocessing or {},
    }
