"""Names every module must agree on: class order, the positive class, file kinds.

Directory loaders sort class names alphabetically, which would make ``Parasitized``
index 0. We fix the order here instead so that "probability" always means
P(Parasitized) and index 1 is always the positive class, in training and serving.
"""

CLASS_NAMES: tuple[str, str] = ("Uninfected", "Parasitized")
POSITIVE_CLASS: str = "Parasitized"
POSITIVE_INDEX: int = CLASS_NAMES.index(POSITIVE_CLASS)

# P(Parasitized) at or above which a cell is called Parasitized, unless a model card
# says otherwise.
DEFAULT_THRESHOLD: float = 0.5

IMAGE_SUFFIXES: frozenset[str] = frozenset(
    {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".webp"}
)
